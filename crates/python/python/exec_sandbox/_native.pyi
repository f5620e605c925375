"""Type stubs of the native extension (crates/python/src). Private: use the package's API."""

from collections.abc import Awaitable, Callable
from os import PathLike
from typing import Any

MAX_FILE_BYTES: int

def resolve_config(overrides: dict[str, Any]) -> dict[str, Any]: ...
def config_fields() -> list[str]: ...

_Deliver = Callable[[bytes], None] | None
_Port = tuple[int, int | None, str]

class NativeScheduler:
    def __init__(self, resolved: dict[str, Any]) -> None: ...
    def run(
        self,
        language: str,
        code: str,
        *,
        timeout_seconds: int | None = None,
        memory_mb: int | None = None,
        env_vars: list[tuple[str, str]] = ...,
        packages: list[str] = ...,
        allow_network: bool = False,
        allowed_domains: list[str] | None = None,
        expose_ports: list[_Port] = ...,
        on_stdout: _Deliver = None,
        on_stderr: _Deliver = None,
        on_boot_log: _Deliver = None,
    ) -> Awaitable[str]: ...
    def session(
        self,
        language: str,
        *,
        packages: list[str] = ...,
        memory_mb: int | None = None,
        allow_network: bool = False,
        allowed_domains: list[str] | None = None,
        expose_ports: list[_Port] = ...,
        env_vars: list[tuple[str, str]] = ...,
        idle_timeout_seconds: int | None = None,
    ) -> Awaitable[NativeSession]: ...
    def shutdown(self) -> Awaitable[None]: ...
    def warm_pool_vms(self) -> list[str]: ...

class NativeSession:
    exec_count: int
    close_reason: str | None
    exposed_ports: str
    language: str
    vm_name: str
    def exec(
        self,
        code: str,
        *,
        timeout_seconds: int | None = None,
        env_vars: list[tuple[str, str]] = ...,
        on_stdout: _Deliver = None,
        on_stderr: _Deliver = None,
    ) -> Awaitable[str]: ...
    def write_file(
        self,
        path: str,
        *,
        data: bytes | None = None,
        source: PathLike[str] | str | None = None,
        make_executable: bool = False,
    ) -> Awaitable[int]: ...
    def read_file(self, path: str, *, destination: PathLike[str] | str | None = None) -> Awaitable[Any]: ...
    def list_files(self, path: str = "") -> Awaitable[list[tuple[str, bool, int]]]: ...
    def close(self) -> Awaitable[None]: ...
