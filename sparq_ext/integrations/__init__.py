"""Integrations of SparQ attention with model libraries (optional dependencies)."""
