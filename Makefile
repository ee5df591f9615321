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
# `make run` DAG conf (JSON); `make airflow` ports.
CONF ?=
AIRFLOW_PORT ?= 8080

.PHONY: setup run test test-fast lint bench bench-scale bench-gpu bench-score clean airflow demo recipes stack-deps

# GPU=1: TensorFlow with its CUDA libraries (uv.lock's `gpu` group, Linux) instead of
# tensorflow-cpu; both are locked, `uv sync` alone gives the CPU build.
GPU ?=
TF_GROUPS = $(if $(GPU),--no-group cpu --group gpu)

setup: $(VENV)/.synced$(if $(GPU),-gpu)

$(VENV)/.synced$(if $(GPU),-gpu): pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen $(TF_GROUPS)
	@rm -f $(VENV)/.synced $(VENV)/.synced-gpu
	@touch $@

# Every dataset DAG end to end with `airflow dags test` (then the summary DAG), on a
# SQLite Airflow DB in .airflow/; results: .workspaces/<ds>/reports/, reports/summary.md,
# MLflow in mlflow/. One run's DAG conf: make run CONF='{"backbone": "vgg16"}'
run: setup
	$(PY) -m tasks.dev.airflow_local run $(if $(CONF),--conf '$(CONF)') $(SET_ARGS)

# The whole suite on TEST_WORKERS pytest-xdist processes (a module's tests stay together,
# so its fixtures are made once), measuring branch coverage of tasks/ and dags/ (the Python
# processes the tests start included): `make test` fails under COVERAGE_FLOOR percent; the
# report is reports/coverage/index.html.
TEST_WORKERS ?= 2
COVERAGE_FLOOR ?= 85
test: setup stack-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --cov --cov-report=term \
		--cov-report=html --cov-fail-under=$(COVERAGE_FLOOR) $(PYTEST_ARGS)

# The edit-run loop: every test not marked slow (no training past a tiny head, no whole
# pipeline, no server stack); pytest prints the slowest at the end. `make test` runs them all.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# PostgreSQL server binaries for the stack test (instant when already installed). A failed
# install does not stop the suite: tests/deploy fails with the reason, the rest runs.
stack-deps:
	@bash tests/deploy/install_stack_deps.sh || echo "make: stack-deps failed; only tests/deploy will fail, with the reason" >&2

# ruff, then the import contracts of pyproject.toml (the layers in docs/architecture.md).
lint: setup
	$(VENV)/bin/ruff check tasks dags tests
	$(VENV)/bin/ruff format --check tasks dags tests
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m tasks.dev.bench

# validate, train, finetune and dvc add/status/push on 5,000, 50,000 and 200,000 generated
# images: wall s, s per 1,000 images and peak RSS each; a table and reports/bench/scale.json.
# SIZES=5000 (comma-separated; 1m works on a big machine); data is kept in .bench/scale/.
# BENCH_SCALE_ARGS='--cache-budget-mb 256 --stages train,finetune --set train.epochs=2'.
SIZES ?=
BENCH_SCALE_ARGS ?=
bench-scale: setup
	$(PY) -m tasks.dev.bench_scale $(if $(SIZES),--sizes $(SIZES)) $(BENCH_SCALE_ARGS)

# images/s of feature extraction, head training and a fine-tune step per backbone, precision,
# XLA and batch size, and the projected cats/dogs pipeline time: a table and
# reports/bench/gpu.json. QUICK=1: mobilenet_v2, 96 px, batch 8 and 16 (about a minute on CPU).
bench-gpu: setup
	$(PY) -m tasks.dev.bench_gpu $(if $(QUICK),--quick)

# images/s of `python -m tasks score` (checks, embeddings, drift tests, MLflow, card) against
# image_dataset_from_directory + model.predict, same folder, same registered model; a table
# and reports/bench/score.json. BENCH_SCORE_ARGS='--images 500 --image-size 224'.
BENCH_SCORE_ARGS ?=
bench-score: setup
	$(PY) -m tasks.dev.bench_score $(BENCH_SCORE_ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache

# The scheduled experience: `airflow standalone` (api-server, scheduler, dag-processor,
# triggerer; LocalExecutor, parallelism 2) on http://127.0.0.1:$(AIRFLOW_PORT) plus the
# MLflow UI on http://127.0.0.1:5000. Log in as `admin` with the password in
# .airflow/simple_auth_manager_passwords.json.generated (printed on first start).
airflow: setup
	AIRFLOW_PORT=$(AIRFLOW_PORT) $(PY) -m tasks.dev.airflow_local standalone

# No internet, no GPU: generated archives served from 127.0.0.1, tiny params, offline
# weights, the same DAGs; everything under .demo/. Ends by printing where to look.
# DEMO_ARGS='--dataset ants_vs_bees': one dataset's DAG (and the summary) only.
DEMO_ARGS ?=
demo: setup
	$(PY) -m tasks.dev.demo $(DEMO_ARGS)

# Every recipe preset (tasks/recipes) through train -> finetune -> evaluate on one dataset,
# one comparison table (beside what each walkthrough reported) and one MLflow run; under
# .recipes/. RECIPES_ARGS='--tiny': minutes on a laptop; '--recipes a,b', '--dataset ...'.
RECIPES_ARGS ?=
recipes: setup
	$(PY) -m tasks.dev.recipes $(RECIPES_ARGS)
