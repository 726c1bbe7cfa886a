"""The chapters as notebooks a reader downloads, or opens in Colab or on Binder.

Jupyter Book writes every executed chapter as a notebook: myst-nb saves it in
``_build/jupyter_execute/<page>.ipynb`` and sphinx-book-theme copies it to
``_build/html/_sources/<page>.ipynb`` for the page's ".ipynb" download button
(``add_launch_buttons`` in ``sphinx_book_theme/header_buttons/launch.py``, which does
so only when a launch button is configured: ``_config.yml``'s ``binderhub_url``).
That notebook holds the chapter's cells and outputs, but opened outside the book it
lacks two things:

* the course itself: Colab has torch but not ``labs`` and ``utils``;
* the code the page shows with ``{literalinclude}``: only Sphinx expands that
  directive, so Jupyter shows the directive's text instead of the code.

:func:`reader_notebook` adds both: a first cell that installs the course on Colab
(and does nothing anywhere else), and each literalinclude replaced by the code block
Sphinx would show, read by Sphinx's own ``LiteralIncludeReader``.

Loaded as a Sphinx extension (``_config.yml``: ``sphinx.extra_extensions``), this
module rewrites every chapter's downloadable notebook that way, and points the
page's Binder and Colab buttons at the copies that ``.github/workflows/pages.yml``
pushes to the ``notebooks`` branch (``course_notebooks_branch``): the theme would
point both at the chapter's ``.md`` on ``main``, and Colab opens only ``.ipynb``
files (``https://colab.research.google.com/github/<org>/<repo>/blob/<branch>/<path>``).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TAG = "course-install"
"""Tag of the install cell, so that a notebook rewritten twice gets one."""
COLAB_URL = "https://colab.research.google.com"
NOTEBOOK_ONLY_DEPENDENCIES = ("myst-nb",)
"""What the chapters import beyond the course's dependencies: ``myst_nb.glue``
(Jupyter Book installs it; Colab does not). tests/test_publish.py checks that every
package a chapter imports is installed by the install cell or already on Colab."""
_LITERALINCLUDE = re.compile(
    r"^(?P<fence>`{3,}|~{3,})\{literalinclude\}(?P<arg>[^\n]*)\n"
    r"(?P<body>.*?)^(?P=fence)[ \t]*$",
    re.M | re.S,
)
_LANGUAGES = {".py": "python", ".sh": "bash", ".sbatch": "bash", ".toml": "toml"}


def colab_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The course's dependencies without torch (Colab's own stays), then what the
    chapters need besides (:data:`NOTEBOOK_ONLY_DEPENDENCIES`)."""
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: the same parser, as a package (pyproject)
        import tomli as tomllib

    project = tomllib.loads(pyproject.read_text(encoding="utf8"))["project"]
    deps = [
        d for d in project["dependencies"] if re.split(r"[<>=!~ ;\[]", d)[0] != "torch"
    ]
    return deps + [d for d in NOTEBOOK_ONLY_DEPENDENCIES if d not in deps]


