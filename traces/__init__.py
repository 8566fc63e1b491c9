"""Trace-replay evaluation: loaders, generators, live replay, offline simulation, reports."""
