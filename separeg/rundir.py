"""The pretraining run directory: its file layout, and the check that a re-run may resume it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json
from .errors import InputError
from .pretrain_config import STAGES, PretrainJob, as_json_dict, config_differences
from .training import Runtime

__all__ = ["RunDir", "prepare_run_dir"]


@dataclass(frozen=True)
class RunDir:
    """File layout of a pretraining run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def cache(self) -> Path:
        return self.root / "sis_cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters.npz"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.separeg"

    def done(self, stage: str) -> Path:
        return self.root / f"stage_{stage}.done"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / f"{name}.pt"

    def has_progress(self) -> bool:
        return any(self.done(s).exists() for s in STAGES) or any(self.checkpoints.glob("*.pt"))

    def clear(self) -> None:
        """Forget all training state (the SIS cache stays: it is keyed by content and parameters)."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        for path in [*(self.done(s) for s in STAGES), self.clusters, self.encoder, self.config, self.manifest]:
            path.unlink(missing_ok=True)


def prepare_run_dir(job: PretrainJob, run: RunDir, runtime: Runtime) -> None:
    """Check the config against the saved one (resume) or save it (new run)."""
    current = {"archive": str(Path(job.archive).resolve()), "config": as_json_dict(job.config)}
    if job.restart and runtime.is_main:
        run.clear()
    runtime.barrier()
    if run.config.exists():
        saved = json.loads(run.config.read_text(encoding="utf-8"))
        differences = config_differences(saved, current)
        if differences:
            raise InputError(f"{run.root} holds a run with another configuration:\n  " + "\n  ".join(differences)
                             + "\nUse another --out folder, or --restart to start this one over.")
    elif job.resume:
        raise InputError(f"--resume: {run.root} holds no run to resume (no config.json); start it without --resume")
    if job.resume and not run.has_progress():
        raise InputError(f"--resume: {run.root} has no checkpoint or finished stage yet; run without --resume")
    if runtime.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        run.checkpoints.mkdir(exist_ok=True)
        if not run.config.exists():
            write_json(current, run.config)
    runtime.barrier()
