"""``mixoe compare``: one baseline, every method fine-tuned from it, every model under every score.

For each holdout split (``compare.splits``, the paper's rule: ``RandomState(s).choice(N, K)`` ID
classes) and each seed (``compare.seeds``), the pipeline's stages run in
``<output_dir>/split<s>/seed<k>/``: the cross-entropy baseline, then each of ``compare.methods``
fine-tuned from it, each evaluated (:func:`training.assess.evaluate.evaluate`, every registered score, the
ID test split and every OOD set of the config). A validation criterion, computed without test
data, selects the method and score (:mod:`training.assess.compare_table`):

* with ``data.validation_classes`` (the better rule for fine-grained OOD): AUROC of ID validation
  images against the images of the ID classes left out of training. The selected method is then
  trained again, on every ID class, for the first split and seed, and that model is calibrated,
  evaluated and exported;
* otherwise: AUROC of ID validation images against the same images blended 50/50 with validation
  outliers (``compare.validation_set``, by default the pool's validation categories), written once
  per split. A method trained on such blends (MixOE-mixup) is favoured by it. The selected model
  of the first split and seed is calibrated, evaluated without the blend and exported.

Finished training stages are skipped on a re-run. The config file is a pipeline config plus a
``compare`` section (:class:`CompareConfig`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from models.network.preprocess import EvalGeometry
from training.assess.calibrate import calibrate
from training.assess.compare_table import BLEND, Record, markdown, paired_differences, select, summarize
from training.assess.evaluate import evaluate
from training.assess.metrics import accuracy, auroc
from training.assess.scoring import ID_VAL, VAL_CLASSES, fit_score, run_logits
from training.config import MethodConfig, TrainConfig, read_raw, validated
from training.data.datasets import ImageDataset, Sample
from training.data.experiment import load_experiment_data
from training.data.splits import ood_sets
from training.data.transforms import preprocessing_of
from training.export import export
from training.fit.checkpoint import atomic_write
from training.fit.methods import METHOD_NAMES
from training.fit.trainer import train
from training.pipeline import stage_configs

log = logging.getLogger(__name__)
COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"


def default_methods() -> dict[str, MethodConfig]:
    """Every method of :mod:`training.fit.methods` with its paper defaults; MixOE once per mix."""
    methods = {}
    for name in METHOD_NAMES:
        if name == "mixoe":
            for mix in get_args(MethodConfig.model_fields["mix"].annotation):
                methods[f"mixoe-{mix}"] = MethodConfig(name=name, mix=mix)
        else:
            methods[name] = MethodConfig(name=name)
    return methods


class CompareConfig(BaseModel):
    """The ``compare`` section: what to train, how often, and how to choose."""

    model_config = ConfigDict(extra="forbid")

    splits: list[int] | None = Field(None, description="holdout seeds; default the config's data.holdout")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    methods: dict[str, MethodConfig] = Field(default_factory=default_methods, min_length=1)
    validation_set: str | None = Field(None, description="OOD set of validation outliers; default the pool's")
    max_accuracy_drop: float = Field(0.02, ge=0, description="selection ignores rows this far below the baseline")


class _CompareFile(TrainConfig):
    compare: CompareConfig = CompareConfig()


def load_compare_config(path: Path, overrides: list[str] = (), values: dict[str, Any] | None = None
                        ) -> tuple[TrainConfig, CompareConfig]:
    """The file's run settings and its ``compare`` section (``--set compare.seeds=[0,1]`` works too)."""
    whole = validated(_CompareFile, read_raw(path, overrides, values))
    compare = whole.compare
    needing = sorted(label for label, method in compare.methods.items() if method.name != "baseline")
    if needing and whole.outliers is None:
        raise ValueError(f"methods {needing} need an 'outliers' section (an outlier pool)")
    if compare.splits is not None and whole.data.holdout is None:
        raise ValueError("compare.splits needs data.holdout (num_id_classes) to know how many classes to keep")
    split_pool = whole.outliers is not None and whole.outliers.categories is not None
    if compare.validation_set is None and split_pool and whole.outliers.categories.val_fraction > 0:
        compare = compare.model_copy(update={"validation_set": whole.outliers.categories.val_set})
    if compare.validation_set is None and whole.data.validation_classes is None:
        raise ValueError("compare needs validation data: set data.validation_classes, "
                         "outliers.categories.val_fraction or compare.validation_set (an evaluation.ood_sets entry)")
    for reserved in (BLEND, VAL_CLASSES):
        if reserved in whole.evaluation.ood_sets:
            raise ValueError(f"OOD set name {reserved!r} is reserved by compare; choose another")
    return TrainConfig.model_validate(whole.model_dump(exclude={"compare"})), compare


