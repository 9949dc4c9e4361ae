# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: a wheel already on this machine (pip's find-links) wins over a download
# of several GB; with none, the registry's build is installed by the next line.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-index --no-deps "torch>=2.11" 2>/dev/null || true
	$(BIN)/pip install -q -e ".[demo]"
	touch $@

# The report's browser test renders pages in Debian's chromium; where it cannot be installed
# (not root, no apt), that one test skips and says why.
$(VENV)/.test: pyproject.toml $(VENV)/.demo
	$(BIN)/pip install -q -e ".[test]"
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; } } || \
	  echo "chromium not installed: the report's browser test will be skipped"
	touch $@

demo: $(VENV)/.demo
	$(BIN)/meshwise demo

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test
	$(BIN)/python bench/dp.py
	$(BIN)/python bench/pp.py
	$(BIN)/python bench/zero.py
	$(BIN)/python bench/tp.py
	$(BIN)/python bench/planner.py
	$(BIN)/python bench/record.py

clean:
	rm -rf $(VENV) runs .pytest_cache
