# Works on a fresh machine with only Python >= 3.11: every target makes .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: venv demo test lint typecheck bench lock clean

venv: $(STAMP)

# The exact tested set from the lock, then loractl itself without a resolver step (--no-deps),
# so nothing floats; pip check fails if the lock no longer satisfies pyproject.toml.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e '.[test]'
	$(BIN)/pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loractl demo demo-run

# Two workers, one test file each at a time: the time-bound soak (4 minutes here) runs
# beside the rest, and the whole stays inside CI's 20 minutes on 2 cores.
test: lint typecheck
	LORACTL_SOAK_SECONDS=240 $(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy finds modules by folder, and the folders here are not named as the packages (common/ is
# loractl, launchd/ is loractl.launchd, ...): it checks a tree of links that is. Its messages
# are turned back into the repository's paths. Strict everywhere (pyproject.toml); checked so
# far: common/ (less __main__.py, the client's entry point), launchd/ and supervisor/. Add a
# package with -p, e.g. `-p loractl.client`.
TYPECHECK := build/typecheck
COMMON_MODULES := $(filter-out __init__ __main__,$(basename $(notdir $(wildcard common/*.py))))
MYPY_TARGETS := -m loractl $(addprefix -m loractl.,$(COMMON_MODULES)) -p loractl.launchd \
	-p loractl.supervisor

typecheck: $(STAMP)
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/loractl
	@ln -s $(CURDIR)/common/*.py $(TYPECHECK)/loractl/
	@for pkg in daemon supervisor client launchd; do ln -s $(CURDIR)/$$pkg $(TYPECHECK)/loractl/; done
	@echo "mypy $(MYPY_TARGETS)"
	@$(BIN)/mypy $(MYPY_TARGETS) > $(TYPECHECK)/mypy.out; status=$$?; \
	sed -E -e 's#$(TYPECHECK)/loractl/(daemon|supervisor|client|launchd)/#\1/#g' \
	    -e 's#$(TYPECHECK)/loractl/#common/#g' $(TYPECHECK)/mypy.out; exit $$status

# The half-hour soak; `make test` runs the same test for 4 minutes.
.PHONY: soak
soak: $(STAMP)
	LORACTL_SOAK_SECONDS=1800 $(BIN)/python -m pytest -q -m soak tests/soak

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

# After changing pyproject.toml's dependencies: resolve them afresh (the newest each range
# allows) in a scratch venv and pin what came. mlx's platform half is pinned for both
# platforms: mlx-cpu on Linux, mlx-metal on macOS, always mlx's own version.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet '.[test]'
	$(LOCK_VENV)/bin/pip freeze --exclude loractl | grep -v -E '^mlx-(cpu|metal)==' > $(LOCK_VENV)/frozen
	mlx=$$(sed -n 's/^mlx==//p' $(LOCK_VENV)/frozen); test -n "$$mlx"; \
	{ echo '# The exact set `make` installs and CI tests; regenerate with `make lock`.'; \
	  echo '# pyproject.toml keeps the compatible ranges a plain `pip install .` resolves.'; \
	  cat $(LOCK_VENV)/frozen; \
	  echo "mlx-cpu==$$mlx ; sys_platform == \"linux\""; \
	  echo "mlx-metal==$$mlx ; sys_platform == \"darwin\""; } > $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) demo-run bench/out .pytest_cache build
