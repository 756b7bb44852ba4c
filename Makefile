# Everything installs from nothing into .venv: `make test` and `make demo` are enough on a fresh machine.
# torch is installed first, pinned, so that pip takes the CPU build available here rather than a
# multi-GB CUDA build; on a GPU machine install your own torch first and run `pip install -e .`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_moe_patch-installed
TORCH_SPEC ?= torch==2.13.0
# WordNet 3.0 (Debian's wordnet-base): real English text for the demo model and the local mteb tasks.
WORDNET_DIR ?= /usr/share/wordnet
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install wordnet test demo train-demo sft-compare bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP) wordnet

wordnet:
	@[ -f $(WORDNET_DIR)/data.noun ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wordnet-base; }

test: install
	$(PY) -m pytest -q tests hf_moe_patch

demo: install
	$(PY) -m hf_moe_patch.cli demo

# Rebuilds the shipped demo model from nothing (about 30 min on 2 CPU cores).
train-demo: install
	$(PY) -m hf_moe_patch.cli train-demo

# The fine-tuning comparison of the README (demo model, WordNet-Alpaca, 6 routings; ~6 min on 2 CPU cores).
sft-compare: install
	$(PY) -m hf_moe_patch.cli sft-compare demo --max-steps 300 --logging-steps 25 --save-steps 10000 --out sft_compare

bench: $(STAMP)
	$(PY) benchmarks/bench_routing.py --out benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
