"""The Dockerfile: lint-clean for hadolint, and shaped as issue 6 asks (checked without a Docker engine;
scripts/build_image.sh builds and runs it for real)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from service.settings import Settings
from tests.deploy.promql import ROOT
from tests.deploy.tools import run_tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_hadolint_finds_nothing() -> None:
    result = run_tool("hadolint", "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text(encoding="utf-8"), "explain any ignored rule in the test"


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guards the test above against a hadolint that checks nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n", encoding="utf-8")
    result = run_tool("hadolint", "--no-color", str(bad))
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_multi_stage_on_a_base_image_argument_with_a_default() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    assert instructions[0][1].split("=", 1)[1], "BASE_IMAGE needs a default"
    stages = _stages()
    assert len(stages) >= 2
    assert all(stage[0][1].split()[0] == "${BASE_IMAGE}" for stage in stages)


def test_runtime_stage_copies_only_models_and_service_from_the_context() -> None:
    runtime = _stages()[-1]
    copies = [shlex.split(arguments) for keyword, arguments in runtime if keyword == "COPY"]
    from_context = sorted(args[0] for args in copies if not any(a.startswith("--from=") for a in args))
    assert from_context == ["models/", "service/"]
    assert any("--from=builder" in args for args in copies)


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "start from an empty context and allow what the image needs"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    sources = {
        shlex.split(arguments)[-2]
        for stage in _stages()
        for keyword, arguments in stage
        if keyword == "COPY" and "--from=" not in arguments
    }
    assert allowed == sources
    assert "**/__pycache__" in rules


def test_runs_as_a_non_root_user_with_port_and_health_check() -> None:
    runtime = _stages()[-1]
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit(), "a numeric user lets runtimes verify it is not root"
    exposed = [arguments for keyword, arguments in runtime if keyword == "EXPOSE"]
    port = Settings.model_fields["port"].default
    assert exposed == [str(port)]
    (healthcheck,) = [arguments for keyword, arguments in runtime if keyword == "HEALTHCHECK"]
    assert "/v2/health/ready" in healthcheck and "MIXOE_PORT" in healthcheck
    start_period = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start_period and int(start_period[1]) >= 120, "model loading on a cold GPU node takes a while"
    commands = [arguments for keyword, arguments in runtime if keyword in {"CMD", "ENTRYPOINT"}]
    assert commands == ['["python", "-m", "service"]']


@pytest.mark.parametrize("variable", ["NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_REQUIRE_CUDA", "MIXOE_HOST"])
def test_runtime_environment(variable: str) -> None:
    env = " ".join(arguments for keyword, arguments in _stages()[-1] if keyword == "ENV")
    assert f"{variable}=" in env
