"""The messages between a worker and the model process: named, typed, one class per kind.

Each travels pickled in a frame (:mod:`service.runtime.framing`) over an authenticated Unix
socket, many calls in flight per connection: a worker sends numbered calls (:class:`Call`), one per
request (or per chunk of a request larger than a batch), without waiting, and each :class:`Answer` carries the number of the call it answers, which
routes it to the request waiting for it, at most until its deadline
(``service.runtime.model_client``). The model process answers every call it takes, with
:class:`Failed` when it could not do it, and drops a connection that sends anything but a call. A
call that missed its deadline is answered later, maybe: nobody waits for that number any more, so
the answer is thrown away, and the connection, and the models this worker loaded through it,
outlive a stall.

* :class:`Load` -> :class:`Loaded`: load and warm up a model unless it is loaded already;
* :class:`Run` -> :class:`Judged`: judge one request's images at its operating point and top-k;
* :class:`Ping` -> :class:`Pong`: answered by the loop that runs the batches, behind the tasks
  queued before it, so an answer in time means the model process is serving (the parent's
  watchdog and a worker that lost contact send it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from models.contract.manifest import OperatingPoint
from models.runtime import Bundle
from service.runtime.verdicts import ImageVerdict

ModelKey = tuple[str, str]
"""``(bundle path, manifest digest)``: which model a worker means (:func:`model_key`)."""


def model_key(bundle: Bundle) -> ModelKey:
    """The key under which the model process holds ``bundle``: a version republished in place
    under the same path has another digest, so it is never served in the old one's name."""
    digest = hashlib.sha256(bundle.manifest.model_dump_json().encode()).hexdigest()
    return str(bundle.path.resolve()), digest


@dataclass(frozen=True)
class Load:
    """Load ``model`` (and warm it up), or count this worker as one more user of it."""

    model: ModelKey


@dataclass(frozen=True)
class Run:
    """Judge one request's images at ``point`` with ``top_k`` classes.

    ``crops`` holds the images the worker decoded, as one uint8 array (C, 3, S, S), so that they
    cross the socket as one buffer, not one pickled array each; ``jpegs`` holds plain JPEGs'
    bytes for the model process to decode (when :class:`Loaded` said it does). Verdicts come back
    in that order: the crops', then the JPEGs'. The operating point travels whole, as the worker
    resolved it: the model process never looks a threshold up again."""

    model: ModelKey
    crops: np.ndarray
    jpegs: list[bytes]
    point: OperatingPoint
    top_k: int

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    @property
    def images(self) -> int:
        return len(self.crops) + len(self.jpegs)

    def problem(self) -> str | None:
        """What makes this run unusable, else ``None`` (checked again on arrival: unpickling
        builds no dataclass through ``__init__``)."""
        crops = self.crops
        if not (isinstance(crops, np.ndarray) and crops.dtype == np.uint8 and crops.ndim == 4 and crops.shape[1] == 3):
            return f"crops must be a uint8 array (C, 3, S, S), not {type(crops).__name__} {getattr(crops, 'shape', '')}"
        if not all(isinstance(jpeg, bytes) for jpeg in self.jpegs):
            return "jpegs must be bytes"
        if not isinstance(self.top_k, int) or self.top_k < 1:
            return f"top_k must be a positive integer, not {self.top_k!r}"
        return None if self.images else "a run needs at least one image"


@dataclass(frozen=True)
class Ping:
    """Are you serving? Answered with :class:`Pong` by the batch loop itself."""


Request = Load | Run | Ping
REQUESTS = (Load, Run, Ping)


@dataclass(frozen=True)
class Call:
    """What a worker sends: a request, the number its answer will carry, and when the worker stops
    waiting for it (``time.monotonic()`` seconds, one clock for every process of the host): a run
    still queued then is dropped, not computed for nobody."""

    number: int
    request: Request
    deadline: float = math.inf

    @property
    def valid(self) -> bool:
        """Whether the model process may take it (else it drops the connection)."""
        if not (isinstance(self.number, int) and isinstance(self.request, REQUESTS)):
            return False
        if not isinstance(self.deadline, float):
            return False
        return not (isinstance(self.request, Run) and self.request.problem())


@dataclass(frozen=True)
class Loaded:
    """The model is loaded and warm; ``decodes_jpeg``: send plain JPEGs undecoded;
    ``batch_limit``: the most images per run the model process merges for it (its
    :meth:`~service.runtime.batch_loop.inference.ModelRunner.batch_limit`)."""

    decodes_jpeg: bool
    batch_limit: int


@dataclass(frozen=True)
class Judged:
    """One verdict per image of the :class:`Run`; ``None`` where the model process's JPEG decoder
    refused the file (the worker then lets PIL, the reference decoder, decide)."""

    verdicts: list[ImageVerdict | None]


@dataclass(frozen=True)
class Pong:
    """The batch loop is serving."""


@dataclass(frozen=True)
class Failed:
    """The request failed in the model process; ``message`` says why (one line)."""

    message: str


Reply = Loaded | Judged | Pong | Failed


@dataclass(frozen=True)
class Answer:
    """What the model process sends: the reply to the worker's call ``number``."""

    number: int
    reply: Reply
