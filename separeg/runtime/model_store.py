"""Where models are found: ``--model`` takes a bundle path or a name (DESIGN §8).

Names are looked up in the user model folder (``$SEPAREG_MODELS``, else the platform data folder, e.g.
``~/.local/share/separeg/models``), then in the models shipped inside the package, so a pip install and
the Slicer extension see the same files. Standard library only: the Slicer panels list and install models before
torch is installed (``Testing/test_slicer_stock.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from separeg.runtime.bundle_info import BUNDLE_SUFFIX
from separeg.runtime.errors import InputError

__all__ = ["model_dirs", "user_model_dir", "shipped_model_dir", "resolve_model", "list_models", "install_model",
           "BUNDLE_SUFFIX"]


def _user_dir() -> Path:
    if os.environ.get("SEPAREG_MODELS"):
        return Path(os.environ["SEPAREG_MODELS"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "separeg" / "models"


def user_model_dir() -> Path:
    """Where installed models go (``SEPAREG_MODELS``, else the platform's per-user data folder)."""
    return _user_dir()


def shipped_model_dir() -> Path:
    """The starter models installed with the package (MODELS.md)."""
    return Path(__file__).resolve().parents[1] / "models"


def model_dirs() -> list[Path]:
    """The folders searched for model names, in order."""
    return [_user_dir(), shipped_model_dir()]


def list_models() -> list[Path]:
    """Every bundle in the model folders (a user model hides a shipped one of the same name)."""
    found: dict[str, Path] = {}
    for folder in model_dirs():
        for path in sorted(folder.glob(f"*{BUNDLE_SUFFIX}")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return list(found.values())


def resolve_model(name_or_path: str | Path) -> Path:
    """A bundle path, or the bundle of that name in :func:`model_dirs`.

    Raises:
        InputError: neither a file nor a known name; lists the models that exist.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(BUNDLE_SUFFIX)
    for folder in model_dirs():
        candidate = folder / f"{name}{BUNDLE_SUFFIX}"
        if candidate.is_file():
            return candidate
    known = ", ".join(p.stem for p in list_models()) or "none installed"
    raise InputError(f"model {name_or_path!r} is neither a file nor a known model name (known: {known}; "
                     f"folders searched: {', '.join(str(d) for d in model_dirs())})")


def install_model(bundle: str | Path, name: str | None = None, *, replace: bool = False) -> Path:
    """Copy a segmentation bundle into :func:`user_model_dir` under ``name`` (default: its file name).

    The bundle is verified first (a damaged or encoder-only file is refused); the copy is written to a temporary
    file and renamed, so a full disk never leaves a half-written model that looks installed.

    Raises:
        InputError: not a segmentation bundle; a model of that name exists and ``replace`` is false.
    """
    import shutil

    from separeg.runtime.atomic import atomic_path
    from separeg.runtime.bundle_info import read_bundle_info  # torch-free: the Slicer panels install models with it

    source = Path(bundle)
    info = read_bundle_info(source)
    if info["kind"] != "segmentation":
        raise InputError(f"{source} is an {info['kind']} bundle; only segmentation models can be installed")
    name = (name or source.name).removesuffix(BUNDLE_SUFFIX)
    if not name or any(c in name for c in '/\\:*?"<>|'):
        raise InputError(f"{name!r} cannot be a model name; use letters, digits, spaces, '-' and '_'")
    target = user_model_dir() / f"{name}{BUNDLE_SUFFIX}"
    if target.exists() and not replace:
        raise InputError(f"a model named {name!r} is already installed ({target}); choose another name or replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    read_bundle_info(target)
    return target
