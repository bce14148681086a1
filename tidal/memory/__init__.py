"""Memory: hardware probes (and, later, tracing, estimates and the planner)."""
