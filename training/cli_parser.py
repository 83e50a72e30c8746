"""The ``mixoe`` command line's arguments, help texts and examples (one per command).

Kept apart from :mod:`training.cli`, which runs the commands: this module only says what a user
may type. Help is plain text (no reST markup), shown as written by ``RawDescriptionHelpFormatter``.
"""

from __future__ import annotations

import argparse
import tomllib
from importlib import metadata
from pathlib import Path

from models.scoring.scores import SCORES
from training.fit.methods import METHOD_NAMES

METHODS = tuple(name for name in METHOD_NAMES if name != "baseline")
PACKAGE = "mixoe-service"

DESCRIPTION = """\
Train an out-of-distribution-aware image classifier with Mixture Outlier Exposure (MixOE),
calibrate its reject thresholds, evaluate it and export a bundle for the service.

A run is described by a YAML or TOML config (every key: training/config.py, docs/training.md);
--set KEY=VALUE overrides any value. Mistakes end with one 'mixoe: error: ...' line, exit status 2;
add -v to see the traceback."""

EPILOG = """\
example, the whole workflow in one command:
  mixoe pipeline benchmarks/configs/flowers17_mixoe.yaml

run 'mixoe COMMAND --help' for a command's options and an example."""

SET_HELP = "override a config value, e.g. --set optimizer.lr=0.01 (repeatable; values are read as YAML)"


def package_version() -> str:
    """The installed package's version; a source checkout that is not installed reads pyproject.toml."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def _command(
    commands: argparse._SubParsersAction, name: str, summary: str, details: str, example: str
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.\n\n{details}",
        epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML (.yaml/.yml) or TOML (.toml) run configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--output-dir", type=Path, help="run directory (default: the config's output_dir)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a training run directory (holds config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixoe", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _command(
        commands, "train", "train the cross-entropy baseline from ImageNet weights",
        "Uses the config's 'baseline' section (epochs, optimizer) when it has one, as the pipeline's\n"
        "baseline stage does; otherwise the top-level epochs and optimizer.",
        "mixoe train my.yaml --output-dir runs/base",
    )
    _config_arguments(train)

    finetune = _command(
        commands, "finetune", "fine-tune a trained run with an outlier-exposure method",
        "Starts from the best weights of --init RUN_DIR and trains with the config's outlier pool.",
        "mixoe finetune my.yaml --method mixoe --mix cutmix --init runs/base --output-dir runs/mixoe",
    )
    _config_arguments(finetune)
    finetune.add_argument(
        "--method", choices=METHODS, help="outlier-exposure method (default: the config's method.name)"
    )
    finetune.add_argument("--mix", choices=("mixup", "cutmix"), help="MixOE variant (default: the config's method.mix)")
    finetune.add_argument("--init", type=Path, metavar="RUN_DIR", help="run directory to start from (its best weights)")

    evaluate = _command(
        commands, "evaluate", "ID accuracy and OOD metrics of a run under every score",
        "Writes evaluation.json and evaluation.md into the run directory and prints the table.",
        "mixoe evaluate runs/mixoe --ood coarse=path/to/unrelated/images",
    )
    _run_arguments(evaluate)
    evaluate.add_argument(
        "--ood", action="append", default=[], metavar="NAME=FOLDER", help="add an OOD image folder (repeatable)"
    )

    calibrate = _command(
        commands, "calibrate", "conformal reject thresholds from the ID validation split",
        "Writes calibration.json into the run directory and prints each operating point.",
        "mixoe calibrate runs/mixoe --targets 0.9 0.95 0.99 --score energy",
    )
    _run_arguments(calibrate)
    calibrate.add_argument(
        "--targets", type=float, nargs="+", metavar="T", help="ID acceptance targets, e.g. 0.9 0.95 0.99"
    )
    calibrate.add_argument("--score", metavar="NAME", help=f"OOD score to deploy: {', '.join(SCORES)}")
    calibrate.add_argument(
        "--risks", type=float, nargs="+", metavar="EPSILON",
        help="maximum error rates among accepted ID images to certify confidence thresholds for, e.g. 0.01 0.05",
    )
    calibrate.add_argument(
        "--risk-delta", type=float, metavar="DELTA", help="chance that a certified risk does not hold (default 0.1)"
    )

    export = _command(
        commands, "export", "write a calibrated run as a bundle into a model repository",
        "The bundle lands in REPOSITORY/NAME/VERSION/ (weights, manifest.json, report.md, plots).",
        "mixoe export runs/mixoe --repository models/repository --name mymodel --version 1",
    )
    _run_arguments(export)
    export.add_argument(
        "--repository", type=Path, help="model repository folder (default: the config's export.repository)"
    )
    export.add_argument("--name", help="model name in the repository (default: the config's export.name)")
    export.add_argument("--version", help="model version (default: the config's export.version)")
    export.add_argument(
        "--sign", type=Path, metavar="KEY",
        help="Ed25519 private key (PEM or 32 raw bytes) to sign the bundle's manifest with (manifest.sig)",
    )

    keygen = _command(
        commands, "keygen", "new Ed25519 key pair for signing bundles",
        "Writes KEY (private, mode 0600) and KEY.pub; never overwrites an existing key.",
        "mixoe keygen keys/signing",
    )
    keygen.add_argument("key", type=Path, help="private key file to create; KEY.pub gets the public key")

    pipeline = _command(
        commands, "pipeline", "baseline, fine-tune, calibrate, evaluate and export in one go",
        "Each finished stage is recorded in OUTPUT_DIR/pipeline.json and skipped when run again.",
        "mixoe pipeline my.yaml --set epochs=3",
    )
    _config_arguments(pipeline)

    compare = _command(
        commands, "compare", "every method from one baseline, under every score, over splits x seeds",
        "Reads the config's 'compare' section; selects a method and score and exports that model.",
        "mixoe compare benchmarks/configs/flowers17_compare.yaml",
    )
    _config_arguments(compare)
    return parser
