# StageInteractor -- entry points.
#
#   make demo     set up, then run the small end-to-end demo (tools/run_demo.py)
#   make test     set up, then run the three test layers (core / detectron2 / detrex)
#   make setup    only the idempotent set-up step (scripts/setup_env.py)
#   make ci-clean the README's two commands on a fresh clone in an empty virtual environment
#                 (.ci/clean_env.sh; what CI runs after the fast `make test`)
#
# Variables: PYTHON (default python3), PYTEST_ARGS (extra pytest arguments, e.g. -m "not slow"),
# DEMO_ARGS (extra arguments for tools/run_demo.py). The set-up step reads DETECTRON2_SRC and
# DETREX_SRC (local checkouts or git directories), see scripts/setup_env.py.

PYTHON ?= python3
PYTEST_ARGS ?=
DEMO_ARGS ?=

# This checkout first on the import path, whatever is pip-installed.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)

.PHONY: help setup test demo lint ci-clean

help:
	@sed -n '2,11p' Makefile | sed 's/^# \{0,1\}//'

setup:
	$(PYTHON) scripts/setup_env.py

# pytest exits 5 when it collects no test at all; that is not a failure of the suite.
test: setup
	@rc=0; $(PYTHON) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5), treated as success"; rc=0; fi; \
	exit $$rc

# The demo needs the detectron2 layer; without it `make demo` fails (exit 1) with the reason.
demo: setup
	@if ! $(PYTHON) -c "import detectron2.config" >/dev/null 2>&1; then \
		echo "make demo: FAILED - detectron2 is not importable, so the demo cannot run;"; \
		echo "  the set-up step above says why. Provide it with e.g."; \
		echo "  DETECTRON2_SRC=/path/to/detectron2 make demo"; \
		exit 1; \
	fi
	$(PYTHON) tools/run_demo.py $(DEMO_ARGS)

ci-clean:
	.ci/clean_env.sh

lint:
	@if $(PYTHON) -m flake8 --version >/dev/null 2>&1; then \
		$(PYTHON) -m flake8 --max-line-length 100 --extend-ignore E203,W503 stageinteractor tools tests scripts; \
	else \
		echo "make lint: flake8 is not installed; byte-compiling only"; \
		$(PYTHON) -m compileall -q stageinteractor tools tests scripts; \
	fi
