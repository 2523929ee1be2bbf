from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

import separeg.runtime.bundle as bundle_module
from separeg.runtime.bundle import (
    BUNDLE_KINDS,
    JSON_MEMBER,
    MAX_JSON_BYTES,
    RESERVED_KEYS,
    SCHEMA_VERSION,
    WEIGHTS_MEMBER,
    Bundle,
    BundleError,
    bundle_hash,
    load_bundle,
    pack_bundle,
    read_bundle_info,
    save_bundle,
)
from separeg.runtime.errors import SepaRegError

ARCH = {"encoder": "tiny", "in_channels": 1, "widths": [4, 8]}
META = {
    "inputs": {"channels": ["ct"], "hu_window": [-1000.0, 1000.0], "spacing_mm": [1.0, 1.0], "size": [64, 64]},
    "labels": [{"value": 1, "name": "Brainstem", "color": [255, 0, 0]}],
    "provenance": {"patients": 3, "encoder_sha256": "0" * 64},
    "metrics": {"dice": 0.81, "hd95_mm": None},
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1))
    model(torch.randn(2, 1, 8, 8))  # training step: num_batches_tracked = 1, running stats move
    return model


def _state_dict() -> dict[str, torch.Tensor]:
    state = dict(_model().state_dict())
    state["extra.bf16"] = torch.linspace(-2, 2, 7).to(torch.bfloat16)
    state["extra.tied"] = state["0.weight"]  # same storage as another entry
    state["extra.view"] = state["3.weight"].view(-1)[:3]  # part of a larger storage
    state["extra.transposed"] = torch.arange(6.0).reshape(2, 3).t()  # not contiguous
    return state


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _state_dict()
    path = save_bundle(tmp_path / "enc.separeg", kind="encoder", architecture=ARCH, state_dict=state, metadata=META)
    return path, state


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def test_round_trip(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = saved
    bundle = load_bundle(path, expected_kind="encoder")
    assert isinstance(bundle, Bundle)
    assert bundle.kind == "encoder" and bundle.architecture == ARCH and bundle.metadata == META
    assert bundle.path == path and bundle.schema_version == SCHEMA_VERSION
    assert set(bundle.state_dict) == set(state)
    for name, tensor in state.items():
        loaded = bundle.state_dict[name]
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, name
        assert torch.equal(loaded, tensor), name
    assert bundle.state_dict["1.num_batches_tracked"].dtype == torch.int64
    assert int(bundle.state_dict["1.num_batches_tracked"]) == 1
    assert bundle.state_dict["extra.bf16"].dtype == torch.bfloat16
    # The weights load back into the model.
    model = _model()
    model.load_state_dict({k: v for k, v in bundle.state_dict.items() if not k.startswith("extra.")})
    # Identity: sha256 of the stored weights, recorded in bundle.json.
    weights = _members(path)[WEIGHTS_MEMBER]
    assert bundle.weights_sha256 == hashlib.sha256(weights).hexdigest() == bundle_hash(path)
    assert set(bundle.versions) == {"separeg", "torch", "python"}
    assert bundle.versions["torch"] == torch.__version__
    assert bundle.created.endswith("+00:00")


def test_zip_layout_and_info(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = saved
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == [JSON_MEMBER, WEIGHTS_MEMBER]
        assert zf.getinfo(JSON_MEMBER).compress_type == zipfile.ZIP_DEFLATED
        assert zf.getinfo(WEIGHTS_MEMBER).compress_type == zipfile.ZIP_STORED
    info = read_bundle_info(path)
    assert info["schema_version"] == SCHEMA_VERSION and info["kind"] == "encoder"
    assert info["weights"]["file"] == WEIGHTS_MEMBER
    assert info["weights"]["tensors"] == len(state)
    assert info["weights"]["parameters"] == sum(t.numel() for t in state.values())
    assert {k: info[k] for k in META} == META
    assert set(info) == set(RESERVED_KEYS) | set(META)


def test_read_bundle_info_does_not_read_weights(saved: tuple[Path, dict[str, torch.Tensor]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved
    expected = bundle_hash(path)
    data = bytearray(path.read_bytes())
    data[data.find(_members(path)[WEIGHTS_MEMBER]) + 200] ^= 0xFF  # reading the weights would now fail
    path.write_bytes(bytes(data))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were parsed")

    monkeypatch.setattr(bundle_module, "safetensors_load", fail)
    assert read_bundle_info(path)["weights"]["sha256"] == expected
    assert bundle_hash(path) == expected
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(path)


def test_the_torch_free_reader_is_the_one_bundle_exports() -> None:
    """``bundle_info`` (no torch: the Slicer panels list models with it) and ``bundle`` share one reader and one
    error class, so ``except BundleError`` catches either's errors."""
    import separeg.runtime.bundle_info as info_module

    for name in info_module.__all__:
        assert getattr(bundle_module, name) is getattr(info_module, name), name
    assert set(info_module.__all__) - {"check_kind", "read_bundle_weights"} <= set(bundle_module.__all__)


@pytest.mark.parametrize(("saved_kind", "expected", "message"), [
    ("segmentation", "encoder", "is a segmentation bundle; an encoder bundle is needed"),
    ("encoder", "segmentation", "is an encoder bundle; a segmentation bundle is needed"),
])
def test_expected_kind_mismatch(tmp_path: Path, saved_kind: str, expected: str, message: str) -> None:
    path = save_bundle(tmp_path / "m.separeg", kind=saved_kind, architecture=ARCH, state_dict={"w": torch.ones(2)},
                       metadata={})
    assert load_bundle(path, expected_kind=saved_kind).kind == saved_kind
    with pytest.raises(BundleError, match=message):
        load_bundle(path, expected_kind=expected)


def test_bad_arguments(tmp_path: Path) -> None:
    state = {"w": torch.ones(2)}
    with pytest.raises(BundleError, match="not a bundle kind"):
        save_bundle(tmp_path / "a.separeg", kind="decoder", architecture=ARCH, state_dict=state, metadata={})
    for key in RESERVED_KEYS:
        with pytest.raises(BundleError, match=f"'{key}'.*reserved"):
            save_bundle(tmp_path / "a.separeg", kind="encoder", architecture=ARCH, state_dict=state,
                        metadata={key: 1})
    with pytest.raises(BundleError, match="JSON"):
        save_bundle(tmp_path / "a.separeg", kind="encoder", architecture=ARCH, state_dict=state,
                    metadata={"where": tmp_path})
    with pytest.raises(BundleError, match="not a tensor"):
        save_bundle(tmp_path / "a.separeg", kind="encoder", architecture=ARCH, state_dict={"w": [1.0]}, metadata={})
    with pytest.raises(BundleError, match="not a bundle kind"):
        load_bundle(tmp_path / "a.separeg", expected_kind="decoder")
    assert list(tmp_path.iterdir()) == []  # failed saves leave nothing behind


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope.separeg")
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle_info(tmp_path / "nope.separeg")
    with pytest.raises(BundleError, match="not a file"):
        load_bundle(tmp_path)


def test_truncated_file(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="is not a SepaReg bundle or is truncated"):
        load_bundle(path)
    with pytest.raises(BundleError, match="is not a SepaReg bundle or is truncated"):
        read_bundle_info(path)
    path.write_bytes(b"")
    with pytest.raises(BundleError, match="is not a SepaReg bundle or is truncated"):
        load_bundle(path)


def test_flipped_byte_in_weights(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = saved
    data = bytearray(path.read_bytes())
    start = data.find(_members(path)[WEIGHTS_MEMBER])
    assert start > 0  # stored, not compressed: the weights appear verbatim
    data[start + len(_members(path)[WEIGHTS_MEMBER]) - 1] ^= 0x01  # last byte of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights do not match their checksum: the file was modified or damaged"):
        load_bundle(path)


def test_rezipped_different_weights(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A well-formed zip (valid CRCs) whose weights differ from the recorded hash."""
    path, _ = saved
    members = _members(path)
    members[WEIGHTS_MEMBER] = safetensors_save({"w": torch.zeros(3)})
    _zip(path, members)
    with pytest.raises(BundleError, match="weights do not match their checksum: the file was modified or damaged"):
        load_bundle(path)


def test_unparsable_weights_with_matching_hash(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = saved
    members = _members(path)
    members[WEIGHTS_MEMBER] = b"\xff" * 64
    info = json.loads(members[JSON_MEMBER])
    info["weights"]["sha256"] = hashlib.sha256(members[WEIGHTS_MEMBER]).hexdigest()
    members[JSON_MEMBER] = json.dumps(info).encode()
    _zip(path, members)
    with pytest.raises(BundleError, match="cannot be read as safetensors"):
        load_bundle(path)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled!",))


@pytest.mark.parametrize("extra", ["data.pkl", "../escape.txt", "/abs/model.safetensors", "sub/bundle.json"])
def test_extra_member_rejected_without_unpickling(saved: tuple[Path, dict[str, torch.Tensor]], extra: str,
                                                  no_unpickling: None) -> None:
    path, _ = saved
    members = _members(path)
    members[extra] = pickle.dumps(_Boom())
    _zip(path, members)
    with pytest.raises(BundleError, match="unexpected member") as excinfo:
        load_bundle(path)
    assert repr(extra) in str(excinfo.value)
    with pytest.raises(BundleError, match="unexpected member"):
        read_bundle_info(path)


def test_torch_save_file_rejected(tmp_path: Path, no_unpickling: None) -> None:
    """A torch checkpoint is also a zip (with a pickle inside); renamed to .separeg it must not be unpickled."""
    path = tmp_path / "model.separeg"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(BundleError, match=r"unexpected member '.*data\.pkl'"):
        load_bundle(path)


def test_missing_or_duplicate_member(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = saved
    members = _members(path)
    _zip(path, {JSON_MEMBER: members[JSON_MEMBER]})
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(path)
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(JSON_MEMBER, members[JSON_MEMBER])
            zf.writestr(JSON_MEMBER, members[JSON_MEMBER])
            zf.writestr(WEIGHTS_MEMBER, members[WEIGHTS_MEMBER])
    with pytest.raises(BundleError, match="bundle.json appears 2 times"):
        read_bundle_info(path)


def test_non_zip_file(tmp_path: Path) -> None:
    path = tmp_path / "scan.separeg"
    path.write_bytes(b"\x5c\x01\x00\x00" + bytes(400))  # e.g. a NIfTI header renamed
    with pytest.raises(BundleError, match="is not a SepaReg bundle or is truncated") as excinfo:
        load_bundle(path)
    assert isinstance(excinfo.value, SepaRegError)
    path.write_text("hello")
    with pytest.raises(BundleError, match="is not a SepaReg bundle"):
        read_bundle_info(path)


def test_zip_bomb_json(saved: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved
    members = _members(path)
    info = json.loads(members[JSON_MEMBER])
    info["padding"] = " " * (MAX_JSON_BYTES + 1)
    members[JSON_MEMBER] = json.dumps(info).encode()
    _zip(path, members)
    assert path.stat().st_size < 100_000  # highly compressible
    read = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: read.append(name) or
                        real_open(self, name, *a, **k))
    with pytest.raises(BundleError, match=r"declares \d+ bytes, more than the limit"):
        read_bundle_info(path)
    with pytest.raises(BundleError, match="bundle.json declares"):
        load_bundle(path)
    assert read == []  # refused from the header, before inflating


def test_lying_size_header(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A central directory that understates bundle.json's size: the bounded read stops, the CRC check fails."""
    path, _ = saved
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # first central directory entry: bundle.json
    assert data[central + 46: central + 46 + len(JSON_MEMBER)] == JSON_MEMBER.encode()
    data[central + 24: central + 28] = (10).to_bytes(4, "little")  # uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="bundle.json"):
        read_bundle_info(path)


def test_weights_size_limit(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = saved
    with pytest.raises(BundleError, match="model.safetensors declares .* more than the limit of 100 bytes"):
        load_bundle(path, max_weights_bytes=100)


def test_newer_schema_and_unknown_kind(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = saved
    members = _members(path)
    info = json.loads(members[JSON_MEMBER])
    _zip(path, {**members, JSON_MEMBER: json.dumps({**info, "schema_version": SCHEMA_VERSION + 1}).encode()})
    with pytest.raises(BundleError, match="newer .* upgrade separeg"):
        read_bundle_info(path)
    _zip(path, {**members, JSON_MEMBER: json.dumps({**info, "kind": "decoder"}).encode()})
    with pytest.raises(BundleError, match="unknown kind 'decoder'"):
        load_bundle(path)
    _zip(path, {**members, JSON_MEMBER: b"[1, 2"})
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)
    assert "decoder" not in BUNDLE_KINDS


def test_atomic_save(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "model.separeg"
    state = {"w": torch.ones(3)}
    save_bundle(target, kind="segmentation", architecture=ARCH, state_dict=state, metadata={"note": "first"})
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.separeg"]
    first = bundle_hash(target)
    save_bundle(target, kind="segmentation", architecture=ARCH, state_dict={"w": torch.zeros(3)},
                metadata={"note": "second"})
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.separeg"]
    assert bundle_hash(target) != first
    assert load_bundle(target).metadata == {"note": "second"}
    assert (target.stat().st_mode & 0o777) != 0o600  # usual permissions, not mkstemp's


def test_map_location_meta_free(saved: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = saved
    bundle = load_bundle(path, map_location=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in bundle.state_dict.values())
    # Tied entries come back as independent tensors.
    bundle.state_dict["extra.tied"].zero_()
    assert bundle.state_dict["0.weight"].abs().sum() > 0


def test_pack_stores_fp16_adds_metadata_and_still_loads_into_the_model(tmp_path: Path) -> None:
    model = _model()
    source = save_bundle(tmp_path / "trained.separeg", kind="segmentation", architecture=ARCH,
                         state_dict=model.state_dict(), metadata=META)
    packed = pack_bundle(source, tmp_path / "release.separeg", half=True,
                         metadata={"release": {"name": "tiny"}, "metrics": {"dice": 0.5}})
    original, release = load_bundle(source), load_bundle(packed)
    assert release.state_dict["0.weight"].dtype == torch.float16
    assert release.state_dict["1.num_batches_tracked"].dtype == torch.int64  # integers are not rounded
    assert release.metadata["release"] == {"name": "tiny"} and release.metadata["metrics"] == {"dice": 0.5}
    assert release.metadata["labels"] == META["labels"]  # the rest is kept
    assert release.metadata["packed_from"]["weights_sha256"] == original.weights_sha256
    def float_bytes(state: dict) -> int:
        return sum(t.numel() * t.element_size() for t in state.values() if t.is_floating_point())

    assert float_bytes(release.state_dict) * 2 == float_bytes(original.state_dict)
    restored = _model()
    restored.load_state_dict(release.state_dict)  # fp16 weights are cast into the float32 parameters
    assert restored[0].weight.dtype == torch.float32
    torch.testing.assert_close(restored[0].weight, model[0].weight, rtol=1e-3, atol=1e-4)


def test_pack_command_refuses_metadata_that_is_not_an_object(tmp_path: Path, capsys) -> None:
    from separeg.cli import main

    source = save_bundle(tmp_path / "m.separeg", kind="encoder", architecture=ARCH, state_dict=_state_dict())
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    assert main(["pack", str(source), "--out", str(tmp_path / "o.separeg"), "--metadata",
                 str(tmp_path / "list.json")]) == 1
    assert main(["pack", str(source), "--out", str(tmp_path / "o.separeg"), "--metadata",
                 str(tmp_path / "broken.json")]) == 1
    err = capsys.readouterr().err
    assert "must hold a JSON object" in err and "is not valid JSON" in err and not (tmp_path / "o.separeg").exists()
