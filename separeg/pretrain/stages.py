"""`separeg pretrain`: the staged SepaReg pipeline, resumable, on CPU, one GPU or torchrun ranks.

sis -> inter -> cluster -> intra -> distill -> export (paper, "Method"; DESIGN §2 steps 3-8). Each stage
leaves ``stage_<name>.done`` in the run directory; checkpoints are written atomically every few
minutes, at the end of each stage and when a stop is requested. Re-running the same command resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from separeg.pretrain.augment import TwoViews, augment, augment_with_geometry
from separeg.pretrain.config import PretrainJob, as_json_dict
from separeg.pretrain.diagnostics import DistillTerms, save_initial_weights
from separeg.pretrain.encoders import PooledEncoder
from separeg.pretrain.region_data import load_region_set, stage_sis
from separeg.pretrain.run_models import build_ssl_model, export_encoder, load_ssl_model, write_diagnostics
from separeg.pretrain.rundir import RunDir, prepare_run_dir
from separeg.pretrain.ssl import SSLModel, channel_kl, negative_cosine
from separeg.pretrain.ssl.dense import DenseSSLModel
from separeg.runtime.atomic import atomic_path
from separeg.runtime.errors import ArchiveError, InputError
from separeg.runtime.events import Events, FileSink
from separeg.runtime.runlock import release_run_lock
from separeg.runtime.training import (
    CorruptCheckpointError,
    Runtime,
    StopRequest,
    setup_runtime,
    step_seed,
    train_steps,
    verify_checkpoint,
    warmup_lr,
)
from separeg.sis.regionset import RegionSet

__all__ = ["run_pretrain", "load_region_set"]

CPU_STEP_WARNING = 2_000  # more iterations than this on a CPU gets a warning with a smaller suggestion


def run_pretrain(job: PretrainJob, events: Events | None = None) -> Path:
    """Run (or resume) the pretraining stages of ``job``; returns the encoder bundle path.

    Raises:
        InputError, ArchiveError: bad input or a configuration clash, with what to do.
        CancelledError: stopped by a signal or the stop file; checkpoints were saved.
    """
    events = events or Events()
    runtime = setup_runtime(job.device)
    run = RunDir(Path(job.run_dir))
    prepare_run_dir(job, run, runtime)  # locks the run directory (rank 0) until the run ends
    try:
        return _run_stages(job, run, runtime, events)
    finally:
        if runtime.is_main:
            release_run_lock(run.root)


def _run_stages(job: PretrainJob, run: RunDir, runtime: Runtime, events: Events) -> Path:
    if runtime.is_main:
        events.add_sink(FileSink(run.root / "events.jsonl"))
    else:
        events = Events()  # one voice: rank 0 reports
    cfg = job.config
    events.log(f"device {_describe_device(runtime)}; method {cfg.method}, encoder {cfg.encoder}, "
               f"{cfg.iterations} iterations of batch {cfg.batch_size}", stage="pretrain")
    if runtime.device.type == "cpu" and cfg.iterations > CPU_STEP_WARNING:
        events.warning(f"running {cfg.iterations} iterations on a CPU will take very long (about 1-5 s per "
                       f"iteration); for a trial use --iterations 200 --encoder resnet18, and a GPU for the "
                       "paper's budget", stage="pretrain")
    if runtime.is_main and cfg.sis.mode != "dense" and any(
            s in job.stages and not run.done(s).exists() for s in ("inter", "intra", "distill")):
        _announce_estimate(cfg, runtime, events)
    torch.manual_seed(cfg.seed)
    stages = {"sis": stage_sis, "inter": _stage_inter, "cluster": _stage_cluster, "intra": _stage_intra,
              "distill": _stage_distill, "export": _stage_export}
    if not cfg.iid:
        stages = {k: v for k, v in stages.items() if k not in ("cluster", "intra", "distill")}
    context = _Context(job, run, runtime, events)
    with StopRequest(job.stop_file) as stop:
        context.stop = stop
        for name, stage in stages.items():
            if name not in job.stages:
                continue
            if run.done(name).exists() and _outputs_intact(context, name):
                events.log("already done", stage=name)
                continue
            started = time.monotonic()
            stage(context)
            runtime.barrier()
            if runtime.is_main:
                run.done(name).write_text(f"{time.time():.0f}\n", encoding="utf-8")
            events.log(f"done in {time.monotonic() - started:.1f} s", stage=name)
    if runtime.is_main and "export" in job.stages:
        from separeg.pretrain.report import write_report

        write_diagnostics(run, job.config, context.regions, runtime.device)
        write_report(run, events, regions=context.regions if run.clusters.exists() else None)
    events.done(f"pretraining finished: {run.encoder}" if run.encoder.exists() else "stages finished")
    return run.encoder


def _announce_estimate(cfg, runtime: Runtime, events: Events) -> None:
    """Time and disk up front (:mod:`separeg.pretrain.estimate`); on a CPU a warning at any budget."""
    from separeg.pretrain.estimate import estimate_pretraining

    text = estimate_pretraining(cfg, runtime.device).describe()
    if runtime.device.type != "cpu":
        events.log(text, stage="pretrain")
        return
    hint = ("; --encoder resnet18-slim (the starter models' encoder) is several times faster on a CPU"
            if cfg.encoder not in ("resnet18-slim",) else "")
    events.warning(f"pretraining on a CPU: {text}{hint}", stage="pretrain")


def _outputs_intact(ctx: _Context, stage: str) -> bool:
    """Whether a finished stage's checkpoints pass their checksums; if not, the stage runs again (saying so)."""
    names = {"inter": ["inter"], "intra": sorted(p.stem for p in ctx.run.checkpoints.glob("intra*.pt")),
             "distill": ["distill"]}.get(stage, [])
    for name in names:
        try:
            verify_checkpoint(ctx.run.checkpoint(name))
        except CorruptCheckpointError as exc:
            ctx.events.warning(f"{exc.problem}; running the {stage} stage again", stage=stage)
            ctx.runtime.barrier()  # every rank has checked before rank 0 removes the marker
            if ctx.runtime.is_main:
                ctx.run.done(stage).unlink(missing_ok=True)
            return False
    return True


