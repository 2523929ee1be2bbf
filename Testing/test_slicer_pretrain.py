"""SepaRegPretrain's logic without Slicer: archive scan, then start / progress / stop / resume of a real tiny run."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
from SepaRegPretrainLib.Logic import (
    ENCODERS,
    METHODS,
    STAGES,
    PretrainLogic,
    PretrainRequest,
    run_status,
    stage_of,
)

from separeg.runtime.background import RunState
from separeg.runtime.events import Event, EventType

REPO = Path(__file__).resolve().parent.parent
TINY = ("--crop-size", "32")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive with spaces")
    for name in ("pt_1_ct.nii.gz", "pt_203_ct.nii.gz", "pt_1_oar.nii.gz"):
        shutil.copy(REPO / "Resources" / "SampleData" / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def wait(logic: PretrainLogic, until, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        logic.poll()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_logic_reads_its_choices_from_the_core_registry() -> None:
    """The stages, titles, SSL methods and encoders are the registry's objects, not copies of them."""
    import ast

    from SepaRegPretrainLib import Logic

    from separeg import registry

    assert STAGES is registry.STAGES and METHODS is registry.SSL_METHODS and ENCODERS is registry.ENCODERS
    assert Logic.STAGE_TITLES is registry.STAGE_TITLES
    tree = ast.parse(Path(Logic.__file__).read_text(encoding="utf-8"))
    literals = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Tuple | ast.List | ast.Set)
                and any(isinstance(e, ast.Constant) and e.value in (*registry.STAGES, *registry.SSL_METHODS,
                                                                    *registry.ENCODERS) for e in node.elts)]
    assert not literals, f"choices copied into the logic: {literals}"
    assert [stage_of(s) for s in ("sis", "inter", "embed", "intra0", "intra12", "distill", "data")] == [
        "sis", "inter", "cluster", "intra", "intra", "distill", None]


def test_scan_lists_used_and_skipped_files(archive: Path, tmp_path: Path) -> None:
    logic = PretrainLogic(python=sys.executable)
    results = []
    logic.scanFinished.connect(lambda manifest, message: results.append((manifest, message)))
    logic.scan(archive, tmp_path / "manifest.json")
    wait(logic, lambda: results)
    manifest, message = results[0]
    rows = logic.manifestRows(manifest)
    assert [r[2] for r in rows[:2]] == ["used", "used"]
    assert {r[0] for r in rows if r[2] == "used"} == {"pt_1_ct.nii.gz", "pt_203_ct.nii.gz"}
    reasons = {r[0]: r[3] for r in rows}
    assert "label map" in reasons["pt_1_oar.nii.gz"]
    assert "2 usable volume(s)" in message


def test_request_problems_say_how_to_fix(tmp_path: Path) -> None:
    bad = PretrainRequest(archive=tmp_path / "missing", out_dir=tmp_path / "out", method="moco", stages=("bogus",))
    problems = " ".join(bad.problems())
    assert "does not exist" in problems and "unknown method 'moco'" in problems and "stages must be" in problems
    with pytest.raises(ValueError, match="does not exist"):
        PretrainLogic(python=sys.executable).start(bad)
    channels = PretrainRequest(archive=tmp_path, out_dir=tmp_path / "out", channels="T1,T1")
    assert any("twice" in p for p in channels.problems())
    two = PretrainRequest(archive=tmp_path, out_dir=tmp_path / "out", encoder="swin", method="mocov3",
                          channels="T1,T2")
    assert not two.problems() and two.arguments()[-2:] == ["--channels", "T1,T2"]


def test_shipped_encoders_are_announced() -> None:
    text = PretrainLogic.shippedEncodersText()
    assert "separeg-encoder-hn-ct" in text and "resnet18-slim" in text and "SepaReg Segment" in text


def test_start_stop_resume_of_a_real_run(archive: Path, tmp_path: Path) -> None:
    logic = PretrainLogic(python=sys.executable)
    finished, changed, log = [], [], []
    logic.finished.connect(lambda state, message: finished.append((state, message)))
    logic.progressChanged.connect(lambda progress, stage: changed.append(stage))
    logic.logMessage.connect(lambda message, level: log.append(message))
    request = PretrainRequest(archive=archive, out_dir=tmp_path / "run é", encoder="resnet18", iterations=40,
                              batch_size=8, clusters=2, device="cpu", stages=("sis", "inter"), extraArgs=TINY)

    def inter_step(n: int):
        return lambda: logic.progress.stages["inter"].step >= n

    logic.start(request)
    wait(logic, inter_step(2))
    assert logic.progress.stages["sis"].state == "done" and logic.progress.stages["inter"].state == "running"
    logic.stop()
    wait(logic, lambda: finished)
    assert finished[-1][0] is RunState.CANCELLED, finished
    assert logic.progress.stages["inter"].state == "stopped"
    status = run_status(request.out_dir)
    assert status["resumable"] and status["done"] == ["sis"] and "inter" in status["checkpoints"]
    stopped_at = logic.progress.stages["inter"].step

    logic.start(request)  # the same request resumes
    assert logic.progress.stages["sis"].state == "done"  # known before any event
    wait(logic, lambda: len(finished) == 2)
    assert finished[-1][0] is RunState.DONE, finished
    assert logic.progress.stages["inter"].state == "done"
    assert "sis" in changed and "inter" in changed
    assert any("[sis] already done" in m for m in log)
    resumed_from = [e for e in read_events(request.out_dir) if e.type is EventType.PROGRESS and e.stage == "inter"]
    assert min(e.step for e in resumed_from[-5:]) > 0 and stopped_at < 40
    assert (request.out_dir / "slicer_log.txt").read_text(encoding="utf-8").count('"type": "cancelled"') == 1


def test_a_failed_run_reports_why(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    logic = PretrainLogic(python=sys.executable)
    finished = []
    logic.finished.connect(lambda state, message: finished.append((state, message)))
    logic.start(PretrainRequest(archive=empty, out_dir=tmp_path / "run", device="cpu"))
    wait(logic, lambda: finished, timeout=120)
    state, message = finished[0]
    assert state is RunState.FAILED and "empty is empty: put NIfTI" in message


def read_events(run_dir: Path) -> list[Event]:
    return [Event.from_json(line) for line in (run_dir / "slicer_log.txt").read_text(encoding="utf-8").splitlines()
            if line.startswith("{")]
