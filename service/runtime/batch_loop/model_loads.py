"""The batch loop's models: which are loaded, for which workers, and the loads in progress.

Loading a bundle (hash check, weights) happens in a thread of its own, so that a SIGHUP
roll-over's new workers asking for a new version do not stall the batches of the workers still
serving the old one. Its warm-up (one throw-away batch per padded batch size, about 2 s each on a
GPU) must run in the loop's thread, which serves it: PyTorch caches cuDNN's plans per thread, and
an H200 run with the warm-up in the loading thread stalled serving for 2 to 3 s at each batch
size's first use. So each warm-up batch is a task of its own, queued behind the runs already
waiting: another model's runs wait for one warm-up batch at most, not for all of them.

A model is keyed by its bundle's path *and* a digest of its manifest: a version republished in
place under the same path is another model, never the old one in the new one's name. A model
stays loaded while a worker that asked for it is connected; the last one's release frees it.

Every method runs in the loop's thread (the ``on_*`` methods are the handlers of the loop's tasks,
:class:`~service.runtime.batch_loop.model_host.ModelHost` calls the rest), except the loading
thread's, which only submits tasks: no lock is needed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.monitoring.logs import log_failure
from service.runtime.batch_loop.host_tasks import (
    NOBODY, Loader, LoadDone, LoadFailed, Replies, Task, WarmUp, error_text, reply,
)
from service.runtime.batch_loop.inference import ModelRunner, graphs_note
from service.runtime.protocol import Failed, Load, Loaded, ModelKey

logger = logging.getLogger("mixoe.batch_loop")


@dataclass(frozen=True)
class LoadSettings:
    """How every model is loaded and run (the device, the batch size cap, the GPU options), and
    whether workers may send plain JPEGs undecoded (told to each in its ``Loaded`` answer)."""

    device: torch.device
    max_batch_size: int
    cuda_graphs: bool
    batch_size_tuning: bool
    decodes_jpeg: bool


class ModelLoads:
    """The models of one batch loop, loaded on request and released when no worker uses them."""

    def __init__(self, settings: LoadSettings, loader: Loader, submit: Callable[[Task], None]):
        """``submit`` queues a task in the loop: how the loading thread hands its result over."""
        self._settings = settings
        self._loader = loader
        self._submit = submit
        self._runners: dict[ModelKey, ModelRunner] = {}
        self._users: dict[ModelKey, set[Replies]] = {}
        self._loading: dict[ModelKey, list[Task]] = {}  # workers' loads waiting for a load in progress
        self._warming: dict[ModelKey, _WarmingUp] = {}  # loaded, not yet warm: still in _loading

    @property
    def keys(self) -> list[ModelKey]:
        """The models loaded and warm, in the order they became so."""
        return list(self._runners)

    def runner(self, key: ModelKey) -> ModelRunner:
        """``key``'s runner; a worker that runs a model before loading it is told to load it."""
        runner = self._runners.get(key)
        if runner is None:
            raise RuntimeError(f"model {key[0]} is not loaded (send a load request first)")
        return runner

    def batch_limit(self, key: ModelKey) -> int:
        """The most images a batch of ``key`` takes: the cap, or less as its warm-up measured."""
        runner = self._runners.get(key)
        cap = self._settings.max_batch_size
        return cap if runner is None else runner.batch_limit(cap)

    def on_load(self, task: Task) -> None:
        """A worker's ``Load``: answered at once if loaded, else when the load (started here, or in
        progress for another worker) has warmed up."""
        assert isinstance(task.message, Load)
        key = task.message.model
        if key in self._runners:
            self._users[key].add(task.origin)
            reply(task, self._loaded_reply(key))
        elif key in self._loading:
            self._loading[key].append(task)
        else:
            loader = threading.Thread(target=self._load_in_background, args=(key,), name="mixoe-load", daemon=True)
            loader.start()
            self._loading[key] = [task]  # the loader's answer is a task: the loop runs it later

    def _load_in_background(self, key: ModelKey) -> None:
        path, _ = key
        settings = self._settings
        try:
            bundle = self._loader(key, settings.device)
            runner = ModelRunner.for_device(
                bundle, settings.max_batch_size, settings.cuda_graphs, settings.batch_size_tuning
            )
        except Exception as error:
            log_failure(logger, f"batch loop could not load {path}", error)
            self._submit(Task(NOBODY, LoadFailed(key, error_text(error))))
            return
        self._submit(Task(NOBODY, LoadDone(key, runner)))

    def on_load_done(self, task: Task) -> None:
        """The loading thread's ``LoadDone``: queue the first warm-up batch."""
        assert isinstance(task.message, LoadDone)
        runner = task.message.runner
        self._warming[task.message.model] = _WarmingUp(runner, list(runner.warm_up_sizes))
        self._submit(Task(NOBODY, WarmUp(task.message.model)))

    def on_warm_up(self, task: Task) -> None:
        """One warm-up batch of a model just loaded; the next is queued behind the runs waiting."""
        assert isinstance(task.message, WarmUp)
        key = task.message.model
        warming = self._warming[key]
        if not self._loading[key]:  # every worker that asked has gone meanwhile
            self._discard_load(key)
            return
        try:
            warming.runner.warm_up(warming.sizes[:1])
        except Exception as error:
            log_failure(logger, f"batch loop could not warm up {key[0]}", error)
            self.fail_load(key, error_text(error))
            return
        del warming.sizes[0]
        if warming.sizes:
            self._submit(task)
            return
        bundle = warming.runner.bundle
        logger.info(
            "batch loop loaded %s:%s from %s on %s, %d intra-op threads (warm-up %.1f s%s)",
            bundle.name, bundle.version, key[0], self._settings.device, torch.get_num_threads(),
            time.perf_counter() - warming.started, graphs_note(bundle),
        )
        del self._warming[key]
        waiting = self._loading.pop(key)
        self._runners[key] = warming.runner
        self._users[key] = {load.origin for load in waiting}
        for load in waiting:
            reply(load, self._loaded_reply(key))

    def _loaded_reply(self, key: ModelKey) -> Loaded:
        return Loaded(self._settings.decodes_jpeg, self.batch_limit(key))

    def on_load_failed(self, task: Task) -> None:
        """The loading thread's ``LoadFailed``: every worker waiting is told why."""
        assert isinstance(task.message, LoadFailed)
        self.fail_load(task.message.model, task.message.message)

    def is_loading(self, key: ModelKey) -> bool:
        """Whether ``key``'s load is in progress (loading or warming up)."""
        return key in self._loading

    def fail_load(self, key: ModelKey, message: str) -> None:
        """Give up ``key``'s load and tell every worker waiting for it why."""
        for load in self._discard_load(key):
            reply(load, Failed(message))

    def _discard_load(self, key: ModelKey) -> list[Task]:
        """Give up ``key``'s load, freeing what it holds: the workers that were waiting for it."""
        if self._warming.pop(key, None) is not None:
            self._free_device_memory()
        return self._loading.pop(key)

    def release(self, origin: Replies) -> None:
        """``origin`` has disconnected: it no longer waits for a load nor uses a model (a model
        no worker uses is freed)."""
        for waiting in self._loading.values():
            waiting[:] = [load for load in waiting if load.origin is not origin]
        for key in [key for key, users in self._users.items() if origin in users]:
            self._users[key].discard(origin)
            if not self._users[key]:
                self._forget(key)

    def _forget(self, key: ModelKey) -> None:
        del self._users[key], self._runners[key]
        logger.info("batch loop released %s: no worker uses it any more", key[0])
        self._free_device_memory()

    def _free_device_memory(self) -> None:
        if self._settings.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class _WarmingUp:
    """A model loaded but not yet warm: its runner and the batch sizes still to run."""

    runner: ModelRunner
    sizes: list[int]
    started: float = field(default_factory=time.perf_counter)