def _describe_device(runtime: Runtime) -> str:
    name = str(runtime.device)
    if runtime.device.type == "cuda":
        props = torch.cuda.get_device_properties(runtime.device)
        name += f" ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    if runtime.distributed:
        name += f", rank {runtime.rank} of {runtime.world_size}"
    return name


class _Context:
    """What the stages share within one invocation (the region set is built once, when first needed)."""

    def __init__(self, job: PretrainJob, run: RunDir, runtime: Runtime, events: Events) -> None:
        self.job, self.run, self.runtime, self.events = job, run, runtime, events
        self.cfg = job.config
        self.stop: StopRequest
        self._regions: RegionSet | None = None
        self.views = TwoViews(self.cfg.augment)

    @property
    def regions(self) -> RegionSet:
        if self._regions is None:
            self._regions = load_region_set(self.run, self.cfg, self.runtime.device, self.events, self.job.workers)
        return self._regions

    def batch(self, stage: str, step: int, pool: np.ndarray | None = None, shard: bool = True) -> torch.Tensor:
        """Step ``step``'s batch: the same global draw on every rank; with ``shard``, this rank's share of it."""
        rng = np.random.default_rng(step_seed(self.cfg.seed, stage, step))
        size = len(pool) if pool is not None else len(self.regions)
        index = rng.integers(0, size, self.cfg.batch_size)
        if pool is not None:
            index = pool[index]
        if shard:
            index = index[self.runtime.rank::self.runtime.world_size]
        x = self.regions.crops(index)
        return x.contiguous(memory_format=torch.channels_last) if self.runtime.device.type == "cuda" else x

    def generator(self, stage: str, step: int) -> torch.Generator:
        gen = torch.Generator(device=self.runtime.device)
        gen.manual_seed(step_seed(self.cfg.seed, stage, step, "augment", self.runtime.rank))
        return gen

    def lr_schedule(self, total: int) -> Callable[[int], float]:
        """Linear warm-up over ``warmup_fraction`` of the stage, then cosine decay (SimSiam's schedule)."""
        warmup = self.cfg.warmup_steps(total)
        return lambda step: warmup_lr(self.cfg.base_lr, step, total, warmup=warmup)

    def checkpoint_seconds(self) -> float:
        return self.job.checkpoint_minutes * 60.0

    def extra_state(self) -> dict:
        return {"config": json.dumps(as_json_dict(self.cfg), sort_keys=True)}


# ----------------------------------------------------------------------------------------------- stages


def _ssl_model(ctx: _Context) -> SSLModel | DenseSSLModel:
    return build_ssl_model(ctx.cfg, ctx.runtime.device)


