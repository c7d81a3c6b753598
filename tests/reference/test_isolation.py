"""The reference shares nothing with the torch code it checks: it never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bnkit.reference

REFERENCE_DIR = Path(bnkit.reference.__file__).parent


def test_no_reference_module_imports_torch() -> None:
    for path in sorted(REFERENCE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "torch", f"{path.name} imports {name}"
                if name.startswith("bnkit.") and not name.startswith("bnkit.reference"):
                    assert name == "bnkit.errors", f"{path.name} imports {name}"


def test_reference_runs_where_torch_cannot_be_imported() -> None:
    """With torch blocked, `import bnkit.reference` and a training step still work."""
    program = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from bnkit import reference as ref
bn = ref.BatchNorm(2)
y = bn.forward(np.arange(8.0).reshape(4, 2))
bn.backward(np.ones_like(y))
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules
               if sys.modules[name] is not None)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
