"""The cache of compiled code is trusted only when it is private and intact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnkit.kernels import native

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"no native CPU kernel: {native.load_error()}"
)


def _built() -> Path:
    extension = native.extension()
    assert extension is not None
    built = Path(extension.__file__)
    assert native._intact(built)
    return built


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget this process's choice of cache directory for the test."""
    monkeypatch.delitem(native._state, "cache_dir", raising=False)


def test_built_library_is_private_and_recorded() -> None:
    built = _built()
    assert native.unsafe_reason(built, directory=False) is None
    assert native.unsafe_reason(built.parent, directory=True) is None
    record = built.with_name(built.name + ".sha256")
    assert record.read_text().strip() == native._digest(built)


def test_damaged_library_is_not_intact(tmp_path: Path) -> None:
    copy = tmp_path / "lib.so"
    shutil.copy(_built(), copy)
    copy.chmod(0o700)
    record = tmp_path / "lib.so.sha256"
    record.write_text(native._digest(copy))
    record.chmod(0o600)
    assert native._intact(copy)
    with open(copy, "r+b") as file:
        file.truncate(copy.stat().st_size // 2)
    assert not native._intact(copy)
    copy.write_bytes(b"")
    assert not native._intact(copy)


def test_files_others_can_write_are_unsafe(tmp_path: Path) -> None:
    target = tmp_path / "lib.so"
    target.write_bytes(b"\0")
    target.chmod(0o600)
    assert native.unsafe_reason(target, directory=False) is None
    target.chmod(0o666)
    assert "writable by other users" in str(native.unsafe_reason(target, directory=False))
    link = tmp_path / "link.so"
    link.symlink_to(target)
    assert "not a regular file" in str(native.unsafe_reason(link, directory=False))
    tmp_path.chmod(0o777)
    assert "writable by other users" in str(native.unsafe_reason(tmp_path, directory=True))
    tmp_path.chmod(0o700)


@pytest.mark.usefixtures("fresh_state")
def test_world_writable_cache_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("BNKIT_CACHE_DIR", str(shared))
    with pytest.warns(native.NativeUnavailableWarning, match="writable by other users"):
        chosen = native.cache_dir()
    assert chosen != shared
    assert native.unsafe_reason(chosen, directory=True) is None
    shutil.rmtree(chosen)


@pytest.mark.slow
def test_truncated_cached_library_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    # A truncated library used to be dlopen'ed and kill the process with SIGBUS.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    built = _built()
    shutil.copytree(built.parent, cache / built.parent.name)  # the objects: only a relink
    damaged = cache / built.parent.name / built.name
    with open(damaged, "r+b") as file:
        file.truncate(damaged.stat().st_size // 3)
    code = "from bnkit.kernels import native; print(native.library() is not None)"
    env = {**os.environ, "BNKIT_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "compiling the native CPU kernels" in result.stderr
    assert native._intact(damaged)


@pytest.mark.slow
def test_a_failed_build_warns_once_and_the_portable_kernel_runs(tmp_path: Path) -> None:
    code = (
        "import warnings, torch\n"
        "from bnkit.functional import batch_norm\n"
        "from bnkit.kernels import native\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        y = batch_norm(torch.randn(8, 4, 16), None, None, training=True)\n"
        "unavailable = [w for w in caught if w.category is native.NativeUnavailableWarning]\n"
        "print(native.library() is None, len(unavailable), abs(y.mean().item()) < 1e-5)\n"
        "print(unavailable[0].message)"
    )
    env = {**os.environ, "CXX": "false", "BNKIT_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.splitlines()[:2]
    assert first == "True 1 True"
    assert "portable kernel runs instead" in message
    assert result.stderr.count("compiling the native CPU kernels with false") == 1


def test_ninja_is_found_without_an_activated_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja on it
    assert shutil.which("ninja") is None
    native._ninja_on_path()
    assert shutil.which("ninja") is not None
