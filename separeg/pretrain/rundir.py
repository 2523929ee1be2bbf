"""Run directories: the pretraining layout, and the check that a re-run may resume a run (all training jobs)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from separeg.pretrain.config import STAGES, PretrainJob, as_json_dict, config_differences
from separeg.runtime.atomic import remove_partial_files, write_json
from separeg.runtime.errors import InputError
from separeg.runtime.runlock import RunLockedError, acquire_run_lock, release_run_lock
from separeg.runtime.training import Runtime

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
        """A finished stage, a checkpoint or a cached region map (an interrupted sis stage keeps its volumes)."""
        cached = any(not p.name.startswith(".") for p in self.cache.glob("*.npz"))
        return any(self.done(s).exists() for s in STAGES) or any(self.checkpoints.glob("*.pt")) or cached


def check_identity(root: Path, identity: dict, *, restart: bool, resume: bool, has_progress: bool,
                   runtime: Runtime, state: list[Path]) -> None:
    """Resume, refuse or start a run in ``root`` (shared by pretraining and fine-tuning; DESIGN §3).

    The run's identity (data, configuration) is saved as ``config.json``. Re-running with the same identity
    resumes; a different one is refused with the list of differences unless ``restart``, which deletes
    ``state`` first; ``resume`` insists on something to resume. The main process locks ``root`` first
    (:mod:`separeg.runtime.runlock`; held until :func:`separeg.runtime.runlock.release_run_lock` or the process ends)
    and clears the temporary files of interrupted writes.

    Raises:
        RunLockedError: another process is running in ``root`` (on every rank).
        InputError: a configuration clash, or ``resume`` without a run to resume.
    """
    config = root / "config.json"
    if resume and not config.exists():
        raise InputError(f"--resume: {root} holds no run to resume (no config.json); start it without --resume")
    _lock_run_dir(root, runtime)
    try:
        if restart and runtime.is_main:
            for path in [*state, config]:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        runtime.barrier()
        _check_config(root, identity, resume=resume, has_progress=has_progress)
        if runtime.is_main:
            (root / "checkpoints").mkdir(parents=True, exist_ok=True)
            if not config.exists():
                write_json(identity, config)
        runtime.barrier()
    except BaseException:
        if runtime.is_main:
            release_run_lock(root)  # a refused run leaves the folder free
        raise


def _check_config(root: Path, identity: dict, *, resume: bool, has_progress: bool) -> None:
    config = root / "config.json"
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


def _lock_run_dir(root: Path, runtime: Runtime) -> None:
    """Rank 0 locks the directory for the whole job; a refusal reaches every rank (no rank hangs in a barrier)."""
    refusal: RunLockedError | None = None
    if runtime.is_main:
        try:
            acquire_run_lock(root)
        except RunLockedError as exc:
            refusal = exc
        else:
            for folder in (root, *(p for p in root.iterdir() if p.is_dir())):
                remove_partial_files(folder)
    if runtime.any(refusal is not None):
        raise refusal or RunLockedError(f"{root} is in use by another run (rank 0 could not lock it); see rank 0's "
                                        "message")


def prepare_run_dir(job: PretrainJob, run: RunDir, runtime: Runtime) -> None:
    """Check the pretraining config against the saved one (resume) or save it (new run)."""
    identity = {"archive": str(Path(job.archive).resolve()), "config": as_json_dict(job.config)}
    state = [run.checkpoints, *(run.done(s) for s in STAGES), run.clusters, run.encoder, run.manifest]
    check_identity(run.root, identity, restart=job.restart, resume=job.resume, has_progress=run.has_progress(),
                   runtime=runtime, state=state)
