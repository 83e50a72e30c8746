"""``mixoe compare``: the table's statistics, a tiny end-to-end comparison, and CLI misuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from models.runtime import load_bundle
from tests.helpers.images import make_image_folder, make_list_dataset
from models.scoring.scores import SCORES
from training.assess import compare
from training.assess.compare import default_methods, load_compare_config, method_configs, unit_config
from training.assess.metrics import auroc
from training.assess.scoring import ID_VAL, VAL_CLASSES, fit_score, run_logits
from training.config import MethodConfig
from training.assess.compare_table import Record, paired_differences, select, summarize
from training.cli import main


def _records(a_minus_b: list[float]) -> list[Record]:
    records = []
    for unit, diff in enumerate(a_minus_b):
        for method, value in (("a", 0.8 + diff), ("b", 0.8)):
            ood = {"far": {"auroc": value, "tnr_at_95tpr": 0.5}}
            records.append(Record(0, unit, method, "msp", 0.9, 0.9, 0.5, ood))
    return records


@pytest.mark.parametrize(
    ("diffs", "verdict"), [([0.02, 0.03, 0.025], "win"), ([0.05, -0.03, 0.01], "tie"), ([-0.02, -0.03, -0.025], "loss")]
)
def test_a_difference_is_a_win_only_beyond_its_noise(diffs: list[float], verdict: str) -> None:
    records = _records(diffs)
    table = summarize(records, ["far"])
    row = next(d for d in paired_differences(records, table, "far") if d["method"] == "a")
    assert row["against"] == "b/msp"
    assert row["difference"] == pytest.approx(sum(diffs) / 3)
    assert row["verdict"] == verdict


def test_selection_skips_rows_far_less_accurate_than_the_baseline() -> None:
    table = [
        {"method": "baseline", "score": "msp", "val_accuracy": 0.90, "criterion": 0.70},
        {"method": "x", "score": "msp", "val_accuracy": 0.85, "criterion": 0.95},
        {"method": "y", "score": "energy", "val_accuracy": 0.89, "criterion": 0.80},
    ]
    assert select(table, "baseline", 0.02)["method"] == "y"
    assert select(table, "baseline", 0.10)["method"] == "x"


CLASSES = ["amber", "blue", "crimson", "green"]


@pytest.fixture(scope="module")
def compare_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    make_list_dataset(root / "id", CLASSES, {"train": 10, "test": 4}, size=(36, 36), seed=1)
    make_image_folder(root / "pool", [f"cat{i}" for i in range(8)], per_class=6, size=(48, 40), seed=2)
    raw = {
        "architecture": "resnet18",
        "data": {"format": "list", "root": str(root / "id"), "classes_file": "classes.txt", "train": "train.txt",
                 "val": None, "val_from_train": {"fraction": 0.3}, "test": "test.txt",
                 "holdout": {"num_id_classes": 3}, "num_workers": 0,
                 "transforms": {"input_size": 32, "resize": 36}},
        "outliers": {"root": str(root / "pool"), "outlier_resize": "resize_center_crop",
                     "categories": {"test_fraction": 0.25, "val_fraction": 0.25}},
        "batch_size": 8, "epochs": 1, "device": "cpu", "optimizer": {"lr": 0.01},
        "baseline": {"epochs": 1, "optimizer": {"lr": 0.01}},
        "evaluation": {"calibration_targets": [0.8, 0.9], "default_target": 0.9},
        "output_dir": str(root / "runs"),
        "export": {"repository": str(root / "repo"), "name": "tiny", "version": "1"},
        "compare": {"splits": [0], "seeds": [0]},
    }
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_compare_tables_every_method_under_every_score_and_exports_the_selected(compare_file: Path, capsys) -> None:
    assert main(["compare", str(compare_file)]) == 0
    out = compare_file.parent / "runs"
    summary = json.loads((out / "compare.json").read_text())
    rows = {(r["method"], r["score"]) for r in summary["table"]}
    assert rows == {(m, s) for m in default_methods() for s in SCORES}
    assert set(summary["paired"]) == {"fine", "coarse_pool"}  # validation sets are not test columns
    selected = summary["selected"]
    assert selected["criterion"] == max(
        r["criterion"] for r in summary["table"]
        if r["val_accuracy"] >= next(b["val_accuracy"] for b in summary["table"] if b["method"] == "baseline") - 0.02
    )
    bundle = load_bundle(Path(summary["bundle"]))
    assert bundle.manifest.score.name == selected["score"]
    assert bundle.manifest.training["method"] == default_methods()[selected["method"]].model_dump(mode="json")
    printed = capsys.readouterr().out
    assert f"**{selected['method']} / {selected['score']}**" in printed
    assert (out / "compare.md").read_text().strip() in printed


@pytest.mark.slow
def test_compare_selects_by_left_out_classes_and_exports_a_model_of_every_id_class(
    compare_file: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(compare_file.read_text())
    raw["data"]["validation_classes"] = {"count": 1}
    raw["outliers"]["categories"]["val_fraction"] = 0  # the left-out class is the only validation OOD
    raw["compare"]["methods"] = {"baseline": {"name": "baseline"}, "oe": {"name": "oe"}}
    raw["output_dir"] = str(tmp_path / "runs")
    raw["export"]["repository"] = str(tmp_path / "repo")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(path)]) == 0
    summary = json.loads((tmp_path / "runs" / "compare.json").read_text())
    assert set(summary["paired"]) == {"fine", "coarse_pool"}
    assert not (tmp_path / "runs" / "split0" / "val_blend").exists()
    base, _ = load_compare_config(path)
    unit = unit_config(base, 0, 0)
    record = next(r for r in summary["records"] if (r["method"], r["score"]) == ("oe", "energy"))
    run = run_logits(method_configs(unit, {"oe": MethodConfig(name="oe")})[1]["oe"])
    assert len(run.sets[VAL_CLASSES].labels) > 0
    energy = fit_score(base, run, "energy")
    assert record["criterion"] == pytest.approx(auroc(energy(run.sets[ID_VAL]), energy(run.sets[VAL_CLASSES])))
    bundle = load_bundle(Path(summary["bundle"]))
    assert len(bundle.manifest.class_names) == 3  # every ID class, the left-out one included
    assert Path(summary["bundle"]).is_dir() and (tmp_path / "runs" / "split0" / "seed0" / "all-classes").is_dir()
    assert "ID classes left out of training" in (tmp_path / "runs" / "compare.md").read_text()


@pytest.mark.slow
def test_a_failed_export_keeps_the_tables(compare_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load(compare_file.read_text())
    raw["compare"]["methods"] = {"baseline": {"name": "baseline"}, "oe": {"name": "oe"}}
    raw["output_dir"] = str(tmp_path / "runs")
    raw["export"]["repository"] = str(tmp_path / "repo")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))

    def disk_full(*args: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare, "export_selected", disk_full)
    assert main(["compare", str(path)]) != 0
    summary = json.loads((tmp_path / "runs" / "compare.json").read_text())
    assert summary["bundle"] is None and {row["method"] for row in summary["table"]} == {"baseline", "oe"}
    assert "Selected on validation data only" in (tmp_path / "runs" / "compare.md").read_text()


def test_compare_refuses_at_once_a_version_already_in_the_repository(
    compare_file: Path, tmp_path: Path, capsys
) -> None:
    raw = yaml.safe_load(compare_file.read_text())
    raw["output_dir"] = str(tmp_path / "runs")
    raw["export"]["repository"] = str(tmp_path / "repo")
    (tmp_path / "repo" / "tiny" / "1").mkdir(parents=True)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(path)]) == 2
    assert capsys.readouterr().err.startswith("mixoe: error: bundle tiny/1 already exists at ")
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compare": {"splits": [0], "sedes": [1]}},
         "invalid configuration: unknown key 'compare.sedes' (did you mean 'compare.seeds'?)"),
        ({"outliers": None, "compare": {}}, "methods ['energy-oe', 'mixoe-cutmix', 'mixoe-mixup', 'oe'] need an"),
        ({"compare": {"methods": {"msp": {"name": "baseline"}}}, "outliers": None}, "compare needs validation data"),
        ({"evaluation": {"ood_sets": {"val_classes": "/elsewhere"}}}, "OOD set name 'val_classes' is reserved"),
    ],
)
def test_compare_misuse_is_one_line_and_exit_2(
    compare_file: Path, tmp_path: Path, capsys, change: dict, message: str
) -> None:
    raw = {**yaml.safe_load(compare_file.read_text()), **change}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixoe: error: {message}")
    assert err.count("\n") == 1
