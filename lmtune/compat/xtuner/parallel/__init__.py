"""Parallelism beyond data parallel. Only the names XTuner configs import live here."""
