"""Build and load bnkit's native CPU code: one torch extension holding ``cpu.c`` (the C
loops of :mod:`bnkit.kernels.cpu`) and ``fast.cpp`` (the express path's native autograd
node, :mod:`bnkit.kernels.express`).

:func:`torch.utils.cpp_extension.load` builds it on first use, with ninja: it compiles
against the installed torch's headers, links its libraries, and holds a lock in the build
directory so that concurrent processes build once. A build at install time was the other
choice, but it needs torch inside pip's isolated build environment, and from PyPI that
is a CUDA build of several GB. The build prints one line to stderr and takes about a
minute on 2 cores (the two sources compile in parallel); ``bnkit build`` does it ahead of
time. The compiler is ``$CXX`` (else ``c++``).

The extension is kept under ``$BNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/bnkit``, else
``~/.cache/bnkit``, in a directory named by a hash of the sources, the flags, the compiler,
the CPU (``-march=native``), torch and Python, so a later process imports it without a
build and any change builds afresh. The cache is code that this process will run, so it
is trusted only when no one else can write it: a cache directory, or a library in it,
owned by another user or writable by group or others is refused with a warning, and a
private directory is used instead. Each build records the library's SHA-256 beside it; a
library that does not match its record (a truncated or damaged file) is rebuilt, not
imported.

Set ``BNKIT_NATIVE=0`` to turn it off (bnkit then uses the portable kernel everywhere).
When it cannot be built or loaded, the portable kernel runs: one
:class:`NativeUnavailableWarning` per process says why (also :func:`load_error`).

On loading, the library is told the size of the last-level cache: passes that move more
bytes than that write their outputs with streaming stores (:func:`set_stream_bytes`).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

__all__ = [
    "FLAGS",
    "NativeUnavailableWarning",
    "build_seconds",
    "cache_dir",
    "extension",
    "last_level_cache_bytes",
    "library",
    "load_error",
    "set_stream_bytes",
    "stream_bytes",
]

#: Compiler flags. -ffp-contract=off: the fused relu recomputes its pre-activation in the
#: backward pass and must round it exactly as the forward pass did.
FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-std=c++20",
    "-w",
)

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu.c", "fast.cpp"))
_LOCK = threading.Lock()
_state: dict[str, object] = {}

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_INT = ctypes.c_int
#: name -> argument types (the same for the _f32 and _f64 variants)
_SIGNATURES: dict[str, list[type]] = {
    "bn_stats_ncl": [_PTR, _I64, _I64, _I64, *[_PTR] * 3, _INT],
    "bn_stats_nc": [_PTR, _I64, _I64, *[_PTR] * 3, _INT],
    "bn_affine_ncl": [_PTR, _PTR, _I64, _I64, _I64, *[_PTR] * 3, _INT, _INT],
    "bn_affine_nc": [_PTR, _PTR, _I64, _I64, *[_PTR] * 3, _INT, _INT],
    "bn_backward_reduce_ncl": [_PTR, _PTR, _I64, _I64, _I64, *[_PTR] * 6, _INT],
    "bn_backward_reduce_nc": [_PTR, _PTR, _I64, _I64, *[_PTR] * 6, _INT],
    "bn_backward_input_ncl": [_PTR, _PTR, _PTR, _I64, _I64, _I64, *[_PTR] * 6, _INT],
    "bn_backward_input_nc": [_PTR, _PTR, _PTR, _I64, _I64, *[_PTR] * 6, _INT],
    "bn_update_running": [
        *[_PTR] * 3,
        _I64,
        ctypes.c_double,
        _PTR,
        _PTR,
        _INT,
        ctypes.c_double,
        _PTR,
        _INT,
        _INT,
    ],
    # kind, x, y, R, C, L, w, bias, eps, training, saved, rmean, rvar, momentum, tracked,
    # unbiased, skip_nonfinite, relu, nt
    "bn_forward": [
        _INT,
        *[_PTR] * 2,
        *[_I64] * 3,
        *[_PTR] * 2,
        ctypes.c_double,
        _INT,
        *[_PTR] * 3,
        ctypes.c_double,
        _PTR,
        *[_INT] * 4,
    ],
    # kind, g, x, dx, R, C, L, saved, w, dw, db, training, relu, nt
    "bn_backward": [_INT, *[_PTR] * 3, *[_I64] * 3, *[_PTR] * 4, *[_INT] * 3],
}
#: The functions that return whether a batch was recorded (the others return nothing).
_RETURNS_INT = ("bn_update_running", "bn_forward")


class NativeUnavailableWarning(RuntimeWarning):
    """The native CPU loops cannot be used in this process; the portable kernel (several
    times slower on CPU) runs instead."""


def _configured_cache_dir() -> Path:
    explicit = os.environ.get("BNKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnkit"


def unsafe_reason(path: Path, *, directory: bool) -> str | None:
    """Why code kept at ``path`` could have been written by someone else (None: it could
    not): a symbolic link, another owner, or write permission for group or others."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return f"cannot inspect {path}: {error.strerror}"
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        return f"{path} is not a {'directory' if directory else 'regular file'}"
    if info.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def cache_dir() -> Path:
    """Where the compiled code is kept: ``$BNKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/bnkit``, else ``~/.cache/bnkit``, created private (mode 700); if
    that directory is not safe (:func:`unsafe_reason`), a private temporary one, with a
    warning."""
    cached = _state.get("cache_dir")
    if isinstance(cached, Path):
        return cached
    path = _configured_cache_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        reason = unsafe_reason(path, directory=True)
    except OSError as error:
        reason = f"cannot create {path}: {error.strerror}"
    if reason is not None:
        fallback = Path(tempfile.mkdtemp(prefix="bnkit-cache-"))
        warnings.warn(
            f"bnkit: not using the cache directory for compiled code: {reason}; compiled "
            f"code could be replaced by another user. Using {fallback} for this process "
            f"(set BNKIT_CACHE_DIR to a directory only you can write)",
            NativeUnavailableWarning,
            stacklevel=2,
        )
        path = fallback
    _state["cache_dir"] = path
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether ``target`` is a safe, complete build: a private regular file whose SHA-256
    matches the record written when it was built."""
    record = target.with_name(target.name + ".sha256")
    if unsafe_reason(target, directory=False) or unsafe_reason(record, directory=False):
        return False
    try:
        return record.read_text().strip() == _digest(target)
    except OSError:
        return False


def _cpu_model() -> str:
    """The CPU's model name (part of the cache key: -march=native code is CPU specific)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _name() -> str:
    """The extension's name: a hash of everything its build depends on."""
    import torch

    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    parts = [*(source.read_bytes() for source in _SOURCES)]
    parts += [s.encode() for s in (" ".join(FLAGS), compiler, version, _cpu_model())]
    parts += [s.encode() for s in (torch.__version__, str(Path(torch.__file__)), sys.version)]
    return "bnkit_native_" + hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _ninja_on_path() -> None:
    """Put the ``ninja`` Python package's binary on PATH when none is there (torch's
    builder runs ``ninja`` from PATH, and a virtual environment's is not on it unless the
    environment is activated)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _build(name: str, directory: Path) -> None:
    """Compile the extension into ``directory`` (under torch's lock there) and record the
    library's SHA-256."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    print(
        f"bnkit: compiling the native CPU kernels with {compiler} into {directory} (once "
        f"per machine, compiler and torch version; about a minute on 2 cores; `bnkit build` "
        f"does it ahead of time)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    _ninja_on_path()
    cpp_extension.load(
        name=name,
        sources=[str(source) for source in _SOURCES],
        extra_cflags=list(FLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )
    target = directory / f"{name}.so"
    os.chmod(target, 0o700)  # whatever the umask: private, as _intact expects
    record = Path(tempfile.mkstemp(dir=directory)[1])
    record.write_text(_digest(target) + "\n")
    os.replace(record, target.with_name(target.name + ".sha256"))
    _state["build_seconds"] = time.perf_counter() - start


def _import(name: str, target: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, target)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {target}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load() -> tuple[ModuleType, ctypes.CDLL]:
    """The extension, built first if it is missing or damaged, and its C functions."""
    if os.environ.get("BNKIT_NATIVE", "1") == "0":
        raise RuntimeError("disabled by BNKIT_NATIVE=0")
    # torch first: its OpenMP runtime (libgomp.so.1) is the one the library binds to.
    import torch  # noqa: F401

    name = _name()
    directory = cache_dir() / name
    directory.mkdir(mode=0o700, exist_ok=True)
    reason = unsafe_reason(directory, directory=True)
    if reason is not None:
        raise RuntimeError(f"not building in {directory}: {reason}")
    target = directory / f"{name}.so"
    if not _intact(target):
        # Recorded but not matching: damaged since its build, so built again. Unrecorded:
        # a build that did not finish, or one finishing in another process; torch's
        # builder (its lock, and ninja's log of what completed) knows which.
        if target.with_name(target.name + ".sha256").exists():
            target.unlink(missing_ok=True)
        _build(name, directory)
    reason = unsafe_reason(target, directory=False)
    if reason is not None:
        raise RuntimeError(f"not loading {target.name}: {reason}")
    module = _import(name, target)
    lib = ctypes.CDLL(str(target))
    for function_name, argtypes in _SIGNATURES.items():
        for suffix in ("f32", "f64", "bf16", "f16"):
            # 16-bit data has the plain layer's loops only (no running update)
            if suffix in ("bf16", "f16") and not hasattr(lib, f"{function_name}_{suffix}"):
                continue
            function = getattr(lib, f"{function_name}_{suffix}")
            function.argtypes = argtypes
            function.restype = _INT if function_name in _RETURNS_INT else None
    lib.bn_stream_copy.argtypes = [_PTR, _PTR, _I64, _INT]
    lib.bn_stream_copy.restype = None
    lib.bn_set_stream_bytes.argtypes = [_I64]
    lib.bn_set_stream_bytes.restype = None
    lib.bn_get_stream_bytes.argtypes = []
    lib.bn_get_stream_bytes.restype = _I64
    lib.bn_set_stream_bytes(last_level_cache_bytes() or 0)
    return module, lib


def _loaded() -> tuple[ModuleType, ctypes.CDLL] | None:
    """Load once per process; on failure, warn once and remember why."""
    if "loaded" in _state:
        return _state["loaded"]  # type: ignore[return-value]
    with _LOCK:
        if "loaded" in _state:
            return _state["loaded"]  # type: ignore[return-value]
        loaded: tuple[ModuleType, ctypes.CDLL] | None = None
        try:
            loaded = _load()
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
            message = str(error).strip()
            _state["error"] = message if len(message) < 2000 else "..." + message[-2000:]
            if os.environ.get("BNKIT_NATIVE", "1") != "0":  # asked for: nothing to say
                warnings.warn(
                    f"bnkit: the native CPU kernels are unavailable ({_state['error']}); "
                    f"the portable kernel runs instead, several times slower on CPU",
                    NativeUnavailableWarning,
                    stacklevel=4,
                )
        _state["loaded"] = loaded
        return loaded


def library() -> ctypes.CDLL | None:
    """The C loops (built on first use), or None where they are unavailable."""
    loaded = _loaded()
    return None if loaded is None else loaded[1]


def extension() -> ModuleType | None:
    """The extension module (``fast.cpp``'s functions), or None where unavailable."""
    loaded = _loaded()
    return None if loaded is None else loaded[0]


def load_error() -> str | None:
    """Why :func:`library` returned None (None when it loaded or was not tried yet)."""
    error = _state.get("error")
    return None if error is None else str(error)


def build_seconds() -> float | None:
    """Seconds this process spent compiling (None: loaded from the cache, or not built)."""
    value = _state.get("build_seconds")
    return None if value is None else float(value)  # type: ignore[arg-type]


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of the CPU's last-level cache from Linux's description of the first CPU's
    caches (``index*/level`` and ``index*/size``), or None where it is not known."""
    best: tuple[int, int] | None = None
    for index in caches.glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if not digits.isdigit():
            continue
        if best is None or level > best[0]:
            best = (level, int(digits) * scale)
    return None if best is None else best[1]


def stream_bytes() -> int:
    """From how many bytes moved a pass writes its output with streaming stores (which
    bypass the cache); 0: never, or no library. Set at load to the last-level cache's
    size."""
    lib = library()
    return 0 if lib is None else int(lib.bn_get_stream_bytes())


def set_stream_bytes(nbytes: int) -> int:
    """Set :func:`stream_bytes` (0: never stream) and return the previous value.

    Streaming changes no value, only how outputs reach memory: a pass moving at least
    ``nbytes`` (inputs read plus the output written) writes whole cache lines of its
    output with non-temporal stores, which skip the read an ordinary store makes of a
    line not yet cached. That saves a third of the traffic of a normalization on a
    tensor larger than the cache, and costs time on one that fits.
    """
    lib = library()
    if lib is None:
        return 0
    previous = int(lib.bn_get_stream_bytes())
    lib.bn_set_stream_bytes(max(0, int(nbytes)))
    return previous
