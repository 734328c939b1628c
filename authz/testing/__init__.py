"""Helpers for testing meshauthz deployments (bounded load generation). Not used by the running system."""

from authz.testing.load import LOST, LoadResult, Outcome, median_latency, run_load

__all__ = ["LOST", "LoadResult", "Outcome", "median_latency", "run_load"]
