"""The router's KV-event wire schema, as the simulator uses it: the one place engines/ imports it.

The dependency rule is "engines import only router's wire schemas"; every sim module takes these
names from here, so a move of the router module is a one-line change.
"""

from router.kv.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    KVEvent,
    encode_batch,
    publisher_binds,
    seq_bytes,
)

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineHash",
    "KVEvent",
    "encode_batch",
    "publisher_binds",
    "seq_bytes",
]
