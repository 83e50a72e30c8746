"""PyTorch's intra-op thread count, settled per thread.

PyTorch keeps the count of intra-op (OpenMP) threads per calling thread: ``torch.set_num_threads``
sets the calling thread's count and a process-wide default, and a thread that has not run a parallel
operation yet reads that default when it first does. So a decoding thread that asks for one thread
would also give one thread to the batch loop, were the loop to start after it; and a decoding thread
that asks for nothing runs its resize with as many threads as the model, on the cores the model and
the event loop need.

The batch loop only settles its count (:func:`settle_intra_op_threads`): on the 2-core CPU an
explicit ``torch.set_num_threads(2)``, even to the count a thread already had, ran the MobileNetV2
bundle 15-40% slower at 4 and 8 images per batch than the count PyTorch chose itself.
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
