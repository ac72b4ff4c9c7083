"""Prefect flows that orchestrate both stages, and the ``flows`` command."""
