"""``Session``: one VM kept alive across executions, with file transfer."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Union

from exec_sandbox import _native
from exec_sandbox._callbacks import OutputCallback, Streams
from exec_sandbox.models import ExecutionResult, ExposedPort, FileInfo, _ports

__all__ = ["Session"]

# What write_file takes: the content, a local file, or a binary file object.
Content = Union[bytes, bytearray, memoryview, "os.PathLike[str]", IO[bytes]]


class Session:
    """A VM kept across executions; interpreter state carries over.

    Made by :meth:`Scheduler.session`. A program error, ``sys.exit(n)`` or a syntax error keep
    the state; ``os._exit``, a signal or a timeout restart the interpreter (state lost, session
    open); exit code 137 or a lost VM close the session. After closing, every operation raises
    :class:`~exec_sandbox.SessionClosedError`. Paths are relative to ``/home/user``.
    """

    def __init__(self, native: _native.NativeSession) -> None:
        self._native = native
        self._exposed_ports = _ports(json.loads(native.exposed_ports))

    @property
    def closed(self) -> bool:
        """Whether the session is closed (by ``close()``, its idle timeout, or a lost VM)."""
        return self._native.close_reason is not None

    @property
    def close_reason(self) -> str | None:
        """Why the session closed, or ``None`` while it is open."""
        return self._native.close_reason

    @property
    def exec_count(self) -> int:
        """Executions that returned a result."""
        return self._native.exec_count

    @property
    def exposed_ports(self) -> tuple[ExposedPort, ...]:
        """Ports forwarded from ``127.0.0.1`` on the host into the session's VM."""
        return self._exposed_ports

    @property
    def vm_id(self) -> str:
        """The VM's name."""
        return self._native.vm_name

    @property
    def language(self) -> str:
        """The session's interpreter."""
        return self._native.language

    async def exec(
        self,
        code: str,
        *,
        timeout_seconds: int | None = None,
        env_vars: Mapping[str, str] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecutionResult:
        """Runs ``code`` in the session's interpreter and returns its result."""
        streams = Streams()
        call = self._native.exec(
            code,
            timeout_seconds=timeout_seconds,
            env_vars=list((env_vars or {}).items()),
            on_stdout=streams.wrap("on_stdout", on_stdout),
            on_stderr=streams.wrap("on_stderr", on_stderr),
        )
        return ExecutionResult._from_json(await streams.settle(call))

    async def write_file(self, path: str, content: Content, *, make_executable: bool = False) -> None:
        """Writes ``content`` (bytes, a local file's path, or a binary file object) to ``path``.

        Parents are created; the write is atomic (a failed one leaves no partial file); mode
        0755 with ``make_executable``, else 0644; at most 500 MB.
        """
        if isinstance(content, (bytes, bytearray, memoryview)):
            await self._native.write_file(path, data=bytes(content), make_executable=make_executable)
        elif isinstance(content, os.PathLike):
            source = Path(content)
            if not source.is_file():
                raise FileNotFoundError(f"Source file not found: {source}")
            await self._native.write_file(path, source=source, make_executable=make_executable)
        elif hasattr(content, "read"):
            data = content.read()
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError("write_file takes a binary file object (its read() returned text)")
            await self._native.write_file(path, data=bytes(data), make_executable=make_executable)
        else:
            raise TypeError(
                f"content must be bytes, a path or a binary file object, not {type(content).__name__}"
            )

    async def read_file(self, path: str, *, destination: os.PathLike[str] | str | IO[bytes] | None = None) -> bytes | None:
        """Reads ``path`` from the sandbox.

        With a ``destination`` path, streams the file into it (written whole or not at all) and
        returns ``None``; with a binary file object, writes the content into it; without one,
        returns the content.
        """
        if destination is None:
            return await self._native.read_file(path)
        if isinstance(destination, (str, os.PathLike)):
            await self._native.read_file(path, destination=Path(destination))
            return None
        content = await self._native.read_file(path)
        destination.write(content)
        return None

    async def list_files(self, path: str = "") -> list[FileInfo]:
        """Lists the directory ``path`` (``""`` for the home directory)."""
        entries = await self._native.list_files(path)
        return [FileInfo(name, is_dir, size) for name, is_dir, size in entries]

    async def close(self) -> None:
        """Closes the session and destroys its VM. Closing a closed session does nothing."""
        await self._native.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = f"closed: {self.close_reason}" if self.closed else "open"
        return f"<Session {self.vm_id} {self.language} {state}, {self.exec_count} executions>"
