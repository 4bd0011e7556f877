# The two set-up commands (README): each creates and fills the virtual environment on first use.
#   make demo   the main job on the embedded phantom (configs/arterial.py:demo)
#   make test   the test suite (what CI runs: .ci/run)
# Other targets: `make venv` (the environment alone), `make clean-venv`. VENV=DIR picks another environment folder
# (CI uses a fresh .ci-venv); PYTHON=python3.12 another interpreter (3.11 or newer).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written once the environment holds requirements.txt (pinned by constraints.txt) and the editable package.
STAMP := $(VENV)/.vcect-installed

.PHONY: demo test venv clean-venv

demo: $(STAMP)
	$(BIN)/python -m vcect_jax.main --config=configs/arterial.py:demo --workdir=workdir/demo_arterial

test: $(STAMP)
	$(BIN)/python -m pytest -q

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vcect-jax needs Python 3.11 or newer: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# Optional: oneDNN convolutions for CPU (vcect_jax/cpu_kernels), when oneDNN 2.x is installed (libdnnl-dev).
	$(BIN)/python -m vcect_jax.cpu_kernels.build --if_possible
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
