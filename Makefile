# Set-up and entry points. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, pinned by constraints.txt to the CPU wheel on disk; then the package and its extras.
$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[dev,deepspeed]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/advcap demo --out runs/demo

# tests/install-slurm.sh: Debian's SLURM + munge for the SLURM tests (a no-op once installed).
# Two workers: most tests run in one single-threaded process, so one worker would leave a core idle;
# --dist loadfile keeps each file's tests (and its module-wide fixtures) on one worker.
test: install
	sh tests/install-slurm.sh
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: install
	$(PY) bench/loader.py

clean:
	rm -rf $(VENV) build *.egg-info
