"""Build and load ``fast.cpp``: the express path for small tensors without Python.

On a tensor of a few thousand values the express path's Python (checks, a ctypes call
each way, a Python autograd Function) costs more than the work. ``fast.cpp`` takes the
same decisions in C++ on the same arguments, calls the same C loops and gives autograd a
native node, for float and double CPU tensors up to :data:`bnkit.kernels.outputs.MIN_BYTES`
(larger ones keep the Python path and its output pool). It is compiled against the
installed torch's headers, which takes about a minute, so on first use a process of its
own builds it (one per cache entry at a time; it finishes and fills the cache even when
the process that started it exits first) while a thread waits to load it, and the
result is cached beside the C library (keyed by the source, compiler, torch and Python).
Until it is ready, and wherever it cannot be built, nothing changes but speed.
``BNKIT_NATIVE=0`` or ``BNKIT_NATIVE_CXX=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["build_seconds", "load_error", "module", "start", "wait"]

_SOURCE = Path(__file__).with_name("fast.cpp")
_NAME = "_bnkit_fast"
FLAGS = ("-O2", "-std=c++20", "-fPIC", "-shared", "-w")
_state: dict[str, Any] = {}
_LOCK = threading.Lock()
_READY = threading.Event()


def module() -> ModuleType | None:
    """The loaded extension, or None (not built yet, building, or unavailable)."""
    return _state.get("module")


def load_error() -> str | None:
    """Why the extension is unavailable (None: loaded, building or not tried)."""
    return _state.get("error")


def build_seconds() -> float | None:
    """Seconds this process spent compiling the extension (None: cached or not built)."""
    return _state.get("build_seconds")


def start() -> None:
    """Load the extension from the cache, or start building it in the background."""
    if _state.get("started"):
        return
    with _LOCK:
        if _state.get("started"):
            return
        _state["started"] = True
    if os.environ.get("BNKIT_NATIVE", "1") == "0" or os.environ.get("BNKIT_NATIVE_CXX") == "0":
        _state["error"] = "disabled by BNKIT_NATIVE=0 or BNKIT_NATIVE_CXX=0"
        _READY.set()
        return
    target = _target()
    if target is not None and target.exists():
        _load(target)
        _READY.set()
        return
    if target is None:
        _READY.set()
        return
    # Announced, since it may outlive this process (it finishes and fills the cache).
    print(
        f"bnkit: building the C++ express path with {_state['compiler']} in the background "
        f"into {target.parent} (about a minute, once; the Python path serves meanwhile; "
        f"`bnkit build` does it ahead of time, BNKIT_NATIVE_CXX=0 turns it off)",
        file=sys.stderr,
        flush=True,
    )
    try:  # spawned now, not by the thread: an exiting interpreter stops its threads
        process = subprocess.Popen(
            [sys.executable, "-m", "bnkit.kernels.fast", str(target), _state["compiler"]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as error:
        _state["error"] = str(error)
        _READY.set()
        return
    threading.Thread(target=_wait_and_load, args=(process, target), daemon=True).start()


def wait(timeout: float | None = None) -> ModuleType | None:
    """Start the extension if needed and wait (up to ``timeout`` seconds) until it is
    loaded or known to be unavailable; returns :func:`module`."""
    start()
    _READY.wait(timeout)
    return module()


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _command(compiler: str, output: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    libraries = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *[f"-I{path}" for path in includes],
        str(_SOURCE),
        "-o",
        str(output),
        *[f"-L{path}" for path in libraries],
        *[f"-Wl,-rpath,{path}" for path in libraries],
        "-lc10",
        "-ltorch",
        "-ltorch_cpu",
        "-ltorch_python",
    ]


def _target() -> Path | None:
    """Where the built extension is cached (None: no C++ compiler)."""
    from bnkit.kernels import native

    compiler = _compiler()
    if compiler is None:
        _state["error"] = "no C++ compiler found ($CXX, c++, g++)"
        return None
    import torch

    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        b"\0".join(
            part.encode() if isinstance(part, str) else part
            for part in (
                _SOURCE.read_bytes(),
                version,
                " ".join(FLAGS),
                torch.__version__,
                str(Path(torch.__file__).parent),
                sys.version,
            )
        )
    ).hexdigest()[:16]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    _state["compiler"] = compiler
    return native.cache_dir() / f"{_NAME}_{key}{suffix}"


def _build(target: Path, compiler: str) -> None:
    """Compile fast.cpp into ``target`` unless it exists (one build per target at a time:
    a concurrent one is waited for).

    Raises:
        RuntimeError: the compiler failed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)  # never through a link
    with os.fdopen(os.open(target.with_suffix(".lock"), flags, 0o600), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            result = subprocess.run(
                _command(compiler, partial), capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise RuntimeError(f"build failed: {result.stderr.strip()[-2000:]}")
            os.chmod(partial, 0o700)  # whatever the umask: private, as _load expects
            os.replace(partial, target)


def _wait_and_load(process: subprocess.Popen[str], target: Path) -> None:
    """Wait for the build process (which finishes, and leaves its result in the cache,
    even if this process exits first), then load."""
    try:
        start = time.perf_counter()
        _, errors = process.communicate()
        if process.returncode != 0 or not target.exists():
            _state["error"] = errors.strip()[-2000:] or "build failed"
            return
        _state["build_seconds"] = time.perf_counter() - start
        _load(target)
    except (OSError, subprocess.SubprocessError) as error:
        _state["error"] = str(error)
    finally:
        _READY.set()


def _load(target: Path) -> None:
    """Import the built extension and hand it the C loops and settings."""
    from bnkit.kernels import cpu, express, native, outputs

    lib = native.library()
    if lib is None:
        _state["error"] = "no C library"
        return
    unsafe = native.unsafe_reason(target, directory=False)
    if unsafe is not None:  # code someone else could have written: never imported
        _state["error"] = f"not loading {target.name}: {unsafe}"
        return
    try:
        spec = importlib.util.spec_from_file_location(_NAME, target)
        if spec is None or spec.loader is None:
            raise ImportError("no loader")
        extension = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(extension)
    except ImportError as error:
        _state["error"] = f"could not load {target.name}: {error}"
        return
    import torch

    def address(name: str) -> int:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0

    extension.init(
        address("bn_forward_f32"),
        address("bn_forward_f64"),
        address("bn_backward_f32"),
        address("bn_backward_f64"),
        torch.nn.Parameter,
        express._double_backward,
        cpu,
        outputs,
    )
    _state["module"] = extension
    express._FAST = extension.batch_norm


if __name__ == "__main__":  # the build process: python -m bnkit.kernels.fast TARGET CXX
    try:
        _build(Path(sys.argv[1]), sys.argv[2])
    except (RuntimeError, OSError) as failure:
        print(failure, file=sys.stderr)
        sys.exit(1)
