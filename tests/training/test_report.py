"""The Markdown report and its plots. Scores: higher = more OOD; accepted as ID when score <= threshold."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from training.assess.evaluate import _curve_summary
from training.assess.metrics import ood_metrics, risk_coverage
from training.assess.report import markdown_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _inputs() -> tuple[np.ndarray, dict[str, np.ndarray], dict[float, float], dict]:
    rng = np.random.default_rng(0)
    id_scores = rng.normal(0.0, 1.0, 400)
    ood = {"fine (held-out)": rng.normal(1.0, 1.0, 300), "coarse": rng.normal(3.0, 1.0, 200)}
    thresholds = {0.95: float(np.quantile(id_scores, 0.95)), 0.9: float(np.quantile(id_scores, 0.9))}
    evaluation = {
        "id_accuracy": 0.87654,
        "scores": {"msp": {name: vars(ood_metrics(id_scores, scores)) for name, scores in ood.items()}},
        "operating_points": [
            {
                "target_id_acceptance": 0.95,
                "threshold": thresholds[0.95],
                "measured_id_acceptance": 0.9525,
                "ood_acceptance": {name: float(np.mean(s <= thresholds[0.95])) for name, s in ood.items()},
            }
        ],
        "risk_coverage": {"msp": _curve_summary(risk_coverage(id_scores, rng.random(400) < 0.1 + 0.1 * id_scores))},
        "risk_levels": [
            {"max_risk": 0.05, "confidence_threshold": 0.9, "measured_coverage": 0.4321, "measured_risk": 0.0432}
        ],
    }
    return id_scores, ood, thresholds, evaluation


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One full report, written once: plotting dominates the run time of these tests."""
    id_scores, ood, thresholds, evaluation = _inputs()
    summary = {"model": "resnet50", "method": "mixoe-cutmix", "epochs": 10}
    out_dir = tmp_path_factory.mktemp("report") / "run"
    path = write_report(out_dir, "Cars split 0", summary, evaluation, id_scores, ood, thresholds, "msp")
    assert path == out_dir / "report.md"
    return path, evaluation


def test_report_links_one_roc_and_one_histogram_per_set_all_real_pngs(report: tuple[Path, dict]) -> None:
    path, _ = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text(encoding="utf-8"))
    assert sorted(links) == ["hist_coarse.png", "hist_fine_held-out_.png", "risk_coverage.png", "roc.png"]
    for link in links:
        assert (path.parent / link).read_bytes()[:8] == PNG_SIGNATURE


def test_report_states_conventions_and_shows_summary_and_metric_values(report: tuple[Path, dict]) -> None:
    path, evaluation = report
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Cars split 0")
    assert "higher for inputs that look more out-of-distribution" in text and "ID is the positive class" in text
    assert "| model | resnet50 |" in text and "| ID top-1 accuracy | 87.65% |" in text
    coarse = evaluation["scores"]["msp"]["coarse"]
    row = next(line for line in text.splitlines() if line.startswith("| msp | coarse |"))
    assert f"{100 * coarse['tnr_at_95tpr']:.2f}%" in row and f"{coarse['auroc']:.4g}" in row
    assert f"{coarse['aupr_in']:.4g}" in row and f"{coarse['aupr_out']:.4g}" in row
    assert "## Operating points" in text and "95.25%" in text
    aurc = evaluation["risk_coverage"]["msp"]["aurc"]
    assert f"| msp | {aurc:.4g} |" in text
    assert "| 5.00% | 0.9 | 43.21% | 4.32% |" in text  # the risk level and what it measured


def test_report_without_operating_points_omits_that_section(tmp_path: Path) -> None:
    id_scores, ood, thresholds, evaluation = _inputs()
    del evaluation["operating_points"], evaluation["risk_coverage"], evaluation["risk_levels"]
    one_set = {"fine (held-out)": ood["fine (held-out)"]}
    text = write_report(tmp_path, "t", {}, evaluation, id_scores, one_set, thresholds, "msp").read_text()
    assert "Operating points" not in text and "| msp | fine (held-out) |" in text
    assert "Selective classification" not in text and not (tmp_path / "risk_coverage.png").exists()


def test_report_refuses_incomplete_evaluation_and_colliding_set_names(tmp_path: Path) -> None:
    id_scores, ood, thresholds, evaluation = _inputs()
    with pytest.raises(ValueError, match="id_accuracy"):
        write_report(tmp_path, "t", {}, {"scores": {}}, id_scores, ood, thresholds, "msp")
    with pytest.raises(ValueError, match="collide"):
        write_report(tmp_path, "t", {}, evaluation, id_scores, {"a b": ood["coarse"], "a/b": ood["coarse"]},
                     thresholds, "msp")


def test_markdown_table_formats_numbers_percentages_and_missing_cells() -> None:
    rows = [{"name": "a|b", "auroc": 0.912345678, "tnr": 0.5, "n": 12}, {"name": "c", "auroc": 1e-7}]
    table = markdown_table(rows, ["name", "auroc", "tnr", "n"], percent=["tnr"])
    assert table.splitlines() == [
        "| name | auroc | tnr | n |",
        "| --- | --- | --- | --- |",
        "| a\\|b | 0.9123 | 50.00% | 12 |",
        "| c | 1e-07 | — | — |",
    ]
