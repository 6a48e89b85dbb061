# The two commands: `make test` and `make demo`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssmkit-installed

.PHONY: test test-gpu demo bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/ssmkit demo

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/scan.py
	$(PY) bench/scan2d.py
	$(PY) bench/vision.py
	$(PY) bench/ssd.py

# On a machine with a CUDA GPU: the GPU-only tests, then the GPU benchmarks of every domain.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -rfEs

bench-gpu: $(STAMP)
	$(PY) bench/scan_gpu.py
	$(PY) bench/scan.py --device cuda
	$(PY) bench/scan2d.py --device cuda --full
	$(PY) bench/vision.py --device cuda
	$(PY) bench/audio.py --device cuda
	$(PY) bench/dna.py --device cuda
	$(PY) bench/mil.py --device cuda

clean:
	rm -rf $(VENV) runs .pytest_cache
