"""SepaRegPretrain logic: archive scan, start / stop / resume of ``separeg pretrain`` in the background.

No Slicer, Qt or widget imports: the widget calls this, and the tests drive it with a real background process.
Progress arrives as events (``separeg.runtime.events``); :class:`PretrainProgress` folds them into one row per pipeline
stage for the per-stage progress bars.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from separeg.registry import ENCODERS, STAGE_TITLES, STAGES
from separeg.registry import SSL_METHODS as METHODS
from separeg.runtime.background import BackgroundRun, RunState, Signal, cli_command, core_root, default_python
from separeg.runtime.events import Event, EventType

# The choices (pipeline stages in order, their titles, SSL methods, encoders) come from the core's torch-free
# registry, the same table the CLI and the configs read.
STOP_FILE = "STOP"  # in the run folder: separeg checks it between steps, checkpoints, then exits


def stage_of(progress_stage: str) -> str | None:
    """Pipeline stage of a progress event's stage name ("intra3" -> "intra", "embed" -> "cluster")."""
    if progress_stage == "embed":
        return "cluster"
    for stage in STAGES:
        if progress_stage == stage or (stage == "intra" and progress_stage.startswith("intra")):
            return stage
    return None


@dataclass
class PretrainRequest:
    """What the user chose; :meth:`problems` says what is wrong and how to fix it."""

    archive: Path
    out_dir: Path
    method: str = "simsiam"
    encoder: str = "resnet50"
    iterations: int = 120
    batch_size: int = 32
    clusters: int = 5
    stages: tuple[str, ...] = STAGES
    device: str = "auto"
    modality: str = "CT"
    restart: bool = False
    channels: str = ""  # e.g. "T1,T2" (separeg.io.channels.parse_channels); empty: one CT channel
    extraArgs: tuple[str, ...] = ()  # further `separeg pretrain` flags (advanced settings, tests)

    def problems(self) -> list[str]:
        found = []
        if not str(self.archive) or not Path(self.archive).is_dir():
            found.append(f"archive folder '{self.archive}' does not exist; choose the folder of CT volumes or "
                         "DICOM series")
        if not str(self.out_dir):
            found.append("choose an output folder for the run")
        elif Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            found.append(f"output '{self.out_dir}' is a file; choose a folder")
        if self.method not in METHODS:
            found.append(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.encoder not in ENCODERS:
            found.append(f"unknown encoder '{self.encoder}'; choose one of {', '.join(ENCODERS)}")
        if not self.stages or any(s not in STAGES for s in self.stages):
            found.append(f"stages must be a non-empty subset of {', '.join(STAGES)}")
        if self.iterations < 1 or self.batch_size < 1 or self.clusters < 1:
            found.append("iterations, batch size and organ groups must be at least 1")
        if self.channels:
            from separeg.io.channels import parse_channels
            from separeg.runtime.errors import InputError

            try:
                parse_channels(self.channels)
            except InputError as exc:
                found.append(str(exc))
        return found

    def arguments(self) -> list[str]:
        args = [str(self.archive), "--out", str(self.out_dir), "--method", self.method, "--encoder", self.encoder,
                "--iterations", str(self.iterations), "--batch-size", str(self.batch_size),
                "--clusters", str(self.clusters), "--stages", ",".join(self.stages), "--device", self.device,
                "--modality", self.modality, "--stop-file", str(Path(self.out_dir) / STOP_FILE)]
        if self.channels:  # several channels mix modalities: every image volume of the archive is a candidate
            args += ["--channels", self.channels]
        return args + (["--restart"] if self.restart else []) + [str(a) for a in self.extraArgs]


@dataclass
class StageProgress:
    name: str
    title: str
    state: str = "waiting"  # waiting | running | done | stopped | failed
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    loss: float | None = None

    @property
    def percent(self) -> int:
        if self.state == "done":
            return 100
        return int(100 * self.step / self.total) if self.total else 0


@dataclass
class PretrainProgress:
    """Per-stage progress folded from events; ``log`` keeps every message for the log pane."""

    stages: dict[str, StageProgress] = field(default_factory=lambda: {
        s: StageProgress(s, STAGE_TITLES[s]) for s in STAGES})
    current: str | None = None

    def update(self, event: Event) -> str | None:
        """Apply one event; returns the stage it changed (``None`` when none)."""
        stage = stage_of(event.stage) if event.stage else None
        if stage is None:
            return None
        row = self.stages[stage]
        if event.type is EventType.PROGRESS:
            self._start(stage)
            if event.stage.startswith("intra") and stage == "intra" and event.stage != "intra":
                row.title = f"{STAGE_TITLES['intra']} (group {event.stage[5:]})"
            row.step, row.total, row.eta_s = event.step or 0, event.total or 0, event.eta_s
            row.loss = event.loss if event.loss is not None else row.loss
        elif event.type is EventType.LOG and event.msg and (event.msg.startswith("done in")
                                                            or event.msg == "already done"):
            row.state, row.eta_s = "done", 0.0
        return stage

    def _start(self, stage: str) -> None:
        if self.current and self.current != stage and self.stages[self.current].state == "running":
            self.stages[self.current].state = "done"
        self.current = stage
        self.stages[stage].state = "running"

    def end(self, state: RunState) -> None:
        if self.current and self.stages[self.current].state == "running":
            self.stages[self.current].state = {RunState.CANCELLED: "stopped", RunState.DONE: "done"}.get(state,
                                                                                                          "failed")


def run_status(out_dir: str | os.PathLike) -> dict:
    """What a run folder holds: finished stages, whether it can be resumed, the encoder when done."""
    root = Path(out_dir)
    done = [s for s in STAGES if (root / f"stage_{s}.done").exists()]
    checkpoints = sorted(p.stem for p in (root / "checkpoints").glob("*.pt")) if (root / "checkpoints").is_dir() else []
    encoder = root / "encoder.separeg"
    return {"exists": (root / "config.json").exists(), "done": done, "checkpoints": checkpoints,
            "resumable": (root / "config.json").exists() and not encoder.exists() and bool(done or checkpoints),
            "encoder": str(encoder) if encoder.exists() else None}


class PretrainLogic:
    """Scan an archive and run pretraining in a background process.

    Args:
        python: interpreter for the background process (default: PythonSlicer in Slicer, else this Python).
        runFactory: builds the :class:`BackgroundRun` (tests may inject a fake).

    Signals: ``progressChanged(PretrainProgress, str)`` (the stage that changed), ``logMessage(str, str)``
    (message, level), ``finished(RunState, str)``, ``scanFinished(dict | None, str)`` (manifest, message).
    """

    def __init__(self, python: str | None = None, runFactory: Callable[..., BackgroundRun] = BackgroundRun) -> None:
        self.python = python or default_python()
        self.runFactory = runFactory
        self.run: BackgroundRun | None = None
        self.scanRun: BackgroundRun | None = None
        self.progress = PretrainProgress()
        self.progressChanged = Signal(PretrainProgress, str)
        self.logMessage = Signal(str, str)
        self.finished = Signal(RunState, str)
        self.scanFinished = Signal(object, str)
        self._scanManifest: Path | None = None

    # ---------------------------------------------------------------------------------------------- scanning
    @staticmethod
    def shippedEncodersText() -> str:
        """One line per encoder in the model folders (shipped or installed), for the module's header."""
        from separeg.runtime.bundle_info import read_bundle_info
        from separeg.runtime.model_store import list_models

        lines = []
        for path in list_models():
            try:
                info = read_bundle_info(path)
            except Exception:  # noqa: BLE001 - a damaged file is reported by SepaReg Segment; not listed here
                continue
            if info.get("kind") == "encoder":
                data = info.get("release", {}).get("data", "")
                lines.append(f"<b>{path.stem}</b> ({info['architecture'].get('encoder')})"
                             + (f": {data.split(':')[0]}" if data else ""))
        if not lines:
            return "No pretrained encoder installed: pretrain one on your archive below."
        return ("Ready to fine-tune from, in SepaReg Segment (no pretraining needed): " + "; ".join(lines)
                + ". Pretrain on your own archive below for an encoder that knows your scanners.")

    def scan(self, archive: str | os.PathLike, manifestPath: str | os.PathLike, modality: str = "CT") -> None:
        """Scan ``archive`` in the background; ``scanFinished`` gets the manifest (what is used and what not)."""
        if self.scanRun is not None and self.scanRun.running:
            raise RuntimeError("a scan is already running")
        self._scanManifest = Path(manifestPath)
        self._scanManifest.parent.mkdir(parents=True, exist_ok=True)
        argv = cli_command(self.python, "scan", archive, "--modality", modality, "--out", manifestPath)
        self.scanRun = self.runFactory(argv, cwd=core_root())
        self.scanRun.event.connect(self._onScanEvent)
        self.scanRun.finished.connect(self._onScanFinished)
        self.scanRun.start()

    def _onScanEvent(self, event: Event) -> None:
        if event.type in (EventType.LOG, EventType.ERROR) and event.msg:
            self.logMessage.emit(event.msg, event.level or event.type.value)

    def _onScanFinished(self, state: RunState, message: str) -> None:
        manifest = None
        if self._scanManifest is not None and self._scanManifest.exists():
            manifest = json.loads(self._scanManifest.read_text(encoding="utf-8"))
        self.scanFinished.emit(manifest, message)

    @staticmethod
    def manifestRows(manifest: dict) -> list[tuple[str, str, str, str]]:
        """Table rows (path, kind, status, reason or size) for the scan table: usable first."""
        rows = []
        for e in sorted(manifest["entries"], key=lambda e: (e["status"] != "ok", e["path"])):
            detail = e.get("reason") or ("x".join(str(n) for n in e["size"]) if e.get("size") else "")
            rows.append((e["path"], e["kind"], "used" if e["status"] == "ok" and e["kind"] in ("volume",
                         "dicom-series") else e["status"], detail))
        return rows

    # ---------------------------------------------------------------------------------------------- training
    def start(self, request: PretrainRequest) -> BackgroundRun:
        """Start (or resume: same output folder, same settings) a pretraining run."""
        problems = request.problems()
        if problems:
            raise ValueError("; ".join(problems))
        if self.run is not None and self.run.running:
            raise RuntimeError("a pretraining run is already running; stop it first")
        out = Path(request.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.progress = PretrainProgress()
        for stage in run_status(out)["done"]:
            self.progress.stages[stage].state = "done"
        argv = cli_command(self.python, "pretrain", *request.arguments())
        self.run = self.runFactory(argv, cwd=core_root(), stop_file=out / STOP_FILE, log_path=out / "slicer_log.txt")
        self.run.event.connect(self._onEvent)
        self.run.finished.connect(self._onFinished)
        self.run.start()
        self.logMessage.emit(f"started: separeg pretrain {' '.join(request.arguments())}", "info")
        return self.run

    def stop(self) -> None:
        """Clean stop: the run saves a checkpoint and exits; Start with the same folder resumes."""
        if self.run is not None and self.run.running:
            self.logMessage.emit("stopping after the current step (a checkpoint is saved)...", "info")
            self.run.stop()

    def poll(self) -> None:
        """Call from a GUI timer: reads the events printed since the last call."""
        for run in (self.scanRun, self.run):
            if run is not None and run.running:
                run.poll()

    @property
    def isRunning(self) -> bool:
        return self.run is not None and self.run.running

    def _onEvent(self, event: Event) -> None:
        stage = self.progress.update(event)
        if stage is not None and event.type is EventType.PROGRESS:
            self.progressChanged.emit(self.progress, stage)
        if event.type is not EventType.PROGRESS and event.msg:
            prefix = f"[{event.stage}] " if event.stage else ""
            self.logMessage.emit(prefix + event.msg, event.level or event.type.value)
            if stage is not None:
                self.progressChanged.emit(self.progress, stage)

    def _onFinished(self, state: RunState, message: str) -> None:
        self.progress.end(state)
        if self.progress.current:
            self.progressChanged.emit(self.progress, self.progress.current)
        self.finished.emit(state, message)
