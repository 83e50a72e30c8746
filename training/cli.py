"""``mixoe`` command line: train, finetune, evaluate, calibrate, export, pipeline, compare, keygen.

Training commands take a YAML or TOML config plus ``--set key.sub=value`` overrides; later
commands take a run directory and read the config saved there. User mistakes (bad config, missing
files, impossible requests) end with one ``mixoe: error: ...`` line and exit status 2. The
arguments and their help live in :mod:`training.cli_parser`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from models.contract.manifest import BundleError
from models.contract.trust import generate_key, load_private_key
from training import export, pipeline
from training.assess import calibrate, compare, evaluate
from training.cli_parser import METHODS, build_parser
from training.config import TrainConfig, load_config
from training.fit import trainer

log = logging.getLogger("mixoe")


def _training_config(args: argparse.Namespace, values: dict[str, Any]) -> TrainConfig:
    if args.output_dir is not None:
        values = {**values, "output_dir": str(args.output_dir)}
    return load_config(args.config, args.overrides, values)


def _run_config(args: argparse.Namespace, values: dict[str, Any]) -> TrainConfig:
    path = args.run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run directory (no config.yaml)")
    return load_config(path, args.overrides, {**values, "output_dir": str(args.run_dir)})


def _baseline_stage(config: TrainConfig) -> TrainConfig:
    """What ``mixoe train`` trains: with a ``baseline`` section, exactly the pipeline's baseline
    stage (that section's epochs and optimizer; the top-level ones are the fine-tune's)."""
    if "baseline" not in config.model_fields_set:
        return config
    stage = pipeline.baseline_config(config, config.output_dir)
    log.info(
        "training with the config's baseline section (epochs %d, %s lr %g), as 'mixoe pipeline' does",
        stage.epochs, stage.optimizer.name, stage.optimizer.lr,
    )
    return stage


def _given(**values: Any) -> dict[str, Any]:
    """Flag values that were given, keyed by config path (``method__mix`` -> ``method.mix``)."""
    return {key.replace("__", "."): value for key, value in values.items() if value is not None}


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "train":
        trainer.train(_baseline_stage(_training_config(args, {"method.name": "baseline"})))
    elif args.command == "finetune":
        init = str(args.init) if args.init else None
        config = _training_config(args, _given(method__name=args.method, method__mix=args.mix, init_checkpoint=init))
        if config.method.name == "baseline":
            raise ValueError(f"finetune needs --method (one of {', '.join(METHODS)}); use 'mixoe train' for a baseline")
        if config.init_checkpoint is None:
            raise ValueError("finetune needs --init RUN_DIR (or init_checkpoint in the config): the run to start from")
        if "baseline" in config.model_fields_set:
            log.info("the config's baseline section is for 'mixoe train'; finetune uses the top-level settings")
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
        values = _given(evaluation__score=args.score, evaluation__risk_delta=args.risk_delta)
        if args.risks:
            values["evaluation.max_risks"] = list(args.risks)
            values["evaluation.default_max_risk"] = 0.05 if 0.05 in args.risks else args.risks[0]
        if args.targets:
            values["evaluation.calibration_targets"] = list(args.targets)
            values["evaluation.default_target"] = 0.95 if 0.95 in args.targets else args.targets[0]
        print(calibrate.calibration_markdown(calibrate.calibrate(_run_config(args, values))))
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
    """Run one command; returns the exit status (argparse's own exits, --help and --version included)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        _dispatch(args)
    except (ValueError, OSError, BundleError, ValidationError, yaml.YAMLError) as error:
        log.debug("the command failed", exc_info=error)  # the traceback, with --verbose
        print(f"mixoe: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0
