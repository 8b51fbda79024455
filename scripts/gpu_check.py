"""One-command GPU check: Triton kernels against the PyTorch twin, their bandwidth, and a QAT-vs-FP training step.

On a CUDA machine (about 2-3 minutes on one GPU):

    bash scripts/gpu_check.sh                  # sets up if needed, then runs this script
    python scripts/gpu_check.py                # with torch, triton and ultralytics already installed

Checks, printed as one table at the end:
1. exactness: Triton LSQ forward and backward (per tensor, per channel; fp32, bf16, fp16 inputs) and the oscillation
   tracker against the PyTorch twin (the tests' oracle): forward and grad_x bitwise, grad_scale to 1e-5 relative,
   tracker state bitwise;
2. bandwidth: achieved GB/s of the forward, backward and tracker kernels on 8M and 64M elements against the
   device's peak (target >= 70% at 8M+ elements);
3. a yolov8n training step (forward, loss, backward, optimizer) at imgsz 640, QAT W4A4 against FP, median of 10.

``--dry-run`` runs the same code where there is no GPU: kernels through the Triton interpreter on small CPU tensors,
no bandwidth, the training step at imgsz 64 on the CPU. CI runs it so the script cannot rot unseen.
Exit status 1 if an exactness check fails; bandwidth and step-time misses are reported, not fatal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BW_TARGET = 0.70  # fraction of peak DRAM bandwidth the elementwise kernels should reach at 8M+ elements


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: interpreted kernels on CPU, small sizes")
    p.add_argument("--imgsz", type=int, help="training-step image size (default 640, dry run 64)")
    p.add_argument("--batch", type=int, help="training-step batch (default 16, dry run 2)")
    return p.parse_args(argv)


class Table:
    """Rows of (check, result, target, verdict); verdict is PASS, FAIL (exactness), MISS (performance) or SKIP."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, result: str, target: str, verdict: str) -> None:
        self.rows.append((check, result, target, verdict))
        print(f"  {check}: {result} [{verdict}]", flush=True)

    @property
    def failed(self) -> bool:
        return any(v == "FAIL" for *_, v in self.rows)

    def render(self) -> str:
        w = [max(len(r[i]) for r in [("check", "result", "target", "verdict"), *self.rows]) for i in range(4)]
        line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
        return "\n".join([line(("check", "result", "target", "verdict")), "  ".join("-" * x for x in w),
                          *map(line, self.rows)])