def install_source(
    repo_url: str, ref: str, dependencies: list[str], torch_version: str = ""
) -> str:
    """The install cell's code: on Colab (``google.colab`` is imported in its
    kernels), ``pip install --no-deps`` the course from ``repo_url`` at ``ref``, so
    that pip never touches Colab's torch, then the small ``dependencies``; then it
    turns on Colab's custom widget manager for the ipywidgets 8 widgets
    (googlecolab/colabtools#498), checks that the course's
    ``utils`` is the one imported, and says when Colab's torch is not the pinned
    ``torch_version`` (the doctor's pin by default)."""
    if not torch_version:
        from utils.doctor import PINNED_TORCH as torch_version
    if not re.fullmatch(r"https://[^\s\"']+", repo_url):
        raise ValueError(f"repo_url must be an https:// URL, got {repo_url!r}")
    if not re.fullmatch(r"[\w./-]+", ref):
        raise ValueError(f"ref must be a branch, tag or commit name, got {ref!r}")
    course = f"parallelization-course @ git+{repo_url.rstrip('/')}.git@{ref}"
    return "\n".join(
        [
            "# On Colab: install this course (its labs and utils) beside Colab's own",
            "# torch (--no-deps: pip never replaces it). Elsewhere this does nothing;",
            "# install the course with `pip install -e .` from a clone of the repo.",
            "import sys",
            "",
            'if "google.colab" in sys.modules:',
            "    import subprocess",
            "",
            f"    course = {json.dumps(course)}",
            f"    dependencies = {json.dumps(dependencies)}",
            '    pip = [sys.executable, "-m", "pip", "install", "--quiet"]',
            '    subprocess.run([*pip, "--no-deps", course], check=True)',
            "    subprocess.run([*pip, *dependencies], check=True)",
            "    try:  # the chapters' ipywidgets 8 widgets need Colab's own manager",
            "        from google.colab import output",
            "",
            "        output.enable_custom_widget_manager()",
            "    except (ImportError, AttributeError):",
            "        print('no custom widget manager here: widgets may not show')",
            "    try:  # a file or folder named utils beside the notebook hides ours",
            "        import utils.lab  # noqa: F401",
            "    except ImportError as err:",
            "        raise ImportError(",
            '            f"the course\'s utils package is hidden ({err}): rename the"',
            "            \" 'utils' file or folder in the notebook's folder\"",
            "        ) from err",
            "    import torch",
            "",
            f"    if torch.__version__.split('+')[0] != {json.dumps(torch_version)}:",
            "        print(",
            '            f"note: this runtime\'s torch is {torch.__version__};"',
            f'            " the course is tested with torch {torch_version}"',
            "        )",
        ]
    )


def install_cell(repo_url: str, ref: str, dependencies: list[str] | None = None):
    """The first cell of a reader's notebook (see :func:`install_source`)."""
    import nbformat

    deps = colab_dependencies() if dependencies is None else dependencies
    cell = nbformat.v4.new_code_cell(install_source(repo_url, ref, deps))
    # a stable id, so that a rebuilt notebook differs only where the chapter did
    cell.id = INSTALL_TAG
    cell.metadata["tags"] = [INSTALL_TAG]
    return cell


def expand_literalincludes(text: str, source_dir: Path, config=None) -> str:
    """``text`` (a markdown cell) with each ``{literalinclude}`` replaced by the code
    it shows, as a fenced block. Paths are relative to ``source_dir`` (the chapter's
    folder), as for Sphinx; the options are parsed by myst-parser and applied by
    Sphinx's ``LiteralIncludeReader`` (``config``: the Sphinx config, for
    ``source_encoding``)."""
    from myst_parser.parsers.directives import parse_directive_text
    from sphinx.directives.code import LiteralInclude, LiteralIncludeReader

    config = config or SimpleNamespace(source_encoding="utf-8-sig")

    def replace(match: re.Match) -> str:
        parsed = parse_directive_text(
            LiteralInclude, match["arg"].strip(), match["body"]
        )
        if parsed.warnings or not parsed.arguments:
            raise ValueError(
                f"cannot read the literalinclude {match[0]!r}: "
                f"{[w.msg for w in parsed.warnings] or 'no file named'}"
            )
        path = Path(source_dir) / parsed.arguments[0]
        code, _ = LiteralIncludeReader(str(path), parsed.options, config).read()
        language = parsed.options.get("language", _LANGUAGES.get(path.suffix, ""))
        ticks = max([3] + [len(t) + 1 for t in re.findall(r"`{3,}", code)])
        fence = "`" * ticks
        return f"{fence}{language}\n{code.rstrip()}\n{fence}"

    return _LITERALINCLUDE.sub(replace, text)


