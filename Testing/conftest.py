"""Shared fixtures: the real public CTs in ../shared/data (see its README) and small synthetic volumes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Before numpy/torch load OpenMP: idle threads sleep instead of spinning (several times faster on a busy 2-core CI
# machine; separeg's CLI does the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SEPAREG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "openkbp").is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}; check out ../shared beside the repository "
                    "or set SEPAREG_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def openkbp(shared_data: Path) -> Path:
    return shared_data / "openkbp"


@pytest.fixture(scope="session")
def lung1(shared_data: Path) -> Path:
    return shared_data / "lung1_dicom"


@pytest.fixture(scope="session")
def pt1_hu(openkbp: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(openkbp / "pt_1_ct.nii.gz")))


@pytest.fixture()
def lung1_subset(lung1: Path, tmp_path: Path) -> Path:
    """Eight consecutive slices of the LUNG1 series, copied so tests may alter them."""
    folder = tmp_path / "series"
    folder.mkdir()
    for path in sorted((lung1 / "ct").glob("*.dcm"))[40:48]:
        shutil.copy(path, folder / path.name)
        (folder / path.name).chmod(0o644)
    return folder


@pytest.fixture()
def real_slicer(monkeypatch, tmp_path: Path):
    """Slicer's real MRML and module logics (slicer-core, ``slicer_tier``), with a per-user model folder of its own."""
    import slicer_tier

    monkeypatch.setenv("SEPAREG_MODELS", str(tmp_path / "models"))
    return slicer_tier.install(monkeypatch, tmp_path)


@pytest.fixture()
def segment_logic(real_slicer, monkeypatch):
    """``SepaRegSegmentLogic`` as Slicer constructs it, on the real-MRML tier."""
    import slicer_tier

    python, _ = slicer_tier.loadScriptedModule(monkeypatch, "SepaRegSegment")
    return python.SepaRegSegmentLogic()


def run_task(logic, start, timeout: float = 600) -> list:
    """Start a module logic's task and poll it, as the panel's timer does, until it reports; returns the results."""
    import time

    results: list = []
    logic.finished.connect(results.append)
    start()
    deadline = time.monotonic() + timeout
    while not results:
        logic.poll()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return results


def run_done(logic, start):
    """:func:`run_task` for a task that must succeed: its one result, asserted done."""
    from separeg.runtime.background import RunState

    [result] = run_task(logic, start)
    assert result.state is RunState.DONE, result.message
    return result


def region_crops(hu: np.ndarray, count: int, size: int):
    """``count`` SIS region crops of ``hu`` (drawn with seed 0), ``size`` x ``size``, HU window -1000..1000."""
    from separeg.sis.crops import RegionCropper
    from separeg.sis.regions import SISConfig, compute_region_maps, window_hu

    maps = compute_region_maps(hu, SISConfig())
    index = np.random.default_rng(0).choice(len(maps), count, replace=False)
    return RegionCropper(window_hu(hu, (-1000, 1000)), maps, crop_size=size).crops(index)


def fixed_batch_losses(model, batch, steps: int) -> list[float]:
    """SSL losses of ``steps`` SGD steps on one batch and its flipped copy (fixed views: the loss must go down)."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    view1, view2 = batch, torch.flip(batch, dims=[3])
    losses = []
    for step in range(steps):
        loss = model.loss(model(view1, view2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_step(step / steps)
        losses.append(loss.item())
    return losses


def write_image(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


# The Slicer modules' libraries (SepaRegPretrainLib, SepaRegSegmentLib) import like in Slicer, where each module
# folder is on sys.path.
for _module in ("SepaRegPretrain", "SepaRegSegment"):
    if str(REPO / _module) not in __import__("sys").path:
        __import__("sys").path.insert(0, str(REPO / _module))
