"""Fixtures every test directory can use. Helpers that are plain functions and classes live in
tests/support/ and are imported by name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import zmq.asyncio


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    """A private ZMQ context per test, destroyed without lingering."""
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)
