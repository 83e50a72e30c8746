"""Everything a running app owns (models, batchers, thread pools, metrics), started and stopped together.

Start-up loads every selected bundle (hash-checked by ``models.contract.bundle``, and signature-checked
or digest-pinned as the settings ask; any failure stops the process before it reports ready), warms each model up once, then starts the batchers. Shutdown
marks the service not ready, lets each batcher finish its queue, then joins the threads.

Readiness (:meth:`ServiceContext.unready_reason`) is false as well while a batcher has failed,
or while the model process is not answering this worker: after a call that missed its deadline or
lost its connection, this process pings it every ``_REPING_INTERVAL_S`` until it answers again.

All models share ONE inference thread: a GPU runs one batch at a time anyway, and a single
thread keeps CUDA streams and CPU thread pools from contending. Decoding has its own pool. With
``MIXOE_MODEL_PROCESS`` no batch forms here and that thread idles: each request's images go from
the event loop to the model process (:mod:`service.runtime.hosted`), which batches them with every
worker's, and the models here stay on the CPU for preprocessing and metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from models.contract.trust import BundleTrust, load_public_keys
from models.network.nets import resolve_device
from models.runtime import Bundle, load_bundle
from service.api.admission import Admission
from service.api.errors import ServiceError
from service.monitoring.drift import DriftAlarms
from service.monitoring.metrics import ServiceMetrics, multiprocess_directory, score_buckets
from service.runtime.batcher import MicroBatcher
from service.runtime.inference import ImageJob, ImageVerdict, ModelRunner, graphs_note
from service.runtime.hosted import HostedModel
from service.runtime.model_client import ModelProcessClient
from service.runtime.predictor import Predictor
from service.runtime.registry import LoadedModel, ModelRegistry, select_bundles
from service.settings import Settings

logger = logging.getLogger("mixoe.service")

_REPING_INTERVAL_S = 1.0


@dataclass
class ServiceContext:
    settings: Settings
    registry: ModelRegistry
    metrics: ServiceMetrics
    predictor: Predictor
    drift: DriftAlarms
    inference_pool: ThreadPoolExecutor
    decode_pool: ThreadPoolExecutor
    admission: Admission
    model_process: ModelProcessClient | None = None
    ready: bool = False
    _watcher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings) -> ServiceContext:
        # With a model process, this process only checks, decodes and batches: on the CPU, where
        # its bundle copies serve preprocessing and metadata.
        model_process = None
        if settings.uses_model_process:
            model_process = ModelProcessClient.from_environment(settings.model_process_timeout_s)
        device = torch.device("cpu") if model_process else resolve_device(settings.device)
        if device.type == "cuda" or model_process:
            # The model runs elsewhere; CPU threads only decode and resize, each in its own decode
            # worker. One intra-op thread per worker avoids oversubscribing the cores.
            torch.set_num_threads(1)
        selected = select_bundles(settings.model_repository, settings.models)
        keys, pins = load_public_keys(settings.trusted_keys), settings.pinned_digests
        bundles = [
            await asyncio.to_thread(load_bundle, path, device, BundleTrust(keys, pins.get((name, version))))
            for name, version, path in selected
        ]
        metrics = ServiceMetrics(score_buckets(bundle.manifest for bundle in bundles), settings.max_batch_size)
        inference_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixoe-inference")
        decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="mixoe-decode")
        try:
            registry = await _start_models(bundles, settings, metrics, inference_pool, model_process)
        except BaseException:
            if model_process is not None:
                await model_process.close()
            inference_pool.shutdown(wait=False)
            decode_pool.shutdown(wait=False, cancel_futures=True)
            raise
        drift = DriftAlarms(
            [bundle.manifest for bundle in bundles] if settings.drift_alarm else [],
            metrics,
            delta=settings.drift_delta,
            workers=settings.workers,
            shared_directory=multiprocess_directory(),
        )
        predictor = Predictor(settings, metrics, decode_pool, drift)
        admission = Admission(settings.admission_capacity, settings.retry_after_s)
        context = cls(
            settings, registry, metrics, predictor, drift, inference_pool, decode_pool, admission, model_process,
            ready=True,
        )
        if model_process is not None:
            context._watcher = asyncio.create_task(context._reping(model_process), name="mixoe-model-process-reping")
        return context

    @property
    def batcher_failure(self) -> str | None:
        """Why a batcher stopped on its own (only a restart mends that), else ``None``."""
        failures = [model.queue.failure for model in self.registry if model.queue.failure]
        return "; ".join(failures) if failures else None

    def unready_reason(self) -> str | None:
        """Why this process should get no traffic now; ``None`` when it should."""
        if not self.ready:
            return "the service is not ready (models loading or shutting down)"
        if self.batcher_failure is not None:
            return self.batcher_failure
        if self.model_process is not None and not self.model_process.answering:
            return "the model process is not answering this worker in time"
        return None

    async def _reping(self, client: ModelProcessClient) -> None:
        """While ``client`` is not answering, ping until it does."""
        while True:
            await asyncio.sleep(_REPING_INTERVAL_S)
            if client.answering:
                continue
            try:
                await client.ping()
            except ServiceError as error:
                logger.warning("the model process is still not answering: %s", error.message)

    async def stop(self) -> None:
        """Stop intake, finish queued work (bounded by ``shutdown_timeout_s``), release the threads."""
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await asyncio.gather(
            *(model.queue.stop(drain=True, timeout=self.settings.shutdown_timeout_s) for model in self.registry)
        )
        # Joining the threads waits for a batch or a decode still running: never on the event loop.
        await asyncio.to_thread(self.inference_pool.shutdown, wait=True)
        await asyncio.to_thread(self.decode_pool.shutdown, wait=True)
        if self.model_process is not None:
            await self.model_process.close()  # the model process releases what no other worker uses


async def _start_models(
    bundles: list[Bundle],
    settings: Settings,
    metrics: ServiceMetrics,
    inference_pool: ThreadPoolExecutor,
    model_process: ModelProcessClient | None,
) -> ModelRegistry:
    """Warm each model up (in the inference thread, or in the model process), give it a running
    queue, publish its metrics."""
    models = []
    for bundle in bundles:
        started = time.perf_counter()
        if model_process is not None:
            hosted = HostedModel(model_process, bundle, metrics)
            await hosted.warm_up()
            model = LoadedModel(bundle, hosted, sends_jpeg=hosted.decodes_jpeg)
        else:
            model = LoadedModel(bundle, await _batcher(bundle, settings, metrics, inference_pool))
        models.append(model)
        logger.info(
            "loaded model %s:%s from %s on %s (warm-up %.1f s%s)",
            bundle.name, bundle.version, bundle.path, "the model process" if model_process else bundle.device,
            time.perf_counter() - started, graphs_note(bundle),
        )
    registry = ModelRegistry(models, settings.default_model)
    for model in models:
        metrics.register_model(model.bundle.manifest)
        await model.queue.start()
    return registry


async def _batcher(
    bundle: Bundle, settings: Settings, metrics: ServiceMetrics, inference_pool: ThreadPoolExecutor
) -> MicroBatcher[ImageJob, ImageVerdict | None]:
    """``bundle``'s runner, warmed up in the inference thread (which serves it), behind a micro-batcher."""
    runner = ModelRunner.for_device(bundle, settings.max_batch_size, settings.cuda_graphs, settings.batch_size_tuning)
    await asyncio.get_running_loop().run_in_executor(inference_pool, runner.warm_up)
    return MicroBatcher(
        runner,
        executor=inference_pool,
        observer=metrics,
        max_batch_size=runner.batch_limit(settings.max_batch_size),  # as measured at warm-up
        max_delay_s=settings.max_batch_delay_s,
        queue_size=settings.admission_capacity,  # whatever admission let in fits: never refused here
        retry_after_s=settings.retry_after_s,
        name=f"{bundle.name}:{bundle.version}",
    )
