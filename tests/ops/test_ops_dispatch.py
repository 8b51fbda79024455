"""Dispatch: backend selection, triton-free imports, torch.compile, and the Inductor-compiled CPU backward."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_ops import assert_lsq_close, grad_s_tol, run

import ultralytics_qat.ops as ops
from ultralytics_qat.ops import async_compile, cpu_compile, lsq_fake_quantize, lsq_fake_quantize_reference

ROOT = Path(__file__).resolve().parents[2]

_BLOCK_TRITON = """
import sys
sys.modules["triton"] = None  # as if not installed: `import triton` raises, importlib.util.find_spec returns None
try:
    import triton
    raise SystemExit("triton still importable")
except ImportError:
    pass
"""


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_import_and_cpu_path_without_triton():
    """With `import triton` failing (as if not installed): ops import, the CPU path runs, `triton` raises clearly."""
    code = """
    import os, torch
    import ultralytics_qat.ops as ops
    x, s = torch.randn(10, requires_grad=True), torch.tensor([0.1], requires_grad=True)
    ops.lsq_fake_quantize(x, s, -8, 7, 0.1).sum().backward()
    assert x.grad is not None and s.grad is not None
    assert not ops.has_triton()
    os.environ["ULTRALYTICS_QAT_BACKEND"] = "triton"
    try:
        ops.lsq_fake_quantize(x, s, -8, 7, 0.1)
    except ops.BackendUnavailableError as e:
        print("ERR", e)
    assert sys.modules["triton"] is None
    print("OK")
    """
    out = _python(_BLOCK_TRITON + textwrap.dedent(code), ULTRALYTICS_QAT_CPU_COMPILE="off")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "ERR ULTRALYTICS_QAT_BACKEND=triton cannot run" in out.stdout
    assert len([ln for ln in out.stdout.splitlines() if ln.startswith("ERR")][0].splitlines()) == 1


def test_import_does_not_import_triton_and_cpu_tensor_needs_interpreter():
    code = """
    import sys, os, torch
    import ultralytics_qat.ops as ops
    assert "triton" not in sys.modules, "importing ops imported triton"
    os.environ["ULTRALYTICS_QAT_BACKEND"] = "triton"
    try:
        ops.lsq_fake_quantize(torch.randn(4), torch.tensor([0.1]), -8, 7, 0.1)
    except ops.BackendUnavailableError as e:
        print("ERR", e)
    """
    out = _python(textwrap.dedent(code), TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert "need a CUDA tensor" in out.stdout


def test_invalid_backend_name(monkeypatch):
    monkeypatch.setenv("ULTRALYTICS_QAT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        lsq_fake_quantize(torch.randn(4), torch.tensor([0.1]), -8, 7, 0.1)


def test_auto_uses_twin_on_cpu(monkeypatch):
    """`auto` never interprets kernels on CPU tensors (even with TRITON_INTERPRET=1): it calls the twin."""
    calls = []
    monkeypatch.setattr(ops.reference, "lsq_forward", lambda *a: calls.append(a) or torch.zeros(4))
    lsq_fake_quantize(torch.randn(4), torch.tensor([0.1]), -8, 7, 0.1)
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(monkeypatch, backend):
    """LSQ (autograd) and the in-place tracker trace as opaque ops without graph breaks and match eager."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ULTRALYTICS_QAT_BACKEND", backend)
    torch._dynamo.reset()

    def step(x, s, w, ws, state):
        y = lsq_fake_quantize(x, s, 0, 15, 0.05)
        z = lsq_fake_quantize(w, ws, -8, 7, 0.02, 0, pulse_delta=0.1, frozen=state[2])
        n = ops.track_oscillations(w.detach(), ws.detach(), -8, 7, *state, momentum=0.1, freeze_threshold=0.01,
                                   ch_axis=0)  # fmt: skip
        return (y * y).sum() + (z * z).sum(), n

    x, s = torch.randn(4, 8), torch.tensor([0.1])
    w, ws = torch.randn(4, 3, 3), torch.full((4,), 0.2)
    results = []
    for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
        leaves = [t.clone().requires_grad_() for t in (x, s, w, ws)]
        state = ops.init_oscillation_state(w, ws, -8, 7, 0)
        for _ in range(2):
            loss, n = fn(*leaves, state)
            loss.backward()
        results.append((loss.detach(), n, [t.grad for t in leaves], list(state)))
    (l1, n1, g1, s1), (l2, n2, g2, s2) = results
    assert torch.equal(l1, l2) and torch.equal(n1, n2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2)) and all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_compiled_cpu_backward_matches_twin(monkeypatch):
    """The Inductor-compiled CPU backward: bitwise forward and grad_x, close grad_s, and it really ran compiled."""
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "sync")
    n = cpu_compile.MIN_NUMEL
    cases = [((n + 3,), None, {}), ((8, n // 8 + 5), 0, {}), ((n + 7,), None, dict(pulse_delta=0.15))]
    for shape, ch_axis, kw in cases:
        c = 1 if ch_axis is None else shape[ch_axis]
        x, scale, go = torch.randn(shape) * 2, torch.rand(c) * 0.3 + 0.05, torch.randn(shape)
        ref = run(lsq_fake_quantize_reference, x, scale, go, -4, 3, 0.01, ch_axis, **kw)
        out = run(lsq_fake_quantize, x, scale, go, -4, 3, 0.01, ch_axis, **kw)
        assert_lsq_close(out, ref, grad_s_tol(x, scale, go, 0.01))
    if cpu_compile._COMPILER.failed:
        pytest.skip("TorchInductor cannot compile here (e.g. no C++ compiler); the eager fallback was checked")
    keys = set(cpu_compile._COMPILER.fns)
    assert {(False, False, torch.float32, None, False), (True, False, torch.float32, None, False)} <= keys


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def no_compiler(key):
        def warm(fn):
            raise RuntimeError("no C++ compiler")

        return warm

    monkeypatch.setattr(cpu_compile, "_backward_warm", no_compiler)
    compiler = cpu_compile._BackwardCompiler()
    monkeypatch.setattr(cpu_compile, "_COMPILER", compiler)
    monkeypatch.setattr(ops.backend, "_warned", set())
    monkeypatch.setitem(async_compile.PATHS, "lsq_backward", async_compile.PathStats())
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "sync")
    x, s, go = torch.randn(cpu_compile.MIN_NUMEL), torch.tensor([0.1]), torch.randn(cpu_compile.MIN_NUMEL)
    out = run(lsq_fake_quantize, x, s, go, -8, 7, 0.1)
    assert compiler.failed and not compiler.fns and "no C++ compiler" in caplog.text
    path = ops.cpu_compile_paths()["lsq_backward"]
    assert path.last == "eager" and "no C++ compiler" in path.fallback  # the fallback is reported, with its reason
    assert_lsq_close(out, run(lsq_fake_quantize_reference, x, s, go, -8, 7, 0.1), grad_s_tol(x, s, go, 0.1))


@pytest.mark.parametrize("shape,ch_axis,qn,qp", [((64, 3, 3, 8), 0, -7, 7), ((4096 + 5,), None, -4, 3)])
def test_compiled_cpu_tracking_matches_twin_bitwise(monkeypatch, shape, ch_axis, qn, qp):
    """The Inductor-compiled tracker updates every state tensor exactly as the twin, freezing included."""
    from ultralytics_qat.ops import cpu_compile_track, init_oscillation_state, track_oscillations
    from ultralytics_qat.ops import track_oscillations_reference

    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "sync")
    torch.manual_seed(0)
    w = torch.randn(shape)
    s = torch.rand(shape[0] if ch_axis == 0 else 1) * 0.2 + 0.1
    fast = init_oscillation_state(w, s, qn, qp, ch_axis)
    ref = tuple(t.clone() for t in fast)
    for step in range(12):
        w2 = w + 0.1 * torch.randn_like(w)  # noisy steps make integers flip back and forth
        thr = 0.0 if step < 6 else 0.05
        a = track_oscillations(w2, s, qn, qp, *fast, 0.2, thr, ch_axis)
        b = track_oscillations_reference(w2, s, qn, qp, *ref, 0.2, thr, ch_axis)
        assert a.item() == b.item()
        for x, y in zip(fast, ref):
            assert torch.equal(x, y), step
    assert ref[2].any() and ref[4].max() > 0  # the run did oscillate and freeze
    unit = cpu_compile_track._COMPILED[ch_axis is not None]
    if not unit.failed:  # it really ran compiled
        assert unit.fn is not None and ops.cpu_compile_paths()["track_oscillations"].last == "compiled"


@pytest.mark.parametrize("shape,ch_axis", [((cpu_compile.MIN_NUMEL + 3,), None), ((16, 8, 3, 3 * 64), 0)])
def test_compiled_cpu_forward_is_bitwise_the_twin(monkeypatch, shape, ch_axis):
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "sync")
    torch.manual_seed(1)
    x = torch.randn(shape) * 3
    x.view(-1)[:64] = torch.arange(-32, 32) * 0.25  # exact ties at s = 0.5
    s = torch.full((shape[0] if ch_axis == 0 else 1,), 0.5)
    y = cpu_compile.lsq_forward_compiled(x, s, -8, 7, ch_axis)
    if y is None:
        pytest.skip("TorchInductor cannot compile here; the eager twin is used")
    from ultralytics_qat.ops.reference import lsq_forward

    assert torch.equal(y, lsq_forward(x, s, -8, 7, ch_axis))
