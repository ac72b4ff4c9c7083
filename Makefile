# The README's two commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# No hub, no telemetry, Prefect state kept inside the work tree.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-under-load bench lint clean vllm-env

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,dask]'
	touch $(STAMP)

# In-process vLLM experts (CUDA machines only). vLLM pins its own torch (and, 0.12.0 to 0.19.0, transformers<5), so
# it gets its own environment instead of changing .venv; run the caption stage from it: .venv-vllm/bin/flows run ...
# The dask extra comes too (--runner dask). VLLM_CONSTRAINTS=.ci/constraints-vllm-oldest.txt builds it with the oldest
# versions the extras allow.
VLLM_CONSTRAINTS ?=
vllm-env:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --quiet --upgrade pip
	.venv-vllm/bin/python -m pip install -e '.[vllm,dask]' $(if $(VLLM_CONSTRAINTS),-c $(VLLM_CONSTRAINTS))

demo: install
	$(BIN)/flows run demo

test: install
	$(BIN)/python -m pytest -q

# The suite as a busy machine meets it: two CPU-bound loops beside it (each ends by itself within the hour) and a
# fresh PREFECT_HOME, so Prefect's local server creates its database under load as on a first run.
LOAD_LOOP := import time; end = time.time() + 3600; any(iter(lambda: time.time() >= end, True))
test-under-load: install
	rm -rf $(CURDIR)/.prefect-under-load
	@$(PYTHON) -c '$(LOAD_LOOP)' & first=$$!; $(PYTHON) -c '$(LOAD_LOOP)' & second=$$!; \
	trap 'kill $$first $$second 2>/dev/null' EXIT; \
	PREFECT_HOME=$(CURDIR)/.prefect-under-load $(BIN)/python -m pytest -q

bench: install
	@for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .venv-vllm .prefect .prefect-under-load data runs
