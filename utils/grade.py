"""Grade a learner's exercises for one chapter, and build the book without answers.

The workshop tools of the instructor guide (``workshop/instructor-guide.md``)::

    make check CHAPTER=zero                  # python -m utils.grade zero
    python -m utils.grade zero --answers DIR # the answer files in DIR
    python -m utils.grade zero --solutions   # the chapter's own solutions (CI)
    make book-workshop                       # the book without solutions

**Where answers live.** Exercises that run in ranks tell the learner to write a
file with ``%%writefile {exercise_file("zero1_step.py")}`` (``utils.exercises``):
that file, in ``EXERCISE_DIR``, is the answer. Every other exercise is answered in a
notebook cell that ends with the check the exercise shows
(``check_smallest_world_size(smallest_world_size)``); to grade it, that cell goes in
a file of the same folder named ``<chapter>_<number>.py`` (``zero_2_1.py``: with
``p = exercise_file("zero_2_1.py")``, ``%%writefile {p}`` atop the cell, then
``%run -i {p}``).
``--answers DIR`` reads the files from ``DIR`` instead. The chapters' own solutions
write ``solution_file(name)`` (``EXERCISE_DIR/solutions``), so running a whole
chapter never overwrites an answer, and a chapter whose solution writes the
learner's file is refused (:func:`exercises`).

**What an exercise is** is read from its chapter (:func:`exercises`): each
``{exercise-start}`` block, its ``exercise_file`` name if it has one, and the
``check_*`` functions its ``{solution-start}`` block calls. ``--solutions`` writes
each solution out as the learner's file would be (the ``%%writefile`` cell's body,
or the solution's code cells) and grades those.

**How it is graded**: pytest runs one test per exercise (:func:`grade_exercise`),
each check as a learner runs it in the chapter, its ranks on gloo. The chapter's
import cells make the namespace, plus the lab runs a check reads (:data:`CONTEXT`);
an answer file runs up to its last call of a check, with each check replaced by a
recorder, and then each recorded call runs the real check. A missing file fails as
``not attempted: <path>``. Exit status: 0 when every exercise passes, 1 when one
fails, 2 for bad usage, before any process starts.

The answers-off book: sphinx-exercise's own ``hide_solutions = True`` crashes on
gated solutions, which every chapter uses ("departing unknown node type:
solution_end_node"; sphinx-exercise 1.2.1, issue executablebooks/sphinx-exercise#89),
so this module is also a Sphinx extension (:func:`setup`) that removes every
solution after sphinx-exercise has merged the gated ones.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONTEXT = {
    "data_parallel": (
        "cfg = Config(sizes=(128, 512, 512, 128), batch_size=64, steps=3, "
        'impl="bucketed")',
        'ddp = run(replace(cfg, world_size=4, impl="ddp", accum_steps=2, '
        "track_memory=False))",
    ),
    "model_parallel": (
        "base = replace(TINY, n_layers=4, return_params=True)",
        # The chapter's runs that exercise 4.3 reads (tensor mode), at 2 ranks only.
        'runs = run_many([replace(base, world_size=2, mode="tensor")])',
    ),
    "combined": (
        "base = replace(TINY, return_params=True)",
        # The chapter's ZeRO-1 runs that exercise 7.3 reads: its 2x2x2 one.
        "zero1_runs = [(base, run_many([base], timeout=300)[0])]",
    ),
}
"""Statements that make the lab runs a chapter's checks read (``ddp[0]`` in 1.2 and
1.3, ``runs`` in 4.3, ``zero1_runs`` in 7.3), in the chapter's own words where they
assign ``cfg``, ``base`` or ``ddp`` (``tests/test_grade.py`` finds them in the
chapter). They run in the chapter's namespace, once per grading, only for an answer
that names one of them."""


@dataclass(frozen=True)
class Exercise:
    """One exercise, as its chapter states it."""

    chapter: str
    number: str  # "2.2"
    title: str
    answer: str  # the answer file's name in the answers folder
    path_var: str | None  # file exercises: the chapter's variable for that path
    solution_var: str | None  # ... and its solution's, for solution_file's path
    checks: tuple[str, ...]  # the check functions the solution calls, in order
    driver: str | None  # file exercises: the solution's cells that call the check
    solution: str  # the answer file the chapter's solution amounts to


# ------------------------------------------------------------- the chapters
_EXERCISE = re.compile(
    r"^````\{exercise-start\} (?P<number>[\d.]+): (?P<title>[^\n]*)\n"
    r":label: (?P<label>\S+)\n(?P<body>.*?)^````\{exercise-end\}",
    re.M | re.S,
)
_SOLUTION = re.compile(
    r"^````\{solution-start\} (?P<label>\S+)\n(?P<body>.*?)^````\{solution-end\}",
    re.M | re.S,
)
_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_OPTION = re.compile(r"^:[\w-]+:.*$")
_EXERCISE_FILE = re.compile(r"(\w+) = exercise_file\([\"']([^\"']+)[\"']\)")
_SOLUTION_FILE = re.compile(
    r"(\w+) = solution_file\([\"']([^\"']+)[\"']\)[ \t]*(#[^\n]*)?", re.S
)
_WRITEFILE = re.compile(r"%%writefile \{(\w+)\}")
_CHECK = re.compile(r"\b(check_\w+)\(")


def chapters() -> dict[str, Path]:
    """Each chapter's name (DESIGN.md: its slug with "_") -> its file."""
    out = {}
    for path in sorted((ROOT / "chapters").glob("[0-9][0-9]-*.md")):
        out[path.stem[3:].replace("-", "_")] = path
    return out


