# Mensajero: local stack, tests and checks. Every target runs inside the uv workspace.
UV ?= uv
PYTEST_ARGS ?=
# Test processes of `make test` (pytest-xdist); each has its own database.
TEST_WORKERS ?= 2

.PHONY: install run test lint fmt migrate bench

# Compiles the installed packages' bytecode up front: where PYTHONDONTWRITEBYTECODE is
# set, every process (each service of every end-to-end test) would compile them again.
install:
	$(UV) sync --frozen --compile-bytecode

run: install
	$(UV) run python -m mensajero_common.stack

test: install
	$(UV) run pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy -p mensajero_common -p mensajero_api -p mensajero_hub -p mensajero_dispatcher -p mensajero_webhooks -p mensajero_agent

fmt: install
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

migrate: install
	$(UV) run mensajero-migrate

# Benchmark of the real stack against raw baselines measured in the same run; not part of
# CI. BENCH_MODE=quick (the default) or full; results in bench/results/, the recorded
# table in docs/benchmarks.md.
bench: install
	BENCH_MODE=$${BENCH_MODE:-quick} $(UV) run python -m bench.run

# A longer fuzzing run than the one in `make test`: FUZZ_EXAMPLES requests per API
# operation and generation mode, with a new random seed each run.
FUZZ_EXAMPLES ?= 100

.PHONY: fuzz

fuzz: install
	MENSAJERO_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) MENSAJERO_FUZZ_SEED=random \
		$(UV) run pytest tests/test_fuzz_openapi.py -s --timeout 3600 $(PYTEST_ARGS)

# The fault tests at full scale: 500 messages over 20 simulated phones per case, crashes
# of each service, Redis wiped, Postgres cut off, and the webhook-sender crash that
# `make test` skips. Each case prints a table (sent, delivered, failed, lost,
# duplicated, time to drain).
.PHONY: faults

faults: install
	MENSAJERO_FAULT_SCALE=full $(UV) run pytest tests/test_faults.py -s --timeout 600 $(PYTEST_ARGS)

# Deployment files. `check-deploy` runs their offline checks (deploy/check.sh: Compose
# schema, hadolint, each image's package installed from the lock file, the Kubernetes
# overlays rendered and validated) and the tests that tie them to the code. `up` and `down`
# run deploy/compose.yaml, which serves the API and the device WebSocket on
# MENSAJERO_HTTP_PORT (default 8080).
COMPOSE ?= docker compose -f deploy/compose.yaml

.PHONY: check-deploy up down

check-deploy: install
	UV="$(UV)" bash deploy/check.sh
	$(UV) run pytest tests/test_deploy_static.py

up:
	$(COMPOSE) up --build --detach

down:
	$(COMPOSE) down
