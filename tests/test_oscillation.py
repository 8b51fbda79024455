"""Oscillation tracking, freezing and dampening (ICML'22): tracker semantics, gradients, state in checkpoints, e2e."""

import csv
import math

import pytest
import torch
from torch import nn
from ultralytics import YOLO

from qat_test_utils import TRAIN_ARGS, train_stopped_after_first_epoch
from ultralytics_qat import QATDetectionTrainer
from ultralytics_qat.checkpoint import CKPT_KEY, restore, resume_entry, resume_pickle
from ultralytics_qat.controller import QATController
from ultralytics_qat.quant import LSQQuantizer, QConv2d
from ultralytics_qat.stabilize import OscillationStabilizer, OscillationTracker, TrainState, oscillation_report
from ultralytics_qat.stabilize.oscillation import dampening_loss, tracked_layers

TRACKER_KEYS = ("prev_int", "prev_dir", "frozen", "frozen_int", "freq", "ema_int", "grid", "initialized")


def _conv(weight: torch.Tensor, bits=3, per_channel=False, scale=1.0) -> QConv2d:
    """A QConv2d holding ``weight`` with an initialised weight quantizer of fixed scale."""
    o, i, kh, kw = weight.shape
    q = LSQQuantizer(bits, "weight", o if per_channel else 1)
    conv = QConv2d.from_conv(nn.Conv2d(i, o, (kh, kw), bias=False), q, None)
    with torch.no_grad():
        conv.weight.copy_(weight)
        q.scale.fill_(scale) if isinstance(scale, float) else q.scale.copy_(scale)
    q._mark_initialized()
    return conv


class _Steps:
    """Drives a stabilizer like the trainer: set weights, optimizer step (or not), on_batch_end."""

    def __init__(self, model, stab, epochs=1, batches=100):
        self.model, self.stab = model, stab
        self.opt = torch.optim.SGD(model.parameters(), lr=0.0)
        self.state = TrainState(model=model, optimizer=self.opt, epochs=epochs, batches_per_epoch=batches)
        stab.attach(model)
        model.train()
        stab.on_train_start(self.state)
        stab.on_epoch_start(self.state)

    def step(self, conv, values, optimizer_step=True):
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(values).view(conv.weight.shape))
        if optimizer_step:
            self.opt.step()
        self.state.batch += 1
        self.stab.on_batch_end(self.state)


def test_tracker_counts_reversals_only_and_freezes_at_rounded_ema():
    conv = _conv(torch.tensor([0.2, 0.1, 0.0, 2.2]).view(1, 4, 1, 1))  # s = 1, grid [-4, 3]: ints [0, 0, 0, 2]
    stab = OscillationStabilizer(momentum=0.5, freeze_threshold=0.6, freeze_final_threshold=0.6, freeze_start=0.0)
    run = _Steps(conv, stab)
    t = conv.weight_fake_quant.tracker
    assert isinstance(t, OscillationTracker) and bool(t.initialized)
    assert t.prev_int.view(-1).tolist() == [0, 0, 0, 2] and t.ema_int.view(-1).tolist() == [0, 0, 0, 2]

    # el0 0,1,0,1 (reverses twice)  el1 0,1,2,3 (changes every step, never reverses)  el2 0,0,1,1  el3 2,2,1,2
    run.step(conv, [1.1, 0.9, 0.3, 2.1])
    assert t.freq.view(-1).tolist() == [0, 0, 0, 0]
    assert t.prev_dir.view(-1).tolist() == [-1, -1, 0, 0]  # dir = sign(prev_int - x_int)
    run.step(conv, [5.0, 5.0, 5.0, 5.0], optimizer_step=False)  # accumulating batch: no step, nothing tracked
    assert t.freq.view(-1).tolist() == [0, 0, 0, 0] and t.prev_int.view(-1).tolist() == [1, 1, 0, 2]
    run.step(conv, [0.4, 2.0, 0.9, 1.2])
    assert t.freq.view(-1).tolist() == [0.5, 0, 0, 0]
    assert t.ema_int.view(-1).tolist() == [0.25, 1.25, 0.5, 1.5]
    assert not t.frozen.any()
    run.step(conv, [1.0, 3.1, 1.2, 1.8])
    assert t.freq.view(-1).tolist() == [0.75, 0, 0, 0.5]
    assert t.ema_int.view(-1).tolist() == [0.625, 2.125, 0.75, 1.75]
    # el0: freq 0.75 > 0.6 froze it at round(ema_int before this step) = round(0.25) = 0; el3 (0.5) stays free
    assert t.frozen.view(-1).tolist() == [1, 0, 0, 0] and int(t.frozen_int.view(-1)[0]) == 0
    assert conv.weight.view(-1).tolist()[0] == 0.0  # baked: the latent weight holds frozen_int * s
    # frozen keeps its integer: el0 stays 0 whatever its latent weight does
    run.step(conv, [1.4, 3.1, 1.2, 1.8])
    assert int(t.prev_int.view(-1)[0]) == 0 and int(t.frozen_int.view(-1)[0]) == 0
    assert oscillation_report(conv) == [("", 0.5, 0.25)]


