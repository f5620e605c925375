"""exec_sandbox: run untrusted Python, JavaScript and shell code in disposable QEMU microVMs.

The reference system's asyncio API over this project's Rust library::

    from exec_sandbox import Scheduler, SchedulerConfig

    async with Scheduler(SchedulerConfig(warm_pool_size=1)) as scheduler:
        result = await scheduler.run(code="print(6 * 7)", language="python")
        print(result.stdout)  # "42\\n"
"""

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.exceptions import (
    AssetChecksumError,
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    BalloonError,
    BalloonTransientError,
    CodeValidationError,
    CommunicationError,
    CommunicationOutcomeUnknownError,
    CommunicationTransientError,
    EnvVarValidationError,
    GuestAgentError,
    InputValidationError,
    OutputLimitError,
    PackageNotAllowedError,
    PermanentError,
    SandboxDependencyError,
    SandboxError,
    SessionClosedError,
    SnapshotError,
    SocketAuthError,
    TransientError,
    VmBootError,
    VmBootTimeoutError,
    VmCapacityError,
    VmConfigError,
    VmDependencyError,
    VmError,
    VmGvproxyError,
    VmOverlayError,
    VmPermanentError,
    VmQemuCrashError,
    VmTimeoutError,
    VmTransientError,
)
from exec_sandbox.models import (
    AcceleratorInfo,
    ExecutionResult,
    ExposedPort,
    FileInfo,
    Isolation,
    Language,
    PortMapping,
    TimingBreakdown,
)
from exec_sandbox.scheduler import Scheduler
from exec_sandbox.session import Session

__all__ = [
    "AcceleratorInfo",
    "AssetChecksumError",
    "AssetDownloadError",
    "AssetError",
    "AssetNotFoundError",
    "BalloonError",
    "BalloonTransientError",
    "CodeValidationError",
    "CommunicationError",
    "CommunicationOutcomeUnknownError",
    "CommunicationTransientError",
    "EnvVarValidationError",
    "ExecutionResult",
    "ExposedPort",
    "FileInfo",
    "GuestAgentError",
    "InputValidationError",
    "Isolation",
    "Language",
    "OutputLimitError",
    "PackageNotAllowedError",
    "PermanentError",
    "PortMapping",
    "SandboxDependencyError",
    "SandboxError",
    "Scheduler",
    "SchedulerConfig",
    "Session",
    "SessionClosedError",
    "SnapshotError",
    "SocketAuthError",
    "TimingBreakdown",
    "TransientError",
    "VmBootError",
    "VmBootTimeoutError",
    "VmCapacityError",
    "VmConfigError",
    "VmDependencyError",
    "VmError",
    "VmGvproxyError",
    "VmOverlayError",
    "VmPermanentError",
    "VmQemuCrashError",
    "VmTimeoutError",
    "VmTransientError",
]

__version__ = "0.1.0"
