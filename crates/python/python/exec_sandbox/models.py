"""Data models: languages, port mappings, results and file entries. All immutable."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

__all__ = [
    "AcceleratorInfo",
    "ExecutionResult",
    "ExposedPort",
    "FileInfo",
    "Isolation",
    "Language",
    "PortMapping",
    "TimingBreakdown",
]


class Language(str, Enum):
    """The interpreters code runs in. Plain strings (``"python"``) work wherever one is taken."""

    PYTHON = "python"
    JAVASCRIPT = "javascript"
    RAW = "raw"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PortMapping:
    """A guest port to forward from ``127.0.0.1`` on the host.

    ``external`` is the host port (1024-65535), ``None`` for one the kernel picks;
    ``protocol`` is ``"tcp"`` or ``"udp"``.
    """

    internal: int
    external: int | None = None
    protocol: str = "tcp"


@dataclass(frozen=True)
class ExposedPort:
    """A forwarded port as bound: ``url`` is ``http://127.0.0.1:PORT`` (``udp://`` for UDP)."""

    internal: int
    external: int
    host: str
    protocol: str
    url: str


@dataclass(frozen=True)
class TimingBreakdown:
    """Where a run's host wall time went, in milliseconds.

    ``setup_ms`` contains ``admission_wait_ms``; ``boot_ms`` is ``vm_start_ms`` +
    ``guest_ready_ms`` (0 for a VM from the warm pool); ``execute_ms`` contains the guest's
    ``interpreter_start_ms``; ``teardown_ms`` follows (reading the VM's figures: the VM is
    killed just after the result returns, and ``Scheduler.close()`` waits for that);
    ``total_ms`` is the whole call.
    """

    setup_ms: int
    boot_ms: int
    execute_ms: int
    total_ms: int
    admission_wait_ms: int = 0
    vm_start_ms: int = 0
    guest_ready_ms: int = 0
    interpreter_start_ms: int = 0
    teardown_ms: int = 0


@dataclass(frozen=True)
class AcceleratorInfo:
    """Which accelerator ran the VM (``kvm`` or ``tcg``) and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Isolation:
    """The host walls around the VM's QEMU process."""

    cgroup: bool
    cgroup_version: str | None
    namespaces: tuple[str, ...]
    unprivileged: bool
    reason: str | None


@dataclass(frozen=True)
class FileInfo:
    """One entry of a sandbox directory."""

    name: str
    is_dir: bool
    size: int


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one execution. ``exit_code`` is -1 when the timeout fired (``timed_out``),
    128+N when the program was killed by signal N."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    execution_time_ms: int | None
    external_cpu_time_ms: int | None
    external_memory_peak_mb: int | None
    external_cpu_nr_throttled: int | None
    timing: TimingBreakdown
    accelerator: AcceleratorInfo
    warm_pool_hit: bool
    l1_cache_hit: bool
    exposed_ports: tuple[ExposedPort, ...]
    network_refusals: tuple[str, ...]
    packages_source: str
    packages_install_ms: int | None
    isolation: Isolation

    @classmethod
    def _from_json(cls, text: str) -> ExecutionResult:
        data: dict[str, Any] = json.loads(text)
        data["timing"] = TimingBreakdown(**data["timing"])
        data["accelerator"] = AcceleratorInfo(**data["accelerator"])
        data["exposed_ports"] = _ports(data["exposed_ports"])
        data["network_refusals"] = tuple(data["network_refusals"])
        isolation = data["isolation"]
        isolation["namespaces"] = tuple(isolation["namespaces"])
        data["isolation"] = Isolation(**isolation)
        known = {f.name for f in fields(cls)}
        # A field the library grew and this class does not know yet is dropped, never an error.
        return cls(**{k: v for k, v in data.items() if k in known})


def _ports(items: list[dict[str, Any]]) -> tuple[ExposedPort, ...]:
    return tuple(ExposedPort(**p) for p in items)
