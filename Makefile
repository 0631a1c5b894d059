# lungnode: the two set-up commands are `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test demo bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/lungnode serve

test: install
	$(BIN)/python -m pytest

demo: install
	@test -x /usr/sbin/Orthanc || (apt-get update -q && apt-get install -y -q orthanc)
	$(BIN)/python -m lungnode.demo

bench: install
	@command -v storescu >/dev/null && test -x /usr/sbin/Orthanc || (apt-get update -q && apt-get install -y -q orthanc dcmtk)
	$(BIN)/python -m lungnode.bench

clean:
	rm -rf $(VENV) var
