"""Fixtures for flow tests: ``prefect_server``, ``demo`` and ``analysed_demo`` live in
``tests/conftest.py`` (session-scoped, shared with the database and report tests)."""
