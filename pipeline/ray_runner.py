"""The Ray runner: the same stages as the local runner, spread over a Ray cluster.

- ``read`` runs as CPU tasks (``decode_batch``), at most ``ray.max_tasks_in_flight`` per
  actor ahead of the model: backpressure, so memory stays bounded on any input size.
- ``encode`` + ``search`` + ``write`` run in ``LabelActor``s, one per GPU (or one on a CPU
  machine). Each loads the encoder, the word matrix and the index once, then labels whole
  chunks and writes each chunk's shard itself (temp name, rename, done marker; to a bucket:
  staged locally, uploaded, verified, marker last), so no label data passes through the
  driver. The output is a bucket prefix or a folder every node can write.
- Webdataset tars (``input.tars``) are read and decoded inside the actor that labels them
  (``run.decode_workers`` threads): a tar is one sequential read from wherever it lives, and
  spreading its members over decode tasks would ship every image through the object store.
- The driver only plans chunks, hands them out (at most two per actor), shows progress,
  and writes the manifest. A failed task or a dead actor is retried by Ray; a dead driver is
  simply rerun, which plans only the chunks without a done marker.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque

from pipeline.config import ExtractConfig
from pipeline.extract import (
    finish_run,
    images_done,
    load_records,
    plan_run,
    prefetch_batches,
    summarize,
    timeline,
)
from pipeline.lock import output_lock
from seacore.config import from_dict, to_dict
from seacore.storage import Location


def _ray():
    import ray

    return ray


class RayUnreachable(ConnectionError):
    pass


def _check_reachable(address: str, timeout: float) -> None:
    """A TCP connect to the cluster's GCS (or client server) first, so a dead address is a
    clear error within ``timeout`` instead of Ray's minutes of retries."""
    import socket
    from urllib.parse import urlsplit

    if address == "auto":
        return
    hostport = urlsplit(address if "://" in address else f"tcp://{address}")
    host, port = hostport.hostname, hostport.port
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise RayUnreachable(
            f"cannot reach the Ray cluster at {address} (from ray.address or RAY_ADDRESS) within "
            f"{timeout:.0f} s: {e}. Start it, fix the address, or unset both to let the run start "
            f"its own local Ray") from None


def init_ray(cfg: ExtractConfig) -> bool:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS`` (as under ``ray job submit``), or start a
    new local Ray sized to the machine: ``address="local"``, so a cluster left on the machine
    (Ray's ``ray_current_cluster`` file of an old ``ray start``, alive or dead) is never
    joined. Returns True when this call started Ray (and so should shut it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address, cfg.ray.connect_timeout_s)
        ray.init(address=address, log_to_driver=True)
        return True
    # Local: no dashboard at all keeps start-up light (and opens no HTTP port). Token
    # authentication stays on, as Ray makes it for a new local cluster; only its notice that
    # it chose so is dropped (RAY_AUTH_MODE, when set, is Ray's to honour as usual).
    _quiet_token_notice()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "TMPDIR": _worker_tmp()}})
    return True


_WORKER_TMP: list[str] = []


def _worker_tmp() -> str:
    """A temp folder for the workers of a local Ray, removed at ``shutdown_ray`` (or exit).
    Ray kills its workers at shutdown, so what their imports leave in the machine's temp folder
    would stay there (open_clip imports timm, which imports wandb, which makes two folders)."""
    import atexit
    import tempfile

    path = tempfile.mkdtemp(prefix="sea-ray-workers-")
    _WORKER_TMP.append(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def shutdown_ray() -> None:
    """``ray.shutdown()``, then the local workers' temp folders go."""
    _ray().shutdown()
    while _WORKER_TMP:
        shutil.rmtree(_WORKER_TMP.pop(), ignore_errors=True)


class _DropTokenNotice:
    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def _quiet_token_notice() -> None:
    import logging

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in log.filters):
        log.addFilter(_DropTokenNotice())


def decode_batch(decoder, records):
    """Stage ``read`` as a Ray task: a batch of records -> Decoded (tensor or reason)."""
    return [decoder(r) for r in records]


