# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is installed first and pinned: on a CPU machine torch==2.13.0 is the CPU wheel, while an
# open range would pull several GB of CUDA packages. GPU users: see README "GPU install".
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/hf-otselect select --config configs/demo.yaml overwrite=true

# Two pytest workers, each test file on one (its module fixtures are built once): most of the
# suite's time is single-threaded (interpreter starts, torchrun launches, imports), so the second
# core was idle. 1,100 tests: 18 min serial, 13 min this way on the 2-core machine.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) demo_output
