"""The comparison table of ``mixoe compare``: mean ± std, paired differences, validation-only selection.

Input is one :class:`Record` per (holdout split, seed, method, score). Three things come out:

* per (method, score): mean ± std over splits × seeds of ID accuracy, the validation criterion and,
  per OOD set, AUROC and TNR@95TPR;
* per OOD set and (method, score): the paired difference in AUROC against the best *other*
  method's row, unit by unit (same split, same seed, so the same baseline and data). A row is a
  ``win`` only if the mean difference exceeds two standard errors of the differences, a ``loss``
  if it is below minus two, else a ``tie``: with a few splits, one point is noise;
* the selected (method, score): the highest validation criterion among rows whose ID validation
  accuracy is within ``max_accuracy_drop`` of the baseline's. The criterion looks at no OOD test
  set: the AUROC of ID validation images against the ID classes left out of training
  (:data:`CRITERIA`), or against the same validation images blended 50/50 with validation outliers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from training.assess.report import markdown_table
from training.assess.scoring import VAL_CLASSES

WIN_STANDARD_ERRORS = 2.0
BLEND = "val_blend"  # the validation set of ID validation images blended with validation outliers
CRITERIA = {
    VAL_CLASSES: "AUROC of ID validation images vs the images of the ID classes left out of training",
    BLEND: "AUROC of ID validation images vs the same images blended 50/50 with validation outliers",
}


@dataclass(frozen=True)
class Record:
    """One model under one score, on one (split, seed) unit."""

    split: int | None
    seed: int
    method: str
    score: str
    id_accuracy: float
    val_accuracy: float
    criterion: float
    ood: dict[str, dict[str, float]] = field(default_factory=dict)  # set -> {"auroc", "tnr_at_95tpr"}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _rows(records: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    rows: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        rows.setdefault((record.method, record.score), []).append(record)
    return rows


def summarize(records: Sequence[Record], set_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per (method, score): ``{key: mean, key_std: std}`` for accuracy, criterion and each set's metrics."""
    table = []
    for (method, score), group in _rows(records).items():
        row: dict[str, Any] = {"method": method, "score": score, "units": len(group)}
        values = {"id_accuracy": [r.id_accuracy for r in group], "val_accuracy": [r.val_accuracy for r in group],
                  "criterion": [r.criterion for r in group]}
        for name in set_names:
            for metric in ("auroc", "tnr_at_95tpr"):
                values[f"{name}.{metric}"] = [r.ood[name][metric] for r in group]
        for key, series in values.items():
            row[key], row[f"{key}_std"] = _mean_std(series)
        table.append(row)
    return table


def paired_differences(
    records: Sequence[Record], table: Sequence[dict[str, Any]], set_name: str
) -> list[dict[str, Any]]:
    """Each row's AUROC on ``set_name`` minus that of the best row of another method, paired by unit."""
    by_unit = {(r.method, r.score, r.split, r.seed): r for r in records}
    key = f"{set_name}.auroc"
    result = []
    for row in table:
        others = [o for o in table if o["method"] != row["method"]]
        if not others:
            continue
        best = max(others, key=lambda o: o[key])
        diffs = [
            r.ood[set_name]["auroc"] - by_unit[(best["method"], best["score"], r.split, r.seed)].ood[set_name]["auroc"]
            for r in records
            if (r.method, r.score) == (row["method"], row["score"])
        ]
        mean, std = _mean_std(diffs)
        margin = WIN_STANDARD_ERRORS * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
        verdict = "win" if mean > margin else "loss" if mean < -margin else "tie"
        result.append({"method": row["method"], "score": row["score"], "against": f"{best['method']}/{best['score']}",
                       "difference": mean, "difference_std": std, "units": len(diffs), "verdict": verdict})
    return result


def select(table: Sequence[dict[str, Any]], baseline_method: str | None, max_accuracy_drop: float) -> dict[str, Any]:
    """The row with the best validation criterion among those accurate enough (see module docstring)."""
    floor = -math.inf
    if baseline_method is not None:
        floor = next(r["val_accuracy"] for r in table if r["method"] == baseline_method) - max_accuracy_drop
    eligible = [r for r in table if r["val_accuracy"] >= floor] or list(table)
    return max(eligible, key=lambda r: r["criterion"])


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{100 * row[key]:.1f} ± {100 * row[key + '_std']:.1f}"


def markdown(table: Sequence[dict[str, Any]], paired: dict[str, list[dict[str, Any]]], selected: dict[str, Any],
             criterion: str) -> str:
    """The main table, one paired-difference table per OOD set, and the selection (percentages);
    ``criterion`` names the validation set the criterion used (a key of :data:`CRITERIA`)."""
    set_names = list(paired)
    columns = ["method", "score", "ID acc.", "val criterion"]
    for name in set_names:
        columns += [f"{name} AUROC", f"{name} TNR@95TPR"]
    rows = []
    for row in table:
        cells = {"method": row["method"], "score": row["score"], "ID acc.": _cell(row, "id_accuracy"),
                 "val criterion": _cell(row, "criterion")}
        for name in set_names:
            cells[f"{name} AUROC"] = _cell(row, f"{name}.auroc")
            cells[f"{name} TNR@95TPR"] = _cell(row, f"{name}.tnr_at_95tpr")
        rows.append(cells)
    units = table[0]["units"] if table else 0
    parts = [
        f"Mean ± std (%) over {units} split × seed unit(s). OOD score higher = more OOD; ID is the positive "
        f"class. val criterion: {CRITERIA[criterion]} (no OOD test data).\n",
        markdown_table(rows, columns),
    ]
    for name, diffs in paired.items():
        parts.append(f"\nPaired AUROC difference on {name} against the best other method (points; win/loss only "
                     f"beyond {WIN_STANDARD_ERRORS:g} standard errors):\n")
        shown = [{**d, "difference": f"{100 * d['difference']:+.1f} ± {100 * d['difference_std']:.1f}"} for d in diffs]
        parts.append(markdown_table(shown, ["method", "score", "against", "difference", "verdict"]))
    parts.append(f"\nSelected on validation data only: **{selected['method']} / {selected['score']}** "
                 f"(val criterion {100 * selected['criterion']:.1f}%, ID val accuracy "
                 f"{100 * selected['val_accuracy']:.1f}%).\n")
    return "\n".join(parts)
