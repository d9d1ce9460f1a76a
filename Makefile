# Set-up and entry points. `make run` and `make test` create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m ptq.main $(ARGS)

# two workers (pytest-xdist), one thread each: the suite's CLI runs spend much of their time importing
test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check ptq tests

clean:
	rm -rf $(VENV) outputs/* multirun
