"""The experiments on batch norm's disadvantages: a tiny run of all five, every claim rule
both ways on crafted results, the report's sections, groups on the command line, and the
worker processes of synchronized batch norm (results, a dying worker, cleanup)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from bnkit.errors import ConfigError
from bnkit.lab.experiments import DEFAULT, GROUPS, expand_names, get_experiment
from bnkit.lab.workers import WorkerError, run_workers
from tests.lab.conftest import lab_argv, run_cli

pytestmark = pytest.mark.slow  # every test runs the lab's experiments or spawns worker processes

Results = dict[str, Any]
Edit = Callable[[Results], None]
NEW = GROUPS["disadvantages"]


@pytest.fixture(scope="module")
def new_run(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> tuple[Path, str]:
    """One tiny run of the five experiments: (output directory, stdout)."""
    out = tmp_path_factory.mktemp("lab-disadvantages")
    status, stdout, stderr = run_cli(lab_argv(out, tiny_data_dir, "disadvantages"))
    assert status == 0, stderr
    return out, stdout


def saved(new_run: tuple[Path, str], name: str) -> Results:
    results: Results = json.loads((new_run[0] / f"{name}.json").read_text())["results"]
    return results


def test_tiny_run_writes_every_experiment(new_run: tuple[Path, str]) -> None:
    out, stdout = new_run
    assert [line.split()[0] for line in stdout.splitlines()[1 : 1 + len(NEW)]] == list(NEW)
    for name in NEW:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["experiment"] == name
        assert data["claims"]
        assert all(isinstance(claim["holds"], bool) for claim in data["claims"])
        for figure in data["figures"]:
            assert (out / figure["file"]).read_bytes()[:4] == b"\x89PNG"
    for name in GROUPS["paper"]:
        assert not (out / f"{name}.json").exists()
    results = saved(new_run, "batch-size")
    assert set(results["errors"]) == {"bn", "gn", "renorm", "micro", "sync"}
    assert set(results["errors"]["sync"]) == {str(b) for b in results["sync_batch_sizes"]}
    memory = saved(new_run, "memory")
    for network in memory["networks"].values():
        keys = {f"{a}/{k}" for a in ("leaky_relu", "relu") for k in ("none", "torch", "fused")}
        for scope in ("layer", "model", "peak_layer", "peak_model"):
            assert set(network[scope]) == keys
            assert all(value > 0 for value in network[scope].values())


def test_report_has_the_new_sections(new_run: tuple[Path, str]) -> None:
    page = (new_run[0] / "index.html").read_text()
    for key, title in (
        ("memory", "5.1 Disadvantage: more memory"),
        ("small-batches", "5.2 Disadvantage: small and non-i.i.d. mini-batches"),
        ("population-stats", "5.3 Disadvantage: the population statistics at test time"),
    ):
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    for name in NEW:
        assert f'id="{name}"' in page
    assert page.index('id="advantages"') < page.index('id="memory"') < page.index('id="non-iid"')
    # The paper's experiments did not run: their sections say how to run everything.
    assert "<code>bnkit lab</code> with no experiment named runs every one" in page


def test_groups_on_the_command_line() -> None:
    assert expand_names([]) == list(DEFAULT) == expand_names(["all"])
    paper = list(GROUPS["paper"])
    assert expand_names(["all"])[: len(paper)] == paper
    assert expand_names(["non-iid", "paper", "memory"]) == [*paper, "memory", "non-iid"]
    with pytest.raises(ConfigError, match=r"unknown experiment 'nope'.*disadvantages"):
        expand_names(["nope"])


def shift_edit(**values: Any) -> Edit:
    """Set ``training_stats`` / ``adabn`` of every shift (or of ``only``)."""
    only = values.pop("only", None)

    def apply(results: Results) -> None:
        for name, shift in results["shifts"].items():
            if only is None or name == only:
                shift.update(values)

    return apply


def put(*pairs: tuple[str, Any]) -> Edit:
    """Set values by paths of keys joined by ``:``."""

    def apply(results: Results) -> None:
        for path, value in pairs:
            *parents, last = path.split(":")
            node = results
            for key in parents:
                node = node[key]
            node[last] = value

    return apply


def both(*edits: Edit) -> Edit:
    def apply(results: Results) -> None:
        for edit in edits:
            edit(results)

    return apply


def memory_edit(scope_values: dict[str, int], scope: str = "model") -> Edit:
    """Set ``scope`` bytes ``{"activation/kind": bytes}`` in every network."""

    def apply(results: Results) -> None:
        for network in results["networks"].values():
            network[scope].update(scope_values)

    return apply


ERR = "errors"
CASES: list[tuple[str, int, Edit, list[Edit]]] = [
    # memory: BN costs; fused saves; fused <= no BN; ReLU saves less
    (
        "memory",
        0,
        memory_edit({"leaky_relu/torch": 200, "leaky_relu/none": 100}),
        [memory_edit({"leaky_relu/torch": 100}), put(("networks:mlp:model:leaky_relu/torch", 90))],
    ),
    (
        "memory",
        1,
        memory_edit({"leaky_relu/fused": 100, "leaky_relu/torch": 200}),
        [put(("networks:cnn:model:leaky_relu/fused", 180))],
    ),
    (
        "memory",
        2,
        memory_edit({"leaky_relu/fused": 100, "leaky_relu/none": 100}),
        [put(("networks:mlp:model:leaky_relu/fused", 101))],
    ),
    (
        "memory",
        3,
        memory_edit(
            {"relu/fused": 200, "relu/torch": 200, "leaky_relu/fused": 1, "leaky_relu/torch": 2}
        ),
        [put(("networks:cnn:model:relu/fused", 50))],
    ),
    (
        "memory",
        4,
        memory_edit({"leaky_relu/fused": 100, "leaky_relu/torch": 200}, scope="peak_model"),
        [put(("networks:mlp:peak_model:leaky_relu/fused", 180))],
    ),
    # batch-size
    (
        "batch-size",
        0,
        put(*[(f"{ERR}:bn:{b}", 0.1) for b in (32, 16, 8, 4)], (f"{ERR}:bn:2", 0.3)),
        [put((f"{ERR}:bn:2", 0.11)), put((f"{ERR}:bn:2", None))],
    ),
    (
        "batch-size",
        1,
        put(
            (f"{ERR}:bn:32", 0.1),
            (f"{ERR}:gn:32", 0.12),
            (f"{ERR}:bn:2", 0.3),
            (f"{ERR}:gn:2", 0.15),
        ),
        [put((f"{ERR}:gn:2", 0.32)), put((f"{ERR}:gn:32", None))],
    ),
    (
        "batch-size",
        2,
        put((f"{ERR}:gn:2", 0.1), (f"{ERR}:bn:2", 0.3)),
        [put((f"{ERR}:gn:2", 0.3), (f"{ERR}:bn:2", 0.1))],
    ),
    (
        "batch-size",
        3,
        put((f"{ERR}:bn:32", 0.1), (f"{ERR}:gn:32", 0.2)),
        [put((f"{ERR}:bn:32", 0.2), (f"{ERR}:gn:32", 0.1))],
    ),
    (
        "batch-size",
        4,
        put((f"{ERR}:renorm:2", 0.1), (f"{ERR}:bn:2", 0.3)),
        [put((f"{ERR}:renorm:2", 0.4)), put((f"{ERR}:renorm:2", None))],
    ),
    (
        "batch-size",
        5,
        put((f"{ERR}:micro:2", 0.3), (f"{ERR}:bn:32", 0.1)),
        [put((f"{ERR}:micro:2", 0.05))],
    ),
    (
        "batch-size",
        6,
        put((f"{ERR}:sync:2", 0.1), (f"{ERR}:bn:2", 0.3)),
        [put((f"{ERR}:sync:2", 0.4)), put(("sync_batch_sizes", []))],
    ),
    (
        "batch-size",
        7,
        put(
            ("errors_equal_steps:bn:32", 0.1),
            ("errors_equal_steps:bn:8", 0.12),
            ("errors_equal_steps:bn:2", 0.3),
        ),
        [put(("errors_equal_steps:bn:2", 0.11)), put(("errors_equal_steps:bn:2", None))],
    ),
    # non-iid: 2-class batches hurt; renorm better; recovers half
    (
        "non-iid",
        0,
        put(("runs:bn_iid:final_test_accuracy", 0.8), ("runs:bn:final_test_accuracy", 0.6)),
        [put(("runs:bn:final_test_accuracy", 0.79)), put(("runs:bn:final_test_accuracy", None))],
    ),
    (
        "non-iid",
        1,
        put(("runs:renorm:final_test_accuracy", 0.7), ("runs:bn:final_test_accuracy", 0.6)),
        [put(("runs:renorm:final_test_accuracy", 0.5))],
    ),
    (
        "non-iid",
        2,
        put(
            ("runs:bn_iid:final_test_accuracy", 0.8),
            ("runs:bn:final_test_accuracy", 0.6),
            ("runs:renorm:final_test_accuracy", 0.75),
        ),
        [
            put(("runs:renorm:final_test_accuracy", 0.65)),
            put(("runs:bn_iid:final_test_accuracy", None)),
        ],
    ),
    # inference-stats: EMA noisy; EMA lags; EMA 0.01 lags; cumulative lags most; PreciseBN best
    (
        "inference-stats",
        0,
        put(("summary:ema_0.1:spread", 0.02)),
        [put(("summary:ema_0.1:spread", 0.001)), put(("summary", None))],
    ),
    (
        "inference-stats",
        1,
        put(("summary:ema_0.1:lag", 0.01)),
        [put(("summary:ema_0.1:lag", -0.01))],
    ),
    (
        "inference-stats",
        2,
        put(("summary:ema_0.01:lag", 0.01)),
        [put(("summary:ema_0.01:lag", 0.0))],
    ),
    (
        "inference-stats",
        3,
        put(
            ("summary:cumulative:lag", 0.2),
            ("summary:ema_0.1:lag", 0.01),
            ("summary:ema_0.01:lag", 0.02),
        ),
        [put(("summary:cumulative:lag", 0.015))],
    ),
    (
        "inference-stats",
        4,
        put(
            ("summary:precise:final", 0.9),
            ("summary:ema_0.1:final", 0.8),
            ("summary:ema_0.01:final", 0.8),
            ("summary:cumulative:final", 0.8),
        ),
        [put(("summary:ema_0.01:final", 0.95))],
    ),
    # covariate-shift: a shift hurts; AdaBN helps; affine shifts fully recovered
    (
        "covariate-shift",
        0,
        both(put(("clean", 0.9)), shift_edit(training_stats=0.5)),
        [shift_edit(training_stats=0.89, only="noise 0.5")],
    ),
    (
        "covariate-shift",
        1,
        both(shift_edit(training_stats=0.5), shift_edit(adabn=0.85)),
        [shift_edit(adabn=0.4, only="scaled x2")],
    ),
    (
        "covariate-shift",
        2,
        both(put(("clean", 0.9)), shift_edit(adabn=0.89)),
        [shift_edit(adabn=0.8, only="offset +1")],
    ),
]


@pytest.mark.parametrize(
    ("name", "index", "make_true", "make_false"),
    CASES,
    ids=[f"{case[0]}-{case[1]}" for case in CASES],
)
def test_claim_follows_the_measurements(
    new_run: tuple[Path, str], name: str, index: int, make_true: Edit, make_false: list[Edit]
) -> None:
    base = saved(new_run, name)
    results = copy.deepcopy(base)
    make_true(results)
    claim = get_experiment(name).claims(results)[index]
    assert claim.holds is True, claim
    for edit in make_false:
        results = copy.deepcopy(base)
        make_true(results)
        edit(results)
        assert get_experiment(name).claims(results)[index].holds is False


def test_every_claim_is_covered(new_run: tuple[Path, str]) -> None:
    for name in NEW:
        count = len(get_experiment(name).claims(saved(new_run, name)))
        assert {index for case, index, *_ in CASES if case == name} == set(range(count))


# Workers: module-level functions, so that spawned processes can import them.


def _world_info(rank: int, world_size: int, base: int) -> dict[str, int]:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": int(value) + base}


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("worker failure for the test")
    dist.barrier()  # rank 0 waits for a partner that is gone: it must be stopped


def _spawned_children() -> list[int]:
    """Live (non-zombie) child processes of this one started by multiprocessing's spawn."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == os.getpid() and state != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_workers_return_by_rank() -> None:
    results = run_workers(_world_info, (10,), nprocs=2)
    assert results == [
        {"rank": 0, "world": 2, "sum": 13},
        {"rank": 1, "world": 2, "sum": 13},
    ]
    assert _spawned_children() == []


def test_a_raising_worker_is_a_clear_error_and_nothing_is_left() -> None:
    with pytest.raises(WorkerError, match=r"worker 1 of 2 \(_raise_on_rank_1\) raised") as info:
        run_workers(_raise_on_rank_1, nprocs=2, timeout=60)
    assert "worker failure for the test" in str(info.value)
    assert _spawned_children() == []


def test_a_dying_sync_worker_is_a_clear_error_and_nothing_is_left(tiny_data_dir: Path) -> None:
    from bnkit.lab.datasets import load_dataset
    from bnkit.lab.experiments.batch_size import BatchSizeConfig, _run_sync
    from bnkit.lab.training import subsample

    data = subsample(load_dataset("fashion-mnist", data_dir=tiny_data_dir), 16, 8, seed=0)
    config = BatchSizeConfig(batch_sizes=(2,), sync_batch_sizes=(2,), epochs=1)
    with pytest.raises(WorkerError, match=r"worker 1 of 2 \(_sync_worker\) died with exit code 3"):
        _run_sync(config, data, seed=0, fail_rank=1)
    assert _spawned_children() == []
