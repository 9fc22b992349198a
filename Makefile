# Mensajero: local stack, tests and checks. Every target runs inside the uv workspace.
UV ?= uv
PYTEST_ARGS ?=

.PHONY: install run test lint fmt migrate bench

install:
	$(UV) sync --frozen

run: install
	$(UV) run python -m mensajero_common.stack

test: install
	$(UV) run pytest $(PYTEST_ARGS)

lint: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy -p mensajero_common -p mensajero_api -p mensajero_hub -p mensajero_dispatcher -p mensajero_webhooks -p mensajero_agent

fmt: install
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

migrate: install
	$(UV) run mensajero-migrate
