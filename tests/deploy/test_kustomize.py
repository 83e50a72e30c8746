"""tests/deploy/kustomize.py: renders what kubectl kustomize renders, and refuses what it cannot render."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy.kustomize import KustomizeError, object_id, render, split_image, strategic_merge
from tests.deploy.promql import ROOT
from tests.deploy.tools import run_tool

KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = sorted(str(path.parent.relative_to(KUBERNETES)) for path in KUBERNETES.rglob("kustomization.yaml"))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_what_kubectl_kustomize_renders(kustomization: str) -> None:
    result = run_tool("kubectl", "kustomize", str(KUBERNETES / kustomization))
    assert result.returncode == 0, result.stderr
    theirs = {object_id(manifest): manifest for manifest in yaml.safe_load_all(result.stdout) if manifest}
    ours = {object_id(manifest): manifest for manifest in render(KUBERNETES / kustomization)}
    assert ours == theirs


def test_strategic_merge_merges_named_lists_and_replaces_the_others() -> None:
    original = {
        "containers": [{"name": "a", "image": "x:1", "env": [{"name": "K", "value": "1"}]}, {"name": "b"}],
        "metrics": [{"type": "Pods", "value": "64"}],
        "data": {"keep": "1", "drop": "2"},
    }
    patch = {
        "containers": [{"name": "a", "env": [{"name": "L", "value": "2"}]}, {"name": "c"}],
        "metrics": [{"type": "Pods", "value": "16"}],
        "data": {"drop": None, "new": "3"},
    }
    assert strategic_merge(original, patch) == {
        "containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "2"}]},
            {"name": "b"},
            {"name": "c"},
        ],
        "metrics": [{"type": "Pods", "value": "16"}],
        "data": {"keep": "1", "new": "3"},
    }
    assert original["data"] == {"keep": "1", "drop": "2"}  # the original is left alone


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("mixoe-service:0.1.0", ("mixoe-service", "0.1.0")),
        ("registry:5000/team/mixoe-service:0.1.0", ("registry:5000/team/mixoe-service", "0.1.0")),
        ("registry:5000/mixoe-service", ("registry:5000/mixoe-service", None)),
        ("mixoe-service@sha256:" + "0" * 64, ("mixoe-service", None)),
    ],
)
def test_split_image(reference: str, expected: tuple[str, str | None]) -> None:
    assert split_image(reference) == expected


def _kustomization(directory: Path, text: str, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(text, encoding="utf-8")
    for name, content in files.items():
        (directory / name.replace("_", ".")).write_text(content, encoding="utf-8")
    return directory


CONFIG = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {A: '1'}\n"


@pytest.mark.parametrize(
    ("kustomization", "files", "message"),
    [
        ("namePrefix: x-\nresources: [config.yaml]\n", {"config_yaml": CONFIG}, "unsupported kustomization fields"),
        ("resources: [config.yaml, again.yaml]\n", {"config_yaml": CONFIG, "again_yaml": CONFIG}, "more than once"),
        (
            "resources: [config.yaml]\npatches: [{path: p.yaml, target: {kind: ConfigMap}}]\n",
            {"config_yaml": CONFIG, "p_yaml": CONFIG},
            "only patches given by path",
        ),
        (
            "resources: [config.yaml]\npatches: [{path: p.yaml}]\n",
            {"config_yaml": CONFIG, "p_yaml": CONFIG.replace("name: settings", "name: other")},
            "no ConfigMap named other",
        ),
        ("resources: [config.yaml]\npatches: [{path: ../outside.yaml}]\n", {"config_yaml": CONFIG}, "not in or below"),
        ("resources: [config.yaml]\nimages: [{name: a, digest: 'sha256:0'}]\n", {"config_yaml": CONFIG}, "digest"),
    ],
)
def test_refuses_what_it_does_not_render(tmp_path: Path, kustomization: str, files: dict, message: str) -> None:
    (tmp_path / "outside.yaml").write_text(CONFIG, encoding="utf-8")
    directory = _kustomization(tmp_path / "k", kustomization, **files)
    with pytest.raises(KustomizeError, match=message):
        render(directory)
