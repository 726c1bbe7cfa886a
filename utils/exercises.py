"""Automatic checks for the chapters' exercises, one module per chapter.

A learner's function that must run inside ranks has to be importable (spawned
ranks find functions by module path), so exercises that run in ranks ask the learner
to write it to a file outside the book with ``%%writefile {exercise_file(...)}``;
each rank then loads that file by path with :func:`load_function`. A check prints
one line when the answer is right and raises ``AssertionError`` saying what was
expected when it is not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
import tempfile
from pathlib import Path

EXERCISE_DIR = Path(tempfile.gettempdir()) / f"parallelization-exercises-{os.getuid()}"
"""Where the chapters' ``%%writefile`` cells put learner code (never the book): a
folder of this user's own, created 0700. The system temp folder is shared by every
local user, so a folder anyone could create first (or swap files in) would let
another user's code run as the learner when a check loads it."""


def _private(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is ours, not a symlink, and no one else can write
    it (a file or folder another local user planted or can change)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{what} {path} is a symbolic link; refusing to use it")
    if info.st_uid != os.getuid():
        raise PermissionError(
            f"{what} {path} belongs to uid {info.st_uid}, not you (uid "
            f"{os.getuid()}): another user created it; remove it or set TMPDIR"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{what} {path} is writable by others (mode {oct(info.st_mode & 0o777)});"
            " refusing to run code from it"
        )


def _private_folder(path: Path, what: str) -> Path:
    """``path``, made 0700 if it is not there, refused unless it is ours alone."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _private(path, what)
    return path


def exercise_file(name: str) -> Path:
    """A path for learner code in this user's private exercise folder."""
    if os.sep in name or name in ("", ".", ".."):
        raise ValueError(f"exercise file name must be a plain name, got {name!r}")
    return _private_folder(EXERCISE_DIR, "exercise folder") / name


SOLUTION_DIR = EXERCISE_DIR / "solutions"
"""Where the chapters' own solutions write their files: beside the learner's, never
over them, so running a whole chapter (``make book``, Run all) leaves every answer
as the learner wrote it and ``make check`` grades only what the learner wrote."""


def solution_file(name: str) -> Path:
    """The path a chapter's solution writes ``name`` to (not the learner's file)."""
    exercise_file(name)  # the name and the private parent folder, checked
    return _private_folder(SOLUTION_DIR, "solutions folder") / name


def load_function(path, name: str):
    """The function ``name`` defined in the Python file ``path``.

    The module name depends on the file's content, so an edited file is loaded
    afresh rather than taken from ``sys.modules``.
    """
    path = Path(path)
    if not path.is_file():
        raise AssertionError(f"no file {path}: run the %%writefile cell first")
    _private(path.parent, "exercise folder")
    _private(path, "exercise file")
    tag = hashlib.sha1(f"{path}\n{path.read_text()}".encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"_exercise_{tag}", path)
    if spec is None or spec.loader is None:
        raise AssertionError(f"cannot load {path}: is it a .py file?")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise AssertionError(f"{path} defines no function {name!r}")
    return getattr(module, name)


def run_in_ranks(rank_fn, path, name: str, *, world_size: int, timeout: float = 60.0):
    """Load the learner's ``name`` from ``path`` here first (a missing file or a
    syntax error shows in the notebook, not inside a rank), then run
    ``rank_fn(str(path), name)`` in ``world_size`` gloo ranks; their results."""
    from utils.launch import launch

    load_function(path, name)
    return launch(
        rank_fn, str(path), name, world_size=world_size, backend="gloo", timeout=timeout
    )
