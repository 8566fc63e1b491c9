"""Prefill/decode disaggregation: the split decision, replica roles and the vLLM NIXL handoff."""
