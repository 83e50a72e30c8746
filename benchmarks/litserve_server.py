"""The bundle served by LitServe (PyPI ``litserve``), for ``litserve_bench.py`` to compare with the service.

It does the service's work per image with the service's own functions: each uploaded JPEG goes
through ``prepare_image`` (the same checks, the same decoder, the same uint8 crop) in
``decode_request``, and each batch through ``Bundle.predict`` (normalisation, forward pass, OOD
score, acceptance at the bundle's default operating point). The request is the service's:
``POST /predict``, multipart, one or more ``files`` fields; the answer, per image, the class, its
probability, the OOD score, its conformal p-value and whether it was accepted (the service's answer
says more: top-k, model and operating point).

LitServe batches requests, not images: a batch of ``max_batch_size`` requests of k images each runs
as one forward pass of up to ``max_batch_size * k`` images. ``--batch-log`` makes each inference
worker append one line per batch (the images in it), so the benchmark can tell that batching
happened and how large the batches were.

    PYTHONPATH=<litserve site>:$PWD python benchmarks/litserve_server.py --bundle <path> --port 8001
"""

import argparse
from pathlib import Path
from typing import IO, Any

import litserve as ls
import torch
from fastapi import Request
from torch import Tensor

from models.runtime import Bundle, Predictions, load_bundle
from service.runtime.predictor import Upload, prepare_image
from service.settings import Settings


class BundleAPI(ls.LitAPI):
    """One bundle on the CPU: requests of several JPEGs in, one verdict per image out."""

    def __init__(self, bundle_path: Path, batch_log: Path | None, **options: Any):
        super().__init__(**options)
        self._bundle_path = bundle_path
        self._batch_log_path = batch_log
        self._batch_log: IO[str] | None = None
        self.bundle: Bundle | None = None

    def setup(self, device: str) -> None:
        self.bundle = load_bundle(self._bundle_path, device)
        self._settings = Settings(model_repository=self._bundle_path.parent.parent)
        if self._batch_log_path is not None:
            self._batch_log = open(self._batch_log_path, "a", buffering=1)  # one short O_APPEND write per batch

    def decode_request(self, request: Request, **kwargs: Any) -> Tensor:
        """The request's form -> its images' uint8 crops (k, 3, S, S).

        LitServe reads the form in its API process and hands it here (``request`` is that form); it
        picks the parameter's type from this annotation at run time, so this module keeps real
        annotations (no ``from __future__ import annotations``)."""
        assert self.bundle is not None
        uploads = [Upload(upload.filename or "", upload.file.read()) for upload in request.getlist("files")]
        return torch.stack([prepare_image(upload, self.bundle, self._settings) for upload in uploads])

    def batch(self, inputs: list[Tensor]) -> tuple[Tensor, list[int]]:
        return torch.cat(inputs), [len(crops) for crops in inputs]

    def predict(self, x: tuple[Tensor, list[int]], **kwargs: Any) -> tuple[Predictions, list[int]]:
        assert self.bundle is not None
        crops, counts = x
        if self._batch_log is not None:
            self._batch_log.write(f"{len(crops)}\n")
        return self.bundle.predict(crops), counts

    def unbatch(self, output: tuple[Predictions, list[int]]) -> list[list[dict[str, Any]]]:
        predictions, counts = output
        verdicts = [
            {
                "class": self.bundle.manifest.class_names[int(probabilities.argmax())] if self.bundle else "",
                "probability": float(probabilities.max()),
                "ood_score": float(score),
                "p_value": float(p_value),
                "accepted": bool(accepted),
            }
            for probabilities, score, p_value, accepted in zip(
                predictions.probabilities, predictions.scores, predictions.p_values, predictions.accepted, strict=True
            )
        ]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [verdicts[start : start + count] for start, count in zip(starts, counts, strict=True)]

    def encode_response(self, output: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        return {"predictions": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="inference processes (workers_per_device on the CPU)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests per batch (LitServe batches requests)")
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--batch-log", type=Path, help="append each batch's image count to this file")
    parser.add_argument(
        "--fast-queue", action="store_true", help="LitServe's ZeroMQ queues instead of multiprocessing.Manager's"
    )
    args = parser.parse_args()
    api = BundleAPI(
        args.bundle, args.batch_log, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000
    )
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=120,
        fast_queue=args.fast_queue,
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
