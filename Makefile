PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= $(VPY) examples/mnist_lr_schedule.py --quick --out results/mnist_lr_schedule.json

export TF_CPP_MIN_LOG_LEVEL := 2
# mkdocs-material prints an end-of-life banner on every build; it is not a warning of ours.
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv demo test test-fast test-onednn lint docs clean

venv: $(STAMP)

# keras_es/__init__.py is listed (if present) because a setuptools editable install
# made before the package existed maps nothing; re-install once it appears.
$(STAMP): setup.cfg pyproject.toml $(wildcard keras_es/__init__.py)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: venv
	mkdir -p results
	$(DEMO)

# Tests run with TensorFlow's oneDNN kernels off unless the environment says otherwise:
# most CPUs (x86 without AVX-512, Apple, ARM) get them off, and some kernels (gradients
# of grouped convolutions) exist only with them, so a machine that has them on by
# default (x86 with AVX-512) would hide what most users hit.
test test-fast: export TF_ENABLE_ONEDNN_OPTS ?= 0

test: venv
	$(VPY) -m pytest -q

# The fast tier (about 1 minute on 2 cores): unit tests. Tests marked slow (end-to-end
# fits, statistical runs, examples, subprocesses and kills: anything over ~2 s) run in
# `make test`, which CI runs.
test-fast: venv
	$(VPY) -m pytest -q -m "not slow"

# The particle engine's tests again with oneDNN on, where the stacked (grouped
# convolution) execution runs on a CPU.
test-onednn: venv
	TF_ENABLE_ONEDNN_OPTS=1 $(VPY) -m pytest -q tests/engine \
		"tests/callback/test_callback.py::test_fit_of_a_convolutional_model_tunes_on_any_cpu"

lint: venv
	$(VENV)/bin/ruff check keras_es tests examples benchmarks

docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site results
