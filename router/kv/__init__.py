"""vLLM KV-cache events -> the prefix index.

wire.py (vLLM's exact structs) -> decode.py (batch -> views) -> stream.py (one replica's sequence
rules and engine->router key map) -> apply.py (the one batch applier, also used offline) -> the
index. sources.py resolves where a replica publishes; subscriber.py owns the ZMQ sockets.
"""
