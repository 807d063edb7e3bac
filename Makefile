# serving-mfu: `make demo` runs the main job, `make test` the whole suite and the docs build. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup prometheus test docs demo bench clean

# Idempotent: re-runs only when pyproject.toml or this Makefile changed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "torch==2.13.0+cpu" -e ".[cpu,dev,tools,notebook,docs]"
	@# The registry's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` with CPU torch.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# promtool and a Prometheus server: the suite checks the recording rules with both (Debian's
# package, installed when missing and apt-get is usable as root; elsewhere install it yourself).
prometheus:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's prometheus package (promtool and the server, for the rules tests)..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null) || echo "apt-get install prometheus failed: the Prometheus tests will fail"; \
	else echo "promtool/prometheus not found and apt-get not usable: install Prometheus >= 2.40 on PATH," \
	  "or set SERVING_MFU_SKIP_PROMETHEUS=1 to skip its tests"; fi

setup: $(STAMP) prometheus

test: $(STAMP) prometheus docs
	$(BIN)/python -m pytest -q --durations=15

# The docs site into build/site; strict: a broken link, anchor or reference fails the build.
docs: $(STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

demo: $(STAMP)
	$(BIN)/serving-mfu demo

bench: $(STAMP)
	$(BIN)/serving-mfu bench-accounting

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-results build
