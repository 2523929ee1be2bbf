"""Safe loading: bundles are checked (checksum, schema version) and nothing separeg loads ever runs pickled code.

The pickle payloads come from the malformed-input corpus (Testing/corpus/make_corpus.py): unpickling them creates a
marker file. Each refusal test is paired with a control that shows the same bytes do create the marker when loaded
the unsafe way, so a refusal test cannot pass because the payload is inert.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import pytest
import torch

from separeg.runtime.bundle import BundleError, load_bundle, read_bundle_info, save_bundle
from separeg.runtime.errors import InputError
from separeg.runtime.training import load_checkpoint, save_checkpoint

_SPEC = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parent / "corpus" / "make_corpus.py")
corpus = sys.modules.setdefault("make_corpus", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(corpus)


def _item(name: str, tmp_path: Path, shared_data: Path) -> tuple[Path, Path]:
    item = corpus.make_item(name, tmp_path / name, shared_data)
    return item, item.parent / corpus.MARKER


def test_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    marker = tmp_path / corpus.MARKER
    pickle.loads(corpus.payload_bytes(marker))
    assert marker.exists()


def test_payload_is_live_under_unsafe_torch_load(shared_data: Path, tmp_path: Path) -> None:
    item, marker = _item("pickle_checkpoint", tmp_path, shared_data)
    torch.load(item, weights_only=False)
    assert marker.exists()


def test_tampered_weights_are_refused_by_checksum(shared_data: Path, tmp_path: Path) -> None:
    item, _ = _item("tampered_bundle", tmp_path, shared_data)
    recorded = read_bundle_info(item)["weights"]["sha256"]  # bundle.json alone is intact
    with pytest.raises(BundleError, match=f"weights do not match their checksum.*recorded {recorded}.*copy or "
                       "download it again"):
        load_bundle(item)


def test_bundle_from_a_newer_separeg_says_which_and_to_upgrade(shared_data: Path, tmp_path: Path) -> None:
    item, _ = _item("newer_bundle", tmp_path, shared_data)
    for load in (read_bundle_info, load_bundle):  # model listings and loading alike
        with pytest.raises(BundleError, match=r"made by separeg 9\.0\.0 with bundle schema version 2, newer than the 1 "
                           r"this separeg .* reads; upgrade separeg"):
            load(item)


@pytest.mark.parametrize("name", ["pickle_member_bundle", "pickle_weights_bundle", "pickle_checkpoint"])
def test_bundle_loading_never_unpickles(name: str, shared_data: Path, tmp_path: Path) -> None:
    """A pickle beside the weights, a pickle as the weights (checksum matching) and a torch.save file given as a
    bundle: all refused, the payload never runs."""
    item, marker = _item(name, tmp_path, shared_data)
    with pytest.raises(BundleError, match="unexpected member|cannot be read as safetensors"):
        load_bundle(item)
    assert not marker.exists()


def test_checkpoint_loading_never_unpickles(shared_data: Path, tmp_path: Path) -> None:
    item, marker = _item("pickle_checkpoint", tmp_path, shared_data)
    with pytest.raises(InputError, match="(?s)checkpoint .* is unreadable .*Unsupported global.*--restart"):
        load_checkpoint(item)
    assert not marker.exists()


def test_genuine_bundle_and_checkpoint_still_load(tmp_path: Path) -> None:
    """The refusals above are specific: real tensors, containers and numbers load."""
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    bundle = save_bundle(tmp_path / "m.separeg", kind="encoder", architecture={"encoder": "resnet18"},
                         state_dict=weights)
    assert torch.equal(load_bundle(bundle).state_dict["w"], weights["w"])
    save_checkpoint(tmp_path / "last.pt", {"step": 3, "model": weights, "rng": [1, 2]})
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 3 and torch.equal(state["model"]["w"], weights["w"])
