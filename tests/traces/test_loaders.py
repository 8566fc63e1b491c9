"""Loaders: format detection, each format's fields and units, bad-line reporting, round trip."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from traces.loaders import (
    LoadReport,
    TraceFormatError,
    detect_format,
    dump_trace,
    load_trace,
    parse_trace,
    write_trace,
)
from traces.model import Trace, TraceRequest

# The public traces are vendored (traces/data/README.md); KVROUTER_SHARED_TRACES can point elsewhere.
SHARED = Path(
    os.environ.get("KVROUTER_SHARED_TRACES", Path(__file__).resolve().parents[2] / "traces" / "data")
)
CONV = SHARED / "mooncake" / "conversation_trace.jsonl"
AZURE_CODE = SHARED / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"

# The Qwen Bailian format as documented in alibaba-edu/qwen-bailian-usagetraces-anon README.md:
# a two-turn session (chat 7 -> 9 -> 12), an unrelated root (8) and a child whose parent is not in
# the file (20 -> 19), as happens in any slice of the full trace.
QWEN_SAMPLE = b"""\
{"chat_id": 7, "parent_chat_id": -1, "timestamp": 0.5, "input_length": 40, "output_length": 10, "type": "text", "turn": 1, "hash_ids": [1, 2, 3]}
{"chat_id": 8, "parent_chat_id": -1, "timestamp": 1.25, "input_length": 16, "output_length": 3, "type": "search", "turn": 1, "hash_ids": [4]}
{"chat_id": 9, "parent_chat_id": 7, "timestamp": 3.0, "input_length": 70, "output_length": 5, "type": "text", "turn": 2, "hash_ids": [1, 2, 5, 6, 7]}
{"chat_id": 20, "parent_chat_id": 19, "timestamp": 3.0, "input_length": 20, "output_length": 1, "type": "file", "turn": 4, "hash_ids": [8, 9]}
{"chat_id": 12, "parent_chat_id": 9, "timestamp": 9.5, "input_length": 90, "output_length": 2, "type": "text", "turn": 3, "hash_ids": [1, 2, 5, 6, 10, 11]}
"""

AZURE_SAMPLE = b"""\
TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:05.0000001,100,1
"""


def _mooncake(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode()


@pytest.mark.parametrize(
    ("line", "fmt"),
    [
        (b'{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0]}', "mooncake"),
        (b'{"chat_id": 1, "parent_chat_id": -1, "timestamp": 0.1}', "qwen"),
        (b'{"kvrouter_trace": 1, "block_tokens": 16}', "kvrouter"),
        (b"TIMESTAMP,ContextTokens,GeneratedTokens", "azure"),
        (b'{"prompt": "hi"}', None),
        (b"not a trace", None),
        (b"[1, 2]", None),
    ],
)
def test_detect_format(line: bytes, fmt: str | None) -> None:
    assert detect_format(line) == fmt


def test_mooncake_fields_units_and_order() -> None:
    data = _mooncake(
        '{"timestamp": 1500, "input_length": 600, "output_length": 7, "hash_ids": [0, 1]}',
        '{"timestamp": 250, "input_length": 512, "output_length": 3, "hash_ids": [0]}',
        '{"timestamp": 1500, "input_length": 10, "output_length": 1, "hash_ids": [5]}',
    )
    trace, report = parse_trace(data, "t.jsonl")
    assert report.ok and report.loaded == 3 and report.format == "mooncake"
    assert trace.block_tokens == 512 and trace.name == "t"
    # Sorted by timestamp, ties in file order (lines 1 then 3); rebased so the first is at 0 s.
    assert [r.request_id for r in trace.requests] == ["2", "1", "3"]
    assert [r.timestamp_s for r in trace.requests] == [0.0, 1.25, 1.25]
    assert trace.origin_s == 0.25
    assert trace.requests[1].hash_ids == (0, 1)
    assert trace.duration_s == 1.25


def test_bad_lines_are_reported_with_line_numbers_not_dropped() -> None:
    data = _mooncake(
        '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}',
        '{"timestamp": 1, "input_length": -5, "output_length": 1, "hash_ids": [1]}',
        "",
        '{"timestamp": 2, "input_length": 10, "output_length": 1}',
        "{not json",
        '{"timestamp": 3, "input_length": 10, "output_length": 1, "hash_ids": [2, 3]}',
    )
    trace, report = parse_trace(data, "t.jsonl")
    assert len(trace) == 2
    assert (report.lines, report.loaded, report.blank, report.bad) == (6, 2, 1, 3)
    assert [e.line for e in report.errors] == [2, 4, 5]
    assert "input_length" in report.errors[0].reason and ">= 0" in report.errors[0].reason
    assert "hash_ids" in report.errors[1].reason
    # Line 6 loads, but two 512-token ids cannot cover 10 tokens: kept, with a warning.
    assert report.warned == 1 and report.warnings[0].line == 6
    assert not report.ok


def test_max_errors_bounds_the_kept_list_but_not_the_count() -> None:
    data = _mooncake(*["{bad"] * 30)
    _, report = parse_trace(data, "t.jsonl", "mooncake", max_errors=5)
    assert report.bad == 30 and len(report.errors) == 5


def test_strict_raises_naming_file_and_line() -> None:
    data = _mooncake(
        '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}',
        '{"timestamp": "x", "input_length": 10, "output_length": 1, "hash_ids": [0]}',
    )
    with pytest.raises(TraceFormatError, match=r"^bad\.jsonl:2: ") as info:
        parse_trace(data, "bad.jsonl", strict=True)
    assert info.value.line == 2


def test_unknown_format_and_missing_file() -> None:
    with pytest.raises(TraceFormatError, match="unknown trace format"):
        parse_trace(b"hello\n", "x.txt")
    with pytest.raises(TraceFormatError, match="cannot read"):
        load_trace("/nonexistent/trace.jsonl")


def test_format_override_wins_over_detection() -> None:
    # A Qwen-shaped line forced through the Mooncake loader: hash_ids/timestamp are all it needs.
    line = b'{"chat_id": 1, "timestamp": 2000, "input_length": 5, "output_length": 1, "hash_ids": [3]}\n'
    trace, _ = parse_trace(line, "q.jsonl", "mooncake")
    assert trace.block_tokens == 512 and trace.origin_s == 2.0


def test_qwen_sessions_parents_seconds_and_16_token_blocks(tmp_path: Path) -> None:
    path = tmp_path / "qwen_traceA_blksz_16.jsonl"
    path.write_bytes(QWEN_SAMPLE)
    trace, report = load_trace(path)
    assert report.format == "qwen" and report.ok and report.warned == 0
    assert trace.block_tokens == 16
    by_id = {r.request_id: r for r in trace.requests}
    assert [r.request_id for r in trace.requests] == ["7", "8", "9", "20", "12"]
    assert by_id["9"].timestamp_s == 2.5  # seconds, rebased to the first request at 0.5 s
    assert by_id["9"].parent_id == "7" and by_id["7"].parent_id is None
    assert {by_id[c].session_id for c in ("7", "9", "12")} == {"7"}
    assert by_id["8"].session_id == "8"
    assert by_id["20"].session_id == "19"  # parent outside the slice becomes the session root
    assert (by_id["12"].turn, by_id["12"].kind, by_id["12"].hash_ids) == (3, "text", (1, 2, 5, 6, 10, 11))


def test_azure_seven_fractional_digits_and_no_prefix_info() -> None:
    trace, report = parse_trace(AZURE_SAMPLE, "AzureLLMInferenceTrace_code.csv")
    assert report.format == "azure" and report.loaded == 3 and report.lines == 4
    assert trace.block_tokens == 0 and not trace.has_prefix_info
    ts = [r.timestamp_s for r in trace.requests]
    assert ts[0] == 0.0
    assert ts[1] == pytest.approx(0.052, abs=1e-9)
    assert ts[2] == pytest.approx(1.0200401, abs=1e-6)
    assert trace.requests[0].input_length == 4808 and trace.requests[0].hash_ids == ()
    assert trace.requests[0].request_id == "2"  # the CSV line number


def test_azure_bad_row_and_missing_column() -> None:
    data = AZURE_SAMPLE + b"2023-11-16 18:17:06.0,abc,1\n"
    _, report = parse_trace(data, "a.csv")
    assert report.bad == 1 and report.errors[0].line == 5
    with pytest.raises(TraceFormatError, match="GeneratedTokens"):
        parse_trace(b"TIMESTAMP,ContextTokens\n2023-11-16 18:17:06.0,1\n", "a.csv", "azure")


def test_kvrouter_round_trip(tmp_path: Path) -> None:
    trace = Trace(
        requests=(
            TraceRequest(
                timestamp_s=0.0, input_length=40, output_length=4, hash_ids=(0, 1, 2), request_id="a"
            ),
            TraceRequest(
                timestamp_s=1.5,
                input_length=50,
                output_length=4,
                hash_ids=(0, 1, 3, 4),
                request_id="b",
                session_id="s",
                parent_id="a",
                turn=2,
                kind="chat",
            ),
        ),
        block_tokens=16,
        name="gen",
        meta={"generator": "chat", "seed": 3, "rate": 1.5},
    )
    path = tmp_path / "out.jsonl"
    write_trace(trace, path)
    loaded, report = load_trace(path)
    assert report.format == "kvrouter" and report.ok
    assert loaded.requests == trace.requests
    assert (loaded.block_tokens, loaded.name, loaded.meta) == (16, "gen", trace.meta)
    # Defaults are omitted on the wire, so generated traces stay compact.
    assert b"session_id" not in dump_trace(trace).splitlines()[1]


def test_kvrouter_without_header_is_an_error() -> None:
    line = b'{"timestamp_s": 0, "input_length": 1, "output_length": 1, "request_id": "x"}\n'
    with pytest.raises(TraceFormatError, match="header"):
        parse_trace(line, "k.jsonl")


def test_load_report_summary_mentions_skips() -> None:
    r = LoadReport(path="p", format="mooncake", lines=3, loaded=2, bad=1)
    assert "1 bad lines skipped" in r.summary()


def test_mooncake_conversation_loads_fast() -> None:
    t0 = time.perf_counter()
    trace, report = load_trace(CONV)
    elapsed = time.perf_counter() - t0
    assert report.ok and report.warned == 0 and len(trace) == 12031
    assert elapsed < 3.0, (
        f"loading the 3 MB Mooncake trace took {elapsed:.3f} s"
    )  # ~40 ms quiet; CI is shared


def test_azure_file_rebased_to_first_request() -> None:
    trace, report = load_trace(AZURE_CODE)
    assert report.ok and report.format == "azure"
    assert trace.requests[0].timestamp_s == 0.0
    assert trace.origin_s == pytest.approx(1700158623.97996)  # 2023-11-16 18:17:03.97996 UTC
