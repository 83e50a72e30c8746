"""DistributedDataParallel training under torchrun, on CPU: gloo over loopback, generated images.

Every launch is ``python -m torch.distributed.run --standalone --nproc_per_node=2 ...``, exactly as a
user starts it (the standalone rendezvous binds a free port on localhost itself); gloo is pinned to
the loopback interface. torchrun gives each worker one intra-op thread, and the in-process
single-process reference runs with one thread too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from models.runtime import load_bundle
from tests.helpers.images import make_image_folder
from tests.helpers.runs import tiny_config as shared_tiny_config
from tests.training.ddp_entry import with_groupnorm
from training.config import TrainConfig, save_config
from training.fit import trainer
from training.fit.distributed import DistributedContext

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["amber", "blue", "crimson", "green"]
LAUNCH_TIMEOUT_S = 180  # a hung collective fails the test instead of blocking the suite
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """35 training images, 21 validation images and 25 outliers: none divides by 2 or by the batch of 8,
    so the sharding has remainders to drop (training) or to keep without padding (validation)."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "id" / "train", CLASSES, per_class=8, seed=1)
    make_image_folder(root / "id" / "train", CLASSES[:1], per_class=11, seed=11)
    make_image_folder(root / "id" / "val", CLASSES, per_class=5, seed=2)
    make_image_folder(root / "id" / "val", CLASSES[:1], per_class=6, seed=12)
    make_image_folder(root / "id" / "test", CLASSES, per_class=5, seed=3)
    make_image_folder(root / "outliers", ["o1", "o2"], per_class=12, seed=4)
    make_image_folder(root / "outliers", ["o3"], per_class=1, seed=14)
    make_image_folder(root / "far", ["x"], per_class=10, seed=5)
    return root


