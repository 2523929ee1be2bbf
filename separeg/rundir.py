"""Run directories: the pretraining layout, and the check that a re-run may resume a run (all training jobs)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json
from .errors import InputError
from .pretrain_config import STAGES, PretrainJob, as_json_dict, config_differences
from .training import Runtime

__all__ = ["RunDir", "check_identity", "prepare_run_dir"]


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



def check_identity(root: Path, identity: dict, *, restart: bool, resume: bool, has_progress: bool,
                   runtime: Runtime, state: list[Path]) -> None:
    """Resume, refuse or start a run in ``root`` (shared by pretraining and fine-tuning; DESIGN §3).

    The run's identity (data, configuration) is saved as ``config.json``. Re-running with the same identity
    resumes; a different one is refused with the list of differences unless ``restart``, which deletes
    ``state`` first; ``resume`` insists on something to resume.
    """
    config = root / "config.json"
    if restart and runtime.is_main:
        for path in state:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
    runtime.barrier()
    if config.exists():
        saved = json.loads(config.read_text(encoding="utf-8"))
        differences = config_differences(saved, identity)
        if differences:
            raise InputError(f"{root} holds a run with another configuration:\n  " + "\n  ".join(differences)
                             + "\nUse another --out folder, or --restart to start this one over.")
    elif resume:
        raise InputError(f"--resume: {root} holds no run to resume (no config.json); start it without --resume")
    if resume and not has_progress:
        raise InputError(f"--resume: {root} has no checkpoint or finished stage yet; run without --resume")
    if runtime.is_main:
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not config.exists():
            write_json(identity, config)
    runtime.barrier()


def prepare_run_dir(job: PretrainJob, run: RunDir, runtime: Runtime) -> None:
    """Check the pretraining config against the saved one (resume) or save it (new run)."""
    identity = {"archive": str(Path(job.archive).resolve()), "config": as_json_dict(job.config)}
    state = [run.checkpoints, *(run.done(s) for s in STAGES), run.clusters, run.encoder, run.manifest]
    check_identity(run.root, identity, restart=job.restart, resume=job.resume, has_progress=run.has_progress(),
                   runtime=runtime, state=state)
