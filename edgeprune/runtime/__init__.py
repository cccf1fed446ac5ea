"""Runtime: runners, pipeline, profiler, preprocessing."""
