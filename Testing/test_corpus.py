"""The malformed-input corpus (Testing/corpus/make_corpus.py) through the product's entry points.

Every item is generated into ``tmp_path`` and run through ``separeg.cli.main`` with the subcommand a user would
give it (scan, regions, finetune, contour, export), or through the core function a subcommand calls where the CLI
offers no direct way in (``models`` installation, checkpoint loading, RTSTRUCT import). For an item that is refused
the test checks: exit code 1 with an ``ERROR:`` line that says what is wrong and how to fix it (the fragments
below), no traceback, and nothing written (no output folder, no temporary file anywhere under ``tmp_path``).

Items that are handled rather than refused say so in their test: a non-axial volume is reoriented, CT values
beyond int16 are stored exactly with a rescale intercept, contours referencing unknown slices are placed by
position with a warning.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from separeg.cli import main

_SPEC = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parent / "corpus" / "make_corpus.py")
corpus = sys.modules.setdefault("make_corpus", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(corpus)


@dataclass(frozen=True)
class Refusal:
    """How an item is fed to the CLI and what the error must say (all fragments, in order of the message)."""

    argv: Callable[[Path, Path, Path], list[str]]  # (item, out, shared data) -> arguments
    says: tuple[str, ...]


def _regions(item: Path, out: Path, data: Path) -> list[str]:
    return ["regions", str(item), "--out", str(out)]


def _contour(item: Path, out: Path, data: Path) -> list[str]:
    return ["contour", str(data / "openkbp" / "pt_1_ct.nii.gz"), "--model", str(item), "--out", str(out),
            "--device", "cpu"]


def _export_on_pt1(item: Path, out: Path, data: Path) -> list[str]:
    return ["export", str(item), "--ct", str(data / "openkbp" / "pt_1_ct.nii.gz"), "--labels",
            str(data / "openkbp" / "labels.json"), "--out", str(out)]


def _export_on_series(item: Path, out: Path, data: Path) -> list[str]:
    """A label map of the right shape for 8 LUNG1 slices, exported onto the DICOM folder ``item``."""
    import SimpleITK as sitk

    labelmap = item.parent / "labelmap.nii.gz"
    sitk.WriteImage(sitk.Image(512, 512, 8, sitk.sitkUInt8), str(labelmap))
    return ["export", str(labelmap), "--ct", str(item), "--labels", str(data / "openkbp" / "labels.json"),
            "--out", str(out)]


def _finetune(item: Path, out: Path, data: Path) -> list[str]:
    """A data folder: 8 LUNG1 slices with the item (an RTSTRUCT) beside them."""
    folder = item.parent / "cases"
    corpus._lung1_copy(corpus.Sources(data), folder / "ct")
    shutil.copyfile(item, folder / "rtstruct.dcm")
    return ["finetune", str(folder), "--labels", str(data / "openkbp" / "labels.json"), "--out", str(out),
            "--device", "cpu"]


def _finetune_init(item: Path, out: Path, data: Path) -> list[str]:
    """pt_1 as the only case; the item is the --init encoder."""
    folder = item.parent / "cases"
    folder.mkdir()
    for kind in ("ct", "oar"):
        shutil.copyfile(data / "openkbp" / f"pt_1_{kind}.nii.gz", folder / f"pt_1_{kind}.nii.gz")
    return ["finetune", str(folder), "--labels", str(data / "openkbp" / "labels.json"), "--init", str(item),
            "--out", str(out), "--device", "cpu"]


def _scan(item: Path, out: Path, data: Path) -> list[str]:
    return ["scan", str(item), "--out", str(out / "manifest.json")]


REFUSED: dict[str, Refusal] = {
    "truncated_nifti": Refusal(_regions, ("truncated or corrupt", "copy or export the file again")),
    "corrupt_nifti": Refusal(_regions, ("truncated or corrupt", "CRC check failed", "copy or export the file again")),
    "html_as_nifti": Refusal(_regions, ("holds text, not an image", "403 Forbidden", "Download or export")),
    "image_2d": Refusal(_regions, ("is a 2D image", "a 3D volume is needed")),
    "huge_spacing": Refusal(_regions, ("500x500x2.5 mm", "64x64x0.04 m", "spacing is wrong",
                                       "Set the true spacing in mm")),
    "tiny_spacing": Refusal(_regions, ("0.003906x0.003906x0.0025 mm", "metres rather than millimetres",
                                       "Set the true spacing in mm")),
    "nan_voxels": Refusal(_regions, ("1600 NaN or infinite voxel(s)", "read them as 0", "Fill them")),
    "wrapped_uint16": Refusal(_regions, ("unsigned 16-bit", "wrapped around", "64536",
                                         "Convert the voxels to signed 16-bit")),
    "unknown_labels": Refusal(_export_on_pt1, ("has label values 9", "does not list", "--labels")),
    "labelmap_wrong_grid": Refusal(_export_on_pt1, ("not on the grid", "spacing 2.734x2.734x2.5 mm",
                                                    "spacing 3.906x3.906x2.5 mm", "resample the label map")),
    "corrupt_dicom": Refusal(_regions, ("holds no CT, MR or PET image series", "3 damaged DICOM files",
                                        "export the series again")),
    "truncated_dicom_slice": Refusal(_regions, ("1-044.dcm is truncated", "of 524288 bytes of pixel data",
                                                "Replace that file")),
    "dicom_missing_pixel_data": Refusal(_regions, ("1-043.dcm has no pixel data", "Replace that file")),
    "mixed_series": Refusal(_export_on_series, ("holds 2 image series", "1.2.826.0.1.3680043.8.498.1 (4 files)",
                                                "choose one by its SeriesInstanceUID")),
    "uneven_slice_spacing": Refusal(_regions, ("uneven slice gaps (1.8 to 4.2 mm)", "Export the complete series")),
    "gantry_tilt": Refusal(_regions, ("gantry tilt", "15.0 degrees", "Resample it onto a regular grid")),
    "rtstruct_other_series": Refusal(_finetune, ("holds no labelled case", "references the series "
                                                 "1.2.826.0.1.3680043.8.498.2", "beside the CT series")),
    "empty_folder": Refusal(_scan, ("is empty", "put NIfTI/NRRD/MHA volumes or DICOM series in it")),
    "truncated_bundle": Refusal(_contour, ("not a SepaReg bundle or is truncated", "written by separeg")),
    "tampered_bundle": Refusal(_contour, ("weights do not match their checksum", "modified or damaged",
                                          "copy or download it again")),
    "newer_bundle": Refusal(_contour, ("made by separeg 9.0.0", "schema version 2", "upgrade separeg")),
    "zip_bomb_bundle": Refusal(_contour, ("bundle.json declares 67108864 bytes", "limit of 4194304", "zip bomb")),
    "pickle_member_bundle": Refusal(_contour, ("unexpected member 'extra.pkl'", "was not loaded",
                                               "re-export the model")),
    "pickle_weights_bundle": Refusal(_contour, ("cannot be read as safetensors", "not written by separeg")),
    "pickle_checkpoint": Refusal(_finetune_init, ("unexpected member 'archive/data.pkl'", "was not loaded",
                                                  "re-export the model")),
}
HANDLED = ("non_axial", "beyond_int16", "rtstruct_missing_sop")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_every_item_is_covered() -> None:
    assert set(REFUSED) | set(HANDLED) == set(corpus.ITEMS)
    assert not set(REFUSED) & set(HANDLED)


@pytest.mark.parametrize("name", list(REFUSED))
def test_cli_refuses_with_a_message_and_writes_nothing(name: str, shared_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    item = corpus.make_item(name, tmp_path / "corpus", shared_data)
    out = tmp_path / "out"
    argv = REFUSED[name].argv(item, out, shared_data)
    before = _files(tmp_path)
    code = main(argv)  # anything but a SepaRegError/OSError would propagate here as an exception
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    message = err[err.index("ERROR: "):]
    positions = [message.find(fragment) for fragment in REFUSED[name].says]
    assert -1 not in positions, f"{name}: {message}"
    assert not out.exists()
    assert _files(tmp_path) == before, "temporary or partial files left behind"
    assert not (item.parent / corpus.MARKER).exists()


def test_corpus_is_deterministic(shared_data: Path, tmp_path: Path) -> None:
    """Items are made the same way each time (bundles, whose creation time is in bundle.json, excepted)."""
    for name in ("wrapped_uint16", "gantry_tilt", "rtstruct_missing_sop", "corrupt_dicom"):
        first = corpus.make_item(name, tmp_path / "a" / name, shared_data)
        second = corpus.make_item(name, tmp_path / "b" / name, shared_data)
        files = sorted(p for p in first.parent.rglob("*") if p.is_file())
        assert files and all(p.read_bytes() == (second.parent / p.relative_to(first.parent)).read_bytes()
                             for p in files)


def test_installing_a_truncated_bundle_leaves_no_model(shared_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The `models` install path (core install_model): a damaged bundle never appears as an installed model."""
    from separeg.runtime.bundle import BundleError
    from separeg.runtime.model_store import install_model

    models = tmp_path / "models"
    monkeypatch.setenv("SEPAREG_MODELS", str(models))
    item = corpus.make_item("truncated_bundle", tmp_path / "corpus", shared_data)
    with pytest.raises(BundleError, match="not a SepaReg bundle or is truncated"):
        install_model(item, "head_and_neck")
    assert not models.exists()


