"""Agent sessions: who a request belongs to, where that session's KV lives, and for how long.

* ``identity``: the session key and agent hints a client sends (headers, Dynamo ``nvext``, a
  configurable field), and the body the engine gets (hints it would reject stripped).
* ``table``: the bounded session table (LRU + idle TTL) and continuity inference for clients that
  send no key.
* ``survival``: how much of a paused session's KV its home replica probably still holds.
* ``tracker``: the glue the Router calls: annotate a request with its session's home before the
  policy runs (the lookup travels on ``RequestInfo``), record the placement after dispatch.

The placement itself is a pure scorer, ``router/scoring/session.py``.
"""

from .identity import SessionHints, extract_hints, rewrite_body
from .table import Session, SessionTable
from .tracker import SessionTracker

__all__ = ["Session", "SessionHints", "SessionTable", "SessionTracker", "extract_hints", "rewrite_body"]
