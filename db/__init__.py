"""Provenance store: SQLModel tables, engines, migrations and queries."""
