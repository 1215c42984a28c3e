# The project's vocabulary: `make demo`, `make test`, `make bench`, `make lint`.
# Everything runs inside $(VENV), created on first use (CI keeps it under ~/.cache).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.fastdrop-stamps

.PHONY: demo test test-rust test-python bench bench-rust bench-python lint valgrind fuzz build venv clean

$(STAMP)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	mkdir -p $(STAMP) && touch $@

# Build and run: numpy, maturin. Tests add torch (the CPU-capable PyPI build), timm, keras
# (its torch backend: the reference for noise_shape and GaussianDropout),
# scikit-learn, hypothesis and the linters.
$(STAMP)/base: $(STAMP)/venv Makefile
	$(PIP) install -q "numpy>=1.23" "maturin>=1.9,<2"
	touch $@

$(STAMP)/test: $(STAMP)/base Makefile
	$(PIP) install -q torch timm scikit-learn matplotlib "pytest>=7" pytest-timeout hypothesis ruff mypy expecttest keras
	touch $@

venv: $(STAMP)/base

# Release build of the extension, installed into the venv (incremental through target/).
build: $(STAMP)/base
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH maturin develop --release -q

demo: build
	$(PY) examples/demo.py
	$(PY) -m fastdrop bench --quick

test-rust:
	cargo test --release --quiet

test-python: $(STAMP)/test build
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

test: $(STAMP)/test test-rust test-python

bench-rust:
	cargo bench --bench kernels --bench rng

bench-python: build
	$(PY) -m fastdrop bench

bench: bench-rust bench-python

lint: $(STAMP)/test
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --features python --lib -- -D warnings
	$(VENV)/bin/ruff check python tests examples
	$(VENV)/bin/ruff format --check python tests examples
	$(VENV)/bin/mypy

# The Rust unit tests under valgrind's memcheck: no invalid read or write in the kernels.
valgrind:
	cargo test --release --lib --no-run
	valgrind --error-exitcode=1 -q $$(cargo test --release --lib --no-run --message-format=json 2>/dev/null \
		| grep -o '"executable":"[^"]*"' | head -1 | cut -d'"' -f4) --test-threads=2

clean:
	rm -rf target $(VENV)
