"""The training loop: baseline cross-entropy and every fine-tuning method, on one process or many.

Read top to bottom: :func:`train` sets up data, model, method, optimizer and schedule, resumes from
``last.pt`` if a previous attempt was interrupted, then alternates :func:`train_one_epoch` and
:func:`evaluate_accuracy`, keeping the checkpoint ``config.kept_epoch_rule`` names (the best
ID-validation accuracy, or the last epoch).

Reproducibility: every random stream (model init, data order, augmentation workers, mixing
lambdas and boxes) is derived from ``config.seed`` and the epoch number, so a CPU run is
bit-for-bit repeatable and a resumed run continues exactly where an uninterrupted one would.
Under ``torchrun`` each rank gets its own shard of ID images and of outliers from
``DistributedSampler``; mixing draws use the same generator on every rank, so one global batch
shares one lambda and one cutmix box, as in a single-process run. With ``drop_last`` the sampler
gives rank ``r`` positions ``r::world`` of the same permutation that one process uses, and the
per-rank batch is ``batch_size / world``, so step ``k``'s per-rank batches together are one
process's batch ``k`` and the ``i``-th ID image still meets the ``i``-th outlier: apart from
BatchNorm statistics (per rank unless ``sync_batchnorm``) and float summation order, N processes
take the same steps as one. Logged losses are averaged over all ranks' images.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from models.network.nets import build_network
from models.network.preprocess import Normalization
from models.network.weights import pretrained_file
from training.config import TrainConfig, save_config
from training.data.datasets import ImageDataset, OutlierPool, SeededItems, collate_skipping_bad
from training.data.experiment import ExperimentData, load_experiment_data
from training.data.splits import pool_exclusions
from training.data.transforms import (
    build_eval_geometry, build_outlier_transform, build_train_transform, preprocessing_of,
)
from training.fit.checkpoint import (
    load_best_weights,
    load_training_state,
    remove_partial_writes,
    removed_if_failed,
    save_best,
    save_training_state,
    unwrap,
)
from training.fit.distributed import DistributedContext, ShardSampler, distributed_session
from training.fit.methods import Method, build_method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int


def _loader(
    dataset: Dataset, batch_size: int, ctx: DistributedContext, seed: int, workers: int, shuffle: bool
) -> DataLoader:
    """A loader whose sampler shards across ranks (a seeded shuffle with one rank).

    Every item carries its own augmentation seed (:class:`SeededItems`), so workers can persist
    across epochs without making a run depend on the number of workers or on resumption.
    Unshuffled (evaluation) loaders shard without padding, so each image counts once.
    """
    if shuffle:
        sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = ShardSampler(len(dataset), ctx.world_size, ctx.rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededItems(sampler, seed),
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=shuffle,
        collate_fn=collate_skipping_bad,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def _per_rank_batch(global_batch: int, ctx: DistributedContext) -> int:
    if global_batch % ctx.world_size:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {ctx.world_size} processes")
    return global_batch // ctx.world_size


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, min_lr: float):
    """Per-step cosine from the base lr down to ``min_lr`` after an optional linear warm-up."""
    base = optimizer.param_groups[0]["lr"]
    floor = min_lr / base

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def _imagenet_weights(config: TrainConfig) -> str | None:
    """The ``pretrained`` weights this stage loads: none when it starts from another run's."""
    return None if config.init_checkpoint else config.pretrained


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """Pretrained backbone + fresh head, or (fine-tuning) a previous run's best weights."""
    pretrained = _imagenet_weights(config)
    if pretrained is None and config.init_checkpoint is None:
        log.warning("no pretrained weights configured: %s starts from random initialisation", config.architecture)
    model = build_network(config.architecture, num_classes, pretrained)
    if config.init_checkpoint is not None:
        try:
            model.load_state_dict(load_best_weights(config.init_checkpoint))
        except RuntimeError as error:  # missing/unexpected keys or shape mismatches
            first = str(error).splitlines()[0]
            raise ValueError(
                f"{config.init_checkpoint} does not fit {config.architecture} with {num_classes} classes: {first}"
            ) from None
    return model


