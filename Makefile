# Two commands set everything up from nothing but Python 3.11:
#   make demo   create .venv, install, run the main job on embedded defaults
#   make test   create .venv, install, lint + format check + the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Defaults for the shell commands run from here (ray start, mlflow server, serve run) and
# the processes they start; the user's values win. The Python side keeps the same table, with
# why and where each applies, in platform/cloudburst/environment.py (apply_defaults).
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_SERVE_DEFAULT_HTTP_HOST ?= 127.0.0.1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
export AWS_EC2_METADATA_DISABLED ?= true
export AWS_DEFAULT_REGION ?= us-east-1
export NO_GCE_CHECK ?= true
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT ?= false

.PHONY: demo test lint format bench serve mlflow install clean stack-up stack-down docs

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24,<26"
	# torch alone and first, from its exact pin: a CPU machine then never pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,deploy,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check platform jobs tests benchmarks infra docs
	$(BIN)/ruff format --check platform jobs tests benchmarks infra docs

format: $(STAMP)
	$(BIN)/ruff format platform jobs tests benchmarks infra docs
	$(BIN)/ruff check --fix platform jobs tests benchmarks infra docs

test: lint
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/ensemble.py

# the ensemble endpoint on embedded defaults: http://127.0.0.1:8000 (docs/how-to/endpoint.md)
serve: $(STAMP)
	$(BIN)/serve run jobs/configs/serve.yaml

# the MLflow UI on the local store (outputs/mlflow, where jobs log without a tracking URI):
# http://127.0.0.1:$(MLFLOW_PORT). MLflow's job-execution workers (huey consumers, GenAI jobs)
# are off whatever the environment says: browsing runs and models needs none of them.
MLFLOW_PORT ?= 5000
mlflow: $(STAMP)
	@mkdir -p outputs/mlflow/artifacts
	@echo "MLflow UI on outputs/mlflow/mlflow.db at http://127.0.0.1:$(MLFLOW_PORT)," \
		"job execution off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no huey workers)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui \
		--backend-store-uri sqlite:///outputs/mlflow/mlflow.db \
		--artifacts-destination outputs/mlflow/artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

# the whole stack on loopback: Ray head + worker node, MLflow server, S3 server (moto), with
# the commands to run the jobs on it; state in outputs/stack (infra/local/stack.py --help)
stack-up: $(STAMP)
	$(BIN)/python infra/local/stack.py up $(STACK_ARGS)

stack-down:
	$(BIN)/python infra/local/stack.py down $(STACK_ARGS)

# the documentation site (mkdocs.yml, docs/) built strictly into site/: a broken link or
# reference fails; `$(BIN)/mkdocs serve` shows it while editing
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) outputs site .pytest_cache .ruff_cache
