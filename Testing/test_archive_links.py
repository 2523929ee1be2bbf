"""Archive scan of a folder with symbolic links: every link gets a status, the same CT reached twice is used once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from separeg.io.archive import format_table, scan_archive

pytestmark = pytest.mark.skipif(os.name != "posix", reason="symbolic links")


def test_links_loops_and_duplicates_are_listed(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    (archive / "patients").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, (6, 24, 24)).astype(np.int16)
    write_image(ct, archive / "patients" / "a.nii.gz")
    write_image(ct[::-1].copy(), archive / "patients" / "b.nii.gz")
    shutil.copy(archive / "patients" / "a.nii.gz", archive / "a_copy.nii.gz")  # a copy under another name
    (archive / "linked.nii.gz").symlink_to(archive / "patients" / "b.nii.gz")  # a symlinked file
    (archive / "broken.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # dangling
    (archive / "self").symlink_to("self")  # a link to itself
    (archive / "patients" / "up").symlink_to("..")  # back into the archive
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (archive / "more").symlink_to(outside)  # a folder outside it
    manifest = scan_archive(archive, workers=1)
    by_path = {e.path: e for e in manifest.entries}
    # Every item has a status; before, the four links below were not listed at all.
    assert by_path["broken.nii.gz"].status == "error" and "broken symbolic link" in by_path["broken.nii.gz"].reason
    assert by_path["self"].status == "error" and "loop" in by_path["self"].reason
    assert by_path["patients/up"].status == "skipped" and "scanned already" in by_path["patients/up"].reason
    assert by_path["more"].status == "skipped" and str(outside) in by_path["more"].reason
    # The same volume twice: one used, the other a listed duplicate (before: both usable, pretrained twice).
    # Kept: a real file before a symlink, then the first path.
    assert sorted(e.path for e in manifest.usable()) == ["a_copy.nii.gz", "patients/b.nii.gz"]
    assert by_path["patients/a.nii.gz"].reason == "duplicate of a_copy.nii.gz (the same volume, by content hash)"
    assert by_path["linked.nii.gz"].status == "skipped" and "duplicate of patients/b.nii.gz" in \
        by_path["linked.nii.gz"].reason
    table = format_table(manifest)
    assert "broken symbolic link" in table and "symbolic link loop" in table and "duplicate of" in table


def test_a_folder_of_broken_links_only_is_reported_not_called_empty(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ct.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    from separeg.runtime.errors import ArchiveError

    manifest = scan_archive(tmp_path / "a", workers=1)
    assert [(e.path, e.status) for e in manifest.entries] == [("ct.nii.gz", "error")]
    with pytest.raises(ArchiveError, match="no usable CT volumes"):
        manifest.require_usable()
