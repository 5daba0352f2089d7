# lmforge: `make train` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

# Without an NVIDIA GPU, pin the CPU build of torch (constraints-cpu.txt). Machines with a GPU
# install torch as pip resolves it. TORCH_INDEX_URL adds a PyTorch wheel index if you need one,
# e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PIP_FLAGS := $(if $(HAS_GPU),,-c constraints-cpu.txt) $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)

.PHONY: install train test test-all lint format clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_FLAGS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install lmforge with its dev tools

train: $(STAMP)  ## train the default small GPT on Tiny Shakespeare (CPU, a few minutes)
	$(VENV)/bin/lmforge-train $(ARGS)

# One pytest-xdist worker per core (at most 4), each of one thread; tests sharing a fixture go
# to the same worker. PYTEST_ARGS="-n 0" runs them in one process.
XDIST := -n auto --maxprocesses 4 --dist loadgroup

test: $(STAMP)  ## the fast test suite (what CI runs)
	$(PY) -m pytest -m "not slow" -q $(XDIST) $(PYTEST_ARGS)

test-all: $(STAMP)  ## every test, the slow ones too
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff lint and format check; hadolint on the Dockerfile
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/hadolint Dockerfile

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

clean:
	rm -rf $(VENV) data/prepared .pytest_cache .ruff_cache
