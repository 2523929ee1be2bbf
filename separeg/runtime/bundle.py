"""Model bundles: one zip file ``NAME.separeg`` holding ``bundle.json`` and ``model.safetensors`` (DESIGN §8).

``bundle.json`` says what the weights are (schema version, ``kind``, architecture, SHA-256 of the weights,
versions, creation time) plus free metadata: input channels and their normalisation, spacing, labels with
TG-263 names and colours, training provenance as counts and hashes, metrics, config. ``model.safetensors``
holds the state dict.

Loading never unpickles: it reads JSON and safetensors only, and checks the zip's members, their sizes (a zip
bomb is refused before it is inflated), the schema version, the kind and the weights' checksum. The weights'
SHA-256 is also the bundle's identity for provenance: a fine-tuned model records its encoder bundle's hash.
Reading ``bundle.json`` and the checks need no torch: they are :mod:`separeg.runtime.bundle_info`, re-exported here;
code that may run before torch is installed (the Slicer panels, the model store) imports that module instead.
"""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from separeg import __version__
from separeg.runtime.atomic import atomic_path
from separeg.runtime.bundle_info import (
    BUNDLE_KINDS,
    BUNDLE_SUFFIX,
    JSON_MEMBER,
    MAX_JSON_BYTES,
    MAX_WEIGHTS_BYTES,
    RESERVED_KEYS,
    SCHEMA_VERSION,
    WEIGHTS_MEMBER,
    BundleError,
    bundle_hash,
    check_kind,
    read_bundle_info,
    read_bundle_weights,
)

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
    "Bundle",
    "save_bundle",
    "load_bundle",
    "read_bundle_info",
    "bundle_hash",
    "pack_bundle",
]


@dataclass(eq=False)
class Bundle:
    """A loaded model bundle.

    Attributes:
        kind: ``encoder`` or ``segmentation`` (see :data:`BUNDLE_KINDS`).
        architecture: how to build the network, e.g. ``{"encoder": "resnet50", "in_channels": 1}``.
        state_dict: the weights, by name, on the ``map_location`` device.
        metadata: everything else in ``bundle.json`` (inputs and normalisation, labels, provenance, metrics,
            config), as JSON gives it back (tuples become lists).
        schema_version, weights_sha256, versions, created: filled on load; ``weights_sha256`` (hex SHA-256 of
            ``model.safetensors``) identifies the bundle in provenance; ``versions`` has ``separeg``, ``torch``
            and ``python`` of the writer; ``created`` is an ISO 8601 UTC time.
        path: the file it was loaded from.
    """

    kind: str
    architecture: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    weights_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    path: Path | None = None


def _prepare_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, dense, contiguous CPU tensors; tied or partial views are cloned, which safetensors requires."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise BundleError(f"state_dict key {name!r} is not a string; safetensors needs string names")
        if not isinstance(value, torch.Tensor):
            raise BundleError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor; "
                              "keep non-tensor values in metadata")
        if value.layout != torch.strided:
            raise BundleError(f"state_dict[{name!r}] is a {value.layout} tensor; convert it with .to_dense()")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr != 0 and (ptr in seen or tensor.data_ptr() != ptr or storage.nbytes() != tensor.nbytes):
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        if ptr != 0:
            seen.add(ptr)
        out[name] = tensor
    return out


