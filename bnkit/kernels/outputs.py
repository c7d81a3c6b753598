"""Large CPU outputs in memory that is kept and reused, instead of fresh pages each call.

glibc's allocator gives every block larger than 32 MB a mapping of its own and unmaps it
when the block is freed, so each new output of a large layer faults in fresh pages, which
the operating system zeroes (a pass over the memory of its own) before the kernel writes
them: on a 103 MB activation that costs about as much as the normalization itself. A
training loop asks for outputs of the same sizes step after step, so the C loops' outputs
of at least :data:`MIN_BYTES` (y in the forward pass, dx in the backward pass) are views
of anonymous mappings that this module keeps: when the last tensor using a mapping dies,
the next output of the same size reuses it, its pages already mapped (and, where the
system allows, huge). This is what a caching allocator (jemalloc, tcmalloc, CUDA's) does,
for bnkit's outputs only.

A mapping is free when no storage holds it: a tensor made with :func:`torch.frombuffer`
holds a reference to its buffer for as long as its storage lives (views, saved tensors
and ``.grad`` included), so the mapping's reference count tells. Free mappings are
returned to the system when a later request finds them unused for :data:`IDLE_SECONDS`,
or by :func:`release`; ``BNKIT_OUTPUT_POOL=0`` (or :func:`set_enabled`) turns the pool
off. Outputs are plain CPU tensors; unlike torch's own their storage cannot be resized
(``resize_`` beyond their size raises). Under a ``TorchDispatchMode`` (a memory tracker
sees only storages that operators create) outputs come from ``torch.empty_like``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["IDLE_SECONDS", "MIN_BYTES", "empty_like", "enabled", "release", "set_enabled",
           "stats"]  # fmt: skip

#: outputs smaller than this come from torch's allocator (glibc keeps blocks under 32 MB
#: in its heap, where freed memory is reused anyway)
MIN_BYTES = 16 << 20
#: a free mapping unused for this long is unmapped at the next request
IDLE_SECONDS = 10.0

_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_frombuffer = torch.frombuffer
_empty_like = torch.empty_like
_refcount = sys.getrefcount


@dataclass(eq=False)
class _Mapping:
    buffer: mmap.mmap
    nbytes: int
    #: the buffer's reference count with no storage holding it (measured at creation)
    free_count: int = 0
    #: since when a request found it free (None: in use when last seen)
    idle_since: float | None = None


@dataclass
class _Pool:
    mappings: list[_Mapping] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    enabled: bool = os.environ.get("BNKIT_OUTPUT_POOL", "1") != "0"
    requests: int = 0
    reuses: int = 0
    #: whether free mappings can be told from used ones here (None: not checked yet)
    sound: bool | None = None


_POOL = _Pool()


def _references(mapping: _Mapping) -> int:
    """The buffer's reference count, always taken the same way (the baseline is too)."""
    return _refcount(mapping.buffer)


def _is_free(mapping: _Mapping) -> bool:
    """Whether no storage holds the mapping."""
    return _references(mapping) == mapping.free_count


def _new_mapping(nbytes: int) -> _Mapping:
    mapping = _Mapping(
        mmap.mmap(-1, nbytes, flags=_FLAGS) if _FLAGS else mmap.mmap(-1, nbytes), nbytes
    )
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError, AttributeError):  # huge pages: an optimization
            mapping.buffer.madvise(mmap.MADV_HUGEPAGE)
    # no local name may hold the buffer here: the count must be the mapping's alone
    mapping.free_count = _references(mapping)
    return mapping


def _take(nbytes: int, now: float) -> _Mapping:
    """A free mapping of ``nbytes`` (a new one if none is), unmapping the long-idle ones."""
    pool = _POOL
    chosen = None
    kept = []
    for mapping in pool.mappings:
        if not _is_free(mapping):
            mapping.idle_since = None
        elif chosen is None and mapping.nbytes == nbytes:
            chosen = mapping
        elif mapping.idle_since is None:
            mapping.idle_since = now
        elif now - mapping.idle_since > IDLE_SECONDS:
            mapping.buffer.close()
            continue
        kept.append(mapping)
    pool.mappings = kept
    pool.requests += 1
    if chosen is None:
        chosen = _new_mapping(nbytes)
        pool.mappings.append(chosen)
    else:
        pool.reuses += 1
    chosen.idle_since = None
    return chosen


def _holds_its_buffer() -> bool:
    """Whether a tensor made with torch.frombuffer holds a reference to its buffer for as
    long as its storage lives (what tells a free mapping from a used one), checked once."""
    mapping = _new_mapping(1 << 12)
    try:
        view = _frombuffer(mapping.buffer, dtype=torch.uint8)[1:]
        held = _references(mapping) == mapping.free_count + 1
        del view
        return held and _is_free(mapping)
    finally:
        mapping.buffer.close()


def empty_like(x: Tensor, memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
    """``torch.empty_like(x, memory_format=memory_format)`` for a CPU tensor: the same
    shape, dtype and strides, from the pool when it is large."""
    nbytes = x.numel() * x.element_size()
    if nbytes < MIN_BYTES or not _POOL.enabled or _dispatch_modes():
        return _empty_like(x, memory_format=memory_format)
    if _POOL.sound is None:
        _POOL.sound = _holds_its_buffer()
    if not _POOL.sound:  # no way to tell a free mapping: torch's allocator instead
        return _empty_like(x, memory_format=memory_format)
    # the strides torch would give (a meta tensor allocates nothing)
    strides = _empty_like(x, device="meta", memory_format=memory_format).stride()
    with _POOL.lock:
        mapping = _take(nbytes, time.monotonic())
        flat = _frombuffer(mapping.buffer, dtype=x.dtype)
    # A tensor of its own on the mapping's storage, not a view of ``flat``: autograd
    # refuses in-place changes (ReLU(inplace=True), ``out += identity``) to a view made
    # inside a custom Function, and torch's own outputs are not views either.
    output = torch.empty((0,), dtype=x.dtype)
    return output.set_(flat.untyped_storage(), 0, x.shape, strides)


def release() -> int:
    """Unmap every free mapping now; returns the bytes given back to the system."""
    with _POOL.lock:
        free = [mapping for mapping in _POOL.mappings if _is_free(mapping)]
        _POOL.mappings = [mapping for mapping in _POOL.mappings if mapping not in free]
        for mapping in free:
            mapping.buffer.close()
    return sum(mapping.nbytes for mapping in free)


def stats() -> dict[str, int]:
    """Bytes held in use and free, and the requests served and reused so far."""
    with _POOL.lock:
        free = sum(mapping.nbytes for mapping in _POOL.mappings if _is_free(mapping))
        held = sum(mapping.nbytes for mapping in _POOL.mappings)
        return {"in_use_bytes": held - free, "free_bytes": free, "requests": _POOL.requests,
                "reuses": _POOL.reuses}  # fmt: skip


def enabled() -> bool:
    """Whether large outputs come from the pool."""
    return _POOL.enabled


def set_enabled(value: bool) -> bool:
    """Turn the pool on or off (off: free mappings are released); returns the previous
    setting."""
    previous = _POOL.enabled
    _POOL.enabled = bool(value)
    if not value:
        release()
    return previous
