"""The provisioned Grafana dashboard queries only what the service exports and shows what issue 6 asks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import EXPORTED_SERIES, ROOT, metric_names, recording_rule_names
from tests.deploy.tools import run_tool

DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


def _dashboards() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, query)`` for every panel target and every query variable."""
    queries = [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            queries.append((f"variable {variable['name']!r}", query))
    return queries


@pytest.fixture(scope="module", params=_dashboards(), ids=lambda path: path.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return json.loads(request.param.read_text(encoding="utf-8"))


def test_there_is_a_dashboard() -> None:
    assert [path.name for path in _dashboards()] == ["mixoe-service.json"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (model, version) (rate(mixoe_predictions_total{decision="rejected"}[5m]))',
            {"mixoe_predictions_total"},
        ),
        (
            'histogram_quantile(0.9, sum by (le) (rate(mixoe_batch_size_bucket{route!~"/a|b"}[$__rate_interval])))',
            {"mixoe_batch_size_bucket"},
        ),
        (
            'mixoe:rejection_ratio:rate5m{model=~"$model"} > on (model) group_left () up offset 5m',
            {"mixoe:rejection_ratio:rate5m", "up"},
        ),
        ("abs(some_metric - 1e-9) < bool 1.5e+3 and other_metric", {"some_metric", "other_metric"}),
        ('label_values(mixoe_model_info{model=~"$model"}, version)', {"mixoe_model_info"}),
        ("label_values(model)", set()),
        ('sum without (route, method, status) (mixoe_requests_total{status=~"5.."})', {"mixoe_requests_total"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_query_names_only_exported_metrics_or_recording_rules(dashboard: dict[str, Any]) -> None:
    allowed = EXPORTED_SERIES | recording_rule_names()
    queries = _queries(dashboard)
    assert len(queries) >= 15
    unknown = {
        where: sorted(metric_names(query) - allowed) for where, query in queries if metric_names(query) - allowed
    }
    assert not unknown, f"queries name metrics the service does not export: {unknown}"
    for where, query in queries:
        assert metric_names(query), f"{where} names no metric at all: {query!r}"


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query (Grafana variables replaced by values) as a recording rule."""
    rules = []
    for index, (_, query) in enumerate(_queries(dashboard)):
        if query.startswith("label_values("):
            query = metric_names(query).pop()
        query = query.replace("$__rate_interval", "1m")
        query = re.sub(r"\$\{?\w+\}?", ".*", query)
        rules.append({"record": f"dashboard_query_{index}", "expr": query})
    rules_file = tmp_path / "dashboard.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = run_tool("promtool", "check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


def _panel_reading(dashboard: dict[str, Any], *names: str) -> dict[str, Any]:
    for panel in _panels(dashboard):
        read = set().union(*(metric_names(target["expr"]) for target in panel.get("targets", [])))
        if set(names) <= read:
            return panel
    raise AssertionError(f"no panel queries all of {names}")


def test_the_panels_issue_6_asks_for_are_there(dashboard: dict[str, Any]) -> None:
    _panel_reading(dashboard, "mixoe_requests_total")  # request rate and errors
    assert _panel_reading(dashboard, "mixoe_request_duration_seconds_bucket")["fieldConfig"]["defaults"]["unit"] == "s"
    versus = _panel_reading(dashboard, "mixoe:rejection_ratio:rate5m", "mixoe:expected_rejection_ratio:rate5m")
    assert versus["fieldConfig"]["defaults"]["unit"] == "percentunit"
    heatmap = _panel_reading(dashboard, "mixoe_ood_score_bucket")
    assert heatmap["type"] == "heatmap"
    assert heatmap["targets"][0]["format"] == "heatmap" and heatmap["options"]["calculate"] is False
    _panel_reading(dashboard, "mixoe_batch_size_bucket")
    _panel_reading(dashboard, "mixoe_queue_wait_seconds_bucket")


def test_layout_is_consistent(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the dashboard"
    assert dashboard["uid"] == "mixoe-service"


def test_data_source_and_dashboard_folder_are_provisioned_where_compose_mounts_them(dashboard: dict[str, Any]) -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    (datasource,) = datasources["datasources"]
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == datasource["uid"]
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    mounts = {
        volume["target"]: volume["source"]
        for volume in compose["services"]["grafana"]["volumes"]
        if isinstance(volume, dict)
    }
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "mixoe.yml").read_text(encoding="utf-8"))["providers"]
    assert (ROOT / mounts[providers[0]["options"]["path"]]).resolve() == DASHBOARD_DIR
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == PROVISIONING
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARD_DIR / Path(home).name).is_file() and Path(home).parent.as_posix() == providers[0]["options"][
        "path"
    ]
