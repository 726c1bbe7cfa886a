"""The published book: the Pages workflow, the reader notebooks, Binder and Colab.

- ``.github/workflows/pages.yml`` parses and has the steps that publish the book:
  ``make book``, the Pages upload and deploy, the weekly rebuild from scratch, the
  link check, the ``notebooks`` branch the launch buttons open;
- ``utils/notebooks.py``: the install cell does nothing off Colab and, on Colab,
  installs the course without touching torch; every literalinclude is expanded; as
  a Sphinx extension (a small book built here with the book's own launch settings)
  it rewrites the download and points Colab and Binder at the ``notebooks`` branch;
- ``.binder/`` installs the course with CPU torch at pyproject.toml's pin;
- after ``make book``, every chapter's download has outputs and the install cell,
  and one downloaded notebook executes in a fresh kernel from a temporary folder.
  Without a built book those tests skip, or fail where COURSE_REQUIRE_BROWSER=1
  (CI builds the book first).

    .venv/bin/python -m pytest tests/test_publish.py
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from tests.test_chapters import chapter_paths
from utils import notebooks

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "pages.yml"
BOOK = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html"))
DOWNLOADS = BOOK / "_sources" / "chapters"
FRESH_KERNEL_CHAPTER = "06-simd-mimd"
"""The chapter whose download the fresh-kernel test executes: the quickest.
Measured (nbclient, fresh kernel, from the MyST source, on a 2-core machine shared
with other jobs): chapter 6 took 12.1 s, chapter 0 23.4 s."""
SHA = re.compile(r"[^@\s]+@[0-9a-f]{40}")


def skip_or_fail(reason: str):
    """Skip, or fail where CI requires the built book (COURSE_REQUIRE_BROWSER=1,
    as in tests/test_browser.py)."""
    if os.environ.get("COURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"built book required but missing: {reason}")
    pytest.skip(reason)


def book_config() -> dict:
    """The Sphinx configuration Jupyter Book derives from _config.yml."""
    from jupyter_book.config import get_final_config

    config, _ = get_final_config(
        user_yaml=ROOT / "_config.yml",
        cli_config={"latex_individualpages": False},
        sourcedir=ROOT,
    )
    return config


# ------------------------------------------------------------------ the workflow


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def triggers(wf: dict) -> dict:
    return wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def runs(job: dict) -> list[str]:
    """Each shell command of a job's steps, one line each, comments dropped."""
    return [
        line.split("#")[0].strip()
        for step in steps(job)
        for line in step.get("run", "").splitlines()
        if line.split("#")[0].strip()
    ]


def uses(job: dict, action: str) -> list[dict]:
    return [s for s in steps(job) if s.get("uses", "").startswith(f"{action}@")]


def test_workflow_runs_on_push_to_main_by_hand_and_weekly():
    on = triggers(workflow())
    assert on["push"]["branches"] == ["main"]
    assert "workflow_dispatch" in on
    (cron,) = [entry["cron"] for entry in on["schedule"]]
    fields = cron.split()
    assert len(fields) == 5 and fields[2:4] == ["*", "*"] and fields[4] != "*", (
        f"the rebuild must be weekly, got cron {cron!r}"
    )


def test_workflow_builds_the_strict_book_and_deploys_it_to_pages():
    wf = workflow()
    jobs = wf["jobs"]
    build = jobs["build"]
    commands = runs(build)
    assert "make book" in commands
    # chromium and nodejs from apt, as .ci/run installs them, before the build
    apt = next(i for i, c in enumerate(commands) if "apt-get install" in c)
    assert {"chromium", "nodejs", "npm"} <= set(commands[apt].split())
    assert apt < commands.index("make book")
    # nothing is published that .ci/run would fail: tests (browser suite included),
    # lint and the graded solutions, after the build and before the upload
    (checks,) = [c for c in commands if c.startswith("make test")]
    assert {"lint", "check-solutions"} <= set(checks.split())
    assert commands.index(checks) > commands.index("make book")
    gated = next(s for s in steps(build) if s.get("run") == checks)
    assert gated["env"]["COURSE_REQUIRE_BROWSER"] == "1"
    (upload,) = uses(build, "actions/upload-pages-artifact")
    assert upload["with"]["path"] == "_build/html"
    assert steps(build).index(upload) > next(
        i for i, s in enumerate(steps(build)) if s.get("run") == "make book"
    )
    deploy = jobs["deploy"]
    assert "build" in deploy["needs"]
    assert uses(deploy, "actions/deploy-pages")
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert wf["permissions"] == {"contents": "read"}, "least privilege by default"
    assert wf["concurrency"]["cancel-in-progress"] is False


