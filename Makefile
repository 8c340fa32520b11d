# Two entry points on a fresh machine (Python 3.11):
#   make run    install, then run every notebook under the quick preset on real data
#   make test   install, then run the unit tests, the nbval notebook checks and a smoke run
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= quick

STAMP := $(VENV)/.installed

# medmnist only supplies download addresses and checksums. Its declared torchvision dependency
# does not match the pinned torch, so it is installed without dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps medmnist==3.0.2
	touch $(STAMP)

.PHONY: install run test
install: $(STAMP)

run: install
	$(BIN)/python -m fcre_utils run --preset $(PRESET)

test: install
	$(BIN)/python -m pytest
