# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
# The CPU build of torch lies on local disk; pin it and install it FIRST so nothing pulls a CUDA build.
TORCH  ?= torch==2.13.0
# The benchmark is its own package (benchmarks/pyproject.toml, import name nps_bench); its data
# packages that must go in --no-deps are listed in benchmarks/requirements-nodeps.txt.
STAMP  := $(VENV)/.nps-installed

.PHONY: install demo test bench bench-wins bench-ablation bench-frontier bench-status clean help
help:
	@echo "make demo   - install into $(VENV) and run the embedded default on the real benchmark"
	@echo "make test   - install the dev dependencies and run the test suite"
	@echo "make bench  - regenerate BENCHMARKS.md and its figures (hours on 2 cores: the measured pieces are in README, plus bench-wins)"
	@echo "make bench-wins - only the section 'NPS that wins' (the shipped default vs magnitude and DARE)"
	@echo "make bench-ablation - only the section 'What the search is worth' (the search ablation, issue 32)"
	@echo "make bench-frontier - only the section 'The lossless frontier' (bench-wins on a keep-ratio grid down to 0.0005)"
	@echo "make bench-status - which benchmark steps are computed for the current code (runs nothing)"
	@echo "  in pieces: BUDGET=40 make bench-wins, or python -m nps_bench.run --suites text --budget 40"

$(STAMP): pyproject.toml benchmarks/pyproject.toml benchmarks/requirements-nodeps.txt Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e '.[dev,ray,llm,lm-eval]'
	$(VPY) -m pip install -q -e benchmarks
	$(VPY) -m pip install -q --no-deps -r benchmarks/requirements-nodeps.txt
	$(VPY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/nps demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m pytest -p no:cacheprovider

bench: $(STAMP)
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	$(VPY) benchmarks/bench_scale.py --json benchmarks/results/scale.json
	HF_HUB_OFFLINE=1 $(VPY) -m nps_bench.run $(if $(BUDGET),--budget $(BUDGET))
	$(MAKE) bench-wins
	$(MAKE) bench-ablation
	$(MAKE) bench-frontier

bench-wins: $(STAMP)
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	HF_HUB_OFFLINE=1 $(VPY) -m nps_bench.wins --suites text,vision,vit $(if $(BUDGET),--budget $(BUDGET)) $(WINS_ARGS)

bench-ablation: $(STAMP)
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	HF_HUB_OFFLINE=1 $(VPY) -m nps_bench.exp_search_ablation --suites text,vision,vit $(if $(BUDGET),--budget $(BUDGET)) $(ABLATION_ARGS)

bench-frontier: $(STAMP)
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	HF_HUB_OFFLINE=1 $(VPY) -m nps_bench.frontier --suites text,vision,vit,vit-long $(if $(BUDGET),--budget $(BUDGET))

bench-status: $(STAMP)
	$(VPY) -m nps_bench.status

clean:
	rm -rf $(VENV) runs build *.egg-info
