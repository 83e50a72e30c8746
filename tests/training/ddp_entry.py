"""Entry point that the DDP tests launch under torchrun: ``mixoe train`` plus two test-only switches.

``python -m torch.distributed.run --nproc_per_node=2 -m tests.training.ddp_entry CONFIG... [options]``
trains each ``CONFIG`` in turn with :func:`training.fit.trainer.train`, as ``mixoe train`` does, inside
one process-group session (as the pipeline runs its stages; it also spares the tests a launch),
optionally with

* ``--groupnorm``: BatchNorm layers replaced by GroupNorm (:func:`with_groupnorm`), so that the
  result no longer depends on how a global batch is split into per-rank batches;
* ``--kill-in-epoch N``: in the last config's run, the last rank kills itself with SIGKILL when
  epoch ``N``'s validation starts, after epoch ``N - 1``'s checkpoint is on disk, as a crashed node
  or the OOM killer would.

The switches patch the trainer's module attributes in this process only; production code has no
test hooks.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from training.config import TrainConfig, load_config
from training.fit import trainer
from training.fit.distributed import distributed_session

ModelBuilder = Callable[[TrainConfig, int], nn.Module]


def with_groupnorm(build: ModelBuilder) -> ModelBuilder:
    """``build`` (e.g. :func:`training.fit.trainer.build_model`), then every BatchNorm2d replaced by a
    ``GroupNorm(32, C)``, which normalises each image on its own: the network's output for an image
    no longer depends on the other images of its batch, hence not on how a batch is split."""

    def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
        model = build(config, num_classes)
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(parent, name, nn.GroupNorm(min(32, child.num_features), child.num_features))
        return model

    return build_model


def _killed_in_epoch(epoch: int, evaluate: Callable) -> Callable:
    calls = {"n": 0}

    def evaluate_or_die(*args, **kwargs):
        if calls["n"] == epoch and int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        calls["n"] += 1
        return evaluate(*args, **kwargs)

    return evaluate_or_die


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp_entry", description=__doc__.splitlines()[0])
    parser.add_argument("configs", type=Path, nargs="+", metavar="CONFIG")
    parser.add_argument("--groupnorm", action="store_true")
    parser.add_argument("--kill-in-epoch", type=int, metavar="N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.groupnorm:
        trainer.build_model = with_groupnorm(trainer.build_model)
    configs = [load_config(path) for path in args.configs]
    with distributed_session(configs[0].device):
        for index, config in enumerate(configs):
            if args.kill_in_epoch is not None and index == len(configs) - 1:
                trainer.evaluate_accuracy = _killed_in_epoch(args.kill_in_epoch, trainer.evaluate_accuracy)
            trainer.train(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
