PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= $(VPY) examples/mnist_lr_schedule.py --quick --out results/mnist_lr_schedule.json

export TF_CPP_MIN_LOG_LEVEL := 2
# mkdocs-material prints an end-of-life banner on every build; it is not a warning of ours.
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv demo test lint docs clean

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

test: venv
	$(VPY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check keras_es tests examples benchmarks

docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site results
