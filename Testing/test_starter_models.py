"""The starter models shipped in ``separeg/models/`` (MODELS.md): intact, documented, small, and usable by name."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from separeg.cli import main
from separeg.evaluate.metrics import dice
from separeg.runtime.bundle import WEIGHTS_MEMBER, load_bundle, read_bundle_info
from separeg.runtime.model_store import list_models, resolve_model, shipped_model_dir
from separeg.segment.finetune.train import FinetuneConfig, FinetuneJob, run_finetune

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"
SHIPPED = {"separeg-encoder-hn-ct": "encoder", "hn-oar-7": "segmentation"}
ORGANS = ["Brainstem", "SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Larynx", "Bone_Mandible"]


def test_shipped_bundles_are_intact_documented_and_small() -> None:
    paths = {name: shipped_model_dir() / f"{name}.separeg" for name in SHIPPED}
    assert sum(p.stat().st_size for p in paths.values()) <= 12 * 1024**2  # the budget: 12 MB in total
    for name, kind in SHIPPED.items():
        bundle = load_bundle(paths[name], expected_kind=kind)  # verifies the weights' SHA-256
        with zipfile.ZipFile(paths[name]) as zf:
            assert hashlib.sha256(zf.read(WEIGHTS_MEMBER)).hexdigest() == bundle.weights_sha256
        floats = [t for t in bundle.state_dict.values() if t.is_floating_point()]
        assert floats and all(str(t.dtype) == "torch.float16" for t in floats)
        release = bundle.metadata["release"]
        assert release["name"] == name and release["model_card"] == "MODELS.md"
        assert "OpenKBP" in release["data"] and "not for clinical use" in release["limits"]
        assert release["commands"] and all(c.startswith("separeg ") for c in release["commands"])
        assert bundle.metadata["packed_from"]["weights_dtype"] == "float16"
    model = load_bundle(paths["hn-oar-7"])
    assert [lb["tg263"] for lb in model.metadata["labels"]["labels"]] == ORGANS
    assert model.architecture["backbone"] == "resnet18-slim" and model.metadata["training"]["training_cases"] == 36
    # v3: v2's network (36 training patients; its training metadata) and the pool network (160), one bundle.
    assert [m["backbone"] for m in model.architecture["members"]] == ["resnet18-slim"] * 2
    assert [m["training_cases"] for m in model.metadata["release"]["members"]] == [36, 160]
    assert model.metadata["inputs"]["context_slices"] == 1 and model.architecture["in_channels"] == 3  # 2.5D
    validation = model.metadata["release"]["validation"]
    assert len(validation["patients"]) == 10 and set(ORGANS) <= set(validation["per_organ"])
    # v2 model selection used held-out training patients, never the 10 reported validation patients.
    assert not set(model.metadata["release"]["holdout_patients"]) & set(validation["patients"])
    assert model.metadata["postprocessing"]["chosen_on"] == "validation"
    encoder = load_bundle(paths["separeg-encoder-hn-ct"])
    # hn-oar-7 v2 was fine-tuned from encoder v1, which encoder v2 (the issue-22 pipeline) names as superseded.
    superseded = encoder.metadata["release"]["supersedes"]
    assert encoder.metadata["release"]["version"] == 2 and superseded["version"] == 1
    assert model.metadata["training"]["init_encoder_sha256"] == superseded["weights_sha256"]
    assert encoder.metadata["training"]["config"]["init_from_inter"] and encoder.metadata["training"]["volumes"] == 37
    card = (REPO / "MODELS.md").read_text(encoding="utf-8")
    for name in SHIPPED:
        assert name in card


def test_shipped_models_are_listed_and_found_by_name(capsys) -> None:
    assert {p.stem for p in list_models()} >= set(SHIPPED)
    assert resolve_model("hn-oar-7") == shipped_model_dir() / "hn-oar-7.separeg"
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert all(any(name in line and "shipped" in line for line in listed.splitlines()) for name in SHIPPED)


def test_contour_an_unseen_patient_by_model_name(tmp_path: Path) -> None:
    """pt_209 is an OpenKBP validation patient: never trained on nor used for model selection. The contour must
    find its organs (MODELS.md's evaluation of hn-oar-7 v2 measured them on it)."""
    assert main(["contour", str(SAMPLES / "pt_209_ct.nii.gz"), "--model", "hn-oar-7", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "segmentation.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLES / "pt_209_oar.nii.gz")))
    labels = json.loads((tmp_path / "segmentation.json").read_text())["labels"]
    assert [lb["tg263"] for lb in labels] == ORGANS
    mandible = dice(predicted == 7, reference == 7)
    present = [v for v in range(1, 8) if (reference == v).any()]
    mean = float(np.mean([dice(predicted == v, reference == v) for v in present]))
    assert mandible >= 0.75 and mean >= 0.55, (mandible, mean)


def test_finetune_starts_from_the_shipped_encoder_by_name(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("pt_22_ct.nii.gz", "pt_22_oar.nii.gz", "pt_1_ct.nii.gz", "pt_1_oar.nii.gz", "labels.json"):
        shutil.copy(SAMPLES / name, data / name)
    tiny = FinetuneConfig(epochs=1, steps_per_epoch=1, batch_size=2, validation_cases=1)
    model = run_finetune(FinetuneJob(data=data, out_dir=tmp_path / "run", init="separeg-encoder-hn-ct", config=tiny,
                                     device="cpu"))
    info = read_bundle_info(model)
    assert info["architecture"]["backbone"] == "resnet18-slim"
    encoder = load_bundle(resolve_model("separeg-encoder-hn-ct"))
    assert info["training"]["init_encoder_sha256"] == encoder.weights_sha256
