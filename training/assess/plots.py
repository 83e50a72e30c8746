"""PNG plots for reports: ROC curves, OOD-score histograms and risk-coverage curves.

Conventions: an OOD score is higher for more-OOD inputs, an input is accepted as ID when
``score <= threshold``, and ID is the positive class (TPR = ID accepted, FPR = OOD accepted).

Figures are drawn on matplotlib's Agg canvas directly (object-oriented API, no ``pyplot``), so
plotting works on headless machines and never switches the backend of the calling process.
matplotlib is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from training.assess.metrics import HEADLINE_TPR, auroc, roc_curve_id_positive

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _percent_label(fraction: float) -> str:
    """``0.95 -> '95%'``, ``0.995 -> '99.5%'``: as many digits as the value needs, up to 4."""
    return f"{100.0 * fraction:.4g}%"


def _new_figure() -> Figure:
    """A figure bound to its own Agg canvas: no pyplot state, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def plot_roc_curves(
    id_scores: ArrayLike, ood_sets: Mapping[str, ArrayLike], path: Path | str, title: str
) -> Path:
    """One ID-positive ROC curve per OOD set (x: OOD accepted, y: ID accepted), AUROC in the legend."""
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, ood_scores in ood_sets.items():
        fpr, tpr, _ = roc_curve_id_positive(id_scores, ood_scores)
        axes.plot(fpr, tpr, label=f"{name} (AUROC {auroc(id_scores, ood_scores):.4f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
    axes.axhline(HEADLINE_TPR, color="black", linestyle=":", linewidth=0.8,
                 label=f"{_percent_label(HEADLINE_TPR)} ID accepted")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), title=title,
             xlabel="FPR: share of OOD accepted (score <= t)",
             ylabel="TPR: share of ID accepted (score <= t)")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_score_histogram(
    id_scores: ArrayLike,
    ood_scores: ArrayLike,
    ood_name: str,
    thresholds: Mapping[float, float],
    path: Path | str,
    score_name: str,
) -> Path:
    """Density histograms of ID and OOD scores on shared bins, with each threshold as a vertical line.

    ``thresholds`` maps a target ID acceptance (e.g. 0.95) to its threshold; inputs left of a line
    (``score <= t``) are accepted as ID, so the OOD mass left of it is what leaks through.
    """
    id_array = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_array = np.asarray(ood_scores, dtype=np.float64).ravel()
    bins = np.histogram_bin_edges(np.concatenate([id_array, ood_array]), bins=50)
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(id_array, bins=bins, density=True, alpha=0.55, label=f"ID (n={id_array.size})")
    axes.hist(ood_array, bins=bins, density=True, alpha=0.55, label=f"{ood_name} (n={ood_array.size})")
    # C0 and C1 are the two histograms; the lines take the next colours of the default cycle.
    for index, (target, threshold) in enumerate(sorted(thresholds.items())):
        axes.axvline(threshold, color=f"C{index + 2}", linestyle="--", linewidth=1.0,
                     label=f"{_percent_label(target)} ID accepted (t = {threshold:.4g})")
    axes.set(title=f"{score_name}: ID vs {ood_name}", ylabel="density",
             xlabel=f"OOD score {score_name} (higher = more OOD; accepted when <= t)")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_risk_coverage(curves: Mapping[str, tuple[ArrayLike, ArrayLike, float]], path: Path | str, title: str) -> Path:
    """One risk-coverage curve per score, ``curves[name] = (coverage, risk, aurc)``: accepting the
    images a score trusts most first, the error rate among those accepted (y) against their share (x)."""
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, (coverage, risk, aurc) in curves.items():
        axes.plot(coverage, risk, label=f"{name} (AURC {aurc:.4f})")
    axes.set(xlim=(0, 1), ylim=(0, None), title=title, xlabel="coverage: share of ID test images accepted",
             ylabel="risk: error rate among accepted")
    axes.legend(loc="upper left", fontsize="small")
    return _save(figure, path)
