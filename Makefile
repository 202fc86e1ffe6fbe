# The two commands of the README:
#   make run    the main job: probe, analyse, unlearn and evaluate on the default model
#   make test   the whole test suite (unit, integration on the real default model, notebooks)
VENV ?= .venv
PY := $(VENV)/bin/python
# What ruff checks and formats: the package, its tests, benchmarks, studies and notebooks.
LINTED := mechunlearn tests benchmarks analysis notebooks conftest.py

.PHONY: run test test-fast test-tl3 lint setup docs doctest

$(PY): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	@touch $(PY)

setup: $(PY)

run: $(PY)
	$(VENV)/bin/mechunlearn run $(ARGS)

test: $(PY)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(VENV)/bin/lint-imports
	MPLBACKEND=Agg HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# While developing: lint and the unit tests on tiny models, without the slow ones (a few minutes).
test-fast: $(PY)
	$(PY) -m ruff check $(LINTED)
	$(VENV)/bin/lint-imports
	MPLBACKEND=Agg HF_HUB_OFFLINE=1 $(PY) -m pytest tests/unit -m "not slow" -q $(PYTEST_ARGS)

# The unit tests (hook level, tiny models, legacy HookedTransformer included) against
# transformer-lens 3.x, the range sae-lens resolves to, in a separate environment.
TL3_VENV ?= .venv-tl3
test-tl3:
	VENV=$(TL3_VENV) TL_SPEC="transformer-lens>=3,<4" bash scripts/setup.sh
	MECHUNLEARN_EXPECT_LEGACY=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 $(TL3_VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(PY)
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

# The documentation site (docs/, mkdocs.yml) into site/: methods page and API reference from the
# docstrings. Installs the `docs` extra on first use; --strict fails on any warning.
docs: $(PY)
	@$(PY) -c "import mkdocstrings_handlers.python, material, mkdocs_jupyter" 2>/dev/null || $(PY) -m pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

# The docstring examples as doctests (~30 s), against the tiny random Llama of tests/tiny_models.py
# and two small skills (the namespace is built by the root conftest.py). Examples that read the
# benchmark files are skipped where $MECHUNLEARN_DATA (default ../shared/data) is absent; lines
# that need the real model or minutes of compute are marked +SKIP.
doctest: $(PY)
	MPLBACKEND=Agg HF_HUB_OFFLINE=1 $(PY) -m pytest --doctest-modules mechunlearn -q $(PYTEST_ARGS)