def graded_chapters() -> list[str]:
    """The chapters that have exercises, in book order."""
    return [n for n, p in chapters().items() if "{exercise-start}" in p.read_text()]


def _cells(text: str) -> list[str]:
    """The code cells of a stretch of MyST Markdown, option lines dropped."""
    out = []
    for match in _CELL.finditer(text):
        lines = match.group("body").splitlines()
        while lines and _OPTION.match(lines[0]):
            lines.pop(0)
        out.append("\n".join(lines) + "\n")
    return out


def exercises(chapter: str) -> list[Exercise]:
    """The chapter's exercises that have a check, in its order."""
    text = chapters()[chapter].read_text()
    solutions = {m.group("label"): m.group("body") for m in _SOLUTION.finditer(text)}
    out = []
    for match in _EXERCISE.finditer(text):
        number, label = match.group("number"), match.group("label")
        if label not in solutions:
            raise ValueError(f"{chapter} {number}: no {{solution-start}} {label}")
        files = _EXERCISE_FILE.findall(" ".join(_cells(match.group("body"))))
        written, driver, own = {}, [], {}
        for cell in _cells(solutions[label]):
            if own_file := _SOLUTION_FILE.fullmatch(cell.strip()):
                own[own_file.group(1)] = own_file.group(2)
                continue
            head, _, rest = cell.partition("\n")
            target = _WRITEFILE.fullmatch(head.strip())
            if target:
                written[target.group(1)] = rest
            else:
                driver.append(cell)
        checks = tuple(dict.fromkeys(_CHECK.findall("".join(driver))))
        if not checks:
            continue  # discussed, not checked
        var, name = files[0] if files else (None, None)
        if var and var in written:
            raise ValueError(
                f"{chapter} {number}: the solution writes the learner's {name} "
                f"(%%writefile {{{var}}}); write solution_file({name!r}) instead"
            )
        solution_var = next((v for v, n in own.items() if n == name), None)
        if var and solution_var not in written:
            raise ValueError(
                f"{chapter} {number}: no solution_file({name!r}) cell and "
                "%%writefile of it in the solution"
            )
        code = "\n".join(driver)
        out.append(
            Exercise(
                chapter=chapter,
                number=number,
                title=match.group("title"),
                answer=name or f"{chapter}_{number.replace('.', '_')}.py",
                path_var=var,
                solution_var=solution_var,
                checks=checks,
                driver=code if var else None,
                solution=written[solution_var] if var else code,
            )
        )
    return out


def import_cells(chapter: str) -> list[str]:
    """The chapter's import statements, each cell's (outside the exercises and
    solutions): the names its answer cells can use."""
    text = chapters()[chapter].read_text()
    for block in (_EXERCISE, _SOLUTION):
        text = block.sub("", text)
    out = []
    for cell in _cells(text):
        try:
            body = ast.parse(cell).body
        except SyntaxError:
            continue  # a cell magic (%%writefile, %%bash): imports nothing here
        imports = [s for s in body if isinstance(s, ast.Import | ast.ImportFrom)]
        if imports:
            out.append(ast.unparse(ast.Module(body=imports, type_ignores=[])))
    return out


# ----------------------------------------------------------------- grading
_CONTEXTS: dict[str, dict] = {}


def _namespace(chapter: str, needs: set[str]) -> dict:
    """A fresh namespace as the chapter's cells see it: its imports, and the lab
    runs of :data:`CONTEXT` if ``needs`` names any of them (made once)."""
    ns: dict = {"__name__": f"__grade_{chapter}__"}
    for cell in import_cells(chapter):
        exec(compile(cell, f"<{chapter} imports>", "exec"), ns)
    statements = CONTEXT.get(chapter, ())
    defined = {t.id for s in statements for t in ast.parse(s).body[0].targets}
    if needs & defined:
        if chapter not in _CONTEXTS:
            made = dict(ns)
            for statement in statements:
                exec(compile(statement, f"<{chapter} lab runs>", "exec"), made)
            _CONTEXTS[chapter] = {name: made[name] for name in defined}
        ns.update(_CONTEXTS[chapter])
    return ns


