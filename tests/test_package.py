"""The package's public surface: lazy exports, version, typing marker."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
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
