"""Ops tests: Triton kernels run through the interpreter on CPU tensors, compared with the PyTorch twin.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates, i.e. when the kernel modules are first imported, so it
is set here before any test can import them (idempotent with the top-level conftest).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _ops_env(monkeypatch):
    """Eager CPU twin by default (no background compiles); tests opt into other backends explicitly."""
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "off")
    monkeypatch.delenv("ULTRALYTICS_QAT_BACKEND", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on CPU); skip where triton is not installed."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton kernels were imported")
    monkeypatch.setenv("ULTRALYTICS_QAT_BACKEND", "triton")
