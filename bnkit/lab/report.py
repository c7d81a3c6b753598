"""The lab's HTML report, rendered from the saved results alone.

:func:`render_report` reads every ``<experiment>.json`` in a directory and writes
``index.html``: one self-contained file (the PNGs are embedded, the CSS is inline, there
is no script) that tells the story of batch normalization in order, :data:`SECTIONS`:
internal covariate shift (the 2015 paper's view and Santurkar et al.'s), the calculation
(Z-transform, gamma and beta), the training process, the test process, advantages and
disadvantages. Each section shows its figures, its tables and a table of its claims (the
claim, the published figure it echoes, what this run measured, whether it held); the
page opens with a summary of all claims.

An experiment names its section; a figure, table or claim may name another one. Results
of an experiment the registry does not know, or with a section not in :data:`SECTIONS`,
still appear, in a final section.

The report trusts nothing in the results directory: a figure is embedded only if it is a
PNG file inside the directory (a link leading out, or a file that is not a PNG, is
skipped with a :class:`ReportWarning`; a figure named with a directory, like
``/etc/hostname`` or ``../x.png``, makes the whole result unusable), and a results file
with the wrong structure (claims that are not a list of objects, say) is left out with a
warning instead of stopping the report (:func:`bnkit.lab.storage.read_result`).
"""

from __future__ import annotations

import base64
import html
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnkit.lab.experiment import TIMINGS_SUFFIX
from bnkit.lab.storage import read_json, read_result, write_text_atomic

__all__ = [
    "SECTIONS",
    "ReportWarning",
    "Section",
    "load_results",
    "render_html",
    "render_report",
]


class ReportWarning(UserWarning):
    """Something in the results directory the report left out, and why."""


@dataclass(frozen=True)
class Section:
    """A part of the report.

    Args:
        key: what experiments, figures and claims name to land here.
        title: the heading.
        text: the introduction, trusted HTML (paragraphs).
    """

    key: str
    title: str
    text: str


