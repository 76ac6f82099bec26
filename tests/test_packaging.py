"""The distribution: a built wheel installs prunegym.compression, .envs and .agents and they import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_built_wheel_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheel_dir.glob("prunegym-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for init in ("prunegym/compression/__init__.py", "prunegym/envs/__init__.py", "prunegym/agents/__init__.py"):
        assert init in names
    # everything under prunegym/ or the wheel's prunegym-*.dist-info/: no top-level package of the folder names
    assert all(name.startswith(("prunegym/", "prunegym-")) for name in names), names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import gymnasium, prunegym.compression, prunegym.envs, prunegym.agents; "
            f"assert prunegym.envs.__file__.startswith({str(target)!r}), prunegym.envs.__file__; "
            "assert 'prunegym/LayerPruning-v0' in gymnasium.registry")
    # Run from tmp_path with the wheel's folder first on the path, so the checkout cannot be picked up.
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr
