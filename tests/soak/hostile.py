"""Hostile clients beside the soak's normal traffic (issue 21): what each does, and what the router
must answer. Each loop is bounded by the soak's stop event and opens one connection at a time.

* ``slow_heads``: N connections trickle a request head (one byte per 0.5 s); the router must
  close each at its head deadline (408), and the loop opens a new one.
* ``big_unauthenticated``: 32 MiB bodies without the API key; answered 401 from the head, the body
  never buffered (the client stops sending when the router closes).
* ``huge_prompts``: authenticated 8 MB text prompts and 4 M-id token prompts; vLLM's 400 from the
  router, no engine round trip.

``tally`` counts answers by kind: ``<client>:<status>`` or ``<client>:closed`` / ``:error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp


def _count(tally: dict[str, int], key: str) -> None:
    tally[key] = tally.get(key, 0) + 1


async def _status(reader: asyncio.StreamReader, timeout: float) -> str:
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readline()
    except TimeoutError:
        return "timeout"
    parts = line.split()
    return parts[1].decode() if len(parts) > 1 else "closed"


async def slow_heads(port: int, stop: asyncio.Event, tally: dict[str, int], conns: int = 16) -> None:
    async def one() -> None:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 4000
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                _count(tally, "slow_head:connect_error")
                await asyncio.sleep(0.5)
                continue
            try:
                for b in head:
                    if stop.is_set() or reader.at_eof():
                        break
                    writer.write(bytes([b]))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            line = await reader.readline()
                            _count(tally, f"slow_head:{line.split()[1].decode() if line else 'closed'}")
                            break
            except (OSError, IndexError):
                _count(tally, "slow_head:error")
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))


async def big_unauthenticated(port: int, stop: asyncio.Event, tally: dict[str, int]) -> None:
    chunk = b"\0" * (1 << 20)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            _count(tally, "unauth_body:connect_error")
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 33554431\r\n\r\n")
            for _ in range(32):
                writer.write(chunk)
                await writer.drain()
                if reader.at_eof() or len(reader._buffer):  # answered: stop sending
                    break
            _count(tally, f"unauth_body:{await _status(reader, 5.0)}")
        except OSError:
            _count(tally, "unauth_body:closed")  # the router closed while the body was coming
        finally:
            writer.close()
        await asyncio.sleep(0.2)


async def huge_prompts(url: str, key: str, stop: asyncio.Event, tally: dict[str, int]) -> None:
    text = json.dumps({"model": "tiny", "prompt": "z" * 8_000_000, "max_tokens": 2}).encode()
    ids = b'{"model":"tiny","max_tokens":2,"prompt":[' + b"7," * 4_000_000 + b"7]}"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                async with asyncio.timeout(20):
                    async with s.post(
                        url + "/v1/completions", data=text if i % 2 else ids, headers=headers
                    ) as r:
                        await r.read()
                        _count(tally, f"huge_prompt:{r.status}")
            except (TimeoutError, aiohttp.ClientError):
                _count(tally, "huge_prompt:error")
            await asyncio.sleep(0.5)
