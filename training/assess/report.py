"""The Markdown report shipped with a bundle: conventions, summary, metric tables and plots.

Conventions stated in every report: an OOD score is higher for more-OOD inputs, an input is
accepted as ID when ``score <= threshold``, and ID is the positive class for the metrics.

``evaluation`` has the shape produced by the evaluate command::

    {"id_accuracy": float,
     "scores": {score_name: {ood_set: {"tnr_at_95tpr", "fpr_at_95tpr", "auroc", "aupr_in", "aupr_out"}}},
     "operating_points": [{"target_id_acceptance", "threshold", "measured_id_acceptance",
                           "ood_acceptance": {ood_set: float}}],   # optional
     "risk_coverage": {score_name: {"aurc", "coverage": [...], "risk": [...]}},   # optional
     "risk_levels": [{"max_risk", "confidence_threshold", "measured_coverage", "measured_risk"}]}   # optional

:func:`markdown_table` is public so that other commands print the same tables.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from numpy.typing import ArrayLike

from training.assess.plots import plot_risk_coverage, plot_roc_curves, plot_score_histogram

# evaluation key -> column header; rates read best as percentages, areas as plain numbers.
METRIC_HEADERS = {
    "tnr_at_95tpr": "TNR@95TPR",
    "fpr_at_95tpr": "FPR@95TPR",
    "auroc": "AUROC",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
}
RATE_HEADERS = ("TNR@95TPR", "FPR@95TPR")

CONVENTIONS = (
    "**Conventions.** An OOD score is *higher for inputs that look more out-of-distribution*; an "
    "input is accepted as in-distribution (ID) when its score is at most the threshold and rejected "
    "when it exceeds it. For the metrics, ID is the positive class (the MixOE paper's convention): "
    "TPR is the share of ID accepted and FPR the share of OOD accepted. **TNR@95TPR** is the share "
    "of OOD rejected at the smallest threshold that accepts at least 95% of ID; **FPR@95TPR** = "
    "1 - TNR@95TPR is the OOD that gets through there. AUROC is the area under the (FPR, TPR) "
    "curve; AUPR-In is the average precision with ID as positive (ranked by -score), AUPR-Out with "
    "OOD as positive (ranked by score)."
)


def _format_cell(value: Any, as_percent: bool) -> str:
    """Numbers to 4 significant digits (or percentages with 2 decimals); missing values as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "nan"
        return f"{100.0 * number:.2f}%" if as_percent else f"{number:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], percent: Collection[str] = ()
) -> str:
    """A GitHub-flavoured Markdown table; ``columns`` are both the row keys and the headers.

    Floats print with 4 significant digits, those in ``percent`` columns as percentages
    (``0.9512 -> 95.12%``); a key missing from a row (or ``None``) prints as a dash, and ``|`` in
    text is escaped so that a cell never splits the table.
    """
    lines = [
        "| " + " | ".join(_format_cell(column, False) for column in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        cells = (_format_cell(row.get(column), column in percent) for column in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_file_names(set_names: Sequence[str]) -> dict[str, str]:
    """``hist_<set>.png`` per OOD set, with the set name made safe for file names and Markdown links."""
    names = {name: "hist_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png" for name in set_names}
    if len(set(names.values())) != len(names):
        raise ValueError(f"OOD set names collide once made file-safe: {sorted(set_names)}")
    return names


def _metric_rows(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for score_name, per_set in scores.items():
        for set_name, metrics in per_set.items():
            missing = sorted(set(METRIC_HEADERS) - set(metrics))
            if missing:
                raise ValueError(f"metrics for score {score_name!r} on {set_name!r} lack {missing}")
            row: dict[str, Any] = {"Score": score_name, "OOD set": set_name}
            row.update({header: metrics[key] for key, header in METRIC_HEADERS.items()})
            rows.append(row)
    return rows


def _operating_point_section(points: Sequence[Mapping[str, Any]]) -> list[str]:
    set_names = list(dict.fromkeys(name for point in points for name in point.get("ood_acceptance", {})))
    ood_columns = [f"OOD accepted: {name}" for name in set_names]
    rows = []
    for point in points:
        row: dict[str, Any] = {
            "Target ID acceptance": point["target_id_acceptance"],
            "Threshold": point["threshold"],
            "Measured ID acceptance": point.get("measured_id_acceptance"),
        }
        acceptance = point.get("ood_acceptance", {})
        row.update({column: acceptance.get(name) for column, name in zip(ood_columns, set_names)})
        rows.append(row)
    percent = ["Target ID acceptance", "Measured ID acceptance", *ood_columns]
    columns = ["Target ID acceptance", "Threshold", "Measured ID acceptance", *ood_columns]
    return [
        "## Operating points",
        "",
        "Calibrated thresholds (accept as ID when score <= threshold) and what they accept on the test sets.",
        "",
        markdown_table(rows, columns, percent=percent),
        "",
    ]


def _selective_section(evaluation: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Risk levels (if any) and, per score, AURC and the risk-coverage plot ``risk_coverage.png``."""
    lines = ["## Selective classification (ID test)", ""]
    if evaluation.get("risk_levels"):
        columns = ["Max risk", "Confidence threshold", "Measured coverage", "Measured risk"]
        rows = [
            dict(zip(columns, (level["max_risk"], level["confidence_threshold"], level.get("measured_coverage"),
                               level.get("measured_risk")), strict=True))
            for level in evaluation["risk_levels"]
        ]
        lines += [
            "Risk levels: an accepted image whose max softmax probability is below the threshold is answered "
            "`uncertain`; among the rest, at most the max risk are misclassified, with probability >= 1 - delta "
            "(docs/selective.md).",
            "",
            markdown_table(rows, columns, percent=("Max risk", "Measured coverage", "Measured risk")),
            "",
        ]
    curves = evaluation.get("risk_coverage") or {}
    if curves:
        plot_risk_coverage(
            {name: (c["coverage"], c["risk"], c["aurc"]) for name, c in curves.items()},
            out_dir / "risk_coverage.png", title="Risk-coverage on ID test images",
        )
        rows = [{"Score": name, "AURC": curve["aurc"]} for name, curve in curves.items()]
        lines += [
            "Accepting the images each score trusts most first: the error rate among the accepted against their "
            "share; AURC is the area under that curve (lower is better).",
            "",
            markdown_table(rows, ["Score", "AURC"]),
            "",
            "![Risk-coverage curves](risk_coverage.png)",
            "",
        ]
    return lines if len(lines) > 2 else []


def write_report(
    out_dir: Path,
    title: str,
    summary: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    id_scores: ArrayLike,
    ood_scores: Mapping[str, ArrayLike],
    thresholds: Mapping[float, float],
    score_name: str,
) -> Path:
    """Write ``report.md``, ``roc.png``, one ``hist_<set>.png`` per OOD set and, when ``evaluation``
    has risk-coverage curves, ``risk_coverage.png`` into ``out_dir``.

    ``summary`` is free-form key/value (model, method, ...); ``evaluation`` is described in the
    module docstring; ``id_scores``/``ood_scores`` are the ``score_name`` scores the plots show
    (higher = more OOD) and ``thresholds`` maps target ID acceptance -> threshold for the
    histograms. Images are linked relatively, so the folder can move as a whole. Returns the
    path of ``report.md``.
    """
    missing = sorted({"id_accuracy", "scores"} - set(evaluation))
    if missing:
        raise ValueError(f"evaluation lacks {missing}; expected keys id_accuracy, scores[, operating_points]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hist_files = _plot_file_names(list(ood_scores))

    plot_roc_curves(id_scores, ood_scores, out_dir / "roc.png", title=f"ROC, ID positive ({score_name})")
    for set_name, scores in ood_scores.items():
        plot_score_histogram(id_scores, scores, set_name, thresholds, out_dir / hist_files[set_name], score_name)

    summary_rows = [{"Item": key, "Value": value} for key, value in summary.items()]
    summary_rows.append({"Item": "ID top-1 accuracy", "Value": _format_cell(evaluation["id_accuracy"], True)})
    lines = [
        f"# {title}",
        "",
        CONVENTIONS,
        "",
        "## Summary",
        "",
        markdown_table(summary_rows, ["Item", "Value"]),
        "",
        "## OOD detection",
        "",
        markdown_table(_metric_rows(evaluation["scores"]), ["Score", "OOD set", *METRIC_HEADERS.values()],
                       percent=RATE_HEADERS),
        "",
    ]
    if evaluation.get("operating_points"):
        lines += _operating_point_section(evaluation["operating_points"])
    lines += _selective_section(evaluation, out_dir)
    lines += [f"## ROC curves ({score_name})", "", "![ROC curves](roc.png)", "", f"## Score histograms ({score_name})", ""]
    for set_name, file_name in hist_files.items():
        alt_text = re.sub(r"[\[\]\n]", " ", f"{score_name} histogram: ID vs {set_name}")
        lines += [f"![{alt_text}]({file_name})", ""]

    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
