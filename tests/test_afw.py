"""AFW (seed 002, IV-C): offset and regulariser formulas, the soft weight, and the post-QAT finetuning itself."""

import math

import pytest
import torch
from torch import nn

from ultralytics_qat.quant import LSQQuantizer, QConv2d
from ultralytics_qat.stabilize import AFW, OscillationStabilizer, TrainState, adaptive_finetune
from ultralytics_qat.stabilize.afw import _AFWLayer, afw_offset, afw_regularizer
from ultralytics_qat.stabilize.oscillation import tracked_layers


def test_offset_and_regulariser_formulas():
    theta = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    g = afw_offset(theta, 1.1)
    expect = [max(-1.0, min(1.0, 1.1 * math.tanh(t))) for t in theta.tolist()]
    assert g.tolist() == pytest.approx(expect)
    assert g[0].item() == -1.0 and g[-1].item() == 1.0  # 1.1 * tanh(3) = 1.089 clipped
    g.sum().backward()
    want = [0.0 if abs(1.1 * math.tanh(t)) > 1 else 1.1 * (1 - math.tanh(t) ** 2) for t in theta.tolist()]
    assert theta.grad.tolist() == pytest.approx(want)
    vals = [0.0, 1.0, -1.0, 0.5, 1 / math.sqrt(3)]
    assert [afw_regularizer(torch.tensor([v])).item() for v in vals] == pytest.approx([0, 0, 0, 0.140625, 4 / 27])
    assert afw_regularizer(torch.tensor(vals)).item() == pytest.approx(0.140625 + 4 / 27)  # summed


class _Toy(nn.Module):
    """Two quantized convs around a BN, with an Ultralytics-style ``loss(batch) -> (vector, items)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = QConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1, bias=False), LSQQuantizer(3, "weight", 4), None)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = QConv2d.from_conv(nn.Conv2d(4, 2, 1, bias=False), LSQQuantizer(3, "weight", 2), None)
        for c in (self.c1, self.c2):
            c.weight_fake_quant.init_weight(c.weight)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))

    def loss(self, batch):
        out = self(batch["img"])
        loss = (out - batch["target"]).pow(2).mean()
        return loss.view(1) * out.shape[0], {"mse": loss.detach()}


def _toy_with_tracker_state():
    model = _Toy()
    stab = OscillationStabilizer(max_bits=4)
    stab.attach(model)
    for _, m, q, t in tracked_layers(model):
        t.reset(m.weight, q)
        with torch.no_grad():
            t.freq.view(-1)[::4] = 0.2  # oscillating
            fz = torch.zeros_like(t.frozen, dtype=torch.bool)
            fz.view(-1)[1::7] = True  # frozen at their current code
            t.frozen.copy_(fz)
            t.frozen_int.copy_(q.quantized_int(m.weight).reshape(t.frozen.shape))
        t.bake(m.weight, q)
    torch.manual_seed(1)
    batch = {"img": torch.randn(2, 3, 6, 6), "target": torch.randn(2, 2, 6, 6)}
    return model, batch


def test_soft_weight_is_s_times_clipped_code_plus_g_with_gradient_at_the_grid_ends():
    model, _ = _toy_with_tracker_state()
    name, conv, q, t = tracked_layers(model)[1]
    layer = _AFWLayer(name, conv, q, t, min_frequency=0.005)
    layer.gamma = 1.1
    sel = layer.index
    codes = layer.codes.clone()
    codes[sel[0]] = q.qp  # a selected weight at the top of the grid
    layer.codes = codes
    with torch.no_grad():
        layer.theta.copy_(torch.linspace(-2, 2, sel.numel()))
        layer.theta[0] = 0.0
    g = (1.1 * torch.tanh(layer.theta.detach())).clamp(-1, 1)
    want = codes.clone()
    want[sel] = torch.clamp(codes[sel] + g, q.qn, q.qp)
    s = q.scale.detach().view(-1, 1, 1, 1)
    got = layer.soft_weight()
    assert torch.allclose(got, want.view(conv.weight.shape) * s)
    got.sum().backward()
    assert layer.theta.grad[0] != 0  # at exactly qp (g = 0) the gradient still passes: it can move down


def test_afw_changes_only_selected_codes_by_at_most_one_and_leaves_no_trace():
    model, batch = _toy_with_tracker_state()
    model.train()
    model.c1.eval()  # a mixed mode, to check modes are restored
    layers = tracked_layers(model)
    before = {n: t.codes(m.weight, q).clone() for n, m, q, t in layers}
    selected = {n: ((t.frozen != 0) | (t.freq > 0.005)).view(m.weight.shape) for n, m, q, t in layers}
    weights = {n: m.weight.detach().clone() for n, m, q, t in layers}
    sd_before = model.state_dict()
    keys, bn_mean = list(sd_before), model.bn.running_mean.clone()
    modes = {n: m.training for n, m in model.named_modules()}
    scales = [q.scale.detach().clone() for _, _, q, _ in layers]

    n = adaptive_finetune(model, lambda: [batch] * 4, epochs=3, gamma=1.1, lam=0.01, lr=0.5, min_frequency=0.005)

    changed = 0
    for name, m, q, t in tracked_layers(model):
        after = q.quantized_int(m.weight)  # plain fake quant of the latent weight gives the new codes
        diff = after - before[name]
        assert diff.abs().max() <= 1
        assert not diff[~selected[name]].any()  # only frozen or oscillating weights move
        assert torch.equal(m.weight[~selected[name]], weights[name][~selected[name]])  # others untouched
        fz = t.frozen.view(m.weight.shape).bool()
        assert torch.equal(t.frozen_int.view(m.weight.shape).float()[fz], after[fz])  # frozen ints follow
        assert torch.equal(t.codes(m.weight, q), after)
        changed += int((diff != 0).sum())
    assert n == changed > 0
    assert list(model.state_dict()) == keys  # no structural change: theta discarded, hooks removed
    assert all(not m._forward_hooks for m in model.modules())
    assert "criterion" not in vars(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model.bn.running_mean, bn_mean)  # BN statistics fixed
    assert all(torch.equal(q.scale, s) for (_, _, q, _), s in zip(tracked_layers(model), scales))


def test_afw_stabilizer_runs_on_the_ema_and_logs_its_result():
    model, batch = _toy_with_tracker_state()
    from copy import deepcopy

    ema = deepcopy(model)
    afw = AFW(epochs=2, lam=0.01, lr=0.5)
    state = TrainState(model=model, ema=ema, batches=lambda: [batch] * 3, batches_per_epoch=3)
    afw.on_epoch_end(state)
    assert "qat/afw_changed" not in state.log  # a post-QAT result, not a per-epoch column
    w_model = [m.weight.detach().clone() for _, m, _, _ in tracked_layers(model)]
    afw.post_qat(state)
    assert state.log["qat/afw_changed"] > 0
    assert all(torch.equal(m.weight, w) for (_, m, _, _), w in zip(tracked_layers(model), w_model))  # EMA only
    for (_, _, _, a), (_, _, _, b) in zip(tracked_layers(model), tracked_layers(ema)):
        assert torch.equal(a.frozen_int, b.frozen_int)  # mirrored, so the model->EMA integer sync keeps them
