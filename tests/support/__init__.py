"""Helpers shared by the tests (importable as ``support`` with tests/ on the path)."""
