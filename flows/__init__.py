"""Orchestration: Prefect flows, settings and the command line."""
