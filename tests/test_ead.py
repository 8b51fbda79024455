"""EMA-aware distance (seed 002, IV-B, eq. 11-12): alpha and mu against the formulas, tau, and steps only."""

import pytest
import torch
from torch import nn

from ultralytics_qat.config import QATConfig
from ultralytics_qat.quant import LSQQuantizer, QConv2d
from ultralytics_qat.stabilize import EMAAwareDistance, TrainState, build_stabilizers
from ultralytics_qat.stabilize.ead import ALPHA_MAX, ead_alpha, ead_mu


def test_alpha_is_k_times_distance_in_grid_steps():
    w = torch.tensor([[0.0, 0.25, 0.5, 0.74, -0.3, 1.9]])
    a = ead_alpha(w, torch.tensor([1.0]), k=1.0)
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.25, 0.5, 0.26, 0.3, 0.1]]))
    # per-channel scales: the distance is in each channel's own steps; k scales it; the clamp keeps a < 1
    w = torch.tensor([[0.3, 0.05], [0.3, 0.05]]).view(2, 2, 1, 1)
    a = ead_alpha(w, torch.tensor([0.2, 0.1]), k=1.5)
    expected = 1.5 * torch.tensor([[0.5, 0.25], [0.0, 0.5]])  # 0.3/0.2=1.5, 0.05/0.2=0.25, 0.3/0.1=3, 0.05/0.1=0.5
    torch.testing.assert_close(a.view(2, 2), expected.clamp(max=ALPHA_MAX))
    a = ead_alpha(torch.tensor([[0.5, 1.25]]), torch.tensor([1.0]), k=2.0)
    torch.testing.assert_close(a, torch.tensor([[ALPHA_MAX, 0.5]]))


def test_mu_anneals_linearly_from_mu_init_to_zero():
    assert ead_mu(2.0, tau=2, epochs=6, mu_init=0.1) == pytest.approx(0.1)
    assert ead_mu(3.0, tau=2, epochs=6, mu_init=0.1) == pytest.approx(0.075)
    assert ead_mu(4.5, tau=2, epochs=6, mu_init=0.1) == pytest.approx(0.0375)
    assert ead_mu(6.0, tau=2, epochs=6, mu_init=0.1) == 0.0
    assert ead_mu(7.0, tau=2, epochs=6, mu_init=0.1) == 0.0  # clamped
    assert ead_mu(1.0, tau=2, epochs=2, mu_init=0.1) == 0.0  # no EAD window


def _model(seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3)
    wq = LSQQuantizer(4, "weight", 4)
    wq.init_weight(conv.weight)
    aq = LSQQuantizer(4, "activation", 1, grid="signed")
    aq.init_activation(-1.0, 1.0)
    return nn.Sequential(QConv2d.from_conv(conv, wq, aq), nn.ReLU(), nn.Conv2d(4, 2, 1))  # last conv: not quantized


def _params(model):
    q = model[0]
    return q.weight, q.weight_fake_quant.scale, q.input_fake_quant.scale


def _fake_step(model, dw=0.013, ds=1.1):
    """What an optimizer step does: move the weights (and the float conv) and the scales."""
    w, sw, sa = _params(model)
    with torch.no_grad():
        w.add_(torch.linspace(-dw, dw, w.numel()).view_as(w))
        sw.mul_(ds)
        sa.mul_(1 / ds)
        model[2].weight.add_(0.5)


