"""The configuration, presets and models that ship with dicomnode, and `init` to copy them out.

From a checkout they are the top-level folders `config/`, `presets/`, `model_registry/`; an
installed wheel carries copies under `dicomnode/_shipped/` (setup.py puts them there). A node
never writes into either: `dicomnode init DIR` copies them into a folder of the operator's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dicomnode.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent
CHECKOUT = _PACKAGE.parent
FOLDERS = ("config", "presets", "model_registry")
CONFIG_FILE = Path("config") / "dicomnode.yaml"


def shipped_root() -> Path:
    """The folder holding config/, presets/ and model_registry/ of this installation."""
    for root in (_PACKAGE / "_shipped", CHECKOUT):
        if all((root / name).is_dir() for name in FOLDERS) and (root / CONFIG_FILE).is_file():
            return root
    raise ConfigError(
        f"this dicomnode installation has no shipped configuration, presets and models "
        f"(looked in {_PACKAGE / '_shipped'} and {CHECKOUT}); reinstall the package")


def init_folder(target: Path) -> list[Path]:
    """Copy the shipped configuration, presets and models into `target`; return what was
    written. Refuses (and writes nothing) when any of them exists there already."""
    source = shipped_root()
    existing = [target / name for name in FOLDERS if (target / name).exists()]
    if existing:
        raise ConfigError(
            "refusing to overwrite " + ", ".join(str(p) for p in existing)
            + " (move them away or choose another folder)")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FOLDERS:
        shutil.copytree(source / name, target / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        written.append(target / name)
    return written
