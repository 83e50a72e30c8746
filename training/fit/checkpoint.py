"""Checkpoints written atomically, so that a kill mid-write never leaves a corrupt file.

Two kinds live in a run directory:

* ``last.pt``: everything needed to resume (model, optimizer, scheduler, epoch, best accuracy);
  loaded with ``weights_only=True``, so reading it never runs code;
* ``best.safetensors`` (+ ``best.json``): the kept weights (the best ID-validation accuracy, or
  the last epoch: ``TrainConfig.keep``), the ones that fine-tuning starts from and that get exported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)
LAST = "last.pt"
BEST_WEIGHTS = "best.safetensors"
BEST_INFO = "best.json"


PARTIAL_SUFFIX = ".partial"
"""Ends the name of every temporary file :func:`atomic_write` writes (``.last.pt.<random>.partial``)."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename into place.

    A kill (SIGKILL, a lost node) mid-write skips the clean-up below and leaves the temporary file:
    :func:`remove_partial_writes` deletes such files when the next run starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``directory``; return them.

    Only where no write can be in flight: at the start of a run, on its main process."""
    orphans = sorted(Path(directory).glob(f".*{PARTIAL_SUFFIX}"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel, so state-dict keys never carry ``module.``."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_training_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(run_dir / LAST, lambda tmp: torch.save(state, tmp))


def load_training_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / LAST
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_best(run_dir: Path, model: nn.Module, info: dict[str, Any]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_write(run_dir / BEST_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    atomic_write(run_dir / BEST_INFO, lambda tmp: tmp.write_text(json.dumps(info, indent=2)))


def load_best_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / BEST_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"No trained weights in {run_dir} (expected {BEST_WEIGHTS}): train it first")
    return load_file(str(path))


@contextmanager
def removed_if_failed(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Remove ``run_dir`` if the block created it and failed before writing anything but ``config.yaml``.

    A run that fails while starting (bad data, missing weights, an interrupt in the first epoch)
    then leaves no directory that looks like a run; one that wrote a checkpoint keeps it, to resume.
    """
    existed = run_dir.exists()
    try:
        yield
    except BaseException:
        if enabled and not existed and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"config.yaml"}:
            shutil.rmtree(run_dir)
            log.debug("removed %s: the run failed before it wrote anything but its config", run_dir)
        raise
