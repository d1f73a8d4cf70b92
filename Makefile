# The Python to install into and run: the active virtual environment if there is one, otherwise a
# project .venv made on first use (system Pythons refuse `pip install`, PEP 668). PYTHON=... overrides.
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
ifneq ($(VIRTUAL_ENV),)
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= $(VENV)/bin/python
endif
PIP ?= $(PYTHON) -m pip
# The known-good torch / torchvision pair; pyproject.toml declares the supported range.
CONSTRAINTS ?= constraints.txt
# Threads per process: the default (all cores) oversubscribes small CPU runs.
export OMP_NUM_THREADS ?= 2

.PHONY: install demo train test test-all lint clean

$(VENV)/bin/python:
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

install: $(filter $(VENV)/bin/python,$(PYTHON))
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'

# The main job: the four architectures side by side on the embedded digits, then the report.
demo: install
	$(PYTHON) -m contrastive.train -m experiment=compare_digits hydra.sweep.dir=runs/demo
	$(PYTHON) -m contrastive.report runs/demo

# One run; pass Hydra overrides with ARGS="method=moco trainer.max_epochs=10".
train: install
	$(PYTHON) -m contrastive.train $(ARGS)

test: install
	$(PYTHON) -m pytest -q

# Also the slow tests (the benchmark side by side with lightly, which needs its own venv: see BENCHMARKS.md).
test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint:
	$(PYTHON) -m ruff check contrastive tests

clean:
	rm -rf outputs multirun runs lightning_logs .pytest_cache .ruff_cache *.egg-info
