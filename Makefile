# The README's commands. Each target does its own set-up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV = $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
# Extra parameter overrides for `make run`, e.g.
#   make run SET='datasets.cats_vs_dogs.mirrors=["file:///srv/mirror/cats.zip"]'
SET ?=
SET_ARGS = $(foreach s,$(SET),--set '$(s)')
PYTEST_ARGS ?=

.PHONY: setup run test lint bench clean

setup: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

run: setup
	@set -e; for ds in $$($(PY) -m tasks datasets); do \
		echo "== download $$ds"; \
		$(PY) -m tasks download $$ds $(SET_ARGS); \
	done

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check tasks dags tests
	$(VENV)/bin/ruff format --check tasks dags tests

bench: setup
	$(PY) -m tasks.bench

clean:
	rm -rf .pytest_cache .ruff_cache
