# Works on a fresh machine with only Python >= 3.11: every target makes .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loractl demo demo-run

# Two workers, one test file each at a time: the time-bound soak runs beside the rest.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The half-hour soak; `make test` runs the same test for 5 minutes.
.PHONY: soak
soak: $(STAMP)
	LORACTL_SOAK_SECONDS=1800 $(BIN)/python -m pytest -q -m soak tests/soak

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) demo-run bench/out .pytest_cache
