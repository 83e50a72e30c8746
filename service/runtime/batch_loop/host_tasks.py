"""What the batch loop's queue holds: tasks (a message and where its answer goes), how a task is
answered (:func:`reply`, :func:`send`), and what the loop is built with (where it finds bundles,
who observes its batches).

Workers' messages are the calls of :mod:`service.runtime.protocol`; the loop adds its own
(a load finished or failed in the loading thread, the next warm-up batch, stop) and a worker's
release once its connection has gone. A task is owed one answer, so tasks compare by identity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from models.contract.manifest import BundleError
from models.runtime import Bundle, load_bundle
from service.runtime.batch_loop.inference import ModelRunner
from service.runtime.protocol import Answer, Failed, ModelKey, Reply, Request, Run, model_key


class BatchObserver(Protocol):
    """Receives the batch loop's measurements (:class:`service.monitoring.metrics.BatchMetrics`,
    in a single server and in the model process alike)."""

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        """A batch launched: how long each of its images waited since its request arrived."""

    def batch_finished(self, seconds: float) -> None:
        """The batch answered, ``seconds`` after its launch."""


Loader = Callable[[ModelKey, torch.device], Bundle]
"""How the loop finds a model's bundle (in a thread of its own): from disk in the model process, the
bundle already loaded (and trust-checked) in a single server."""


def load_from_disk(key: ModelKey, device: torch.device) -> Bundle:
    """``key``'s bundle from its path, refused if its manifest is not the one the worker loaded."""
    path, digest = key
    bundle = load_bundle(Path(path), device)
    if model_key(bundle)[1] != digest:
        raise BundleError(f"bundle {path} changed on disk after the worker loaded it; restart that worker")
    return bundle


class Replies(Protocol):
    """Where a task's answer goes: a worker's connection (anything with ``send`` and ``close``, in tests)."""

    def send(self, obj: Any) -> None: ...

    def close(self) -> None: ...


class _Nobody:
    """The origin of the loop's own tasks (a finished load), which answer no one."""

    def send(self, obj: Any) -> None:
        raise AssertionError(f"an internal task has no one to answer: {obj!r}")

    def close(self) -> None:
        pass


NOBODY = _Nobody()


@dataclass(frozen=True)
class Release:
    """The worker has disconnected (its reader queues this after all its requests)."""


@dataclass(frozen=True)
class LoadDone:
    """The loop's own task: ``model`` loaded in the loading thread, still to warm up here."""

    model: ModelKey
    runner: ModelRunner


@dataclass(frozen=True)
class LoadFailed:
    """The loop's own task: ``model`` could not be loaded, for the reason in ``message``."""

    model: ModelKey
    message: str


@dataclass(frozen=True)
class WarmUp:
    """The loop's own task: the next warm-up batch of ``model``."""

    model: ModelKey


@dataclass(frozen=True)
class Stop:
    """The loop's own task: return from ``ModelHost.serve_forever`` (a single server stopping)."""


Message = Request | Release | LoadDone | LoadFailed | WarmUp | Stop


@dataclass(frozen=True, eq=False)
class Task:
    """A message, where its answer goes, and the number of the worker's call it answers
    (:class:`~service.runtime.protocol.Call`); compared by identity (a task is owed one answer)."""

    origin: Replies
    message: Message
    call: int = 0
    deadline: float = math.inf  # the worker's (``Call.deadline``): a run not launched by then is dropped
    arrived: float = field(default_factory=time.monotonic)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    @property
    def images(self) -> int:
        return self.message.images if isinstance(self.message, Run) else 0


def error_reply(error: BaseException) -> Failed:
    return Failed(error_text(error))


def error_text(error: BaseException) -> str:
    """One line for a worker; a bundle's own error names the bundle and the fault already."""
    return str(error) if isinstance(error, BundleError) else f"{type(error).__name__}: {error}"


def reply(task: Task, answer: Reply) -> None:
    """Answer a worker's call."""
    send(task.origin, [Answer(task.call, answer)])


def send(origin: Replies, answers: list[Answer]) -> None:
    """Send ``answers`` to one worker, as one message (an :class:`Answer`, or a list of them); one
    that has gone away meanwhile is released when its reader sees it."""
    try:
        origin.send(answers[0] if len(answers) == 1 else answers)
    except OSError:
        pass
