"""``mixoe`` command line: train, finetune, evaluate, calibrate, export, pipeline.

Training commands take a YAML or TOML config plus ``--set key.sub=value`` overrides; later
commands take a run directory and read the config saved there. User mistakes (bad config, missing
files, impossible requests) end with one ``mixoe: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from models.bundle import BundleError
from training.config import TrainConfig, load_config

METHODS = ("mixoe", "oe", "energy-oe")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML or TOML run configuration")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=0.01 (repeatable)",
    )
    parser.add_argument("--output-dir", type=Path, help="run directory (default: the config's output_dir)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run directory (holds config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="cross-entropy baseline from ImageNet weights")
    _config_arguments(train)

    finetune = commands.add_parser("finetune", help="fine-tune a trained run with an outlier-exposure method")
    _config_arguments(finetune)
    finetune.add_argument("--method", choices=METHODS, help="default: the config's method.name")
    finetune.add_argument("--mix", choices=("mixup", "cutmix"), help="MixOE variant")
    finetune.add_argument("--init", type=Path, help="run directory to start from (its best weights)")

    evaluate = commands.add_parser("evaluate", help="ID accuracy and OOD metrics for every score")
    _run_arguments(evaluate)
    evaluate.add_argument("--ood", action="append", default=[], metavar="NAME=FOLDER", help="extra OOD image folder")

    calibrate = commands.add_parser("calibrate", help="conformal thresholds from ID validation data")
    _run_arguments(calibrate)
    calibrate.add_argument("--targets", type=float, nargs="+", help="ID acceptance targets, e.g. 0.9 0.95 0.99")
    calibrate.add_argument("--score", help="OOD score to deploy (msp, maxlogit, energy, odin)")

    export = commands.add_parser("export", help="write a bundle into a model repository")
    _run_arguments(export)
    export.add_argument("--repository", type=Path)
    export.add_argument("--name")
    export.add_argument("--version")

    pipeline = commands.add_parser("pipeline", help="baseline, fine-tune, calibrate, evaluate, export")
    _config_arguments(pipeline)
    return parser


def _training_config(args: argparse.Namespace, extra: list[str]) -> TrainConfig:
    overrides = list(extra) + list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def _run_config(args: argparse.Namespace, extra: list[str]) -> TrainConfig:
    path = args.run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run directory (no config.yaml)")
    return load_config(path, list(extra) + list(args.overrides) + [f"output_dir={args.run_dir}"])


def _dispatch(args: argparse.Namespace) -> None:
    # Imported here so that `mixoe --help` stays fast and a config error shows before torch loads.
    from training import calibrate, evaluate, export, pipeline, trainer

    if args.command == "train":
        trainer.train(_training_config(args, ["method.name=baseline"]))
    elif args.command == "finetune":
        extra = []
        if args.method:
            extra.append(f"method.name={args.method}")
        if args.mix:
            extra.append(f"method.mix={args.mix}")
        if args.init:
            extra.append(f"init_checkpoint={args.init}")
        config = _training_config(args, extra)
        if config.method.name == "baseline":
            raise ValueError(f"finetune needs --method (one of {', '.join(METHODS)}); use 'mixoe train' for a baseline")
        if config.init_checkpoint is None:
            raise ValueError("finetune needs --init RUN_DIR (or init_checkpoint in the config): the run to start from")
        trainer.train(config)
    elif args.command == "evaluate":
        extra = []
        for item in args.ood:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"--ood must look like NAME=FOLDER, got {item!r}")
            extra.append(f"evaluation.ood_sets.{name}={folder}")
        result = evaluate.evaluate(_run_config(args, extra))
        print(evaluate.evaluation_markdown(result))
    elif args.command == "calibrate":
        extra = []
        if args.targets:
            extra.append(f"evaluation.calibration_targets={list(args.targets)}")
            if 0.95 not in args.targets:
                extra.append(f"evaluation.default_target={args.targets[0]}")
        if args.score:
            extra.append(f"evaluation.score={args.score}")
        result = calibrate.calibrate(_run_config(args, extra))
        for point in result.operating_points:
            print(f"target {point.target_id_acceptance:.2f}: threshold {point.threshold:.6g} "
                  f"(k={point.k} of n={point.n_calibration}), ID test acceptance {point.measured_id_acceptance}, "
                  f"OOD acceptance {point.ood_acceptance}")
    elif args.command == "export":
        extra = [f"export.{key}={getattr(args, key)}" for key in ("repository", "name", "version") if getattr(args, key)]
        print(export.export(_run_config(args, extra)))
    elif args.command == "pipeline":
        print(pipeline.run_pipeline(_training_config(args, [])))


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "invalid configuration: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()
        )
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        _dispatch(args)
    except (ValueError, FileNotFoundError, BundleError, ValidationError) as error:
        print(f"mixoe: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0
