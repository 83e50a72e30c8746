"""Training throughput of one MixOE step with the real data loader, side by side with the reference.

Variants, all measured in one run on the same machine (compare ratios, not absolute numbers):

* ``ours``       the project's data path: workers ship uint8 crops (pinned memory), normalisation
                 on the device, bf16 autocast + channels_last on CUDA, ``--workers`` loader workers;
* ``reference``  the MixOE reference-style path: PIL transforms that normalise to float32 in
                 4 workers, fp32 compute, default memory format;
* ``compute``    our step on synthetic tensors already on the device: the ceiling the data path
                 is measured against;
* ``data``       our data path alone (same workers, batches copied to the device, no model): what
                 the CPU can feed. Above ``compute``, the CPU does not cap training on this GPU;
                 below it, a faster GPU would wait for the CPU (decode on the GPU would then pay).

Throughput counts in-distribution images per second (each step also processes one outlier per ID
image, as MixOE does). Prints a table and writes JSON.

    python benchmarks/train_throughput.py --arch resnet50 --size 448 --batch 32 \
        --data ../shared/data/flowers17 --outliers ../shared/data/tinyimagenet200/train
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from torchvision.transforms import v2

from machine import machine_name
from models.network.nets import build_network, resolve_device
from models.network.preprocess import Normalization
from training.config import DataConfig, MethodConfig, TransformConfig
from training.data.datasets import ImageDataset, OutlierPool, collate_skipping_bad, load_split
from training.data.transforms import build_train_transform, preprocessing_of
from training.fit.methods import build_method


def reference_transform(cfg: TransformConfig) -> v2.Compose:
    """What the MixOE reference code does per image in the workers: crop, flip, float, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(cfg.input_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from (batch for batch in loader if batch is not None)


def time_steps(step: Callable[[], int], warmup: int, steps: int, device: torch.device) -> float:
    """ID images per second over ``steps`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = sum(step() for _ in range(steps))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def make_step(
    model: nn.Module, batches: Iterator, normalize: Callable[[Tensor], Tensor], device: torch.device, fast: bool
) -> Callable[[], int]:
    method = build_method(MethodConfig(name="mixoe", mix="mixup"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and fast else nullcontext
    memory_format = torch.channels_last if cuda and fast else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)

    def step() -> int:
        (images, labels), outliers = next(batches)
        keep = min(len(labels), len(outliers))
        x = normalize(images[:keep].to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        o = normalize(outliers[:keep].to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        y = labels[:keep].to(device, non_blocking=True)
        with autocast():
            loss, _ = method.loss(model, x, y, o, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return keep

    return step


def delivery(batches: Iterator, device: torch.device) -> Callable[[], int]:
    """The ``data`` variant's step: take the next ID and outlier batches onto the device, no model."""
    def step() -> int:
        (images, labels), outliers = next(batches)
        images.to(device, non_blocking=True)
        outliers.to(device, non_blocking=True)
        return min(len(labels), len(outliers))

    return step


def loaders(args, transform, workers: int, pin: bool) -> Iterator:
    data = DataConfig(format="list", root=args.data, classes_file="classes.txt", train="train.txt", val="val.txt")
    train = load_split(data, data.train)
    id_set = ImageDataset(train.samples, transform)
    pool = OutlierPool(args.outliers, transform)

    def loader(dataset):
        # One epoch longer than the run (a few spare batches stand in for unreadable files): a
        # small dataset (the GPU check carries 360 ID images) would otherwise cross an epoch
        # boundary every few steps, where the workers start again with empty queues. The run
        # measures the steady state of the large datasets users train on.
        steps = args.warmup + args.steps + 4
        sampler = RandomSampler(dataset, num_samples=max(len(dataset), steps * args.batch))
        return DataLoader(
            dataset, batch_size=args.batch, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=True,
            collate_fn=collate_skipping_bad, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    return zip(endless(loader(id_set)), endless(loader(pool)))


def synthetic(args, device: torch.device, num_classes: int) -> Iterator:
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (args.batch,), device=device)
    outliers = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    while True:
        yield (images, labels), outliers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=32, help="ID images per step (plus as many outliers)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flowers17"))
    parser.add_argument("--outliers", type=Path, default=Path("../shared/data/tinyimagenet200/train"))
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--reference-workers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", nargs="+", default=["compute", "ours", "data", "reference"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/train_throughput.json"))
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    cfg = TransformConfig(input_size=args.size, resize=args.size)
    num_classes = 17
    rows = []
    for variant in args.variants:
        torch.manual_seed(0)
        fast = variant != "reference"
        pin = device.type == "cuda"
        normalize: Callable[[Tensor], Tensor] = Normalization(preprocessing_of(cfg))
        if variant == "compute":
            batches, workers = synthetic(args, device, num_classes), 0
        elif variant in ("ours", "data"):
            batches, workers = loaders(args, build_train_transform(cfg), args.workers, pin), args.workers
        elif variant == "reference":
            workers = args.reference_workers
            batches, normalize = loaders(args, reference_transform(cfg), workers, pin), nn.Identity()
        else:
            raise SystemExit(f"Invalid variant {variant!r}. Only compute, ours, data and reference are supported.")
        if variant == "data":
            step, precision = delivery(batches, device), "-"
        else:
            model = build_network(args.arch, num_classes).to(
                device, memory_format=torch.channels_last if fast and device.type == "cuda" else torch.preserve_format
            )
            model.train()
            step = make_step(model, batches, normalize, device, fast)
            precision = "bf16" if fast and device.type == "cuda" else "fp32"
        rate = time_steps(step, args.warmup, args.steps, device)
        rows.append({"variant": variant, "workers": workers, "precision": precision, "id_images_per_second": rate})
        print(f"{variant:>10}: {rate:8.1f} ID img/s", flush=True)

    compute = next((r["id_images_per_second"] for r in rows if r["variant"] == "compute"), None)
    result = {
        "machine": machine_name(device), "device": str(device), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "arch": args.arch, "size": args.size, "batch": args.batch,
        "method": "mixoe-mixup", "steps": args.steps, "rows": rows,
    }
    print(f"\nMixOE step, {args.arch} {args.size}px, batch {args.batch}+{args.batch}, on {result['machine']}")
    print("| variant | workers | precision | ID img/s | vs compute |\n|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['id_images_per_second'] / compute:.2f}" if compute else "-"
        print(f"| {row['variant']} | {row['workers']} | {row['precision']} | {row['id_images_per_second']:.1f} | {ratio} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