def reader_notebook(nb, source_dir: Path, repo_url: str, ref: str, config=None):
    """A copy of the built notebook ``nb`` for readers: the install cell first
    (replacing one a previous pass added) and every literalinclude expanded."""
    nb = copy.deepcopy(nb)
    cells = [c for c in nb.cells if INSTALL_TAG not in c.metadata.get("tags", [])]
    for cell in cells:
        if cell.cell_type == "markdown" and "{literalinclude}" in cell.source:
            cell.source = expand_literalincludes(cell.source, source_dir, config)
    nb.cells = [install_cell(repo_url, ref), *cells]
    return nb


def github_repo(repo_url: str) -> tuple[str, str]:
    """``(org, repo)`` of a ``https://github.com/<org>/<repo>`` URL."""
    match = re.fullmatch(
        r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", repo_url
    )
    if match is None:
        raise ValueError(
            f"repository url must be https://github.com/<org>/<repo>, got {repo_url!r}"
        )
    return match[1], match[2]


def launch_urls(
    repo_url: str, branch: str, notebook: str, binderhub_url: str = ""
) -> dict[str, str]:
    """Where the Colab and Binder buttons of a page lead: the notebook at
    ``notebook`` (repository path, ``chapters/06-simd-mimd.ipynb``) on ``branch``.
    Binder opens it in JupyterLab; both URL forms are the ones sphinx-book-theme
    builds (``header_buttons/launch.py``), with the branch and suffix changed."""
    org, repo = github_repo(repo_url)
    if not notebook.endswith(".ipynb"):
        raise ValueError(f"notebook must be an .ipynb path, got {notebook!r}")
    urls = {"Colab": f"{COLAB_URL}/github/{org}/{repo}/blob/{branch}/{notebook}"}
    if binderhub_url:
        hub = binderhub_url.rstrip("/")
        urls["Binder"] = (
            f"{hub}/v2/gh/{org}/{repo}/{branch}?urlpath=lab/tree/{notebook}"
        )
    return urls


# ------------------------------------------------------------- Sphinx extension


def _on_page(app, pagename, templatename, context, doctree) -> None:
    """After the theme has copied the page's notebook to ``_sources``: rewrite it
    for readers, and point the launch buttons at the ``notebooks`` branch."""
    import nbformat

    ipynb = context.get("ipynb_source")
    if not ipynb:  # not a Markdown notebook, or no launch button configured
        return
    options = app.config.html_theme_options
    repo_url = options.get("repository_url", "")
    branch = app.config.course_notebooks_branch
    path = Path(app.outdir) / "_sources" / ipynb
    source_dir = Path(app.env.doc2path(pagename)).parent
    nb = nbformat.read(path, as_version=4)
    nb = reader_notebook(nb, source_dir, repo_url, branch, app.config)
    nbformat.write(nb, path)

    root = options.get("path_to_docs", "").strip("/")
    urls = launch_urls(
        repo_url,
        branch,
        f"{root}/{ipynb}" if root else ipynb,
        options.get("launch_buttons", {}).get("binderhub_url", ""),
    )
    group = next(
        (b for b in context["header_buttons"] if b.get("label") == "launch-buttons"),
        None,
    )
    if group is None:
        return
    kept = [b for b in group["buttons"] if b.get("text") not in urls]
    group["buttons"] = kept + [
        {
            "type": "link",
            "text": name,
            "tooltip": f"Launch on {name}",
            "icon": f"_static/images/logo_{name.lower()}."
            + ("png" if name == "Colab" else "svg"),
            "url": url,
        }
        for name, url in urls.items()
    ]


def setup(app):
    """Sphinx entry point (``_config.yml``: ``sphinx.extra_extensions``). Runs
    after sphinx-book-theme's ``add_launch_buttons`` (priority 501)."""
    app.add_config_value("course_notebooks_branch", "notebooks", "html", types=[str])
    app.connect("html-page-context", _on_page, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