def _calls_a_check(node: ast.AST, checks) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in checks
        for n in ast.walk(node)
    )


def _script(code: str, where: str, checks) -> ast.Module:
    """The answer as Python up to its last statement that calls a check (what
    follows reads the notebook's other state). A first-line cell magic is
    dropped, so a cell saved with ``%%writefile`` reads as the cell."""
    if code.lstrip().startswith("%%"):
        code = code.lstrip().partition("\n")[2]
    try:
        tree = ast.parse(code, where)
    except SyntaxError as err:
        raise AssertionError(f"{where} line {err.lineno}: {err.msg}") from None
    last = [i for i, s in enumerate(tree.body) if _calls_a_check(s, checks)]
    if not last:
        shown = ", ".join(f"{c}(...)" for c in checks)
        raise AssertionError(f"{where} calls no check: end it with {shown}")
    tree.body = tree.body[: last[-1] + 1]
    return tree


@contextmanager
def _recording(module, checks, ns):
    """Each check, in ``ns`` and in its module (an answer may import it), replaced
    by a recorder; yields the calls [(name, args, kwargs)] and the real checks."""
    real = {name: getattr(module, name) for name in checks}
    calls: list = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))

        return record

    for name in checks:
        ns[name] = recorder(name)
        setattr(module, name, ns[name])
    try:
        yield calls, real
    finally:
        for name, fn in real.items():
            setattr(module, name, fn)


def grade(exercise: Exercise, answers: Path, run_checks: bool = True) -> list:
    """Run ``exercise``'s checks on the learner's file in ``answers``: returns the
    calls [(check, args, kwargs)] when every check passes, raises ``AssertionError``
    (or the answer's own error). ``run_checks=False``: only record the calls."""
    import importlib

    from utils.exercises import _private

    path = Path(answers) / exercise.answer
    if not path.is_file():
        raise AssertionError(f"not attempted: {path}")
    _private(path.parent, "answers folder")
    _private(path, "answer file")
    code = exercise.driver if exercise.path_var else path.read_text()
    where = (
        f"the chapter's check cell of {exercise.number}" if exercise.driver else path
    )
    tree = _script(code, str(where), exercise.checks)
    needs = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    ns = _namespace(exercise.chapter, needs)
    if exercise.path_var:
        ns[exercise.path_var] = ns[exercise.solution_var] = str(path)
    module = importlib.import_module(f"utils.{exercise.chapter}.exercises")
    with _recording(module, exercise.checks, ns) as (calls, real):
        exec(compile(tree, str(where), "exec"), ns)
    called = {name for name, _, _ in calls}
    for name in exercise.checks:
        if name not in called:
            raise AssertionError(f"{where} never reached {name}(...)")
    for name, args, kwargs in calls if run_checks else ():
        real[name](*args, **kwargs)
    return calls


def grade_exercise(attempt) -> None:
    """The one test pytest runs per exercise (``attempt``: (Exercise, folder))."""
    grade(*attempt)


class _Results:
    """A pytest plugin: one test per exercise; records each one's outcome."""

    def __init__(self, attempts):
        self.attempts = attempts
        self.outcomes: dict[str, tuple[str, str]] = {}

    def pytest_generate_tests(self, metafunc):
        if "attempt" in metafunc.fixturenames:
            ids = [e.number for e, _ in self.attempts]
            metafunc.parametrize("attempt", self.attempts, ids=ids)

    def pytest_runtest_makereport(self, item, call):
        if call.excinfo is not None and call.when in ("setup", "call"):
            why = _first_line(call.excinfo.value)
            self.outcomes[item.callspec.id] = ("FAIL", why)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            number = report.nodeid.rsplit("[", 1)[1].rstrip("]")
            lines = [line for line in report.capstdout.splitlines() if line.strip()]
            said = [line for line in lines if line.lower().startswith("correct")]
            self.outcomes[number] = ("PASS", (said or lines or [""])[-1].strip())


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    first = lines[0].strip() if lines else ""
    if isinstance(error, AssertionError):
        return first or "AssertionError"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def run(chapter: str, answers: Path, verbose: bool = False) -> tuple[int, list[str]]:
    """Grade every exercise of ``chapter`` from the files in ``answers`` under
    pytest: (exit status, the lines of the score)."""
    import pytest

    found = exercises(chapter)
    plugin = _Results([(e, Path(answers)) for e in found])
    args = [
        __file__,
        "-p",
        "no:cacheprovider",
        "-o",
        "python_functions=grade_exercise",
        "--rootdir",
        str(ROOT),
        "--no-header",
        "-rN",
    ]
    args += ["-v", "--tb=short"] if verbose else ["-q", "--tb=no"]
    pytest.main(args, plugins=[plugin])
    width = max(len(e.title) for e in found)
    lines, passed = [], 0
    for e in found:
        status, why = plugin.outcomes.get(e.number, ("FAIL", "not run"))
        passed += status == "PASS"
        lines.append(f"  {status}  {e.number:<4} {e.title:<{width}}  {why}".rstrip())
    lines.append(f"{chapter}: {passed}/{len(found)} exercises pass")
    return (0 if passed == len(found) else 1), lines


