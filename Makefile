# The two commands of the README:
#   make run    the main job: probe, analyse, unlearn and evaluate on the default model
#   make test   the whole test suite (unit, integration on the real default model, notebooks)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint setup

$(PY): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	@touch $(PY)

setup: $(PY)

run: $(PY)
	$(VENV)/bin/mechunlearn run $(ARGS)

test: $(PY)
	$(PY) -m ruff check mechunlearn tests benchmarks analysis
	$(PY) -m ruff format --check mechunlearn tests benchmarks analysis
	MPLBACKEND=Agg HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(PY)
	$(PY) -m ruff check --fix mechunlearn tests benchmarks analysis
	$(PY) -m ruff format mechunlearn tests benchmarks analysis
