# make test: venv + pinned deps, build pdepth._C (CUDA too when a toolkit is present), lint, tests.
# make demo: the same setup, then the main job on the embedded default.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME

.PHONY: all venv build test lint bench demo dataset clean

all: test

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Prints the build decision (CPU only or CUDA + archs); the log is build.log.
build: venv
	@$(VPY) -m pip install --no-build-isolation --no-deps -v -e . > build.log 2>&1 \
		|| { tail -50 build.log; echo "pdepth: build failed (full log: build.log)"; exit 1; }
	@grep -m1 "pdepth: build" build.log || true
	@$(VPY) -c "import pdepth; print('pdepth:', pdepth.build_info())"

lint: venv
	$(VENV)/bin/ruff check pdepth tests benchmarks setup.py

test: build lint
	$(VPY) -m pytest -q tests

bench: build
	$(VPY) benchmarks/bench_knn.py --sizes full

# Fashion-MNIST from Debian (needs root); the tests and the demo use it.
dataset:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else echo "pdepth: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; \
	fi

# Results and report.html land in runs/demo (replaced on each `make demo`).
demo: build dataset
	$(VPY) -m pdepth run --out runs/demo --overwrite

clean:
	rm -rf build *.egg-info pdepth/_C*.so build.log
