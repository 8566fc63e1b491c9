"""Trace loaders: Mooncake JSONL, Qwen Bailian JSONL, Azure LLM inference CSV, kvrouter JSONL.

``load_trace(path)`` detects the format from the first non-blank line (``fmt`` overrides):

- ``kvrouter``: our own JSONL. A header line ``{"kvrouter_trace": 1, "block_tokens": ..., ...}``
  followed by one ``TraceRequest`` per line (field names as in ``traces.model``).
- ``qwen``: a JSON object with ``chat_id`` (Alibaba Qwen Bailian traces): ``timestamp`` in
  seconds, ``parent_chat_id`` (-1 for a root), ``turn``, ``type``, ``hash_ids`` of 16-token blocks.
- ``mooncake``: a JSON object with ``hash_ids`` and ``timestamp`` in milliseconds, 512-token blocks;
  optional ``session_id`` (string or integer) and ``turn`` fields (kvrouter's agentic traces) are
  kept, so plain Mooncake files and session-tagged ones load alike.
- ``azure``: a CSV header naming ``TIMESTAMP`` and ``ContextTokens`` (Splitwise / Azure LLM
  inference 2023): absolute datetimes with 7 fractional digits, no prefix information.

Every line is decoded by a module-level ``msgspec`` decoder into a typed view struct, which is
what makes the 12k-line Mooncake conversation trace load in about 0.1 s. A line that fails is
never dropped silently: it is counted in the ``LoadReport`` with its line number and reason
(the first ``max_errors`` kept verbatim), or, with ``strict=True``, raises ``TraceFormatError``
naming ``file:line``. Lines that load but look inconsistent (more block ids than the prompt
needs) are kept and counted as warnings.

Requests come out sorted by ``(timestamp, file order)`` and rebased so the first is at 0 s.
"""

from __future__ import annotations

import csv
import io
import math
import os
from calendar import timegm
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Literal, TypeVar

import msgspec

from .model import MOONCAKE_BLOCK_TOKENS, NO_PREFIX_INFO, QWEN_BLOCK_TOKENS, Trace, TraceRequest

TraceFormat = Literal["mooncake", "qwen", "azure", "kvrouter"]
FORMATS: tuple[TraceFormat, ...] = ("mooncake", "qwen", "azure", "kvrouter")
KVROUTER_TRACE_VERSION = 1

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class TraceFormatError(ValueError):
    """A trace file (or one of its lines, in strict mode) cannot be read. ``str()`` names file:line."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class LineIssue(msgspec.Struct, frozen=True):
    line: int  # 1-based line number in the file
    reason: str


class LoadReport(msgspec.Struct, kw_only=True):
    """What happened while loading: counts, plus the first ``max_errors`` issues of each kind."""

    path: str
    format: str
    lines: int = 0  # lines read, header and blanks included
    loaded: int = 0
    blank: int = 0
    bad: int = 0  # lines skipped because they could not be decoded
    warned: int = 0  # lines loaded but inconsistent
    errors: list[LineIssue] = []
    warnings: list[LineIssue] = []
    max_errors: int = 20

    @property
    def ok(self) -> bool:
        return self.bad == 0

    def summary(self) -> str:
        out = [f"{self.path}: {self.format}, {self.loaded} requests from {self.lines} lines"]
        if self.bad:
            out.append(f"{self.bad} bad lines skipped")
        if self.warned:
            out.append(f"{self.warned} lines with warnings")
        return ", ".join(out)


# --- line views: only the fields we use are decoded, with their constraints ---------------------


class _MooncakeLine(msgspec.Struct, frozen=True):
    timestamp: NonNegFloat  # milliseconds
    input_length: NonNeg
    output_length: NonNeg
    hash_ids: tuple[int, ...]
    # Extensions (absent in the published Mooncake traces): which agent/chat session a request
    # belongs to and its 1-based turn, so replay can send x-session-id and routers can stick.
    session_id: str | int | None = None
    turn: int | None = None
    request_id: str | None = None
    parent_id: str | None = None


class _QwenLine(msgspec.Struct, frozen=True):
    chat_id: int | str
    timestamp: NonNegFloat  # seconds
    input_length: NonNeg
    output_length: NonNeg
    hash_ids: tuple[int, ...] = ()
    parent_chat_id: int | str = -1
    turn: int | None = None
    type: str | None = None


class _KvrouterHeader(msgspec.Struct, frozen=True):
    kvrouter_trace: int
    block_tokens: NonNeg
    name: str | None = None
    meta: dict[str, str | int | float | bool | None] = {}


class _KvrouterLine(msgspec.Struct, frozen=True, kw_only=True):
    timestamp_s: NonNegFloat
    input_length: NonNeg
    output_length: NonNeg
    hash_ids: tuple[int, ...] = ()
    request_id: str
    session_id: str | None = None
    parent_id: str | None = None
    turn: int | None = None
    kind: str | None = None


_mooncake_dec = msgspec.json.Decoder(_MooncakeLine)
_qwen_dec = msgspec.json.Decoder(_QwenLine)
_kv_header_dec = msgspec.json.Decoder(_KvrouterHeader)
_kv_line_dec = msgspec.json.Decoder(_KvrouterLine)
_any_dec = msgspec.json.Decoder()
_Row = TypeVar("_Row")
_encoder = msgspec.json.Encoder()


# --- detection ----------------------------------------------------------------------------------


def detect_format(first_line: bytes) -> TraceFormat | None:
    """The format a file's first non-blank line announces, or None if it is none of ours."""
    text = first_line.strip()
    if text.startswith(b"{"):
        try:
            obj = _any_dec.decode(text)
        except msgspec.DecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        if "kvrouter_trace" in obj or "timestamp_s" in obj:
            return "kvrouter"
        if "chat_id" in obj:
            return "qwen"
        if "hash_ids" in obj and "timestamp" in obj:
            return "mooncake"
        return None
    header = text.decode("utf-8", "replace")
    if "TIMESTAMP" in header and "ContextTokens" in header:
        return "azure"
    return None


