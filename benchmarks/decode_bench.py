"""Upload bytes -> model crop: PIL beside torchvision's JPEG decoder on the CPU (and nvjpeg on a GPU).

The service turns each upload into the uint8 crop the model was calibrated on in its decoding
thread pool (``service.runtime.predictor.prepare_image``). This times that step alone, on real JPEGs, for
each decoder path and thread count, in one run (compare the ratios):

* ``pil``          PIL decode -> ``Bundle.pixels`` (the calibration pipeline);
* ``torchvision``  ``decode_jpeg`` on the CPU (libjpeg-turbo, same pixels as PIL) -> crop;
* ``nvjpeg``       ``decode_jpeg`` on the GPU, resize and crop on the GPU (CUDA only);
* ``*-batched``    one ``decode_jpeg`` call per ``--batch`` images (torchvision on the CPU, nvjpeg on a
                   GPU, where batches decode in parallel), after the service's per-file header checks,
                   in the calling thread (no pool): whether the service should gather a request's,
                   or several requests', JPEGs into one call.

With more threads than one, the speed-up over one thread shows whether the decoder releases the
GIL. Against the PIL crops the thresholds were calibrated on, each path reports the largest
difference of any crop pixel (grey levels), the share of images whose predicted class is the
same, and the largest change of the OOD score.

    python benchmarks/decode_bench.py --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from machine import machine_name
from models.network.nets import resolve_device
from models.runtime import Bundle, load_bundle
from serve_bench import DECODE_LIMITS, DEFAULT_IMAGES, ROOT, default_bundle, load_jpegs
from service.runtime.decoding import decode_image, open_image
from service.runtime.jpeg import is_plain_jpeg
from service.runtime.predictor import Upload, prepare_image
from service.settings import Settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="<repository>/<name>/<version>; default: the embedded model")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder searched for *.jpg / *.jpeg")
    parser.add_argument("--max-images", type=int, default=400)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batch", type=int, default=32, help="images per call on the batched path")
    parser.add_argument("--device", default="auto", help="where the model (and nvjpeg) runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "decode_bench.json")
    args = parser.parse_args()
    args.threads = sorted(set(args.threads) | {1})  # the batched path runs on one thread: PIL's rate there is its base
    return args


def decoders(bundle: Bundle) -> dict[str, Callable[[bytes], torch.Tensor]]:
    """Each path as bytes -> crop."""
    def settings(gpu: bool) -> Settings:
        return Settings(max_upload_bytes=DECODE_LIMITS["max_bytes"], max_image_pixels=DECODE_LIMITS["max_pixels"],
                        gpu_jpeg_decode=gpu)

    paths = {
        "pil": lambda data: bundle.pixels(decode_image(data, **DECODE_LIMITS)),
        "torchvision": lambda data, s=settings(False): prepare_image(Upload("x.jpg", data), bundle, s),
    }
    if bundle.device.type == "cuda":
        paths["nvjpeg"] = lambda data, s=settings(True): prepare_image(Upload("x.jpg", data), bundle, s)
    return paths


def decode_batched(bundle: Bundle, jpegs: list[bytes]) -> list[torch.Tensor]:
    """Crops of ``jpegs`` decoded in one ``decode_jpeg`` call on the model's device, after the
    service's per-file header checks (so that only the batching differs from the other paths)."""
    for data in jpegs:
        if not is_plain_jpeg(open_image(data, **DECODE_LIMITS)):
            raise ValueError("the batched path takes plain JPEGs only")
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    return [bundle.pixels(image) for image in decode_jpeg(encoded, mode=ImageReadMode.RGB, device=bundle.device)]


def decode_all_batched(bundle: Bundle, jpegs: list[bytes], batch: int) -> list[torch.Tensor]:
    """Crops of all ``jpegs`` through :func:`decode_batched`, ``batch`` at a time."""
    return [crop for first in range(0, len(jpegs), batch) for crop in decode_batched(bundle, jpegs[first : first + batch])]


def batched_rate(bundle: Bundle, jpegs: list[bytes], batch: int, cuda: bool) -> float:
    """Images per second through :func:`decode_all_batched` (after one warm-up call)."""
    decode_batched(bundle, jpegs[:batch])
    started = time.perf_counter()
    decode_all_batched(bundle, jpegs, batch)
    if cuda:
        torch.cuda.synchronize()
    return len(jpegs) / (time.perf_counter() - started)


def rate(decode: Callable[[bytes], torch.Tensor], jpegs: list[bytes], threads: int, cuda: bool) -> float:
    """Images per second through ``decode`` with ``threads`` workers (after one warm-up pass)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, jpegs[:threads * 4]))
        started = time.perf_counter()
        list(pool.map(decode, jpegs))
        if cuda:
            torch.cuda.synchronize()
        return len(jpegs) / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    bundle = load_bundle((args.bundle or default_bundle()).resolve(), device)
    jpegs = [data for _, data in load_jpegs(args.images, args.max_images)]
    paths = decoders(bundle)
    reference = torch.stack([paths["pil"](data) for data in jpegs])
    expected = bundle.predict(reference)
    cuda = device.type == "cuda"

    def agreement(crops: list[torch.Tensor]) -> dict[str, float]:
        stacked = torch.stack([crop.to(reference.device) for crop in crops])
        predicted = bundle.predict(stacked)
        return {
            "max_abs_diff": int((stacked.int() - reference.int()).abs().max()),
            "same_class": float((predicted.logits.argmax(1) == expected.logits.argmax(1)).float().mean()),
            "max_score_change": float((predicted.scores - expected.scores).abs().max()),
        }

    rows = []
    for name, decode in paths.items():
        agrees = agreement([decode(data) for data in jpegs])
        for threads in args.threads:
            rows.append({"path": name, "threads": threads, "images_per_s": rate(decode, jpegs, threads, cuda)} | agrees)
    try:
        batched = decode_all_batched(bundle, jpegs, args.batch)
        rows.append({"path": ("nvjpeg" if cuda else "torchvision") + "-batched", "threads": 1,
                     "images_per_s": batched_rate(bundle, jpegs, args.batch, cuda)} | agreement(batched))
    except (RuntimeError, ValueError) as error:  # a report without this row beats no report
        print(f"batched path skipped: {error}")
    base = {row["threads"]: row["images_per_s"] for row in rows if row["path"] == "pil"}
    print(f"{len(jpegs)} JPEGs from {args.images}; {machine_name(device)}")
    print(f"{'path':<20} {'threads':>7} {'img/s':>9} {'vs pil':>7} {'max |diff|':>10} {'same class':>10} "
          f"{'max score change':>16}")
    for row in rows:
        row["vs_pil"] = row["images_per_s"] / base[row["threads"]]
        print(f"{row['path']:<20} {row['threads']:>7} {row['images_per_s']:>9.1f} {row['vs_pil']:>7.2f} "
              f"{row['max_abs_diff']:>10} {row['same_class']:>10.3f} {row['max_score_change']:>16.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
                                    "images": len(jpegs), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
