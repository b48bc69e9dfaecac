# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# `make test` runs the default suite, every test not marked slow; `make test-all` (what CI runs,
# `.ci/run`) adds the slow ones (longer end-to-end variants, the kill, two-node and object-storage runs)
# and the numerics tests again under a second CPU kernel path.
# torch and torchvision go in first, pinned, so pip never pulls a CUDA torch by accident;
# a GPU user overrides them, e.g. `make demo TORCH=torch==2.13.0+cu130 TORCHVISION=...`.
# The rest goes in with uv (about 4x faster than pip here; it keeps the torch already installed and
# compiles bytecode as pip does); where uv cannot reach an index, pip installs it instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCHVISION ?= torchvision==0.28.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taskatlas-installed

.PHONY: demo test test-all lint format clean

$(STAMP): pyproject.toml tools/torchvision_cpu_stubs.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(TORCHVISION) uv
	$(PY) tools/torchvision_cpu_stubs.py
	$(PY) -m uv pip install -q --native-tls --python $(PY) --compile-bytecode -e '.[dev]' \
		|| $(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/taskatlas run -c configs/quickstart.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -m "not slow"

# The tests marked `numerics` run again on a second CPU kernel path (SSE4.1 oneDNN kernels,
# ATen's portable ones), standing in for the hosts we don't have: a float that depends on one
# CPU's instruction set fails here, not on a user's machine.
SECOND_KERNELS := ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default

test-all: lint
	$(PY) -m pytest
	$(SECOND_KERNELS) $(PY) -m pytest -m numerics

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache taskatlas-runs
