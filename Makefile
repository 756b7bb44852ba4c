# Everything installs from nothing into .venv: `make test` and `make demo` are enough on a fresh machine.
# Installs are reproducible: `make` installs the exact versions of constraints.txt (the lock file of
# the versions the suite last passed with; `make lock` refreshes it), while pyproject.toml keeps the
# ranges users get from pip. `make test-latest` runs the suite against the newest releases instead.
# torch is installed first, pinned, so that pip takes the CPU build available here rather than a
# multi-GB CUDA build; on a GPU machine install your own torch first and run `pip install -e .`.
# torch stays pinned (TORCH_SPEC) in every target, test-latest included.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_moe_patch-installed
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
# test-latest's venv: TORCH_SPEC plus the newest releases of everything else, rebuilt on every run.
LATEST_VENV ?= .venv-latest
# The venv `make lock` reads (after running the suite in it); LOCK_VENV=$(LATEST_VENV) adopts the newest releases.
LOCK_VENV ?= $(VENV)
PYTEST_ARGS ?= -q tests hf_moe_patch
# WordNet 3.0 (Debian's wordnet-base): real English text for the demo model and the local mteb tasks.
WORDNET_DIR ?= /usr/share/wordnet
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The key packages whose versions test-latest prints, next to the locked ones.
define SHOW_VERSIONS
import importlib.metadata as md, platform, re, sys
locked = dict(re.split(r"==", l.strip(), 1) for l in open(sys.argv[1]) if "==" in l and not l.startswith("#"))
key = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {key(n): v for n, v in locked.items()}
print(f"{'python':24} {platform.python_version()}")
for n in ["torch", "transformers", "peft", "accelerate", "datasets", "mteb", "sentence-transformers", "tokenizers", "huggingface-hub", "safetensors"]:
    v = md.version(n); l = locked.get(key(n), "-")
    print(f"{n:24} {v:14} (locked {l})" + ("" if v.split("+")[0] == l else "  <- differs"))
new = sorted((key(d.metadata["Name"]), d.version) for d in md.distributions())
diff = [f"{n} {locked.get(n, 'not locked')} -> {v}" for n, v in new if locked.get(n) != v.split("+")[0] and n != "hf-moe-patch"]
print("differs from " + sys.argv[1] + ": " + (", ".join(diff) if diff else "nothing"))
endef
export SHOW_VERSIONS

.DEFAULT_GOAL := install
.PHONY: help install wordnet test test-quick test-latest lock demo train-demo sft-compare bench clean

help:
	@echo "make install      venv .venv with the locked versions (constraints.txt), WordNet"
	@echo "make test         install, then the whole test suite (what .ci/run calls)"
	@echo "make test-quick   install, then the suite without tests marked slow (pytest -m 'not slow')"
	@echo "make test-latest  the suite in $(LATEST_VENV): $(TORCH_SPEC) and the newest releases of everything else"
	@echo "make lock         run the suite in $(LOCK_VENV), then rewrite constraints.txt from its pip freeze"
	@echo "                  (make lock LOCK_VENV=$(LATEST_VENV) adopts the versions test-latest resolved)"
	@echo "make demo         the main job on the shipped demo model (demo_out/)"
	@echo "make train-demo   rebuild the shipped demo model from nothing, over the shipped copy (~35 min on 2 CPU cores)"
	@echo "make sft-compare  the README fine-tuning comparison (~6 min on 2 CPU cores)"
	@echo "make bench        routing benchmark -> eval/benchmarks/RESULTS.md"
	@echo "make clean        remove the venvs and build outputs"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP) wordnet

wordnet:
	@[ -f $(WORDNET_DIR)/data.noun ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wordnet-base; }

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast part of the suite: tests marked @pytest.mark.slow are skipped.
test-quick: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The same suite against the newest releases (no constraints; torch stays at TORCH_SPEC, see above),
# in a separate venv rebuilt each time, so that drift shows up here before users see it.
test-latest: wordnet
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH_SPEC)" -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip check
	@$(LATEST_VENV)/bin/python -c "$$SHOW_VERSIONS" $(CONSTRAINTS)
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Rewrites constraints.txt (keeping its header) from LOCK_VENV's pip freeze, only after a green suite there.
lock: wordnet
	$(LOCK_VENV)/bin/python -m pytest $(PYTEST_ARGS)
	{ grep '^#' $(CONSTRAINTS); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable --exclude hf-moe-patch \
	  | grep -v '^#' | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@git diff --stat -- $(CONSTRAINTS) 2>/dev/null || true

demo: install
	$(PY) -m hf_moe_patch.cli demo

# Rebuilds the shipped demo model from nothing (about 30 min on 2 CPU cores).
train-demo: install
	$(PY) -m hf_moe_patch.cli train-demo --out hf_moe_patch/assets/demo-olmoe-wordnet --force

# The fine-tuning comparison of the README (demo model, WordNet-Alpaca, 6 routings; ~6 min on 2 CPU cores).
sft-compare: install
	$(PY) -m hf_moe_patch.cli sft-compare demo --max-steps 300 --logging-steps 25 --save-steps 10000 --out sft_compare

bench: $(STAMP)
	$(PY) eval/benchmarks/bench_routing.py --out eval/benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache
