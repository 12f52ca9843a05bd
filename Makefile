PY ?= python3

.PHONY: setup train pretrain test lint docs bench cuda-compile sanitize
setup:
	bash scripts/setup.sh

train: setup
	$(PY) -m kvpo.train

pretrain: setup
	$(PY) -m kvpo.pretrain

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mkdocs build --strict --quiet -d build/site
	$(PY) -m pytest tests -q -ra

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

docs:
	$(PY) -m mkdocs build --strict -d build/site

bench:
	$(PY) -m pytest benchmarks -q --benchmark-columns=min,median,mean,rounds

cuda-compile:
	cmake -S . -B build/cuda-only -DKVPO_CUDA_ONLY=ON && cmake --build build/cuda-only -j 2

# the CPU kernels built with AddressSanitizer + UBSan, under their tests (tests/kernels/test_sanitizers.py)
sanitize:
	$(PY) -m pytest tests/kernels/test_sanitizers.py -q
