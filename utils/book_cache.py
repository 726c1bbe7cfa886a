"""Drop the book's execution cache only for the chapters whose imported code changed.

Run by ``make book`` around ``jupyter-book build``::

    python -m utils.book_cache            # before the build: invalidate
    python -m utils.book_cache --commit   # after a successful build: record
    python -m utils.book_cache --dry-run  # say what would be invalidated, touch nothing

Jupyter Book's cache (myst-nb's ``execute_notebooks: cache``, a jupyter-cache in
``_build/.jupyter_cache``) keys a chapter on its code cells only: edit
``utils/zero/fsdp.py`` and the ZeRO chapter would still show figures from the old
code. So each chapter listed in ``_toc.yml`` gets a *code fingerprint*: a sha256 over
the relative paths and contents of every repository module it imports, followed
transitively with :mod:`ast` (imports inside functions, relative imports and the
``__init__.py`` of every package on a module's path included), plus
``pyproject.toml`` (the dependency list). When a chapter's fingerprint differs from
the one recorded after the last successful build (or none is recorded), its records
are removed from the jupyter-cache and its doctree from ``_build/.doctrees`` (Sphinx
re-reads, and so myst-nb re-executes, only the pages whose source or doctree
changed), so that chapter alone re-executes.

Which cache records are a chapter's. myst-nb looks a chapter up by a hash of its
code cells (``NotebookClientCache.start_client`` calls
``cache.match_cache_notebook(notebook)``, which is
``NbCacheRecord.record_from_hashkey(create_hashed_notebook(nb)[1])``), and stores a
fresh execution with ``cache_notebook_bundle(CacheBundleIn(nb, stage_record.uri))``
where ``stage_record = cache.add_nb_to_project(str(path))``, whose uri is
``str(Path(path).absolute())``. So a record of a chapter is one whose

* ``hashkey`` is the hash of the chapter as it reads now: the chapter is read with
  myst-nb's own reader (``read_myst_markdown_notebook``) and hashed with jupyter-cache's
  own ``create_hashed_notebook``, the two calls myst-nb makes; this is the record the
  next build would reuse (it also catches a record left by a renamed chapter); or
* ``uri`` is the chapter's source file: every earlier execution of it, whatever its
  cells were then (a reverted cell edit would otherwise revive one of them).

What the fingerprint does NOT see (edit these and run ``rm -rf _build/.jupyter_cache``
by hand, or ``make clean``):

* data files read at run time (JSON, the sbatch script, ``utils/html_manager``'s JS);
* modules imported by a name built at run time (``importlib.import_module(f"...")``,
  pickled functions named in strings); constant names passed to ``import_module`` /
  ``__import__`` and ``"-m", "pkg.mod"`` argument pairs are followed. One run-time
  list is handled explicitly: a chapter that reaches ``utils.launch`` also reaches the
  modules in its fork-server preload list ``_PRELOAD`` (see :data:`STRING_IMPORTS`);
* installed packages' versions beyond what ``pyproject.toml`` says (``pip install -U``
  without editing it), the Python version, the machine (CPU or GPU, how many ranks);
* code outside this repository's packages, and the learner's ``%%writefile`` files
  (their text is in the chapter's cells, which jupyter-cache hashes already).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ".chapter-code.json"
"""In the build folder: {"chapters": {chapter: {"fingerprint", "files"}}}, written
after a successful build."""
PENDING = ".chapter-code.pending.json"
"""In the build folder: the fingerprints the invalidation saw, promoted to
:data:`MANIFEST` by ``--commit``."""
EXTRA_FILES = ("pyproject.toml",)
"""Files in every chapter's fingerprint (dependency changes)."""
STRING_IMPORTS = {"utils.launch": "_PRELOAD"}
"""Module -> name of a module-level list of module names it imports at run time
(``utils.launch`` hands ``_PRELOAD`` to the fork server, which imports them in
every rank). A chapter whose closure holds the module also reaches those modules."""
NOTEBOOK_SUFFIXES = (".md", ".ipynb")
VERSION = 1


# --------------------------------------------------------------------------- toc


