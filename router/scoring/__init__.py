"""Routing policies: filters -> scorers (each in [0, 1]) -> weighted sum -> picker.

See base.py for the contracts and pipeline.py for the hot path.
"""

from .base import Filter, Picker, Scorer
from .pipeline import Pipeline
from .policies import POLICIES, Policy, build_policy

__all__ = ["POLICIES", "Filter", "Picker", "Pipeline", "Policy", "Scorer", "build_policy"]