def test_freezing_and_dampening_schedules():
    stab = OscillationStabilizer(dampen_lambda=0.1, dampen_start=0.25, freeze_threshold=0.1,
                                 freeze_final_threshold=0.01, freeze_start=0.25)
    assert [stab.threshold(p) for p in (0.0, 0.2)] == [0.0, 0.0]  # no freezing before the start
    assert stab.threshold(0.25) == pytest.approx(0.1)
    assert stab.threshold(0.625) == pytest.approx(0.055)  # halfway: cosine midpoint
    assert stab.threshold(0.25 + 0.75 / 4) == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi / 4)) / 2)
    assert stab.threshold(1.0) == pytest.approx(0.01)
    assert [stab.lam(p) for p in (0.0, 0.25)] == [0.0, 0.0]
    assert stab.lam(0.625) == pytest.approx(0.05)
    assert stab.lam(1.0) == pytest.approx(0.1)
    assert OscillationStabilizer(freeze_threshold=None).threshold(0.9) == 0.0


@pytest.mark.parametrize("per_channel", [False, True])
def test_dampening_gradient_equals_autograd_of_the_explicit_loss(per_channel):
    torch.manual_seed(0)
    w0 = torch.randn(4, 3, 3, 3) * 0.2
    w0[0, 0] *= 8  # some weights beyond the clip range
    scale = torch.tensor([0.05, 0.07, 0.04, 0.06]) if per_channel else 0.05
    r = torch.randn_like(w0)
    lam = 0.3

    conv = _conv(w0, bits=3, per_channel=per_channel, scale=scale)
    q = conv.weight_fake_quant
    q.tracker = OscillationTracker(w0.shape)
    q.tracker.dampen_lambda = lam
    (q(conv.weight) * r).sum().backward()
    got = conv.weight.grad.clone()

    ref = _conv(w0, bits=3, per_channel=per_channel, scale=scale)  # no tracker: plain LSQ + the explicit loss
    rq = ref.weight_fake_quant
    ((rq(ref.weight) * r).sum() + dampening_loss(ref.weight, rq, lam)).backward()
    assert torch.allclose(got, ref.weight.grad, atol=1e-7, rtol=1e-5)
    assert torch.allclose(q.scale.grad, rq.scale.grad)  # the dampening term sends no gradient to the scale
    plain = _conv(w0, bits=3, per_channel=per_channel, scale=scale)
    (plain.weight_fake_quant(plain.weight) * r).sum().backward()
    delta = got - plain.weight.grad  # the dampening gradient itself: 2 lam (clip(w) - q(w)) / n
    s = rq.scale.detach().view(-1, 1, 1, 1) if per_channel else rq.scale.detach()
    q_w = rq.quantized_int(w0) * s
    expect = 2 * lam * (torch.minimum(torch.maximum(w0, s * rq.qn), s * rq.qp) - q_w) / w0.numel()
    assert torch.allclose(delta, expect, atol=1e-6) and delta.abs().max() > 1e-4  # (cancellation in got - plain)
    assert torch.equal(delta[0, 0], torch.zeros_like(delta[0, 0]))  # clipped weights: q(w) = clip(w), no gradient


