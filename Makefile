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

$(VENV)/.test: pyproject.toml $(VENV)/.demo
	$(BIN)/pip install -q -e ".[test]"
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

clean:
	rm -rf $(VENV) runs .pytest_cache
