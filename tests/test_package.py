"""The package's public surface: lazy exports, version, typing marker."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import bnkit


def test_layers_are_exported_at_the_top_level() -> None:
    from bnkit import functional, nn

    assert bnkit.BatchNorm1d is nn.BatchNorm1d
    assert bnkit.BatchNorm2d is nn.BatchNorm2d
    assert bnkit.BatchNorm3d is nn.BatchNorm3d
    assert bnkit.functional is functional
    assert {"BatchNorm2d", "functional", "reference"} <= set(dir(bnkit))
    assert set(bnkit.__all__) <= set(dir(bnkit))


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'BatchNorm4d'"):
        _ = bnkit.BatchNorm4d  # type: ignore[attr-defined]


def test_importing_bnkit_does_not_import_torch() -> None:
    program = "import sys, bnkit, bnkit.reference; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_version_matches_the_installed_metadata() -> None:
    assert importlib.metadata.version("bnkit") == bnkit.__version__


def test_package_is_typed() -> None:
    assert (Path(bnkit.__file__).parent / "py.typed").exists()


def test_version_is_written_in_one_place() -> None:
    root = Path(__file__).resolve().parents[1]
    files = [root / "pyproject.toml", root / "README.md", *root.glob("docs/**/*.md")]
    files += [*root.glob("bnkit/**/*.py"), *root.glob("examples/*.py")]
    holders = [f.relative_to(root).as_posix() for f in files if bnkit.__version__ in f.read_text()]
    assert holders == ["bnkit/__init__.py"]


def test_changelog_starts_with_this_release() -> None:
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    first = next(line for line in changelog.splitlines() if line.startswith("## "))
    assert first.split()[1] == bnkit.__version__


def test_wheel_and_sdist_carry_the_license(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="the dev extra installs hatchling")
    from hatchling.builders.sdist import SdistBuilder
    from hatchling.builders.wheel import WheelBuilder

    root = str(Path(__file__).resolve().parents[1])
    name = f"bnkit-{bnkit.__version__}"
    wheel = next(WheelBuilder(root).build(directory=str(tmp_path), versions=["standard"]))
    with zipfile.ZipFile(wheel) as archive:
        wheel_files = set(archive.namelist())
    assert f"{name}.dist-info/licenses/LICENSE" in wheel_files
    assert "bnkit/py.typed" in wheel_files
    sdist = next(SdistBuilder(root).build(directory=str(tmp_path), versions=["standard"]))
    with tarfile.open(sdist) as archive:
        sdist_files = set(archive.getnames())
    assert {f"{name}/LICENSE", f"{name}/CHANGELOG.md", f"{name}/pyproject.toml"} <= sdist_files
    assert not any("/site/" in f or "/bnkit-lab/" in f for f in sdist_files)
