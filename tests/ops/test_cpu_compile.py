"""The Inductor-compiled CPU path: deterministic when asked, survives validation, reports the path every call took."""

from __future__ import annotations

import itertools
import os
import threading

import pytest
import torch

from ultralytics_qat.ops import (
    cpu_compile_paths,
    init_oscillation_state,
    lsq_fake_quantize,
    reset_cpu_compile_paths,
    track_oscillations,
)
from ultralytics_qat.ops import async_compile, cpu_compile, cpu_compile_track
from ultralytics_qat.ops.async_compile import AsyncCompiled

N = cpu_compile.MIN_NUMEL


@pytest.fixture
def deterministic():
    """Deterministic algorithms on, as Ultralytics' ``init_seeds(deterministic=True)`` sets them."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.fixture
def fresh_units(monkeypatch):
    """Never-compiled units for every CPU op (the shared ones may be compiled by earlier tests), counters at zero.

    Determinism off: earlier trainings leave Ultralytics' torch.use_deterministic_algorithms(True) on, which selects
    the synchronous compile.
    """
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(cpu_compile, "_COMPILER", cpu_compile._BackwardCompiler())
    monkeypatch.setattr(cpu_compile, "_FWD", {
        False: AsyncCompiled(cpu_compile._fwd, cpu_compile._warm_fwd_tensor, "test fwd tensor", "lsq_forward"),
        True: AsyncCompiled(cpu_compile._fwd, cpu_compile._warm_fwd_channel, "test fwd channel", "lsq_forward"),
    })  # fmt: skip
    core, warm = cpu_compile_track._track_core, cpu_compile_track._warm
    monkeypatch.setattr(cpu_compile_track, "_COMPILED", {
        False: AsyncCompiled(core, warm(None), "test track tensor", "track_oscillations"),
        True: AsyncCompiled(core, warm(4), "test track channel", "track_oscillations"),
    })  # fmt: skip
    for op in async_compile.OPS:
        monkeypatch.setitem(async_compile.PATHS, op, async_compile.PathStats())
    yield
    torch.use_deterministic_algorithms(was, warn_only=True)


def _skip_without_compiler():
    failed = [s.fallback for s in cpu_compile_paths().values() if s.fallback]
    if failed:
        pytest.skip(f"TorchInductor cannot compile here ({failed[0]}); the eager fallback is used")


def _train_step(shape, ch_axis=None):
    """A training-mode forward and backward through the LSQ op."""
    x = torch.randn(shape, requires_grad=True)
    s = torch.full((shape[0] if ch_axis == 0 else 1,), 0.1, requires_grad=True)
    (lsq_fake_quantize(x, s, -8, 7, 0.01, ch_axis) * torch.randn(shape)).sum().backward()


def _track_step(shape, ch_axis=None):
    w = torch.randn(shape)
    s = torch.full((shape[0] if ch_axis == 0 else 1,), 0.1)
    state = init_oscillation_state(w, s, -8, 7, ch_axis)
    track_oscillations(w, s, -8, 7, *state, momentum=0.01, freeze_threshold=0.0, ch_axis=ch_axis)


def _graphs() -> dict[str, int]:
    """Graphs held per compiled unit now in use: a change means some call recompiled."""
    units = [*cpu_compile._FWD.values(), *cpu_compile._COMPILER.units.values(), *cpu_compile_track._COMPILED.values()]
    return {u.name: u.graphs() for u in units if u.fn is not None}


def test_deterministic_training_compiles_synchronously(monkeypatch):
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "async")
    assert cpu_compile.compile_mode() == "async"
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert cpu_compile.compile_mode() == "sync"
        monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "off")
        assert cpu_compile.compile_mode() == "off"  # off stays off
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_training_runs_compiled_from_the_first_call(monkeypatch, fresh_units, deterministic):
    """Under determinism no call runs eager before the compiled graph is ready (no time-dependent switch)."""
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "async")
    _train_step((4, N // 4))
    _track_step((8, 4096 // 8))
    _skip_without_compiler()
    paths = cpu_compile_paths()
    for op in ("lsq_forward", "lsq_backward", "track_oscillations"):
        assert (paths[op].compiled, paths[op].eager, paths[op].last) == (1, 0, "compiled"), op


def test_background_compile_serves_the_calls_without_recompiling(monkeypatch, fresh_units):
    """async: eager until the background compile is done, then compiled with the graph warmed on that other thread."""
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "async")
    _train_step((4, N // 4))
    _track_step((8, 4096 // 8))
    units = [cpu_compile._FWD[False], *cpu_compile._COMPILER.units.values(), cpu_compile_track._COMPILED[False]]
    assert len(units) == 3  # each first call started a background compile and ran eager (a warm cache may be quick)
    assert all((s.eager, s.compiled) == (1, 0) for s in cpu_compile_paths().values())
    for unit in units:
        unit._thread.join()
    _skip_without_compiler()
    _train_step((4, N // 4 + 8))
    _track_step((8, 4096 // 8 + 8))
    paths = cpu_compile_paths()
    for op in ("lsq_forward", "lsq_backward", "track_oscillations"):
        assert (paths[op].eager, paths[op].compiled, paths[op].last) == (1, 1, "compiled"), op
    assert [u.graphs() for u in units] == [1, 1, 1]  # the warm-up's guards hold inside the ops


def test_sync_call_waits_for_a_compile_under_way(monkeypatch):
    """Determinism switched on while a background compile runs: the next call waits for it, compiles nothing twice."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the scheduling is under test, not Inductor
    release, warm_calls = threading.Event(), []

    def slow_warm(fn):
        warm_calls.append(fn)
        release.wait(10)

    unit = AsyncCompiled(lambda t: t + 1, slow_warm, "test wait", "lsq_forward")
    assert unit.get("async") is None and unit.pending  # started in the background, eager meanwhile
    assert unit.get("async") is None and len(warm_calls) == 1
    threading.Timer(0.2, release.set).start()
    fn = unit.get("sync")
    assert fn is not None and not unit.pending and len(warm_calls) == 1
    assert fn(torch.tensor(1.0)) == 2


