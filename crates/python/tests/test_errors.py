"""Library errors raised as the reference's exception classes (see the README's mapping)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exec_sandbox import (
    AssetNotFoundError,
    PermanentError,
    SandboxError,
    Scheduler,
    SchedulerConfig,
    TransientError,
    VmCapacityError,
    VmDependencyError,
)


async def test_missing_assets_offline_raise_asset_not_found(tmp_path: Path) -> None:
    config = SchedulerConfig(offline=True, images_dir=tmp_path)
    async with Scheduler(config) as scheduler:
        with pytest.raises(AssetNotFoundError) as raised:
            await scheduler.run(code="print(1)")
    assert raised.value.kind == "permanent"
    assert raised.value.hint and "prefetch" in raised.value.hint
    assert "hint: " in raised.value.message


async def test_missing_qemu_raises_a_dependency_error(tmp_path: Path) -> None:
    async with Scheduler(SchedulerConfig(qemu_binary=tmp_path / "no-qemu")) as scheduler:
        with pytest.raises(VmDependencyError) as raised:
            await scheduler.run(code="print(1)")
    assert isinstance(raised.value, PermanentError)
    assert "no-qemu" in str(raised.value)


async def test_no_slot_before_the_deadline_is_a_capacity_error() -> None:
    config = SchedulerConfig(max_concurrent_vms=1, admission_timeout_seconds=1, warm_pool_size=0)
    async with Scheduler(config) as scheduler:
        async with await scheduler.session(language="raw"):
            with pytest.raises(VmCapacityError) as raised:
                await scheduler.run(code="print(1)")
    assert isinstance(raised.value, TransientError)
    assert isinstance(raised.value, SandboxError)
    assert raised.value.kind == "transient"
