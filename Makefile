# Set-up and entry points. `make demo` and `make test` create .venv when it
# is missing, install the package with the extras they need, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= out/demo
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,parity,coco]'
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(PY) -m tcr_jax.main --config=configs/depth_recon.py:synthetic --workdir $(DEMO_DIR)

test: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