def tiny_config(data_root: Path, output_dir: Path, **changes) -> TrainConfig:
    """The shared tiny run at a smaller learning rate (untrained ResNets stay finite with GroupNorm)."""
    return shared_tiny_config(data_root, output_dir, **{"optimizer": {"lr": 0.002}, **changes})


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` from the repository root."""
    inherited = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # if pytest itself is a rank
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def write_config(config: TrainConfig, path: Path) -> Path:
    save_config(config, path)
    return path


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def last_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)


@contextmanager
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- sharding


class Keys(Dataset):
    """Returns the ``(index, seed)`` key it is given, to see which item every rank loads."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def batches(loader, steps: int) -> list[list[tuple[int, int]]]:
    """The first ``steps`` batches of an iterator over collated ``(indices, seeds)`` batches."""
    out = []
    for indices, seeds in loader:
        out.append(list(zip(indices.tolist(), seeds.tolist())))
        if len(out) == steps:
            break
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_rank_batches_interleave_into_the_single_process_batch(world: int) -> None:
    """Rank ``r``'s step-``k`` batch is positions ``r::world`` of one process's step-``k`` batch, for ID
    images and outliers alike: the same images with the same augmentation seeds, and the ``j``-th ID
    image of the global batch meets the same outlier as in one process (MixOE pairs them by position).
    Outliers span two passes over the pool here (3 batches per pass, 4 steps per epoch)."""
    global_batch, epoch, seed = 8, 1, 7
    ids, pool = Keys(35), Keys(25)

    def shards(ctx: DistributedContext) -> tuple[list, list]:
        per_rank = global_batch // ctx.world_size
        id_loader = trainer._loader(ids, per_rank, ctx, seed, workers=0, shuffle=True)
        id_loader.sampler.set_epoch(epoch)
        out_loader = trainer._loader(pool, per_rank, ctx, seed + 1, workers=0, shuffle=True)
        steps = len(id_loader)
        return batches(id_loader, steps), batches(trainer._outlier_batches(out_loader, seed, epoch), steps)

    single_ids, single_outliers = shards(DistributedContext(0, 1, 0, CPU))
    ranks = [shards(DistributedContext(rank, world, rank, CPU)) for rank in range(world)]
    assert len(single_ids) == len(single_outliers) == 4
    for which, single in ((0, single_ids), (1, single_outliers)):
        for rank in range(world):
            assert len(ranks[rank][which]) == len(single)
        for step, batch in enumerate(single):
            interleaved = [ranks[j % world][which][step][j // world] for j in range(global_batch)]
            assert interleaved == batch
    assert len({key for batch in single_ids for key in batch}) == 32  # no image twice in an epoch


def test_validation_shards_count_every_image_once() -> None:
    val = Keys(21)
    seen = []
    for rank in range(2):
        loader = trainer._loader(val, 4, DistributedContext(rank, 2, rank, CPU), 7, workers=0, shuffle=False)
        seen += [index for batch in batches(loader, len(loader)) for index, _ in batch]
    assert sorted(seen) == list(range(21))


# --------------------------------------------------------------------------- same weights as one process, resume


@dataclass(frozen=True)
class GroupNormRuns:
    """MixOE-cutmix from scratch for 2 epochs, BatchNorm replaced by GroupNorm (see the next test)."""

    config: TrainConfig
    single: Path  # one process, in this one (one thread)
    ddp: Path  # two processes under torchrun
    interrupted: Path  # two processes, the same config, rank 1 SIGKILLed when epoch 1's validation starts
    killed_launch: subprocess.CompletedProcess  # the launch that ran `ddp`, then `interrupted`


@pytest.fixture(scope="module")
def groupnorm_runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> GroupNormRuns:
    runs = tmp_path_factory.mktemp("groupnorm")
    config = tiny_config(data_root, runs / "single", method={"name": "mixoe", "mix": "cutmix"})
    with one_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_model", with_groupnorm(trainer.build_model))
        trainer.train(config)
    paths = [
        write_config(config.model_copy(update={"output_dir": runs / name}), runs / f"{name}.yaml")
        for name in ("ddp", "interrupted")
    ]
    launch = torchrun("-m", "tests.training.ddp_entry", *map(str, paths), "--groupnorm", "--kill-in-epoch", "1")
    return GroupNormRuns(config, runs / "single", runs / "ddp", runs / "interrupted", launch)


def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(groupnorm_runs: GroupNormRuns) -> None:
    """Two ranks with 4 images each take the same 8 SGD steps as one process with 8 images.

    BatchNorm: with batch statistics per rank, two ranks normalise each half-batch by its own
    mean and variance, so the maths legitimately differs from one process. SyncBatchNorm would fix
    that, but in torch 2.14 it runs on CUDA only (on CPU it raises "SyncBatchNorm expected input
    tensor to be on GPU"); freezing BatchNorm to its running statistics makes an untrained ResNet
    diverge. So both runs replace every BatchNorm2d by GroupNorm, which normalises each image on
    its own, through the test entry point (production code is unchanged). Everything else is the
    real trainer: sharded ID data and outliers, per-item augmentation seeds, one cutmix box and
    lambda per global batch, DDP gradient averaging, the cosine schedule, sharded validation.

    Tolerance: summation order differs (DDP averages two half-batch gradients), and the ResNet
    amplifies float noise over 8 steps (running one process with 2 threads instead of 1 moves the
    weights by ~1e-4 of their update, two processes by ~1e-3), so each tensor must agree within 1%
    of how far training moved it. A wrong split (other images, other outliers, another lambda or
    box, a gradient sum instead of a mean) changes the update itself.
    """
    runs = groupnorm_runs
    single, ddp = log_lines(runs.single), log_lines(runs.ddp)
    assert [line["epoch"] for line in ddp] == [0, 1]
    for a, b in zip(single, ddp):
        assert b["val_accuracy"] == a["val_accuracy"]  # counted over all 21 images, none twice
        assert b["lam"] == a["lam"] and b["lr"] == a["lr"]
        for key in ("loss", "ce", "aux"):  # averaged over both ranks' images
            assert b[key] == pytest.approx(a[key], rel=1e-3)
    with torch.random.fork_rng():
        torch.manual_seed(runs.config.seed)
        initial = with_groupnorm(trainer.build_model)(runs.config, len(CLASSES)).state_dict()
    a, b = last_state(runs.single)["model"], last_state(runs.ddp)["model"]
    assert a.keys() == b.keys() == initial.keys()
    for key in a:
        update = (a[key] - initial[key]).abs().max().item()
        assert update > 0, key
        assert (a[key] - b[key]).abs().max().item() <= 0.01 * update, key
    assert json.loads((runs.ddp / "best.json").read_text()) == json.loads((runs.single / "best.json").read_text())


def test_ddp_run_killed_mid_training_resumes_to_the_uninterrupted_weights(groupnorm_runs: GroupNormRuns) -> None:
    """Rank 1 is SIGKILLed when epoch 1's validation starts (epoch 0's checkpoint is on disk); torchrun
    stops rank 0 and fails. Launched again, both ranks resume from epoch 1 and end bit-identical to
    the uninterrupted two-process run: model, optimizer, schedule and best weights."""
    runs = groupnorm_runs
    assert runs.killed_launch.returncode != 0
    assert "SIGKILL" in runs.killed_launch.stderr
    assert last_state(runs.interrupted)["epoch"] == 0
    assert [line["epoch"] for line in log_lines(runs.interrupted)] == [0]

    config_path = runs.interrupted.with_suffix(".yaml")
    resumed = check(torchrun("-m", "tests.training.ddp_entry", str(config_path), "--groupnorm"))
    assert resumed.stderr.count("from epoch 1") == 1  # logged by rank 0 only
    assert [line["epoch"] for line in log_lines(runs.interrupted)] == [0, 1]
    expected, got = last_state(runs.ddp), last_state(runs.interrupted)
    assert got["epoch"] == expected["epoch"] == 1
    for part in ("model", "optimizer", "scheduler"):
        assert_equal_nested(got[part], expected[part], part)
    expected_best, got_best = (load_file(str(run / "best.safetensors")) for run in (runs.ddp, runs.interrupted))
    assert_equal_nested(got_best, expected_best, "best")


def assert_equal_nested(got: object, expected: object, where: str) -> None:
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_equal_nested(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for index, (g, e) in enumerate(zip(got, expected)):
            assert_equal_nested(g, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), where
    else:
        assert got == expected, where


def test_sync_batchnorm_on_cpu_ranks_is_a_clear_error(data_root: Path, tmp_path: Path) -> None:
    """SyncBatchNorm runs on CUDA only; on CPU ranks the run stops before training, saying so."""
    config = tiny_config(data_root, tmp_path / "sync", sync_batchnorm=True)
    with pytest.raises(ValueError, match="sync_batchnorm needs GPUs"):
        trainer._train(config, DistributedContext(rank=0, world_size=2, local_rank=0, device=CPU))


# --------------------------------------------------------------------------- the CLI under torchrun


def test_pipeline_cli_under_torchrun_trains_on_every_rank_and_rank_0_alone_writes(
    data_root: Path, tmp_path: Path
) -> None:
    """``mixoe pipeline`` (baseline, then MixOE-mixup, real BatchNorm) launched by torchrun: both
    ranks train both stages in one process group, rank 0 alone calibrates, evaluates and exports."""
    config = tiny_config(
        data_root, tmp_path / "pipe", method={"name": "mixoe", "mix": "mixup"}, epochs=1,
        baseline={"epochs": 1, "optimizer": {"lr": 0.01}},
        export={"repository": str(tmp_path / "repo"), "name": "tiny", "version": "2"},
    )
    result = check(torchrun("-m", "training", "pipeline", str(write_config(config, tmp_path / "pipe.yaml"))))
    bundle_dir = tmp_path / "repo" / "tiny" / "2"
    assert str(bundle_dir) in result.stdout.splitlines()
    assert load_bundle(bundle_dir).manifest.class_names == CLASSES
    root = config.output_dir
    assert list(json.loads((root / "pipeline.json").read_text())) == [
        "baseline", "finetune", "calibrate", "evaluate", "export"
    ]
    # One line per epoch: logs are written by rank 0 only.
    assert [(line["epoch"], line["method"]) for line in log_lines(root / "baseline")] == [(0, "baseline")]
    assert [(line["epoch"], line["method"]) for line in log_lines(root / "finetune")] == [(0, "mixoe")]
