# make test: venv + pinned deps, build pdepth._C (CUDA too when a toolkit is present), lint,
#   the tests but those marked slow (about 3 minutes on 2 cores).
# make test-slow: the tests marked slow (end-to-end CLI runs, reports, sharding); CI runs both.
# make demo: the same setup, then the main job on the embedded default.
# make sdist-check: build the sdist and install it as users do (see README, Install).
# make docs: the site (Sphinx) into docs/_build/html, warnings as errors; it runs examples/.
# make examples: run each example script alone (what the docs build runs, without Sphinx).
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME

.PHONY: all venv build test test-slow lint bench demo dataset sdist-check docs examples clean

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

# The sdist, installed as users do: `python -m build --sdist`, then a non-editable
# `pip install --no-build-isolation` of the tarball (CPU only, to keep it short) into a scratch
# venv that sees $(VENV)'s packages (torch), then used from outside the source tree.
SDIST_DIR := $(CURDIR)/build/sdist-check
sdist-check: venv
	rm -rf $(SDIST_DIR) && mkdir -p $(SDIST_DIR)
	env -u FORCE_CUDA FORCE_CPU=1 $(VPY) -m build --sdist --no-isolation --outdir $(SDIST_DIR)/dist . > $(SDIST_DIR)/sdist.log 2>&1 \
		|| { tail -30 $(SDIST_DIR)/sdist.log; exit 1; }
	$(VPY) -m venv --without-pip $(SDIST_DIR)/venv
	$(VPY) -c "import sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))" \
		> "$$($(SDIST_DIR)/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/dev-venv.pth"
	cd $(SDIST_DIR) && env -u FORCE_CUDA FORCE_CPU=1 venv/bin/python -m pip install -v --no-build-isolation \
		--no-deps dist/pdepth-*.tar.gz > install.log 2>&1 || { tail -50 install.log; exit 1; }
	@grep -m1 "pdepth: build" $(SDIST_DIR)/install.log
	cd $(SDIST_DIR) && venv/bin/python -c "import sys, torch, pdepth; \
		assert pdepth.__file__.startswith(sys.prefix), pdepth.__file__; \
		assert pdepth.backend() == 'extension', pdepth.build_info(); \
		x = torch.randn(64, 8); nb = pdepth.knn(x[:5], x, k=3, self_match='include'); \
		assert nb.index[:, 0].tolist() == list(range(5)), nb; \
		print('pdepth: sdist install OK:', pdepth.__file__, pdepth.build_info())"
	cd $(SDIST_DIR) && venv/bin/pdepth --help > /dev/null

lint: venv
	$(VENV)/bin/ruff check pdepth tests benchmarks examples docs/conf.py setup.py

test: build lint
	$(VPY) -m pytest -q -m "not slow" tests

test-slow: build
	$(VPY) -m pytest -q -m slow tests

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

# -W --keep-going: every warning is listed, then the build fails; -E: no stale pages. The
# examples read Fashion-MNIST from the Debian package (make dataset) and run headless.
docs: build dataset
	rm -rf docs/api/generated docs/auto_examples
	MPLBACKEND=Agg $(VPY) -m sphinx -W --keep-going -E -b html docs docs/_build/html
	@echo "pdepth: docs built: docs/_build/html/index.html"

examples: build dataset
	@for f in examples/*.py; do echo "== $$f"; MPLBACKEND=Agg $(VPY) $$f > /dev/null || exit 1; done

clean:
	rm -rf build dist *.egg-info pdepth/_C*.so build.log docs/_build docs/api/generated docs/auto_examples