def test_scan_lists_each_bad_item_with_its_reason(shared_data: Path, tmp_path: Path, capsys) -> None:
    """`separeg scan` never stops on a bad item: each is an error row with the same message as a direct read."""
    archive = tmp_path / "archive"
    for name in ("truncated_nifti", "nan_voxels", "tiny_spacing", "gantry_tilt"):
        corpus.make_item(name, archive / name, shared_data)
    assert main(["scan", str(archive), "--out", str(tmp_path / "manifest.json")]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "no usable CT volumes" in captured.err
    for fragment in ("truncated", "NaN or infinite", "metres rather than millimetres", "gantry tilt"):
        assert fragment in captured.out


# ------------------------------------------------------------------------------------------------ handled items


def test_non_axial_volume_is_reoriented_not_refused(shared_data: Path, tmp_path: Path) -> None:
    """Handled: a sagittal-ordered volume reads as it is and contouring's canonical orientation restores axial
    slices voxel for voxel (segmodel.to_canonical), so it is not an error."""
    import SimpleITK as sitk

    from separeg.io.volumes import read_volume
    from separeg.segment.network import to_canonical

    item = corpus.make_item("non_axial", tmp_path / "corpus", shared_data)
    image = read_volume(item)
    assert image.GetSize() == (128, 16, 128)
    axial = sitk.GetArrayFromImage(corpus._pt1_slab(corpus.Sources(shared_data)))
    assert np.array_equal(sitk.GetArrayFromImage(to_canonical(image)), axial)


def test_ct_values_beyond_int16_are_exported_exactly(shared_data: Path, tmp_path: Path, capsys) -> None:
    """Handled: a 40000 HU metal artefact does not fit DICOM's int16 pixels, but the CT's range (-1000..40000)
    spans fewer than 65536 values, so the DICOM copy stores it exactly with a RescaleIntercept; no error, no
    rounding warning, and the copy reads back voxel for voxel."""
    import SimpleITK as sitk

    from separeg.io.volumes import read_volume

    item = corpus.make_item("beyond_int16", tmp_path / "corpus", shared_data)
    labelmap = tmp_path / "corpus" / "labelmap.nii.gz"
    sitk.WriteImage(corpus._pt1_slab(corpus.Sources(shared_data), "oar"), str(labelmap))
    out = tmp_path / "out"
    code = main(["export", str(labelmap), "--ct", str(item), "--labels", str(shared_data / "openkbp" / "labels.json"),
                 "--out", str(out), "--rtstruct"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "rounded" not in err and (out / "rtstruct.dcm").is_file()
    original = sitk.GetArrayFromImage(read_volume(item))
    copy = sitk.GetArrayFromImage(read_volume(out / "ct_dicom"))
    assert original.max() == 40000 and np.array_equal(copy, original)


def test_rtstruct_referencing_missing_slices_is_placed_by_position_with_a_warning(shared_data: Path,
                                                                                   tmp_path: Path) -> None:
    """Handled: contours whose ContourImageSequence names SOP instances not in the series are still placed by
    their z coordinate (the geometry is what counts) and the import warns per ROI; the masks equal those of the
    intact RTSTRUCT."""
    from separeg.io.dicom_ct import read_ct_series
    from separeg.rt.rtstruct import read_rtstruct

    item = corpus.make_item("rtstruct_missing_sop", tmp_path / "corpus", shared_data)
    ct = read_ct_series(shared_data / "lung1_dicom" / "ct")
    damaged = read_rtstruct(item, ct)
    intact = read_rtstruct(shared_data / "lung1_dicom" / "rtstruct" / "1-1.dcm", ct)
    assert [r.name for r in damaged.rois] == [r.name for r in intact.rois] == \
        ["GTV-1", "Spinal-Cord", "Lung-Left", "Lung-Right"]
    assert all(np.array_equal(a.crop, b.crop) and a.box == b.box for a, b in zip(damaged.rois, intact.rois,
                                                                                 strict=True))
    assert any("reference an image that is not a slice of the CT" in w for w in damaged.warnings)
    assert not any("not a slice of the CT" in w for w in intact.warnings)


def test_rtstruct_drawn_on_another_series_is_refused_by_the_importer(shared_data: Path, tmp_path: Path) -> None:
    from separeg.rt.dicom_cases import load_dicom_case
    from separeg.rt.labels import load_label_table
    from separeg.runtime.errors import InputError

    item = corpus.make_item("rtstruct_other_series", tmp_path / "corpus", shared_data)
    table = load_label_table(shared_data / "openkbp" / "labels.json")
    with pytest.raises(InputError, match="references the series 1.2.826.0.1.3680043.8.498.2, not the CT series "
                       ".*Give the CT series the RTSTRUCT was drawn on"):
        load_dicom_case(shared_data / "lung1_dicom" / "ct", item, table)


def test_each_series_of_a_mixed_folder_is_read_by_its_archive_entry(tmp_path: Path, shared_data: Path) -> None:
    from separeg.io.archive import scan_archive

    folder = corpus.make_item("mixed_series", tmp_path / "corpus", shared_data)
    manifest = scan_archive(folder, workers=1)
    usable = manifest.usable()
    assert len(usable) == 2 and all(" [CT " in e.path for e in usable)  # one folder, two labelled series
    sizes = [e.read(manifest.root).GetSize()[2] for e in usable]
    assert sizes == [4, 4]
