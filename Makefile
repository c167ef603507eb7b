# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVICES ?= 2

.PHONY: install demo test docs clean

install: $(VENV)/.installed

# torchrec declares the CUDA fbgemm-gpu and pins an old torchmetrics, so it goes in without its
# dependencies; the CPU kernels come from fbgemm-gpu-cpu of the matching version.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 fbgemm-gpu-cpu==1.8.0
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	WANDB_MODE=offline $(BIN)/lightning-dembed run dlrm_synthetic_tiny --devices $(DEVICES)

test: install
	$(BIN)/python -m pytest -q tests

docs: install
	$(BIN)/pip install -q -e '.[docs]'
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site outputs wandb lightning_logs
