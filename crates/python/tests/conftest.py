"""Fixtures: one scheduler per test module (its warm pool shared by the module's tests), and
helpers to find this process's QEMU processes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from exec_sandbox import Scheduler, SchedulerConfig


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    """A started scheduler with one warm VM per language; closed after the module."""
    async with Scheduler(SchedulerConfig(warm_pool_size=1)) as scheduler:
        yield scheduler


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command may hold spaces and parentheses: the fields after the last `)` are fixed.
    return int(stat.rsplit(")", 1)[1].split()[1])


def qemu_children() -> set[int]:
    """PIDs of the QEMU processes descended from this process."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" not in cmdline.split(b"\0", 1)[0]:
            continue
        pid = int(entry.name)
        ancestor: int | None = pid
        while ancestor not in (None, 0, 1):
            ancestor = _parent(ancestor)
            if ancestor == me:
                found.add(pid)
                break
    return found