#: The report's sections, in the order of the story. Append to add one.
SECTIONS: list[Section] = [
    Section(
        "covariate-shift",
        "1. Internal covariate shift",
        "<p>Ioffe &amp; Szegedy (2015, <em>Batch Normalization: Accelerating Deep Network "
        "Training by Reducing Internal Covariate Shift</em>, arXiv:1502.03167) introduced "
        "batch normalization against <em>internal covariate shift</em>: the distribution of "
        "each layer's input changes at every training step, because the layers before it "
        "keep changing, so each layer chases a moving target. (Not the same thing as "
        "<em>covariate shift</em>, where the test data's input distribution differs from the "
        "training data's.) Their Figure 1 shows it in a small sigmoid network: without batch "
        "norm the 15th, 50th and 85th percentiles of a sigmoid's input drift during "
        "training; with it they stay put, and the network learns faster.</p>"
        "<p>Santurkar, Tsipras, Ilyas &amp; Madry (2018, <em>How Does Batch Normalization "
        "Help Optimization?</em>, arXiv:1805.11604) measured it differently: a layer's "
        "internal covariate shift is how much its gradient changes when the layers before "
        "it take their update step (||G &minus; G'||). By that measure batch norm does not "
        "reduce it, and they argue that batch norm helps because it makes the loss "
        "landscape smoother: the loss and its gradient change less along the direction of "
        "a step, so larger steps are safe. This section measures both views on the same "
        "networks, and says which the numbers support here.</p>",
    ),
    Section(
        "calculation",
        "2. The calculation: Z-transform, gamma and beta",
        "<p>For one node <em>n</em> and a mini-batch d<sub>1</sub>..d<sub>m</sub>, take the "
        "node's outputs o<sub>1</sub>..o<sub>m</sub>, their mean &mu; and standard deviation "
        "&sigma;, and Z-transform them: z<sub>i</sub> = (o<sub>i</sub> &minus; &mu;) / "
        "&radic;(&sigma;<sup>2</sup> + &epsilon;). Subtracting the mean removes the bias of "
        "the layer before, so a learned shift &beta; takes its place; a learned scale "
        "&gamma; restores what the network may need: y<sub>i</sub> = &gamma; z<sub>i</sub> + "
        "&beta; (Ioffe &amp; Szegedy 2015, Algorithm 1). Every node has its own &gamma; and "
        "&beta;. The tables below work through a mini-batch of four by hand, the example "
        "<code>bnkit demo</code> prints, and the same for a node of a trained network, "
        "beside what the layer computed.</p>",
    ),
    Section(
        "training",
        "3. The training process",
        "<p>In training, each node's outputs for the whole mini-batch are kept to compute "
        "&mu; and &sigma;, normalized, and only then propagated forward: the normalization "
        "uses the mini-batch's own statistics. So an example's normalized value, and the "
        "gradient that flows back to it, depend on the other examples of its mini-batch "
        "(the gradient flows through &mu; and &sigma; to every example of the batch), and "
        "training keeps more tensors for the backward pass than the same network without "
        "batch norm: more computation and more memory.</p>",
    ),
    Section(
        "test",
        "4. The test process",
        "<p>At test time the mini-batch is usually a single example, whose mean and standard "
        "deviation mean nothing. The population statistics gathered from the training data "
        "(the mean of the batch means, the mean of the batch variances, or a moving average "
        "of them) are used instead, so the network becomes one fixed function of its input "
        "(Ioffe &amp; Szegedy 2015, Section 3.1 and Algorithm 2). Each batch norm layer is "
        "then a fixed affine map per feature, which can be folded into the linear layer "
        "before it: the folded network computes the same function with no batch norm layer "
        "left to run.</p>",
    ),
    Section(
        "advantages",
        "5. Advantages and disadvantages",
        "<p>Advantages: a regularization effect, and a large initial learning rate still "
        "trains, so training is faster (Ioffe &amp; Szegedy 2015, Sections 3.4 and 4.2). "
        "Disadvantages: more memory, batch norm is hard to apply when the mini-batch is small "
        "or not an independent draw, and the population statistics used at test time can be "
        "wrong. The sections below measure each disadvantage and the remedies proposed "
        "since.</p>",
    ),
    Section(
        "memory",
        "5.1 Disadvantage: more memory",
        "<p>In training, a batch norm layer keeps its input for the backward pass, and the "
        "activation after it keeps another tensor of the same size. Fusing the two and "
        "keeping only the output (In-Place ABN, Rota Bul&ograve; et al. 2018, "
        "arXiv:1712.02616) removes that cost when the activation can be inverted.</p>",
    ),
    Section(
        "small-batches",
        "5.2 Disadvantage: small and non-i.i.d. mini-batches",
        "<p>The batch statistics are an estimate of the population's from the mini-batch; "
        "with a few examples, or examples that are not independent draws (two classes per "
        "batch), the estimate is poor, and a network trained on it meets different "
        "statistics at test time. Remedies: normalize without the batch (GroupNorm, Wu &amp; "
        "He 2018, arXiv:1803.08494), correct toward the population statistics (batch "
        "renormalization, Ioffe 2017, arXiv:1702.03275), normalize small groups of a large "
        "batch (ghost batch norm, Hoffer et al. 2017, arXiv:1705.08741), or gather the "
        "statistics over more examples (synchronized batch norm across processes, Peng et "
        "al. 2018).</p>",
    ),
    Section(
        "population-stats",
        "5.3 Disadvantage: the population statistics at test time",
        "<p>The statistics used at test time are gathered during training, from weights that "
        "kept changing, and from the training distribution. PreciseBN recomputes them for "
        "the final weights (Wu &amp; Johnson 2021, arXiv:2105.07576); AdaBN recomputes them on "
        "the new distribution's data (Li et al. 2016, arXiv:1603.04779).</p>",
    ),
]

_OTHER = Section("other", "Other experiments", "")

