"""Cancelling the task awaiting a run kills its VM."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import qemu_children
from exec_sandbox import Scheduler, SchedulerConfig


async def test_wait_for_timeout_kills_the_vm() -> None:
    # No warm pool and no snapshots: the only VM this scheduler starts is the run's own.
    config = SchedulerConfig(warm_pool_size=0, l1_snapshots=False)
    async with Scheduler(config) as scheduler:
        before = qemu_children()
        up = asyncio.Event()
        run = asyncio.ensure_future(
            scheduler.run(
                code="import time\nprint('up', flush=True)\ntime.sleep(120)",
                timeout_seconds=200,
                on_stdout=lambda chunk: up.set(),
            )
        )
        await asyncio.wait_for(up.wait(), 120)
        vms = qemu_children() - before
        assert vms, "the run's QEMU process was not found"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(run, 0.5)
        assert run.cancelled()
        deadline = time.monotonic() + 15
        while vms & qemu_children() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not vms & qemu_children(), "the cancelled run's QEMU process is still alive"