def test_workflow_rebuilds_from_scratch_and_checks_links_on_schedule():
    jobs = workflow()["jobs"]
    rebuild = jobs["rebuild"]
    assert "schedule" in rebuild["if"]
    assert "push" in jobs["build"]["if"] and "schedule" not in jobs["build"]["if"]
    commands = runs(rebuild)
    assert commands.index("make clean") < commands.index("make book")
    assert not uses(rebuild, "actions/cache"), "the rebuild must not restore a cache"
    (link,) = [c for c in commands if "--builder linkcheck" in c]
    assert commands.index(link) > commands.index("make book")
    # the option and its value exist in the installed Jupyter Book CLI
    from jupyter_book.cli.main import build as jb_build

    (builder,) = [p for p in jb_build.params if p.name == "builder"]
    assert "--builder" in builder.opts and "linkcheck" in builder.type.choices
    # every chapter's download executes in a fresh kernel there
    envs = [s.get("env", {}) for s in rebuild["steps"] if "pytest" in s.get("run", "")]
    assert any(e.get("COURSE_ALL_DOWNLOADS") == "1" for e in envs), envs
    report = jobs["report"]
    assert report["needs"] == "rebuild" and "failure()" in report["if"]
    assert any("gh issue create" in c for c in runs(report))


def test_workflow_pushes_the_notebooks_the_buttons_open():
    wf = workflow()
    job = wf["jobs"]["notebooks"]
    assert job["permissions"] == {"contents": "write"}
    assert "notebooks" in wf["jobs"]["deploy"]["needs"]
    (upload,) = [
        s
        for s in uses(wf["jobs"]["build"], "actions/upload-artifact")
        if s["with"]["name"] == "notebooks"
    ]
    # every notebook page of the book, chapters and workshop alike: each has buttons
    pages = [
        p.relative_to(ROOT)
        for p in sorted(ROOT.glob("*/*.md"))
        if "```{code-cell}" in p.read_text()
        and p.parent.name in ("chapters", "workshop")
    ]
    assert {p.parts[0] for p in pages} == {"chapters", "workshop"}
    uploaded = upload["with"]["path"].split()
    for folder in {p.parts[0] for p in pages}:
        assert f"_build/html/_sources/{folder}/*.ipynb" in uploaded, folder
    (download,) = uses(job, "actions/download-artifact")
    assert download["with"]["name"] == "notebooks"
    script = "\n".join(runs(job))
    assert 'git push --force origin "$commit:refs/heads/$NOTEBOOKS_BRANCH"' in script
    # each notebook keeps its path (chapters/x.ipynb, workshop/y.ipynb)
    assert 'cacheinfo "100644,$blob,$nb"' in script
    assert (
        "test -f chapters/00-foundations.ipynb && test -f workshop/failures.ipynb"
        in (script)
    )
    assert wf["env"]["NOTEBOOKS_BRANCH"] == book_config()["course_notebooks_branch"]


def test_every_action_is_pinned_to_a_commit():
    found = [
        step["uses"]
        for job in workflow()["jobs"].values()
        for step in steps(job)
        if "uses" in step
    ]
    assert found
    loose = [u for u in found if not SHA.fullmatch(u)]
    assert not loose, f"actions not pinned to a 40-hex commit: {loose}"


