# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Every target is idempotent; on a machine that has everything it takes seconds.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv services lint typecheck unit integration clean deploy-check helm

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
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -q tests/unit

# Helm v4 from the Go module proxy, cached outside the work tree by version (~4 min once).
helm:
	scripts/helm.sh >/dev/null

# The chart rendered and linted with its default and production values, then the manifest
# tests (chart, compose file, Dockerfile). `make test` runs the same tests whenever the
# Helm binary is cached, and skips only the chart's when it is not.
deploy-check: venv helm
	$$(scripts/helm.sh) lint --strict deploy/chart/m365sync
	$$(scripts/helm.sh) lint --strict deploy/chart/m365sync -f deploy/chart/values-production.yaml
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/deploy

clean:
	scripts/services.sh down
	rm -rf $(VENV) .run
