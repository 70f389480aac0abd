# Set-up and entry points. `make demo` and `make test` create .venv when it
# is missing, install the package with the extras they need, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= out/demo
REPRO_DIR ?= out/reproduction
SEED ?= 0
PYTEST_ARGS ?=
TEST_MARKS ?=
TEST_WORKERS ?= 2
ifeq ($(strip $(TEST_MARKS)),)
PARALLEL_MARKS := not serial
SERIAL_MARKS := serial
else
PARALLEL_MARKS := ($(TEST_MARKS)) and not serial
SERIAL_MARKS := ($(TEST_MARKS)) and serial
endif

.PHONY: demo reproduction test quick install clean

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

# docs/reproduction.md: one seed of the paper's figures on the synthetic
# scenes (both depth experiments; depth_seg reuses depth_recon's bases) and
# the depth head's ceiling. Again with SEED=1, SEED=2.
# The ceiling trains as long as a base model at most (2500 + 750 steps).
REPRO_SEED_DIR = $(REPRO_DIR)/seed$(SEED)
reproduction: $(VENV)/.installed-base
	$(PY) -m tcr_jax.main --config=configs/depth_recon.py:reproduction \
	  --config.seed=$(SEED) --workdir $(REPRO_SEED_DIR)/depth_recon
	test -f $(REPRO_SEED_DIR)/depth_recon/ceiling.json || \
	  $(VENV)/bin/tcr-jax ceiling $(REPRO_SEED_DIR)/depth_recon --steps 3250
	mkdir -p $(REPRO_SEED_DIR)/depth_seg
	cp $(REPRO_SEED_DIR)/depth_recon/ceiling.json $(REPRO_SEED_DIR)/depth_seg/
	$(PY) -m tcr_jax.main --config=configs/depth_seg.py:reproduction \
	  --config.seed=$(SEED) --workdir $(REPRO_SEED_DIR)/depth_seg \
	  --config.sweep.bases_from=$(REPRO_SEED_DIR)/depth_recon

# The suite runs on TEST_WORKERS processes (pytest-xdist; each test file on
# one of them, so its module fixtures are built once; the longest files
# first, tests/conftest.py's LONGEST_FIRST); then, alone, the
# tests marked serial, whose processes meet at a rendezvous that load can
# make them miss. Exit 5 (nothing selected) from one of the two is fine.
# Select with TEST_MARKS (a marker expression) and PYTEST_ARGS (e.g. -k).
# glibc returns freed blocks over 128 KiB to the system at once (its default
# threshold grows to 32 MiB and keeps them): the suite's peak memory falls,
# its time does not change (measured on the :smoke sweep).
TEST_ENV := JAX_PLATFORMS=cpu MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072
test: $(VENV)/.installed-test
	@$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  -m "$(PARALLEL_MARKS)" $(PYTEST_ARGS); a=$$?; \
	$(TEST_ENV) $(PY) -m pytest -q -m "$(SERIAL_MARKS)" $(PYTEST_ARGS); b=$$?; \
	echo "make test: parallel part exit $$a, serial part exit $$b"; \
	case "$$a$$b" in 00|05|50) exit 0;; *) exit 1;; esac

# The loop to run after each edit: every test not marked slow (BUILD.md).
quick: $(VENV)/.installed-test
	@$(MAKE) --no-print-directory test TEST_MARKS="not slow"

clean:
	rm -rf $(VENV) out .pytest_cache
