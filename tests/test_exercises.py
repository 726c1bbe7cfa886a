"""utils.exercises: learner code lives in a private folder, and only the learner's
own files are ever loaded (another local user cannot swap in code to run)."""

from __future__ import annotations

import os

import pytest

from utils import exercises


@pytest.fixture
def folder(tmp_path, monkeypatch):
    path = tmp_path / "exercises"
    monkeypatch.setattr(exercises, "EXERCISE_DIR", path)
    return path


def test_the_folder_is_created_private_and_the_file_loads(folder):
    path = exercises.exercise_file("f.py")
    assert oct(os.stat(folder).st_mode & 0o777) == "0o700"
    path.write_text("def f():\n    return 42\n")
    assert exercises.load_function(path, "f")() == 42


def test_the_default_folder_is_per_user():
    assert str(os.getuid()) in exercises.EXERCISE_DIR.name


def test_a_folder_another_user_created_first_is_refused(folder):
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    os.chown(folder, 12345, 12345)  # the tests run as root in CI
    with pytest.raises(PermissionError, match="belongs to uid 12345"):
        exercises.exercise_file("f.py")


def test_a_world_writable_folder_is_refused(folder):
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        exercises.exercise_file("f.py")


def test_a_symlinked_folder_is_refused(folder, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="symbolic link"):
        exercises.exercise_file("f.py")


def test_a_file_someone_else_swapped_in_is_not_run(folder):
    path = exercises.exercise_file("f.py")
    path.write_text("raise SystemExit('this must never run')\n")
    os.chown(path, 12345, 12345)
    with pytest.raises(PermissionError, match="belongs to uid 12345"):
        exercises.load_function(path, "f")


def test_names_cannot_leave_the_folder(folder):
    with pytest.raises(ValueError, match="plain name"):
        exercises.exercise_file("../../etc/x.py")
