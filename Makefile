# The KV-Cache Book: build, test and maintenance commands (see README.md).
# Every Python tool runs from the project's virtual environment, made by the first target
# that needs it. `make test` is what CI runs (.ci/run).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Runs a command with the venv first on PATH, for tools that start subprocesses (kernels).
IN_VENV := PATH="$(abspath $(VENV))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"

# JavaScript the HTML book loads, fetched from npm at build time (never committed), so that
# pages work offline, opened from disk: the ipywidgets manager (+ RequireJS) and MathJax.
# _config.yml points myst-nb (nb_ipywidgets_js) and Sphinx (mathjax_path) at these copies.
HTML_MANAGER := @jupyter-widgets/html-manager@1.0.15
REQUIREJS := requirejs@2.3.8
MATHJAX := mathjax@3.2.2
OFFLINE := _offline/_static
OFFLINE_STAMP := _offline/.fetched

NOTEBOOKS ?= $(sort $(wildcard book/*.ipynb))
SANITIZE := tests/sanitize.cfg
PYTEST_ARGS ?=

.PHONY: help venv chromium widgets-js book book-strict lint unit nbval browser test execute clean

help:
	@echo "make venv         create $(VENV) and install requirements.txt (kvlib editable)"
	@echo "make book         build the HTML book into _build/html"
	@echo "make test         lint, unit, nbval, book-strict, browser (what CI runs); first it"
	@echo "                  checks for Debian's chromium and installs it with apt if it can"
	@echo "make lint | unit | nbval | book-strict | browser    one step of make test"
	@echo "make execute      re-run every chapter in place, storing outputs and widget state"
	@echo "                  (one chapter: make execute NOTEBOOKS=book/01_incremental_decoding.ipynb)"
	@echo "make clean        remove _build"

venv: $(STAMP)

# Debian's chromium for the browser check: installed with apt when missing, if this user can
# (root); otherwise this stops make at once with the command to run (tools/ensure_chromium.sh).
chromium:
	@sh tools/ensure_chromium.sh

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

widgets-js: $(OFFLINE_STAMP)

# New or changed assets: drop the HTML, so every page is written again and links to them.
$(OFFLINE_STAMP): Makefile _ext/widgets_setup.js
	rm -rf $(OFFLINE) _build/html
	mkdir -p $(OFFLINE)/widgets $(OFFLINE)/mathjax
	tmp="$$(mktemp -d)" && trap 'rm -rf "$$tmp"' EXIT && \
	( cd "$$tmp" && npm pack --silent $(HTML_MANAGER) $(REQUIREJS) $(MATHJAX) >/dev/null ) && \
	tar -xzf "$$tmp"/jupyter-widgets-html-manager-*.tgz -C "$$tmp" --exclude='*.map' package/dist && \
	cp "$$tmp"/package/dist/* $(OFFLINE)/widgets/ && \
	rm -rf "$$tmp"/package && \
	tar -xzf "$$tmp"/requirejs-*.tgz -C "$$tmp" package/require.js && \
	cp "$$tmp"/package/require.js _ext/widgets_setup.js $(OFFLINE)/widgets/ && \
	rm -rf "$$tmp"/package && \
	tar -xzf "$$tmp"/mathjax-*.tgz -C "$$tmp" package/LICENSE package/es5 && \
	mkdir -p $(OFFLINE)/mathjax/output && \
	cp -r "$$tmp"/package/LICENSE "$$tmp"/package/es5/tex-mml-chtml.js "$$tmp"/package/es5/input \
		"$$tmp"/package/es5/a11y "$$tmp"/package/es5/ui "$$tmp"/package/es5/adaptors \
		"$$tmp"/package/es5/sre $(OFFLINE)/mathjax/ && \
	cp -r "$$tmp"/package/es5/output/chtml.js "$$tmp"/package/es5/output/chtml \
		$(OFFLINE)/mathjax/output/
	touch $@

book: $(STAMP) $(OFFLINE_STAMP)
	$(IN_VENV) $(VENV)/bin/jupyter-book build .

# The same build, rebuilding every page, with any warning (nitpicky too) failing it.
book-strict: $(STAMP) $(OFFLINE_STAMP)
	$(IN_VENV) $(VENV)/bin/jupyter-book build . --all --warningiserror --nitpick --keep-going

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Unit tests and kvlib's doctests (testpaths and --doctest-modules are in pyproject.toml).
unit: $(STAMP)
	$(IN_VENV) $(PY) -m pytest $(PYTEST_ARGS)

# Each chapter re-executed on the CPU, its outputs compared with the committed ones.
# tools/nbval_output_widgets.py leaves what Output widgets capture (interactive) to the widget.
nbval: $(STAMP)
	$(IN_VENV) $(PY) -m pytest -p tools.nbval_output_widgets --nbval book/ --nbval-current-env \
		--nbval-sanitize-with $(SANITIZE) --nbval-cell-timeout 300 $(PYTEST_ARGS)

# Headless Chromium opens every built chapter from disk, checks what a reader sees and moves
# every control of every widget; needs _build/html (make book).
browser: chromium $(STAMP)
	$(IN_VENV) $(PY) -m pytest tests/browser $(PYTEST_ARGS)

test: chromium
	$(MAKE) venv
	$(MAKE) lint
	$(MAKE) unit
	$(MAKE) nbval
	$(MAKE) book-strict
	$(MAKE) browser

execute: $(STAMP)
	$(IN_VENV) $(PY) tools/execute_notebooks.py --timeout 300 $(NOTEBOOKS)

clean:
	rm -rf _build
