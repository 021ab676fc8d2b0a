"""Session-wide fixtures are calibserve.testing.fixtures' (a pytest plugin pyproject loads)."""
