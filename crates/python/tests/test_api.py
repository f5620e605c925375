"""The package's surface without booting a VM: names, configuration, exceptions, input
validation."""

from __future__ import annotations

import dataclasses

import pytest

import exec_sandbox
from exec_sandbox import (
    CodeValidationError,
    EnvVarValidationError,
    InputValidationError,
    Language,
    PortMapping,
    SandboxError,
    Scheduler,
    SchedulerConfig,
)


def test_reference_module_paths_export_the_same_objects() -> None:
    from exec_sandbox import config, exceptions, models, scheduler

    assert scheduler.Scheduler is exec_sandbox.Scheduler
    assert config.SchedulerConfig is exec_sandbox.SchedulerConfig
    for name in ("Language", "PortMapping", "ExecutionResult", "FileInfo", "TimingBreakdown"):
        assert getattr(models, name) is getattr(exec_sandbox, name)
    for name in exceptions.__all__:
        assert getattr(exceptions, name) is getattr(exec_sandbox, name)
        assert issubclass(getattr(exceptions, name), SandboxError)


def test_exception_hierarchy_matches_the_reference() -> None:
    e = exec_sandbox
    assert e.VmTimeoutError is e.VmBootTimeoutError
    assert e.VmBootError is e.VmTransientError
    assert e.VmError is e.VmPermanentError
    assert issubclass(e.VmCapacityError, e.TransientError)
    assert issubclass(e.SessionClosedError, e.PermanentError)
    assert issubclass(e.CodeValidationError, e.InputValidationError)
    assert issubclass(e.EnvVarValidationError, e.InputValidationError)
    assert issubclass(e.InputValidationError, ValueError)
    assert issubclass(e.CommunicationOutcomeUnknownError, e.CommunicationError)
    for child in (e.AssetDownloadError, e.AssetChecksumError, e.AssetNotFoundError):
        assert issubclass(child, e.AssetError)
    error = e.SandboxError("boom", {"kind": "transient"})
    assert (error.message, error.kind, error.field) == ("boom", "transient", None)


def test_config_defaults_and_keywords() -> None:
    config = SchedulerConfig(max_concurrent_vms=4, warm_pool_size=1)
    assert config.max_concurrent_vms == 4
    assert config.warm_pool_size == 1
    assert config.default_timeout_seconds == 30
    assert config.session_idle_timeout_seconds == 300
    assert config.s3_region == "us-east-1"
    assert config.enable_package_validation is True
    assert config.auto_download_assets is True
    assert config.images_dir == config.cache_dir / "images"
    assert set(SchedulerConfig.FIELDS) == set(config.model_dump())
    with pytest.raises(AttributeError):
        config.max_concurrent_vms = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent_vms", 0),
        ("max_concurrent_vms", "four"),
        ("default_timeout_seconds", 301),
        ("warm_pool_size", -1),
        ("session_idle_timeout_seconds", 5),
        ("memory_overcommit_ratio", 0.0),
        ("network_hosts", {"db": "not-an-ip"}),
    ],
)
def test_config_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InputValidationError) as raised:
        SchedulerConfig(**{field: value})
    assert raised.value.field == field
    assert field in str(raised.value)


def test_config_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not_a_field"):
        SchedulerConfig(not_a_field=1)


def test_config_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("EXEC_SANDBOX_MAX_CONCURRENT_VMS", "7")
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path))
    config = SchedulerConfig()
    assert config.max_concurrent_vms == 7
    assert config.cache_dir == tmp_path
    assert config.images_dir == tmp_path / "images"
    # A keyword wins over the environment.
    assert SchedulerConfig(max_concurrent_vms=3).max_concurrent_vms == 3
    monkeypatch.setenv("EXEC_SANDBOX_MAX_CONCURRENT_VMS", "many")
    with pytest.raises(InputValidationError) as raised:
        SchedulerConfig()
    assert raised.value.field == "EXEC_SANDBOX_MAX_CONCURRENT_VMS"


def test_models_are_immutable() -> None:
    port = PortMapping(8000)
    assert (port.internal, port.external, port.protocol) == (8000, None, "tcp")
    with pytest.raises(dataclasses.FrozenInstanceError):
        port.internal = 1  # type: ignore[misc]
    assert Language("javascript") is Language.JAVASCRIPT
    assert Language.RAW == "raw"


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"code": ""}, CodeValidationError, "code"),
        ({"code": "print(1)\0"}, CodeValidationError, "code"),
        ({"code": "x" * (1024 * 1024 + 1)}, CodeValidationError, "code"),
        ({"code": "1", "timeout_seconds": 0}, InputValidationError, "timeout_seconds"),
        ({"code": "1", "timeout_seconds": -5}, InputValidationError, "timeout_seconds"),
        ({"code": "1", "memory_mb": 64}, InputValidationError, "memory_mb"),
        ({"code": "1", "env_vars": {"LD_PRELOAD": "x"}}, EnvVarValidationError, "env_vars"),
        ({"code": "1", "language": "cobol"}, InputValidationError, "language"),
        ({"code": "1", "expose_ports": [PortMapping(80, 80)]}, InputValidationError, "expose_ports"),
        ({"code": "1", "expose_ports": [PortMapping(80, protocol="sctp")]}, InputValidationError, "expose_ports"),
        ({"code": "1", "allowed_domains": ["example.com"]}, InputValidationError, "allowed_domains"),
        ({"code": "1", "packages": ["requests"]}, InputValidationError, "packages"),
    ],
)
async def test_invalid_run_input_raises_before_any_vm(kwargs: dict, error: type, field: str) -> None:
    async with Scheduler(SchedulerConfig(warm_pool_size=0)) as scheduler:
        with pytest.raises(error) as raised:
            await scheduler.run(**kwargs)
    assert raised.value.field == field
    assert raised.value.kind == "invalid_input"
