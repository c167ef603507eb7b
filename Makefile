# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVICES ?= 2

.PHONY: install demo test lint docs clean

# Where torch's CPU build comes from. Empty: the configured index (a mirror with the CPU wheels);
# outside one, `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` (PyPI's torch is the CUDA build).
TORCH_INDEX ?=

install: $(VENV)/.installed

# The [cpu] extra pins torch and fbgemm-gpu-cpu of one release train; torchrec declares the CUDA
# fbgemm-gpu and pins an old torchmetrics, so it goes in without its dependencies.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[cpu,test]'
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	touch $@

demo: install
	WANDB_MODE=offline $(BIN)/lightning-dembed run dlrm_synthetic_tiny --devices $(DEVICES)

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

lint: install
	$(BIN)/pip install -q -e '.[lint]'
	$(BIN)/ruff check src tests benchmarks examples

# The site, built strictly; tests/unit/test_docs.py also checks every mermaid diagram became one
# and every benchmark figure is the plot of a results file.
docs: install
	$(BIN)/pip install -q -e '.[docs]'
	$(BIN)/python -m pytest -q tests/unit/test_docs.py
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site outputs wandb lightning_logs
