"""The report: what it shows (every section, the worked tables, alt texts, phone-width
layout), what it refuses (figures outside the results directory, results of the wrong
structure), the timings kept out of the results, and the training verdict's rule."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from bnkit.errors import DamagedResultWarning
from bnkit.lab.experiment import Claim, Experiment
from bnkit.lab.experiments import DEFAULT, get_experiment
from bnkit.lab.experiments.ics import views
from bnkit.lab.report import SECTIONS, ReportWarning, figure_path, load_results, render_report
from bnkit.lab.training import TAIL_RISE, tail_rise, verdict
from tests.lab.conftest import lab_argv, run_cli

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def page_of(lab_run: tuple[Path, str, str]) -> str:
    return (lab_run[0] / "index.html").read_text()


def section_html(page: str, key: str) -> str:
    start = page.index(f'<section id="{key}">')
    return page[start : page.index("</section>", start)]


# What the default run covers


@pytest.mark.slow
def test_default_run_covers_every_section(lab_run: tuple[Path, str, str]) -> None:
    out, _, _ = lab_run
    covered: set[str] = set()
    for name in DEFAULT:
        data = json.loads((out / f"{name}.json").read_text())
        covered.add(data["section"])
        covered.update(str(item["section"]) for item in data["claims"] if "section" in item)
        covered.update(str(item["section"]) for item in data["figures"] if "section" in item)
    assert {section.key for section in SECTIONS} <= covered
    page = page_of(lab_run)
    for section in SECTIONS:
        assert "No experiment in this run measured this part" not in section_html(
            page, section.key
        ), section.key
    assert re.search(r"<strong>(\d+) of \1?\d+</strong> claims held", page)


@pytest.mark.slow
def test_training_section_shows_batch_dependence_and_memory(lab_run: tuple[Path, str, str]) -> None:
    training = section_html(page_of(lab_run), "training")
    assert 'id="training-process"' in training
    assert "one fixed training example" in training
    assert "kept for backward" in training or "keeps for the backward pass" in training
    assert training.count("<img ") >= 2  # batch dependence, memory per layer


# Tables, alt texts, phone width


@pytest.mark.slow
def test_worked_batch_of_four_is_an_html_table_matching_the_demo(
    lab_run: tuple[Path, str, str],
) -> None:
    calculation = section_html(page_of(lab_run), "calculation")
    tables = re.findall(r'<table class="numbers">.*?</table>', calculation, flags=re.S)
    assert len(tables) == 2  # bnkit demo's batch, and a trained node's
    demo = tables[0]
    headers = re.findall(r"<th>(.*?)</th>", demo)
    assert headers[:4] == ["example", "o_i", "mu", "sigma"]
    assert any(h.startswith("z_i") for h in headers)
    assert any(h.startswith("gamma * z_i + beta") for h in headers)
    rows = re.findall(r"<tr>(<td>.*?)</tr>", demo)
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    # bnkit demo: o = [2, 5, 3, 6], mu 4, sigma 1.5811, gamma 2, beta 0.5
    assert [row[1] for row in cells] == ["2.0000", "5.0000", "3.0000", "6.0000"]
    assert {row[2] for row in cells} == {"4.0000"}
    assert {row[3] for row in cells} == {"1.5811"}
    assert [row[4] for row in cells] == ["-1.2649", "0.6325", "-0.6325", "1.2649"]
    assert [row[5] for row in cells] == ["-2.0298", "1.7649", "-0.7649", "3.0298"]
    assert [row[6] for row in cells] == [row[5] for row in cells]  # the layer agrees


@pytest.mark.slow
def test_every_image_has_alt_text_that_describes_it(lab_run: tuple[Path, str, str]) -> None:
    images = re.findall(r"<img [^>]*>", page_of(lab_run))
    assert len(images) >= 10
    for image in images:
        alt = re.search(r'alt="([^"]*)"', image)
        assert alt is not None
        text = alt.group(1)
        assert len(text.split()) >= 6, text
        assert not text.endswith(".png")


@pytest.mark.slow
def test_tables_scroll_inside_their_box(lab_run: tuple[Path, str, str]) -> None:
    page = page_of(lab_run)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert re.search(r"\.scroll \{[^}]*overflow-x: auto", page)
    tables = page.count("<table")
    assert tables > 5
    assert page.count('<div class="scroll"><table') == tables
    assert "@media (max-width: 640px)" in page
    for word in ("seed note", "study note", "started from"):
        assert word not in page.lower()


@pytest.mark.slow
def test_ics_section_presents_both_views(lab_run: tuple[Path, str, str]) -> None:
    section = section_html(page_of(lab_run), "covariate-shift")
    assert "Santurkar" in section
    assert "arXiv:1805.11604" in section
    assert "Two views of internal covariate shift" in section
    assert re.search(r"<td>(supported|not supported)</td>", section)
    claims = get_experiment("ics").claims(
        json.loads((lab_run[0] / "ics.json").read_text())["results"]
    )
    assert any("does not reduce internal covariate shift" in c.claim for c in claims)
    assert any("loss landscape smoother" in c.claim for c in claims)


@pytest.mark.slow
def test_views_follow_the_claims(lab_run: tuple[Path, str, str]) -> None:
    results: dict[str, Any] = json.loads((lab_run[0] / "ics.json").read_text())["results"]
    for arm, drift, ics, loss, beta in (("bn", 0.2, 0.5, 0.1, 1.0), ("plain", 1.0, 0.1, 0.9, 9.0)):
        results[arm]["drift_median"] = drift
        results[arm]["santurkar"].update(
            ics_relative_median=ics, loss_range_median=loss, beta_smoothness_median=beta
        )
    assert views(results) == {"2015": True, "2018": True}
    results["bn"]["santurkar"]["loss_range_median"] = 5.0
    assert views(results) == {"2015": True, "2018": False}
    results["bn"]["drift_median"] = 3.0
    assert views(results) == {"2015": False, "2018": False}


# Timings stay out of the results


@pytest.mark.slow
def test_timings_are_kept_out_of_the_results(lab_run: tuple[Path, str, str]) -> None:
    out, _, _ = lab_run
    data = json.loads((out / "test-process.json").read_text())
    assert "timings" not in data["results"]
    assert "seconds" not in (out / "test-process.json").read_text()
    timings = json.loads((out / "test-process.timings.json").read_text())["timings"]
    assert timings["eval_seconds"] > 0
    test = section_html(page_of(lab_run), "test")
    assert "of which BN layers (ms)" in test
    assert "not measured" not in test  # the timings file was read back
    assert data["results"]["folding"]["bn_layers_after"] == 0


@pytest.mark.slow
def test_rerun_writes_identical_results_json(
    tmp_path: Path, lab_run: tuple[Path, str, str], tiny_data_dir: Path
) -> None:
    out, _, _ = lab_run
    status, _, stderr = run_cli(
        lab_argv(tmp_path, tiny_data_dir, "test-process", "training-process", "ics")
    )
    assert status == 0, stderr
    for name in ("test-process", "training-process", "ics"):
        assert (tmp_path / f"{name}.json").read_bytes() == (out / f"{name}.json").read_bytes()


# Report safety


def write_result(directory: Path, name: str, **changes: Any) -> None:
    result: dict[str, Any] = {
        "experiment": name,
        "title": name,
        "section": "other-section",
        "dataset": "mnist1d",
        "config": {"mode": "quick"},
        "results": {},
        "claims": [{"claim": "c", "anchor": "a", "measured": "m", "holds": True}],
        "figures": [],
    }
    result.update(changes)
    if "results" not in changes:
        result["results"] = {}
    (directory / f"{name}.json").write_text(json.dumps(result))


def test_figures_outside_the_results_directory_are_never_embedded(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    secret = tmp_path / "x.png"
    secret.write_bytes(PNG + b"SECRET-OUTSIDE")
    (results / "link.png").symlink_to(secret)
    (results / "fake.png").write_text("not an image")
    (results / "good.png").write_bytes(PNG + b"GOOD-INSIDE")
    write_result(
        results,
        "probe",
        figures=[
            {"file": "link.png", "caption": "a link leading out"},
            {"file": "fake.png", "caption": "not a PNG"},
            {"file": "good.png", "caption": "fine"},
        ],
    )
    for name, file in (("absolute", "/etc/hostname"), ("parent", "../x.png")):
        write_result(results, name, figures=[{"file": file, "caption": "outside"}])
    with pytest.warns((ReportWarning, DamagedResultWarning)) as caught:
        render_report(results)
    messages = " ".join(str(w.message) for w in caught)
    for name in ("/etc/hostname", "../x.png", "link.png", "fake.png"):
        assert name in messages
    assert {type(w.message) for w in caught} == {ReportWarning, DamagedResultWarning}
    page = (results / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1
    assert base64.b64encode(PNG + b"GOOD-INSIDE").decode() in page
    assert base64.b64encode(PNG + b"SECRET-OUTSIDE").decode() not in page
    assert page.count("outside the results directory") == 1  # the link
    assert "is not a PNG file" in page
    assert "1 of 1" in page  # the results naming files outside were skipped whole
    for name in ("absolute", "parent"):
        assert f'id="{name}"' not in page


def test_figure_path_accepts_only_files_inside(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "out.png").symlink_to("/etc/hostname")
    assert figure_path(tmp_path, "a.png") == tmp_path / "a.png"
    for file in ("/etc/hostname", "../a.png", "sub/../../a.png", "out.png", "", "a\0.png"):
        assert figure_path(tmp_path, file) is None, file


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"claims": "x"}, "'claims' is a string"),
        ({"figures": ["a.png"]}, "figures[0] is a string"),
        ({"figures": {"file": "a.png"}}, "'figures' is an object"),
        ({"claims": [["not", "a", "mapping"]]}, "claims[0] is an array"),
        ({"claims": [{"claim": "c", "anchor": "a", "measured": "m", "holds": "yes"}]}, "'holds'"),
        ({"results": [1, 2]}, "'results' is an array"),
        ({"config": "quick"}, "'config' is a string"),
        ({"title": 3}, "'title' is a number"),
    ],
)
def test_results_of_the_wrong_structure_are_skipped(
    tmp_path: Path, changes: dict[str, Any], problem: str
) -> None:
    write_result(tmp_path, "broken", **changes)
    write_result(tmp_path, "fine")
    with pytest.warns(DamagedResultWarning, match=re.escape(problem)):
        assert [r["experiment"] for r in load_results(tmp_path)] == ["fine"]
    status, stdout, stderr = run_cli(["report", str(tmp_path)])
    assert status == 0
    assert "broken.json" in stderr  # the command says which file it left out
    assert "1 experiment" in stdout
    page = (tmp_path / "index.html").read_text()
    assert "1 of 1" in page


@pytest.mark.slow
def test_known_experiment_with_bad_results_still_renders(
    tmp_path: Path, lab_run: tuple[Path, str, str]
) -> None:
    data = json.loads((lab_run[0] / "ics.json").read_text())
    data["results"] = {"unexpected": True}
    (tmp_path / "ics.json").write_text(json.dumps(data))
    with pytest.warns(ReportWarning):
        render_report(tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert 'id="ics"' in page


# The training verdict


def test_tail_rise_and_verdict_on_synthetic_curves() -> None:
    steps = list(range(0, 1001, 50))
    rising = [0.1 + 0.0008 * s for s in steps]  # +16 points over the last 200 steps
    flat = [min(0.9, 0.1 + 0.004 * s) for s in steps]  # plateau long before the end
    assert tail_rise(steps, rising) == pytest.approx(0.16, abs=1e-9)
    assert tail_rise(steps, flat) == pytest.approx(0.0, abs=1e-9)
    assert tail_rise([0, 1], [0.1, 0.2]) is None
    noisy = [v + (0.004 if i % 2 else -0.004) for i, v in enumerate(flat)]
    assert abs(tail_rise(steps, noisy) or 0.0) < TAIL_RISE

    text = verdict({"BN": {"steps": steps, "test_accuracy": rising}})
    assert text is not None
    assert text.startswith("too short to decide")
    assert "BN +16.0" in text
    text = verdict({"BN": {"steps": steps, "test_accuracy": flat}})
    assert text is not None
    assert text.startswith("trained to a plateau")
    diverged = {"steps": steps[:3], "test_accuracy": rising[:3], "diverged_at": 120}
    assert verdict({"x": diverged}) is None


def test_failed_claims_carry_the_verdict_held_ones_do_not() -> None:
    steps = list(range(0, 101, 10))
    curve = {"steps": steps, "test_accuracy": [0.01 * s for s in steps]}
    experiment = Experiment(
        name="t",
        title="t",
        section="other",
        description="",
        quick=None,
        full=None,
        step_fields=(),
        run=lambda config, context: {},
        claims=lambda results: [
            Claim("a", "b", "c", holds=True),
            Claim("a", "b", "c", holds=False),
            Claim("a", "b", "c", holds=False, training="its own"),
        ],
        plot=lambda results, out, prefix: [],
        headline=lambda results: "",
        curves=lambda results: {"run": curve},
    )
    held, failed, own = experiment.decided_claims({})
    assert held.training is None
    assert failed.training is not None
    assert failed.training.startswith("too short to decide")
    assert failed.to_json()["training"] == failed.training
    assert own.training == "its own"


@pytest.mark.slow
def test_saved_failed_claims_say_why(lab_run: tuple[Path, str, str]) -> None:
    out, _, _ = lab_run
    for name in DEFAULT:
        experiment = get_experiment(name)
        data = json.loads((out / f"{name}.json").read_text())
        for claim in data["claims"]:
            if "training" in claim:
                assert experiment.curves is not None
                assert not claim["holds"]
                assert claim["training"].startswith(("too short", "trained to")), claim


@pytest.mark.slow
def test_batch_size_claims_judge_only_the_runs_they_compare(
    lab_run: tuple[Path, str, str],
) -> None:
    results: dict[str, Any] = json.loads((lab_run[0] / "batch-size.json").read_text())["results"]
    steps = list(range(0, 101, 10))
    flat = {"steps": steps, "test_accuracy": [0.5] * len(steps), "diverged_at": None}
    rising = {"steps": steps, "test_accuracy": [0.01 * s for s in steps], "diverged_at": None}
    for arm in results["runs"]:
        for batch in results["runs"][arm]:
            results["runs"][arm][batch] = rising
    results["runs"]["gn"]["2"] = results["runs"]["bn"]["2"] = flat
    results["errors"]["gn"]["2"], results["errors"]["bn"]["2"] = 0.4, 0.3  # GN does not win
    claim = get_experiment("batch-size").claims(results)[2]
    assert not claim.holds
    assert claim.training is not None
    assert claim.training.startswith("trained to a plateau")
    results["runs"]["gn"]["2"] = rising
    claim = get_experiment("batch-size").claims(results)[2]
    assert claim.training is not None
    assert claim.training.startswith("too short to decide: 1 of 2 runs")
    assert "GroupNorm at batch 2" in claim.training
