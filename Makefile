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
	@# x86-64 Linux takes onnxruntime-openvino in place of onnxruntime (both install the module
	@# onnxruntime): an older venv's plain build goes first, or the two would overwrite each other.
	@if [ "$$(uname -sm)" = "Linux x86_64" ] && $(BIN)/pip show -q onnxruntime 2>/dev/null; then \
		$(BIN)/pip uninstall -q -y onnxruntime onnxruntime-ep-openvino onnxruntime-openvino; fi
	$(BIN)/pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/lungnode serve

# The FHIR test server (Medplum's FHIR engine, tests/fhir_server): from npm when npm is here; its tests
# skip with the reason otherwise.
FHIR_SERVER := tests/fhir_server/node_modules/.installed
$(FHIR_SERVER): tests/fhir_server/package.json
	@if command -v npm >/dev/null; then npm install --prefix tests/fhir_server --no-audit --no-fund -s && touch $@; \
	else echo "npm not found: the FHIR delivery tests will be skipped"; fi

test: install $(FHIR_SERVER)
	$(BIN)/python -m pytest

demo: install
	@test -x /usr/sbin/Orthanc || (apt-get update -q && apt-get install -y -q orthanc)
	$(BIN)/python -m lungnode.demo

bench: install
	@command -v storescu >/dev/null && test -x /usr/sbin/Orthanc || (apt-get update -q && apt-get install -y -q orthanc dcmtk)
	$(BIN)/python -m lungnode.bench

clean:
	rm -rf $(VENV) var tests/fhir_server/node_modules
