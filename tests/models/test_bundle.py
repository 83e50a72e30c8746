"""Bundle round trip, integrity checks, atomic saving and repository listing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from models.calibration.conformal import conformal_p_values
from models.contract.bundle import save_bundle, sha256_file
from models.contract.index import find_bundles, latest_version
from models.contract.manifest import MANIFEST_FILE, WEIGHTS_FILE, BundleError, Calibration, Manifest, OperatingPoint, ScoreSpec
from models.network.nets import Classifier, build_network
from models.network.preprocess import Preprocessing, preprocess_batch
from models.runtime import Bundle, load_bundle
from models.scoring.scores import get_score

SIZE = 32
TARGETS = (0.5, 0.9, 0.95)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _manifest(model: Classifier) -> Manifest:
    """A manifest whose thresholds are calibrated on ``model``'s own energy scores (n=39 supports 0.95)."""
    with torch.inference_mode():
        calibration_scores = np.sort(get_score("energy")(model(_images(39, seed=1))).double().numpy())
    points = [OperatingPoint.calibrated(calibration_scores, t, ood_acceptance={"coarse": 0.25}) for t in TARGETS]
    return Manifest(
        name="flowers",
        version="1",
        created_at="2024-05-01T12:00:00+00:00",
        architecture="resnet18",
        num_classes=3,
        class_names=["daisy", "iris", "tulip"],
        preprocessing=Preprocessing(input_size=SIZE, resize=36),
        score=ScoreSpec(name="energy", temperature=1.0),
        calibration=Calibration(scores=calibration_scores.tolist(), operating_points=points, default_target=0.95),
        training={"method": "mixoe_mixup", "beta": 5.0},
    )


@pytest.fixture(scope="module")
def calibrated() -> tuple[Classifier, Manifest]:
    """A tiny untrained network and its manifest, built once: CPU forward passes dominate the run time."""
    torch.manual_seed(0)
    model = build_network("resnet18", 3).eval()
    return model, _manifest(model)


@pytest.fixture(scope="module")
def saved(
    calibrated: tuple[Classifier, Manifest], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Classifier, Manifest]:
    """One bundle saved once; tests that damage it work on a copy."""
    model, manifest = calibrated
    directory = save_bundle(tmp_path_factory.mktemp("repo") / "flowers" / "1", model, manifest)
    return directory, model, manifest


@pytest.fixture
def copy(saved: tuple[Path, Classifier, Manifest], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "flowers" / "1"))


def test_round_trip_reproduces_predictions_bit_for_bit(saved: tuple[Path, Classifier, Manifest]) -> None:
    directory, model, manifest = saved
    batch = _images(8, seed=2)
    loaded = load_bundle(directory).predict(batch)
    original = Bundle(directory, manifest, model, torch.device("cpu")).predict(batch)
    with torch.inference_mode():
        direct_logits = model(batch)
    assert torch.equal(loaded.logits, direct_logits)
    for field in ("logits", "probabilities", "scores", "p_values", "accepted"):
        assert torch.equal(getattr(loaded, field), getattr(original, field)), field
    assert loaded.operating_point == original.operating_point == manifest.calibration.operating_points[2]


def test_loaded_manifest_matches_the_saved_one_plus_the_weights_hash(saved: tuple[Path, Classifier, Manifest]) -> None:
    directory, _, manifest = saved
    bundle = load_bundle(directory)
    digest = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert sha256_file(directory / WEIGHTS_FILE) == digest
    assert bundle.manifest == manifest.model_copy(update={"weights_sha256": digest})
    assert (bundle.name, bundle.version) == ("flowers", "1")
    assert not bundle.model.training


def test_accepted_is_score_at_most_threshold_and_p_values_are_conformal(
    saved: tuple[Path, Classifier, Manifest],
) -> None:
    directory, _, manifest = saved
    bundle = load_bundle(directory)
    predictions = bundle.predict(_images(16, seed=3), operating_point=0.5)
    threshold = bundle.operating_point(0.5).threshold
    assert predictions.operating_point.target_id_acceptance == 0.5
    assert torch.equal(predictions.accepted, predictions.scores.double() <= threshold)
    assert 0 < int(predictions.accepted.sum()) < 16  # both decisions occur, so the check above has teeth
    expected = conformal_p_values(predictions.scores.numpy(), np.asarray(manifest.calibration.scores))
    assert np.array_equal(predictions.p_values.numpy(), expected)
    assert predictions.logits.dtype == torch.float32 and predictions.logits.device.type == "cpu"
    torch.testing.assert_close(predictions.probabilities.sum(dim=1), torch.ones(16))


def test_operating_point_defaults_and_unknown_targets_list_the_available_ones(
    saved: tuple[Path, Classifier, Manifest],
) -> None:
    bundle = load_bundle(saved[0])
    assert bundle.operating_point(None).target_id_acceptance == 0.95
    assert bundle.operating_point(0.9).target_id_acceptance == 0.9
    with pytest.raises(BundleError, match=r"0\.97.*available: 0\.5, 0\.9, 0\.95"):
        bundle.operating_point(0.97)


