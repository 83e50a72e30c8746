"""Typed run configuration, read from YAML or TOML and overridden by command-line flags.

One pydantic model per concern; unknown keys are errors so that a typo never silently falls back
to a default, and names (architecture, pretrained weights, score, method, optimizer) are checked
against their registries as soon as the file is read, before any data is loaded. The resolved
configuration is saved in the run directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.network.nets import get_architecture
from models.network.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from models.network.weights import check_pretrained
from models.scoring.scores import get_score
from training.config_errors import ConfigError, explain

Model = TypeVar("Model", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TransformConfig(_Strict):
    """Image transforms. Training: random-resized crop + flip (+ jitter); evaluation: resize + centre crop."""

    input_size: int = Field(224, ge=8, description="side of the square image the network sees, in pixels")
    resize: int = Field(256, ge=8, description="evaluation: the shorter side is resized to this before the centre crop")
    random_crop_scale: tuple[float, float] = Field(
        (0.5, 1.0), description="training: the random-resized crop covers this range of the image's area"
    )
    horizontal_flip: bool = Field(True, description="training: flip half of the images left to right")
    color_jitter: float = Field(0.0, ge=0.0, description="brightness/contrast/saturation strength, 0 = off")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="per-channel normalisation mean (RGB, 0-1)")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per-channel normalisation standard deviation")

    @model_validator(mode="after")
    def _valid_eval_preprocessing(self) -> "TransformConfig":
        """Fail at config time, not at export, if the bundle's preprocessing would be invalid."""
        Preprocessing(input_size=self.input_size, resize=self.resize, mean=self.mean, std=self.std)
        return self


class HoldoutConfig(_Strict):
    """The MixOE paper's split: RandomState(seed).choice(range(N), num_id_classes, replace=False)."""

    num_id_classes: int = Field(ge=1, description="classes kept as in-distribution; the rest are the fine OOD set")
    seed: int = Field(0, description="the split: which classes are kept")


class ValidationCarveOut(_Strict):
    """Take the validation split out of the training split: ``fraction`` of each class, seeded.

    For data that ships no validation split (a list file without ``val.txt``). Per class, so a
    rare class still has validation images; the images drawn leave the training split.
    """

    fraction: float = Field(gt=0, lt=1, description="share of each class's training images moved to validation")
    seed: int = Field(0, description="seed of the draw")


class ValidationClasses(_Strict):
    """Leave ``count`` of the ID classes (seeded draw) out of training, as validation OOD.

    Their training and validation images become the ``val_classes`` set: unseen classes of the
    same kind as the ID ones, the nearest thing to fine-grained OOD that no test image is spent
    on and no method trains on. ``mixoe compare`` selects method, score and settings by how well
    each model separates them from ID validation images.
    """

    count: int = Field(ge=1, description="ID classes left out of training and kept for validation")
    seed: int = Field(0, description="seed of the draw")

    def check_leaves_two(self, num_id_classes: int) -> None:
        """Refuse a ``count`` that leaves fewer than 2 of ``num_id_classes`` to train a classifier on."""
        if self.count >= num_id_classes - 1:
            raise ValueError(
                f"data.validation_classes.count {self.count} leaves fewer than 2 of the {num_id_classes} "
                "ID classes to train on"
            )


class DataConfig(_Strict):
    """Where the in-distribution data lives.

    Either ``format: folder`` (``root/<class>/<image>``; ``train``/``val``/``test`` are sub-folders
    of ``root``) or ``format: list`` (``relative_path label`` lines in the list files
    and one class name per line in ``classes_file``, all relative to ``root``). Without a
    validation split set ``val: null`` and ``val_from_train`` to carve one from the training split.
    """

    format: Literal["folder", "list"] = Field("folder", description="folder: root/<class>/<image>; list: list files")
    root: Path = Field(description="directory the splits, list files and images are relative to")
    train: str = Field("train", description="training split: a sub-folder (folder) or a list file (list)")
    val: str | None = Field("val", description="validation split, as train; null with val_from_train")
    val_from_train: ValidationCarveOut | None = None
    test: str | None = Field("test", description="test split, as train; null: no test split")
    classes_file: str | None = Field(None, description="format list: class names, one per line (needed there)")
    holdout: HoldoutConfig | None = None
    validation_classes: ValidationClasses | None = None
    transforms: TransformConfig = TransformConfig()
    num_workers: int = Field(2, ge=0, description="data-loading processes per training or scoring process")

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataConfig":
        if (self.val is None) == (self.val_from_train is None):
            raise ValueError("give exactly one of data.val (a split) and data.val_from_train (a carve-out)")
        return self

    @model_validator(mode="after")
    def _classes_left_to_train_on(self) -> "DataConfig":
        """With a holdout split the ID class count is known here: fail at config time, not in training."""
        if self.holdout is not None and self.validation_classes is not None:
            self.validation_classes.check_leaves_two(self.holdout.num_id_classes)
        return self

    def require_every_id_class(self, what: str) -> None:
        """Refuse ``what`` (a deliverable: a bundle) for a model trained without its validation classes."""
        if self.validation_classes is not None:
            raise ValueError(
                f"{what} would lack the {self.validation_classes.count} ID classes that data.validation_classes "
                "leaves out of training; drop data.validation_classes (mixoe compare trains its pick on every class)"
            )


class CategorySplitConfig(_Strict):
    """Split a pool's category sub-folders, *by category*, into training pool, validation and test.

    ``test_fraction`` of the categories (seeded draw) become the coarse OOD test set named
    ``test_set``, ``val_fraction`` the validation-outlier set ``val_set``; the rest is the pool
    outlier exposure trains on. No category is in two parts, so a coarse test score never
    measures images of a category the model was trained to reject.
    """

    test_fraction: float = Field(0.0, ge=0, lt=1, description="share of the categories that become the test set")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of the categories that become the validation set")
    seed: int = Field(0, description="seed of the draw of categories")
    test_set: str = Field("coarse_pool", description="name of the coarse OOD test set")
    val_set: str = Field("val_outliers", description="name of the validation-outlier set")

    @model_validator(mode="after")
    def _pool_left(self) -> "CategorySplitConfig":
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError("test_fraction + val_fraction must leave categories for the training pool")
        return self


class OutlierConfig(_Strict):
    """Auxiliary outlier pool: any folder tree of images, labels ignored.

    ``outlier_resize`` says how an outlier reaches the training resolution:
    ``same_as_id`` puts it through the ID training transform (random-resized crop of
    ``random_crop_scale`` of its area, flip, jitter), so a small image is zoomed in further and
    upsampled more than a large one; ``resize_center_crop`` resizes the whole image (shorter side
    to ``resize``) and centre-crops it as evaluation does, then flips: the least upsampling a
    low-resolution pool can get, so that blur tells outliers from ID images as little as possible.
    """

    root: Path = Field(description="folder tree of outlier images")
    exclude: list[str] = Field(default_factory=list, description="sub-folder names to leave out")
    categories: CategorySplitConfig | None = None
    outlier_resize: Literal["same_as_id", "resize_center_crop"] = Field(
        "same_as_id", description="how an outlier reaches the training resolution (see above)"
    )


class OODSetConfig(_Strict):
    """An OOD evaluation set: a folder tree of images, or a list file of image paths.

    ``list_file`` names a file under ``root`` whose lines start with an image path relative to ``root``
    (anything after the path, such as a label, is ignored). ``exclude`` leaves out categories, a
    category being the first folder of an image's path under ``root``.
    """

    root: Path = Field(description="folder of the images")
    list_file: str | None = Field(None, description="file under root listing the images; null: every image under root")
    exclude: list[str] = Field(default_factory=list, description="categories (first folders under root) to leave out")


class OptimizerConfig(_Strict):
    """The optimizer and its per-step cosine learning-rate schedule; the defaults are the MixOE paper's."""

    name: Literal["sgd", "adamw"] = Field("sgd", description="optimizer")
    lr: float = Field(1e-3, gt=0, description="learning rate at the start of the cosine schedule")
    min_lr: float = Field(1e-6, ge=0, description="learning rate the cosine schedule ends at")
    momentum: float = Field(0.9, description="SGD momentum")
    nesterov: bool = Field(True, description="SGD with Nesterov momentum")
    weight_decay: float = Field(1e-5, ge=0, description="weight decay")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up before the cosine schedule")


