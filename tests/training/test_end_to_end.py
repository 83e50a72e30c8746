"""Tiny end-to-end runs on generated images: baseline, MixOE from it, resume, determinism, pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.runtime import load_bundle
from tests.helpers.images import make_image_folder
from tests.helpers.runs import kill_mid_write, tiny_config
from training.cli import main
from training.fit import trainer

CLASSES = ["amber", "blue", "crimson", "green"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "id" / "train", CLASSES, per_class=8, seed=1)
    make_image_folder(root / "id" / "val", CLASSES, per_class=5, seed=2)
    make_image_folder(root / "id" / "test", CLASSES, per_class=5, seed=3)
    # Outliers: greyish images in two "classes" (labels are ignored by the pool).
    make_image_folder(root / "outliers", ["o1", "o2"], per_class=12, seed=4)
    make_image_folder(root / "far", ["x"], per_class=10, seed=5)
    return root


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "best.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def baseline_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "baseline"
    result = trainer.train(tiny_config(data_root, out))
    assert result.epochs_run == 2
    return out


def test_baseline_writes_checkpoints_and_one_log_line_per_epoch(baseline_run: Path) -> None:
    lines = [json.loads(line) for line in (baseline_run / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all(line["method"] == "baseline" and 0.0 <= line["val_accuracy"] <= 1.0 for line in lines)
    assert (baseline_run / "last.pt").is_file() and (baseline_run / "config.yaml").is_file()
    info = json.loads((baseline_run / "best.json").read_text())
    assert info["val_accuracy"] == max(line["val_accuracy"] for line in lines)


def test_same_seed_gives_identical_weights(baseline_run: Path, data_root: Path, tmp_path: Path) -> None:
    trainer.train(tiny_config(data_root, tmp_path / "again"))
    assert_same_weights(weights(baseline_run), weights(tmp_path / "again"))
    state_a = torch.load(baseline_run / "last.pt", weights_only=True)["model"]
    state_b = torch.load(tmp_path / "again" / "last.pt", weights_only=True)["model"]
    assert_same_weights(state_a, state_b)


def test_other_seed_gives_other_weights(baseline_run: Path, data_root: Path, tmp_path: Path) -> None:
    config = tiny_config(data_root, tmp_path / "other", seed=8)
    trainer.train(config)
    a, b = weights(baseline_run), weights(tmp_path / "other")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_interrupted_run_resumes_to_the_same_weights(
    baseline_run: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_evaluate = trainer.evaluate_accuracy
    calls = {"n": 0}

    def crash_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_evaluate(*args, **kwargs)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(trainer, "evaluate_accuracy", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_config(data_root, out))
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    kill_mid_write(out / "last.pt")  # a second interruption, this time inside the checkpoint write
    assert [path.name for path in out.glob(".last.pt.*")] != []
    monkeypatch.setattr(trainer, "evaluate_accuracy", real_evaluate)
    result = trainer.train(tiny_config(data_root, out))
    assert result.epochs_run == 1
    assert list(out.glob(".*")) == [], "the killed write's temporary file outlived the next run"
    final_a = torch.load(baseline_run / "last.pt", weights_only=True)["model"]
    final_b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert_same_weights(final_a, final_b)


@pytest.mark.parametrize(
    ("method", "keep", "kept_epoch"),
    [("baseline", "auto", 0), ("oe", "auto", 1), ("oe", "best_val_accuracy", 0), ("baseline", "last_epoch", 1)],
)
def test_the_kept_checkpoint_follows_the_rule_not_the_accuracy_alone(
    baseline_run: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    method: str, keep: str, kept_epoch: int,
) -> None:
    """Validation accuracy falls from epoch 0 to 1: the baseline keeps epoch 0, outlier exposure
    keeps its last epoch (accuracy does not see what it trades for OOD separation)."""
    falling = iter([0.9, 0.5])
    monkeypatch.setattr(trainer, "evaluate_accuracy", lambda *args, **kwargs: next(falling))
    out = tmp_path / "run"
    init = {"init_checkpoint": str(baseline_run)} if method != "baseline" else {}
    trainer.train(tiny_config(data_root, out, method={"name": method}, keep=keep, **init))
    info = json.loads((out / "best.json").read_text())
    assert (info["epoch"], info["val_accuracy"]) == (kept_epoch, [0.9, 0.5][kept_epoch])
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    kept = weights(out)
    same_as_last = all(torch.equal(kept[k], last[k]) for k in kept)
    assert same_as_last == (kept_epoch == 1)


@pytest.mark.parametrize("method", [{"name": "mixoe", "mix": "mixup"}, {"name": "mixoe", "mix": "cutmix"},
                                    {"name": "oe"}, {"name": "energy-oe"}])
def test_finetune_starts_from_the_baseline_and_changes_it(
    baseline_run: Path, data_root: Path, tmp_path: Path, method: dict
) -> None:
    out = tmp_path / "ft"
    config = tiny_config(data_root, out, method=method, epochs=1, init_checkpoint=str(baseline_run))
    trainer.train(config)
    line = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert line["method"] == method["name"]
    before, after = weights(baseline_run), weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_pipeline_produces_a_loadable_bundle_with_report(data_root: Path, tmp_path: Path) -> None:
    config = tiny_config(
        data_root, tmp_path / "pipe", method={"name": "mixoe", "mix": "cutmix"}, epochs=1,
        baseline={"epochs": 1, "optimizer": {"lr": 0.01}},
        export={"repository": str(tmp_path / "repo"), "name": "tiny", "version": "3"},
    )
    from training.config import save_config

    config_path = tmp_path / "pipe.yaml"
    save_config(config, config_path)
    assert main(["pipeline", str(config_path)]) == 0
    bundle_dir = tmp_path / "repo" / "tiny" / "3"
    bundle = load_bundle(bundle_dir)
    assert bundle.manifest.class_names == CLASSES
    assert [p.target_id_acceptance for p in bundle.manifest.calibration.operating_points] == [0.8, 0.9]
    assert set(bundle.manifest.metrics["scores"]["msp"]) == {"coarse"}
    report = (bundle_dir / "report.md").read_text()
    for png in ("roc.png", "hist_coarse.png"):
        assert png in report
        assert (bundle_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The deployed score's calibration reproduces: the bundle accepts at least the target share of
    # its own calibration images (conformal: k/(n) >= target on the calibration set itself).
    scores = np.array(bundle.manifest.calibration.scores)
    point = bundle.operating_point(0.9)
    assert np.mean(scores <= point.threshold) >= 0.9
    # A second call finds every stage finished and changes nothing.
    before = (bundle_dir / "manifest.json").read_text()
    assert main(["pipeline", str(config_path)]) == 0
    assert (bundle_dir / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": "vgg99"}, "Unknown architecture 'vgg99'"),
        ({"data": {"root": "/nonexistent/data"}}, "/nonexistent/data"),
        ({"data": {"root": "ID", "holdout": {"num_id_classes": 9}}}, "9"),
        ({"pretrained": "/nonexistent/weights.pth"}, "weights file not found"),
        ({"outliers": {"root": "EMPTY"}, "method": {"name": "mixoe"}}, "no images"),
    ],
)
def test_cli_misuse_is_one_clear_line_and_exit_2(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, changes: dict, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    raw = tiny_config(data_root, tmp_path / "bad").model_dump(mode="json")
    for key, value in changes.items():
        if key == "data":
            value = {**raw["data"], **value}
            value["root"] = value["root"].replace("ID", str(data_root / "id")) if value["root"] == "ID" else value["root"]
        if key == "outliers":
            value = {"root": str(tmp_path / "empty")}
        raw[key] = value
    import yaml

    config_path = tmp_path / "bad.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    command = "finetune" if raw["method"]["name"] != "baseline" else "train"
    extra = ["--init", str(tmp_path)] if command == "finetune" else []
    assert main([command, str(config_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixoe: error:")
    assert message in err[0]


def test_a_pipeline_refuses_to_ship_a_model_without_its_validation_classes(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = tiny_config(data_root, tmp_path / "pipe").model_dump(mode="json")
    raw["data"]["validation_classes"] = {"count": 1}
    import yaml

    config_path = tmp_path / "pipe.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    assert main(["pipeline", str(config_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mixoe: error: the pipeline's bundle would lack the 1 ID classes that data.validation_classes leaves out "
        "of training; drop data.validation_classes (mixoe compare trains its pick on every class)"
    ]
    assert not (tmp_path / "pipe" / "baseline").exists()  # refused before any training


def test_loader_workers_do_not_change_the_weights(baseline_run: Path, data_root: Path, tmp_path: Path) -> None:
    """Each image's augmentation is seeded by (run seed, epoch, index), not by the worker."""
    config = tiny_config(data_root, tmp_path / "workers")
    config = config.model_copy(update={"data": config.data.model_copy(update={"num_workers": 2})})
    trainer.train(config)
    assert_same_weights(weights(baseline_run), weights(tmp_path / "workers"))


