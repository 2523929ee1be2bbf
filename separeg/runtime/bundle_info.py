"""Reading a model bundle without torch: ``bundle.json`` checked, and the weights' bytes checked against their SHA-256.

The standard library only, so that the Slicer panels can list models and encoders before torch is installed (issue
30: they imported torch and safetensors through :mod:`separeg.runtime.bundle` and did not open in a fresh Slicer;
``Testing/test_slicer_stock.py`` opens them without either). The zip holds exactly ``bundle.json`` and
``model.safetensors``, stored or deflated, unencrypted; sizes are refused before inflating.
:mod:`separeg.runtime.bundle` re-exports this module and adds what needs torch: writing, packing, and turning the
weights into tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

from separeg import __version__
from separeg.runtime.errors import SepaRegError

__all__ = [
    "SCHEMA_VERSION",
    "BUNDLE_KINDS",
    "BUNDLE_SUFFIX",
    "JSON_MEMBER",
    "WEIGHTS_MEMBER",
    "MAX_JSON_BYTES",
    "MAX_WEIGHTS_BYTES",
    "RESERVED_KEYS",
    "BundleError",
    "check_kind",
    "read_bundle_info",
    "read_bundle_weights",
    "bundle_hash",
]

SCHEMA_VERSION = 1
BUNDLE_KINDS = ("encoder", "segmentation")
BUNDLE_SUFFIX = ".separeg"
JSON_MEMBER = "bundle.json"
WEIGHTS_MEMBER = "model.safetensors"
MAX_JSON_BYTES = 4 * 1024**2
MAX_WEIGHTS_BYTES = 4 * 1024**3
# Keys of bundle.json written by save_bundle; metadata may not use them.
RESERVED_KEYS = ("schema_version", "kind", "architecture", "weights", "versions", "created")

_MEMBERS = (JSON_MEMBER, WEIGHTS_MEMBER)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class BundleError(SepaRegError):
    """A model bundle cannot be written or read (not a bundle, damaged, wrong kind, newer schema)."""


def check_kind(kind: object, what: str) -> str:
    """``kind`` when it is a bundle kind (:data:`BUNDLE_KINDS`); ``what`` names it in the error."""
    if kind not in BUNDLE_KINDS:
        raise BundleError(f"{what} {kind!r} is not a bundle kind; use one of {', '.join(BUNDLE_KINDS)}")
    return str(kind)


def _an(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _not_a_bundle(path: Path, why: str) -> BundleError:
    return BundleError(f"{path} is not a SepaReg bundle or is truncated ({why}); "
                       f"a bundle is a {BUNDLE_SUFFIX} file written by separeg pretrain or finetune")


def _members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Check the zip holds exactly bundle.json and model.safetensors, stored or deflated, unencrypted."""
    infos = zf.infolist()
    names = [info.filename for info in infos]
    for name in names:
        if name not in _MEMBERS:
            raise BundleError(f"{path} holds an unexpected member {name!r}; a SepaReg bundle holds only "
                              f"{' and '.join(_MEMBERS)}. It was not loaded (it may be a pickle or another "
                              "format); re-export the model with separeg")
    for name in _MEMBERS:
        count = names.count(name)
        if count != 1:
            raise _not_a_bundle(path, f"{name} is missing" if count == 0 else f"{name} appears {count} times")
    for info in infos:
        if info.flag_bits & 0x1:
            raise BundleError(f"{path}: {info.filename} is encrypted; bundles are never encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError(f"{path}: {info.filename} uses zip compression method {info.compress_type}; "
                              "bundles use only stored or deflated members")
    return {info.filename: info for info in infos}


