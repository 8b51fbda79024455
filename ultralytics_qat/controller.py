"""QATController: the one object that owns the QAT state of a model.

The trainer subclass, the validator subclass and the drop-in callbacks are thin front doors that call it at the right
moments; it never imports them. It holds the config, performs the quantizer surgery, calibrates, gives the learned
scales their own optimizer group, and runs the stabilizers' hooks. Checkpoint entries are ``ultralytics_qat.checkpoint``'s
job; the life of a training run (when each hook fires, data, checkpoints) is ``ultralytics_qat.engine.QATRun``'s.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .config import QATConfig
from .quant import LSQQuantizer, QConv2d, format_plan, quantize_model
from .quant.budget import apply_budget
from .stabilize import CollapseGuard, Stabilizer, TrainState, build_stabilizers
from .utils import LOGGER

def quantizers(model: nn.Module) -> list[tuple[str, LSQQuantizer]]:
    """All (name, quantizer) pairs of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LSQQuantizer)]


def is_qat_model(model: nn.Module) -> bool:
    """True if the model carries ultralytics-qat fake quantizers."""
    return any(isinstance(m, QConv2d) for m in model.modules())


def sync_integer_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy non-float buffers (grids, flags, tracker state) from ``src`` to ``dst``: the EMA averages floats only."""
    dst_buffers = dict(unwrap(dst).named_buffers())
    with torch.no_grad():
        for name, b in unwrap(src).named_buffers():
            if not b.is_floating_point() and name in dst_buffers:
                dst_buffers[name].copy_(b)
    for _, q in quantizers(unwrap(dst)):
        q.bits, q.qn, q.qp = (int(v) for v in q.qrange.tolist())
        q._initialized = bool(q.initialized)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class QATController:
    """Owns a model's QAT config and state.

    Args:
        config: A :class:`QATConfig`, a qat.yaml path or bundled recipe name, a dict, or None for the default.
        overrides: Dotted qat overrides, e.g. ``{"weight.bits": 3}``.

    Examples:
        >>> qat = QATController("qat.yaml")
        >>> model = qat.prepare(model)  # quantizers in, scales not yet initialised
        >>> qat.calibrate(model, images)  # scales from data
    """

    def __init__(self, config: QATConfig | str | dict | None = None, overrides: dict | None = None):
        self.config = QATConfig.load(config, overrides)
        self.plans = []
        self.stabilizers = build_stabilizers(self.config)

    # -- surgery -----------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, verbose: bool = True) -> nn.Module:
        """Insert fake quantizers into ``model`` in place (before any optimizer or EMA exists) and return it."""
        total = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        self.config = apply_budget(model, self.config)  # qat.budget: per-layer bits into budget.choice (saved)
        self.plans = quantize_model(model, self.config)
        model.qat_config = self.config.to_dict()  # pickled with the model, so a checkpoint knows its recipe
        for st in self.stabilizers:
            st.attach(model)
        if verbose:
            LOGGER.info("QAT: fake quantizers inserted\n" + format_plan(self.plans, total))
        return model

    def set_config(self, config: QATConfig) -> None:
        """Replace the config (e.g. by a checkpoint's own) before :meth:`prepare`."""
        self.config = config
        self.stabilizers = build_stabilizers(config)

    # -- training events ---------------------------------------------------------------------------------------------
    def run(self, event: str, state: TrainState) -> None:
        """Call hook ``event`` of every stabilizer (see :class:`ultralytics_qat.stabilize.Stabilizer`)."""
        for st in self.stabilizers:
            getattr(st, event)(state)

    def epoch_end(self, state: TrainState) -> None:
        """End of a training epoch, before validation: stabilizer logs, EMA sync, BN re-estimation."""
        self.run("on_epoch_end", state)
        self.log_scales(state)
        if state.ema is not None:
            sync_integer_state(state.model, state.ema)
        self.run("before_validation", state)

    @property
    def collapse_guard(self):
        """The :class:`~ultralytics_qat.stabilize.CollapseGuard`, or None when ``collapse.enabled`` is off."""
        return next((st for st in self.stabilizers if isinstance(st, CollapseGuard)), None)

    def stabilizer_states(self) -> dict:
        """Host-side stabilizer state for a resume checkpoint, by stabilizer name (empty ones left out)."""
        return {st.name: sd for st in self.stabilizers if (sd := st.state_dict())}

    def load_stabilizer_states(self, states: dict) -> None:
        for st in self.stabilizers:
            if st.name in (states or {}):
                st.load_state_dict(states[st.name])

    @property
    def has_post_qat(self) -> bool:
        """True if a stabilizer has a post-QAT stage (QC, AFW)."""
        return any(type(st).post_qat is not Stabilizer.post_qat for st in self.stabilizers)

    def finalize(self, state: TrainState) -> None:
        """After the last epoch, whatever stopped it: post-QAT stages, EMA sync, then what precedes a validation."""
        state.final = True
        self.run("post_qat", state)
        if state.ema is not None:
            sync_integer_state(state.model, state.ema)
        self.run("before_validation", state)

    @staticmethod
    def log_scales(state: TrainState) -> None:
        """Mean learned scale (relative to its value at the epoch start) as a drift indicator, per kind."""
        for kind in ("weight", "activation"):
            vals = [q.scale.detach().float().mean() for _, q in quantizers(unwrap(state.model)) if q.kind == kind]
            if vals:
                state.log[f"qat/{kind}_scale_mean"] = float(torch.stack(vals).mean())

    # -- calibration -------------------------------------------------------------------------------------------------
    def needs_calibration(self, model: nn.Module) -> bool:
        """True while any quantizer has no scale yet (a fresh QAT model, not one loaded from a QAT checkpoint)."""
        return any(not q._initialized for _, q in quantizers(unwrap(model)))

    @torch.no_grad()
    def calibrate(self, model: nn.Module, images: Iterable[torch.Tensor], batches: int | None = None) -> int:
        """Initialise every uninitialised scale: weights from the weights, activations from ``images`` batches.

        The model runs in train mode (activations as QAT will see them) with BN statistics saved and restored, so
        calibration leaves no trace but the scales. Already initialised quantizers (e.g. learned scales of a resumed
        checkpoint) are never touched. Under torch.distributed, rank 0's result is broadcast so ranks agree.

        Returns:
            The number of quantizers initialised.
        """
        model = unwrap(model)
        batches = batches or self.config.calibration.batches
        todo = [q for _, q in quantizers(model) if not q._initialized]
        for m in model.modules():
            if isinstance(m, QConv2d) and not m.weight_fake_quant._initialized:
                m.weight_fake_quant.init_weight(m.weight)
        acts = [q for q in todo if q.kind == "activation"]
        if acts:
            bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
            was_training = model.training
            for q in acts:
                q.start_observing()
            model.train()
            seen = 0
            try:
                for img in images:
                    model(img)
                    seen += 1
                    if seen >= batches:
                        break
                for q in acts:
                    q.finish_observing()
            finally:
                for q in acts:
                    q._observer = None
                model.load_state_dict(bn_state, strict=False)
                model.train(was_training)
            LOGGER.info(f"QAT: calibrated {len(acts)} activation scales on {seen} batches")
        self._broadcast(model)
        return len(todo)

    @staticmethod
    def _broadcast(model: nn.Module) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for _, q in quantizers(model):
            for t in (q.scale.data, q.qrange, q.initialized):
                torch.distributed.broadcast(t, src=0)
            q.bits, q.qn, q.qp = (int(v) for v in q.qrange.tolist())
            q._initialized = bool(q.initialized)

    # -- optimizer ---------------------------------------------------------------------------------------------------
    def scale_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The learned scales, in module order."""
        return [q.scale for _, q in quantizers(unwrap(model))]

    def add_scale_group(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Move the scales out of the optimizer's groups into their own group (no weight decay, own lr multiplier)."""
        scales = self.scale_parameters(model)
        ids = {id(p) for p in scales}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        # Ultralytics sets lr and momentum per group (optimizer.defaults holds torch's defaults, not the lr in use):
        # copy the weight group's hyperparameters, so warm-up and the scheduler move the scales' lr in step with it
        ref = next((g for g in optimizer.param_groups if g.get("param_group") == "weight"), optimizer.param_groups[0])
        hyper = {k: v for k, v in ref.items() if k not in {"params", "param_group", "weight_decay", "initial_lr", "use_muon"}}
        if any("use_muon" in g for g in optimizer.param_groups):
            hyper["use_muon"] = False  # 1-D scales get MuSGD's SGD update only
        optimizer.add_param_group(
            {
                **hyper,
                "params": scales,
                "lr": ref["lr"] * self.config.optim.scale_lr_mult,
                "weight_decay": self.config.optim.scale_weight_decay,
                "param_group": "qat_scale",
            }
        )
