# Two entry points (see README): `make demo` and `make test` (lint + tests, what CI runs).
# Both create .venv from the repo's own files on first use.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint shards profile profile-dict shards-smollm2 profile-smollm2 additive plan-bert fleet bench clean

$(STAMP): pyproject.toml requirements-nodeps.txt runtime/schemes/groupmv.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The main job, end to end on this machine (~2 min): build the shard store, calibrate this
# machine's compute in the pipelined runtime with storage emulated at 200 MB/s (accepting
# out-of-sample errors up to 10 %: this VM's speed moves 10-20 % run to run), solve the
# default MiniLM scenario on that device, verify the plan, run it on the real model with
# the three classic strategies beside it, and print predicted vs measured per stage.
demo: $(STAMP)
	@mkdir -p out
	$(BIN)/elasticplan shard
	$(BIN)/elasticplan calibrate --storage-mb-s 200 --max-error-pct 10
	$(BIN)/elasticplan solve build/calibrated/scenario.yaml -o out/minilm-this-machine.plan.json
	$(BIN)/elasticplan verify out/minilm-this-machine.plan.json
	$(BIN)/elasticplan run out/minilm-this-machine.plan.json --baselines \
		--json out/minilm-this-machine.run.json --gantt out/minilm-this-machine.png

# A BERT-base plan for the phone (planner only: there is no BERT-base shard store).
plan-bert: $(STAMP)
	@mkdir -p out
	$(BIN)/elasticplan solve problems/scenarios/bert-base-phone.yaml -o out/bert-base-phone.plan.json
	$(BIN)/elasticplan verify out/bert-base-phone.plan.json

# Every shipped device x the model zoo x a target grid, on a local process pool (~3 min
# on 2 cores): results, plan tables and a report in out/fleet.
fleet: $(STAMP)
	$(BIN)/elasticplan fleet problems/fleets/example.yaml -o out/fleet

# The real model: shard stores (build/shards/minilm-l6, ~10 s; the dictionary scheme's
# build/shards/minilm-l6-dict, ~2 min) and the measured profile
# (problems/models/minilm-l6.yaml, ~5.5 min on 2 cores; cached in build/profile, resumable).
shards: $(STAMP)
	$(BIN)/elasticplan shard
	$(BIN)/elasticplan shard --scheme dict --out build/shards/minilm-l6-dict

profile: shards
	$(BIN)/elasticplan profile

# The dictionary store's profile (problems/models/minilm-l6-dict.yaml, ~6.5 min).
profile-dict: shards
	$(BIN)/elasticplan profile --store build/shards/minilm-l6-dict \
		--out problems/models/minilm-l6-dict.yaml

# SmolLM2-135M from its packaged GGUF in the group scheme (build/shards/smollm2-135m-group,
# ~30 s; its layers and table at the file's own precision) and its profile
# (problems/models/smollm2-135m-group.yaml, ~9 min: variants equal to fp32 are not run).
shards-smollm2: $(STAMP)
	$(BIN)/elasticplan shard --model smollm2-135m --scheme group

profile-smollm2: shards-smollm2
	$(BIN)/elasticplan profile --store build/shards/smollm2-135m-group \
		--out problems/models/smollm2-135m-group.yaml --texts 8 --max-tokens 16

# Does the planner's additive importance predict the real submodels? (~4.5 min)
additive: shards
	@mkdir -p out
	$(BIN)/python -m runtime.profiling.additive --json out/additive.json

# Every benchmark, from a fresh calibration (~65 min on 2 cores, summed from the parts in docs/results.md). Each prints its table
# (kept in out/bench/NAME.txt) and writes its CSV and plots to out/bench/.
bench_run = set -o pipefail; $(BIN)/python -m benchmarks.$(1) $(2) 2>&1 | tee out/bench/$(1).txt

bench: shards
	rm -rf build/bench
	@mkdir -p out/bench
	$(call bench_run,compute_layout)
	$(call bench_run,runtime_baselines)
	$(call bench_run,prediction)
	$(call bench_run,plan_quality)
	$(call bench_run,quant_schemes)
	$(call bench_run,frontier)
	$(call bench_run,solver_speed,--time-limit 10)
	$(call bench_run,fleet)

# The linter (ruff, pinned in pyproject.toml; rules in [tool.ruff]) runs before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out build/calibrated .hypothesis .pytest_cache
