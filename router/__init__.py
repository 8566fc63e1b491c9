"""kvrouter: a cache-aware request router for vLLM (+LMCache) fleets."""

__version__ = "0.1.0"
