"""Build and load the CPU loops of :mod:`bnkit.kernels.cpu` (``cpu.c``) with the C compiler.

The source is plain C with OpenMP, no Python or torch headers (``cc -O3 -march=native
-fopenmp``), compiled as four objects at once (one per element type) and linked, once:
about 6 s on 2 cores, then loaded with :mod:`ctypes`. The shared
library is cached under ``$BNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/bnkit``, else
``~/.cache/bnkit``, keyed by a hash of the source, the compiler, the flags and the CPU, so a
later process loads it without compiling. Set ``BNKIT_NATIVE=0`` to disable it (bnkit then
uses the portable kernel everywhere). When no compiler is found or the build fails, the
library is unavailable and the portable kernel is used: one :class:`NativeUnavailableWarning`
per process says why (also :func:`load_error`).

The cache is code that this process will run, so it is trusted only when no one else can
write it: a cache directory, or a library in it, owned by another user or writable by
group or others is refused with a warning, and a private directory is used instead. A
build runs under a lock (concurrent processes build once), prints one line to stderr,
and records the library's SHA-256 beside it; a library that does not match its record
(a truncated or damaged file) is rebuilt rather than loaded.

On loading, the library is told the size of the last-level cache: passes that move more
bytes than that write their outputs with streaming stores (:func:`set_stream_bytes`).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
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

__all__ = [
    "FLAGS",
    "NativeUnavailableWarning",
    "build_seconds",
    "cache_dir",
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
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-fno-math-errno",
)

_SOURCE = Path(__file__).with_name("cpu.c")
#: cpu.c's BN_PART values: one object each, compiled in parallel
_PARTS = (1, 2, 3, 4)
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


def _compiler() -> str | None:
    """The C compiler: $CC, else cc or gcc on PATH."""
    for candidate in (os.environ.get("CC"), "cc", "gcc"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _build(compiler: str) -> Path:
    """The library in the cache, compiled first if it is missing or damaged."""
    source = _SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(FLAGS).encode(), _cpu_model().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"bnkit_cpu_{key}.so"
    if _intact(target):
        return target
    # One build at a time per cache entry: the others wait and then find it built.
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    lock = os.open(target.with_name(target.name + ".lock"), flags, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _intact(target):
            _compile(compiler, target)
    finally:
        os.close(lock)
    return target


def _compile(compiler: str, target: Path) -> None:
    """Compile ``cpu.c`` into ``target`` and record its SHA-256 (each file written to a
    temporary name first, then renamed: a reader never sees a partial file)."""
    print(
        f"bnkit: compiling the native CPU kernels with {compiler} into {target.parent} "
        f"(once per machine and compiler; about 10 s)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        # The four instantiations (float, double, bfloat16, float16 data) compile as
        # separate objects at once, then link: the build takes the time of the slowest.
        objects = [Path(tmp) / f"part{part}.o" for part in _PARTS]
        compile_flags = [flag for flag in FLAGS if flag != "-shared"]
        processes = [
            subprocess.Popen(
                [compiler, *compile_flags, f"-DBN_PART={part}", "-c", "-o", str(obj),
                 str(_SOURCE)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for part, obj in zip(_PARTS, objects, strict=True)
        ]  # fmt: skip
        errors = [process.communicate()[1] for process in processes]
        failed = [e.strip() for e, p in zip(errors, processes, strict=True) if p.returncode]
        if failed:
            raise RuntimeError(f"{compiler} failed on {_SOURCE.name}: {failed[0]}")
        result = subprocess.run(
            [compiler, *FLAGS, "-o", str(partial), *map(str, objects)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to link {_SOURCE.name}: {result.stderr.strip()}")
        record = Path(tmp) / "digest"
        record.write_text(_digest(partial) + "\n")
        os.chmod(partial, 0o700)  # whatever the umask: private, as _intact expects
        os.chmod(record, 0o600)
        os.replace(partial, target)
        os.replace(record, target.with_name(target.name + ".sha256"))
    _state["build_seconds"] = time.perf_counter() - start


def library() -> ctypes.CDLL | None:
    """The loaded library (built on first use), or None where it is unavailable."""
    if "library" in _state:
        return _state["library"]  # type: ignore[return-value]
    with _LOCK:
        if "library" in _state:
            return _state["library"]  # type: ignore[return-value]
        lib: ctypes.CDLL | None = None
        try:
            if os.environ.get("BNKIT_NATIVE", "1") == "0":
                raise RuntimeError("disabled by BNKIT_NATIVE=0")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found ($CC, cc, gcc)")
            # torch first: its OpenMP runtime (libgomp.so.1) is the one the library binds to.
            import torch  # noqa: F401

            lib = ctypes.CDLL(str(_build(compiler)))
            for name, argtypes in _SIGNATURES.items():
                for suffix in ("f32", "f64", "bf16", "f16"):
                    # 16-bit data has the plain layer's loops only (no running update)
                    if suffix in ("bf16", "f16") and not hasattr(lib, f"{name}_{suffix}"):
                        continue
                    function = getattr(lib, f"{name}_{suffix}")
                    function.argtypes = argtypes
                    function.restype = _INT if name in _RETURNS_INT else None
            lib.bn_stream_copy.argtypes = [_PTR, _PTR, _I64, _INT]
            lib.bn_stream_copy.restype = None
            lib.bn_set_stream_bytes.argtypes = [_I64]
            lib.bn_set_stream_bytes.restype = None
            lib.bn_get_stream_bytes.argtypes = []
            lib.bn_get_stream_bytes.restype = _I64
            lib.bn_set_stream_bytes(last_level_cache_bytes() or 0)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _state["error"] = str(error)
            lib = None
            if os.environ.get("BNKIT_NATIVE", "1") != "0":  # asked for: nothing to say
                warnings.warn(
                    f"bnkit: the native CPU kernels are unavailable ({error}); the portable "
                    f"kernel runs instead, several times slower on CPU",
                    NativeUnavailableWarning,
                    stacklevel=3,
                )
        _state["library"] = lib
        return lib


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
