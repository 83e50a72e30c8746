"""PyTorch's intra-op thread count, fixed per thread.

PyTorch keeps the count of intra-op (OpenMP) threads per calling thread: ``torch.set_num_threads``
sets the calling thread's count and a process-wide default, and a thread that has not run a parallel
operation yet takes that default when it first does. So a decoding thread that asks for one thread
would also, by luck of timing, give one thread to the batch loop if the loop had not run yet; and a
decoding thread that asks for nothing runs its resize with as many threads as the model, on the cores
the model and the event loop need (on two cores that cost about half again the CPU per image).
:func:`pin_intra_op_threads` settles the calling thread's count first, then sets it, so what each
thread asks for holds whatever the others do afterwards.
"""

from __future__ import annotations

import torch


def pin_intra_op_threads(count: int) -> None:
    """Run this thread's PyTorch operations on ``count`` intra-op threads, whatever other threads set later."""
    torch.get_num_threads()  # settles this thread's count now: it is read from the process default only once
    torch.set_num_threads(count)
