"""Latency benchmarks: ``edgeprune bench`` sweeps (runner), the analytic FLOPs model (flops), the results
document (results), reports (report) and what is recorded about the machine (system)."""
