# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment and fetch the datasets when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU torch pin lives only in this constraints file (see ci/constraints.txt).
CONSTRAINTS := ci/constraints.txt

.PHONY: demo test venv data clean

$(VENV)/.installed: setup.cfg setup.py pyproject.toml torch_modularity/_kernels.c torch_modularity/_chain_step.c torch_modularity/_chain_step.h $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test,plot,lightning,huggingface]'
	touch $@

venv: $(VENV)/.installed

data:
	bash scripts/fetch_data.sh

demo: venv data
	$(PY) examples/demo.py

test: venv data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