def test_predict_refuses_a_batch_of_the_wrong_size(saved: tuple[Path, Classifier, Manifest]) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        load_bundle(saved[0]).predict(torch.zeros(2, 3, 64, 64))


def test_preprocess_converts_any_mode_to_the_calibrated_rgb_batch(saved: tuple[Path, Classifier, Manifest]) -> None:
    bundle = load_bundle(saved[0])
    gray = Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(40, 48), mode="L")
    batch = bundle.preprocess([gray, gray.convert("RGB")])
    assert batch.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch, preprocess_batch([gray.convert("RGB")] * 2, Preprocessing(input_size=SIZE, resize=36)))


def _flip_last_weight_byte(path: Path) -> None:
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01  # inside the tensor data, past the safetensors header
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def _edit_manifest(path: Path, **changes: Any) -> None:
    raw = json.loads((path / MANIFEST_FILE).read_text())
    raw.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip_last_weight_byte, "sha256 mismatch"),
        (lambda p: (p / WEIGHTS_FILE).unlink(), "weights.safetensors missing"),
        (lambda p: (p / MANIFEST_FILE).unlink(), "manifest.json missing"),
        (lambda p: (p / MANIFEST_FILE).write_text('{"schema_version": 1,'), "not valid JSON"),
        (lambda p: _edit_manifest(p, schema_version=4), r"unsupported schema_version 4;.*version\(s\) 1, 2, 3"),
        (lambda p: _edit_manifest(p, num_classes=4, class_names=list("abcd")), "class count mismatch.*head has 3"),
        (lambda p: _edit_manifest(p, architecture="resnet34"), "do not fit architecture 'resnet34'"),
        (lambda p: _edit_manifest(p, score={"name": "entropy", "temperature": 1}), "(?s)invalid manifest.*Unknown OOD score .entropy."),
        (lambda p: _edit_manifest(p, weights_sha256=""), "records no weights_sha256"),
        (lambda p: shutil.rmtree(p), "bundle directory not found"),
    ],
    ids=["flipped-byte", "no-weights", "no-manifest", "bad-json", "schema", "class-count", "architecture",
         "bad-score", "no-hash", "no-directory"],
)
def test_damaged_bundles_are_refused_with_a_message_naming_problem_and_path(
    copy: Path, damage: Any, message: str
) -> None:
    damage(copy)
    with pytest.raises(BundleError, match=message) as error:
        load_bundle(copy)
    assert str(copy) in str(error.value)


def test_saving_over_an_existing_version_is_refused_and_leaves_it_intact(
    saved: tuple[Path, Classifier, Manifest],
) -> None:
    directory, model, manifest = saved
    before = sha256_file(directory / WEIGHTS_FILE)
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(directory, build_network("resnet18", 3), manifest)
    assert sha256_file(directory / WEIGHTS_FILE) == before
    assert sorted(p.name for p in directory.parent.iterdir()) == ["1"]


def test_save_leaves_no_temporary_directory_and_copies_extra_files(
    calibrated: tuple[Classifier, Manifest], tmp_path: Path
) -> None:
    model, manifest = calibrated
    report = tmp_path / "draft.md"
    report.write_text("# Report\n")
    directory = save_bundle(tmp_path / "repo" / "flowers" / "1", model, manifest, extra_files={"report.md": report})
    assert sorted(p.name for p in directory.parent.iterdir()) == ["1"]
    assert sorted(p.name for p in directory.iterdir()) == [MANIFEST_FILE, "report.md", WEIGHTS_FILE]
    assert (directory / "report.md").read_text() == "# Report\n"


def test_weights_that_would_not_load_are_never_saved(calibrated: tuple[Classifier, Manifest], tmp_path: Path) -> None:
    wrong_head = build_network("resnet18", 4)
    with pytest.raises(BundleError, match="class count mismatch"):
        save_bundle(tmp_path / "flowers" / "1", wrong_head, calibrated[1])
    assert not (tmp_path / "flowers" / "1").exists()


