.PHONY: lint typecheck contracts test check

lint:
	ruff check .

typecheck:
	mypy

# The import contracts in pyproject.toml ([tool.importlinter]): layers, the pure scaling core,
# one module per provider/engine, simulated clouds kept out of the service.
contracts:
	lint-imports

test:
	python -m pytest

# The README's test command, what CI runs: ruff, mypy (strict), import contracts, then the
# whole suite.
check: lint typecheck contracts test
