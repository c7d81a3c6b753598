"""Loaded by pytest before it collects anything, so before anything imports Triton.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported (torch.compile imports
it too): the Triton kernels' tests run on CPU tensors through the interpreter only if it
is set this early. ``BNKIT_TEST_DEVICE=cuda`` runs them compiled on a GPU instead.
"""

import os

if os.environ.get("BNKIT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
