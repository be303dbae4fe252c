# The two commands of the README:
#   make demo   set everything up (idempotent), then `dvc repro` the pipeline on the embedded demo dataset
#   make test   set everything up, then run the test suite
# Set-up builds .venv once; it reruns only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfocus-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast benchmarks clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first: sam2 compiles against the installed torch (without build isolation, which would fetch a second torch)
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --no-build-isolation -c constraints.txt sam2
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# DVC needs a git repository and a .dvc folder; both are made here when missing (e.g. an exported tarball).
# The stages' commands call `medfocus`, so the venv's bin goes first on PATH (nobody has to activate it).
demo: setup
	git rev-parse --git-dir >/dev/null 2>&1 || git init -q
	test -d .dvc || $(BIN)/dvc init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@$(BIN)/medfocus summary --dataset demo
	@echo "report: cache/demo/report/index.html"

# One pytest worker per core; each test file stays on one worker (the dvc tests share one clone per file).
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

clean-cache:
	rm -rf cache/*/
