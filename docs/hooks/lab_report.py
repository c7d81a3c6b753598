"""An MkDocs hook: put the lab report into the site as lab-report/index.html.

The report is the self-contained page that ``bnkit lab`` writes to bnkit-lab/index.html
(images embedded). Where no report exists, the page says how to produce one, so the
link from lab.md always resolves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPORT = Path("bnkit-lab") / "index.html"
PLACEHOLDER = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bnkit lab report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><main><h1>No lab report in this build</h1>
<p>This site was built without a lab report. Run <code>bnkit lab</code> in the repository
root (it writes <code>bnkit-lab/index.html</code>), then <code>mkdocs build</code> again;
or open <code>bnkit-lab/index.html</code> directly.</p></main></body></html>
"""


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).parent
    report = root / REPORT
    if report.is_file():
        files.append(File.generated(config, "lab-report/index.html", abs_src_path=str(report)))
    else:
        files.append(File.generated(config, "lab-report/index.html", content=PLACEHOLDER))
    return files
