# `make test` and `make demo` set everything up on a fresh machine (a venv with
# requirements) and then run; the venv is reused while requirements are unchanged.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean images push-images

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# Three workers (pytest-xdist), whole test files each so a file's shared trained model is built once. Three on a
# 2-core machine: with two, the cores idle about a quarter of the time while tests wait on the processes they start
# and on the emulator, and a third worker fills it (bench/RESULTS.md). `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile --durations=10

demo: $(STAMP)
	$(BIN)/python -m local_runner demo --output demo_output

# The runner images dataloop.json names (docker/images.py; needs docker and, to push, a registry login).
images:
	$(PYTHON) docker/images.py

push-images:
	$(PYTHON) docker/images.py --push

clean:
	rm -rf $(VENV) demo_output .pytest_cache
