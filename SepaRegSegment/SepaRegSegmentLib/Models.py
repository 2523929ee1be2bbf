"""SepaRegSegment's model library: the installed segmentation models and pretrained encoders (read from the core's
model store), importing and exporting bundles. Mixed into :class:`SepaRegSegmentLib.Logic.SegmentLogic`, whose
``logMessage`` signal reports damaged files. No Slicer, Qt or MRML imports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from SepaRegSegmentLib.Requests import ModelInfo

__all__ = ["ModelLibrary"]


class ModelLibrary:
    """The model methods of :class:`~SepaRegSegmentLib.Logic.SegmentLogic` (needs its ``logMessage`` signal)."""

    # ------------------------------------------------------------------------------------------------- models
    def models(self) -> list[ModelInfo]:
        """Installed segmentation models (per-user folder, then shipped models)."""
        return self._bundles("segmentation")

    def encoders(self) -> list[ModelInfo]:
        """Pretrained encoders in the model folders (the shipped ``separeg-encoder-hn-ct`` first of all)."""
        return self._bundles("encoder")

    def _bundles(self, kind: str) -> list[ModelInfo]:
        from separeg.runtime.bundle_info import read_bundle_info
        from separeg.runtime.model_store import list_models

        found = []
        for path in list_models():
            try:
                info = read_bundle_info(path)
            except Exception as exc:  # noqa: BLE001 - one damaged file must not hide the other models
                self.logMessage.emit(f"skipping {path}: {exc}", "warning")
                continue
            if info.get("kind") != kind:
                continue
            labels = info.get("labels", {}).get("labels", [])
            arch = info["architecture"]
            backbone = str(arch.get("backbone") or arch.get("encoder"))
            release = info.get("release", {})
            if kind == "encoder":
                description = f"{backbone} encoder" + (f"; {release['data']}" if release.get("data") else "")
            else:
                members = release.get("members") or []  # an ensemble (separeg pack --ensemble)
                cases = (" + ".join(str(m.get("training_cases", "?")) for m in members) if members
                         else info.get("training", {}).get("training_cases", "?"))
                description = (f"{backbone}{f' x {len(members)} (ensemble)' if members else ''}, {len(labels)} "
                               f"organs, {cases} training case(s)")
            if release.get("limits"):
                description += f". {release['limits']}"
            channels = [c if isinstance(c, str) else c.get("name", "?")
                        for c in (info.get("inputs") or {}).get("channels") or ["CT"]]
            found.append(ModelInfo(path.stem, path, labels, backbone, description, channels))
        return found

    def model(self, name: str) -> ModelInfo:
        for info in self.models():
            if info.name == name:
                return info
        raise ValueError(f"no installed model named {name!r}; import one or fine-tune one first")

    def importModel(self, path: str | os.PathLike, name: str | None = None, replace: bool = False) -> Path:
        from separeg.runtime.model_store import install_model

        return install_model(path, name, replace=replace)

    def exportModel(self, name: str, destination: str | os.PathLike) -> Path:
        destination = Path(destination)
        if destination.is_dir():
            destination = destination / f"{name}.separeg"
        tmp = destination.with_name(f".{destination.name}.tmp")
        shutil.copyfile(self.model(name).path, tmp)
        os.replace(tmp, destination)
        return destination
