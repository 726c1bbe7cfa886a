"""The book's cold build and cached rebuild times.

Run with ``python -m bench book`` (or ``make bench`` for every benchmark). The build
runs in a temporary copy of the repository, so the working tree's ``_build`` (and its
execution cache) is neither used nor touched. The cold build executes every chapter;
the rebuild with nothing changed reuses Jupyter Book's execution cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", "_build", ".git", "node_modules", ".pytest_cache", ".ruff_cache"}


def _build(book: Path) -> float:
    jb = Path(sys.executable).with_name("jupyter-book")
    start = time.perf_counter()
    subprocess.run(
        [str(jb), "build", str(book), "-W", "-n", "--keep-going", "-q"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="book-bench-") as tmp:
        book = Path(tmp) / "book"
        shutil.copytree(
            ROOT, book, ignore=lambda d, names: [n for n in names if n in SKIP]
        )
        widgets_js = ROOT / "_build" / "widgets-js"
        if (
            widgets_js.exists()
        ):  # the bundled widget manager, built by `make widgets-js`
            shutil.copytree(widgets_js, book / "_build" / "widgets-js")
        cold = _build(book)
        warm = _build(book)
    print("book build (jupyter-book build -W -n, in a temporary copy)")
    print(f"  cold build, executing every chapter: {cold:7.1f} s")
    print(f"  rebuild with nothing changed:        {warm:7.1f} s")


if __name__ == "__main__":
    main()