def train_one_epoch(
    model: nn.Module,
    method: Method,
    normalize: Callable[[Tensor], Tensor],
    id_loader: DataLoader,
    outlier_batches: Iterator[Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mix_generator: torch.Generator,
    ctx: DistributedContext,
    config: TrainConfig,
    progress: bool,
) -> dict[str, float]:
    model.train()
    cuda = ctx.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and config.bf16 else nullcontext()
    memory_format = torch.channels_last if cuda and config.channels_last else torch.contiguous_format
    totals: dict[str, float] = {}
    # Summed on the device: reading it after each step would make the CPU wait for the backward
    # pass and the optimizer before it could queue the next batch. (The method's logged parts are
    # read after the forward pass, which leaves the backward pass and the optimizer queued.)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    images_seen = 0
    start = time.perf_counter()
    ratio = method.outliers_per_id_image
    for batch in tqdm(id_loader, disable=not progress, leave=False, desc="train"):
        # Unreadable files (counted by the datasets) can shorten or empty either batch; keep exactly
        # `ratio` outliers per ID image. Ranks skip a step together or not at all: a rank that
        # skipped alone would leave the others waiting in DDP's gradient all-reduce.
        pool = next(outlier_batches) if outlier_batches is not None else None
        if batch is None:
            keep = 0
        else:
            images, labels = batch
            keep = len(labels) if pool is None else min(len(labels), len(pool) // ratio)
        if not ctx.all_ranks(keep > 0):
            continue
        outliers = None
        if pool is not None:
            images, labels, pool = images[:keep], labels[:keep], pool[: keep * ratio]
            outliers = normalize(pool.to(ctx.device, non_blocking=True)).contiguous(memory_format=memory_format)
        x = normalize(images.to(ctx.device, non_blocking=True)).contiguous(memory_format=memory_format)
        y = labels.to(ctx.device, non_blocking=True)
        with autocast:
            loss, parts = method.loss(model, x, y, outliers, mix_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        batch = len(y)
        images_seen += batch
        loss_sum += loss.detach() * batch
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value * batch
    totals = {"loss": loss_sum.item(), **totals}  # waits for the last step, so it is timed
    elapsed = time.perf_counter() - start
    keys = list(totals)  # the method logs the same keys, in the same order, on every rank
    seen, *sums = ctx.all_reduce_sum([float(images_seen)] + [totals[k] for k in keys])
    averages = {k: total / max(1.0, seen) for k, total in zip(keys, sums)}
    averages["id_images_per_second"] = seen / elapsed if elapsed > 0 else 0.0
    return averages


@torch.inference_mode()
def evaluate_accuracy(
    model: nn.Module, normalize: Callable[[Tensor], Tensor], loader: DataLoader, ctx: DistributedContext, bf16: bool
) -> float:
    """Top-1 accuracy over the (sharded) loader, summed across ranks; bf16 autocast as in training."""
    model.eval()
    correct = total = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" and bf16 else nullcontext()
    for batch in loader:
        if batch is None:
            continue
        images, labels = batch
        with autocast:
            logits = model(normalize(images.to(ctx.device, non_blocking=True)))
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        total += len(labels)
    correct, total = ctx.all_reduce_sum([float(correct), float(total)])
    return correct / max(1.0, total)


def _outlier_batches(loader: DataLoader, seed: int, epoch: int) -> Iterator[Tensor]:
    """Outlier batches for one ID epoch, re-passing over the pool (reshuffled) if it runs out."""
    for pass_index in itertools.count():
        loader.sampler.set_epoch(1_000_003 * epoch + pass_index)
        yield from (batch for batch in loader if batch is not None)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) one training stage described by ``config``; returns the kept epoch's accuracy."""
    with distributed_session(config.device) as ctx, removed_if_failed(config.output_dir, ctx.is_main):
        return _train(config, ctx)


def config_fingerprint(config: TrainConfig) -> str:
    """Hash of what determines the trained weights; where the run lives and how it is evaluated,
    exported or placed on devices and workers may change between a run and its resumption."""
    relevant = config.model_dump(mode="json", exclude={"output_dir", "evaluation", "export", "device"})
    relevant["data"].pop("num_workers")
    # Settings added later hash only when set, so runs made before them still resume.
    if relevant["keep"] == "auto":
        del relevant["keep"]
    if relevant["data"]["validation_classes"] is None:
        del relevant["data"]["validation_classes"]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _train(config: TrainConfig, ctx: DistributedContext) -> TrainResult:
    run_dir = config.output_dir
    if _imagenet_weights(config) is not None:  # found (or downloaded) before any data is read
        pretrained_file(config.architecture, _imagenet_weights(config))
    state = load_training_state(run_dir)
    fingerprint = config_fingerprint(config)
    if state is not None and state.get("config_sha256") != fingerprint:
        raise ValueError(
            f"{run_dir} holds a run started with another configuration; resuming it with this one would "
            "mix the two: choose a new output_dir (or restore the original config)"
        )
    if ctx.is_main:
        for orphan in remove_partial_writes(run_dir):
            log.info("removed %s, left by a checkpoint write that was killed", orphan)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    data: ExperimentData = load_experiment_data(config.data)
    transforms = config.data.transforms
    train_set = ImageDataset(data.train.samples, build_train_transform(transforms))
    val_set = ImageDataset(data.val.samples, build_eval_geometry(transforms))
    batch = _per_rank_batch(config.batch_size, ctx)
    workers = config.data.num_workers
    id_loader = _loader(train_set, batch, ctx, config.seed, workers, shuffle=True)
    val_loader = _loader(val_set, batch, ctx, config.seed, workers, shuffle=False)
    if len(id_loader) == 0:
        raise ValueError(
            f"{len(train_set)} training images make no full batch of {config.batch_size}: lower batch_size"
        )

    method = build_method(config.method)
    outlier_loader = None
    if method.outliers_per_id_image:
        pool = OutlierPool(
            config.outliers.root, build_outlier_transform(config.outliers, transforms),
            exclude=pool_exclusions(config.outliers),
        )
        outlier_loader = _loader(
            pool, batch * method.outliers_per_id_image, ctx, config.seed + 1, workers, shuffle=True
        )
        if len(outlier_loader) == 0:  # the outlier stream would wait forever for a full batch
            needed = config.batch_size * method.outliers_per_id_image
            raise ValueError(
                f"the outlier pool {config.outliers.root} has {len(pool)} readable images, fewer than one "
                f"batch of {needed} outliers: add outliers or lower batch_size"
            )

    if config.sync_batchnorm and ctx.is_distributed and ctx.device.type != "cuda":
        raise ValueError(
            f"sync_batchnorm needs GPUs: torch {torch.__version__} runs SyncBatchNorm on CUDA devices only, "
            f"not on {ctx.device.type}"
        )
    model = build_model(config, data.num_classes)
    if config.sync_batchnorm and ctx.is_distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    cuda = ctx.device.type == "cuda"
    # Every training batch has the same shape (the crop size), so cuDNN's per-shape algorithm
    # search pays for itself after the first steps.
    torch.backends.cudnn.benchmark = cuda
    model.to(ctx.device, memory_format=torch.channels_last if cuda and config.channels_last else torch.preserve_format)
    # Loader workers ship uint8 (a quarter of the bytes of float); the device converts and
    # normalises with the very transform evaluation and the service use.
    normalize = Normalization(preprocessing_of(transforms))
    optimizer = build_optimizer(model, config)
    scheduler = cosine_schedule(
        optimizer, config.epochs * len(id_loader), config.optimizer.warmup_steps, config.optimizer.min_lr
    )

    start_epoch, best_accuracy, best_epoch = 0, -1.0, -1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_accuracy, best_epoch = state["epoch"] + 1, state["best_accuracy"], state["best_epoch"]
        if ctx.is_main:
            log.info("resuming %s from epoch %d", run_dir, start_epoch)

    train_model: nn.Module = model
    if ctx.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if cuda else None)
    progress = ctx.is_main and sys.stderr.isatty()

    for epoch in range(start_epoch, config.epochs):
        # Dropout draws from the global RNG: reseeding it per epoch makes a resumed epoch
        # identical to the uninterrupted one; each rank gets its own stream (rank 0's is a
        # single process's).
        torch.manual_seed(config.seed * 100_003 + epoch + ctx.rank * 1_000_000_007)
        id_loader.sampler.set_epoch(epoch)
        outlier_batches = _outlier_batches(outlier_loader, config.seed, epoch) if outlier_loader is not None else None
        mix_generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        stats = train_one_epoch(
            train_model, method, normalize, id_loader, outlier_batches, optimizer, scheduler,
            mix_generator, ctx, config, progress,
        )
        ctx.broadcast_buffers(model)
        accuracy = evaluate_accuracy(model, normalize, val_loader, ctx, config.bf16)
        kept = accuracy > best_accuracy or config.kept_epoch_rule == "last_epoch"
        if kept:
            best_accuracy, best_epoch = accuracy, epoch
        if ctx.is_main:
            if kept:
                save_best(run_dir, model, {"epoch": epoch, "val_accuracy": accuracy, "method": method.name})
            save_training_state(
                run_dir,
                {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "best_accuracy": best_accuracy,
                    "best_epoch": best_epoch,
                    "config_sha256": fingerprint,
                },
            )
            line = {"epoch": epoch, "method": method.name, "val_accuracy": accuracy, "lr": scheduler.get_last_lr()[0]}
            line.update(stats)
            print(json.dumps(line), flush=True)
            with open(run_dir / "log.jsonl", "a") as handle:
                handle.write(json.dumps(line) + "\n")
        ctx.barrier()

    return TrainResult(run_dir, best_accuracy, best_epoch, config.epochs - start_epoch)
