"""Settings from MIXOE_* variables, and the combinations refused at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import export_settings
from service.settings import EMBEDDED_REPOSITORY, Settings, is_setting_variable


def test_defaults_point_at_the_embedded_repository() -> None:
    settings = Settings()
    assert EMBEDDED_REPOSITORY.name == "repository" and (EMBEDDED_REPOSITORY.parent / "runtime.py").is_file()
    assert settings.model_repository == EMBEDDED_REPOSITORY
    assert (settings.max_batch_size, settings.max_batch_delay_ms, settings.models, settings.api_keys) == (
        32,
        5.0,
        [],
        [],
    )


def test_lists_come_comma_separated_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXOE_MODELS", "flowers, cars:3")
    monkeypatch.setenv("MIXOE_API_KEYS", "first-key,second-key")
    monkeypatch.setenv("MIXOE_MAX_BATCH_SIZE", "64")
    settings = Settings()
    assert settings.models == ["flowers", "cars:3"]
    assert [key.get_secret_value() for key in settings.api_keys] == ["first-key", "second-key"]
    assert "first-key" not in repr(settings)  # keys never end up in logs
    assert settings.max_batch_size == 64


@pytest.mark.parametrize(
    "values",
    [
        {"models": ["Bad Name"]},
        {"device": "tpu"},
        {"queue_size": 4, "max_files": 8},
        {"max_request_bytes": 10, "max_upload_bytes": 100},
        {"max_batch_size": 0},
        {"unknown_option": 1},
        {"header_timeout_s": 0},
        {"body_timeout_s": -1},
        {"max_connections": 0},
    ],
    ids=[
        "model-reference", "device", "queue-below-request", "request-below-file", "batch-size", "unknown-option",
        "header-timeout", "body-timeout", "connections",
    ],
)
def test_impossible_settings_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


@pytest.mark.parametrize(
    ("workers", "device", "model_process", "expected"),
    [
        (4, "cuda", "auto", True),  # several workers on a GPU: one model process for all
        (4, "cuda:1", "auto", True),
        (1, "cuda", "auto", False),  # one worker: nothing to merge
        (4, "cpu", "auto", False),  # on a CPU a model process was slower (benchmarks/RESULTS.md)
        (4, "cuda", False, False),
        (1, "cpu", True, True),
    ],
)
def test_a_model_process_serves_several_workers_on_a_gpu_unless_told_otherwise(
    workers: int, device: str, model_process: object, expected: bool
) -> None:
    assert Settings(workers=workers, device=device, model_process=model_process).uses_model_process is expected


def test_environment_reproduces_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Worker processes rebuild their settings from ``environment()``: every field must survive."""
    settings = Settings(
        model_repository=tmp_path,
        models=["flowers", "cars:3"],
        default_model="cars",
        api_keys=["first-key", "second-key"],
        workers=3,
        max_batch_delay_ms=2.5,
        gpu_jpeg_decode=True,
        cuda_graphs=False,
        log_level="warning",
    )
    for key, value in settings.environment().items():
        monkeypatch.setenv(key, value)
    rebuilt = Settings()
    assert rebuilt.model_dump(exclude={"api_keys"}) == settings.model_dump(exclude={"api_keys"})
    assert [key.get_secret_value() for key in rebuilt.api_keys] == ["first-key", "second-key"]


def test_environment_of_the_defaults_leaves_optional_fields_unset() -> None:
    environment = Settings().environment()
    assert "MIXOE_DEFAULT_MODEL" not in environment
    assert (environment["MIXOE_MODELS"], environment["MIXOE_WORKERS"]) == ("", "1")


def test_export_settings_leaves_workers_exactly_these_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", os.environ.copy())  # export_settings edits the process environment
    os.environ |= {"mixoe_default_model": "stale", "MIXOE_MAX_FILES": "3", "OTHER": "kept"}  # names are case-blind
    settings = Settings(max_batch_size=8)  # reads the stale variables, then a flag unsets one
    assert settings.default_model == "stale"
    settings = settings.model_copy(update={"default_model": None})
    export_settings(settings)
    assert "mixoe_default_model" not in os.environ and os.environ["OTHER"] == "kept"
    assert Settings() == settings


@pytest.mark.parametrize(
    ("arguments", "environment", "expected"),
    [
        (
            ["--workers", "0", "--device", "tpu"],
            {},
            [
                "--workers / MIXOE_WORKERS: Input should be greater than or equal to 1 (got '0')",
                "--device / MIXOE_DEVICE: String should match pattern",
            ],
        ),
        ([], {"MIXOE_QUEUE_SIZE": "2"}, ["queue_size (2) must hold at least one full request (max_files=64)"]),
        ([], {"PROMETHEUS_MULTIPROC_DIR": ""}, ["PROMETHEUS_MULTIPROC_DIR is set but empty"]),
    ],
    ids=["flags", "between-settings", "empty-metrics-directory"],
)
def test_bad_settings_stop_the_server_with_a_message_not_a_traceback(
    arguments: list[str], environment: dict[str, str], expected: list[str]
) -> None:
    inherited = {key: value for key, value in os.environ.items() if not is_setting_variable(key)}
    finished = subprocess.run(
        [sys.executable, "-m", "service", *arguments],
        env=inherited | environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 1 and "Traceback" not in finished.stderr
    assert all(line in finished.stderr for line in expected), finished.stderr
