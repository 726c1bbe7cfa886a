# The two commands a fresh machine needs: `make book` and `make test`.
# Both create .venv and install what they need; a second run reuses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
JB := $(VENV)/bin/jupyter-book
WIDGETS_JS := _build/widgets-js/STAMP

.PHONY: venv book test bench doctor lint format clean widgets-js check check-solutions \
	book-workshop

venv: $(STAMP)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

# The ipywidgets HTML manager, bundled from the npm registry so the built book
# renders widgets offline (no CDN); see utils/html_manager/README.md.
widgets-js: $(WIDGETS_JS)
$(WIDGETS_JS): $(wildcard utils/html_manager/*.json utils/html_manager/*.sh utils/html_manager/*.js)
	bash utils/html_manager/build.sh

# Execute every chapter (labs on CPU/gloo unless enough GPUs) and write
# _build/html. Jupyter Book's execution cache makes an unchanged rebuild fast. The
# cache keys on the chapters' cells only, so utils/book_cache.py fingerprints the
# code each chapter imports (labs/, utils/, followed transitively) and drops only
# those chapters' cache records and doctrees: every figure comes from the current
# code, and a change to one chapter's package re-executes that chapter alone.
BOOK_CACHE = $(PY) -m utils.book_cache --build _build
book: $(STAMP) $(WIDGETS_JS)
	@$(BOOK_CACHE)
	$(JB) build . -W -n --keep-going
	@$(BOOK_CACHE) --commit

test: $(STAMP)
	$(PY) -m pytest

# Workshops (workshop/instructor-guide.md). `make check CHAPTER=zero` grades the
# learner's answer files for one chapter (utils/grade.py: pytest, ranks on gloo),
# from the folder the chapters' %%writefile cells use, or ANSWERS=<folder>; it
# prints each exercise's verdict and the score, and fails unless all pass.
# `make check-solutions` grades every chapter's own solutions (CI).
check: $(STAMP)
	$(PY) -m utils.grade $(CHAPTER) $(if $(ANSWERS),--answers "$(ANSWERS)")

check-solutions: $(STAMP)
	@set -e; chapters=$$($(PY) -c "from utils.grade import graded_chapters as g; print(*g())"); \
	test -n "$$chapters" || { echo "check-solutions: no chapter has exercises" >&2; exit 1; }; \
	for chapter in $$chapters; do $(PY) -m utils.grade $$chapter --solutions; done

# The book without solutions, for workshops: _build/workshop/html, with its own
# execution cache and doctrees beside it (the book's _build/html is untouched).
# sphinx-exercise's hide_solutions crashes on gated solutions, so utils/grade.py,
# loaded as an extension, removes them; no source or .ipynb download either.
WORKSHOP_BUILD := _build/workshop
book-workshop: $(STAMP) $(WIDGETS_JS)
	@$(PY) -m utils.book_cache --build $(WORKSHOP_BUILD)
	$(PY) -m utils.grade --workshop-book $(WORKSHOP_BUILD)
	@$(PY) -m utils.book_cache --build $(WORKSHOP_BUILD) --commit

bench: $(STAMP)
	$(PY) -m bench

doctor: $(STAMP)
	$(PY) -m utils.doctor

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf _build .pytest_cache
