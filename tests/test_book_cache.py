"""utils.book_cache: a chapter's code closure, and dropping only its cache records.

Pure and fast: a fake repository in tmp_path and a real jupyter-cache there, no
book build.
"""

import json
import textwrap
from pathlib import Path

import pytest

from utils import book_cache as bc

ROOT = Path(__file__).resolve().parents[1]

HEADER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""


def chapter_text(*cells: str, title: str = "A chapter") -> str:
    body = [HEADER, f"# {title}\n"]
    for cell in cells:
        body.append(f"Some prose.\n\n```{{code-cell}} ipython3\n{cell.strip()}\n```\n")
    return "\n".join(body)


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


ALPHA_CELLS = ("from labs.alpha import run\nrun()",)
BETA_CELLS = (
    "%matplotlib inline\nfrom utils.beta import go",
    "!ls\nimport math",
    "%%writefile /tmp/learner.py\nfrom utils import for_learners\n",
    "%%bash\necho not python (\n",
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Two chapters: alpha reaches utils.lazy only through a lazy import inside a
    function; beta reaches utils.beta.core through the package's __init__.py, and
    from there (relative and lazy imports) utils.helpers and utils.launch, whose
    fork-server _PRELOAD names utils.preloaded."""
    write(
        tmp_path,
        {
            "_toc.yml": """\
                format: jb-book
                root: intro
                parts:
                  - caption: One
                    chapters:
                      - file: chapters/01-alpha
                  - caption: Two
                    chapters:
                      - file: chapters/02-beta
            """,
            "intro.md": "# Intro\n\nNo code here.\n",
            "pyproject.toml": '[project]\nname = "fake"\ndependencies = ["numpy"]\n',
            "labs/__init__.py": '"""Labs."""\n',
            "labs/alpha.py": """\
                import os


                def run():
                    from utils.lazy import thing

                    return thing()
            """,
            "utils/__init__.py": "",
            "utils/lazy.py": "def thing():\n    return 1\n",
            "utils/beta/__init__.py": "from .core import go\n",
            "utils/beta/core.py": """\
                from ..helpers import helper


                def go():
                    from utils.launch import launch

                    return launch(helper)
            """,
            "utils/helpers.py": "def helper():\n    return 2\n",
            "utils/launch.py": """\
                _PRELOAD = [
                    "torch",
                    "utils.preloaded",
                ]


                def launch(fn):
                    return fn()
            """,
            "utils/preloaded.py": "X = 3\n",
            "utils/for_learners.py": "Z = 5\n",
            "utils/unused.py": "Y = 4\n",
            "chapters/01-alpha.md": chapter_text(*ALPHA_CELLS, title="Alpha"),
            "chapters/02-beta.md": chapter_text(*BETA_CELLS, title="Beta"),
        },
    )
    return tmp_path


ALPHA = {"labs/__init__.py", "labs/alpha.py", "utils/__init__.py", "utils/lazy.py"}
BETA = {
    "utils/__init__.py",
    "utils/beta/__init__.py",
    "utils/beta/core.py",
    "utils/helpers.py",
    "utils/launch.py",
    "utils/preloaded.py",
    "utils/for_learners.py",  # imported by a %%writefile cell's code
}


def by_name(found):
    return {c.name: c for c in found}


# ------------------------------------------------------------------- the closure


def test_toc_entries_parts_top_level_chapters_and_sections(tmp_path):
    write(
        tmp_path,
        {
            "_toc.yml": """\
                format: jb-book
                root: intro
                chapters:
                  - file: chapters/00-top.md
                parts:
                  - caption: A
                    chapters:
                      - file: chapters/01-a
                        sections:
                          - file: chapters/01-a-more
                  - caption: B
                    chapters:
                      - file: chapters/02-b
                      - url: https://example.org
            """
        },
    )
    assert bc.toc_entries(tmp_path) == [
        "intro",
        "chapters/00-top",
        "chapters/01-a",
        "chapters/01-a-more",
        "chapters/02-b",
    ]


def test_each_chapter_closure(repo):
    found = by_name(bc.chapters(repo))
    assert list(found) == ["intro", "chapters/01-alpha", "chapters/02-beta"]
    assert found["intro"].fingerprint is None  # no kernelspec: not executed
    assert set(found["chapters/01-alpha"].files) == ALPHA | {"pyproject.toml"}
    assert set(found["chapters/02-beta"].files) == BETA | {"pyproject.toml"}
    # the closure function itself, on the cells
    cells = bc.code_cells(repo / "chapters/02-beta.md")
    assert bc.closure(repo, cells) == BETA


def test_closure_follows_submodules_attributes_and_string_imports(repo):
    write(
        repo,
        {
            "utils/pkg/__init__.py": "",
            "utils/pkg/sub.py": "import importlib\n"
            "importlib.import_module('utils.named')\n",
            "utils/named.py": "import subprocess\n"
            "subprocess.run(['py', '-m', 'utils.mained'])\n",
            "utils/mained.py": "",
            "utils/ns/mod.py": "",  # a namespace package: no __init__.py
        },
    )
    assert bc.closure(repo, ["from utils.pkg import sub"]) == {
        "utils/__init__.py",
        "utils/pkg/__init__.py",
        "utils/pkg/sub.py",
        "utils/named.py",
        "utils/mained.py",
    }
    # `from m import name` where name is a function, not a module; a module that
    # is not ours; a missing one
    assert bc.closure(repo, ["from utils.helpers import helper\nimport numpy"]) == {
        "utils/__init__.py",
        "utils/helpers.py",
    }
    assert bc.closure(repo, ["from utils.gone import x"]) == {"utils/__init__.py"}
    assert bc.closure(repo, ["from utils.ns import mod"]) == {
        "utils/__init__.py",
        "utils/ns/mod.py",
    }


def test_preload_only_through_utils_launch(repo):
    assert "utils/preloaded.py" not in bc.closure(repo, ["import utils.helpers"])
    assert "utils/preloaded.py" in bc.closure(repo, ["from utils import launch"])


def test_fence_parser_agrees_with_jupytext(repo):
    text = chapter_text(*BETA_CELLS) + textwrap.dedent(
        """
        ````{code-cell} ipython3
        ---
        tags: [hide-input]
        ---
        x = '''
        ```
        '''
        ````

        ```{code-cell} ipython3
        :tags: [remove-cell]
        y = 1
        ```
        """
    )
    path = repo / "chapters/03-fence.md"
    path.write_text(text)
    assert bc._fence_code_cells(text) == bc.code_cells(path)


def test_only_the_chapter_that_imports_a_changed_module_is_stale(repo):
    build = repo / "_build"
    before = by_name(bc.chapters(repo))
    manifest = {"version": bc.VERSION, "chapters": bc._entries(before.values())}

    (repo / "utils/unused.py").write_text("Y = 5\n")
    now = by_name(bc.chapters(repo, manifest))
    assert not any(c.stale for c in now.values())

    (repo / "utils/lazy.py").write_text("def thing():\n    return 10\n")
    now = by_name(bc.chapters(repo, manifest))
    assert now["chapters/01-alpha"].stale and not now["chapters/02-beta"].stale
    assert now["chapters/01-alpha"].line() == (
        "chapters/01-alpha: code changed (utils/lazy.py), re-executing"
    )
    assert now["chapters/02-beta"].line() == "chapters/02-beta: unchanged, cached"

    (repo / "utils/helpers.py").write_text("from utils import unused\n")
    now = by_name(bc.chapters(repo, manifest))
    assert now["chapters/02-beta"].line() == (
        "chapters/02-beta: code changed (utils/helpers.py, now imports "
        "utils/unused.py), re-executing"
    )

    (repo / "pyproject.toml").write_text('[project]\nname = "fake"\n')
    now = by_name(bc.chapters(repo, manifest))
    assert now["chapters/01-alpha"].stale and now["chapters/02-beta"].stale
    assert "pyproject.toml" in now["chapters/02-beta"].line()
    assert not build.exists()


# --------------------------------------------------------------- jupyter-cache


def cache_like_myst_nb(cache, path: Path, marker: str = ""):
    """Store a chapter the way myst-nb's NotebookClientCache does after executing
    it: read with create_nb_reader, uri from add_nb_to_project."""
    from jupyter_cache.base import CacheBundleIn
    from myst_nb.core.config import NbParserConfig
    from myst_nb.core.read import create_nb_reader
    from myst_parser.config.main import MdParserConfig

    text = path.read_text()
    reader = create_nb_reader(str(path), MdParserConfig(), NbParserConfig(), text)
    nb = reader.read(text)
    stage = cache.add_nb_to_project(str(path), read_data=reader.read_fmt)
    return cache.cache_notebook_bundle(
        CacheBundleIn(nb, stage.uri, data={"execution_seconds": 1.0, "m": marker}),
        check_validity=False,
        overwrite=True,
    )


@pytest.fixture
def cached(repo):
    """The fake repo after a build: both chapters in a jupyter-cache in
    _build/.jupyter_cache, their doctrees in _build/.doctrees, fingerprints
    recorded."""
    pytest.importorskip("jupyter_cache")
    pytest.importorskip("myst_nb")
    from jupyter_cache import get_cache

    build = repo / "_build"
    cache = get_cache(str(build / ".jupyter_cache"))
    pks = {
        name: cache_like_myst_nb(cache, repo / f"{name}.md").pk
        for name in ("chapters/01-alpha", "chapters/02-beta")
    }
    for name in pks:
        tree = build / ".doctrees" / f"{name}.doctree"
        tree.parent.mkdir(parents=True, exist_ok=True)
        tree.write_bytes(b"pickled doctree")
    assert bc.run(repo, build)  # before the build: nothing recorded, all stale
    cache = get_cache(str(build / ".jupyter_cache"))
    assert cache.list_cache_records() == []
    pks = {
        name: cache_like_myst_nb(cache, repo / f"{name}.md").pk
        for name in ("chapters/01-alpha", "chapters/02-beta")
    }
    for name in pks:
        (build / ".doctrees" / f"{name}.doctree").write_bytes(b"pickled doctree")
    bc.commit(repo, build)  # the build succeeded
    return repo, build, cache, pks


def test_notebook_hash_is_the_key_myst_nb_looks_up(cached):
    repo, build, cache, pks = cached
    for name, pk in pks.items():
        path = repo / f"{name}.md"
        assert bc.notebook_hash(cache, path) == cache.get_cache_record(pk).hashkey
        # and myst-nb's own lookup finds that record
        from myst_nb.core.read import read_myst_markdown_notebook

        nb = read_myst_markdown_notebook(path.read_text(), add_source_map=True)
        assert cache.match_cache_notebook(nb).pk == pk


def test_invalidation_removes_only_the_stale_chapters_record(cached):
    repo, build, cache, pks = cached
    assert json.loads((build / bc.MANIFEST).read_text())["chapters"].keys() == set(pks)
    assert not (build / bc.PENDING).exists()

    (repo / "utils/lazy.py").write_text("def thing():\n    return 10\n")
    dry = bc.run(repo, build, dry_run=True)
    assert dry[1:3] == [
        "chapters/01-alpha: code changed (utils/lazy.py), would re-execute",
        f"  would remove cache record {pks['chapters/01-alpha']} and "
        ".doctrees/chapters/01-alpha.doctree",
    ]
    assert {r.pk for r in cache.list_cache_records()} == set(pks.values())

    lines = bc.run(repo, build)
    assert lines == [
        "intro: not an executed notebook, skipped",
        "chapters/01-alpha: code changed (utils/lazy.py), re-executing",
        f"  removed cache record {pks['chapters/01-alpha']} and "
        ".doctrees/chapters/01-alpha.doctree",
        "chapters/02-beta: unchanged, cached",
    ]
    assert [r.pk for r in cache.list_cache_records()] == [pks["chapters/02-beta"]]
    assert not (build / ".doctrees/chapters/01-alpha.doctree").exists()
    assert (build / ".doctrees/chapters/02-beta.doctree").exists()
    executed = build / ".jupyter_cache" / "executed"
    assert len(list(executed.iterdir())) == 1  # its executed notebook went too

    # the build re-executes alpha; then --commit records it
    cache_like_myst_nb(cache, repo / "chapters/01-alpha.md")
    bc.commit(repo, build)
    assert all(line.endswith("unchanged, cached") for line in bc.run(repo, build)[1:])


def test_records_matched_by_hash_and_by_uri(cached):
    """A chapter's records: the one its cells hash to, and every one stored from
    its file (earlier cells); a renamed chapter still finds its record by hash."""
    repo, build, cache, pks = cached
    from jupyter_cache.base import CacheBundleIn
    from myst_nb.core.read import read_myst_markdown_notebook

    alpha = repo / "chapters/01-alpha.md"
    earlier = read_myst_markdown_notebook(chapter_text("print('earlier cells')"))
    old = cache.cache_notebook_bundle(
        CacheBundleIn(earlier, str(alpha.absolute())), check_validity=False
    )
    chapter = by_name(bc.chapters(repo))["chapters/01-alpha"]
    assert {r.pk for r in bc.records_of(cache, chapter)} == {
        pks["chapters/01-alpha"],
        old.pk,
    }

    alpha.rename(repo / "chapters/01-renamed.md")
    toc = repo / "_toc.yml"
    toc.write_text(toc.read_text().replace("01-alpha", "01-renamed"))
    chapter = by_name(bc.chapters(repo))["chapters/01-renamed"]
    assert (
        chapter.line()
        == "chapters/01-renamed: no recorded code fingerprint, re-executing"
    )
    assert [r.pk for r in bc.records_of(cache, chapter)] == [pks["chapters/01-alpha"]]
    bc.run(repo, build)
    assert {r.pk for r in cache.list_cache_records()} == {
        old.pk,
        pks["chapters/02-beta"],
    }


def test_commit_skips_a_chapter_whose_code_changed_during_the_build(cached):
    repo, build, cache, pks = cached
    (repo / "utils/lazy.py").write_text("V = 1\n")
    bc.run(repo, build)
    (repo / "utils/lazy.py").write_text("V = 2\n")  # edited while the book builds
    lines = bc.commit(repo, build)
    assert lines[0] == "chapters/01-alpha: code changed during the build, not recorded"
    assert bc.run(repo, build, dry_run=True)[1].startswith(
        "chapters/01-alpha: code changed (utils/lazy.py)"
    )


def test_commit_without_invalidation_records_nothing(repo):
    build = repo / "_build"
    assert "not recorded" in bc.commit(repo, build)[0]
    assert not (build / bc.MANIFEST).exists()


def test_no_cache_yet_creates_none(repo):
    build = repo / "_build"
    lines = bc.run(repo, build, dry_run=True)
    assert lines[-1].startswith("book_cache: no cache at")
    assert not build.exists()  # a dry run writes nothing
    bc.run(repo, build)
    assert not (build / ".jupyter_cache").exists()
    assert (build / bc.PENDING).exists()


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "m.json"
    bc.write_json(path, {"version": 1, "chapters": {}})
    bc.write_json(path, {"version": 1, "chapters": {"a": 1}})
    assert json.loads(path.read_text())["chapters"] == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


# ------------------------------------------------------------------ this book


def test_this_books_chapters_reach_their_lab():
    """Each chapter of this book reaches labs/<name>.py (the layout in _toc.yml)."""
    for chapter in bc.chapters(ROOT):
        if chapter.fingerprint is None or not chapter.name.startswith("chapters/"):
            continue
        name = Path(chapter.name).name.split("-", 1)[1].replace("-", "_")
        assert "pyproject.toml" in chapter.files
        if (ROOT / "labs" / f"{name}.py").exists():
            assert f"labs/{name}.py" in chapter.files, chapter.name


def test_a_package_s_scripts_are_in_the_closure_of_its_importers():
    """The live explorer's JavaScript is read at run time: a change to it must
    re-execute the chapters that show the explorer."""
    root = Path(__file__).resolve().parents[1]
    got = bc.closure(root, ["from utils.explorer import planner_explorer"])
    assert {"utils/explorer/planner.js", "utils/explorer/explorer.js"} <= got
    assert "utils/explorer/__init__.py" in got
