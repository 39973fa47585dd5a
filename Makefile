# StageInteractor -- entry points.
#
#   make demo     set up, then run the small end-to-end demo (tools/run_demo.py)
#   make test     set up, then run the three test layers (core / detectron2 / detrex)
#   make setup    only the idempotent set-up step (scripts/setup_env.py)
#
# Variables: PYTHON (default python3), PYTEST_ARGS (extra pytest arguments, e.g. -m "not slow"),
# DEMO_ARGS (extra arguments for tools/run_demo.py). The set-up step reads DETECTRON2_SRC and
# DETREX_SRC (local checkouts or git directories), see scripts/setup_env.py.

PYTHON ?= python3
PYTEST_ARGS ?=
DEMO_ARGS ?=

# This checkout first on the import path, whatever is pip-installed.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)

.PHONY: help setup test demo lint

help:
	@sed -n '2,9p' Makefile | sed 's/^# \{0,1\}//'

setup:
	$(PYTHON) scripts/setup_env.py

# pytest exits 5 when it collects no test at all; that is not a failure of the suite.
test: setup
	@rc=0; $(PYTHON) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5), treated as success"; rc=0; fi; \
	exit $$rc

# The demo needs the detectron2 layer; without detectron2 it is skipped with the reason.
demo: setup
	@if $(PYTHON) -c "import detectron2.config" >/dev/null 2>&1; then \
		echo "$(PYTHON) tools/run_demo.py $(DEMO_ARGS)"; \
		$(PYTHON) tools/run_demo.py $(DEMO_ARGS); \
	else \
		echo "make demo: SKIPPED - detectron2 is not importable; provide it with e.g."; \
		echo "  DETECTRON2_SRC=/path/to/detectron2 make demo"; \
	fi

lint:
	@if $(PYTHON) -m flake8 --version >/dev/null 2>&1; then \
		$(PYTHON) -m flake8 --max-line-length 100 --extend-ignore E203,W503 stageinteractor tools tests scripts; \
	else \
		echo "make lint: flake8 is not installed; byte-compiling only"; \
		$(PYTHON) -m compileall -q stageinteractor tools tests scripts; \
	fi