def _optimizer(ctx: _Context, params) -> torch.optim.Optimizer:
    fused = {"fused": True} if ctx.runtime.device.type == "cuda" else {}
    return torch.optim.SGD(params, lr=ctx.cfg.base_lr, momentum=0.9, weight_decay=ctx.cfg.weight_decay, **fused)


def _wrap(ctx: _Context, model: nn.Module) -> nn.Module:
    if not ctx.runtime.distributed:
        return model
    ids = [ctx.runtime.device.index] if ctx.runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _train_ssl(ctx: _Context, stage: str, total: int, pool: np.ndarray | None, distributed: bool,
               init: dict | None = None) -> SSLModel:
    """Φ_CLR on the regions (``pool``: a subset of region indices), resumable under ``checkpoints/<stage>.pt``.

    ``distributed=False`` trains on this rank alone (intra-organ groups are spread over the ranks): no
    collectives, and this rank writes its own checkpoint. ``init``: the state a fresh start begins from (the
    inter-organ model for intra-organ teachers); a resumed stage continues from its checkpoint instead.
    """
    model = _ssl_model(ctx)
    if init is not None:
        model.load_state_dict(init)
    save_initial_weights(ctx.run, stage, model.backbone, write=ctx.runtime.is_main or not distributed)
    runtime = ctx.runtime if distributed else Runtime(ctx.runtime.device)
    trained = _wrap(ctx, model) if distributed else model
    optimizer = _optimizer(ctx, model.parameters())

    def step_loss(step: int) -> torch.Tensor:
        x = ctx.batch(stage, step, pool, shard=distributed)
        if isinstance(model, DenseSSLModel):  # pixel pairs need the views' geometry
            views, theta = augment_with_geometry(torch.cat([x, x]), ctx.cfg.augment, ctx.generator(stage, step))
            return model.loss(trained(views[: len(x)], views[len(x):]), theta[: len(x)], theta[len(x):])
        v1, v2 = ctx.views(x, ctx.generator(stage, step))
        return model.loss(trained(v1, v2))

    train_steps(stage=stage, model=trained, optimizer=optimizer, total=total, base_lr=ctx.cfg.base_lr,
                step_loss=step_loss, after_step=lambda s: model.after_step(s / total),
                checkpoint=ctx.run.checkpoint(stage), extra_state=ctx.extra_state, runtime=runtime,
                events=ctx.events, stop=ctx.stop, checkpoint_seconds=ctx.checkpoint_seconds(),
                lr_at=ctx.lr_schedule(total))
    return model


def _stage_inter(ctx: _Context) -> None:
    _train_ssl(ctx, "inter", ctx.cfg.inter_steps(), None, distributed=True)


def _load_ssl(ctx: _Context, name: str) -> SSLModel:
    return load_ssl_model(ctx.run, ctx.cfg, ctx.runtime.device, name)


@torch.no_grad()
def _embed(ctx: _Context, fn: Callable[[torch.Tensor], torch.Tensor], batch: int = 256) -> np.ndarray:
    """``fn`` over every region's crop (no augmentation), in batches."""
    out = []
    for start in range(0, len(ctx.regions), batch):
        x = ctx.regions.crops(np.arange(start, min(start + batch, len(ctx.regions))))
        with ctx.runtime.autocast:
            out.append(fn(x).float().cpu())
        ctx.events.progress("embed", min(start + batch, len(ctx.regions)), len(ctx.regions))
    return torch.cat(out).numpy()


