"""Sessions through the package, on real VMs: state, files, closing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from exec_sandbox import FileInfo, InputValidationError, Scheduler, SessionClosedError


async def test_session_keeps_state_and_moves_files(scheduler: Scheduler, tmp_path: Path) -> None:
    async with await scheduler.session(language="python", idle_timeout_seconds=120) as session:
        assert not session.closed
        await session.exec("import math; x = math.pi * 2")
        assert (await session.exec("print(f'{x:.4f}')")).stdout == "6.2832\n"
        assert session.exec_count == 2

        await session.write_file("data/in.csv", b"a,b\n1,2\n")
        local = tmp_path / "script.sh"
        local.write_bytes(b"#!/bin/sh\necho run\n")
        await session.write_file("data/script.sh", local, make_executable=True)
        await session.write_file("data/obj.bin", io.BytesIO(b"\x00\x01"))

        out = tmp_path / "out.csv"
        await session.read_file("data/in.csv", destination=out)
        assert out.read_bytes() == b"a,b\n1,2\n"
        assert await session.read_file("data/obj.bin") == b"\x00\x01"
        sink = io.BytesIO()
        await session.read_file("data/script.sh", destination=sink)
        assert sink.getvalue() == local.read_bytes()

        listing = {f.name: f for f in await session.list_files("data")}
        # The library reports allocated bytes (st_blocks * 512), not the length.
        assert listing["in.csv"].name == "in.csv" and not listing["in.csv"].is_dir
        assert isinstance(listing["in.csv"], FileInfo) and listing["in.csv"].size >= 8
        assert set(listing) == {"in.csv", "script.sh", "obj.bin"}
        result = await session.exec("import os; print(os.access('data/script.sh', os.X_OK))")
        assert result.stdout == "True\n"

        with pytest.raises(FileNotFoundError):
            await session.write_file("x", tmp_path / "missing")
        with pytest.raises(InputValidationError):
            await session.read_file("no/such/file")
        with pytest.raises(InputValidationError) as raised:
            await session.write_file("../escape", b"x")
        assert raised.value.field == "path"
        # The session survives refused requests and program errors.
        assert (await session.exec("raise ValueError")).exit_code == 1
        assert (await session.exec("print(x > 6)")).stdout == "True\n"
    assert session.closed
    with pytest.raises(SessionClosedError):
        await session.exec("print(1)")


async def test_session_timeout_restarts_the_interpreter(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="python", expose_ports=[8080]) as session:
        (port,) = session.exposed_ports
        assert port.internal == 8080 and port.url == f"http://127.0.0.1:{port.external}"
        await session.exec("y = 1")
        result = await session.exec("while True: pass", timeout_seconds=1)
        assert result.timed_out and result.exit_code == -1
        assert not session.closed
        assert "NameError" in (await session.exec("print(y)")).stderr
