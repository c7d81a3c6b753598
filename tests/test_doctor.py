"""bnkit doctor reports what actually runs; bnkit build compiles ahead of time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnkit import doctor
from bnkit.kernels import native


def test_describe_names_the_path_each_dtype_takes() -> None:
    rows = doctor.describe()
    cpu = {row.dtype: row for row in rows if row.device == "cpu"}
    assert set(cpu) == set(doctor.DTYPES)
    for row in cpu.values():
        assert row.kernel
        assert row.why
    if native.library() is not None:  # every dtype runs the native loops' express path
        for dtype in doctor.DTYPES:
            assert cpu[dtype].why == (
                "express: bnkit::batch_norm (C++, fast.cpp) calling the native C loops"
            )


def test_describe_without_native_code_says_portable_and_why() -> None:
    code = (
        "from bnkit import doctor\n"
        "for row in doctor.describe():\n"
        "    print(row.device, row.dtype, row.kernel, '|', row.why)\n"
    )
    env = {**os.environ, "BNKIT_NATIVE": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("cpu ")]
    assert len(lines) == len(doctor.DTYPES)
    for line in lines:
        assert "portable" in line
        assert "BNKIT_NATIVE=0" in line


@pytest.mark.skipif(native.library() is None, reason=f"no native code: {native.load_error()}")
def test_build_reports_where_the_native_code_is() -> None:
    (line,) = doctor.build()
    assert line.startswith("native CPU kernels")
    assert Path(line.split()[3]).is_file()


def test_build_refuses_when_native_code_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNKIT_NATIVE", "0")
    with pytest.raises(RuntimeError, match="BNKIT_NATIVE=0"):
        doctor.build()


def test_command_line() -> None:
    doctor_run = subprocess.run(
        [sys.executable, "-m", "bnkit", "doctor"], capture_output=True, text=True, timeout=300
    )
    assert doctor_run.returncode == 0, doctor_run.stderr
    cpu_lines = [line for line in doctor_run.stdout.splitlines() if line.startswith("cpu ")]
    assert [line.split()[1] for line in cpu_lines] == list(doctor.DTYPES)
    env = {**os.environ, "BNKIT_NATIVE": "0"}
    build_run = subprocess.run(
        [sys.executable, "-m", "bnkit", "build"], capture_output=True, text=True, env=env
    )
    assert build_run.returncode == 1
    assert build_run.stderr.strip() == "bnkit build: BNKIT_NATIVE=0 turns the native code off"
