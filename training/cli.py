"""``mixoe`` command line: train, finetune, evaluate, calibrate, export, pipeline, compare, keygen.

Training commands take a YAML or TOML config plus ``--set key.sub=value`` overrides; later
commands take a run directory and read the config saved there. User mistakes (bad config, missing
files, impossible requests) end with one ``mixoe: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import yaml
from pydantic import ValidationError

from models.manifest import BundleError
from models.scores import SCORES
from models.trust import generate_key, load_private_key
from training import calibrate, compare, evaluate, export, pipeline, trainer
from training.config import TrainConfig, load_config
from training.methods import METHOD_NAMES

METHODS = tuple(name for name in METHOD_NAMES if name != "baseline")


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
    calibrate.add_argument("--score", help=f"OOD score to deploy ({', '.join(SCORES)})")

    export = commands.add_parser("export", help="write a bundle into a model repository")
    _run_arguments(export)
    export.add_argument("--repository", type=Path)
    export.add_argument("--name")
    export.add_argument("--version")
    export.add_argument(
        "--sign", type=Path, metavar="KEY",
        help="Ed25519 private key (PEM or 32 raw bytes) to sign the bundle's manifest with (manifest.sig)",
    )

    keygen = commands.add_parser("keygen", help="new Ed25519 key pair for signing bundles (KEY and KEY.pub)")
    keygen.add_argument("key", type=Path, help="private key file to create (mode 0600); KEY.pub gets the public key")

    pipeline = commands.add_parser("pipeline", help="baseline, fine-tune, calibrate, evaluate, export")
    _config_arguments(pipeline)

    compare_parser = commands.add_parser(
        "compare", help="every method from one baseline, every score, over splits x seeds; export the selected"
    )
    _config_arguments(compare_parser)
    return parser


def _training_config(args: argparse.Namespace, values: dict[str, Any]) -> TrainConfig:
    if args.output_dir is not None:
        values = {**values, "output_dir": str(args.output_dir)}
    return load_config(args.config, args.overrides, values)


def _run_config(args: argparse.Namespace, values: dict[str, Any]) -> TrainConfig:
    path = args.run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run directory (no config.yaml)")
    return load_config(path, args.overrides, {**values, "output_dir": str(args.run_dir)})


def _given(**values: Any) -> dict[str, Any]:
    """Flag values that were given, keyed by config path (``method__mix`` -> ``method.mix``)."""
    return {key.replace("__", "."): value for key, value in values.items() if value is not None}


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "train":
        trainer.train(_training_config(args, {"method.name": "baseline"}))
    elif args.command == "finetune":
        init = str(args.init) if args.init else None
        config = _training_config(args, _given(method__name=args.method, method__mix=args.mix, init_checkpoint=init))
        if config.method.name == "baseline":
            raise ValueError(f"finetune needs --method (one of {', '.join(METHODS)}); use 'mixoe train' for a baseline")
        if config.init_checkpoint is None:
            raise ValueError("finetune needs --init RUN_DIR (or init_checkpoint in the config): the run to start from")
        trainer.train(config)
    elif args.command == "evaluate":
        values = {}
        for item in args.ood:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"--ood must look like NAME=FOLDER, got {item!r}")
            values[f"evaluation.ood_sets.{name}"] = folder
        result = evaluate.evaluate(_run_config(args, values))
        print(evaluate.evaluation_markdown(result))
    elif args.command == "calibrate":
        values = _given(evaluation__score=args.score)
        if args.targets:
            values["evaluation.calibration_targets"] = list(args.targets)
            values["evaluation.default_target"] = 0.95 if 0.95 in args.targets else args.targets[0]
        record = calibrate.calibrate(_run_config(args, values))
        for point in record.calibration.operating_points:
            print(f"target {point.target_id_acceptance:.2f}: threshold {point.threshold:.6g} "
                  f"(k={point.k} of n={point.n_calibration}), ID test acceptance {point.measured_id_acceptance}, "
                  f"OOD acceptance {point.ood_acceptance}")
    elif args.command == "export":
        repository = str(args.repository) if args.repository else None
        values = _given(export__repository=repository, export__name=args.name, export__version=args.version)
        signer = load_private_key(args.sign).sign if args.sign else None  # a bad key fails before any work
        print(export.export(_run_config(args, values), signer))
    elif args.command == "keygen":
        print(generate_key(args.key))
    elif args.command == "pipeline":
        bundle = pipeline.run_pipeline(_training_config(args, {}))
        if bundle is not None:  # ranks > 0 under torchrun export nothing
            print(bundle)
    elif args.command == "compare":
        values = {} if args.output_dir is None else {"output_dir": str(args.output_dir)}
        result = compare.run_compare(*compare.load_compare_config(args.config, args.overrides, values))
        print(result.markdown)
        print(result.bundle)
    else:  # argparse's required subcommand makes this unreachable; keep the chain total anyway
        raise ValueError(f"unknown command {args.command!r}")


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "invalid configuration: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()
        )
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"invalid YAML{where}: {getattr(error, 'problem', None) or error}"
    return " ".join(str(error).split())  # one line, whatever the message


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        _dispatch(args)
    except (ValueError, OSError, BundleError, ValidationError, yaml.YAMLError) as error:
        logging.getLogger("mixoe").debug("the command failed", exc_info=error)  # the traceback, with --verbose
        print(f"mixoe: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0