# --------------------------------------------------------------- Binder, config


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_binder_installs_the_course_with_cpu_torch_at_the_pinned_version():
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / ".binder" / "requirements.txt").read_text().splitlines()
    ]
    lines = [line for line in lines if line]
    (pin,) = [d for d in pyproject()["dependencies"] if d.startswith("torch")]
    version = pin.split("==")[1]
    assert f"torch=={version}+cpu" in lines
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert "." in lines, "Binder must install the course itself"
    for dep in notebooks.NOTEBOOK_ONLY_DEPENDENCIES:
        assert dep in lines
    runtime = (ROOT / ".binder" / "runtime.txt").read_text().strip()
    from packaging.specifiers import SpecifierSet

    assert runtime.removeprefix("python-") in SpecifierSet(
        pyproject()["requires-python"]
    )


def test_config_loads_the_extension_and_keeps_the_download_button():
    config = book_config()
    assert "utils.notebooks" in config["extensions"]
    options = config["html_theme_options"]
    # the theme writes _sources/*.ipynb only when a launch button is configured
    assert options["launch_buttons"]["binderhub_url"].startswith("https://")
    assert not options["launch_buttons"].get("colab_url"), (
        "the theme's own Colab button would open the chapter's .md on main"
    )
    notebooks.github_repo(options["repository_url"])


# ------------------------------------------------------------ the install cell


def run_install_cell(monkeypatch, on_colab: bool) -> list[list[str]]:
    """Execute the install cell; return the commands it ran (none really run)."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    if on_colab:
        colab = types.ModuleType("colab")
        colab.output = types.SimpleNamespace(
            enable_custom_widget_manager=lambda: calls.append("widget manager")
        )
        monkeypatch.setitem(sys.modules, "google.colab", colab)
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    cell = notebooks.install_cell("https://github.com/org/course", "notebooks")
    exec(compile(cell.source, "install-cell", "exec"), {})
    return calls


def test_install_cell_does_nothing_off_colab(monkeypatch):
    assert run_install_cell(monkeypatch, on_colab=False) == []


def test_install_cell_installs_the_course_on_colab_without_touching_torch(
    monkeypatch,
):
    calls = run_install_cell(monkeypatch, on_colab=True)
    # ipywidgets 8's widgets render in Colab through its custom widget manager
    assert calls.pop() == "widget manager"
    assert len(calls) == 2 and all(
        c[:4] == [sys.executable, "-m", "pip", "install"] for c in calls
    )
    course, deps = calls
    name = pyproject()["name"]
    assert "--no-deps" in course
    assert f"{name} @ git+https://github.com/org/course.git@notebooks" in course
    assert deps[4:] == ["--quiet", *notebooks.colab_dependencies()]
    assert not any(re.match(r"torch\b", arg) for c in calls for arg in c[4:])


def test_install_cell_refuses_a_bad_repository_or_ref():
    with pytest.raises(ValueError, match="repo_url"):
        notebooks.install_source("git@github.com:org/r", "main", [])
    with pytest.raises(ValueError, match="ref"):
        notebooks.install_source("https://github.com/org/r", "main; rm -rf", [])
    with pytest.raises(ValueError, match="github.com"):
        notebooks.github_repo("https://gitlab.com/org/r")


def _imports(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a cell with IPython magics
        return set()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_install_cell_installs_every_package_the_chapters_import():
    """A chapter importing a new package (say pandas) must add it to the install
    cell's list, or Colab readers hit ModuleNotFoundError."""
    from myst_nb.core.read import read_myst_markdown_notebook

    imported = {
        module
        for path in chapter_paths()
        for cell in read_myst_markdown_notebook(path.read_text()).cells
        if cell.cell_type == "code"
        for module in _imports(cell.source)
    }
    assert {"torch", "labs", "utils"} <= imported
    course = {"labs", "utils"}
    on_colab = {"torch", "IPython", "ipykernel"}  # Colab's kernel has these
    dists = importlib.metadata.packages_distributions()
    installed = {
        re.split(r"[<>=!~ ;\[]", d)[0].lower().replace("_", "-")
        for d in notebooks.colab_dependencies()
    }
    missing = {
        module: dists.get(module)
        for module in imported - course - on_colab - set(sys.stdlib_module_names)
        if not {d.lower().replace("_", "-") for d in dists.get(module, [])} & installed
    }
    assert not missing, f"chapters import packages the install cell lacks: {missing}"


