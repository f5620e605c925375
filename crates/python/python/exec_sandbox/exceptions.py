"""The exception hierarchy: the reference's names, raised from the library's error kinds.

Every exception derives from :class:`SandboxError` and carries ``message`` (the whole cause
chain, and a ``hint:`` line when there is an obvious fix) and ``context``, a dict with ``kind``
(the library's stable kind: ``invalid_input``, ``transient``, ``outcome_unknown`` or
``permanent``), ``field`` (for invalid input: the argument or configuration field at fault) and
``hint``. Which library error raises which class is listed in the package's README.

Hierarchy::

    SandboxError
    ├── InputValidationError (also a ValueError)      ← kind invalid_input: nothing ran
    │   ├── CodeValidationError
    │   ├── EnvVarValidationError
    │   └── PackageNotAllowedError
    ├── TransientError                                ← kind transient: safe to retry
    │   ├── VmTransientError (= VmBootError)
    │   │   ├── VmBootTimeoutError (= VmTimeoutError)
    │   │   ├── VmOverlayError
    │   │   ├── VmQemuCrashError
    │   │   ├── VmGvproxyError
    │   │   └── VmCapacityError
    │   ├── BalloonTransientError (= BalloonError)
    │   └── CommunicationTransientError
    ├── PermanentError                                ← kind permanent: an operator must act
    │   ├── VmPermanentError (= VmError)
    │   │   ├── VmConfigError
    │   │   └── VmDependencyError
    │   └── SessionClosedError
    ├── CommunicationError
    │   ├── CommunicationOutcomeUnknownError          ← kind outcome_unknown: may have run
    │   └── SocketAuthError
    ├── GuestAgentError
    ├── SnapshotError
    ├── OutputLimitError
    ├── SandboxDependencyError
    └── AssetError
        ├── AssetDownloadError
        ├── AssetChecksumError
        └── AssetNotFoundError
"""

from __future__ import annotations

from typing import Any

__all__ = [
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
    "GuestAgentError",
    "InputValidationError",
    "OutputLimitError",
    "PackageNotAllowedError",
    "PermanentError",
    "SandboxDependencyError",
    "SandboxError",
    "SessionClosedError",
    "SnapshotError",
    "SocketAuthError",
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


class SandboxError(Exception):
    """Base of every exec-sandbox error.

    Attributes:
        message: What went wrong, with its causes (and a ``hint:`` line when there is a fix).
        context: ``kind``, ``field`` and ``hint`` (see the module's documentation).
    """

    def __init__(self, message: str, context: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = dict(context or {})

    @property
    def kind(self) -> str | None:
        """The library's stable error kind, when the library raised it."""
        return self.context.get("kind")

    @property
    def field(self) -> str | None:
        """For invalid input: the argument or configuration field at fault."""
        return self.context.get("field")

    @property
    def hint(self) -> str | None:
        """A suggested fix, when there is one."""
        return self.context.get("hint")


class SandboxDependencyError(SandboxError):
    """An optional dependency is missing (never raised here: the package has none)."""


class InputValidationError(SandboxError, ValueError):
    """The caller's input broke a rule; nothing ran. ``field`` names the culprit."""


class CodeValidationError(InputValidationError):
    """The code is empty, larger than 1 MiB or contains a NUL byte."""


class EnvVarValidationError(InputValidationError):
    """Too many environment variables, or one with a bad name or value."""


class PackageNotAllowedError(InputValidationError):
    """A package is outside its ecosystem's allowlist (package validation on)."""


class TransientError(SandboxError):
    """Infrastructure failed before the code was dispatched: safe to retry."""


class PermanentError(SandboxError):
    """Retrying will not help without operator action."""


class VmTransientError(TransientError):
    """The VM failed to start or answer before the code ran."""


class VmBootTimeoutError(VmTransientError):
    """The guest agent did not become ready in time."""


class VmOverlayError(VmTransientError):
    """A VM disk could not be prepared (never raised here: see the README)."""


class VmQemuCrashError(VmTransientError):
    """QEMU exited during boot."""


class VmGvproxyError(VmTransientError):
    """The VM's network gateway could not start."""


class VmCapacityError(VmTransientError):
    """No VM could be admitted before the admission deadline."""


class BalloonTransientError(TransientError):
    """A memory balloon operation failed (never raised here: see the README)."""


class CommunicationTransientError(TransientError):
    """Contact with the VM failed before dispatch (never raised here: boot errors cover it)."""


class VmPermanentError(PermanentError):
    """A VM error retrying will not fix."""


class VmConfigError(VmPermanentError):
    """The host setup refuses to run VMs (a cache directory others can write, say)."""


class VmDependencyError(VmPermanentError):
    """A required binary is missing (QEMU, a tool)."""


class SessionClosedError(PermanentError):
    """The session is closed (explicitly, idle, or its VM was lost); open a new one."""


class CommunicationError(SandboxError):
    """Communication with the guest failed."""


class CommunicationOutcomeUnknownError(CommunicationError):
    """Contact was lost after the code was dispatched: it may or may not have run."""


class SocketAuthError(CommunicationError):
    """The control socket's peer was not the QEMU started (never raised: see the README)."""


class GuestAgentError(SandboxError):
    """The guest agent refused or failed the request."""


class SnapshotError(SandboxError):
    """A snapshot operation failed (never raised: a failed snapshot falls back to a boot)."""


class OutputLimitError(SandboxError):
    """The guest sent more than a file may hold (stdout and stderr are truncated instead)."""


class AssetError(SandboxError):
    """Guest assets (kernel, images) could not be readied."""


class AssetDownloadError(AssetError):
    """Downloading an asset failed."""


class AssetChecksumError(AssetError):
    """An asset or manifest does not match its pinned SHA-256."""


class AssetNotFoundError(AssetError):
    """Assets are missing and fetching them is disabled (or impossible)."""


# The reference's aliases.
VmError = VmPermanentError
VmTimeoutError = VmBootTimeoutError
VmBootError = VmTransientError
BalloonError = BalloonTransientError
