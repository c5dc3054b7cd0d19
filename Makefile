# Two set-up commands for a fresh machine:  `make demo` (the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU torch wheel on disk; GPU users install their own torch first and it is kept.
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-fast test-install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/msprior demo

# the venv's bin first on PATH: tests start `ray`, `mlflow`, `weed` and `msprior` as subprocesses
test: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

test-fast: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not slow"

# part of `make test`: the wheel into fresh venvs WITHOUT constraints.txt (pip, then uv), the CLI, each
# stage's import and the shipped configs from outside the repository, `msprior tune` from a temp folder
test-install: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -s tests/test_packaging.py

clean:
	rm -rf $(VENV) .pytest_cache msprior-demo