class MethodConfig(_Strict):
    """The fine-tuning objective and its weights; the defaults are the MixOE paper's."""

    name: Literal["baseline", "mixoe", "oe", "energy-oe"] = Field(
        "baseline", description="baseline = cross-entropy only; the others need an outliers section"
    )
    mix: Literal["mixup", "cutmix"] = Field("mixup", description="MixOE: how ID images and outliers are mixed")
    alpha: float | None = Field(None, gt=0, description="Beta(alpha, alpha); default 1 for mixup, 2 for cutmix")
    beta: float = Field(5.0, ge=0, description="weight of the soft-target loss on mixed samples")
    oe_weight: float = Field(1.0, ge=0, description="OE: weight of the uniform-target loss on outliers")
    oe_outlier_ratio: int = Field(2, ge=1, description="outliers per ID image for OE / Energy-OE")
    energy_weight: float = Field(0.1, ge=0, description="Energy-OE: weight of the energy hinge loss")
    m_in: float = Field(-13.0, description="Energy-OE: ID energies above this margin are penalised")
    m_out: float = Field(-6.0, description="Energy-OE: outlier energies below this margin are penalised")

    @property
    def mix_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 1.0 if self.mix == "mixup" else 2.0


class EvaluationConfig(_Strict):
    """OOD sets, score functions and operating points for evaluate / calibrate / export.

    The held-out classes of a holdout split are always evaluated as the ``fine`` OOD set;
    ``ood_sets`` adds any number of sets, each an image folder (``coarse: data/tinyimagenet/val``)
    or an :class:`OODSetConfig`; a pool's category split adds its validation and test parts.
    """

    ood_sets: dict[str, Path | OODSetConfig] = Field(
        default_factory=dict, description="OOD sets by name: an image folder or an OOD set section"
    )
    max_images_per_set: int | None = Field(None, ge=1, description="seeded subsample of large OOD folders")
    score: str | None = Field(None, description="deployed OOD score; default energy for energy-oe, else msp")
    knn_k: int = Field(10, ge=1, description="neighbour count of the knn score (its k-th nearest training feature)")
    knn_bank_size: int | None = Field(
        None, ge=1, description="KNN bank: a subsample of this many training features, seeded by the run's seed; "
        "null = every training image"
    )
    calibration_targets: list[float] = Field(
        default_factory=lambda: [0.90, 0.95, 0.99], description="operating points: target shares of ID images accepted"
    )
    default_target: float = Field(0.95, description="operating point used when a request names none")
    max_risks: list[float] = Field(
        default_factory=lambda: [0.01, 0.05], description="error rates to certify confidence thresholds for "
        "(models.calibration.selective); an empty list ships none"
    )
    default_max_risk: float | None = Field(0.05, description="the risk level answers use unless a request picks one")
    risk_delta: float = Field(0.1, gt=0, lt=1, description="chance that a certified risk level does not hold")
    paper_protocol: bool = Field(False, description="also report the MixOE paper's balanced 10-draw protocol")
    batch_size: int = Field(64, ge=1, description="images per batch when scoring")

    @field_validator("score")
    @classmethod
    def _known_score(cls, name: str | None) -> str | None:
        if name is not None:
            get_score(name)
        return name

    @model_validator(mode="after")
    def _defaults_are_listed(self) -> "EvaluationConfig":
        if self.default_target not in self.calibration_targets:
            raise ValueError(f"default_target {self.default_target} is not one of {self.calibration_targets}")
        if not all(0.0 < risk < 1.0 for risk in self.max_risks):
            raise ValueError(f"max_risks must lie strictly between 0 and 1, got {self.max_risks}")
        if self.default_max_risk is not None and self.default_max_risk not in self.max_risks:
            raise ValueError(f"default_max_risk {self.default_max_risk} is not one of {self.max_risks}")
        return self


