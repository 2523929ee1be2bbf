"""Malformed-input corpus: broken CTs, label maps, RTSTRUCTs, bundles and checkpoints, made from the real test data.

Each item is written by one function of :data:`ITEMS` into a folder (a pytest ``tmp_path`` in
``Testing/test_corpus.py``); nothing generated is committed. Items are derived from the shared data
(``../shared/data``: OpenKBP pt_1/pt_6 NIfTI, eight LUNG1 DICOM slices and its RTSTRUCT), deterministic (fixed
UIDs, no random numbers without a seed) and small: the whole corpus takes a few seconds.

Usage: ``python Testing/corpus/make_corpus.py OUT_DIR [--data SHARED_DATA]`` writes every item to OUT_DIR.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Slices 40..47 of LUNG1 (3 mm apart, descending z) and a crop of pt_1 keep every item small.
LUNG1_SLICES = slice(40, 48)
PT1_SLAB = slice(56, 72)
BOMB_JSON_BYTES = 64 * 1024**2  # 16 x the bundle.json limit; deflates to about 64 KB
MARKER = "PAYLOAD_RAN"  # the file a pickle payload creates if it is ever executed
TILT_DEGREES = 15.0


@dataclass(frozen=True)
class Sources:
    """The shared test data the items are derived from."""

    data: Path

    @property
    def openkbp(self) -> Path:
        return self.data / "openkbp"

    @property
    def lung1(self) -> Path:
        return self.data / "lung1_dicom"

    @property
    def labels(self) -> Path:
        return self.openkbp / "labels.json"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears only if a loader runs pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_bytes(marker: Path) -> bytes:
    import pickle

    return pickle.dumps({"weights": Payload(marker)})


# ------------------------------------------------------------------------------------------------ helpers


def _sitk():
    import SimpleITK as sitk

    return sitk


def _pt1_slab(src: Sources, kind: str = "ct"):
    """pt_1's CT (or label map) cut to 16 axial slices, geometry kept."""
    sitk = _sitk()
    image = sitk.ReadImage(str(src.openkbp / f"pt_1_{kind}.nii.gz"))
    return image[:, :, PT1_SLAB.start:PT1_SLAB.stop]


def _image_like(array: np.ndarray, like):
    image = _sitk().GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def _write(image, path: Path) -> Path:
    _sitk().WriteImage(image, str(path))
    return path


def _lung1_copy(src: Sources, folder: Path) -> list[Path]:
    """Eight LUNG1 slices copied to ``folder`` (writable), in file-name order."""
    folder.mkdir(parents=True)
    copies = []
    for path in sorted((src.lung1 / "ct").glob("*.dcm"))[LUNG1_SLICES]:
        target = folder / path.name
        shutil.copyfile(path, target)
        copies.append(target)
    return copies


def _edit_dicom(path: Path, edit: Callable) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def _bundle(path: Path) -> Path:
    """A small, valid segmentation bundle (one tensor): the base of the damaged-bundle items."""
    import torch

    from separeg.runtime.bundle import save_bundle

    generator = torch.Generator().manual_seed(0)
    return save_bundle(path, kind="segmentation", architecture={"backbone": "resnet18", "out_channels": 8},
                       state_dict={"head.weight": torch.randn(8, 4, generator=generator)},
                       metadata={"inputs": {"hu_window": [-1000, 1000], "spacing_xy": [1.0, 1.0], "multiple": 32}})


