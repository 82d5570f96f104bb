.PHONY: lint typecheck test check

lint:
	ruff check src tests bench

typecheck:
	mypy

test:
	python -m pytest

# The README's test command: lint, then the whole suite.
check: lint test
