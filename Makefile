# Two entry points: `make demo` and `make test`. Both create .venv when missing and reuse it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test setup lint browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13 as pip finds it (a CPU wheel where pip is pointed at one), unless some torch is importable.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffaccel generate --model dit --method fora --interval 3 --compare --per-class 8 --out out/demo

# Headless Chromium for the report test (tests/test_bench.py): installed from Debian when missing and
# we are root with apt; otherwise (or if apt fails) that one test skips and says why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the report test (apt-get)"; \
		( DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		  ( timeout 300 apt-get update -q >/dev/null 2>&1 && \
		    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ) ) || \
		echo "could not install chromium; the HTML report test will skip"; \
	else echo "no chromium and no root apt-get; the HTML report test will skip"; fi

test: $(STAMP) browser
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