# -------------------------------------------------------------- reader notebooks


def test_reader_notebook_expands_every_literalinclude_and_keeps_the_cells():
    from myst_nb.core.read import read_myst_markdown_notebook

    path = ROOT / "chapters" / f"{FRESH_KERNEL_CHAPTER}.md"
    nb = read_myst_markdown_notebook(path.read_text())
    includes = [
        c
        for c in nb.cells
        if c.cell_type == "markdown" and "{literalinclude}" in c.source
    ]
    assert includes, f"{path.name} has no literalinclude to test on"
    repo = "https://github.com/org/course"
    out = notebooks.reader_notebook(nb, path.parent, repo, "notebooks")
    again = notebooks.reader_notebook(out, path.parent, repo, "notebooks")
    assert again.cells == out.cells, "a second pass must not add a second cell"
    first, *rest = out.cells
    assert notebooks.INSTALL_TAG in first.metadata["tags"]
    assert [c.source for c in rest if c.cell_type == "code"] == [
        c.source for c in nb.cells if c.cell_type == "code"
    ]
    assert not any("{literalinclude}" in c.source for c in rest)
    # each block the expansion added holds lines of the file the directive names
    fences = re.compile(r"^```+\w*\n(.*?)^```+$", re.M | re.S)
    for before, after in zip(
        [c for c in nb.cells if c.cell_type == "markdown"],
        [c for c in rest if c.cell_type == "markdown"],
    ):
        targets = re.findall(r"\{literalinclude\}\s+(\S+)", before.source)
        added = [b for b in fences.findall(after.source) if b not in before.source]
        assert len(added) == len(targets)
        for target, block in zip(targets, added):
            file_lines = {line.strip() for line in (path.parent / target).open()}
            assert {line.strip() for line in block.splitlines()} <= file_lines


def test_expand_literalinclude_follows_sphinx(tmp_path):
    (tmp_path / "code.py").write_text(
        "def outside():\n    pass\n\n\nclass K:\n    # [m-start]\n"
        "    def m(self):\n        return 1\n    # [m-end]\n"
    )
    text = textwrap.dedent(
        """\
        Before.

        ```{literalinclude} code.py
        :language: python
        :start-after: "# [m-start]"
        :end-before: "# [m-end]"
        :dedent:
        ```

        After.
        """
    )
    out = notebooks.expand_literalincludes(text, tmp_path)
    assert out == ("Before.\n\n```python\ndef m(self):\n    return 1\n```\n\nAfter.\n")
    with pytest.raises(OSError, match="missing.py"):
        notebooks.expand_literalincludes(
            text.replace("code.py", "missing.py"), tmp_path
        )


def test_launch_urls_open_the_notebook_on_the_notebooks_branch():
    urls = notebooks.launch_urls(
        "https://github.com/org/course",
        "notebooks",
        "chapters/06-simd-mimd.ipynb",
        "https://mybinder.org/",
    )
    assert urls == {
        "Colab": "https://colab.research.google.com/github/org/course/blob/"
        "notebooks/chapters/06-simd-mimd.ipynb",
        "Binder": "https://mybinder.org/v2/gh/org/course/notebooks"
        "?urlpath=lab/tree/chapters/06-simd-mimd.ipynb",
    }
    with pytest.raises(ValueError, match="ipynb"):
        notebooks.launch_urls("https://github.com/o/r", "b", "chapters/x.md")