class LabelActor:
    """Stages ``encode``, ``search`` and ``write`` for whole chunks (decorated at run time so
    importing this module needs no Ray)."""

    def __init__(self, cfg_dict: dict, progress: str | None = None):
        import torch

        from pipeline.stages import Decoder, Labeler

        self.cfg = from_dict(ExtractConfig, cfg_dict)
        ray = _ray()
        self.decode = ray.remote(num_cpus=self.cfg.ray.decode_cpus,
                                 max_retries=self.cfg.ray.max_task_retries)(decode_batch)
        # Start the decode workers first (each imports torch and the transform: seconds): they
        # start while this actor loads its model, and the first chunk does not wait for them.
        warm = [self.decode.remote(None, []) for _ in range(max(1, self.cfg.ray.max_tasks_in_flight))]
        # Ray pins OMP threads to num_cpus. On a CPU node the model gets the node's cores, as in
        # the local runner (decode tasks are light next to the vision tower); next to a GPU
        # it needs few, and several actors share the node.
        default = (max(1, int(self.cfg.ray.cpus_per_actor)) if torch.cuda.is_available()
                   else (os.cpu_count() or 1))
        torch.set_num_threads(self.cfg.ray.torch_threads or default)
        self.labeler = Labeler(self.cfg, progress=False)
        self.decoder = Decoder(None if self.cfg.input.tars else self.cfg.input.image_root,
                               self.labeler.preprocess, self.cfg.input.max_pixels)
        self.decoder_ref = ray.put(self.decoder)
        # the progress counter by name, not by handle: a handle among the constructor's
        # arguments goes through the object store, which Ray warns breaks restarts
        self.progress = ray.get_actor(progress) if progress else None
        # (warming them once more with the decoder itself only moved its imports, about 4 s on
        # 2 cores, from the first chunk into this start: bench/notes.md)
        ray.get(warm)

    def metadata(self) -> dict:
        return self.labeler.metadata()

    def report(self) -> dict:
        return self.labeler.report()

    def label_chunk(self, index: int, records: list | Location, out_dir: Location,
                    metadata: dict) -> dict:
        from pathlib import Path

        from pipeline import webdataset
        from pipeline.stages import label_batches, write_chunk

        ray = _ray()
        if out_dir.local:
            for stale in Path(out_dir.path).glob(f".shard-{index:06d}.parquet.tmp*"):
                stale.unlink(missing_ok=True)  # a previous attempt of this chunk died mid-write
        bs = self.cfg.run.batch_size
        ahead = max(1, self.cfg.ray.max_tasks_in_flight)
        errors: list[dict] = []

        def decoded():
            if isinstance(records, Location):  # a tar: read and decoded here
                for batch in prefetch_batches(self.decoder, webdataset.iter_records(records, errors),
                                              bs, self.cfg.run.decode_workers):
                    yield self._count(batch)
                return
            refs: deque = deque()
            for s in range(0, len(records), bs):
                refs.append(self.decode.remote(self.decoder_ref, records[s:s + bs]))
                if len(refs) >= ahead:
                    yield self._count(ray.get(refs.popleft()))
            while refs:
                yield self._count(ray.get(refs.popleft()))

        return write_chunk(out_dir, index, metadata,
                           label_batches(decoded(), self.labeler, errors), errors,
                           self.cfg.run.row_group_size, timings=self.labeler.timings,
                           staging_dir=self.cfg.run.staging_dir)

    def _count(self, batch):
        if self.progress is not None:
            self.progress.add.remote(len(batch))
        return batch


class Progress:
    def __init__(self):
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def get(self) -> int:
        return self.n


def default_actors(cfg: ExtractConfig) -> tuple[int, float]:
    """(number of actors, GPUs per actor): one per GPU in the cluster, else one."""
    gpus = int(_ray().cluster_resources().get("GPU", 0))
    if cfg.ray.num_actors:
        return cfg.ray.num_actors, (1.0 if gpus else 0.0)
    return (gpus, 1.0) if gpus else (1, 0.0)


def run_ray(cfg: ExtractConfig) -> dict:
    records = load_records(cfg)  # a wrong input path fails here, before Ray starts
    # and so does a second driver on the same output
    with output_lock(cfg.run.output, ttl=cfg.run.lease_ttl_s):
        return _run_ray(cfg, records)


def _run_ray(cfg: ExtractConfig, records: list) -> dict:
    from tqdm.auto import tqdm

    from pipeline.encoders import resolve_checkpoint

    entry = time.perf_counter()

    # Fail fast, before any actor starts, when the weights are missing (the driver must see
    # the same weights path or HF cache as the nodes: a shared filesystem on a cluster).
    resolve_checkpoint(cfg.encoder.model, cfg.encoder.pretrained, cfg.encoder.allow_download,
                       cfg.encoder.cache_dir)
    ray = _ray()
    started = init_ray(cfg)
    ray_up = time.perf_counter()
    try:
        n_actors, gpus = default_actors(cfg)
        retries = cfg.ray.max_task_retries
        progress_name = f"sea-progress-{os.getpid()}-{time.time_ns()}"
        progress = ray.remote(num_cpus=0)(Progress).options(name=progress_name).remote()
        actor_cls = ray.remote(LabelActor).options(
            num_cpus=cfg.ray.cpus_per_actor, num_gpus=gpus, max_restarts=retries,
            max_task_retries=retries)
        cfg_dict = to_dict(cfg)
        actors = [actor_cls.remote(cfg_dict, progress_name) for _ in range(n_actors)]
        metadata = ray.get(actors[0].metadata.remote())  # also: fails fast without weights
        actors_up = time.perf_counter()
        plan = plan_run(cfg, metadata, records)
        sizes = [plan.chunk_images(i) for i in plan.todo]
        todo_images = None if None in sizes else sum(sizes)
        bar = tqdm(total=todo_images, desc=f"labelling ({n_actors} actor(s))", unit="img",
                   disable=not cfg.run.progress)
        queue = deque(plan.todo)
        inflight: dict = {}  # ref -> actor index
        load = [0] * n_actors
        finished: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        while queue or inflight:
            for a in range(n_actors):  # at most two chunks per actor: one running, one queued
                while queue and load[a] < 2:
                    index = queue.popleft()
                    recs = plan.chunk_records(index)
                    ref = actors[a].label_chunk.remote(index, recs, plan.out_dir, metadata)
                    inflight[ref] = a
                    load[a] += 1
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in done:
                a = inflight.pop(ref)
                load[a] -= 1
                marker = ray.get(ref)  # re-raises a chunk that failed after Ray's retries
                finished.append((marker["rows"] + marker["errors"], time.perf_counter() - entry))
            count = ray.get(progress.get.remote())
            bar.n = min(count, todo_images) if todo_images is not None else count
            bar.refresh()
        bar.close()
        seconds = time.perf_counter() - t0
        manifest = finish_run(plan, metadata)
        reports = ray.get([a.report.remote() for a in actors])
        summary = summarize(plan, manifest, seconds, images_done(plan, manifest), reports,
                            timeline(t0 - entry, finished))
        summary.update({"runner": "ray", "actors": n_actors,
                        "ray_init_seconds": round(ray_up - entry, 2),
                        "actor_start_seconds": round(actors_up - ray_up, 2)})
        return summary
    finally:
        if started:
            shutdown_ray()
