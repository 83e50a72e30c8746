"""A bundle's forward pass replayed from CUDA graphs: the same kernels, launched in one call.

A small network at a moderate batch size is bound by the CPU thread that launches its kernels,
not by the GPU. On an H200, MobileNetV2 took 4.8 ms per batch of one image and 7.1 ms per batch
of 32 (``raw@1`` and ``raw@32`` in ``benchmarks/results/serve_h200_model_process.json``), while
the GPU was busy for a fraction of that. A CUDA graph records the kernels of one forward pass at
one input shape and replays them all with one launch. The service pads its GPU batches to a few
fixed sizes (``service.runtime.batch_loop.inference.padded_batch_sizes``), exactly what graphs need: one per size.

A replay runs the kernels recorded, so its logits equal the eager pass's; ``benchmarks/serve_bench.py``
checks that on the GPU it runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_WARM_UP_PASSES = 2


@dataclass(frozen=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    input: Tensor  # the graph reads its batch from here...
    output: tuple[Tensor, ...]  # ...and writes its outputs (logits, maybe scores) here, on every replay


class GraphedForward:
    """``forward`` (uint8 batch on the GPU -> a tuple of float outputs on the GPU: the logits, and a
    feature-space score when the bundle has one), recorded per input shape.

    The graphs share one memory pool, so a replay may overwrite memory in which another graph's
    output lives: copy what :meth:`__call__` returns (on the current stream, which orders the
    copy before any later replay) before calling it again. Like the model, it serves one thread
    at a time.
    """

    def __init__(self, forward: Callable[[Tensor], tuple[Tensor, ...]], device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self._forward = forward
        self._device = device
        self._graphs: dict[tuple[int, ...], _Graph] = {}
        self._pool: tuple[int, int] | None = None
        self._stream: torch.cuda.Stream | None = None

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return list(self._graphs)

    @torch.inference_mode()
    def capture(self, example: Tensor) -> None:
        """Record ``forward`` at ``example``'s shape (a uint8 batch on the GPU).

        Recording may not allocate workspaces or initialise libraries, so a few eager passes run
        first on the stream that records. ``thread_local`` capture lets another thread (a
        bundle loading beside a running service) use the GPU meanwhile.
        """
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        static_input = example.to(self._device).clone()
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            for _ in range(_WARM_UP_PASSES):
                self._forward(static_input)
        torch.cuda.current_stream(self._device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            static_output = self._forward(static_input)
        self._pool = graph.pool()
        self._graphs[tuple(example.shape)] = _Graph(graph, static_input, static_output)

    @torch.inference_mode()
    def __call__(self, batch: Tensor) -> tuple[Tensor, ...] | None:
        """``forward(batch)`` by replay, launched on the current stream; ``None`` when no graph was
        recorded at ``batch``'s shape."""
        recorded = self._graphs.get(tuple(batch.shape))
        if recorded is None:
            return None
        recorded.input.copy_(batch, non_blocking=True)
        recorded.graph.replay()
        return recorded.output
