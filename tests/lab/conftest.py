"""Fixtures of the lab tests: a tiny IDX dataset on disk, and one tiny run of the whole lab."""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from bnkit.lab.cli import add_commands
from bnkit.lab.datasets import write_idx

#: Every step count of the lab times this: a whole run takes seconds.
TINY = "0.005"


def write_tiny_idx(directory: Path, *, gzipped: bool, train: int = 400, test: int = 200) -> None:
    """Write four IDX files of a learnable 10-class problem of 8x8 uint8 images."""
    rng = np.random.default_rng(123)
    prototypes = rng.integers(0, 256, size=(10, 8, 8))

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, size=count).astype(np.uint8)
        noise = rng.normal(0, 40, size=(count, 8, 8))
        images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        return images, labels

    suffix = ".gz" if gzipped else ""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        images, labels = split(count)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """Parse ``argv`` with a parser holding the lab's commands, run it; (status, out, err)."""
    parser = argparse.ArgumentParser(prog="bnkit")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = args.run_command(args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a tiny gzipped Fashion-MNIST look-alike."""
    directory = tmp_path_factory.mktemp("tiny-idx")
    write_tiny_idx(directory, gzipped=True)
    return directory


def lab_argv(out: Path, data_dir: Path, *extra: str) -> list[str]:
    """``bnkit lab`` arguments for a tiny run on the tiny IDX data."""
    return [
        "lab",
        *extra,
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--steps-scale",
        TINY,
        "--no-progress",
    ]


@pytest.fixture(scope="session")
def lab_run(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> tuple[Path, str, str]:
    """One tiny run of every experiment: (output directory, stdout, stderr)."""
    out = tmp_path_factory.mktemp("lab-run")
    status, stdout, stderr = run_cli(lab_argv(out, tiny_data_dir))
    assert status == 0, stderr
    return out, stdout, stderr
