"""The messages between a worker and the model process: named, typed, one class per kind.

Each travels pickled over :mod:`multiprocessing.connection` (an authenticated Unix socket), one
call at a time per connection: a worker sends a numbered :class:`Call` and waits, at most its
deadline, for the :class:`Answer` of that number (``service.runtime.model_process``). The model process
answers every call it takes, with :class:`Failed` when it could not do it, and drops a connection
that sends anything but a call. A call that missed its deadline is answered later, maybe: the
number tells the worker to throw that answer away, so the connection, and the models this worker
loaded through it, outlive a stall.

* :class:`Load` -> :class:`Loaded`: load and warm up a model unless it is loaded already;
* :class:`Run` -> :class:`Judged`: judge images, each at its own operating point and top-k;
* :class:`Ping` -> :class:`Pong`: answered by the loop that runs the batches, behind the tasks
  queued before it, so an answer in time means the model process is serving (the parent's
  watchdog and a worker that lost contact send it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from models.contract.manifest import OperatingPoint
from models.runtime import Bundle
from service.runtime.inference import ImageVerdict

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
    """Judge ``images[i]`` at ``points[i]`` with ``top_ks[i]`` classes.

    An image is a uint8 crop (3, S, S) as a numpy array, or a plain JPEG's bytes for the model
    process to decode (when :class:`Loaded` said it does). The operating points travel whole, as
    the worker resolved them: the model process never looks a threshold up again."""

    model: ModelKey
    images: list[np.ndarray | bytes]
    points: list[OperatingPoint]
    top_ks: list[int]

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What makes this run unusable, else ``None`` (checked again on arrival: unpickling
        builds no dataclass through ``__init__``)."""
        if len(self.images) == len(self.points) == len(self.top_ks):
            return None
        return f"{len(self.images)} images but {len(self.points)} operating points and {len(self.top_ks)} top-k sizes"


@dataclass(frozen=True)
class Ping:
    """Are you serving? Answered with :class:`Pong` by the batch loop itself."""


Request = Load | Run | Ping
REQUESTS = (Load, Run, Ping)


@dataclass(frozen=True)
class Call:
    """What a worker sends: a request and the number its answer will carry."""

    number: int
    request: Request

    @property
    def valid(self) -> bool:
        """Whether the model process may take it (else it drops the connection)."""
        if not (isinstance(self.number, int) and isinstance(self.request, REQUESTS)):
            return False
        return not (isinstance(self.request, Run) and self.request.problem())


@dataclass(frozen=True)
class Loaded:
    """The model is loaded and warm; ``decodes_jpeg``: send plain JPEGs undecoded;
    ``batch_limit``: the most images per run the model process merges for it (its
    :meth:`~service.runtime.inference.ModelRunner.batch_limit`)."""

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
