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

.PHONY: install demo train test test-notebook test-all study tune tune-sweeps lint clean

$(VENV)/bin/python:
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

install: $(filter $(VENV)/bin/python,$(PYTHON))
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,tune]'

# The main job: the four architectures side by side on the embedded digits, then the report.
demo: install
	$(PYTHON) -m contrastive.train -m experiment=compare_digits hydra.sweep.dir=runs/demo
	$(PYTHON) -m contrastive.report runs/demo

# One run; pass Hydra overrides with ARGS="method=moco trainer.max_epochs=10".
train: install
	$(PYTHON) -m contrastive.train $(ARGS)

test: install
	$(PYTHON) -m pytest -q

# The notebook end to end in a Jupyter kernel (slow: kept out of `make test`'s ten minutes; CI runs it after).
test-notebook: install
	$(PYTHON) -m pytest -q -m slow tests/integration/test_notebook.py

# Also the slow tests (the benchmark side by side with lightly, which needs its own venv: see BENCHMARKS.md).
test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"

# On a GPU machine with this venv already installed (it downloads nothing): SimCLR ResNet-18 epochs on 50,000
# synthetic 32 px images in bf16, eager and compiled, every method's step, the torchvision-worker float32 loop, peak
# memory; written as a section of BENCHMARKS.md. CPU dry run: tests/integration/test_bench.py (slow).
.PHONY: bench-gpu
bench-gpu:
	$(PYTHON) benchmarks/bench.py --device cuda --lightly none --markdown BENCHMARKS.md

# The survey study, after the tuning stage (make tune, below), resumable (run it again after a stop: finished runs
# are kept, the others resume; each run's folder is named by its method or sweep point and seed, so a part run alone,
# e.g. seed=0, is found again), all on the
# CIFAR-10 split: the four methods x 3 seeds with per-stage probes; the MoCo paper's Figure 3 (10 points, 2 seeds) at
# equal epochs (4), and at equal optimiser steps (500): the batch-64 points (bank, MoCo, end-to-end at 64) take 500
# steps in their 4 epochs, so the equal-step part trains only the end-to-end points at batches 16 and 256 again and
# its report takes the batch-64 runs from the equal-epoch part. Each run's metrics.json and config.yaml are copied
# under results/study/, one report per part beside them. About 3 h 10 min on a 2-core CPU, two runs at a time (the
# four methods about 42 min a seed, Figure 3 44 min at equal epochs and 20 min at equal steps; 2026-11-29).
STUDY ?= runs/study
DATA ?= ../shared/data
# The tuning stage (issue 29): each method's Optuna study on the CIFAR-10 split's validation images
# (experiment=tune_cifar10_cpu: 8 trials of 3 epochs, two at a time; about an hour for the four on a 2-core CPU), then
# its best trial written into conf/experiment/cifar10_cpu/<method>.yaml with its trial table under results/tuning/
# (contrastive.tune_record), which the confirmation stage below may overrule.
# Resumable: a finished study (its optimization_results.yaml) is skipped; a stopped one, run again, proposes the same
# trials (fixed sampler seed) and keeps the finished ones (resume=auto).
TUNE_METHODS ?= simclr memory_bank moco swav
TUNING ?= runs/tuning/cifar10_cpu
tune-sweeps: install
	for m in $(TUNE_METHODS); do \
		if [ -f $(TUNING)/$$m/optimization_results.yaml ]; then echo "tuning $$m: finished in $(TUNING)/$$m"; continue; fi; \
		$(PYTHON) -m contrastive.train -m experiment=tune_cifar10_cpu +tune=$$m data.root=$(DATA) \
			hydra.sweep.dir=$(TUNING)/$$m || exit 1; done
# Then the confirmation stage (contrastive.tune_confirm): each study's best trial and its incumbent (the settings
# before the tuning) at the full 20 epochs, seed 100, judged on validation; the better is written into the bundle.
# Eight runs, two at a time: about 80 min on a 2-core CPU. Resumable as the sweeps.
tune: tune-sweeps
	for m in $(TUNE_METHODS); do \
		$(PYTHON) -m contrastive.tune_record $(TUNING)/$$m --table results/tuning/$$m || exit 1; done
	$(PYTHON) -m contrastive.tune_confirm $(foreach m,$(TUNE_METHODS),results/tuning/$(m)) --top 1 --seeds 100 \
		--sweep runs/confirm/cifar10_cpu -o data.root=$(DATA) -o trainer.enable_progress_bar=false
	for m in $(TUNE_METHODS); do $(PYTHON) -m contrastive.report results/tuning/$$m || exit 1; done

SIDE_BY_SIDE = hydra/launcher=parallel perf.threads=1 resume=auto data.root=$(DATA)
POINT = 'hydra.sweep.subdir=$${hydra:runtime.choices.experiment/nsweep_cifar10}_seed$${seed}'
study: tune
	$(PYTHON) -m contrastive.train -m experiment=compare_cifar10_cpu seed=0,1,2 eval.stages=true $(SIDE_BY_SIDE) \
		hydra.sweep.dir=$(STUDY)/cifar10 \
		'hydra.sweep.subdir=$${method.name}_seed$${seed}'
	$(PYTHON) -m contrastive.train -m experiment=negatives_sweep_cifar10 seed=0,1 $(SIDE_BY_SIDE) \
		hydra.sweep.dir=$(STUDY)/negatives_cifar10 $(POINT)
	$(PYTHON) -m contrastive.train -m experiment=negatives_sweep_cifar10_steps seed=0,1 $(SIDE_BY_SIDE) \
		hydra.sweep.dir=$(STUDY)/negatives_cifar10_steps $(POINT)
	for part in cifar10 negatives_cifar10 negatives_cifar10_steps; do \
		for run in $(STUDY)/$$part/*/metrics.json; do \
			dest=results/study/$$part/$$(basename $$(dirname $$run)); mkdir -p $$dest && \
			cp $$run $$(dirname $$run)/config.yaml $$dest/ || exit 1; done; done
	$(PYTHON) -m contrastive.report results/study/cifar10 --before results/study/cifar10_untuned
	$(PYTHON) -m contrastive.report results/study/negatives_cifar10
	$(PYTHON) -m contrastive.report results/study/negatives_cifar10_steps results/study/negatives_cifar10/bank_* \
		results/study/negatives_cifar10/moco_* results/study/negatives_cifar10/e2e_64_* \
		--out results/study/negatives_cifar10_steps

lint:
	$(PYTHON) -m ruff check contrastive tests benchmarks
	$(PYTHON) -m ruff format --check contrastive tests benchmarks

clean:
	rm -rf outputs multirun runs lightning_logs .pytest_cache .ruff_cache *.egg-info
