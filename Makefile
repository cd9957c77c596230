# Quick start: `make demo` (main job) and `make test` (test suite). Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-families setup bench cpp-test clean

NATIVE_SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu csrc/kernels/*.cuh)

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel first: nothing later may pull a CUDA build of torch.
	$(BIN)/pip install -q torch==2.13.0
	# setup.py compiles foe_compile._C against the installed torch, so no build isolation.
	$(BIN)/pip install -q setuptools wheel ninja
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation transformers==5.17.0 -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/foe-compile demo
	$(BIN)/placement-compile place ibm01 --out out/ibm01

test: $(STAMP)
	$(BIN)/python -m pytest -q -x -n 2 --durations=15 -m "not families" tests

# The Hugging Face family sweep (every test marked `families`: tests/foe/test_families.py and the
# family capture tests): one torch.export capture and translation validation per family, so it
# runs as its own CI step.
test-families: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=5 -m families tests

# Microbenchmarks (bench/conftest.py): GPU shapes in bf16 when CUDA is present, else the tiny
# CPU mode; rows, plot and summary land in bench/results/.
bench: $(STAMP)
	$(BIN)/python -m pytest -q bench -p no:cacheprovider

# C++ kernels standalone against the venv's libtorch (CTest) + compile check of the .cu files (nvcc).
cpp-test: $(STAMP)
	cmake -S . -B build/cmake -DFOE_PYTHON=$(abspath $(BIN))/python
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

clean:
	rm -rf $(VENV) build out *.egg-info
