# Two commands on a fresh machine:  `make run`  and  `make test`.
# Both create .venv and install what is missing first (torch==2.13.0 before anything else,
# so no unpinned torch pulls CUDA packages).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fedlowrank demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/server_step.py
	$(BIN)/python benchmarks/wire.py

clean:
	rm -rf $(VENV)
