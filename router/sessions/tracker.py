"""The Router's session glue: annotate a request with its session's home, record where it went.

Scorers are pure functions of the request and the replica snapshots, so the session table lives
here and its answer travels on the request (``RequestInfo.session_home`` / ``session_keep``):

* ``annotate`` (at selection, after the index match): the session key (sent, or inferred from the
  prefix), its home's slot, and the fraction of the session's last prompt the home still holds:
  **measured** when the home publishes KV events (the index match on that replica is what the
  engine reported), else **estimated** from the home's cache turnover during the pause
  (survival.py); and the share of this prompt that extends the session's last one
  (``session_overlap``, 0 when it does not: a key that is a user, not a conversation).
* A key this router has never seen (another router replica served the earlier turns) takes as
  home the replica whose KV-event view holds most of the prompt: every router replica sees the
  same events, so they agree without talking to each other. A new session (no such replica) is
  placed by rendezvous hashing of its key in the scorer, which every router computes alike.
* ``record`` (at dispatch): home, prompt blocks, tail block (for continuity inference) and the
  home's turnover mark.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..replicas.registry import Replica
from ..types import BlockHash, KeyMode, RequestInfo
from .survival import TurnoverMeter, surviving_fraction
from .table import SessionTable

NEW = -1  # session_home: a session with no home yet (placed by rendezvous hashing)
HOMELESS = -2  # session_home: a known session whose home left the candidates (placed by prefix)
ADOPT_FRACTION = 0.5  # an unknown key adopts the replica holding at least this much of its prompt


def continuation(hashes: Sequence[BlockHash], last_blocks: int, last_tail: BlockHash | None) -> float:
    """Share of this prompt that is the session's last prompt, 0 when it does not extend it.

    Chained block hashes make the test exact and O(1): the prompt extends the last one iff its
    block at the last prompt's tail position is that tail. A key whose requests share a prefix
    but do not extend each other (a *user* id on single-turn requests) scores 0: its shared
    part is what the prefix scorers already price.
    """
    n = len(hashes)
    if last_tail is None or not 0 < last_blocks <= n or hashes[last_blocks - 1] != last_tail:
        return 0.0
    return last_blocks / n


class SessionTracker:
    def __init__(self, *, capacity: int = 100_000, idle_ttl_s: float = 3600.0, infer: bool = False) -> None:
        self.table = SessionTable(capacity, idle_ttl_s)
        self.meter = TurnoverMeter()
        self.infer = infer

    def annotate(self, req: RequestInfo, candidates: Sequence[Replica]) -> None:
        table = self.table
        now = req.now
        if req.session_id is None:
            if not self.infer or not req.block_hashes:
                return
            s = table.infer(req.block_hashes, now)
            if s is None:
                return  # a first turn without a key: nothing to say (no rendezvous either)
            req.session_id = s.key
        else:
            s = table.get(req.session_id, now)
        if s is None or s.home is None:
            req.session_home, req.session_keep = self._adopt(req, candidates)
            return
        home = next((r for r in candidates if r.id == s.home), None)
        if home is None:
            req.session_home = HOMELESS
            return
        req.session_home = home.slot
        gpu = req.gpu_blocks
        if home.has_kv_events and req.key_mode is KeyMode.TOKENS and home.slot < len(gpu):
            # Measured: what the home holds beyond what the best other replica holds (the shared
            # system prompt and tools are no reason to stay), over the session's own part.
            held = gpu[home.slot]
            floor = max((gpu[r.slot] for r in candidates if r is not home and r.slot < len(gpu)), default=0)
            own = s.blocks - floor
            req.session_keep = min(1.0, (held - floor) / own) if own > 0 and held > floor else 0.0
        else:
            written = self.meter.written(home.id) - s.turnover_mark
            req.session_keep = surviving_fraction(written, s.blocks, home.num_gpu_blocks or 0)
        req.session_overlap = continuation(req.block_hashes, s.blocks, s.tail)

    @staticmethod
    def _adopt(req: RequestInfo, candidates: Sequence[Replica]) -> tuple[int, float]:
        total = len(req.block_hashes)
        gpu = req.gpu_blocks
        if not total or not gpu:
            return NEW, 0.0
        best: Replica | None = None
        held = second = 0
        for r in candidates:
            g = gpu[r.slot] if r.slot < len(gpu) else 0
            if r.has_kv_events and g > held:
                best, held, second = r, g, held
            elif g > second:
                second = g
        # Only a replica that holds more than any other (the session's own turns, not the shared
        # system prompt every replica has) is evidence of where the session lives.
        if best is None or held < ADOPT_FRACTION * total or held <= second:
            return NEW, 0.0
        return best.slot, (held - second) / (total - second)

    def record(self, req: RequestInfo, replica: Replica) -> None:
        """After dispatch: the session's turn now lives on ``replica``."""
        hashes = req.block_hashes
        key = req.session_id
        if key is None:
            if not self.infer or not hashes:
                return
            key = f"~{hashes[-1] & 0xFFFFFFFFFFFFFFFF:016x}"  # inferred: named by its first tail
        s = self.table.touch(key, req.now, inferred=req.session_id is None)
        req.session_id = key
        s.home = replica.id
        s.blocks = len(hashes)
        s.turns += 1
        s.turnover_mark = self.meter.add(replica.id, self.blocks_written(req, replica))
        self.table.set_tail(s, hashes[-1] if hashes else None)

    @staticmethod
    def blocks_written(req: RequestInfo, replica: Replica) -> float:
        """Blocks this request makes the replica write: its uncached prompt plus its output."""
        bs = req.block_size or 1
        s = replica.slot
        cached = req.gpu_blocks[s] if s < len(req.gpu_blocks) else 0
        prompt_blocks = len(req.block_hashes) or req.prompt_tokens / bs
        return max(0.0, prompt_blocks - cached) + req.max_tokens / bs

    def close(self, key: str) -> bool:
        return self.table.close(key)
