"""Everything a running app owns (models, the batch loop, thread pools, metrics), started and stopped together.

Start-up loads every selected bundle (hash-checked by ``models.contract.bundle``, and signature-checked
or digest-pinned as the settings ask; any failure stops the process before it reports ready), has
the batch loop warm each model up once, then opens the models to requests. Shutdown marks the
service not ready, lets the requests in flight finish, then stops the loop and joins the threads.

The batch loop (:class:`~service.runtime.batch_loop.model_host.ModelHost`) is the one batching point: in a
single server it runs in this process's inference thread (:mod:`service.runtime.batch_loop.local_host`); a GPU
runs one batch at a time anyway, and a single thread keeps CUDA streams and CPU thread pools from
contending. With ``MIXOE_MODEL_PROCESS`` it runs in the model process for every worker, and the
models here stay on the CPU for preprocessing and metadata. Either way each request's images go
from the event loop to it at once (:mod:`service.runtime.hosted`). Decoding has its own pool.

Readiness (:meth:`ServiceContext.unready_reason`) is false as well while the batch loop has
failed, or is not answering: after a call that missed its deadline or lost its connection, this
process pings it every ``_REPING_INTERVAL_S`` until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from models.contract.trust import BundleTrust, load_public_keys
from models.network.nets import resolve_device
from models.runtime import Bundle, load_bundle
from service.api.admission import Admission
from service.api.errors import ServiceError
from service.monitoring.drift import DriftAlarms
from service.monitoring.metrics import ServiceMetrics, multiprocess_directory, score_buckets
from service.runtime.hosted import HostedModel
from service.runtime.batch_loop.inference import graphs_note
from service.runtime.cpu_threads import batch_loop_threads, pin_intra_op_threads
from service.runtime.batch_loop.local_host import LocalHost
from service.runtime.model_client import HostClient
from service.runtime.batch_loop.host_tasks import Loader
from service.runtime.batch_loop.model_host import ModelHost
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
    decode_pool: ThreadPoolExecutor
    admission: Admission
    client: HostClient
    local_host: LocalHost | None = None  # None: the batch loop is the model process's
    ready: bool = False
    _watcher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings) -> ServiceContext:
        # With a model process, this process only checks and decodes: on the CPU, where its bundle
        # copies serve preprocessing and metadata.
        model_process = settings.uses_model_process
        device = torch.device("cpu") if model_process else resolve_device(settings.device)
        if device.type == "cuda" or model_process:
            # The model runs elsewhere; CPU threads only decode and resize, each in its own decode
            # worker. One intra-op thread per worker avoids oversubscribing the cores. (A single
            # server's batch loop on CUDA pins one too: batch_loop_threads.)
            torch.set_num_threads(1)
        selected = select_bundles(settings.model_repository, settings.models)
        keys, pins = load_public_keys(settings.trusted_keys), settings.pinned_digests
        bundles = [
            await asyncio.to_thread(load_bundle, path, device, BundleTrust(keys, pins.get((name, version))))
            for name, version, path in selected
        ]
        metrics = ServiceMetrics(score_buckets(bundle.manifest for bundle in bundles), settings.max_batch_size)
        local_host = None
        if model_process:
            client = HostClient.from_environment(settings.model_process_timeout_s)
        else:
            local_host = LocalHost(partial(_host, device, settings, metrics), bundles)
            client = local_host.client(settings.model_process_timeout_s)
        # Each decoding thread resizes one image at a time: one intra-op thread each, so that they and
        # the batch loop's model do not contend for the same cores (service.runtime.cpu_threads).
        decode_pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers, thread_name_prefix="mixoe-decode",
            initializer=pin_intra_op_threads, initargs=(1,),
        )
        try:
            registry = await _start_models(bundles, settings, metrics, client)
        except BaseException:
            await client.close()
            if local_host is not None:
                await local_host.stop()
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
            settings, registry, metrics, predictor, drift, decode_pool, admission, client, local_host, ready=True
        )
        context._watcher = asyncio.create_task(context._reping(client), name="mixoe-batch-loop-reping")
        return context

    @property
    def loop_failure(self) -> str | None:
        """Why the batch loop of this process stopped on its own (only a restart mends that), else ``None``."""
        return None if self.local_host is None else self.local_host.failure

    def unready_reason(self) -> str | None:
        """Why this process should get no traffic now; ``None`` when it should."""
        if not self.ready:
            return "the service is not ready (models loading or shutting down)"
        if self.loop_failure is not None:
            return self.loop_failure
        if not self.client.answering:
            where = "the model process" if self.local_host is None else "the batch loop"
            return f"{where} is not answering this worker in time"
        return None

    async def _reping(self, client: HostClient) -> None:
        """While ``client`` is not answering, ping until it does."""
        while True:
            await asyncio.sleep(_REPING_INTERVAL_S)
            if client.answering:
                continue
            try:
                await client.ping()
            except ServiceError as error:
                logger.warning("the batch loop is still not answering: %s", error.message)

    async def stop(self) -> None:
        """Stop intake, finish the requests in flight (bounded by ``shutdown_timeout_s``), release the threads."""
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await asyncio.gather(
            *(model.queue.stop(drain=True, timeout=self.settings.shutdown_timeout_s) for model in self.registry)
        )
        await self.client.close()  # the batch loop releases what no other worker uses
        # Joining the threads waits for a batch or a decode still running: never on the event loop.
        if self.local_host is not None:
            await self.local_host.stop()
        await asyncio.to_thread(self.decode_pool.shutdown, wait=True)


def _host(device: torch.device, settings: Settings, metrics: ServiceMetrics, loader: Loader) -> ModelHost:
    """A single server's batch loop, on ``device``, measured by ``metrics``."""
    return ModelHost(
        device,
        settings.max_batch_size,
        metrics.batches,
        cuda_graphs=settings.cuda_graphs,
        batch_size_tuning=settings.batch_size_tuning,
        max_delay_s=settings.max_batch_delay_s,
        loader=loader,
        intra_op_threads=batch_loop_threads(device, settings.model_threads),
    )


async def _start_models(
    bundles: list[Bundle], settings: Settings, metrics: ServiceMetrics, client: HostClient
) -> ModelRegistry:
    """Have the batch loop load and warm up each model, open it to requests, publish its metrics."""
    models = []
    for bundle in bundles:
        started = time.perf_counter()
        hosted = HostedModel(client, bundle, metrics)
        await hosted.warm_up()
        models.append(LoadedModel(bundle, hosted, sends_jpeg=hosted.decodes_jpeg))
        logger.info(
            "loaded model %s:%s from %s on %s (warm-up %.1f s%s)",
            bundle.name, bundle.version, bundle.path,
            "the model process" if settings.uses_model_process else bundle.device,
            time.perf_counter() - started, graphs_note(bundle),
        )
    registry = ModelRegistry(models, settings.default_model)
    for model in models:
        metrics.register_model(model.bundle.manifest)
        await model.queue.start()
    return registry
