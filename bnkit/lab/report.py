"""The lab's HTML report, rendered from the saved results alone.

:func:`render_report` reads every ``<experiment>.json`` in a directory and writes
``index.html``: one self-contained file (the PNGs are embedded, the CSS is inline, there
is no script) that tells the story in the seed note's order, :data:`SECTIONS`: internal
covariate shift, the calculation (Z-transform, gamma and beta), the training process,
the test process, advantages and disadvantages. Each section shows its figures and a
table of its claims (the claim, the published figure it echoes, what this run measured,
whether it held); the page opens with a summary of all claims.

An experiment names its section; a figure or claim may name another one. Results of an
experiment the registry does not know, or with a section not in :data:`SECTIONS`, still
appear, in a final section.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnkit.lab.storage import read_result, write_text_atomic

__all__ = ["SECTIONS", "Section", "load_results", "render_html", "render_report"]


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


#: The report's sections, in the seed note's order. Append to add one.
SECTIONS: list[Section] = [
    Section(
        "covariate-shift",
        "1. Internal covariate shift",
        "<p>Batch normalization was introduced against <em>internal covariate shift</em>: "
        "the distribution of each node's output changes at every training iteration, "
        "because the layers before it keep changing. (Not the same thing as <em>covariate "
        "shift</em>, where the test data's input distribution differs from the training "
        "data's.) The paper's Figure 1 shows it in a small sigmoid network: without batch "
        "norm the input to a sigmoid drifts during training; with it, it stays put, and the "
        "network learns faster.</p>",
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
        "&beta;. Every node has its own &gamma; and &beta;.</p>",
    ),
    Section(
        "training",
        "3. The training process",
        "<p>In training, each node's outputs for the whole mini-batch are kept to compute "
        "&mu; and &sigma;, normalized, and only then propagated forward: the normalization "
        "uses the mini-batch's own statistics, at the price of more computation and "
        "memory.</p>",
    ),
    Section(
        "test",
        "4. The test process",
        "<p>At test time the mini-batch is usually a single example, whose mean and standard "
        "deviation mean nothing. The population statistics gathered from the training data "
        "(the mean of the batch means, the mean of the batch variances, or a moving average "
        "of them) are used instead, so the network becomes one fixed function of its "
        "input.</p>",
    ),
    Section(
        "advantages",
        "5. Advantages and disadvantages",
        "<p>Advantages: a regularization effect, and a large initial learning rate still "
        "trains, so training is faster. Disadvantages: more memory, and batch norm is hard to "
        "apply when the mini-batch is small. The sections below measure each disadvantage "
        "and the remedies proposed since.</p>",
    ),
    Section(
        "memory",
        "5.1 Disadvantage: more memory",
        "<p>In training, a batch norm layer keeps its input for the backward pass, and the "
        "activation after it keeps another tensor of the same size. Fusing the two and "
        "keeping only the output (In-Place ABN) removes that cost when the activation can be "
        "inverted.</p>",
    ),
    Section(
        "small-batches",
        "5.2 Disadvantage: small and non-i.i.d. mini-batches",
        "<p>The batch statistics are an estimate of the population's from the mini-batch; "
        "with a few examples, or examples that are not independent draws (two classes per "
        "batch), the estimate is poor, and a network trained on it meets different "
        "statistics at test time. Remedies: normalize without the batch (GroupNorm), "
        "correct toward the population statistics (batch renorm), or gather the statistics "
        "over more examples (synchronized batch norm across processes).</p>",
    ),
    Section(
        "population-stats",
        "5.3 Disadvantage: the population statistics at test time",
        "<p>The statistics used at test time are gathered during training, from weights that "
        "kept changing, and from the training distribution. PreciseBN recomputes them for "
        "the final weights; AdaBN recomputes them on the new distribution's data.</p>",
    ),
]

_OTHER = Section("other", "Other experiments", "")

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2731; background: #f6f7f9; margin: 0; }
main { max-width: 1060px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin-top: 40px; border-bottom: 2px solid #00798c; padding-bottom: 4px; }
h3 { font-size: 17px; margin: 28px 0 6px; }
p.meta, .meta { color: #5c6773; font-size: 13px; }
nav ul { columns: 2; font-size: 14px; }
figure { margin: 16px 0; }
figure img { max-width: 100%; border: 1px solid #e3e6ea; border-radius: 4px; }
figcaption { color: #5c6773; font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; margin: 10px 0 18px; }
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
"""


