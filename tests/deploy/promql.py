"""What the deployment files may query: the service's metric names, and a PromQL name extractor.

The names are the contract between ``service/monitoring/metrics.py`` and ``deploy/`` (alert rules, Grafana);
``test_prometheus_integration.py`` checks them against a real service scraped by a real Prometheus.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"

COUNTERS = ("mixoe_predictions_total", "mixoe_requests_total", "mixoe_bad_inputs_total")
GAUGES = (
    "mixoe_threshold",
    "mixoe_expected_rejection_ratio",
    "mixoe_queue_depth",
    "mixoe_model_info",
    "mixoe_drift_log10_martingale",
    "mixoe_drift_alarm",
)
HISTOGRAMS = (
    "mixoe_ood_score",
    "mixoe_request_duration_seconds",
    "mixoe_queue_wait_seconds",
    "mixoe_batch_size",
    "mixoe_inference_seconds",
)
EXPORTED_SERIES = frozenset(
    [*COUNTERS, *GAUGES, *(f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count"))]
) - {"mixoe_ood_score_sum"}
"""Every series name the service always exports (histograms as their _bucket/_sum/_count series).

Not ``mixoe_ood_score_sum``: prometheus_client leaves a histogram's ``_sum`` out whenever a bucket
bound is negative, as it is for scores such as maxlogit and energy, so no query may rely on it.
"""

_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
     "quantile", "limitk", "limit_ratio"}
)  # fmt: skip
_KEYWORDS = _AGGREGATIONS | {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression (or Grafana ``label_values`` query) reads.

    Strings, Grafana variables, label matchers, range and subquery brackets and grouping label
    lists are removed first; what remains is functions (an identifier before ``(``), keywords,
    numbers and durations, and metric names.
    """
    values_query = _LABEL_VALUES.match(expr)
    if values_query:
        expr = values_query["selector"]
    elif expr.strip().startswith("label_values("):  # label_values(label): every series, no metric named
        return set()
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("1m", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _LABEL_LIST.sub(r"\1", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if match[0] in _KEYWORDS or rest.startswith("("):
            continue
        names.add(match[0])
    return names


def rule_groups() -> list[dict]:
    """Every rule group in deploy/prometheus/rules/*.yml."""
    groups = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        groups += yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return groups


def recording_rule_names() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def alert_rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]
