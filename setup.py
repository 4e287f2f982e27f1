"""Build hook only (the metadata is in pyproject.toml): put the shipped configuration, presets
and model registry into the wheel, as package data under dicomnode/_shipped/.

They live at the top of the checkout (config/, presets/, model_registry/), where a checkout's
node reads them in place; an installed package finds them under dicomnode/_shipped/ and
`dicomnode init DIR` copies them out (dicomnode/bundled.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("config", "presets", "model_registry")


class BuildPyWithShipped(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's folders in place
        target = Path(self.build_lib) / "dicomnode" / "_shipped"
        for name in SHIPPED:
            shutil.copytree(ROOT / name, target / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildPyWithShipped})