def test_a_save_failing_midway_removes_its_temporary_directory(
    calibrated: tuple[Classifier, Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr("models.contract.bundle.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_bundle(tmp_path / "flowers" / "1", *calibrated)
    assert list((tmp_path / "flowers").iterdir()) == []


def test_save_requires_the_directory_to_match_name_and_version(
    calibrated: tuple[Classifier, Manifest], tmp_path: Path
) -> None:
    with pytest.raises(BundleError, match="flowers/1"):
        save_bundle(tmp_path / "roses" / "1", *calibrated)
    assert not (tmp_path / "roses").exists()


def _valid_manifest_dict() -> dict[str, Any]:
    points = [
        {"target_id_acceptance": 0.5, "threshold": 2.0, "k": 2, "n_calibration": 4},
        {"target_id_acceptance": 0.75, "threshold": 4.0, "k": 4, "n_calibration": 4},
    ]
    return {
        "name": "flowers",
        "version": "3",
        "created_at": "2024-05-01T12:00:00Z",
        "architecture": "resnet18",
        "num_classes": 2,
        "class_names": ["daisy", "iris"],
        "preprocessing": {},
        "score": {"name": "msp", "temperature": 1.0},
        "calibration": {"scores": [1.0, 2.0, 3.0, 4.0], "operating_points": points, "default_target": 0.75},
    }


def test_a_valid_manifest_dict_validates() -> None:
    assert Manifest.model_validate(_valid_manifest_dict()).calibration.operating_points[1].k == 4


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("calibration", "scores"), [2.0, 1.0, 3.0, 4.0], "sorted in ascending order"),
        (("calibration", "default_target"), 0.95, "not one of the operating points"),
        (("calibration", "operating_points", 0, "threshold"), 2.5, "not the k=2-th smallest"),
        (("calibration", "operating_points", 0, "n_calibration"), 5, "n_calibration=5 but 4"),
        (("calibration", "operating_points", 1, "target_id_acceptance"), 0.5, "must be distinct"),
        (("calibration", "operating_points", 0, "target_id_acceptance"), 1.0, "less than 1"),
        (("calibration", "operating_points", 0, "ood_acceptance"), {"coarse": 1.5}, "in \\[0, 1\\] for: coarse"),
        (("class_names",), ["daisy"], "num_classes=2 but 1 class_names"),
        (("score", "temperature"), 0.0, "greater than 0"),
        (("architecture",), "vgg16", "Unknown architecture 'vgg16'"),
        (("created_at",), "2024-05-01T12:00:00+02:00", "must be in UTC"),
        (("created_at",), "yesterday", "not an ISO 8601"),
        (("name",), "../evil", "should match pattern"),
        (("version",), ".hidden", "should match pattern"),
        (("weights_sha256",), "abc", "should match pattern"),
        (("threshold_typo",), 1.0, "Extra inputs are not permitted"),
    ],
)
def test_inconsistent_manifests_are_rejected(path: tuple[Any, ...], value: Any, message: str) -> None:
    raw = _valid_manifest_dict()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate(raw)


def _fake_bundle(repository: Path, name: str, version: str) -> Path:
    directory = repository / name / version
    directory.mkdir(parents=True)
    (directory / MANIFEST_FILE).write_text("{}")
    return directory


def test_find_bundles_orders_versions_numerically_and_skips_non_bundles(tmp_path: Path) -> None:
    for name, version in [("flowers", "10"), ("flowers", "2"), ("cars", "1"), ("flowers", "1.10"), ("flowers", "1.9")]:
        _fake_bundle(tmp_path, name, version)
    _fake_bundle(tmp_path, "flowers", ".11.abc.tmp")  # an interrupted save
    (tmp_path / "flowers" / "12").mkdir()  # no manifest
    found = find_bundles(tmp_path)
    assert [(name, version) for name, version, _ in found] == [
        ("cars", "1"), ("flowers", "1.9"), ("flowers", "1.10"), ("flowers", "2"), ("flowers", "10"),
    ]
    assert found[-1][2] == tmp_path / "flowers" / "10"
    assert latest_version(tmp_path, "flowers") == "10"
    assert latest_version(tmp_path, "cars") == "1"


def test_latest_version_of_an_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    _fake_bundle(tmp_path, "cars", "1")
    with pytest.raises(BundleError, match="no bundle named 'birds'.*available: cars"):
        latest_version(tmp_path, "birds")
    with pytest.raises(BundleError, match="model repository not found"):
        find_bundles(tmp_path / "missing")


def test_saved_bundle_is_readable_by_other_users(saved: tuple[Path, Classifier, Manifest]) -> None:
    """The service may run as another (non-root) user than the one who exported the bundle."""
    directory = saved[0]
    assert directory.stat().st_mode & 0o005 == 0o005
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o004, path.name


def test_uint8_pixels_predict_exactly_like_the_normalised_batch(saved: tuple[Path, Classifier, Manifest]) -> None:
    """The service sends uint8 crops and lets predict normalise; the answer must not change."""
    bundle = load_bundle(saved[0])
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(4)]
    images.append(images[0].convert("L"))
    from_float = bundle.predict(bundle.preprocess(images))
    from_uint8 = bundle.predict(torch.stack([bundle.pixels(image) for image in images]))
    assert torch.equal(from_float.logits, from_uint8.logits)
    assert torch.equal(from_float.accepted, from_uint8.accepted)


def test_a_batch_started_now_and_finished_later_gets_predicts_answer(
    saved: tuple[Path, Classifier, Manifest],
) -> None:
    bundle = load_bundle(saved[0])
    pixels = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pending = bundle.start(pixels)
    bundle.start(torch.zeros_like(pixels))  # another batch launched meanwhile changes nothing
    finished, predicted = bundle.finish(pending), bundle.predict(pixels)
    assert torch.equal(finished.logits, predicted.logits) and torch.equal(finished.accepted, predicted.accepted)
    assert finished.operating_point == bundle.operating_point()


def test_cuda_graphs_need_a_cuda_device(saved: tuple[Path, Classifier, Manifest]) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        load_bundle(saved[0]).capture_graph(2)
