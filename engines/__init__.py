"""The engine side: a simulated vLLM engine and recipes for real vLLM (+LMCache) replicas."""