_CSS = """
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2731; background: #f6f7f9; margin: 0; overflow-wrap: break-word; }
main { max-width: 1060px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin-top: 40px; border-bottom: 2px solid #00798c; padding-bottom: 4px; }
h3 { font-size: 17px; margin: 28px 0 6px; }
p.meta, .meta { color: #5c6773; font-size: 13px; }
code { overflow-wrap: anywhere; }
nav ul { columns: 2; font-size: 14px; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; border-radius: 4px; }
figcaption { color: #5c6773; font-size: 13px; margin-top: 4px; }
.scroll { overflow-x: auto; max-width: 100%; margin: 10px 0 18px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
table.numbers { width: auto; font-variant-numeric: tabular-nums; }
table.numbers td { text-align: right; white-space: nowrap; }
caption { text-align: left; color: #5c6773; font-size: 13px; padding: 4px 0; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 6px 8px; text-align: left;
         vertical-align: top; }
th { background: #eef3f5; font-weight: 600; }
td.held, td.failed { font-weight: 600; white-space: nowrap; }
td.held { color: #1b7f3b; }
td.failed { color: #b3261e; }
.score { font-size: 17px; }
details { margin: 6px 0 14px; font-size: 13px; }
pre { background: #f3f4f6; padding: 8px 10px; overflow-x: auto; font-size: 12px; }
.missing { color: #b3261e; }
@media (max-width: 640px) {
  main { padding: 12px 12px 40px; }
  nav ul { columns: 1; padding-left: 18px; }
  h1 { font-size: 22px; }
}
"""

_PNG = b"\x89PNG\r\n\x1a\n"


def _warn(message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)


