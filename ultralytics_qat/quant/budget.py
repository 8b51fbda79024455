"""Mixed precision under a budget: per-layer weight bits from a sensitivity file, within an average-bits budget.

The budget is ``qat.budget.avg_weight_bits``: the average weight width over every quantized weight element of the
model, ``sum_l n_l * b_l / sum_l n_l`` (n_l = weight elements of conv l), must not exceed it. Layers with a fixed width
(the first and last layers, user ``overrides``) count at their own bits; the free layers share what is left. Their
candidate widths are those the sensitivity file measured.

Choice (greedy on the marginal cost of a bit, exact on the budget): every free layer starts at the widest candidate;
while the budget is exceeded, the layer step down (to its next narrower candidate) with the least loss increase per
weight bit saved is taken; then, while any single step up still fits, the one with the largest loss decrease per bit
spent is taken. A layer's loss change is made monotone in the width first (a narrower grid never counts as better),
so measurement noise cannot make a step down look free. The result is written into ``qat.budget.choice`` (conv name
-> bits), which is what checkpoints store: resume and export rebuild exactly that model without the sensitivity file.
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch import nn

from ..config import QATConfig
from ..errors import QATConfigError
from .inject import plan_layers


def average_weight_bits(bits: dict[str, int], params: dict[str, int]) -> float:
    """``sum n_l b_l / sum n_l`` over the layers of ``bits``."""
    return sum(params[n] * b for n, b in bits.items()) / max(sum(params[n] for n in bits), 1)


def _monotone(deltas: dict[int, float]) -> dict[int, float]:
    """Loss change per width, made non-increasing in the width (a narrower grid is never cheaper)."""
    out, worst = {}, -math.inf
    for b in sorted(deltas, reverse=True):
        worst = max(worst, deltas[b])
        out[b] = worst
    return out


def choose_bits(model: nn.Module, cfg: QATConfig, sensitivity: dict) -> dict[str, int]:
    """The budget's weight bits of every free layer (see module docstring); a one-line error if none fit."""
    budget = cfg.budget.avg_weight_bits
    plans = plan_layers(model, replace(cfg, budget=replace(cfg.budget, choice={})))
    modules = dict(model.named_modules())
    params = {p.name: modules[p.name].weight.numel() for p in plans}
    fixed = {p.name: p.weight_bits for p in plans if p.role}
    free = [p.name for p in plans if not p.role]
    rows = {r["name"]: r for r in sensitivity["layers"]}
    missing = [n for n in free if n not in rows]
    if missing:
        raise QATConfigError(f"the sensitivity file has no row for '{missing[0]}' ({len(missing)} layers missing); "
                             "measure it on this model with the same qat layer policy (yolo-qat sensitivity)")
    cands = sorted(int(b) for b in sensitivity["bits"])
    delta = {n: _monotone({int(b): float(v) for b, v in rows[n]["delta"].items()}) for n in free}
    limit = math.floor(budget * sum(params.values()) + 1e-9)  # integer weight-bits allowed in total
    used_fixed = sum(params[n] * b for n, b in fixed.items())
    if used_fixed + sum(params[n] for n in free) * cands[0] > limit:
        least = (used_fixed + sum(params[n] for n in free) * cands[0]) / sum(params.values())
        raise QATConfigError(
            f"qat.budget.avg_weight_bits={budget} cannot be met: with every free layer at {cands[0]} bits the model "
            f"averages {least:.3f} (first/last layers and overrides count at their own bits); raise the budget or "
            "measure narrower widths"
        )
    bits = {n: cands[-1] for n in free}
    used = used_fixed + sum(params[n] * b for n, b in bits.items())

    def step(n, up):
        i = cands.index(bits[n]) + (1 if up else -1)
        return cands[i] if 0 <= i < len(cands) else None

    while used > limit:  # cheapest loss per saved bit first
        moves = [((delta[n][step(n, False)] - delta[n][bits[n]]) / (params[n] * (bits[n] - step(n, False))), n)
                 for n in free if step(n, False) is not None]
        _, n = min(moves)
        new = step(n, False)
        used -= params[n] * (bits[n] - new)
        bits[n] = new
    while True:  # spend what is left: largest gain per bit first, while it fits
        moves = [((delta[n][bits[n]] - delta[n][step(n, True)]) / (params[n] * (step(n, True) - bits[n])), n)
                 for n in free if step(n, True) is not None and used + params[n] * (step(n, True) - bits[n]) <= limit]
        if not moves:
            break
        _, n = max(moves)
        new = step(n, True)
        used += params[n] * (new - bits[n])
        bits[n] = new
    return bits


def apply_budget(model: nn.Module, cfg: QATConfig) -> QATConfig:
    """``cfg`` with ``budget.choice`` filled in (unchanged if the budget is off or already chosen)."""
    from ..utils import LOGGER
    from .sensitivity import load

    b = cfg.budget
    if b.avg_weight_bits is None or b.choice:
        return cfg
    chosen = choose_bits(model, cfg, load(b.sensitivity))
    out = replace(cfg, budget=replace(b, choice=chosen))
    plans = plan_layers(model, out)
    modules = dict(model.named_modules())
    avg = average_weight_bits({p.name: p.weight_bits for p in plans}, {p.name: modules[p.name].weight.numel() for p in plans})
    counts = {w: sum(v == w for v in chosen.values()) for w in sorted(set(chosen.values()))}
    LOGGER.info(f"QAT: budget {b.avg_weight_bits} average weight bits: {avg:.4f} reached with "
                + ", ".join(f"{c} layers at W{w}" for w, c in counts.items()) + " (role 'budget')")
    return out
