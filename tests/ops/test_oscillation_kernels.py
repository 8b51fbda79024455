"""Oscillation tracking: hand-checked semantics of the twin, Triton bitwise against the twin over many steps."""

from __future__ import annotations

import pytest
import torch

from ultralytics_qat.ops import OscillationState, init_oscillation_state, track_oscillations
from ultralytics_qat.ops.oscillation import track_oscillations_reference


def _walk(fn, w, scale, qn, qp, ch_axis, steps=40, freeze_from=10, momentum=0.1, thr=0.04):
    """Random-walk the weights around grid points and track every step; returns (state, per-step counts)."""
    gen = torch.Generator().manual_seed(1)
    state = init_oscillation_state(w, scale, qn, qp, ch_axis)
    w = w.clone()
    counts = []
    for i in range(steps):
        w += torch.randn(w.shape, generator=gen).to(w.dtype) * 0.06
        counts.append(fn(w, scale, qn, qp, *state, momentum, thr if i >= freeze_from else 0.0, ch_axis))
    return state, torch.stack(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("qn,qp", [(-2, 1), (-8, 7), (-1, 14), (0, 7), (-128, 127)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_triton_tracker_bitwise(triton_backend, per_channel, qn, qp, dtype):
    w = torch.randn(9, 2, 3, 3).to(dtype)  # odd size, 18 elements per channel
    scale = torch.rand(9) * 0.1 + 0.05 if per_channel else torch.tensor([0.08])
    ch_axis = 0 if per_channel else None
    ref_state, ref_counts = _walk(track_oscillations_reference, w, scale, qn, qp, ch_axis)
    state, counts = _walk(track_oscillations, w, scale, qn, qp, ch_axis)
    for name, a, b in zip(OscillationState._fields, state, ref_state):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(counts, ref_counts) and counts.dtype == torch.int64
    if qp - qn < 30:
        assert ref_counts.sum() > 0 and ref_state.frozen.any()  # the walk exercised oscillation and freezing


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tracker_semantics_by_hand(monkeypatch, backend):
    """One weight whose integer goes 0 -> 1 -> 0 -> 1 -> 1 -> 2, momentum 0.5, freezing from the 4th step at 0.3."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ULTRALYTICS_QAT_BACKEND", backend)
    s = torch.tensor([1.0])
    st = init_oscillation_state(torch.tensor([0.1]), s, -4, 3)
    assert st.prev_int.tolist() == [0] and st.ema_int.tolist() == [0.0] and st.freq.tolist() == [0.0]
    rows = []
    for i, wv in enumerate([1.2, 0.1, 0.9, 1.1, 2.4]):
        n = track_oscillations(torch.tensor([wv]), s, -4, 3, *st, momentum=0.5, freeze_threshold=0.3 if i >= 3 else 0)
        rows.append((int(n), st.prev_int.item(), st.prev_dir.item(), st.freq.item(), st.ema_int.item(), st.frozen.item(),
                     st.frozen_int.item()))  # fmt: skip
    assert rows == [
        (0, 1, -1, 0.0, 0.5, 0, 0),  # 0 -> 1: delta = prev - x = -1, first change: no oscillation
        (1, 0, 1, 0.5, 0.25, 0, 0),  # 1 -> 0: reversal -> osc, freq = 0.5
        (1, 1, -1, 0.75, 0.625, 0, 0),  # 0 -> 1: reversal again (freezing still off)
        (0, 1, -1, 0.375, 0.8125, 1, 1),  # no change: freq decays to 0.375 > 0.3 -> freeze at round(0.625) = 1
        (0, 1, -1, 0.1875, 0.90625, 1, 1),  # frozen: w says 2 but the integer stays 1, no change, no oscillation
    ]


def test_tracker_freezes_to_ema_before_update_and_keeps_frozen_integer(triton_backend):
    st = OscillationState(
        prev_int=torch.tensor([2, -1], dtype=torch.int8),
        prev_dir=torch.tensor([1, -1], dtype=torch.int8),
        frozen=torch.tensor([0, 1], dtype=torch.int8),
        frozen_int=torch.tensor([0, -1], dtype=torch.int8),
        freq=torch.tensor([0.5, 0.9]),
        ema_int=torch.tensor([2.5, 3.0]),  # round half even: 2.5 -> 2
    )
    w = torch.tensor([3.0, 3.0])  # x_int 3: delta = 2 - 3 = -1 reverses prev_dir +1 -> oscillation
    n = track_oscillations(w, torch.tensor([1.0]), -4, 3, *st, momentum=0.1, freeze_threshold=0.2)
    assert n.item() == 1
    assert st.frozen.tolist() == [1, 1] and st.frozen_int.tolist() == [2, -1]  # EMA before this step; kept integer
    assert st.prev_int.tolist() == [3, -1]
    torch.testing.assert_close(st.ema_int, torch.tensor([0.1 * 3 + 0.9 * 2.5, 0.1 * -1 + 0.9 * 3.0]))


def test_tracker_rejects_bad_state():
    w, s = torch.randn(4, 3), torch.tensor([0.1])
    st = init_oscillation_state(w, s, -8, 7)
    with pytest.raises(ValueError, match="prev_dir"):
        track_oscillations(w, s, -8, 7, st.prev_int, st.prev_dir.float(), *st[2:], momentum=0.1, freeze_threshold=0)
    with pytest.raises(ValueError, match="int8"):
        track_oscillations(w, s, 0, 255, *st, momentum=0.1, freeze_threshold=0)
    with pytest.raises(ValueError, match="contiguous"):
        track_oscillations(w.t(), s, -8, 7, *(t.t() for t in st), momentum=0.1, freeze_threshold=0)


@pytest.mark.parametrize("scale", [5e-9, -0.3])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("backend", ["eager", "compiled", "triton"])
def test_tracker_clamps_the_scale_like_the_forward(request, monkeypatch, backend, per_channel, scale):
    """At s <= SCALE_EPS every tracker path quantizes with the forward's clamped scale: same integers as the forward."""
    from ultralytics_qat.ops import SCALE_EPS, cpu_compile_paths, lsq_fake_quantize

    if backend == "triton":
        request.getfixturevalue("triton_backend")
    elif backend == "compiled":
        monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "sync")
    w = torch.randn(64, 72) * 3e-8  # 4608 elements: big enough for the compiled path; codes spread at s = 1e-8
    s = torch.full((64,) if per_channel else (1,), scale)
    ch_axis = 0 if per_channel else None
    state = init_oscillation_state(w, torch.full_like(s, 0.1), -8, 7, ch_axis)
    track_oscillations(w, s, -8, 7, *state, momentum=0.1, freeze_threshold=0.0, ch_axis=ch_axis)
    codes = torch.clamp(torch.round(w / SCALE_EPS), -8, 7)
    assert torch.equal(state.prev_int.float(), codes)
    forward = lsq_fake_quantize(w, s, -8, 7, 1.0, ch_axis)
    assert torch.equal(torch.round(forward / SCALE_EPS), codes)  # the forward's integers
    if backend == "compiled":
        path = cpu_compile_paths()["track_oscillations"]
        if path.fallback:
            pytest.skip(f"TorchInductor cannot compile here ({path.fallback})")
        assert path.last == "compiled"
