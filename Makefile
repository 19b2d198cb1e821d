# The two commands of the README:
#   make run    set up, then run the flagship recipe on the built-in default (Fashion-MNIST)
#   make test   set up, then run the test suite (what CI runs)
VENV ?= .venv
RECIPE ?= recipes/resnet50_int8.yaml
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; a file's tests stay together, sharing its fixtures).
TEST_WORKERS ?= 2

.PHONY: setup run test test-slow lint clean

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/deploycraft run $(RECIPE)

test: setup
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check deploycraft tests

clean:
	rm -rf $(VENV) .pytest_cache
