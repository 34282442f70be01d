# Each target does all of its set-up on a fresh machine: a virtual environment in .venv, the CPU
# build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# package. Override PYTHON or TORCH_SPEC if you need another interpreter or torch build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test bench setup browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"

demo: setup
	$(BIN)/clipprior demo --out clipprior-demo.png

# The HTML report test opens the page in headless Chromium (Debian's package); set
# CLIPPRIOR_SKIP_BROWSER_TEST=1 to opt out on machines where it cannot be installed.
browser:
	@if [ -z "$$CLIPPRIOR_SKIP_BROWSER_TEST" ] && ! command -v chromium >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
	fi

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_precompute.py