def exact_mismatch(a, b) -> int:
    """Elements where two tensors differ (bitwise, NaN equal to NaN)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.numel(), b.numel())
    return int((~((a == b) | (torch.isnan(a) & torch.isnan(b)))).sum())


def close_mismatch(a, b, rtol: float = 1e-5, atol: float = 1e-12, per_element: bool = False) -> int:
    """Elements of ``a`` farther than rtol * |b| + atol from ``b``; |b| is the largest element unless ``per_element``
    (grad_scale is a sum of many terms: its error is relative to the whole, not to one small channel)."""
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    a, b = a.float(), b.float()
    tol = rtol * (b.abs() if per_element else b.abs().max()) + atol
    return int(((a - b).abs() > tol).sum())


def check_exactness(table: Table, device: str, sizes: dict, interpreted: bool) -> None:
    """Kernels against the twin. The Triton interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest), so
    a dry run allows bf16 outputs 1 ulp; on a GPU everything must be bitwise."""
    import torch

    from ultralytics_qat.ops import init_oscillation_state, reference, track_oscillations_reference
    from ultralytics_qat.ops import triton_lsq, triton_oscillation

    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = [("per-tensor", (sizes["flat"],), None), ("per-channel", sizes["conv"], 0)]
    grids = [("W4 [-7,7]", -7, 7), ("A8 [0,255]", 0, 255)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bad, n_checks = [], 0
        for case, shape, ch_axis in cases:
            for grid, qn, qp in grids:
                x = (torch.randn(shape, generator=gen) * 2).to(device, dtype)
                c = 1 if ch_axis is None else shape[0]
                s = (torch.rand(c, generator=gen) * 0.2 + 0.05).to(device)
                go = torch.randn(shape, generator=gen).to(device, dtype)
                g = 1.0 / (x.numel() / c * max(qp, -qn)) ** 0.5
                y_t = triton_lsq.lsq_forward(x, s, qn, qp, ch_axis)
                y_r = reference.lsq_forward(x, s, qn, qp, ch_axis)
                gx_t, gs_t = triton_lsq.lsq_backward(go, x, s, qn, qp, g, ch_axis)
                gx_r, gs_r = reference.lsq_backward(go, x, s, qn, qp, g, ch_axis)
                ulp = interpreted and dtype == torch.bfloat16
                fwd_miss = close_mismatch(y_t, y_r, rtol=2**-7, per_element=True) if ulp else exact_mismatch(y_t, y_r)
                for what, miss in [("fwd", fwd_miss), ("grad_x", exact_mismatch(gx_t, gx_r)),
                                   ("grad_s", close_mismatch(gs_t, gs_r))]:
                    n_checks += 1
                    if miss:
                        bad.append(f"{case} {grid} {what}: {miss} differ")
        name = str(dtype).replace("torch.", "")
        target = "bitwise (grad_s 1e-5)" + ("; fwd 1 ulp (interpreter)" if interpreted and name == "bfloat16" else "")
        table.add(f"LSQ fwd+bwd vs twin, {name}", "; ".join(bad) or f"{n_checks} of {n_checks} match", target,
                  "FAIL" if bad else "PASS")
    # tracker: several steps of drifting weights, all six state tensors compared after each
    w = torch.randn(sizes["conv"], generator=gen).to(device)
    s = (torch.rand(sizes["conv"][0], generator=gen) * 0.2 + 0.05).to(device)
    st_t = list(init_oscillation_state(w, s, -7, 7, 0))
    st_r = [t.clone() for t in st_t]
    diff = 0
    for _ in range(5):
        w = w + 0.3 * s.view(-1, 1, 1, 1) * torch.randn(w.shape, generator=gen).to(device)
        n_t = triton_oscillation.track_oscillations(w, s, -7, 7, *st_t, 0.3, 0.1, 0)
        n_r = track_oscillations_reference(w, s, -7, 7, *st_r, 0.3, 0.1, 0)
        diff += int(n_t != n_r) + sum(exact_mismatch(a, b) for a, b in zip(st_t, st_r))
    table.add("oscillation tracker vs twin, 5 steps", "state bitwise equal" if not diff else f"{diff} differ",
              "bitwise", "FAIL" if diff else "PASS")


def peak_bandwidth_gbs() -> float | None:
    import torch

    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock * 1e3 * bus / 8 / 1e9 if clock and bus else None  # double data rate, kHz and bits


def cuda_time_ms(fn, repeats: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_bandwidth(table: Table) -> None:
    import torch

    from ultralytics_qat.ops import init_oscillation_state, triton_lsq, triton_oscillation

    peak = peak_bandwidth_gbs()
    name = torch.cuda.get_device_name(0)
    for n in (8 * 2**20, 64 * 2**20):
        x = torch.randn(n, device="cuda")
        go = torch.randn(n, device="cuda")
        s = torch.full((1,), 0.1, device="cuda")
        wc = x.view(1024, -1)
        sc = torch.full((1024,), 0.1, device="cuda")
        state = list(init_oscillation_state(wc, sc, -7, 7, 0))
        kernels = [  # (name, fn, bytes moved per element: reads + writes)
            ("fwd per-tensor", lambda: triton_lsq.lsq_forward(x, s, -7, 7, None), 8),
            ("bwd per-tensor", lambda: triton_lsq.lsq_backward(go, x, s, -7, 7, 0.01, None), 12),
            ("bwd per-channel", lambda: triton_lsq.lsq_backward(go.view(1024, -1), wc, sc, -7, 7, 0.01, 0), 12),
            # w 4 + prev_int/prev_dir/frozen/frozen_int int8 r+w 8 + freq/ema_int fp32 r+w 16
            ("tracker", lambda: triton_oscillation.track_oscillations(wc, sc, -7, 7, *state, 0.01, 0.05, 0), 28),
        ]
        for kname, fn, nbytes in kernels:
            ms = cuda_time_ms(fn)
            gbs = n * nbytes / ms / 1e6
            frac = gbs / peak if peak else None
            result = f"{gbs:,.0f} GB/s" + (f" = {100 * frac:.0f}% of {peak:,.0f}" if peak else "") + f" ({ms:.3f} ms)"
            verdict = "PASS" if frac is not None and frac >= BW_TARGET else ("MISS" if frac is not None else "SKIP")
            table.add(f"{kname}, {n // 2**20}M fp32, {name}", result, f">= {BW_TARGET:.0%} of peak", verdict)


def fake_batch(batch: int, imgsz: int, device: str, nc: int = 80):
    """A detection batch as Ultralytics' loss reads it: images and a few normalized xywh boxes per image."""
    import torch

    gen = torch.Generator().manual_seed(0)
    per = 4
    cls = torch.randint(0, nc, (batch * per, 1), generator=gen).float()
    xy = torch.rand(batch * per, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(batch * per, 2, generator=gen) * 0.2 + 0.05
    return {"img": torch.rand(batch, 3, imgsz, imgsz, generator=gen).to(device),
            "cls": cls.to(device), "bboxes": torch.cat([xy, wh], 1).to(device),
            "batch_idx": torch.arange(batch).repeat_interleave(per).float().to(device)}


def step_time_s(qat: bool, batch: dict, device: str, steps: int) -> float:
    """Median wall time of a yolov8n training step (forward, loss, backward, AdamW step), FP or QAT W4A4."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_qat import QATController

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).to(device)
    model.args = get_cfg()
    if qat:
        ctl = QATController("qat.yaml")
        ctl.prepare(model)
        ctl.calibrate(model, [batch["img"]] * 2)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 3):
        sync()
        t = time.perf_counter()
        loss, _ = model.loss(batch)
        loss.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= 3:  # warm-up: compiles and allocator growth
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def check_training_step(table: Table, device: str, imgsz: int, batch_size: int, steps: int) -> None:
    batch = fake_batch(batch_size, imgsz, device)
    fp = step_time_s(False, batch, device, steps)
    qat = step_time_s(True, batch, device, steps)
    table.add(f"yolov8n train step, imgsz {imgsz}, batch {batch_size}, {device}",
              f"FP {1e3 * fp:.1f} ms, QAT W4A4 {1e3 * qat:.1f} ms = {qat / fp:.2f}x", "<= 1.15x FP",
              "PASS" if qat / fp <= 1.15 else "MISS")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first decorated, i.e. imported below
    from ultralytics_qat.utils import make_hermetic

    make_hermetic()
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device here; run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    if cuda:
        os.environ["ULTRALYTICS_QAT_BACKEND"] = "triton"  # the QAT training step must take the kernels under test
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, device: "
          f"{torch.cuda.get_device_name(0) if cuda else 'CPU (dry run, Triton interpreter)'}")
    table = Table()
    sizes = {"flat": 8 * 2**20 + 3, "conv": (256, 256, 3, 3)} if cuda else {"flat": 1029, "conv": (8, 4, 3, 3)}
    check_exactness(table, device, sizes, interpreted=not cuda)
    if cuda:
        check_bandwidth(table)
    else:
        table.add("kernel bandwidth", "not measured (no GPU)", f">= {BW_TARGET:.0%} of peak", "SKIP")
    check_training_step(table, device, args.imgsz or (640 if cuda else 64), args.batch or (16 if cuda else 2),
                        steps=10 if cuda else 3)
    print("\n" + table.render())
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