def _first_line(data: bytes) -> bytes:
    for line in data.splitlines():
        if line.strip():
            return line
    return b""


# --- loading ------------------------------------------------------------------------------------


def load_trace(
    path: str | os.PathLike[str],
    fmt: TraceFormat | Literal["auto"] = "auto",
    *,
    strict: bool = False,
    max_errors: int = 20,
    name: str | None = None,
) -> tuple[Trace, LoadReport]:
    """Load a trace file; return the trace and what was skipped or suspicious.

    ``strict`` raises ``TraceFormatError`` at the first bad line instead of skipping it.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TraceFormatError(p, None, f"cannot read: {exc.strerror or exc}") from exc
    return parse_trace(data, p, fmt, strict=strict, max_errors=max_errors, name=name)


def parse_trace(
    data: bytes,
    path: str = "<bytes>",
    fmt: TraceFormat | Literal["auto"] = "auto",
    *,
    strict: bool = False,
    max_errors: int = 20,
    name: str | None = None,
) -> tuple[Trace, LoadReport]:
    """``load_trace`` on bytes already in memory (``path`` only labels messages)."""
    if fmt == "auto":
        detected = detect_format(_first_line(data))
        if detected is None:
            raise TraceFormatError(
                path, None, f"unknown trace format (first line does not match any of {', '.join(FORMATS)})"
            )
        fmt = detected
    if fmt not in FORMATS:
        raise TraceFormatError(path, None, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    report = LoadReport(path=path, format=fmt, max_errors=max_errors)
    trace_name = name or os.path.splitext(os.path.basename(path))[0]
    sink = _Sink(report, strict)
    if fmt == "mooncake":
        return _load_mooncake(data, path, trace_name, sink), report
    if fmt == "qwen":
        return _load_qwen(data, path, trace_name, sink), report
    if fmt == "azure":
        return _load_azure(data, path, trace_name, sink), report
    return _load_kvrouter(data, path, trace_name, sink), report


class _Sink:
    """Routes per-line problems into the report, or raises in strict mode."""

    __slots__ = ("report", "strict")

    def __init__(self, report: LoadReport, strict: bool) -> None:
        self.report = report
        self.strict = strict

    def bad(self, line: int, reason: str) -> None:
        r = self.report
        if self.strict:
            raise TraceFormatError(r.path, line, reason)
        r.bad += 1
        if len(r.errors) < r.max_errors:
            r.errors.append(LineIssue(line, reason))

    def warn(self, line: int, reason: str) -> None:
        r = self.report
        r.warned += 1
        if len(r.warnings) < r.max_errors:
            r.warnings.append(LineIssue(line, reason))


def _lines(data: bytes, report: LoadReport) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for non-blank lines; counts lines and blanks."""
    lineno = 0
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            report.blank += 1
            continue
        yield lineno, line
    report.lines = lineno


def _check_blocks(sink: _Sink, lineno: int, n_ids: int, input_length: int, block_tokens: int) -> None:
    # Fewer ids than blocks is legal (synthesis pads with request-unique tokens); more ids than
    # the prompt can hold means the ids and the length disagree, which is worth a warning.
    if block_tokens and n_ids > math.ceil(input_length / block_tokens):
        sink.warn(
            lineno,
            f"{n_ids} hash_ids for input_length {input_length} "
            f"(at most {math.ceil(input_length / block_tokens)} blocks of {block_tokens})",
        )


