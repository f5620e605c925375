"""``SchedulerConfig``: how a scheduler runs VMs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exec_sandbox import _native

__all__ = ["SchedulerConfig"]


class SchedulerConfig:
    """How a :class:`~exec_sandbox.Scheduler` runs VMs; immutable.

    Keyword arguments only, with the reference's names (``max_concurrent_vms``,
    ``warm_pool_size``, ``default_memory_mb``, ``default_timeout_seconds``,
    ``session_idle_timeout_seconds``, ``images_dir``, ``snapshot_cache_dir``, ``s3_bucket``,
    ``s3_region``, ``s3_prefix``, ``enable_package_validation``, ``auto_download_assets``) and
    the library's own (``cache_dir``, ``offline``, ``force_emulation``, ``l1_snapshots``,
    ``admission_timeout_seconds``, ...; the full list is ``SchedulerConfig.FIELDS``). Fields
    not given come from the ``EXEC_SANDBOX_*`` environment variables, else the defaults.
    Invalid values raise :class:`~exec_sandbox.InputValidationError` naming the field; an
    unknown name raises ``TypeError``.
    """

    FIELDS: tuple[str, ...] = tuple(_native.config_fields())

    __slots__ = ("_values",)

    def __init__(self, **kwargs: Any) -> None:
        values = dict(_native.resolve_config(kwargs))
        for name in ("cache_dir", "images_dir", "snapshot_cache_dir", "package_cache_dir"):
            values[name] = Path(values[name])
        for name in ("guest_ca_bundle", "qemu_binary"):
            if values[name] is not None:
                values[name] = Path(values[name])
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"SchedulerConfig has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("SchedulerConfig is immutable: make a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("SchedulerConfig is immutable: make a new one")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SchedulerConfig):
            return NotImplemented
        return self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"SchedulerConfig({inner})"

    def _resolved(self) -> dict[str, Any]:
        """Every field, as the native scheduler takes them."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self._values.items()}

    def model_dump(self) -> dict[str, Any]:
        """Every field and its value (the reference's pydantic spelling)."""
        return dict(self._values)
