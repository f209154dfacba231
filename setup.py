"""Builds csrc's copy libraries into pd/native/ as part of every install (editable ones too), so a
GPU node that runs `pip install -e .` has the CUDA library; the metadata lives in pyproject.toml."""
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithNative(build_py):
    def run(self) -> None:
        out = ROOT / "pd" / "native" if self.editable_mode else Path(self.build_lib) / "pd" / "native"
        subprocess.run(["bash", str(ROOT / "csrc" / "build.sh"), str(out)], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithNative})
