"""Quantization Correction, QC (Gupta & Asthana, WACV 2024): a post-QAT per-channel affine correction folded into BN.

After the last QAT epoch, on the model that is validated, saved and exported (the EMA), everything is frozen —
latent weights, quantizer scales, BN statistics (BN in eval mode) — and each quantized conv that feeds a BatchNorm
gets a learnable per-channel scale ``gamma`` (init 1) and shift ``beta`` (init 0) on its output, trained for a few
epochs with Adam on the detection loss. They compensate the distribution shift that quantization noise causes in
the layer outputs. Then they are folded into the following BN, so nothing is left at inference:

    BN(g*z + b) = w * (g*z + b - m) / sqrt(v + eps) + B
                = (w*g) * (z - m) / sqrt(v + eps) + [B + w * (b + (g - 1) * m) / sqrt(v + eps)]

i.e. ``weight' = w * g`` and ``bias' = B + w * (b + (g - 1) * m) / sqrt(v + eps)`` with the running statistics
untouched. The identity holds for every ``g`` (negative and zero included) and uses the BN's own ``eps``, so the fold
is exact up to rounding. The affine form (rather than rewriting ``m`` and ``v``) is deliberate: the BN stabilizer
re-estimates the running statistics before validation, and a fold into the statistics would simply be overwritten
by it; folded into ``weight``/``bias``, the per-channel gain and shift survive a re-estimation.

They survive it only approximately, though: the folded bias was computed with the statistics QC was trained against,
and a re-estimation after QC replaces those with the statistics of the corrected network (upstream corrections move
downstream conv outputs a little). To keep that gap to the sampling noise of re-estimation, the stabilizer
re-estimates the EMA's BN statistics right BEFORE QC when the BN stabilizer's re-estimation is on, so QC trains against
the statistics that the re-estimation after it finds again (rather than the EMA-averaged ones it replaces).

The correction is applied through forward hooks holding tensors owned by this module, never registered on the
model, so the model's structure and ``state_dict`` keys are the same before, during and after QC.

Where QC acts: a :class:`QConv2d` that is the ``conv`` of an Ultralytics ``Conv``-style block (``act(bn(conv(x)))``,
the ``Conv.forward`` itself, DWConv included). Quantized convs without a following BN (e.g. the detection head's
final 1x1 convs) and blocks with another forward (``Conv2``, ``RepConv``) are skipped: a per-channel gain there would
have to go into the (possibly per-tensor) quantized weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant import QConv2d
from ..utils import LOGGER
from .base import Stabilizer, TrainState
from .bn import reestimate_bn


def qc_sites(model: nn.Module) -> list[tuple[str, QConv2d, nn.BatchNorm2d]]:
    """(block name, quantized conv, its BN) for every ``Conv``-style block whose conv is quantized (see module doc)."""
    from ultralytics.nn.modules.conv import Conv

    out = []
    for name, m in model.named_modules():
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if (
            isinstance(m, Conv)
            and type(m).forward is Conv.forward
            and isinstance(conv, QConv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and bn.affine
            and bn.running_mean is not None
            and bn.num_features == conv.out_channels
        ):
            out.append((name, conv, bn))
    return out


@torch.no_grad()
def fold_into_bn(bn: nn.BatchNorm2d, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Fold ``y = gamma * z + beta`` (per channel, applied before ``bn``) into ``bn``'s affine weight and bias, exactly.

    ``weight' = w * gamma``, ``bias' = bias + w * (beta + (gamma - 1) * running_mean) / sqrt(running_var + eps)``
    (computed in float64); the running statistics are not changed. Valid for any ``gamma``, negative included.
    """
    w, b = bn.weight.double(), bn.bias.double()
    g, c = gamma.detach().double().to(w.device), beta.detach().double().to(w.device)
    m, v = bn.running_mean.double(), bn.running_var.double()
    new_b = b + w * (c + (g - 1.0) * m) / torch.sqrt(v + bn.eps)
    bn.weight.copy_((w * g).to(bn.weight.dtype))
    bn.bias.copy_(new_b.to(bn.bias.dtype))


@dataclass
class QCorrector:
    """The QC parameters of one model: attach as forward hooks, train, fold into BN, detach.

    Args:
        model: The model to correct (in place); its own parameters are never trained here.

    Examples:
        >>> qc = QCorrector(model)
        >>> qc.attach()  # model(x) now applies gamma * conv(x) + beta before each BN
        >>> ...  # optimise qc.parameters()
        >>> qc.fold()  # into BN weight/bias; hooks removed, model structure unchanged
    """

    model: nn.Module
    sites: list = field(default_factory=list)
    gammas: list = field(default_factory=list)
    betas: list = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def __post_init__(self):
        self.sites = qc_sites(self.model)
        for _, conv, _ in self.sites:
            dev = conv.weight.device
            self.gammas.append(torch.ones(conv.out_channels, device=dev, requires_grad=True))
            self.betas.append(torch.zeros(conv.out_channels, device=dev, requires_grad=True))

    def parameters(self) -> list[torch.Tensor]:
        """The learnable per-channel scales and shifts."""
        return [*self.gammas, *self.betas]

    def attach(self) -> None:
        """Apply ``gamma * out + beta`` to each site's conv output through a forward hook."""
        self.detach()
        for (_, conv, _), g, b in zip(self.sites, self.gammas, self.betas):
            self._handles.append(conv.register_forward_hook(_affine_hook(g, b)))

    def detach(self) -> None:
        """Remove the hooks (the model computes as without QC, or as folded)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def fold(self) -> None:
        """Fold every site's ``gamma``/``beta`` into its BN and remove the hooks."""
        self.detach()
        for (_, _, bn), g, b in zip(self.sites, self.gammas, self.betas):
            fold_into_bn(bn, g, b)


def _affine_hook(gamma: torch.Tensor, beta: torch.Tensor):
    def hook(module, inputs, out):
        return out * gamma.view(1, -1, 1, 1).to(out.dtype) + beta.view(1, -1, 1, 1).to(out.dtype)

    return hook


def _heads(model: nn.Module) -> list[nn.Module]:
    """Modules whose ``training`` flag selects the raw prediction output the loss needs (the detection head)."""
    layers = getattr(model, "model", None)
    return [layers[-1]] if isinstance(layers, nn.Sequential) and len(layers) else []


def _task_loss(model: nn.Module, criterion: Callable, batch: dict) -> torch.Tensor:
    """Summed detection loss per image (box + cls + dfl, Ultralytics gains) of ``model`` on ``batch``."""
    preds = model(batch["img"])
    loss, _ = criterion(preds, batch)  # loss components * batch size
    return loss.sum() / batch["img"].shape[0]


def quantization_correction(
    model: nn.Module,
    batches: Callable[[], Iterable[dict]],
    criterion: Callable,
    epochs: int = 1,
    lr: float = 1e-3,
    total: int | None = None,
) -> dict:
    """Train QC on ``model`` over ``epochs`` passes of ``batches()`` and fold it into BN (see module docstring).

    The model runs in eval mode (BN statistics fixed) except the detection head's own ``training`` flag, set so the
    head returns the raw predictions the loss takes (its sub-blocks, BNs included, stay in eval mode). Every model
    parameter is frozen for the duration; flags and modes are restored afterwards.

    Args:
        model: A quantized Ultralytics detection model (the EMA), corrected in place.
        batches: Callable returning a fresh iterable of preprocessed batches (``img``, ``cls``, ``bboxes``,
            ``batch_idx``).
        criterion: ``criterion(preds, batch) -> (loss components * batch size, items)``, e.g.
            ``model.init_criterion()``.
        epochs: Passes over ``batches()``.
        lr: Adam learning rate.
        total: Batches per pass, for the progress bar.

    Returns:
        ``{"layers", "steps", "loss_start", "loss_end"}``: the loss per image on the first batch before QC and on the
        same batch after the fold (NaN when there was no batch).
    """
    from ultralytics.utils import TQDM

    qc = QCorrector(model)
    result = {"layers": len(qc.sites), "steps": 0, "loss_start": float("nan"), "loss_end": float("nan")}
    if not qc.sites:
        return result
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    first = None
    try:
        model.eval()
        for h in _heads(model):
            h.training = True  # raw outputs for the loss; not recursive, so the head's BNs stay in eval mode
        for p in grads:
            p.requires_grad_(False)
        qc.attach()
        opt = torch.optim.Adam(qc.parameters(), lr=lr)
        with torch.enable_grad():
            for epoch in range(epochs):
                pbar = TQDM(batches(), total=total, desc=f"QAT: QC {epoch + 1}/{epochs}", leave=False)
                for batch in pbar:
                    loss = _task_loss(model, criterion, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    result["steps"] += 1
                    if first is None:
                        first, result["loss_start"] = batch, float(loss.detach())
                    pbar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        qc.fold()
        if first is not None:
            with torch.no_grad():
                result["loss_end"] = float(_task_loss(model, criterion, first))
    finally:
        qc.detach()
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.training = flag
    return result


class QuantizationCorrection(Stabilizer):
    """Runs QC on the EMA model in ``post_qat`` (once training stopped, before the final validation and save).

    Args:
        epochs: QC passes over the training data.
        lr: Adam learning rate of the per-channel scales and shifts.
        bn_batches: Batches for a BN re-estimation of the EMA right before QC (0 = none). With the BN stabilizer's
            re-estimation on, QC is then trained against the statistics that re-estimation will find again, rather
            than the EMA-averaged ones it is about to replace.
    """

    name = "qc"

    def __init__(self, epochs: int = 1, lr: float = 1e-3, bn_batches: int = 0):
        self.epochs, self.lr, self.bn_batches = epochs, lr, bn_batches
        self.result: dict | None = None

    def post_qat(self, state: TrainState) -> None:
        model = state.ema if state.ema is not None else state.model
        if state.batches is None:
            return
        if self.bn_batches:
            n = min(self.bn_batches, state.batches_per_epoch)
            reestimate_bn(model, state.images(), n, desc="QAT: BN before QC")
        criterion = _criterion(model, state.model)
        self.result = r = quantization_correction(
            model, state.batches, criterion, self.epochs, self.lr, total=state.batches_per_epoch
        )
        state.log["qat/qc_loss_start"], state.log["qat/qc_loss_end"] = r["loss_start"], r["loss_end"]
        LOGGER.info(
            f"QAT: quantization correction on {r['layers']} layers, {r['steps']} steps: "
            f"loss {r['loss_start']:.4g} -> {r['loss_end']:.4g} (first batch)"
        )


def _criterion(model: nn.Module, train_model: nn.Module):
    """The training model's loss criterion (its current gains, e.g. of an end-to-end head), else a new one."""
    crit = getattr(train_model, "criterion", None)
    if crit is not None:
        return getattr(crit, "task", crit)  # the detection loss alone, without a distillation wrapper's teacher
    if getattr(model, "args", None) is not None or getattr(train_model, "args", None) is None:
        return model.init_criterion()
    model.args = train_model.args  # the loss reads its gains from model.args; leave no trace on the model
    try:
        return model.init_criterion()
    finally:
        del model.args
