.PHONY: lint typecheck test check

lint:
	ruff check .

typecheck:
	mypy

test:
	python -m pytest

# The README's test command: lint, then the whole suite.
check: lint test
