"""Admission before work: a prediction request is admitted or refused (503 + Retry-After) before
its body is read.

Parsing a multipart upload and decoding its images cost far more than refusing it; a server that
does that work first and only then finds the batch queue full spends its CPU on requests it
refuses, and serves fewer as the load grows. Each worker therefore counts the images it holds
(being parsed, decoded, queued or in a batch) against ``Settings.admission_capacity``
(``queue_size`` images waiting plus one full batch), and the batch loop refuses none, so an
admitted image is never refused later.

The number of images is not known before the body is parsed, so a request is admitted on **one**
image, before FastAPI reads its body; once its body is parsed (and before anything is decoded) the
route holds its real image count (:mod:`service.api.routes.admitted`), and a request whose extra images do not
fit gets the same 503. Single-image requests, and every refusal under a flood of them, cost no
body reading at all. The decoding pool's queue is bounded by the same count: only held images are
decoded.
"""

from __future__ import annotations

from service.api.errors import Overloaded


class Admission:
    """Images one worker holds, against its capacity; refusing costs a comparison and an exception."""

    def __init__(self, capacity: int, retry_after_s: int):
        if capacity < 1:
            raise ValueError(f"admission capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.held = 0

    def ticket(self) -> Ticket:
        """Admit a request on one image, or raise :class:`Overloaded`."""
        ticket = Ticket(self)
        ticket.hold(1)
        return ticket

    def take(self, images: int) -> None:
        """Hold ``images`` more, or raise :class:`Overloaded` and hold nothing more."""
        free = self.capacity - self.held
        if images > free:
            raise Overloaded(
                f"the server is overloaded: {images} more images do not fit ({free} of {self.capacity} places "
                f"free); retry in {self.retry_after_s}s",
                retry_after_s=self.retry_after_s,
            )
        self.held += images

    def give_back(self, images: int) -> None:
        self.held -= images


class Ticket:
    """One request's share of an :class:`Admission`, given back when the request ends."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self.images = 0

    def hold(self, images: int) -> None:
        """Hold ``images`` in all (never fewer than now); :class:`Overloaded` when the rest do not fit."""
        if images > self.images:
            self._admission.take(images - self.images)
            self.images = images

    def release(self) -> None:
        self._admission.give_back(self.images)
        self.images = 0
