"""Parallel layouts: the topology and the parallel plans applied on it."""