def _finish(
    reqs: list[TraceRequest],
    path: str,
    name: str,
    block_tokens: int,
    report: LoadReport,
    meta: dict[str, str | int | float | bool | None] | None = None,
    origin_s: float = 0.0,
) -> Trace:
    """Sort, rebase to the first arrival, and wrap. ``origin_s``: what a caller already subtracted."""
    # Stable sort: ties keep file order, which is the processing order the stats rules define.
    reqs.sort(key=_ts)
    origin = reqs[0].timestamp_s if reqs else 0.0
    if origin:
        reqs = [msgspec.structs.replace(r, timestamp_s=r.timestamp_s - origin) for r in reqs]
    origin += origin_s
    report.loaded = len(reqs)
    return Trace(
        requests=tuple(reqs),
        block_tokens=block_tokens,
        name=name,
        source=path,
        origin_s=origin,
        meta=meta or {},
    )


def _ts(r: TraceRequest) -> float:
    return r.timestamp_s


def _decoded(data: bytes, sink: _Sink, decoder: msgspec.json.Decoder[_Row]) -> Iterator[tuple[int, _Row]]:
    """(line number, decoded view) for every line that decodes; the others go to the sink."""
    for lineno, line in _lines(data, sink.report):
        try:
            row = decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            sink.bad(lineno, str(exc))
            continue
        yield lineno, row


def _load_mooncake(data: bytes, path: str, name: str, sink: _Sink) -> Trace:
    B = MOONCAKE_BLOCK_TOKENS
    reqs: list[TraceRequest] = []
    for lineno, row in _decoded(data, sink, _mooncake_dec):
        _check_blocks(sink, lineno, len(row.hash_ids), row.input_length, B)
        reqs.append(
            TraceRequest(
                timestamp_s=row.timestamp / 1000.0,
                input_length=row.input_length,
                output_length=row.output_length,
                hash_ids=row.hash_ids,
                request_id=row.request_id if row.request_id is not None else str(lineno),
                session_id=None if row.session_id is None else str(row.session_id),
                parent_id=row.parent_id,
                turn=row.turn,
            )
        )
    return _finish(reqs, path, name, B, sink.report)


def _load_qwen(data: bytes, path: str, name: str, sink: _Sink) -> Trace:
    B = QWEN_BLOCK_TOKENS
    rows: list[_QwenLine] = []
    for lineno, row in _decoded(data, sink, _qwen_dec):
        _check_blocks(sink, lineno, len(row.hash_ids), row.input_length, B)
        rows.append(row)
    # Sessions are the roots of parent chains. A parent outside the file (a slice) becomes the
    # session root itself, so turns of one conversation still share a session id.
    parent_of = {str(r.chat_id): str(r.parent_chat_id) for r in rows if not _is_root(r.parent_chat_id)}
    session_of: dict[str, str] = {}

    def root(cid: str) -> str:
        chain: list[str] = []
        while cid in parent_of and cid not in session_of and len(chain) <= len(parent_of):
            chain.append(cid)
            cid = parent_of[cid]
        s = session_of.get(cid, cid)
        for c in chain:
            session_of[c] = s
        return s

    reqs = [
        TraceRequest(
            timestamp_s=r.timestamp,
            input_length=r.input_length,
            output_length=r.output_length,
            hash_ids=r.hash_ids,
            request_id=str(r.chat_id),
            session_id=root(str(r.chat_id)),
            parent_id=None if _is_root(r.parent_chat_id) else str(r.parent_chat_id),
            turn=r.turn,
            kind=r.type,
        )
        for r in rows
    ]
    return _finish(reqs, path, name, B, sink.report)


def _is_root(parent: int | str) -> bool:
    return parent in (-1, "-1", "")


def _parse_azure_ts(text: str) -> int:
    """``2023-11-16 18:17:03.9799600`` -> 100 ns ticks since the epoch (UTC, naive).

    Integer ticks keep all 7 fractional digits: ``datetime`` stops at 6, and an epoch float has
    only ~0.2 us resolution, which would leak into the rebased arrival times.
    """
    whole, _, frac = text.strip().partition(".")
    secs = timegm(datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timetuple())
    if len(frac) > 7 or (frac and not frac.isdigit()):
        raise ValueError(f"bad fractional seconds {frac!r}")
    return secs * _TICKS + (int(frac.ljust(7, "0")) if frac else 0)


_TICKS = 10_000_000  # Azure timestamps have 7 fractional digits: 100 ns


