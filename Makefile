# serving-mfu: `make demo` runs the main job, `make test` the whole suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup test demo bench clean

# Idempotent: re-runs only when pyproject.toml or this Makefile changed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "torch==2.13.0+cpu" -e ".[cpu,dev,tools,notebook]"
	@# The registry's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` with CPU torch.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

demo: $(STAMP)
	$(BIN)/serving-mfu demo

bench: $(STAMP)
	$(BIN)/serving-mfu bench-accounting

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-results