class ExportConfig(_Strict):
    """Where ``mixoe export`` writes the bundle: ``<repository>/<name>/<version>/``."""

    repository: Path = Field(Path("models/repository"), description="model repository the bundle is written into")
    name: str = Field("model", description="model name")
    version: str = Field("1", description="model version")

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: object) -> object:
        """``--set export.version=2`` (or ``version: 2`` in YAML) reads as a number; a version is its text."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def bundle_dir(self) -> Path:
        return self.repository / self.name / self.version

    def require_new_bundle(self) -> None:
        """Refuse, before any training, a run whose export would fail at its end: a bundle of that
        name and version exists already (bundles are never overwritten)."""
        if self.bundle_dir.exists():
            raise ValueError(
                f"bundle {self.name}/{self.version} already exists at {self.bundle_dir}: "
                "set export.version to a new version (or remove that folder)"
            )


class BaselineStageConfig(_Strict):
    """The cross-entropy stage that ``mixoe pipeline`` runs before fine-tuning."""

    epochs: int = Field(10, ge=1, description="epochs of the cross-entropy stage")
    optimizer: OptimizerConfig = Field(OptimizerConfig(lr=1e-2), description="the cross-entropy stage's optimizer")


class TrainConfig(_Strict):
    """A whole run: model, data, method, optimisation."""

    architecture: str = Field("resnet50", description="torchvision architecture name (models/network/nets.py)")
    pretrained: str | None = Field(
        None, description="torchvision weight name (e.g. IMAGENET1K_V1) or a local weights file"
    )
    init_checkpoint: Path | None = Field(None, description="start from this run's best checkpoint (fine-tuning)")
    data: DataConfig
    outliers: OutlierConfig | None = None
    method: MethodConfig = MethodConfig()
    optimizer: OptimizerConfig = Field(
        OptimizerConfig(), description="mixoe pipeline: the fine-tune's; the baseline stage reads baseline.optimizer"
    )
    epochs: int = Field(
        10, ge=1, description="training epochs (mixoe pipeline: the fine-tune's; baseline.epochs: the baseline's)"
    )
    batch_size: int = Field(32, ge=1, description="ID images per step, over all processes together")
    seed: int = Field(0, description="seed of initialisation, shuffling, augmentation and mixing")
    keep: Literal["auto", "best_val_accuracy", "last_epoch"] = Field(
        "auto",
        description="which epoch's weights the run keeps; auto = best ID-validation accuracy for the "
        "baseline, the last epoch for outlier exposure (accuracy does not see OOD separation)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    channels_last: bool = Field(True, description="on CUDA: channels-last memory format")
    bf16: bool = Field(True, description="on CUDA: bfloat16 autocast")
    sync_batchnorm: bool = Field(False, description="several GPUs: BatchNorm statistics over all processes")
    output_dir: Path = Field(Path("runs/default"), description="run directory: checkpoints, metrics, report")
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    baseline: BaselineStageConfig = BaselineStageConfig()

    @property
    def kept_epoch_rule(self) -> str:
        """``keep`` resolved: an outlier-exposure objective trades a little accuracy for separation,
        so ranking its epochs by accuracy alone would keep the epoch that learned least of it."""
        if self.keep != "auto":
            return self.keep
        return "best_val_accuracy" if self.method.name == "baseline" else "last_epoch"

    @property
    def deployed_score(self) -> str:
        if self.evaluation.score is not None:
            return self.evaluation.score
        return "energy" if self.method.name == "energy-oe" else "msp"

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        get_architecture(name)
        return name

    @model_validator(mode="after")
    def _known_weights(self) -> "TrainConfig":
        check_pretrained(self.architecture, self.pretrained)
        return self

    @model_validator(mode="after")
    def _outliers_when_needed(self) -> "TrainConfig":
        if self.method.name != "baseline" and self.outliers is None:
            raise ValueError(f"method {self.method.name!r} needs an 'outliers' section (an outlier pool)")
        return self


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict."""
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(path.read_text()) or {}
    raise ValueError(f"Config file must end in .yaml, .yml or .toml: {path}")


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with ``value`` at the dotted ``key`` (``a.b.c``), creating levels as needed."""
    result = dict(raw)
    node = result
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value
    return result


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML scalars (``1e-3``, ``true``)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Override must look like key.sub=value, got {item!r}")
        raw = set_dotted(raw, key, yaml.safe_load(value))
    return raw


def read_raw(path: Path | None, overrides: list[str] = (), values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config file, then ``--set`` overrides (YAML-parsed), then ``values`` taken as they are.

    ``values`` carries command-line flags such as ``--output-dir``: a path or a version like ``1``
    must stay a string, which YAML parsing would not guarantee.
    """
    raw = apply_overrides(read_config_file(path) if path is not None else {}, list(overrides))
    for key, value in (values or {}).items():
        raw = set_dotted(raw, key, value)
    return raw


def validated(model: type[Model], raw: dict[str, Any]) -> Model:
    """``raw`` as a ``model``; a mistake is a :class:`ConfigError` with a one-line explanation."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(explain(model, error)) from error


def load_config(path: Path | None, overrides: list[str] = (), values: dict[str, Any] | None = None) -> TrainConfig:
    """A run's config from the file, ``--set`` overrides and flag ``values`` (:func:`read_raw`)."""
    raw = read_raw(path, overrides, values)
    if "compare" in raw:
        raise ConfigError("the 'compare' section is read by 'mixoe compare' only: use that command or remove it")
    return validated(TrainConfig, raw)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