def test_extension_rewrites_the_download_and_the_launch_buttons(tmp_path):
    """A two-page book built with Sphinx (not the course: seconds) with the
    book's own launch settings from _config.yml."""
    import nbformat

    config = book_config()
    src = tmp_path / "src"
    (src / "chapters").mkdir(parents=True)
    (src / "lib").mkdir()
    (src / "lib" / "code.py").write_text("# [a]\nshown = 1\n# [b]\nhidden = 2\n")
    (src / "index.md").write_text("# Toy\n\n```{toctree}\nchapters/demo\n```\n")
    header = (ROOT / "chapters" / f"{FRESH_KERNEL_CHAPTER}.md").read_text()
    header = header[: header.index("---", 3) + 3]  # the chapters' jupytext header
    (src / "chapters" / "demo.md").write_text(
        f"{header}\n\n# Demo\n\n```{{literalinclude}} ../lib/code.py\n"
        ':start-after: "# [a]"\n:end-before: "# [b]"\n```\n\n'
        "```{code-cell} ipython3\nprint(1 + 1)\n```\n"
    )
    conf = {
        "extensions": ["myst_nb", "utils.notebooks"],
        "html_theme": "sphinx_book_theme",
        "html_theme_options": config["html_theme_options"],
        "course_notebooks_branch": config["course_notebooks_branch"],
        "nb_execution_mode": "off",
    }
    (src / "conf.py").write_text("".join(f"{k} = {v!r}\n" for k, v in conf.items()))
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "-q", src, out],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr

    nb = nbformat.read(out / "_sources" / "chapters" / "demo.ipynb", as_version=4)
    assert notebooks.INSTALL_TAG in nb.cells[0].metadata["tags"]
    assert "```python\nshown = 1\n```" in nb.cells[1].source
    page = (out / "chapters" / "demo.html").read_text()
    branch = config["course_notebooks_branch"]
    org, repo = notebooks.github_repo(config["html_theme_options"]["repository_url"])
    links = set(re.findall(r'href="([^"]+)"', page))
    assert "../_sources/chapters/demo.ipynb" in links, "no .ipynb download button"
    expected = notebooks.launch_urls(
        config["html_theme_options"]["repository_url"],
        branch,
        "chapters/demo.ipynb",
        config["html_theme_options"]["launch_buttons"]["binderhub_url"],
    )
    assert set(expected.values()) <= links
    stale = [u for u in links if ("binder" in u or "colab" in u) and u.endswith(".md")]
    assert not stale, f"launch buttons still open the .md: {stale}"
    assert f"/{org}/{repo}/" in expected["Colab"]


# ----------------------------------------------------------- the built book


def downloads() -> list[Path]:
    if not DOWNLOADS.is_dir():
        skip_or_fail(f"no downloads in {DOWNLOADS}: run `make book` first")
    return [DOWNLOADS / f"{p.stem}.ipynb" for p in chapter_paths()]


def test_every_chapter_downloads_with_outputs_and_the_install_cell():
    import nbformat

    for path in downloads():
        assert path.exists(), f"the book has no download of {path.name}"
        nb = nbformat.read(path, as_version=4)
        assert notebooks.INSTALL_TAG in nb.cells[0].metadata.get("tags", []), path
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
            f"{path.name} was downloaded without outputs"
        )
        assert not any("{literalinclude}" in c.source for c in nb.cells), path.name
        page = (BOOK / "chapters" / f"{path.stem}.html").read_text()
        assert f"/blob/{notebooks_branch()}/chapters/{path.name}" in page, (
            f"{path.stem}.html has no Colab button opening {path.name}"
        )


def notebooks_branch() -> str:
    return book_config()["course_notebooks_branch"]


@pytest.mark.slow
def test_downloaded_notebook_executes_in_a_fresh_kernel(tmp_path):
    """What a reader does: download a chapter, run it elsewhere (not in the book's
    folder, no cache, a new kernel). The quickest chapter here; every chapter with
    COURSE_ALL_DOWNLOADS=1 (the weekly rebuild sets it: about four minutes)."""
    every = os.environ.get("COURSE_ALL_DOWNLOADS") == "1"
    paths = [p for p in downloads() if every or p.stem == FRESH_KERNEL_CHAPTER]
    assert paths, f"no download of {FRESH_KERNEL_CHAPTER} in {DOWNLOADS}"
    for path in paths:
        _execute_fresh(path, tmp_path / path.stem)


def _execute_fresh(path: Path, folder: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    folder.mkdir()
    tmp_path = folder
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()  # raises CellExecutionError, naming the cell, if one fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code)
    assert any(c.get("outputs") for c in code)
