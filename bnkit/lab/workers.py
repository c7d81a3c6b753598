"""Run a function in several local processes joined by a gloo process group.

:func:`run_workers` is how the lab trains with synchronized batch norm on one machine:
``nprocs`` processes are started with ``torch.multiprocessing`` (the spawn method), each
calls ``function(rank, world_size, *args)`` inside an initialized gloo process group
(a file store in a temporary directory, so no port is needed) and returns a JSON-ready
value. Every process is joined or killed before the call returns, whatever happened; a
worker that raises or dies makes the call raise :class:`WorkerError`, which says which
worker and how. Workers whose parent process disappears (killed outright) exit by
themselves within a second.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["WorkerError", "run_workers"]


class WorkerError(RuntimeError):
    """A worker process raised, died or ran past its time limit."""


def _exit_with_parent(parent: int) -> None:
    # A parent killed outright (SIGKILL) cannot stop its workers: they stop themselves.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _entry(
    rank: int,
    function: Callable[..., Any],
    world_size: int,
    directory: str,
    parent: int,
    args: Sequence[Any],
) -> None:
    import torch
    import torch.distributed as dist

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size
    )
    # An exception propagates to torch's wrapper, which reports it to the parent; the
    # parent then stops the other workers, so no collective is left waiting.
    result = function(rank, world_size, *args)
    if result is not None:
        path = Path(directory) / f"result-{rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
    # Leave together, then skip the interpreter's teardown: gloo's threads, destroyed in
    # an arbitrary order at exit, can abort the process (SIGABRT) after its work is done.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(
    function: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    nprocs: int = 2,
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``function(rank, nprocs, *args)`` in ``nprocs`` processes of one gloo group.

    Args:
        function: a module-level function (it is pickled by reference); it may return a
            JSON-ready value (None: nothing).
        args: its further arguments; tensors travel through shared memory.
        nprocs: the number of processes (the world size).
        timeout: seconds after which the workers still running are killed.

    Returns:
        What each rank returned, by rank (None where it returned None).

    Raises:
        WorkerError: a worker raised (its traceback is in the message), exited with a
            non-zero status or was killed, or the run exceeded ``timeout``. The other
            workers are terminated first; no process is left behind.
    """
    from torch.multiprocessing.spawn import (
        ProcessExitedException,
        ProcessRaisedException,
        spawn,
    )

    with tempfile.TemporaryDirectory(prefix="bnkit-workers-") as directory:
        context = spawn(  # type: ignore[no-untyped-call]  # untyped in torch
            _entry,
            args=(function, nprocs, directory, os.getpid(), tuple(args)),
            nprocs=nprocs,
            join=False,
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"run_workers: {nprocs} workers of {function.__name__} still running "
                        f"after {timeout:g} s; killed them"
                    )
        except ProcessRaisedException as error:
            raise WorkerError(
                f"run_workers: worker {error.error_index} of {nprocs} "
                f"({function.__name__}) raised:\n{error}"
            ) from None
        except ProcessExitedException as error:
            raise WorkerError(
                f"run_workers: worker {error.error_index} of {nprocs} ({function.__name__}) "
                f"died with exit code {error.exit_code}"
                + (f" (signal {error.signal_name})" if error.signal_name else "")
                + "; the other workers were stopped"
            ) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5)
                if process.is_alive():
                    process.kill()
                process.join()
        results: list[Any] = []
        for rank in range(nprocs):
            path = Path(directory) / f"result-{rank}.json"
            results.append(json.loads(path.read_text()) if path.is_file() else None)
        return results