def write_solutions(chapter: str, folder: Path) -> list[Path]:
    """Each exercise's solution written as the learner's answer file would be."""
    paths = []
    for e in exercises(chapter):
        path = Path(folder) / e.answer
        path.write_text(e.solution)
        paths.append(path)
    return paths


# ------------------------------------------------------ the answers-off book
def _remove_solutions(app, doctree) -> None:
    """Every solution of the page, gated or not, out of its doctree, and out of
    sphinx-exercise's registry (so nothing links to it)."""
    from sphinx_exercise.nodes import solution_node

    registry = getattr(app.env, "sphinx_exercise_registry", {})
    for node in list(doctree.findall(solution_node)):
        registry.pop(node.get("label"), None)
        node.parent.remove(node)


def setup(app):
    """The Sphinx extension of ``make book-workshop``: the book without solutions.
    Its transform runs after sphinx-exercise's merge of ``solution-start`` ...
    ``solution-end`` into one solution node (``MergeGatedSolutions``, priority 10)
    and before the ``doctree-read`` handlers that register its label."""
    from sphinx.transforms import SphinxTransform

    app.setup_extension("sphinx_exercise")

    class RemoveSolutions(SphinxTransform):
        default_priority = 20

        def apply(self):
            _remove_solutions(self.app, self.document)

    app.add_transform(RemoveSolutions)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def build_workshop_book(build: Path, root: Path = ROOT) -> int:
    """``jupyter-book build . -W -n --keep-going`` with this extension added, into
    ``<build>/html`` (doctrees and execution cache beside it, apart from the
    book's). Sphinx's exit status."""
    from jupyter_book.config import get_final_config
    from jupyter_book.sphinx import build_sphinx

    build = Path(build).resolve()
    overrides = {
        "external_toc_path": (root / "_toc.yml").as_posix(),
        "latex_individualpages": False,  # what `jupyter-book build` passes
        "nitpicky": True,  # -n
    }
    config, _ = get_final_config(
        user_yaml=root / "_config.yml", cli_config=dict(overrides), sourcedir=root
    )  # a copy: it pops latex_individualpages
    overrides["extensions"] = [*config["extensions"], "utils.grade"]
    # The page's sources hold the solutions too: no source copy, no .ipynb download,
    # no Binder or Colab button (they open the chapter's notebook, solutions included).
    theme = dict(config.get("html_theme_options", {}))
    theme.update(launch_buttons={}, use_download_button=False)
    overrides.update(html_theme_options=theme, html_copy_source=False)
    result = build_sphinx(
        root,
        build / "html",
        noconfig=True,
        path_config=root / "_config.yml",
        confoverrides=overrides,
        warningiserror=True,
        keep_going=True,
    )
    return result if isinstance(result, int) else 1


# --------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.grade", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("chapter", nargs="?", metavar="CHAPTER", help="e.g. zero")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--answers", metavar="DIR", help="the folder of answer files")
    where.add_argument(
        "--solutions", action="store_true", help="grade the chapter's solutions"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="pytest's output")
    parser.add_argument(
        "--workshop-book", metavar="BUILD", help="build the book without solutions"
    )
    args = parser.parse_args(argv)
    if args.workshop_book:
        if args.chapter:
            parser.error("--workshop-book takes no CHAPTER")
        return build_workshop_book(Path(args.workshop_book))
    names = graded_chapters()
    if args.chapter not in names:
        given = f"unknown chapter {args.chapter!r}" if args.chapter else "no CHAPTER"
        parser.error(f"{given}; chapters with exercises: {', '.join(names)}")
    if args.answers and not Path(args.answers).is_dir():
        parser.error(f"--answers {args.answers}: no such folder")
    if args.solutions:
        folder = Path(tempfile.mkdtemp(prefix="grade-solutions-"))  # 0700
        try:
            write_solutions(args.chapter, folder)
            status, lines = run(args.chapter, folder, args.verbose)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        from utils.exercises import EXERCISE_DIR

        answers = Path(args.answers) if args.answers else EXERCISE_DIR
        status, lines = run(args.chapter, answers, args.verbose)
    print("\n".join(lines), flush=True)
    return status


if __name__ == "__main__":
    # Grade with this module imported by its name (pytest collects it as such).
    from utils import grade

    sys.exit(grade.main())
