"""``Scheduler``: runs code in disposable microVMs and opens sessions."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from exec_sandbox import _native
from exec_sandbox._callbacks import OutputCallback, Streams
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.exceptions import InputValidationError
from exec_sandbox.models import ExecutionResult, Language, PortMapping
from exec_sandbox.session import Session

__all__ = ["Scheduler"]


def _language(value: Language | str) -> str:
    if isinstance(value, Language):
        return value.value
    if isinstance(value, str):
        return value
    raise InputValidationError(
        f"language: expected a Language or a string, not {type(value).__name__}",
        {"kind": "invalid_input", "field": "language", "hint": None},
    )


def _ports(ports: Iterable[int | PortMapping] | None) -> list[tuple[int, int | None, str]]:
    out: list[tuple[int, int | None, str]] = []
    for port in ports or ():
        if isinstance(port, PortMapping):
            out.append((port.internal, port.external, port.protocol))
        elif isinstance(port, int) and not isinstance(port, bool):
            out.append((port, None, "tcp"))
        else:
            raise InputValidationError(
                f"expose_ports: expected an int or a PortMapping, not {type(port).__name__}",
                {"kind": "invalid_input", "field": "expose_ports", "hint": None},
            )
    return out


def _env(env_vars: Mapping[str, str] | None) -> list[tuple[str, str]]:
    return list((env_vars or {}).items())


def _domains(domains: Iterable[str] | None) -> list[str] | None:
    return None if domains is None else list(domains)


class Scheduler:
    """Runs untrusted code in disposable QEMU microVMs.

    Use it as an async context manager: entering starts it (and its warm pool, when
    configured); leaving closes the sessions it opened and destroys the idle warm VMs. A
    scheduler used without ``async with`` starts on first use.
    """

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self._config = config if config is not None else SchedulerConfig()
        self._native: _native.NativeScheduler | None = None
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()

    @property
    def config(self) -> SchedulerConfig:
        """The configuration in force."""
        return self._config

    def _started(self) -> _native.NativeScheduler:
        if self._native is None:
            self._native = _native.NativeScheduler(self._config._resolved())
        return self._native

    async def __aenter__(self) -> Scheduler:
        self._started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the sessions this scheduler opened, destroys the idle warm VMs and waits for
        the VMs of finished runs to be gone."""
        for session in list(self._sessions):
            await session.close()
        native, self._native = self._native, None
        if native is not None:
            await native.shutdown()

    async def run(
        self,
        code: str,
        *,
        language: Language | str = Language.PYTHON,
        packages: Iterable[str] | None = None,
        timeout_seconds: int | None = None,
        memory_mb: int | None = None,
        allow_network: bool = False,
        allowed_domains: Iterable[str] | None = None,
        expose_ports: Iterable[int | PortMapping] | None = None,
        env_vars: Mapping[str, str] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_boot_log: OutputCallback | None = None,
    ) -> ExecutionResult:
        """Runs ``code`` in a fresh VM and returns its result.

        Invalid input raises :class:`InputValidationError` (naming the field) before any VM
        boots. An execution timeout is a result (``exit_code == -1``, ``timed_out``), not an
        exception. Callbacks receive text chunks on this event loop, in order. Cancelling the
        awaiting task kills the VM.
        """
        streams = Streams()
        call = self._started().run(
            _language(language),
            code,
            timeout_seconds=timeout_seconds,
            memory_mb=memory_mb,
            env_vars=_env(env_vars),
            packages=list(packages or ()),
            allow_network=allow_network,
            allowed_domains=_domains(allowed_domains),
            expose_ports=_ports(expose_ports),
            on_stdout=streams.wrap("on_stdout", on_stdout),
            on_stderr=streams.wrap("on_stderr", on_stderr),
            on_boot_log=streams.wrap("on_boot_log", on_boot_log),
        )
        return ExecutionResult._from_json(await streams.settle(call))

    async def session(
        self,
        *,
        language: Language | str = Language.PYTHON,
        packages: Iterable[str] | None = None,
        memory_mb: int | None = None,
        allow_network: bool = False,
        allowed_domains: Iterable[str] | None = None,
        expose_ports: Iterable[int | PortMapping] | None = None,
        env_vars: Mapping[str, str] | None = None,
        idle_timeout_seconds: int | None = None,
    ) -> Session:
        """Opens a session: one VM kept for several :meth:`Session.exec` calls.

        ``idle_timeout_seconds`` (10-3600) defaults to the configuration's
        ``session_idle_timeout_seconds``. Use the result as an async context manager.
        """
        native = await self._started().session(
            _language(language),
            packages=list(packages or ()),
            memory_mb=memory_mb,
            allow_network=allow_network,
            allowed_domains=_domains(allowed_domains),
            expose_ports=_ports(expose_ports),
            env_vars=_env(env_vars),
            idle_timeout_seconds=idle_timeout_seconds,
        )
        session = Session(native)
        self._sessions.add(session)
        return session

    def _warm_pool_vms(self) -> list[str]:
        """The names of the idle warm VMs (tests)."""
        return self._started().warm_pool_vms()

    def __repr__(self) -> str:
        state = "started" if self._native is not None else "not started"
        return f"<Scheduler {state} {self._config!r}>"

    def __getstate__(self) -> Any:
        raise TypeError("a Scheduler cannot be pickled")
