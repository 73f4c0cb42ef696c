"""Pieces of ``python -m dirl_min.bench``: models and measures, timing, the rows of the table."""
