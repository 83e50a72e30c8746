"""PyTorch's intra-op thread count, settled per thread.

PyTorch keeps the count of intra-op (OpenMP) threads per calling thread: ``torch.set_num_threads``
sets the calling thread's count and a process-wide default, and a thread that has not run a parallel
operation yet reads that default when it first does. So a decoding thread that asks for one thread
would also give one thread to the batch loop, were the loop to start after it; and a decoding thread
that asks for nothing runs its resize with as many threads as the model, on the cores the model and
the event loop need.

The batch loop only settles its count (:func:`settle_intra_op_threads`) unless ``model_threads``
names one or the device is CUDA (:func:`batch_loop_threads`): on the 2-core CPU an explicit
``torch.set_num_threads(2)``, even to the count a thread already had, ran the MobileNetV2 bundle
15-40% slower at 4 and 8 images per batch than the count PyTorch chose itself.
"""

from __future__ import annotations

import torch


def settle_intra_op_threads() -> int:
    """Fix this thread's count at the process default now; what other threads set later leaves it be."""
    return torch.get_num_threads()  # a thread reads the process default once, at its first use


def pin_intra_op_threads(count: int) -> None:
    """Run this thread's PyTorch operations on ``count`` intra-op threads, whatever other threads set later."""
    settle_intra_op_threads()
    torch.set_num_threads(count)


def batch_loop_threads(device: torch.device, model_threads: int | None) -> int | None:
    """The batch loop's intra-op thread count, ``None`` for the process's own.

    On a CPU, ``model_threads`` (the setting): the forward pass shares the cores with decoding and
    HTTP, and whether more threads for the model pay depends on which of them is the bottleneck
    (benchmarks/RESULTS.md, "The model's threads"). On CUDA the loop only stacks crops and feeds
    the GPU: one thread, the cores are the decoding threads'."""
    return model_threads if device.type == "cpu" else 1