def test_update_follows_eq_11_and_12():
    model = _model()
    ead = EMAAwareDistance(start_epoch=2, k=1.5, mu_init=0.2)
    state = TrainState(model=model, epoch=3, epochs=6, batch=4, batches_per_epoch=10)
    ead.on_epoch_start(state)
    ead.on_batch_start(state)
    w0, sw0, sa0 = (p.detach().clone() for p in _params(model))
    float_w = model[2].weight.detach().clone()
    _fake_step(model)
    w1, sw1, sa1 = (p.detach().clone() for p in _params(model))
    ead.on_batch_end(state)

    t = 3 + 5 / 10  # epoch 3, after batch index 4 of 10
    mu = (1 - (t - 2) / (6 - 2)) * 0.2
    assert ead.last_mu == pytest.approx(mu)
    w, sw, sa = _params(model)
    # eq. 12 exactly as printed: (1 - mu) on the old scale, mu on the new one
    torch.testing.assert_close(sw, (1 - mu) * sw0 + mu * sw1)
    torch.testing.assert_close(sa, (1 - mu) * sa0 + mu * sa1)
    # eq. 11 with alpha from the new weights in steps of the (smoothed) scale the next forward uses
    s = sw.detach().view(-1, 1, 1, 1)
    a = (1.5 * (w1 / s - torch.round(w1 / s)).abs()).clamp(0, 0.999)
    assert a.min() < 0.1 and a.max() > 0.5  # a genuinely element-wise alpha
    torch.testing.assert_close(w, a * w0 + (1 - a) * w1)
    assert torch.equal(model[2].weight, float_w + 0.5)  # float layers are not EAD's business

    log = {}
    ead.on_epoch_end(TrainState(model=model, epoch=3, epochs=6, log=log))
    assert log["qat/ead_alpha_mean"] == pytest.approx(float(a.mean()), rel=1e-5)


def test_nothing_before_tau_and_no_copies_kept():
    model = _model()
    ead = EMAAwareDistance(start_epoch=2)
    state = TrainState(model=model, epoch=1, epochs=4, batch=0, batches_per_epoch=4)
    ead.on_epoch_start(state)
    ead.on_batch_start(state)
    _fake_step(model)
    after = [p.detach().clone() for p in _params(model)]
    ead.on_batch_end(state)
    assert all(torch.equal(p, q) for p, q in zip(_params(model), after))
    assert not ead._prev_w and not ead._prev_s  # no memory spent before tau
    log = {}
    ead.on_epoch_end(TrainState(model=model, epoch=1, epochs=4, log=log))
    assert log == {"qat/ead_alpha_mean": 0.0, "qat/ead_mu": 0.0}


def test_update_only_on_optimizer_steps_with_accumulation():
    """Ultralytics steps every `accumulate` batches: EAD must act exactly after those, against the pre-step weights."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ead = EMAAwareDistance(start_epoch=0, k=1.0, mu_init=0.1)
    x = torch.randn(2, 3, 8, 8)
    accumulate, n = 3, 7
    ead.on_epoch_start(TrainState(model=model))
    for i in range(n):
        state = TrainState(model=model, optimizer=opt, epoch=0, epochs=2, batch=i, batches_per_epoch=n)
        ead.on_batch_start(state)
        before = [p.detach().clone() for p in _params(model)]
        model(x * (i + 1)).square().mean().backward()
        step = (i + 1) % accumulate == 0
        if step:
            opt.step()
            opt.zero_grad()
        raw = [p.detach().clone() for p in _params(model)]
        steps_before = ead.steps
        ead.on_batch_end(state)
        w, sw, sa = _params(model)
        if not step:
            assert all(torch.equal(p, q) for p, q in zip((w, sw, sa), before)) and ead.steps == steps_before
            continue
        assert ead.steps == steps_before + 1
        mu = 0.1 * (1 - (i + 1) / n / 2)
        torch.testing.assert_close(sw, (1 - mu) * before[1] + mu * raw[1])
        s = sw.detach().view(-1, 1, 1, 1)
        a = (raw[0] / s - torch.round(raw[0] / s)).abs().clamp(0, 0.999)
        torch.testing.assert_close(w, a * before[0] + (1 - a) * raw[0])
        assert not torch.equal(w, raw[0])
    assert ead.steps == n // accumulate


def test_built_from_config_only_when_start_is_set():
    assert not any(isinstance(s, EMAAwareDistance) for s in build_stabilizers(QATConfig.load(None)))
    built = build_stabilizers(QATConfig.load(None, {"ead.start": 0.75, "ead.k": 0.5}))
    (ead,) = [s for s in built if isinstance(s, EMAAwareDistance)]
    assert (ead.start, ead.k, ead.mu_init) == (0.75, 0.5, 0.1)
    ead.on_train_start(TrainState(model=torch.nn.Identity(), epochs=4))
    assert ead.start_epoch == 3  # 0.75 of 4 epochs
