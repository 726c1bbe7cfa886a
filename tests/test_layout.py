"""The course's layout (../shared/DESIGN.md, README "Layout"), checked on the tree.

- Each chapter in ``_toc.yml`` (grouped in parts) has its lab, package, test and
  bench under one name: ``chapters/NN-<slug>.md`` -> ``<name>`` = slug with "_".
- A chapter package imports shared modules and earlier chapters' packages only.
- Each name has one import path: no ``import *`` re-exports, and the helpers that
  used to be repeated are defined once.
- Every path README's layout section names exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("Foundations", "One axis at a time", "Putting it together", "For instructors")
INSTRUCTORS = "For instructors"
"""The last part: workshop pages (``workshop/*.md``), not chapters."""
NUMBERS = {
    "foundations": 0,
    "data_parallel": 1,
    "zero": 2,
    "offload": 3,
    "model_parallel": 4,
    "pipeline_parallel": 5,
    "simd_mimd": 6,
    "combined": 7,
}
"""Each chapter's number, from DESIGN.md's table: fixed, so that a chapter that
lands before an earlier one (model parallelism before offloading) keeps its file
name and its links when the gap is filled."""


def toc() -> dict:
    return yaml.safe_load((ROOT / "_toc.yml").read_text())


def chapters() -> list[tuple[str, str]]:
    """(file, name) of every chapter, in book order."""
    out = []
    for part in toc()["parts"]:
        if part["caption"] == INSTRUCTORS:
            continue  # workshop pages: test_instructor_pages_are_workshop_pages
        for entry in part["chapters"]:
            stem = Path(entry["file"]).name
            match = re.fullmatch(r"(\d\d)-([a-z0-9-]+)", stem)
            assert match, f"{entry['file']}: chapter files are NN-<slug>"
            out.append((entry["file"], match.group(2).replace("-", "_")))
    return out


def test_toc_is_grouped_in_the_courses_parts():
    captions = [p["caption"] for p in toc()["parts"]]
    assert captions == [c for c in PARTS if c in captions]
    assert captions[:2] == list(PARTS[:2])
    assert "chapters" not in toc(), "chapters belong to parts"
    numbers = [int(Path(f).name[:2]) for f, _ in chapters()]
    for (file, name), number in zip(chapters(), numbers):
        assert NUMBERS.get(name) == number, (
            f"{file}: DESIGN.md numbers {name!r} {NUMBERS.get(name)}"
        )
    assert numbers == sorted(numbers), "chapters in the book in DESIGN.md's order"


def test_instructor_pages_are_workshop_pages():
    parts = toc()["parts"]
    for part in parts:
        if part["caption"] != INSTRUCTORS:
            continue
        assert part is parts[-1], f"{INSTRUCTORS!r} is the book's last part"
        for entry in part["chapters"]:
            file = entry["file"]
            assert re.fullmatch(r"workshop/[a-z0-9-]+", file), f"{file}: workshop/"
            assert (ROOT / f"{file}.md").exists(), f"_toc.yml lists {file}, missing"


@pytest.mark.parametrize("chapter", chapters(), ids=lambda c: c[1])
def test_each_chapter_has_its_lab_package_test_and_bench(chapter):
    file, name = chapter
    for path in (
        f"{file}.md",
        f"labs/{name}.py",
        f"utils/{name}/__init__.py",
        f"tests/test_{name}.py",
        f"bench/{name}.py",
    ):
        assert (ROOT / path).exists(), f"chapter {file} has no {path}"
    init = ast.parse((ROOT / f"utils/{name}/__init__.py").read_text())
    doc = ast.get_docstring(init) or ""
    assert f"labs/{name}.py" in doc, f"utils/{name}/__init__ docstring maps the code"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_chapter_packages_import_only_shared_modules_and_earlier_chapters():
    order = [name for _, name in chapters()]
    for i, name in enumerate(order):
        later = set(order[i + 1 :])
        for path in (ROOT / "utils" / name).rglob("*.py"):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] == "labs":
                    pytest.fail(f"{path.relative_to(ROOT)} imports a lab: {module}")
                if parts[0] == "utils" and len(parts) > 1 and parts[1] in later:
                    pytest.fail(
                        f"{path.relative_to(ROOT)} imports {module}, a later chapter"
                    )


def _python_files():
    for folder in ("utils", "labs", "bench", "tests"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_star_imports():
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert all(a.name != "*" for a in node.names), (
                    f"{path.relative_to(ROOT)}: `from {node.module} import *`"
                )


ONCE = {
    "format_bytes": "utils/report.py",
    "field_of": "utils/report.py",
    "check_int": "utils/checks.py",
    "check_choice": "utils/checks.py",
    "BACKENDS": "utils/launch.py",
    "fit_alpha_beta": "utils/comm.py",
    "ACCELERATORS": "utils/hardware.py",
    "MODELS": "utils/hardware.py",
    "GB": "utils/hardware.py",
    "PhaseClock": "utils/lab.py",
    "broadcast_from_first_rank": "utils/comm.py",
}
"""Helpers that were written several times (the layout issue's list): where each
one now lives. ``_get`` (a report field reader, four copies) became ``field_of``."""


def _definitions(path: Path) -> set[str]:
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out


def test_repeated_helpers_are_defined_once():
    where: dict[str, list[str]] = {name: [] for name in ONCE}
    for path in _python_files():
        if path.parts[-2] == "tests" and path.name.startswith("test_"):
            continue  # tests may build their own fixtures
        defined = _definitions(path)
        for name in ONCE:
            if name in defined:
                where[name].append(str(path.relative_to(ROOT)))
        assert "_get" not in defined, f"{path.relative_to(ROOT)} defines _get again"
    assert where == {name: [home] for name, home in ONCE.items()}


def test_readme_layout_names_paths_that_exist():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    checked = 0
    for line in block.strip("\n").splitlines():
        if line.startswith("   "):
            continue  # the description of the line above, continued
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split()
        prefix = "utils/" if line.startswith("  ") else ""
        for name in names:
            if "<" in name:
                continue
            assert (ROOT / prefix / name).exists(), f"README's layout: no {name}"
            checked += 1
    assert checked >= 20, f"README's layout section names only {checked} paths"
