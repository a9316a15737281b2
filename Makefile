# Two commands do all set-up: `make demo` and `make test` create .venv and install into it when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-unit lint bench ops clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/vit-scale ops build
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vit-scale demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# DeepSpeed's JIT ops, built once into $(VENV)/torch_extensions (or TORCH_EXTENSIONS_DIR when set), so no run
# builds them or waits on another's build; install does this, run it again after changing torch or DeepSpeed.
ops: $(STAMP)
	$(BIN)/vit-scale ops build

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
