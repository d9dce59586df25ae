# The README's two commands:
#   make run    set everything up, then txt2img on the embedded default model
#   make test   set everything up, then the test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a red circle on a blue background

.PHONY: setup browser run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.requirements: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# Builds ldm._C (CPU always, CUDA when a toolkit and a CUDA torch are present).
setup: $(VENV)/.requirements
	$(BIN)/pip install -q --no-build-isolation -e .

run: setup
	$(BIN)/python scripts/txt2img.py --prompt "$(PROMPT)"

# The app's browser test drives Debian's chromium and chromedriver: installed when missing
# and apt-get can (root); elsewhere that test skips, or fails under CI=true.
browser:
	@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && \
	    command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; fi

test: setup browser
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python scripts/bench_kernels.py

clean:
	rm -rf build *.egg-info ldm/_C*.so