def test_frozen_weights_forward_frozen_int_times_s_and_get_no_gradient():
    torch.manual_seed(1)
    w0 = torch.randn(2, 2, 3, 3) * 0.1
    conv = _conv(w0, bits=3, per_channel=True, scale=torch.tensor([0.04, 0.05]))
    q = conv.weight_fake_quant
    t = q.tracker = OscillationTracker(w0.shape)
    frozen = torch.zeros(w0.shape, dtype=torch.bool)
    frozen.view(-1)[::3] = True
    with torch.no_grad():
        t.frozen.view(w0.shape).copy_(frozen)
        t.frozen_int.view(w0.shape).copy_(torch.randint(-4, 4, w0.shape))
    t.freezing = True
    r = torch.randn_like(w0)
    out = q(conv.weight)
    s = q.scale.detach().view(-1, 1, 1, 1)
    expect = t.frozen_int.view(w0.shape).float() * s
    assert torch.equal(out[frozen], expect.expand_as(out)[frozen])
    assert torch.equal(out[~frozen], (q.quantized_int(w0) * s)[~frozen])
    (out * r).sum().backward()
    assert torch.equal(conv.weight.grad[frozen], torch.zeros(int(frozen.sum())))
    assert (conv.weight.grad[~frozen] != 0).any()
    # the scale sees a frozen weight as a fixed code (like LSQ's clipped weights): grad += g * frozen_int * dL/dout
    plain = _conv(w0, bits=3, per_channel=True, scale=torch.tensor([0.04, 0.05]))
    pq = plain.weight_fake_quant
    w_eff = torch.where(frozen, expect, w0)
    (pq(w_eff) * r).sum().backward()
    g = q.grad_scale(w0.numel())
    extra = (torch.where(frozen, t.frozen_int.view(w0.shape).float() * r, torch.zeros_like(r))).sum((1, 2, 3)) * g
    assert torch.allclose(q.scale.grad, pq.scale.grad + extra, atol=1e-6)
    # baked into the latent weight, eval mode (no substitution) gives the same output
    t.bake(conv.weight, q)
    q.eval()
    assert torch.equal(q(conv.weight).detach(), out.detach())


def _all_frozen(scale: float, frozen_int: torch.Tensor) -> QConv2d:
    """A 4-bit per-channel conv whose weights are all frozen at ``frozen_int``, in training mode."""
    conv = _conv(torch.randn(frozen_int.shape) * 0.1, bits=4, per_channel=True, scale=torch.full((2,), scale))
    t = conv.weight_fake_quant.tracker = OscillationTracker(frozen_int.shape)
    with torch.no_grad():
        t.frozen.fill_(1)
        t.frozen_int.view(frozen_int.shape).copy_(frozen_int)
    t.freezing = True
    return conv


@pytest.mark.parametrize("scale", [5e-9, -0.3])
def test_frozen_code_survives_a_scale_below_the_forward_clamp(scale):
    """frozen_int * s uses the forward's clamped scale, so frozen code 3 comes out as 3 (not 2 or -7) at any scale."""
    from ultralytics_qat.ops import SCALE_EPS

    conv = _all_frozen(scale, torch.full((2, 2, 3, 3), 3, dtype=torch.int8))
    out = conv.weight_fake_quant(conv.weight)
    assert torch.equal(out, torch.full_like(out, 3.0) * SCALE_EPS)
    assert torch.equal(torch.round(out / SCALE_EPS), torch.full_like(out, 3.0))


