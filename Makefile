# Two entry points on a fresh clone: `make demo` and `make test`.
# Both create .venv and install what they need; the CPU torch 2.13.0 on this
# machine's disk is pinned first so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean chromium

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=23" "setuptools>=64" wheel
	$(BIN)/pip install "$(TORCH_PIN)"
	$(BIN)/pip install --no-build-isolation -e ".[test,ptune,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/glm-kernels demo

# tests/test_serve_web.py drives the web chat page in Debian's chromium (not a browser Playwright downloads) and
# fails without it: install it when missing, which needs root; otherwise say how. A CJK font makes the
# screenshot it saves (tests/artifacts/web_chat.png) show the model's Chinese instead of empty boxes.
BROWSER_PACKAGES := chromium fonts-wqy-zenhei
chromium:
	@( (command -v chromium || command -v chromium-browser) && fc-list :lang=zh | grep -q . ) >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y $(BROWSER_PACKAGES) || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(BROWSER_PACKAGES)); \
	else echo "tests/test_serve_web.py needs chromium: run 'apt-get install $(BROWSER_PACKAGES)' as root" >&2; fi

test: $(STAMP) chromium
	$(BIN)/python -m pytest tests -q

# Merges the run into benchmarks/results/<device>.json/.csv and plots <device>.png; README tables:
# `glm-kernels bench-table --update README.md`. BENCH_ARGS: e.g. -k rope --bench-note "what else ran".
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only --bench-results benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