def _rezip(source: Path, target: Path, replace: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    """Copy a bundle zip with some members' bytes replaced and extra members added."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace.get(info.filename, zin.read(info)))
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return target


# ------------------------------------------------------------------------------------------------ volumes


def truncated_nifti(src: Sources, out: Path) -> Path:
    """pt_1's CT cut to 60 % of its bytes, as an interrupted copy leaves it."""
    data = (src.openkbp / "pt_1_ct.nii.gz").read_bytes()
    path = out / "truncated_ct.nii.gz"
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def corrupt_nifti(src: Sources, out: Path) -> Path:
    """pt_1's CT with 4 KB of its compressed stream overwritten (a bad disk sector): the gzip CRC fails."""
    data = bytearray((src.openkbp / "pt_1_ct.nii.gz").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    path = out / "corrupt_ct.nii.gz"
    path.write_bytes(bytes(data))
    return path


def html_as_nifti(src: Sources, out: Path) -> Path:
    """An HTML error page saved under a NIfTI name (a failed download)."""
    path = out / "download_ct.nii.gz"
    path.write_text("<html><body>403 Forbidden</body></html>\n")
    return path


def image_2d(src: Sources, out: Path) -> Path:
    """One axial slice of pt_1 saved as a 2D image."""
    return _write(_sitk().ReadImage(str(src.openkbp / "pt_1_ct.nii.gz"))[:, :, 64], out / "slice_ct.nii.gz")


def _respaced(src: Sources, out: Path, name: str, spacing: tuple[float, float, float]) -> Path:
    image = _pt1_slab(src)
    image.SetSpacing(spacing)
    return _write(image, out / name)


def huge_spacing(src: Sources, out: Path) -> Path:
    """pt_1 with 500 mm voxels: a 64 m field of view (spacing written in the wrong unit or a broken header)."""
    return _respaced(src, out, "huge_spacing_ct.nii.gz", (500.0, 500.0, 2.5))


def tiny_spacing(src: Sources, out: Path) -> Path:
    """pt_1 with its spacing in metres (0.0039 m) where millimetres are expected."""
    spacing = _pt1_slab(src).GetSpacing()
    return _respaced(src, out, "tiny_spacing_ct.nii.gz", tuple(s / 1000.0 for s in spacing))


def nan_voxels(src: Sources, out: Path) -> Path:
    """pt_1 as float32 with a block of NaN voxels (a failed reconstruction or resampling)."""
    sitk = _sitk()
    image = _pt1_slab(src)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[4:8, 40:60, 40:60] = np.nan
    return _write(_image_like(array, image), out / "nan_ct.nii.gz")


def wrapped_uint16(src: Sources, out: Path) -> Path:
    """pt_1's HU cast to uint16 without an offset: air (-1000 HU) wraps around to 64536."""
    sitk = _sitk()
    image = _pt1_slab(src)
    array = sitk.GetArrayFromImage(image).astype(np.int16).view(np.uint16)
    return _write(_image_like(array, image), out / "wrapped_ct.nii.gz")


def beyond_int16(src: Sources, out: Path) -> Path:
    """pt_1 as int32 with a metal artefact of 40000 HU, beyond what a DICOM CT's int16 pixels hold."""
    sitk = _sitk()
    image = _pt1_slab(src)
    array = sitk.GetArrayFromImage(image).astype(np.int32)
    array[8, 60:64, 60:64] = 40000
    return _write(_image_like(array, image), out / "metal_ct.nii.gz")


def non_axial(src: Sources, out: Path) -> Path:
    """pt_1 stored in sagittal order (array axes permuted, direction matrix saying so): a valid volume."""
    sitk = _sitk()
    image = _pt1_slab(src)
    sagittal = sitk.PermuteAxes(image, [1, 2, 0])  # new x = old y, new y = old z, new z = old x
    return _write(sagittal, out / "sagittal_ct.nii.gz")


# ------------------------------------------------------------------------------------------------ label maps


def unknown_labels(src: Sources, out: Path) -> Path:
    """pt_1's label map with a block of value 9, which labels.json does not define."""
    sitk = _sitk()
    image = _sitk().ReadImage(str(src.openkbp / "pt_1_oar.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    array[60:64, 10:14, 10:14] = 9
    return _write(_image_like(array, image), out / "unknown_labels_oar.nii.gz")


def labelmap_wrong_grid(src: Sources, out: Path) -> Path:
    """pt_6's label map (2.734 mm pixels) given for pt_1's CT (3.906 mm pixels)."""
    path = out / "pt_6_oar.nii.gz"
    shutil.copyfile(src.openkbp / "pt_6_oar.nii.gz", path)
    return path


# ------------------------------------------------------------------------------------------------ DICOM


def corrupt_dicom(src: Sources, out: Path) -> Path:
    """A folder of files with the DICOM preamble followed by garbage."""
    folder = out / "corrupt_dicom"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for k in range(3):
        (folder / f"IM{k:04d}.dcm").write_bytes(bytes(128) + b"DICM" + rng.integers(0, 256, 2048, np.uint8).tobytes())
    return folder


def truncated_dicom_slice(src: Sources, out: Path) -> Path:
    """Eight LUNG1 slices, one cut in the middle of its pixel data."""
    files = _lung1_copy(src, out / "truncated_slice")
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) // 2])
    return files[0].parent


def dicom_missing_pixel_data(src: Sources, out: Path) -> Path:
    """Eight LUNG1 slices, one without its Pixel Data element."""
    files = _lung1_copy(src, out / "no_pixel_data")
    _edit_dicom(files[2], lambda ds: delattr(ds, "PixelData"))
    return files[0].parent


def mixed_series(src: Sources, out: Path) -> Path:
    """Eight LUNG1 slices, the last four relabelled as a second CT series of the same scan."""
    files = _lung1_copy(src, out / "mixed_series")
    for path in files[4:]:
        _edit_dicom(path, lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.826.0.1.3680043.8.498.1"))
    return files[0].parent


def uneven_slice_spacing(src: Sources, out: Path) -> Path:
    """Eight LUNG1 slices 3 mm apart, one moved 1.2 mm along z (gaps 1.8 and 4.2 mm)."""
    files = _lung1_copy(src, out / "uneven_spacing")

    def shift(ds) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 1.2]

    _edit_dicom(files[4], shift)
    return files[0].parent


def gantry_tilt(src: Sources, out: Path) -> Path:
    """Eight LUNG1 slices as a 15 degree gantry tilt stores them: tilted image planes stacked along the table (z).

    The slice positions move along z, not along the tilted planes' normal, so the grid is sheared.
    """
    files = _lung1_copy(src, out / "gantry_tilt")
    angle = np.radians(TILT_DEGREES)

    def tilt(ds) -> None:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, round(float(np.cos(angle)), 6),
                                      round(float(np.sin(angle)), 6)]
        ds.GantryDetectorTilt = TILT_DEGREES

    for path in files:
        _edit_dicom(path, tilt)
    return files[0].parent


def _rtstruct(src: Sources, out: Path, name: str, edit: Callable) -> Path:
    import pydicom

    ds = pydicom.dcmread(src.lung1 / "rtstruct" / "1-1.dcm")
    edit(ds)
    path = out / name
    ds.save_as(path)
    return path


def rtstruct_other_series(src: Sources, out: Path) -> Path:
    """LUNG1's RTSTRUCT pointing at a series that is not the CT (same Frame of Reference: a re-export)."""

    def edit(ds) -> None:
        for ref_for in ds.ReferencedFrameOfReferenceSequence:
            for study in ref_for.RTReferencedStudySequence:
                for series in study.RTReferencedSeriesSequence:
                    series.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"

    return _rtstruct(src, out, "rtstruct_other_series.dcm", edit)


def rtstruct_missing_sop(src: Sources, out: Path) -> Path:
    """LUNG1's RTSTRUCT whose contours reference SOP instances that are not in the CT series."""

    def edit(ds) -> None:
        for roi in ds.ROIContourSequence:
            for k, contour in enumerate(roi.get("ContourSequence", [])):
                for image in contour.get("ContourImageSequence", []):
                    image.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.3.{k + 1}"

    return _rtstruct(src, out, "rtstruct_missing_sop.dcm", edit)


def empty_folder(src: Sources, out: Path) -> Path:
    folder = out / "empty"
    folder.mkdir()
    return folder


# ------------------------------------------------------------------------------------------------ bundles


def truncated_bundle(src: Sources, out: Path) -> Path:
    """A valid bundle cut to 70 % of its bytes (an interrupted download)."""
    whole = _bundle(out / "whole.separeg")
    path = out / "truncated.separeg"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) * 7 // 10])
    whole.unlink()
    return path


def tampered_bundle(src: Sources, out: Path) -> Path:
    """A bundle whose weights were replaced (other values, same size), bundle.json left as it was."""
    import torch
    from safetensors.torch import save

    whole = _bundle(out / "whole.separeg")
    weights = save({"head.weight": torch.zeros(8, 4)}, metadata={"format": "pt"})
    path = _rezip(whole, out / "tampered.separeg", {"model.safetensors": weights})
    whole.unlink()
    return path


def newer_bundle(src: Sources, out: Path) -> Path:
    """A bundle from a future separeg 9.0 with bundle schema version 2."""
    whole = _bundle(out / "whole.separeg")
    with zipfile.ZipFile(whole) as zf:
        info = json.loads(zf.read("bundle.json"))
    info["schema_version"] = 2
    info["versions"]["separeg"] = "9.0.0"
    path = _rezip(whole, out / "newer.separeg", {"bundle.json": json.dumps(info).encode()})
    whole.unlink()
    return path


def zip_bomb_bundle(src: Sources, out: Path) -> Path:
    """A zip renamed to .separeg whose bundle.json inflates from about 64 KB to 64 MiB."""
    path = out / "bomb.separeg"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("bundle.json", "w", force_zip64=True) as member:
            block = b" " * (1 << 20)
            for _ in range(BOMB_JSON_BYTES // len(block)):
                member.write(block)
        zf.writestr("model.safetensors", b"")
    return path


def pickle_member_bundle(src: Sources, out: Path) -> Path:
    """A valid bundle with an extra member holding a pickle whose payload would create :data:`MARKER`."""
    whole = _bundle(out / "whole.separeg")
    path = _rezip(whole, out / "pickle_member.separeg", {}, {"extra.pkl": payload_bytes(out / MARKER)})
    whole.unlink()
    return path


def pickle_weights_bundle(src: Sources, out: Path) -> Path:
    """A bundle whose model.safetensors is a pickle payload, with bundle.json's checksum updated to match."""
    import hashlib

    whole = _bundle(out / "whole.separeg")
    weights = payload_bytes(out / MARKER)
    with zipfile.ZipFile(whole) as zf:
        info = json.loads(zf.read("bundle.json"))
    info["weights"]["sha256"] = hashlib.sha256(weights).hexdigest()
    path = _rezip(whole, out / "pickle_weights.separeg",
                  {"bundle.json": json.dumps(info).encode(), "model.safetensors": weights})
    whole.unlink()
    return path


def pickle_checkpoint(src: Sources, out: Path) -> Path:
    """A torch.save checkpoint (zip of pickles) whose state dict hides a payload that would create :data:`MARKER`."""
    import torch

    path = out / "last.pt"
    buffer = io.BytesIO()
    torch.save({"step": 3, "model": Payload(out / MARKER)}, buffer)
    path.write_bytes(buffer.getvalue())
    return path


ITEMS: dict[str, Callable[[Sources, Path], Path]] = {fn.__name__: fn for fn in (
    truncated_nifti, corrupt_nifti, html_as_nifti, image_2d, huge_spacing, tiny_spacing, nan_voxels, wrapped_uint16,
    beyond_int16, non_axial, unknown_labels, labelmap_wrong_grid, corrupt_dicom, truncated_dicom_slice,
    dicom_missing_pixel_data, mixed_series, uneven_slice_spacing, gantry_tilt, rtstruct_other_series,
    rtstruct_missing_sop, empty_folder, truncated_bundle, tampered_bundle, newer_bundle, zip_bomb_bundle,
    pickle_member_bundle, pickle_weights_bundle, pickle_checkpoint,
)}


def make_item(name: str, out: Path, data: Path) -> Path:
    """Write the item ``name`` into the folder ``out`` (created); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    return ITEMS[name](Sources(Path(data)), Path(out))


def make_corpus(out: Path, data: Path) -> dict[str, Path]:
    """Write every item, each in its own subfolder of ``out``."""
    return {name: make_item(name, Path(out) / name, data) for name in ITEMS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the corpus into")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data",
                        help="the shared test data (default ../shared/data beside the repository)")
    args = parser.parse_args(argv)
    for name, path in make_corpus(args.out, args.data).items():
        print(f"{name:24s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