def toc_entries(root: Path) -> list[str]:
    """Every file ``_toc.yml`` names, in order: ``root``, then the ``chapters`` of
    each of ``parts`` and/or a top-level ``chapters`` list, with nested ``sections``
    (and ``glob`` entries expanded). Entries are as written, without a suffix."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf8")) or {}
    found: list[str] = []

    def add(name: str) -> None:
        name = str(Path(name).with_suffix("")) if Path(name).suffix else name
        if name not in found:
            found.append(name)

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            if isinstance(node.get("file"), str):
                add(node["file"])
            if isinstance(node.get("glob"), str):
                for path in sorted(root.glob(node["glob"])):
                    if path.suffix in NOTEBOOK_SUFFIXES:
                        add(path.relative_to(root).as_posix())
            for key, value in node.items():  # in the file's order
                if key in ("parts", "chapters", "sections", "subtrees", "entries"):
                    walk(value)

    if isinstance(toc.get("root"), str):
        add(toc["root"])
    walk(toc)
    return found


def source_file(root: Path, entry: str) -> Path | None:
    """The file behind a toc entry (``chapters/02-zero`` -> ``chapters/02-zero.md``)."""
    for suffix in NOTEBOOK_SUFFIXES:
        path = root / f"{entry}{suffix}"
        if path.is_file():
            return path
    path = root / entry
    return path if path.is_file() else None


# --------------------------------------------------------------------- code cells

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*\{code-cell\}")


def _fence_code_cells(text: str) -> list[str]:
    """The code cells of a MyST notebook, from its ```{code-cell} fences (the
    fallback when jupytext is not installed)."""
    cells: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match["fence"]
        closing = re.compile(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$")
        body: list[str] = []
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        if body and body[0].strip() == "---":  # a YAML block of options
            end = next((k for k in range(1, len(body)) if body[k].strip() == "---"), 0)
            body = body[end + 1 :]
        else:
            while body and re.match(r"^:[\w-]+:", body[0]):  # :tags: [...] options
                body = body[1:]
        cells.append("\n".join(body))
    return cells


def code_cells(path: Path) -> list[str]:
    """The source of each code cell of a chapter (.md in MyST or .ipynb)."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text(encoding="utf8"))
        return [
            "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb.get("cells", [])
            if c.get("cell_type") == "code"
        ]
    text = path.read_text(encoding="utf8")
    try:
        import jupytext
    except ImportError:
        return _fence_code_cells(text)
    nb = jupytext.reads(text, fmt="md:myst")
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _python_of_cell(source: str) -> str:
    """A cell as plain Python: a cell magic's first line dropped (``%%writefile``,
    ``%%time``: the body is Python), line magics and ``!shell`` lines as ``pass``."""
    lines = source.splitlines()
    if lines and lines[0].lstrip().startswith("%%"):
        lines = lines[1:]
    out = []
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            out.append(line[: len(line) - len(stripped)] + "pass")
        else:
            out.append(line)
    return "\n".join(out)


_IMPORT_LINE = re.compile(
    r"^\s*(?:from\s+([\w.]+)\s+import\s+([\w, ]+)|import\s+([\w., ]+))"
)


def _parse_cell(source: str) -> ast.AST | None:
    try:
        return ast.parse(_python_of_cell(source))
    except SyntaxError:
        pass
    # Not Python (a %%bash cell, x = !cmd): keep whatever import lines parse alone.
    body = []
    for line in source.splitlines():
        if _IMPORT_LINE.match(line):
            try:
                ast.parse(line.strip())
            except SyntaxError:
                continue
            body.append(line.strip())
    return ast.parse("\n".join(body)) if body else None


# ----------------------------------------------------------------------- imports


def _imported_names(tree: ast.AST, module: str | None, is_package: bool) -> set[str]:
    """Absolute module names that ``tree`` may import, anywhere in it (functions
    too). For ``from a import b`` both ``a`` and ``a.b`` (``b`` may be a module;
    names that are no module are dropped when resolving)."""
    names: set[str] = set()
    package = module if is_package else (module.rpartition(".")[0] if module else "")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if not package and module is None:
                    continue  # a relative import in a chapter cell: nothing to follow
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    continue
                base_parts = parts[: len(parts) - (node.level - 1)]
                if node.module:
                    base_parts.append(node.module)
                base = ".".join(base_parts)
            else:
                base = node.module or ""
            if base:
                names.add(base)
            for alias in node.names:
                if alias.name != "*":
                    names.add(f"{base}.{alias.name}" if base else alias.name)
        elif isinstance(node, ast.Call):
            func = node.func
            fname = getattr(func, "attr", None) or getattr(func, "id", "")
            if fname in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.add(arg.value)
        if isinstance(node, (ast.List, ast.Tuple, ast.Call)):
            items = node.args if isinstance(node, ast.Call) else node.elts
            for a, b in zip(items, items[1:]):  # subprocess argv: "-m", "pkg.mod"
                if (
                    isinstance(a, ast.Constant)
                    and a.value == "-m"
                    and isinstance(b, ast.Constant)
                    and isinstance(b.value, str)
                ):
                    names.add(b.value)
    return {n for n in names if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", n)}


def local_packages(root: Path) -> set[str]:
    """Top-level names importable from the repository root: folders holding Python
    (``labs``, ``utils``, ``bench``, ...) and ``*.py`` files at the root."""
    names = set()
    for path in root.iterdir():
        if path.name.startswith((".", "_")) or path.name in ("build", "node_modules"):
            continue
        if path.is_dir() and path.name.isidentifier():
            if (path / "__init__.py").is_file() or any(path.glob("*.py")):
                names.add(path.name)
        elif path.suffix == ".py" and path.stem.isidentifier():
            names.add(path.stem)
    return names


def resolve(root: Path, name: str, packages: set[str]) -> list[Path]:
    """The repository files that ``import name`` executes: the ``__init__.py`` of
    each package on the path, then the module itself; [] if it is not ours. A
    trailing part that is no module (``from a import some_function``) is dropped."""
    parts = name.split(".")
    if parts[0] not in packages:
        return []
    files: list[Path] = []
    here = root
    for part in parts:
        here = here / part
        if (here / "__init__.py").is_file():
            files.append(here / "__init__.py")
            continue  # a package: go on
        if here.with_suffix(".py").is_file():  # wins over a namespace package
            files.append(here.with_suffix(".py"))
            break  # a module: what follows are its attributes, not modules
        if not here.is_dir():
            break  # not a module at all
        # a namespace package (a folder without __init__.py): go on
    return files


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """(dotted name, is_package) of a repository file."""
    rel = path.relative_to(root).with_suffix("")
    if rel.name == "__init__":
        return ".".join(rel.parent.parts), True
    return ".".join(rel.parts), False


def _string_list(tree: ast.AST, variable: str) -> list[str]:
    """The string constants of a module-level ``variable = [...]`` (or tuple)."""
    for node in getattr(tree, "body", []):
        targets = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if any(isinstance(t, ast.Name) and t.id == variable for t in targets):
            if isinstance(value, (ast.List, ast.Tuple, ast.Set)):
                return [
                    e.value
                    for e in value.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
    return []


DATA_SUFFIXES = (".js", ".json")
"""Files of a package that its code reads at run time (the live explorer's
scripts): in the closure of whatever imports the package."""


def closure(
    root: Path, sources: list[str], packages: set[str] | None = None
) -> set[str]:
    """Relative paths of every repository file that running ``sources`` (code cells)
    may import, transitively (see the module docstring for what it follows)."""
    root = Path(root)
    packages = local_packages(root) if packages is None else packages
    seen: set[Path] = set()
    queue: list[Path] = []

    def reach(names) -> None:
        for name in names:
            for path in resolve(root, name, packages):
                if path not in seen:
                    seen.add(path)
                    queue.append(path)

    for source in sources:
        tree = _parse_cell(source)
        if tree is not None:
            reach(_imported_names(tree, None, False))
    while queue:
        path = queue.pop()
        name, is_package = module_name(root, path)
        try:
            tree = ast.parse(path.read_text(encoding="utf8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # still in the closure (its text is hashed); nothing to follow
        reach(_imported_names(tree, name, is_package))
        if is_package:  # its data files (utils/explorer's JavaScript) count too
            seen.update(f for f in path.parent.iterdir() if f.suffix in DATA_SUFFIXES)
        if name in STRING_IMPORTS:
            reach(_string_list(tree, STRING_IMPORTS[name]))
    return {p.relative_to(root).as_posix() for p in seen}


# ------------------------------------------------------------------ fingerprints


def file_hashes(root: Path, rel_paths) -> dict[str, str]:
    """sha256 of each file (relative path -> hex); a missing file hashes as absent."""
    hashes = {}
    for rel in sorted(set(rel_paths)):
        path = root / rel
        data = path.read_bytes() if path.is_file() else b"\0absent"
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes


def fingerprint(files: dict[str, str]) -> str:
    """One sha256 over the sorted (relative path, content hash) pairs."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel].encode() + b"\n")
    return h.hexdigest()


@dataclass
class Chapter:
    """A toc entry and what its code fingerprint says about it."""

    name: str  # as in _toc.yml: "chapters/02-zero"
    path: Path | None  # its source file
    files: dict[str, str] = field(default_factory=dict)  # closure + extras -> sha256
    fingerprint: str | None = None  # None: not an executable notebook
    previous: dict | None = None  # its entry in the manifest, if any

    @property
    def stale(self) -> bool:
        if self.fingerprint is None:
            return False
        return (
            self.previous is None
            or self.previous.get("fingerprint") != self.fingerprint
        )

    def changes(self) -> list[str]:
        """The files that differ from the manifest's, as words."""
        old = (self.previous or {}).get("files") or {}
        changed = [
            f for f in sorted(self.files) if f in old and old[f] != self.files[f]
        ]
        added = [f for f in sorted(self.files) if f not in old]
        removed = [f for f in sorted(old) if f not in self.files]
        words = changed + [f"now imports {f}" for f in added]
        words += [f"no longer imports {f}" for f in removed]
        return words

    def line(self, dry_run: bool = False) -> str:
        verb = "would re-execute" if dry_run else "re-executing"
        if self.fingerprint is None:
            return f"{self.name}: not an executed notebook, skipped"
        if not self.stale:
            return f"{self.name}: unchanged, cached"
        if self.previous is None:
            return f"{self.name}: no recorded code fingerprint, {verb}"
        words = self.changes() or ["the fingerprint's format"]
        if len(words) > 5:
            words = words[:5] + [f"{len(words) - 5} more"]
        return f"{self.name}: code changed ({', '.join(words)}), {verb}"


def is_notebook(path: Path | None) -> bool:
    """Whether myst-nb executes the file: an .ipynb, or a .md with jupytext or
    kernelspec top-matter (myst-nb's ``is_myst_markdown_notebook`` rule)."""
    if path is None:
        return False
    if path.suffix == ".ipynb":
        return True
    try:
        from myst_nb.core.read import is_myst_markdown_notebook
    except ImportError:
        text = path.read_text(encoding="utf8")
        head = text.split("\n---", 1)[0] if text.startswith("---") else ""
        return "jupytext:" in head or "kernelspec:" in head
    return is_myst_markdown_notebook(path.read_text(encoding="utf8"))


def chapters(root: Path, manifest: dict | None = None) -> list[Chapter]:
    """Every toc entry, fingerprinted, next to its manifest entry."""
    root = Path(root)
    previous = (manifest or {}).get("chapters", {})
    packages = local_packages(root)
    found = []
    for name in toc_entries(root):
        path = source_file(root, name)
        chapter = Chapter(name, path, previous=previous.get(name))
        if is_notebook(path):
            rel = closure(root, code_cells(path), packages)
            chapter.files = file_hashes(root, rel | set(EXTRA_FILES))
            chapter.fingerprint = fingerprint(chapter.files)
        found.append(chapter)
    return found


# --------------------------------------------------------------- jupyter-cache


def cache_path(root: Path, build: Path) -> Path:
    """Where myst-nb keeps the cache: ``execute.cache`` in _config.yml, else
    ``<build>/.jupyter_cache`` (myst-nb: ``Path(app.outdir).parent / .jupyter_cache``
    with outdir ``<build>/html``)."""
    import yaml

    config = root / "_config.yml"
    if config.is_file():
        book = yaml.safe_load(config.read_text(encoding="utf8")) or {}
        execute = book.get("execute")
        if isinstance(execute, dict) and execute.get("cache"):
            return (root / execute["cache"]).resolve()
    return (build / ".jupyter_cache").resolve()


def _myst_config(root: Path):
    """(MdParserConfig, kernel aliases) as the book build sets them, best effort."""
    from myst_parser.config.main import MdParserConfig

    if not (root / "_config.yml").is_file():
        return MdParserConfig(), {}
    try:
        from jupyter_book.config import get_final_config

        sphinx_config, _ = get_final_config(
            user_yaml=root / "_config.yml",
            cli_config={"latex_individualpages": False},  # as `jupyter-book build`
            sourcedir=root,
            validate=False,
        )
        fields = MdParserConfig.__dataclass_fields__
        kwargs = {
            k[len("myst_") :]: v
            for k, v in sphinx_config.items()
            if k.startswith("myst_") and k[len("myst_") :] in fields
        }
        if "enable_extensions" in kwargs:
            kwargs["enable_extensions"] = set(kwargs["enable_extensions"])
        aliases = sphinx_config.get("nb_kernel_rgx_aliases") or {}
        return MdParserConfig(**kwargs), aliases
    except Exception as error:  # the hash is of code cells: defaults read them too
        print(f"book_cache: myst defaults ({error!r})", file=sys.stderr)
        return MdParserConfig(), {}


def notebook_hash(cache, path: Path, md_config=None, aliases=None) -> str | None:
    """The hashkey myst-nb would look the chapter up by: the notebook as myst-nb
    reads it (``create_nb_reader`` -> ``read_myst_markdown_notebook``, kernel name
    aliases applied) hashed by ``cache.create_hashed_notebook``."""
    import nbformat

    try:
        text = path.read_text(encoding="utf8")
        if path.suffix == ".ipynb":
            nb = nbformat.reads(text, as_version=4)
        else:
            from myst_nb.core.read import read_myst_markdown_notebook

            nb = read_myst_markdown_notebook(
                text, config=md_config, add_source_map=True, path=str(path)
            )
        kernel = nb.metadata.get("kernelspec", {}).get("name")
        for rgx, alias in (aliases or {}).items():
            if kernel is not None and re.fullmatch(rgx, kernel):
                nb.metadata["kernelspec"]["name"] = alias
                break
        return cache.create_hashed_notebook(nb)[1]
    except Exception as error:  # an unreadable chapter: match on its uri only
        print(f"book_cache: cannot hash {path}: {error}", file=sys.stderr)
        return None


def _same_file(uri: str, path: Path) -> bool:
    try:
        return os.path.realpath(uri) == os.path.realpath(path)
    except (OSError, ValueError):
        return False


def open_cache(path: Path):
    """The jupyter-cache at ``path``, or None where none was ever created (opening
    one creates its database, which a dry run must not)."""
    if not (Path(path) / "global.db").is_file():
        return None
    from jupyter_cache import get_cache

    return get_cache(str(path))


def records_of(cache, chapter: Chapter, md_config=None, aliases=None) -> list:
    """The chapter's cache records: the one its current cells hash to, and every
    one stored from its source file (see the module docstring)."""
    hashkey = notebook_hash(cache, chapter.path, md_config, aliases)
    return [
        r
        for r in cache.list_cache_records()
        if r.hashkey == hashkey or _same_file(r.uri, chapter.path)
    ]


def remove_records(cache, records) -> None:
    """Remove records and their executed notebooks (``remove_cache``), or only the
    record where its folder is already gone."""
    from jupyter_cache.cache.db import NbCacheRecord

    for record in records:
        try:
            cache.remove_cache(record.pk)
        except KeyError:
            NbCacheRecord.remove_records([record.pk], cache.db)


def doctree(build: Path, chapter: Chapter) -> Path:
    """Sphinx's pickled doctree of the chapter (jupyter-book's doctreedir is
    ``Path(outputdir).parent / ".doctrees"``, outputdir ``<build>/html``)."""
    return build / ".doctrees" / f"{chapter.name}.doctree"


def invalidate(
    root: Path, build: Path, found: list[Chapter], dry_run: bool = False
) -> dict[str, tuple[list[int], bool]]:
    """For each stale chapter remove its records from the jupyter-cache, and its
    doctree: Sphinx re-reads only the sources that changed (or whose doctree is
    missing, ``BuildEnvironment.get_outdated_files``), and myst-nb looks at the cache
    only when Sphinx reads the chapter, so a chapter whose .md is unchanged would
    otherwise keep its old page. {chapter: (removed record pks, doctree removed)}."""
    stale = [c for c in found if c.stale]
    if not stale:
        return {}
    cache = open_cache(cache_path(root, build))
    md_config, aliases = _myst_config(root) if cache is not None else (None, {})
    removed = {}
    for chapter in stale:
        records = records_of(cache, chapter, md_config, aliases) if cache else []
        tree = doctree(build, chapter)
        had_tree = tree.is_file()
        if not dry_run:
            if cache is not None:
                remove_records(cache, records)
            tree.unlink(missing_ok=True)
        removed[chapter.name] = ([r.pk for r in records], had_tree)
    return removed


# ---------------------------------------------------------------------- manifest


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    return data


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _entries(found: list[Chapter]) -> dict:
    return {
        c.name: {"fingerprint": c.fingerprint, "files": c.files}
        for c in found
        if c.fingerprint is not None
    }


def commit(root: Path, build: Path) -> list[str]:
    """After a successful build: record the fingerprints the invalidation saw, for
    each chapter whose code has not changed since (an edit during the build keeps
    the old entry, so that chapter re-executes next time). Lines to print."""
    pending = read_json(build / PENDING)
    if pending is None:
        return [
            f"book_cache: no {PENDING} in {build} (no invalidation ran): not recorded"
        ]
    manifest = read_json(build / MANIFEST) or {"version": VERSION, "chapters": {}}
    now = {c.name: c for c in chapters(root, manifest)}
    out: dict = {}
    lines = []
    for name, entry in pending["chapters"].items():
        current = now.get(name)
        if current is None:
            continue  # no longer in the book
        if current.fingerprint == entry["fingerprint"]:
            out[name] = entry
        else:
            lines.append(f"{name}: code changed during the build, not recorded")
            if name in manifest["chapters"]:
                out[name] = manifest["chapters"][name]
    write_json(build / MANIFEST, {"version": VERSION, "chapters": out})
    (build / PENDING).unlink(missing_ok=True)
    lines.append(
        f"book_cache: recorded {len(out)} chapters' code in {build / MANIFEST}"
    )
    return lines


def run(root: Path, build: Path, dry_run: bool = False) -> list[str]:
    """Before a build: fingerprint, invalidate what is stale, note what was seen.
    The lines to print."""
    manifest = read_json(build / MANIFEST)
    found = chapters(root, manifest)
    removed = invalidate(root, build, found, dry_run=dry_run)
    lines = []
    for chapter in found:
        lines.append(chapter.line(dry_run))
        pks, had_tree = removed.get(chapter.name, ([], False))
        what = []
        if pks:
            plural = "s" if len(pks) > 1 else ""
            what.append(f"cache record{plural} {', '.join(map(str, pks))}")
        if had_tree:
            what.append(f"{doctree(build, chapter).relative_to(build)}")
        if what:
            verb = "would remove" if dry_run else "removed"
            lines.append(f"  {verb} {' and '.join(what)}")
    cache_dir = cache_path(root, build)
    if open_cache(cache_dir) is None:
        lines.append(f"book_cache: no cache at {cache_dir} yet: every chapter executes")
    if not dry_run:
        write_json(build / PENDING, {"version": VERSION, "chapters": _entries(found)})
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.book_cache", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--build", default="_build", help="the book's build folder")
    parser.add_argument("--root", default=str(ROOT), help="the book's root (_toc.yml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dry-run", action="store_true", help="change nothing")
    group.add_argument(
        "--commit", action="store_true", help="after a successful build: record"
    )
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    build = (root / args.build).resolve()
    lines = commit(root, build) if args.commit else run(root, build, args.dry_run)
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
