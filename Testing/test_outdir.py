"""Output folders of `contour` and `export`: a file, an unwritable folder or a folder another run is writing into
is refused before any work, naming the user's path."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from separeg.rt.export import ExportJob, run_export
from separeg.runtime.errors import InputError
from separeg.runtime.outdir import check_output_folder, output_folder
from separeg.runtime.runlock import LOCK_FILE, RunLockedError


@pytest.fixture()
def case(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A small CT file, a label map on it and a label table."""
    ct = sitk.GetImageFromArray(np.full((4, 16, 16), -1000, np.int16))
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    labelmap = np.zeros((4, 16, 16), np.uint8)
    labelmap[1:3, 4:9, 4:9] = 1
    lm = sitk.GetImageFromArray(labelmap)
    sitk.WriteImage(lm, str(tmp_path / "lm.nrrd"))
    (tmp_path / "labels.csv").write_text("value,name\n1,Heart\n")
    return tmp_path / "ct.nrrd", tmp_path / "lm.nrrd", tmp_path / "labels.csv"


def test_an_out_that_is_a_file_is_refused_up_front(case, tmp_path: Path) -> None:
    ct, lm, labels = case
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InputError, match=f"--out {tmp_path / 'taken'} is a file"):
        run_export(ExportJob(labelmap=lm, ct=ct, out_dir=tmp_path / "taken", labels=labels))
    with pytest.raises(InputError, match="cannot be created: .*taken is a file"):
        check_output_folder(tmp_path / "taken" / "sub")
    # contour: refused before the model is even looked up (a model name that does not exist).
    run = subprocess.run([sys.executable, "-m", "separeg.cli", "contour", str(ct), "--model", "no-such-model",
                          "--out", str(tmp_path / "taken")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and f"{tmp_path / 'taken'} is a file" in run.stderr + run.stdout
    assert "no-such-model" not in run.stderr + run.stdout


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_up_front(case, tmp_path: Path) -> None:
    ct, lm, labels = case
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(InputError, match=f"--out {locked}: no permission"):
            run_export(ExportJob(labelmap=lm, ct=ct, out_dir=locked, labels=labels))
    finally:
        locked.chmod(0o755)


def test_a_second_run_into_one_out_is_refused_and_no_lock_file_is_left(case, tmp_path: Path) -> None:
    ct, lm, labels = case
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom separeg.runtime.outdir import output_folder\n"
        f"with output_folder({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"--out {out} is being written by another separeg run: PID "
                                                 f"{holder.pid}"):
            run_export(ExportJob(labelmap=lm, ct=ct, out_dir=out, labels=labels))
    finally:
        holder.kill()
        holder.wait()
    start = time.perf_counter()
    result = run_export(ExportJob(labelmap=lm, ct=ct, out_dir=out, labels=labels))
    assert result.outputs and time.perf_counter() - start < 60
    assert not (out / LOCK_FILE).exists() and not list(out.glob(".separeg-write-test-*"))
    with output_folder(tmp_path / "unused"):
        pass
    assert not (tmp_path / "unused").exists()  # a folder the run created and left empty is removed