def load_results(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every usable lab result (see :func:`bnkit.lab.storage.read_result`) in ``directory``,
    in the registry's order, unknown experiments last by name."""
    from bnkit.lab.experiments import experiment_names

    found = []
    for path in sorted(Path(directory).glob("*.json")):
        data = read_result(path)
        if data is not None:
            found.append(data)
    order = {name: index for index, name in enumerate(experiment_names())}
    found.sort(key=lambda d: (order.get(d["experiment"], len(order)), d["experiment"]))
    return found


def _claim_section(item: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    return str(item.get("section") or result.get("section") or _OTHER.key)


def _image(directory: Path, file: str) -> str:
    path = directory / file
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f'<p class="missing">Figure {html.escape(file)} is missing.</p>'
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(file)}">'


def _claims_table(claims: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for claim in claims:
        held = bool(claim.get("holds"))
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(claim.get('claim', '')))}</td>"
            f"<td>{html.escape(str(claim.get('anchor', '')))}</td>"
            f"<td>{html.escape(str(claim.get('measured', '')))}</td>"
            f'<td class="{"held" if held else "failed"}">'
            f"{'&#10004; held' if held else '&#10008; did not hold'}</td>"
            "</tr>"
        )
    if not rows:
        return ""
    return (
        "<table><thead><tr><th>Claim</th><th>Published anchor</th><th>Measured here</th>"
        "<th>Held?</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _describe_dataset(result: Mapping[str, Any]) -> str:
    info = result.get("results", {}).get("dataset")
    if not isinstance(info, Mapping):
        return html.escape(str(result.get("dataset", "?")))
    return html.escape(
        f"{info.get('name')}: {info.get('train_samples')} training / "
        f"{info.get('test_samples')} test samples of shape {tuple(info.get('sample_shape', ()))}, "
        f"{info.get('num_classes')} classes; {info.get('source')}"
    )


def _experiment_block(result: Mapping[str, Any], key: str, directory: Path) -> str:
    primary = result.get("section", _OTHER.key) == key
    figures = [f for f in result.get("figures", []) if _claim_section(f, result) == key]
    claims = [c for c in result.get("claims", []) if _claim_section(c, result) == key]
    if not primary and not figures and not claims:
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
    for figure in figures:
        parts.append(
            f"<figure>{_image(directory, str(figure['file']))}"
            f"<figcaption>{html.escape(str(figure.get('caption', '')))}</figcaption></figure>"
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
            rows.append(
                f'<tr><td><a href="#{html.escape(result["experiment"])}">'
                f"{html.escape(result['experiment'])}</a></td>"
                f"<td>{html.escape(str(result.get('dataset', '')))}</td>"
                f"<td>{html.escape(str(claim.get('claim', '')))}</td>"
                f'<td class="{"held" if ok else "failed"}">'
                f"{'&#10004; held' if ok else '&#10008; did not hold'}</td></tr>"
            )
    return (
        f'<h2 id="summary">Summary</h2><p class="score"><strong>{held} of {total}</strong> '
        "claims held in this run.</p>"
        "<table><thead><tr><th>Experiment</th><th>Dataset</th><th>Claim</th><th>Held?</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
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
    body = []
    for section in sections:
        blocks = []
        for result in results:
            key = section.key
            if section is _OTHER and result.get("section") not in known:
                key = str(result.get("section", _OTHER.key))
                result = {**result, "section": key}
            block = _experiment_block(result, key, directory)
            if block:
                blocks.append(block)
        content = (
            "\n".join(blocks)
            or '<p class="meta">No experiment in this run measured this part '
            "(<code>bnkit lab all</code> runs every experiment).</p>"
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
        "<p>Each claim made about batch normalization, the published figure it echoes, and "
        "what small networks trained on real data measured here, in the order of the study "
        "note the project started from.</p>"
        f'<p class="meta">Datasets: {html.escape(", ".join(datasets) or "none")}. Mode: '
        f"{html.escape(', '.join(modes) or 'none')}. {html.escape(env_text)}.</p>\n"
        f"<nav><ul>{toc}</ul></nav>\n{_summary(results)}\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )


def render_report(directory: str | os.PathLike[str], replot: bool = False) -> Path:
    """Write ``directory/index.html`` from the results saved there; run nothing.

    Figures listed in a result but missing on disk are redrawn from the saved results
    (for experiments the registry knows); ``replot`` redraws all of them.

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
        files = [str(f["file"]) for f in result.get("figures", [])]
        if replot or not all((directory / file).is_file() for file in files):
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
    with lab_style():
        experiment.plot(result["results"], directory, f"{result['experiment']}-")
