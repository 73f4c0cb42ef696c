"""Moved to :mod:`dirl_min.evaluation.benchmarks`; this name stays importable for now."""

from dirl_min.evaluation.benchmarks import (  # noqa: F401
    BENCHMARKS, CACHE_ENV, HUB_SOURCES, OFFLINE_ENVS, PROBE_TIMEOUT_S, HubError, HubSource, cache_dir, fetch,
    hub_unreachable, to_records)

__all__ = ["HubSource", "HUB_SOURCES", "BENCHMARKS", "HubError", "cache_dir", "to_records", "hub_unreachable",
           "fetch", "CACHE_ENV", "OFFLINE_ENVS", "PROBE_TIMEOUT_S"]
