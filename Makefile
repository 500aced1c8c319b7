# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench install clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ldam-sweep demo

# The atlas tests drive Debian's Chromium (no browser download), the docs' examples pipe into jq:
# install them when missing.
browser:
	command -v chromium >/dev/null 2>&1 && command -v jq >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium jq >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=30

# The quick tier (tests marked fast): every module's logic without Ray, a sweep or Chromium, in under 2 min on 2 cores
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m fast

# The CPU benchmarks behind benchmarks/README.md (~20 min on 2 cores); on a GPU: bash benchmarks/gpu.sh
bench: $(STAMP)
	for b in hardware_limit peers end_to_end scaling batching store; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
