"""Runs through the package, booting real VMs: results, streaming, callbacks, timeouts,
languages, ports and concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import pytest

from exec_sandbox import ExecutionResult, Language, PortMapping, Scheduler, TimingBreakdown


async def test_run_returns_an_immutable_result(scheduler: Scheduler) -> None:
    result = await scheduler.run(code="print(6 * 7)", language="python", timeout_seconds=10)
    assert result.stdout == "42\n"
    assert result.stderr == ""
    assert result.exit_code == 0
    assert not result.timed_out
    assert result.timing.total_ms >= result.timing.execute_ms > 0
    assert result.accelerator.name in ("kvm", "tcg")
    assert isinstance(result.warm_pool_hit, bool)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.stdout = ""  # type: ignore[misc]


async def test_reference_readme_examples_run_unchanged(scheduler: Scheduler) -> None:
    result = await scheduler.run(code="print('Hello, World!')", language="python")
    assert (result.stdout, result.exit_code) == ("Hello, World!\n", 0)

    seen: list[str] = []
    result = await scheduler.run(
        code="for i in range(5): print(i)",
        language="python",
        on_stdout=lambda chunk: seen.append(f"[OUT] {chunk}"),
        on_stderr=lambda chunk: seen.append(f"[ERR] {chunk}"),
    )
    assert "".join(seen).replace("[OUT] ", "") == result.stdout == "0\n1\n2\n3\n4\n"

    # VMs are never reused: state does not persist between runs (code given positionally).
    await scheduler.run("x = 42", language="python")
    assert "NameError" in (await scheduler.run("print(x)", language="python")).stderr


async def test_result_has_every_field_of_the_library_result(scheduler: Scheduler) -> None:
    native = json.loads(await scheduler._started().run("python", "print(1)"))
    assert set(native) == {f.name for f in dataclasses.fields(ExecutionResult)}
    assert set(native["timing"]) == {f.name for f in dataclasses.fields(TimingBreakdown)}
    timing = (await scheduler.run("print(1)", language="python")).timing
    assert timing.vm_start_ms + timing.guest_ready_ms <= timing.boot_ms <= timing.total_ms
    assert timing.interpreter_start_ms <= timing.execute_ms


async def test_callbacks_stream_in_order_on_the_event_loop(scheduler: Scheduler) -> None:
    events: list[tuple[str, str]] = []
    threads: set[int] = set()

    def recorder(stream: str):
        def record(chunk: str) -> None:
            threads.add(threading.get_ident())
            events.append((stream, chunk))

        return record

    code = (
        "import sys, time\n"
        "for i in range(3):\n"
        "    print(f'out{i}', flush=True)\n"
        "    time.sleep(0.15)\n"
        "    print(f'err{i}', file=sys.stderr, flush=True)\n"
        "    time.sleep(0.15)\n"
    )
    result = await scheduler.run(
        code=code, on_stdout=recorder("out"), on_stderr=recorder("err"), timeout_seconds=20
    )
    assert threads == {threading.get_ident()}
    assert "".join(c for s, c in events if s == "out") == result.stdout == "out0\nout1\nout2\n"
    assert "".join(c for s, c in events if s == "err") == result.stderr
    # Output 150 ms apart (the guest flushes every 50 ms) arrives in the order it was written,
    # across both streams.
    lines = [line for _, chunk in events for line in chunk.split()]
    assert lines == [f"{kind}{i}" for i in range(3) for kind in ("out", "err")]


async def test_callback_exception_is_raised_from_run(scheduler: Scheduler) -> None:
    seen: list[str] = []

    def explode(chunk: str) -> None:
        seen.append(chunk)
        raise ValueError("callback failed")

    with pytest.raises(ValueError, match="callback failed") as raised:
        await scheduler.run(code="print('a', flush=True)\nprint('b')", on_stdout=explode)
    assert len(seen) == 1  # not called again after it raised
    assert any("on_stdout" in note for note in getattr(raised.value, "__notes__", ["on_stdout"]))


async def test_boot_log_streams_the_console(scheduler: Scheduler) -> None:
    console: list[str] = []
    result = await scheduler.run(code="print('booted')", on_boot_log=console.append)
    assert result.stdout == "booted\n"
    assert console and all(isinstance(chunk, str) for chunk in console)


async def test_timeout_is_a_result(scheduler: Scheduler) -> None:
    result = await scheduler.run(code="while True: pass", timeout_seconds=1)
    assert result.exit_code == -1
    assert result.timed_out


async def test_program_errors_are_results(scheduler: Scheduler) -> None:
    result = await scheduler.run(code="import sys; sys.exit(3)")
    assert result.exit_code == 3
    result = await scheduler.run(code="raise KeyError('k')")
    assert result.exit_code == 1
    assert "KeyError" in result.stderr


async def test_languages_by_enum_and_name(scheduler: Scheduler) -> None:
    js, raw = await asyncio.gather(
        scheduler.run(code="console.log(1 + 1)", language=Language.JAVASCRIPT),
        scheduler.run(code='echo "$GREETING"', language="raw", env_vars={"GREETING": "hi"}),
    )
    assert (js.stdout, raw.stdout) == ("2\n", "hi\n")


async def test_exposed_ports_carry_urls(scheduler: Scheduler) -> None:
    result = await scheduler.run(code="print('ok')", expose_ports=[8000, PortMapping(9000, protocol="udp")])
    assert result.exit_code == 0
    tcp, udp = result.exposed_ports
    assert tcp.internal == 8000 and tcp.url == f"http://127.0.0.1:{tcp.external}"
    assert udp.protocol == "udp" and udp.url.startswith("udp://127.0.0.1:")


async def test_twenty_concurrent_runs_on_one_scheduler(scheduler: Scheduler) -> None:
    results = await asyncio.gather(*(scheduler.run(code=f"print({i} * 2)") for i in range(20)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(20)]
    assert all(r.exit_code == 0 for r in results)
