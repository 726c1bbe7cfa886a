"""Every chapter executes from a fresh kernel, and the table of contents is honest.

The book build executes chapters too (with a cache); this test runs each one
afresh with nbclient, so a chapter that only works with a warm cache or a kernel
left over from an earlier run fails here.
"""

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):  # the book is grouped in parts
        files += [entry["file"] for entry in part["chapters"]]
    return files


def chapter_paths() -> list[Path]:
    return [ROOT / f"{f}.md" for f in toc_files() if f.startswith("chapters/")]


def test_toc_lists_exactly_the_chapters_that_exist():
    listed = {p.resolve() for p in chapter_paths()}
    for path in listed:
        assert path.exists(), (
            f"_toc.yml lists {path.relative_to(ROOT)}, which is missing"
        )
    on_disk = {p.resolve() for p in (ROOT / "chapters").glob("*.md")}
    assert on_disk == listed, f"chapters not in _toc.yml: {sorted(on_disk - listed)}"
    assert (ROOT / f"{toc_files()[0]}.md").exists()


def _untracked() -> set[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {line[3:] for line in out.splitlines() if line.startswith("??")}


@pytest.mark.slow
@pytest.mark.parametrize("path", chapter_paths(), ids=lambda p: p.stem)
def test_chapter_executes_from_a_fresh_kernel(path):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    notebook = jupytext.read(path)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", (
        f"{path.name} needs a jupytext header with kernelspec name python3"
    )
    before = _untracked()
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    assert any(
        out.get("output_type") in ("display_data", "execute_result")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    ), f"{path.name} displayed nothing"
    written = _untracked() - before
    assert not written, f"{path.name} wrote into the source tree: {sorted(written)}"
