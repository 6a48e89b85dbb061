# The two commands: `make test` and `make demo`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssmkit-installed

.PHONY: test demo bench bench-gpu clean

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
	$(PY) bench/scan.py
	$(PY) bench/scan2d.py
	$(PY) bench/vision.py

bench-gpu: $(STAMP)
	$(PY) bench/scan_gpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