def write_blend(config: TrainConfig, validation_set: str, folder: Path, seed: int) -> Path:
    """Each ID validation image blended 50/50 with a seeded validation outlier, as lossless PNGs.

    Both are resized and centre-cropped to ``resize`` pixels first, so the evaluation transform
    (resize to ``resize``, crop ``input_size``) sees the blend the network would see.
    """
    done = folder / "done"
    if done.is_file():
        return folder
    val = load_experiment_data(config.data).val.samples
    sets = ood_sets(config)
    if validation_set not in sets:
        raise ValueError(f"validation set {validation_set!r} is not an OOD set of the config: {sorted(sets)}")
    outliers = sets[validation_set]
    size = config.data.transforms.resize
    geometry = EvalGeometry(preprocessing_of(config.data.transforms).model_copy(update={"input_size": size}))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(outliers), len(val), replace=len(outliers) < len(val))
    id_images = ImageDataset(val, geometry)
    pool = ImageDataset([Sample(outliers[i], -1) for i in picked], geometry)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(min(len(id_images), len(pool))):
        a, b = id_images.transformed(index), pool.transformed(index)
        if a is None or b is None:
            continue
        pixels = ((a.to(torch.int32) + b.to(torch.int32) + 1) // 2).to(torch.uint8)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")
    done.write_text("")
    return folder


def unit_config(base: TrainConfig, split: int | None, seed: int) -> TrainConfig:
    """The run settings of one (split, seed) unit."""
    data = base.data
    if split is not None:
        data = data.model_copy(update={"holdout": data.holdout.model_copy(update={"seed": split})})
    unit_dir = base.output_dir / f"split{'-' if split is None else split}" / f"seed{seed}"
    return base.model_copy(update={"data": data, "seed": seed, "output_dir": unit_dir})


def with_ood_set(config: TrainConfig, name: str, folder: Path) -> TrainConfig:
    """``config`` with one more OOD folder to evaluate on."""
    evaluation = config.evaluation.model_copy(update={"ood_sets": {**config.evaluation.ood_sets, name: folder}})
    return config.model_copy(update={"evaluation": evaluation})


def method_configs(unit: TrainConfig, methods: dict[str, MethodConfig]) -> tuple[TrainConfig, dict[str, TrainConfig]]:
    """The baseline stage and each method's stage config (the baseline's for ``baseline``), as the pipeline has them."""
    configs = {}
    for label, method in methods.items():
        baseline, finetune = stage_configs(unit.model_copy(update={"method": method}))
        if finetune is not None:
            finetune = finetune.model_copy(update={"output_dir": unit.output_dir / label})
        configs[label] = finetune or baseline
    return stage_configs(unit.model_copy(update={"method": MethodConfig()}))[0], configs


def unit_records(
    config: TrainConfig, label: str, split: int | None, validation: set[str], against: str
) -> list[Record]:
    """Evaluate one trained model; one :class:`Record` per score the evaluation covers, its
    criterion the AUROC of ID validation images against the validation set ``against``."""
    result = evaluate(config)
    run = run_logits(config)  # cached by the evaluation
    val = run.sets[ID_VAL]
    val_accuracy = accuracy(val.logits, val.labels)
    records = []
    for score, per_set in result["scores"].items():
        fitted = fit_score(config, run, score)  # feature scores are fitted on the run's training features
        criterion = auroc(fitted(val), fitted(run.sets[against]))
        ood = {name: {"auroc": m["auroc"], "tnr_at_95tpr": m["tnr_at_95tpr"]}
               for name, m in per_set.items() if name not in validation}
        records.append(Record(split, config.seed, label, score, result["id_accuracy"], val_accuracy, criterion, ood))
    return records


@dataclass(frozen=True)
class CompareResult:
    markdown: str
    selected: dict[str, Any]
    bundle: Path


def run_compare(base: TrainConfig, compare: CompareConfig) -> CompareResult:
    """Train, evaluate and tabulate every unit, then export the selected model (see module docstring)."""
    base.export.require_new_bundle()  # before hours of training, not after
    validation = {compare.validation_set, BLEND, VAL_CLASSES}
    by_classes = base.data.validation_classes is not None
    against = VAL_CLASSES if by_classes else BLEND
    own_split = None if base.data.holdout is None else base.data.holdout.seed
    splits = compare.splits if compare.splits is not None else [own_split]
    records: list[Record] = []
    first: TrainConfig | None = None
    for split in splits:
        blend_dir = base.output_dir / f"split{'-' if split is None else split}" / BLEND
        for seed in compare.seeds:
            unit = unit_config(base, split, seed)
            first = first or unit
            if not by_classes:
                write_blend(unit, compare.validation_set, blend_dir, seed=0 if split is None else split)
                unit = with_ood_set(unit, BLEND, blend_dir)
            for label, config in trained_methods(unit, compare.methods).items():
                records += unit_records(config, label, split, validation, against)
            log.info("compare: split %s seed %d done", split, seed)
    set_names = list(records[0].ood)
    table = summarize(records, set_names)
    paired = {name: paired_differences(records, table, name) for name in set_names}
    baseline = next((label for label, m in compare.methods.items() if m.name == "baseline"), None)
    selected = select(table, baseline, compare.max_accuracy_drop)
    text = markdown(table, paired, selected, against)
    out = base.output_dir
    summary: dict[str, Any] = {"selected": selected, "bundle": None, "table": table, "paired": paired,
                               "records": [asdict(r) for r in records]}
    atomic_write(out / COMPARE_MD, lambda tmp: tmp.write_text(text))
    atomic_write(out / COMPARE_JSON, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))  # kept if export fails
    bundle = export_selected(first, selected["method"], compare.methods[selected["method"]], selected["score"])
    summary["bundle"] = str(bundle)
    atomic_write(out / COMPARE_JSON, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return CompareResult(text, selected, bundle)


def trained_methods(unit: TrainConfig, methods: dict[str, MethodConfig]) -> dict[str, TrainConfig]:
    """Train the unit's baseline and every method fine-tuned from it (finished stages are skipped);
    each method's final stage config."""
    baseline, configs = method_configs(unit, methods)
    train(baseline)
    for config in configs.values():
        if config.output_dir != baseline.output_dir:  # the baseline row is the stage just trained
            train(config)
    return configs


def export_selected(unit: TrainConfig, label: str, method: MethodConfig, score: str) -> Path:
    """Calibrate, evaluate (without the blend) and export method ``label`` of ``unit`` under ``score``;
    with validation classes, a model of the method trained on every ID class (``<unit>/all-classes``)."""
    if unit.data.validation_classes is not None:
        data = unit.data.model_copy(update={"validation_classes": None})
        unit = unit.model_copy(update={"data": data, "output_dir": unit.output_dir / "all-classes"})
    config = trained_methods(unit, {label: method})[label]
    sets = {name: spec for name, spec in config.evaluation.ood_sets.items() if name != BLEND}
    evaluation = config.evaluation.model_copy(update={"score": score, "ood_sets": sets})
    final = config.model_copy(update={"evaluation": evaluation})
    calibrate(final)
    evaluate(final)
    return export(final)
