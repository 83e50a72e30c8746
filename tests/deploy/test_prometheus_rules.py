"""Prometheus configuration and rules: valid for promtool, unit-tested, and written against real metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.promql import EXPORTED_SERIES, ROOT, RULES_DIR, alert_rules, metric_names, recording_rule_names
from tests.deploy.tools import run_tool

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
ALERTS = [rule["alert"] for rule in alert_rules()]


def test_config_and_its_rule_files_are_valid() -> None:
    result = run_tool("promtool", "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_rules_are_valid() -> None:
    result = run_tool("promtool", "check", "rules", *map(str, sorted(RULES_DIR.glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no rule unit tests in deploy/prometheus/tests"
    result = run_tool("promtool", "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_fail_when_an_alert_is_broken(tmp_path: Path) -> None:
    """The unit tests catch a changed alert: raise the 5xx limit from 5% to 50% and they must fail."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    rules = (RULES_DIR / "mixoe.rules.yml").read_text(encoding="utf-8")
    assert rules.count("> 0.05\n") == 1
    (tmp_path / "rules" / "mixoe.rules.yml").write_text(rules.replace("> 0.05\n", "> 0.5\n"), encoding="utf-8")
    for test_file in RULE_TESTS:
        shutil.copy(test_file, tmp_path / "tests" / test_file.name)
    result = run_tool("promtool", "test", "rules", *(str(tmp_path / "tests" / path.name) for path in RULE_TESTS))
    assert result.returncode != 0
    assert "MixOEServerErrorRatioHigh" in result.stdout + result.stderr


def _alert_tests() -> list[dict]:
    return [
        alert_test
        for path in RULE_TESTS
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
        for alert_test in case.get("alert_rule_test", [])
    ]


def test_the_issue_6_alerts_exist() -> None:
    assert set(ALERTS) >= {
        "MixOERejectionRatioHigh",
        "MixOERejectionRatioLow",
        "MixOEMedianOODScoreAboveThreshold",
        "MixOELatencyP95High",
        "MixOEServerErrorRatioHigh",
    }
    assert "mixoe:rejection_ratio:rate5m" in recording_rule_names()


@pytest.mark.parametrize("alert", ALERTS)
def test_each_alert_is_shown_both_firing_and_silent(alert: str) -> None:
    cases = [case for case in _alert_tests() if case["alertname"] == alert]
    assert any(case["exp_alerts"] for case in cases), f"no unit test shows {alert} firing"
    assert any(not case["exp_alerts"] for case in cases), f"no unit test shows {alert} staying silent"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_each_alert_says_how_bad_and_what_happened(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert rule.get("for"), "alerts need a `for` so one bad scrape does not page anyone"


def test_rules_query_only_exported_metrics_recording_rules_and_up() -> None:
    allowed = EXPORTED_SERIES | recording_rule_names() | {"up"}
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule["alert"]
                unknown = metric_names(rule["expr"]) - allowed
                assert not unknown, f"{path.name}: {name} reads unknown metrics {sorted(unknown)}"


def test_scrape_target_is_the_compose_api_service() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (target,) = [t for static in job["static_configs"] for t in static["targets"]]
    host, port = target.split(":")
    assert host in compose["services"] and job["metrics_path"] == "/metrics"
    assert port == str(compose["services"][host]["environment"]["MIXOE_PORT"])
    assert job["job_name"] == "mixoe"  # MixOEServiceDown selects up{job="mixoe"}
    prometheus = compose["services"]["prometheus"]
    mounts = {volume["target"]: volume["source"] for volume in prometheus["volumes"] if isinstance(volume, dict)}
    assert (ROOT / mounts["/etc/prometheus"]).resolve() == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
