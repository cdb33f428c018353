# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Every target is idempotent; on a machine that has everything it takes seconds.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv services lint typecheck unit integration clean

demo: venv services
	$(BIN)/m365sync demo

test: venv services lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

services:
	scripts/services.sh up

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check processor subscriptions handlers crypto
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -q tests/unit

clean:
	scripts/services.sh down
	rm -rf $(VENV) .run
