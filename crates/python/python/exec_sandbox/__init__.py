"""exec_sandbox: run untrusted Python, JavaScript and shell code in disposable QEMU microVMs.

The reference system's asyncio API over this project's Rust library::

    from exec_sandbox import Scheduler, SchedulerConfig

    async with Scheduler(SchedulerConfig(warm_pool_size=1)) as scheduler:
        result = await scheduler.run(code="print(6 * 7)", language="python")
        print(result.stdout)  # "42\\n"
"""

from exec_sandbox import exceptions as _exceptions
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.exceptions import *  # noqa: F403 (every exception, listed once in its module)
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
    "ExecutionResult",
    "ExposedPort",
    "FileInfo",
    "Isolation",
    "Language",
    "PortMapping",
    "Scheduler",
    "SchedulerConfig",
    "Session",
    "TimingBreakdown",
    *_exceptions.__all__,
]

__version__ = "0.1.0"