def save_bundle(path: str | Path, *, kind: str, architecture: dict[str, Any], state_dict: dict[str, torch.Tensor],
                metadata: dict[str, Any] | None = None) -> Path:
    """Write a bundle atomically (temporary file beside ``path``, then rename); missing folders are created.

    Args:
        path: the bundle file, by convention ``NAME.separeg``; an existing file is replaced.
        kind: ``encoder`` or ``segmentation``.
        architecture: JSON-serialisable description of the network.
        state_dict: tensors by name (any device, dtype supported by safetensors); tied tensors are stored
            once per name.
        metadata: JSON-serialisable extra keys of ``bundle.json``; never patient identifiers or pixels.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        BundleError: unknown kind, a metadata key reserved by the bundle (:data:`RESERVED_KEYS`), a value that
            is not JSON-serialisable, or a state dict entry that is not a dense tensor.
    """
    path = Path(path)
    kind = check_kind(kind, "kind")
    if not isinstance(architecture, dict):
        raise BundleError(f"architecture must be a dict, not {type(architecture).__name__}")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise BundleError(f"metadata must be a dict, not {type(metadata).__name__}")
    clash = sorted(set(metadata) & set(RESERVED_KEYS))
    if clash:
        raise BundleError(f"metadata keys {clash} are reserved by the bundle format; rename them "
                          f"(reserved: {', '.join(RESERVED_KEYS)})")

    tensors = _prepare_tensors(state_dict)
    weights = safetensors_save(tensors, metadata={"format": "pt"})
    now = datetime.now(UTC).replace(microsecond=0)
    info = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "architecture": architecture,
        "weights": {
            "file": WEIGHTS_MEMBER,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
        },
        "versions": {"separeg": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": now.isoformat(),
        **metadata,
    }
    try:
        text = json.dumps(info, indent=1, sort_keys=False)
    except (TypeError, ValueError) as e:
        raise BundleError(f"bundle.json for {path} cannot be written: {e}; architecture and metadata must hold "
                          "only JSON values (dict, list, str, int, float, bool, None)") from e

    date_time = now.timetuple()[:6]
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, data, method in ((JSON_MEMBER, text.encode("utf-8"), zipfile.ZIP_DEFLATED),
                                   (WEIGHTS_MEMBER, weights, zipfile.ZIP_STORED)):
            member = zipfile.ZipInfo(name, date_time=date_time)
            member.compress_type = method
            member.external_attr = 0o644 << 16
            zf.writestr(member, data)
    return path


def pack_bundle(source: str | Path, target: str | Path, *, half: bool = False,
                metadata: dict[str, Any] | None = None) -> Path:
    """Re-write a bundle for release: floating-point weights in fp16 (``half``) and extra metadata merged in.

    Loading casts fp16 weights back into the network's float32 parameters, so a packed bundle is used like any
    other; fp16 halves its size at a relative rounding error of about 5e-4. Top-level ``metadata`` keys replace
    the source's; the source's checksum is kept as ``packed_from`` provenance.

    Raises:
        BundleError: as :func:`load_bundle`, and as :func:`save_bundle` for the metadata.
    """
    bundle = load_bundle(source)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in bundle.state_dict.items()}
    extra = {**bundle.metadata, **(metadata or {}),
             "packed_from": {"weights_sha256": bundle.weights_sha256, "created": bundle.created,
                             "weights_dtype": "float16" if half else "as trained"}}
    return save_bundle(target, kind=bundle.kind, architecture=bundle.architecture, state_dict=state, metadata=extra)


def load_bundle(path: str | Path, *, expected_kind: str | None = None, map_location: str | torch.device = "cpu",
                max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> Bundle:
    """Load and verify a bundle. Never unpickles: reads JSON and safetensors only.

    Args:
        path: the bundle file.
        expected_kind: when given, the bundle must be of this kind.
        map_location: device for the tensors.
        max_weights_bytes: refuse weights larger than this (uncompressed), default 4 GiB.

    Returns:
        the :class:`Bundle`, with ``weights_sha256``, ``versions``, ``created`` and ``path`` filled.

    Raises:
        BundleError: as :func:`read_bundle_info`, and: a kind other than ``expected_kind``, oversized weights,
            weights that do not match their checksum or cannot be parsed as safetensors.
    """
    path = Path(path)
    info, weights = read_bundle_weights(path, expected_kind=expected_kind, max_weights_bytes=max_weights_bytes)
    sha256 = info["weights"]["sha256"]
    try:
        state_dict = safetensors_load(weights)
    except SafetensorError as e:
        raise BundleError(f"{path}: {WEIGHTS_MEMBER} cannot be read as safetensors ({e}); the bundle is damaged "
                          "or was not written by separeg") from e
    expected_count = info["weights"].get("tensors")
    if isinstance(expected_count, int) and expected_count != len(state_dict):
        raise BundleError(f"{path}: {WEIGHTS_MEMBER} holds {len(state_dict)} tensors, bundle.json records "
                          f"{expected_count}; the bundle is damaged")
    device = torch.device(map_location)
    if device.type != "cpu":
        state_dict = {name: t.to(device) for name, t in state_dict.items()}
    return Bundle(
        kind=info["kind"],
        architecture=info["architecture"],
        state_dict=state_dict,
        metadata={k: v for k, v in info.items() if k not in RESERVED_KEYS},
        schema_version=info["schema_version"],
        weights_sha256=sha256,
        versions=dict(info.get("versions") or {}),
        created=str(info.get("created", "")),
        path=path,
    )