def _stage_cluster(ctx: _Context) -> None:
    """k-means (K organ groups) on the L2-normalised inter-organ projections of all regions."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    k = ctx.cfg.clusters
    if len(ctx.regions) < k:
        raise ArchiveError(f"{len(ctx.regions)} regions cannot form {k} clusters; lower --clusters")
    model = _load_ssl(ctx, "inter")
    z = _embed(ctx, model.project)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    # Full k-means is exact and fast up to tens of thousands of regions; mini-batch beyond (DESIGN §2.5).
    kmeans = (KMeans(k, n_init=10, random_state=ctx.cfg.seed) if len(z) <= 50_000
              else MiniBatchKMeans(k, n_init=3, random_state=ctx.cfg.seed, batch_size=4096))
    assignments = kmeans.fit_predict(z).astype(np.int32)
    counts = np.bincount(assignments, minlength=k)
    ctx.events.log("cluster sizes: " + ", ".join(f"{i}: {n}" for i, n in enumerate(counts)), stage="cluster")
    if ctx.runtime.is_main:
        with atomic_path(ctx.run.clusters, suffix=".npz") as tmp:
            np.savez(tmp, assignments=assignments, counts=counts, centers=kmeans.cluster_centers_.astype(np.float32),
                     mean_hu=ctx.regions.mean_hu, distance=kmeans.transform(z).min(axis=1).astype(np.float32))


def _clusters(ctx: _Context) -> tuple[np.ndarray, np.ndarray]:
    if not ctx.run.clusters.exists():
        raise InputError(f"{ctx.run.clusters} is missing: run the cluster stage first")
    with np.load(ctx.run.clusters) as data:
        assignments, counts = data["assignments"], data["counts"]
    if len(assignments) != len(ctx.regions):
        raise InputError("the cluster assignments do not match the region set; re-run with --restart")
    return assignments, counts


def _stage_intra(ctx: _Context) -> None:
    """One encoder per organ group on that group's regions, started from the inter-organ model (or from scratch
    without ``init_from_inter``); groups are spread over the ranks."""
    assignments, counts = _clusters(ctx)
    steps = ctx.cfg.intra_steps(counts.tolist())
    init = _load_ssl(ctx, "inter").state_dict() if ctx.cfg.init_from_inter else None
    for k in range(ctx.cfg.clusters):
        if k % ctx.runtime.world_size != ctx.runtime.rank or steps[k] == 0:
            continue
        ctx.events.log(f"group {k}: {counts[k]} regions, {steps[k]} steps"
                       f"{', from the inter-organ model' if init is not None else ''}", stage="intra")
        _train_ssl(ctx, f"intra{k}", steps[k], np.flatnonzero(assignments == k), distributed=False, init=init)


def _stage_distill(ctx: _Context) -> None:
    """Student encoder from the intra-organ teachers (Eq. 4) and the inter-organ projection (Eq. 5)."""
    cfg = ctx.cfg
    assignments, counts = _clusters(ctx)
    inter = _load_ssl(ctx, "inter").requires_grad_(False)
    teachers = {k: _load_ssl(ctx, f"intra{k}").backbone.requires_grad_(False)
                for k in range(cfg.clusters) if counts[k] > 0}
    student = PooledEncoder(cfg.encoder, cfg.in_channels).to(ctx.runtime.device)
    if cfg.init_from_inter:  # the student starts as the best-trained network, not from scratch
        student.load_state_dict(inter.backbone.state_dict())
    save_initial_weights(ctx.run, "distill", student, write=ctx.runtime.is_main)
    trained = _wrap(ctx, student)
    terms = DistillTerms(ctx.run)
    optimizer = _optimizer(ctx, student.parameters())
    assignments_t = torch.as_tensor(assignments, device=ctx.runtime.device)

    def step_loss(step: int) -> torch.Tensor:
        rng = np.random.default_rng(step_seed(cfg.seed, "distill", step))
        index = rng.integers(0, len(ctx.regions), cfg.batch_size)[ctx.runtime.rank::ctx.runtime.world_size]
        x = augment(ctx.regions.crops(index), cfg.augment, ctx.generator("distill", step))
        features = trained(x)
        with torch.no_grad():
            groups = assignments_t[torch.as_tensor(index, device=ctx.runtime.device)]
            target = torch.empty_like(features)
            for k, teacher in teachers.items():  # each region's own teacher (paper: chosen by its cluster)
                members = groups == k
                if members.any():
                    target[members] = teacher(x[members]).to(target.dtype)
        kl = channel_kl(features.float(), target.float(), cfg.distill_tau, reduction=cfg.distill_kl)
        cosine = None
        if cfg.distill_loss == "both":
            with torch.no_grad():
                z_inter = inter.project(x)
            cosine = negative_cosine(inter.projector(features), z_inter)
        terms.add(kl, cosine)
        return kl if cosine is None else kl + cosine

    train_steps(stage="distill", model=trained, optimizer=optimizer, total=cfg.distill_steps(), base_lr=cfg.base_lr,
                step_loss=step_loss, after_step=None, checkpoint=ctx.run.checkpoint("distill"),
                extra_state=ctx.extra_state, runtime=ctx.runtime, events=ctx.events, stop=ctx.stop,
                checkpoint_seconds=ctx.checkpoint_seconds(), lr_at=ctx.lr_schedule(cfg.distill_steps()))
    if ctx.runtime.is_main:
        terms.save()


def _stage_export(ctx: _Context) -> None:
    """The student (or, without IID, the inter-organ) encoder as ``encoder.separeg``."""
    if ctx.runtime.is_main:
        export_encoder(ctx.run, ctx.cfg, len(ctx.regions))
