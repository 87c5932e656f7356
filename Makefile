# The two commands in the README:
#   make demo   install into .venv and train + label on a demo set built from package images (offline)
#   make test   install everything (pip and Debian packages) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test

.PHONY: demo test venv system-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"

system-deps:
	bash scripts/install-system-deps.sh

demo: EXTRAS = demo
demo: venv
	$(PY) examples/make_demo_set.py demo/images
	$(VENV)/bin/retrainer train --image-dir demo/images --backbone efficientnet_lite0 \
		--output-dir demo/model --bottleneck-dir demo/bottlenecks
	$(VENV)/bin/retrainer label --model-dir demo/model demo/images/*/crop_000.jpg

test: system-deps venv
	$(PY) -m pytest

bench: EXTRAS = bench
bench: venv
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf demo retrained .pytest_cache