@pytest.mark.parametrize("scale", [0.05, 5e-9])
def test_frozen_substitution_passes_the_scale_gradient(scale):
    """d out / d s = frozen_int (times the LSQ gradient scale) wherever the clamp is inactive, and, like the LSQ op's
    scale gradient, straight through where it is active (a scale pushed below SCALE_EPS can recover)."""
    torch.manual_seed(2)
    frozen_int = torch.randint(-4, 4, (2, 2, 3, 3), dtype=torch.int8)
    conv = _all_frozen(scale, frozen_int)
    q = conv.weight_fake_quant
    r = torch.randn(frozen_int.shape)
    (q(conv.weight) * r).sum().backward()
    expect = (frozen_int.float() * r).sum((1, 2, 3)) * q.grad_scale(r.numel())
    assert expect.abs().min() > 1e-2  # a gradient that a dead clamp would visibly zero
    torch.testing.assert_close(q.scale.grad, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(conv.weight.grad, torch.zeros_like(r))  # frozen: no task gradient to the latent weight


def test_bit_schedule_step_restarts_the_tracker():
    conv = _conv(torch.randn(2, 3, 3, 3) * 0.1, bits=4, per_channel=True, scale=torch.tensor([0.03, 0.04]))
    stab = OscillationStabilizer(momentum=0.5, freeze_threshold=0.1, freeze_start=0.0)
    run = _Steps(conv, stab)
    t = conv.weight_fake_quant.tracker
    with torch.no_grad():
        t.frozen.fill_(1)
        t.freq.fill_(0.9)
    conv.weight_fake_quant.set_bits(3, conv.weight)  # what BitSchedule does at a milestone
    stab.on_epoch_start(run.state)
    q = conv.weight_fake_quant
    assert t.grid.tolist() == [3, q.qn, q.qp] and not t.frozen.any() and not t.freq.any()
    assert torch.equal(t.prev_int.float().view(conv.weight.shape), q.quantized_int(conv.weight))


def test_state_survives_channels_last_and_tracks_the_logical_weights():
    # Ultralytics converts the model to channels_last on CUDA; 4-D buffers would turn non-contiguous with it
    w0 = torch.randn(3, 4, 3, 3) * 0.1
    conv = _conv(w0, bits=3, per_channel=True, scale=torch.tensor([0.03, 0.04, 0.05]))
    stab = OscillationStabilizer(momentum=0.5, freeze_threshold=0.1, freeze_start=0.0)
    run = _Steps(conv, stab)
    conv.to(memory_format=torch.channels_last)
    t = conv.weight_fake_quant.tracker
    assert not conv.weight.is_contiguous() and all(b.is_contiguous() for b in t.buffers())
    w1 = w0 + 0.02 * torch.randn_like(w0)
    run.step(conv, w1.reshape(-1).tolist())
    q = conv.weight_fake_quant
    assert torch.equal(t.prev_int.float().view(w0.shape), q.quantized_int(conv.weight))


def test_tracker_state_is_buffers_in_state_dict_ema_and_checkpoint():
    from copy import deepcopy

    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA

    ctl = QATController(None, {"oscillation.freeze_threshold": 0.1})
    model = ctl.prepare(DetectionModel("yolov8n.yaml", verbose=False), verbose=False)
    for m in model.modules():  # scales as calibration would set them (without running the model)
        if isinstance(m, QConv2d):
            m.weight_fake_quant.init_weight(m.weight)
            if m.input_fake_quant is not None:
                m.input_fake_quant.init_activation(0.0, 4.0)
    fresh = deepcopy(model)  # same structure, trackers not initialised
    layers = tracked_layers(model)
    tracked = {n for n, *_ in layers}
    assert "model.0.conv" not in tracked and "model.1.conv" in tracked  # 8-bit first layer > max_bits 4
    assert len(tracked) == 57 - 7  # all 4-bit convs (the first and the six last convs are 8-bit)
    ema = ModelEMA(model).ema  # created after attach, as in the trainer
    for key in TRACKER_KEYS:
        assert f"model.1.conv.weight_fake_quant.tracker.{key}" in model.state_dict()
        assert f"model.1.conv.weight_fake_quant.tracker.{key}" in ema.state_dict()
    state = TrainState(model=model, ema=ema, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    ctl.run("on_train_start", state)
    _, conv, q, t = layers[0]
    assert bool(t.initialized) and torch.equal(t.ema_int.view(conv.weight.shape), q.quantized_int(conv.weight))
    with torch.no_grad():  # some history and frozen weights
        for _, _, _, tr in layers:
            tr.freq.uniform_()
            tr.prev_dir.random_(-1, 2)
            tr.frozen.copy_(tr.freq > 0.95)
    ctl.run("on_epoch_end", state)
    ema_sd = ema.state_dict()
    for key, v in model.state_dict().items():
        if ".tracker." in key:
            assert torch.equal(v, ema_sd[key]), key  # exact copy in the EMA, floats included

    pickled, entry = resume_pickle(ema), resume_entry(ema, ctl.config.to_dict())  # what last.pt holds
    assert not any(".tracker." in k for k in entry["state"])  # tracker state is stored once, in the pickle, in fp32
    fresh.load(pickled.float())  # as resume does: Ultralytics' intersecting load, then the exact entry
    restore(fresh, entry)
    ctl.run("on_train_start", TrainState(model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.0)))
    got = fresh.state_dict()
    for key, v in ema.state_dict().items():
        if ".tracker." in key:
            assert torch.equal(got[key], v), key  # restored exactly, and not re-initialised by on_train_start
    assert all(tr.freezing for _, _, _, tr in tracked_layers(fresh))


@pytest.mark.slow
def test_w3a3_freezing_dampening_afw_end_to_end_with_resume(coco8, tmp_path):
    overrides = {
        "qat.weight.bits": 3, "qat.activation.bits": 3, "qat.oscillation.max_bits": 3,
        "qat.oscillation.momentum": 0.5, "qat.oscillation.freeze_threshold": 0.3,
        "qat.oscillation.freeze_final_threshold": 0.2, "qat.oscillation.freeze_start": 0.0,
        "qat.oscillation.dampen_lambda": 0.1, "qat.oscillation.dampen_start": 0.0,
        "qat.afw.enabled": True, "qat.afw.lr": 0.5, "qat.afw.min_frequency": 0.01,
        "qat.optim.scale_lr_mult": 0.1,  # AdamW at lr 0.01 would step the ~1e-2 scales below zero
    }
    args = {**TRAIN_ARGS, "batch": 2, "nbs": 2, "warmup_epochs": 0, "optimizer": "AdamW", "lr0": 0.01, "val": False}

    last = train_stopped_after_first_epoch(coco8, tmp_path, "osc", **args, **overrides)
    saved = torch.load(last, map_location="cpu", weights_only=False)["ema"].state_dict()
    saved = {k: v for k, v in saved.items() if ".tracker." in k}
    assert saved["model.1.conv.weight_fake_quant.tracker.freq"].dtype == torch.float32  # exact, not fp16
    assert sum(int(v.sum()) for k, v in saved.items() if k.endswith(".frozen")) > 0  # 2 steps froze some weights

    seen = {}

    def capture(trainer):  # after on_pretrain_routine_end ran the stabilizers' on_train_start
        sd = trainer.model.state_dict()
        seen["equal"] = all(torch.equal(sd[k], v) for k, v in saved.items())

    resumed = YOLO(str(last))
    resumed.add_callback("on_train_start", capture)
    resumed.train(trainer=QATDetectionTrainer, resume=True)
    assert seen["equal"]

    rows = list(csv.DictReader(open(resumed.trainer.save_dir / "results.csv")))
    rows = [{k.strip(): float(v) for k, v in r.items()} for r in rows]
    assert len(rows) == 2
    for col in ("qat/osc_frac", "qat/osc_frac_max", "qat/frozen_frac", "qat/freeze_thr", "qat/dampen_lambda"):
        assert col in rows[0]
    assert rows[0]["qat/frozen_frac"] > 0 and rows[1]["qat/frozen_frac"] >= rows[0]["qat/frozen_frac"]
    post = torch.load(resumed.trainer.last, map_location="cpu", weights_only=False)[CKPT_KEY]["post_qat"]
    assert post["epoch"] == 1 and post["qat/afw_changed"] > 0  # AFW ran once, after the last epoch
    # the saved EMA holds its frozen codes in the latent weights: plain fake quant (export) reproduces them
    from ultralytics_qat.checkpoint import load_qat_model

    final, _ = load_qat_model(resumed.trainer.last)  # a finished run's compact file: snapped weights, no trackers
    convs = dict(final.named_modules())
    n_frozen = 0
    for name, conv, q, t in tracked_layers(resumed.trainer.ema.ema):
        fz = t.frozen.view(conv.weight.shape).bool()
        saved = convs[name].weight_fake_quant.quantized_int(convs[name].weight)
        assert torch.equal(saved, t.codes(conv.weight, q)), name  # every code as trained, frozen ones included
        assert torch.equal(saved[fz], t.frozen_int.view(conv.weight.shape).float()[fz])
        n_frozen += int(fz.sum())
    assert n_frozen > 0
