# The two commands of the README, and what they build on.
#   make demo   set up .venv (Python packages only) and run the demo
#   make test   set up .venv and the Debian packages the tests need, then lint, type-check, test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEBS := mosquitto mosquitto-clients clang lld wasi-libc libclang-rt-14-dev-wasm32 iproute2

.PHONY: demo test check bench examples system-deps clean

demo: $(VENV)/.installed
	$(BIN)/mesh demo

test: $(VENV)/.installed system-deps check
	$(BIN)/pytest

check: $(VENV)/.installed
	$(BIN)/ruff check mesh tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed system-deps
	$(BIN)/python benchmarks/runtime_bench.py
	$(BIN)/python benchmarks/mesh_bench.py
	$(BIN)/python benchmarks/broker_bench.py
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python benchmarks/lan_bench.py; \
	else echo "benchmarks/lan_bench.py needs root (network namespaces): skipped"; fi

examples: system-deps
	$(MAKE) -C examples

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

system-deps:
	@sh scripts/system-deps.sh $(DEBS)

clean:
	rm -rf $(VENV) examples/build .mypy_cache .ruff_cache .pytest_cache .hypothesis
