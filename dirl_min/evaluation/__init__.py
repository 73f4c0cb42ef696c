"""Evaluation on math benchmarks: benchmark files, decoding and scoring, shards and resume, reports."""