def test_warm_ups_leave_the_global_rng_alone():
    """Warm-ups may run on a background thread: a draw from the global generator would race seeded training."""
    compiler = cpu_compile._BackwardCompiler()
    kinds = [(False, False), (True, False), (True, True)]
    dtypes, frozen = (torch.float32, torch.float16, torch.bfloat16), (None, torch.uint8, torch.int8)
    units = [compiler.unit((pc, lr, dt, fz, dist)) for (pc, lr), dt, fz, dist in
             itertools.product(kinds, dtypes, frozen, (False, True))]  # fmt: skip
    units += [*cpu_compile._FWD.values(), *cpu_compile_track._COMPILED.values()]
    for unit in [*cpu_compile._COMPILER.units.values(), *units]:  # a compile left running by an earlier test
        if getattr(unit, "_thread", None) is not None:  # restores the RNG state it saved when it ends
            unit._thread.join()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for unit in units:
        unit._warm(unit._fn)  # the warm-up on the plain function: its inputs are what is under test
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_over_with_free_locks():
    """A fork while a compile thread holds a lock: the child gets fresh locks and no state from the parent."""
    unit = AsyncCompiled(lambda t: t, lambda fn: None, "test fork", "lsq_forward")
    unit.fn = unit._fn  # as if compiled in the parent
    async_compile.PATHS["lsq_forward"].compiled += 1
    with unit.lock, cpu_compile._COMPILER.lock:  # held at fork time, as by a background compile
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            ok = False
            try:
                ok = (unit.lock.acquire(timeout=5) and cpu_compile._COMPILER.lock.acquire(timeout=5)
                      and unit.fn is None and not unit.pending and not unit.failed
                      and cpu_compile_paths()["lsq_forward"].compiled == 0)  # fmt: skip
            finally:
                os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert unit.fn is not None  # the parent keeps its graph


def test_compiled_path_survives_validation_and_bn_reestimation(monkeypatch):
    """Training calls, then validation-style inference-mode calls at many (rect) shapes, then training again.

    Inference-mode calls run the eager twin and never touch the compiled graphs (no recompiles: their tensors differ
    in dispatch keys); ``no_grad`` calls (BN re-estimation) and new training shapes reuse the training graphs.
    """
    monkeypatch.setenv("ULTRALYTICS_QAT_CPU_COMPILE", "sync")
    weights = [(64, 32, 3, 3), (128, 128, 1, 1), (256, 64, 1, 1)]  # >= MIN_NUMEL, one square
    for shape in weights:
        _train_step(shape, 0)
        _track_step(shape, 0)
        _track_step(shape)
    _train_step((2, 16, 32, 32))
    _skip_without_compiler()
    graphs = _graphs()
    assert len(graphs) >= 6  # forward, backward and tracking, per tensor and per channel
    reset_cpu_compile_paths()

    chw = [(16, 32, 48), (16, 48, 32), (32, 24, 40), (16, 64, 40)]
    rect_shapes = [(b, *s) for b, s in itertools.product((1, 2, 3), chw)]
    with torch.inference_mode():  # validation: activations at every rect shape, weights per channel
        for shape in rect_shapes:
            lsq_fake_quantize(torch.randn(shape), torch.tensor([0.1]), -8, 7, 0.01)
        for shape in weights:
            lsq_fake_quantize(torch.randn(shape), torch.full((shape[0],), 0.1), -8, 7, 0.01, 0)
    with torch.no_grad():  # BN re-estimation: plain no_grad forwards
        for shape in rect_shapes[:4]:
            lsq_fake_quantize(torch.randn(shape), torch.tensor([0.1]), -8, 7, 0.01)
    for shape in [(2, 16, 40, 40), (3, 16, 48, 32)]:  # training again, at a new image size too
        _train_step(shape)
    for shape in weights:
        _train_step(shape, 0)

    paths = cpu_compile_paths()
    assert paths["lsq_forward"].inference == len(rect_shapes) + len(weights)
    for op in ("lsq_forward", "lsq_backward"):
        assert paths[op].last == "compiled" and paths[op].eager == 0 and paths[op].fallback is None, (op, paths[op])
    assert paths["lsq_forward"].compiled == 4 + 5 and paths["lsq_backward"].compiled == 5
    assert _graphs() == graphs  # nothing recompiled