def _load_azure(data: bytes, path: str, name: str, sink: _Sink) -> Trace:
    report = sink.report
    text = data.decode("utf-8", "replace")
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, int, int, int]] = []  # ticks, input, output, line
    cols: dict[str, int] | None = None
    lineno = 0
    for lineno, row in enumerate(reader, 1):
        if not row or not "".join(row).strip():
            report.blank += 1
            continue
        if cols is None:
            cols = {c.strip(): i for i, c in enumerate(row)}
            missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - cols.keys()
            if missing:
                raise TraceFormatError(path, lineno, f"azure CSV header lacks {', '.join(sorted(missing))}")
            continue
        try:
            ticks = _parse_azure_ts(row[cols["TIMESTAMP"]])
            n_in = int(row[cols["ContextTokens"]])
            n_out = int(row[cols["GeneratedTokens"]])
        except (ValueError, IndexError) as exc:
            sink.bad(lineno, f"{type(exc).__name__}: {exc}")
            continue
        if n_in < 0 or n_out < 0:
            sink.bad(lineno, f"negative token count ({n_in}, {n_out})")
            continue
        rows.append((ticks, n_in, n_out, lineno))
    report.lines = lineno
    t0 = min((r[0] for r in rows), default=0)
    reqs = [
        TraceRequest(timestamp_s=(t - t0) / _TICKS, input_length=i, output_length=o, request_id=str(ln))
        for t, i, o, ln in rows
    ]
    return _finish(reqs, path, name, NO_PREFIX_INFO, report, origin_s=t0 / _TICKS)


def _load_kvrouter(data: bytes, path: str, name: str, sink: _Sink) -> Trace:
    report = sink.report
    header: _KvrouterHeader | None = None
    reqs: list[TraceRequest] = []
    for lineno, line in _lines(data, report):
        if header is None:
            try:
                header = _kv_header_dec.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # Without the header we do not know what one block id covers: not recoverable.
                raise TraceFormatError(path, lineno, f"kvrouter trace header: {exc}") from exc
            if header.kvrouter_trace != KVROUTER_TRACE_VERSION:
                raise TraceFormatError(
                    path, lineno, f"unsupported kvrouter_trace version {header.kvrouter_trace}"
                )
            continue
        try:
            row = _kv_line_dec.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            sink.bad(lineno, str(exc))
            continue
        _check_blocks(sink, lineno, len(row.hash_ids), row.input_length, header.block_tokens)
        reqs.append(TraceRequest(**msgspec.structs.asdict(row)))
    if header is None:
        raise TraceFormatError(path, None, "empty kvrouter trace (no header line)")
    return _finish(reqs, path, header.name or name, header.block_tokens, report, dict(header.meta))


# --- writing ------------------------------------------------------------------------------------


def dump_trace(trace: Trace) -> bytes:
    """The trace in kvrouter JSONL (header line, then one request per line), loadable by ``load_trace``."""
    header = _KvrouterHeader(
        kvrouter_trace=KVROUTER_TRACE_VERSION,
        block_tokens=trace.block_tokens,
        name=trace.name,
        meta=trace.meta,
    )
    buf = bytearray(_encoder.encode(header))
    buf += b"\n"
    for r in trace.requests:
        _encoder.encode_into(r, buf, len(buf))
        buf += b"\n"
    return bytes(buf)


def write_trace(trace: Trace, path: str | os.PathLike[str]) -> None:
    with open(path, "wb") as f:
        f.write(dump_trace(trace))


class _MooncakeOut(msgspec.Struct, omit_defaults=True):
    timestamp: int  # milliseconds, as the published traces
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session_id: str | None = None
    turn: int | None = None
    request_id: str | None = None
    parent_id: str | None = None


def dump_mooncake(trace: Trace) -> bytes:
    """The trace as Mooncake JSONL, with ``session_id`` / ``turn`` / ``request_id`` / ``parent_id``
    on the lines that have them. Mooncake ids cover 512 tokens, so only a trace with
    ``block_tokens == 512`` can be written; timestamps are rounded to whole milliseconds."""
    if trace.block_tokens != MOONCAKE_BLOCK_TOKENS:
        raise ValueError(
            f"Mooncake JSONL needs {MOONCAKE_BLOCK_TOKENS}-token blocks; this trace has {trace.block_tokens} "
            "(write kvrouter JSONL instead)"
        )
    buf = bytearray()
    for r in trace.requests:
        line = _MooncakeOut(
            timestamp=round(r.timestamp_s * 1000.0),
            input_length=r.input_length,
            output_length=r.output_length,
            hash_ids=r.hash_ids,
            session_id=r.session_id,
            turn=r.turn,
            request_id=r.request_id if r.session_id is not None else None,
            parent_id=r.parent_id,
        )
        _encoder.encode_into(line, buf, len(buf))
        buf += b"\n"
    return bytes(buf)


def write_mooncake(trace: Trace, path: str | os.PathLike[str]) -> None:
    data = dump_mooncake(trace)
    with open(path, "wb") as f:
        f.write(data)
