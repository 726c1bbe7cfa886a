# The two commands a fresh machine needs: `make book` and `make test`.
# Both create .venv and install what they need; a second run reuses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
JB := $(VENV)/bin/jupyter-book
WIDGETS_JS := _build/widgets-js/STAMP

.PHONY: venv book test bench doctor lint format clean widgets-js

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
# cache keys on the chapters' cells only, so when the code they import (labs/,
# utils/) changes, the cache is dropped: every figure comes from the current code.
CODE_HASH = $(shell find labs utils -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
book: $(STAMP) $(WIDGETS_JS)
	@if [ "$$(cat _build/.code-hash 2>/dev/null)" != "$(CODE_HASH)" ]; then \
		echo "labs/ or utils/ changed: executing every chapter afresh"; \
		rm -rf _build/.jupyter_cache; fi
	$(JB) build . -W -n --keep-going
	@echo $(CODE_HASH) > _build/.code-hash

test: $(STAMP)
	$(PY) -m pytest

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
