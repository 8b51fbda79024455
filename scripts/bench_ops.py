"""Benchmark the LSQ ops: CPU path vs torch's builtin learnable fake-quant vs a naive eager STE; GPU bandwidth if any.

Usage:
    python scripts/bench_ops.py            # CPU table at 1 and 2 threads, compile times, GPU table when CUDA exists
    python scripts/bench_ops.py --quick    # fewer repeats

Times are forward + backward (min of N runs after a warm-up). "ours" is ``lsq_fake_quantize`` on CPU: eager forward
and the TorchInductor-compiled backward (``ULTRALYTICS_QAT_CPU_COMPILE=sync`` here, so the compile happens in the
warm-up); "ours-eager" is the same op with compilation off. Never prints GPU numbers without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ULTRALYTICS_QAT_CPU_COMPILE", "sync")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ultralytics_qat.ops import lsq_fake_quantize, track_oscillations  # noqa: E402
from ultralytics_qat.ops.oscillation import init_oscillation_state  # noqa: E402

CASES = [  # name, shape, ch_axis
    ("1M per-tensor", (1_000_000,), None),
    ("8M per-tensor", (8_000_000,), None),
    ("[256,256,3,3] per-channel", (256, 256, 3, 3), 0),
]


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def naive_lsq(x, s, qn, qp, g, ch_axis):
    """The usual eager LSQ: grad-scale trick, divide, clip, round with STE, multiply (~19 kernels)."""
    if ch_axis is not None:
        s = s.view(-1, *([1] * (x.dim() - 1)))
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, qn, qp)
    return _RoundSTE.apply(v) * s


def builtin_lsq(x, s, qn, qp, g, ch_axis):
    zp = torch.zeros_like(s)
    if ch_axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, qn, qp, g)
    return torch._fake_quantize_learnable_per_channel_affine(x, s, zp, ch_axis, qn, qp, g)


def ours(x, s, qn, qp, g, ch_axis):
    return lsq_fake_quantize(x, s, qn, qp, g, ch_axis)


def timeit(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def fwd_bwd(impl, shape, ch_axis, device="cpu"):
    x = (torch.randn(shape, device=device) * 2).requires_grad_()
    c = 1 if ch_axis is None else shape[ch_axis]
    s = torch.full((c,), 0.1, device=device, requires_grad=True)
    go = torch.randn(shape, device=device)
    n = x.numel() // c

    def step():
        x.grad = s.grad = None
        impl(x, s, -8, 7, 1.0 / (n * 7) ** 0.5, ch_axis).backward(go)

    return step


def cpu_table(repeats: int) -> None:
    print("CPU forward+backward, ms (x = time / builtin time); ours = eager forward + Inductor-compiled backward")
    print(f"{'case':28s} {'thr':>3s} {'builtin':>8s} {'naive':>14s} {'ours-eager':>14s} {'ours':>14s} {'naive/ours':>10s}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, shape, ch_axis in CASES:
            t = {}
            for label, impl, mode in [("builtin", builtin_lsq, None), ("naive", naive_lsq, None),
                                      ("ours-eager", ours, "off"), ("ours", ours, "sync")]:  # fmt: skip
                if mode:
                    os.environ["ULTRALYTICS_QAT_CPU_COMPILE"] = mode
                t[label] = timeit(fwd_bwd(impl, shape, ch_axis), repeats)
            b = t["builtin"]
            cells = " ".join(f"{t[k]:7.2f} ({t[k] / b:4.2f}x)" for k in ("naive", "ours-eager", "ours"))
            print(f"{name:28s} {threads:3d} {b:8.2f} {cells} {t['naive'] / t['ours']:9.1f}x")
    os.environ["ULTRALYTICS_QAT_CPU_COMPILE"] = "sync"


def gpu_table(repeats: int) -> None:
    if not torch.cuda.is_available():
        print("\nGPU: no CUDA device available; no GPU numbers measured.")
        return
    os.environ["ULTRALYTICS_QAT_BACKEND"] = "triton"
    props = torch.cuda.get_device_properties(0)
    peak = None
    if getattr(props, "memory_clock_rate", 0) and getattr(props, "memory_bus_width", 0):
        peak = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9  # DDR: GB/s
    print(f"\nGPU {props.name}: peak ~{peak:.0f} GB/s (from clock and bus width)" if peak else f"\nGPU {props.name}")
    print(f"{'kernel':40s} {'ms':>8s} {'GB/s':>8s} {'% peak':>7s}")
    for name, shape, ch_axis in CASES:
        x = torch.randn(shape, device="cuda")
        c = 1 if ch_axis is None else shape[ch_axis]
        s = torch.full((c,), 0.1, device="cuda")
        go = torch.randn(shape, device="cuda")
        from ultralytics_qat.ops import triton_lsq  # noqa: PLC0415 - CUDA only

        fwd = lambda: triton_lsq.lsq_forward(x, s, -8, 7, ch_axis)  # noqa: E731
        bwd = lambda: triton_lsq.lsq_backward(go, x, s, -8, 7, 0.01, ch_axis)  # noqa: E731
        for kname, fn, nbytes in [("fwd", fwd, 8), ("bwd", bwd, 12)]:
            ms = timeit(fn, repeats)
            gbs = x.numel() * nbytes / ms / 1e6
            pct = f"{100 * gbs / peak:6.1f}%" if peak else "   n/a"
            print(f"{name + ' ' + kname:40s} {ms:8.3f} {gbs:8.0f} {pct}")
        state = init_oscillation_state(x, s, -8, 7, ch_axis)
        ms = timeit(lambda: track_oscillations(x, s, -8, 7, *state, 0.01, 0.05, ch_axis), repeats)
        gbs = x.numel() * 28 / ms / 1e6  # w 4 + four int8 states read+written 8 + two fp32 states read+written 16
        print(f"{name + ' track':40s} {ms:8.3f} {gbs:8.0f} {f'{100 * gbs / peak:6.1f}%' if peak else '   n/a'}")


def compile_times() -> None:
    """Cold (empty Inductor cache) and warm compile of the two CPU backward graphs, each in a fresh process."""
    import subprocess
    import tempfile

    code = (
        "import os,time,torch;t=time.perf_counter();"
        "from ultralytics_qat.ops import cpu_compile as c;"
        "[c._COMPILER.warm(k) for k in [(False,False,torch.float32,None,False),(True,False,torch.float32,None,False)]];"
        "print(f'{time.perf_counter()-t:.2f}')"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)  # noqa: E731
        cold, warm = run().stdout.strip(), run().stdout.strip()
    print(f"\nInductor compile of the 2 CPU backward graphs (per-tensor + per-channel), fresh process each, incl. "
          f"importing dynamo/inductor: cold {cold} s, warm {warm} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--no-compile-times", action="store_true", help="skip the cold/warm compile measurement")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    cpu_table(repeats)
    if not args.no_compile_times:
        compile_times()
    gpu_table(repeats)


if __name__ == "__main__":
    main()