def _read_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Read one member, refusing sizes above ``limit`` before inflating and bounding the read itself."""
    if info.file_size > limit:
        raise BundleError(f"{path}: {info.filename} declares {info.file_size} bytes, more than the limit of "
                          f"{limit} bytes; the file is damaged or not a SepaReg bundle (a zip bomb?)")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):
            what = "weights do not" if info.filename == WEIGHTS_MEMBER else f"{info.filename} does not"
            raise BundleError(f"{path}: {what} match their checksum: the file was modified or damaged; "
                              "copy or download it again") from e
        raise _not_a_bundle(path, str(e)) from e
    except (EOFError, zlib.error) as e:
        raise _not_a_bundle(path, f"{info.filename}: {e}") from e
    if len(data) > limit:
        raise BundleError(f"{path}: {info.filename} is larger than the limit of {limit} bytes")
    if len(data) != info.file_size:
        raise _not_a_bundle(path, f"{info.filename} has {len(data)} bytes, {info.file_size} expected")
    return data


def _writer(info: dict[str, Any]) -> str:
    """``separeg X.Y`` as recorded in bundle.json, for messages."""
    versions = info.get("versions")
    version = versions.get("separeg") if isinstance(versions, dict) else None
    return f"separeg {version}" if isinstance(version, str) and version else "an unknown separeg version"


def _check_info(path: Path, info: object) -> dict[str, Any]:
    """Check the fixed part of bundle.json."""
    if not isinstance(info, dict):
        raise _not_a_bundle(path, f"{JSON_MEMBER} is not a JSON object")
    version = info.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _not_a_bundle(path, f"{JSON_MEMBER} has no valid schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{path} was made by {_writer(info)} with bundle schema version {version}, newer than the "
                          f"{SCHEMA_VERSION} this separeg {__version__} reads; upgrade separeg "
                          "(pip install --upgrade separeg, or update the SepaReg extension in 3D Slicer)")
    kind = info.get("kind")
    if kind not in BUNDLE_KINDS:
        raise BundleError(f"{path} is a bundle of unknown kind {kind!r} made by {_writer(info)} (known kinds: "
                          f"{', '.join(BUNDLE_KINDS)}); upgrade separeg or check the file")
    if not isinstance(info.get("architecture"), dict):
        raise _not_a_bundle(path, f"{JSON_MEMBER} has no architecture object")
    weights = info.get("weights")
    if (not isinstance(weights, dict) or weights.get("file") != WEIGHTS_MEMBER
            or not isinstance(weights.get("sha256"), str) or not _SHA256_RE.fullmatch(weights["sha256"])):
        raise _not_a_bundle(path, f"{JSON_MEMBER} has no valid weights entry (file {WEIGHTS_MEMBER} and sha256)")
    return info


def _open(path: str | Path) -> tuple[Path, zipfile.ZipFile]:
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist; check the path or the model name (separeg models)")
    if not path.is_file():
        raise BundleError(f"bundle {path} is not a file; a bundle is one {BUNDLE_SUFFIX} file")
    try:
        return path, zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise _not_a_bundle(path, str(e)) from e


def _read_info(path: Path, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    raw = _read_member(path, zf, members[JSON_MEMBER], MAX_JSON_BYTES)
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_a_bundle(path, f"{JSON_MEMBER} is not valid JSON: {e}") from e
    return _check_info(path, info)


def read_bundle_info(path: str | Path) -> dict[str, Any]:
    """Read and check ``bundle.json`` only, without reading the weights (fast; for model listings).

    Args:
        path: the bundle file.

    Returns:
        the parsed ``bundle.json``: ``schema_version``, ``kind``, ``architecture``, ``weights`` (``file``,
        ``sha256``, ``tensors``, ``parameters``), ``versions``, ``created`` and the metadata keys.

    Raises:
        BundleError: missing file, not a bundle, truncated, unexpected members, oversized ``bundle.json``,
            newer schema or unknown kind.
    """
    path, zf = _open(path)
    with zf:
        return _read_info(path, zf, _members(path, zf))


def bundle_hash(path: str | Path) -> str:
    """The weights' SHA-256 recorded in a bundle (its identity in provenance), from ``bundle.json`` only.

    Raises:
        BundleError: as :func:`read_bundle_info`.
    """
    return read_bundle_info(path)["weights"]["sha256"]


def read_bundle_weights(path: str | Path, *, expected_kind: str | None = None,
                        max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> tuple[dict[str, Any], bytes]:
    """``bundle.json`` and the bytes of ``model.safetensors``, checked against the recorded SHA-256 (not parsed:
    :func:`separeg.runtime.bundle.load_bundle` turns them into tensors).

    Raises:
        BundleError: as :func:`read_bundle_info`, and: a kind other than ``expected_kind``, weights larger than
            ``max_weights_bytes`` or not matching their checksum.
    """
    if expected_kind is not None:
        check_kind(expected_kind, "expected_kind")
    path, zf = _open(path)
    with zf:
        members = _members(path, zf)
        info = _read_info(path, zf, members)
        if expected_kind is not None and info["kind"] != expected_kind:
            raise BundleError(f"{path} is {_an(info['kind'])} bundle; {_an(expected_kind)} bundle is needed")
        weights = _read_member(path, zf, members[WEIGHTS_MEMBER], max_weights_bytes)
    sha256 = hashlib.sha256(weights).hexdigest()
    if sha256 != info["weights"]["sha256"]:
        raise BundleError(f"{path}: weights do not match their checksum: the file was modified or damaged "
                          f"(sha256 {sha256}, recorded {info['weights']['sha256']}); copy or download it again")
    return info, weights