def test_export_refuses_a_calibration_of_other_weights(data_root: Path, tmp_path: Path, capsys) -> None:
    """Thresholds belong to the weights they were calibrated on; new weights need a new calibration."""
    from safetensors.torch import save_file

    from training.assess.calibrate import calibrate
    from training.assess.evaluate import evaluate

    run = tmp_path / "run"
    config = tiny_config(data_root, run, epochs=1)
    trainer.train(config)
    calibrate(config)
    evaluate(config)
    changed = weights(run)
    changed["head.bias"] = changed["head.bias"] + 1.0
    save_file(changed, str(run / "best.safetensors"))
    assert main(["export", str(run), "--repository", str(tmp_path / "repo"), "--name", "x", "--version", "1"]) == 2
    assert "other weights" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "x" / "1").exists()


@pytest.mark.parametrize("text", ["data: [unclosed", "architecture: resnet18\nunknown_key: 1\n"])
def test_a_broken_config_file_is_one_clear_line(tmp_path: Path, capsys, caplog, text: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    caplog.set_level(logging.DEBUG)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixoe: error:")
    # The traceback is there for --verbose (debug level) and nowhere else.
    assert [record.levelno for record in caplog.records if record.exc_info] == [logging.DEBUG]


def test_resuming_with_another_configuration_is_refused(baseline_run: Path, data_root: Path) -> None:
    before = (baseline_run / "config.yaml").read_text()
    changed = tiny_config(data_root, baseline_run, optimizer={"lr": 0.5})
    with pytest.raises(ValueError, match="another configuration"):
        trainer.train(changed)
    assert (baseline_run / "config.yaml").read_text() == before


def test_an_outlier_pool_smaller_than_one_batch_is_an_error_not_a_hang(
    baseline_run: Path, data_root: Path, tmp_path: Path
) -> None:
    make_image_folder(tmp_path / "few", ["o"], per_class=3, seed=9)
    config = tiny_config(
        data_root, tmp_path / "run", method={"name": "mixoe"}, epochs=1, init_checkpoint=str(baseline_run),
        outliers={"root": str(tmp_path / "few")},
    )
    with pytest.raises(ValueError, match="fewer than one batch of 8 outliers"):
        trainer.train(config)


def test_an_init_checkpoint_of_another_shape_is_a_clear_error(baseline_run: Path, data_root: Path, tmp_path: Path) -> None:
    config = tiny_config(data_root, tmp_path / "run", architecture="mobilenet_v2", init_checkpoint=str(baseline_run))
    with pytest.raises(ValueError, match="does not fit mobilenet_v2 with 4 classes"):
        trainer.train(config)