def load_results(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every usable lab result (see :func:`bnkit.lab.storage.read_result`) in ``directory``,
    in the registry's order, unknown experiments last by name.

    A file that is not a usable result is left out with a warning (by
    :func:`~bnkit.lab.storage.read_result`). A result's ``<experiment>.timings.json`` (the
    measurements that vary from run to run), if there, is attached as ``"volatile"``.
    """
    from bnkit.lab.experiments import experiment_names

    found = []
    for path in sorted(Path(directory).glob("*.json")):
        if path.name.endswith(TIMINGS_SUFFIX):
            continue
        data = read_result(path)
        if data is None:
            continue
        volatile = read_json(path.with_name(f"{data['experiment']}{TIMINGS_SUFFIX}"))
        if volatile is not None:
            data["volatile"] = volatile
        found.append(data)
    order = {name: index for index, name in enumerate(experiment_names())}
    found.sort(key=lambda d: (order.get(d["experiment"], len(order)), d["experiment"]))
    return found


def _claim_section(item: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    return str(item.get("section") or result.get("section") or _OTHER.key)


def figure_path(directory: Path, file: str) -> Path | None:
    """``directory / file`` if that names a file inside ``directory`` (no absolute path,
    no ``..``, no link leading out), else None.

    Example:
        >>> figure_path(Path("out"), "../x.png") is None, figure_path(Path("out"), "/etc/hostname")
        (True, None)
    """
    if not file or "\x00" in file:
        return None
    relative = Path(file)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    path = directory / relative
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):
        return None
    return path if inside else None


def _image(directory: Path, file: str, alt: str) -> str:
    path = figure_path(directory, file)
    if path is None:
        _warn(f"bnkit report: figure {file!r} is outside the results directory; not embedded")
        return (
            f'<p class="missing">Figure {html.escape(file)} is outside the results directory; '
            "not embedded.</p>"
        )
    try:
        raw = path.read_bytes()
    except OSError:
        return f'<p class="missing">Figure {html.escape(file)} is missing.</p>'
    if not raw.startswith(_PNG):
        _warn(f"bnkit report: figure {file!r} is not a PNG file; not embedded")
        return f'<p class="missing">Figure {html.escape(file)} is not a PNG file.</p>'
    data = base64.b64encode(raw).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _scroll(table: str) -> str:
    return f'<div class="scroll">{table}</div>'


def _claims_table(claims: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for claim in claims:
        held = bool(claim.get("holds"))
        training = claim.get("training")
        note = (
            f'<br><span class="meta">Training: {html.escape(str(training))}.</span>'
            if training
            else ""
        )
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(claim.get('claim', '')))}</td>"
            f"<td>{html.escape(str(claim.get('anchor', '')))}</td>"
            f"<td>{html.escape(str(claim.get('measured', '')))}{note}</td>"
            f'<td class="{"held" if held else "failed"}">'
            f"{'&#10004; held' if held else '&#10008; did not hold'}</td>"
            "</tr>"
        )
    if not rows:
        return ""
    return _scroll(
        "<table><thead><tr><th>Claim</th><th>Published anchor</th><th>Measured here</th>"
        "<th>Held?</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _table_html(table: Any) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in table.rows
    )
    kind = "numbers" if getattr(table, "numbers", True) else "text"
    return _scroll(
        f'<table class="{kind}"><caption>{html.escape(table.caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _tables(result: Mapping[str, Any]) -> list[Any]:
    """The experiment's tables, from its results (and timings); none if it is unknown or
    its results cannot make them."""
    from bnkit.lab.experiments import CATALOG, get_experiment

    if result["experiment"] not in CATALOG:
        return []
    experiment = get_experiment(result["experiment"])
    if experiment.tables is None:
        return []
    merged = {**result.get("results", {}), **result.get("volatile", {})}
    try:
        return list(experiment.tables(merged))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        _warn(f"bnkit report: the tables of {result['experiment']} skipped: {error!r}")
        return []


def _describe_dataset(result: Mapping[str, Any]) -> str:
    info = result.get("results", {}).get("dataset")
    if not isinstance(info, Mapping):
        return html.escape(str(result.get("dataset", "?")))
    return html.escape(
        f"{info.get('name')}: {info.get('train_samples')} training / "
        f"{info.get('test_samples')} test samples of shape {tuple(info.get('sample_shape', ()))}, "
        f"{info.get('num_classes')} classes; {info.get('source')}"
    )


def _experiment_block(
    result: Mapping[str, Any], key: str, directory: Path, tables: Sequence[Any]
) -> str:
    primary = result.get("section", _OTHER.key) == key
    figures = [f for f in result.get("figures", []) if _claim_section(f, result) == key]
    claims = [c for c in result.get("claims", []) if _claim_section(c, result) == key]
    mine = [t for t in tables if (t.section or result.get("section")) == key]
    if not primary and not figures and not claims and not mine:
        return ""
    title = html.escape(str(result.get("title", result["experiment"])))
    name = html.escape(result["experiment"])
    parts = []
    if primary:
        config = result.get("config", {})
        layer = result.get("results", {}).get("batch_norm", "?")
        parts.append(
            f'<h3 id="{name}">{title} <span class="meta">(<code>{name}</code>)</span></h3>'
        )
        parts.append(f"<p>{html.escape(str(result.get('description', '')))}</p>")
        parts.append(
            f'<p class="meta">Data: {_describe_dataset(result)}. Mode: '
            f"{html.escape(str(config.get('mode', '?')))}, seed "
            f"{html.escape(str(config.get('seed', '?')))}, batch norm layer: "
            f"<code>{html.escape(str(layer))}</code>.</p>"
        )
    else:
        parts.append(f'<h3>From <a href="#{name}">{title}</a></h3>')
    for table in mine:
        parts.append(_table_html(table))
    for figure in figures:
        caption = str(figure.get("caption", ""))
        alt = str(figure.get("alt") or caption or "a figure of this experiment")
        parts.append(
            f"<figure>{_image(directory, str(figure['file']), alt)}"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append(_claims_table(claims))
    if primary:
        config_text = html.escape(json.dumps(result.get("config", {}), indent=1))
        parts.append(f"<details><summary>Configuration</summary><pre>{config_text}</pre></details>")
    return "\n".join(parts)


def _summary(results: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    held = total = 0
    for result in results:
        for claim in result.get("claims", []):
            ok = bool(claim.get("holds"))
            held += ok
            total += 1
            training = str(claim.get("training") or "")
            why = ""
            if not ok and training:
                why = (
                    " (run too short to decide)"
                    if training.startswith("too short")
                    else " (on trained networks)"
                )
            rows.append(
                f'<tr><td><a href="#{html.escape(result["experiment"])}">'
                f"{html.escape(result['experiment'])}</a></td>"
                f"<td>{html.escape(str(result.get('dataset', '')))}</td>"
                f"<td>{html.escape(str(claim.get('claim', '')))}</td>"
                f'<td class="{"held" if ok else "failed"}">'
                f"{'&#10004; held' if ok else '&#10008; did not hold'}"
                f"{html.escape(why)}</td></tr>"
            )
    return (
        f'<h2 id="summary">Summary</h2><p class="score"><strong>{held} of {total}</strong> '
        "claims held in this run.</p>"
        + _scroll(
            "<table><thead><tr><th>Experiment</th><th>Dataset</th><th>Claim</th><th>Held?</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        )
    )


def render_html(results: Sequence[Mapping[str, Any]], directory: str | os.PathLike[str]) -> str:
    """The report page for ``results`` (as :func:`load_results` returns them); figures are
    read from ``directory`` and embedded.

    Example:
        >>> page = render_html([], ".")
        >>> "<h2 id=\\"summary\\">Summary</h2>" in page, "0 of 0" in page
        (True, True)
    """
    directory = Path(directory)
    known = {section.key for section in SECTIONS}
    sections = list(SECTIONS)
    if any(r.get("section") not in known for r in results):
        sections.append(_OTHER)
    tables = {id(result): _tables(result) for result in results}
    body = []
    for section in sections:
        blocks = []
        for result in results:
            key = section.key
            own = tables[id(result)]
            if section is _OTHER and result.get("section") not in known:
                key = str(result.get("section", _OTHER.key))
                result = {**result, "section": key}
            block = _experiment_block(result, key, directory, own)
            if block:
                blocks.append(block)
        content = (
            "\n".join(blocks)
            or '<p class="meta">No experiment in this run measured this part '
            "(<code>bnkit lab</code> with no experiment named runs every one).</p>"
        )
        body.append(
            f'<section id="{html.escape(section.key)}"><h2>{html.escape(section.title)}</h2>'
            f"{section.text}\n{content}</section>"
        )
    environment = results[0].get("environment", {}) if results else {}
    env_text = ", ".join(f"{k} {v}" for k, v in environment.items())
    datasets = sorted({str(r.get("dataset")) for r in results})
    modes = sorted({str(r.get("config", {}).get("mode")) for r in results})
    toc = '<li><a href="#summary">Summary</a></li>' + "".join(
        f'<li><a href="#{html.escape(s.key)}">{html.escape(s.title)}</a></li>' for s in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>bnkit lab report</title><style>{_CSS}</style></head><body><main>\n"
        "<h1>bnkit lab: batch normalization, measured</h1>"
        "<p>Batch normalization (Ioffe &amp; Szegedy 2015) normalizes each node's output over "
        "the mini-batch, then scales and shifts it with learned parameters. This report "
        "follows the idea from the problem it was proposed against to its calculation, its "
        "training and test processes, its advantages and its disadvantages with their "
        "remedies. For each claim made about it: the published figure it echoes, what small "
        "networks trained on real data measured here, and whether the claim held, decided by "
        "a rule written in code. A claim that did not hold says whether its runs were "
        "trained to a plateau or still improving when they stopped.</p>"
        f'<p class="meta">Datasets: {html.escape(", ".join(datasets) or "none")}. Mode: '
        f"{html.escape(', '.join(modes) or 'none')}. {html.escape(env_text)}.</p>\n"
        f"<nav><ul>{toc}</ul></nav>\n{_summary(results)}\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )


def render_report(directory: str | os.PathLike[str], replot: bool = False) -> Path:
    """Write ``directory/index.html`` from the results saved there; run nothing.

    Figures listed in a result but missing on disk are redrawn from the saved results
    (for experiments the registry knows); ``replot`` redraws all of them. Results the
    report cannot show, and figures outside ``directory``, are skipped with a
    :class:`ReportWarning`.

    Args:
        directory: the output directory of ``bnkit lab``.
        replot: redraw every figure, e.g. after a change of the plotting code.

    Returns:
        The path of ``index.html``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"bnkit report: no such directory: {directory}")
    results = load_results(directory)
    for result in results:
        paths = [figure_path(directory, str(f["file"])) for f in result.get("figures", [])]
        missing = any(path is not None and not path.is_file() for path in paths)
        if replot or missing:
            _replot(result, directory)
    path = directory / "index.html"
    write_text_atomic(path, render_html(results, directory))
    return path


def _replot(result: Mapping[str, Any], directory: Path) -> None:
    from bnkit.lab.experiments import CATALOG, get_experiment
    from bnkit.lab.plotting import lab_style

    if result["experiment"] not in CATALOG:
        return
    experiment = get_experiment(result["experiment"])
    merged = {**result.get("results", {}), **result.get("volatile", {})}
    try:
        with lab_style():
            experiment.plot(merged, directory, f"{result['experiment']}-")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        _warn(f"bnkit report: the figures of {result['experiment']} not redrawn: {error!r}")
