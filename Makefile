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

.PHONY: demo test lint format bench serve install clean stack-up stack-down

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24,<26"
	# torch alone and first, from its exact pin: a CPU machine then never pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,deploy]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check platform jobs tests benchmarks infra
	$(BIN)/ruff format --check platform jobs tests benchmarks infra

format: $(STAMP)
	$(BIN)/ruff format platform jobs tests benchmarks infra
	$(BIN)/ruff check --fix platform jobs tests benchmarks infra

test: lint
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/ensemble.py

# the ensemble endpoint on embedded defaults: http://127.0.0.1:8000 (see README)
serve: $(STAMP)
	$(BIN)/serve run jobs/configs/serve.yaml

# the whole stack on loopback: Ray head + worker node, MLflow server, S3 server (moto), with
# the commands to run the jobs on it; state in outputs/stack (infra/local/stack.py --help)
stack-up: $(STAMP)
	$(BIN)/python infra/local/stack.py up $(STACK_ARGS)

stack-down:
	$(BIN)/python infra/local/stack.py down $(STACK_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
