"""qat.budget: per-layer weight bits from a sensitivity file, the average-bits budget met exactly, saved and restored."""

import json
import random

import pytest
import torch

from ultralytics_qat import checkpoint as ckpt_io
from ultralytics_qat.config import QATConfig
from ultralytics_qat.controller import QATController
from ultralytics_qat.errors import QATConfigError
from ultralytics_qat.quant import QConv2d, plan_layers
from ultralytics_qat.quant.budget import average_weight_bits, choose_bits


def _model():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=4, verbose=False)


def _sensitivity(model, path, seed=0, bits=(2, 3, 4)):
    """A sensitivity file for the model's layers (random but plausible: fewer bits, larger loss change)."""
    rng = random.Random(seed)
    rows = []
    for p in plan_layers(model, QATConfig()):
        base = rng.uniform(0.01, 1.0)
        rows.append({"name": p.name, "params": 0, "role": p.role,
                     "delta": {str(b): base * 4.0 ** (4 - b) + rng.uniform(-0.01, 0.01) for b in bits}})
    path.write_text(json.dumps({"format": 1, "float_loss": 1.0, "bits": list(bits), "layers": rows}))
    return path


def _bits_and_params(model):
    convs = {n: m for n, m in model.named_modules() if isinstance(m, QConv2d)}
    return ({n: m.weight_fake_quant.bits for n, m in convs.items()}, {n: m.weight.numel() for n, m in convs.items()})


@pytest.mark.parametrize("budget", [3.0, 3.5, 3.9, 4.5])
def test_the_budget_is_met_exactly_over_all_quantized_weights(tmp_path, budget):
    model = _model()
    ctl = QATController(None, {"budget.avg_weight_bits": budget, "budget.sensitivity": str(_sensitivity(model, tmp_path / "s.json"))})
    ctl.prepare(model, verbose=False)
    bits, params = _bits_and_params(model)
    avg = average_weight_bits(bits, params)
    assert avg <= budget  # first/last layers at 8 bits count too
    free = [n for n, b in ctl.config.budget.choice.items()]
    assert free and all(bits[n] == ctl.config.budget.choice[n] for n in free)
    left = budget * sum(params.values()) - sum(params[n] * bits[n] for n in bits)
    if budget < 4.5:  # and nothing is wasted: no single free layer could step up one width within the budget
        assert all(params[n] * (bits[n] + 1) - params[n] * bits[n] > left for n in free if bits[n] < 4)
    else:  # above what the widest candidate needs: every free layer at 4 bits
        assert {bits[n] for n in free} == {4}
    assert "budget" in {p.role for p in ctl.plans}


def test_more_sensitive_layers_keep_more_bits(tmp_path):
    model = _model()
    path = _sensitivity(model, tmp_path / "s.json")
    cfg = QATConfig.load(None, {"budget.avg_weight_bits": 3.5, "budget.sensitivity": str(path)})
    chosen = choose_bits(model, cfg, json.loads(path.read_text()))
    rows = {r["name"]: r["delta"]["2"] for r in json.loads(path.read_text())["layers"]}
    params = {n: m.weight.numel() for n, m in model.named_modules() if n in chosen}
    same_size = {}
    for n, b in chosen.items():
        same_size.setdefault(params[n], []).append((rows[n], b))
    for group in same_size.values():  # among layers of one size, a more sensitive one never gets fewer bits
        group.sort()
        assert [b for _, b in group] == sorted(b for _, b in group), group


def test_an_impossible_budget_and_a_missing_file_are_one_line_errors(tmp_path):
    model = _model()
    path = _sensitivity(model, tmp_path / "s.json")
    with pytest.raises(QATConfigError, match="cannot be met"):
        QATController(None, {"budget.avg_weight_bits": 2.0, "budget.sensitivity": str(path)}).prepare(_model(), verbose=False)
    with pytest.raises(QATConfigError, match="not found"):
        QATController(None, {"budget.avg_weight_bits": 3.5, "budget.sensitivity": str(tmp_path / "x.json")}).prepare(
            _model(), verbose=False)
    with pytest.raises(QATConfigError, match="needs 'budget.sensitivity'"):
        QATConfig.load(None, {"budget.avg_weight_bits": 3.5})


def test_the_choice_is_saved_and_restored_without_the_sensitivity_file(tmp_path):
    model = _model()
    path = _sensitivity(model, tmp_path / "s.json")
    ctl = QATController(None, {"budget.avg_weight_bits": 3.5, "budget.sensitivity": str(path)})
    ctl.prepare(model, verbose=False)
    ctl.calibrate(model, [torch.rand(1, 3, 64, 64)], batches=1)
    bits, _ = _bits_and_params(model)
    assert model.qat_config["budget"]["choice"] == ctl.config.budget.choice
    path.unlink()  # resume and export must not need it
    pickled, entry = ckpt_io.deploy_pickle_and_entry(model, ctl.config.to_dict())
    restored = ckpt_io.materialize(pickled, entry)
    ckpt_io.restore(restored, entry)
    assert _bits_and_params(restored)[0] == bits
    again = _model()  # a resumed run: the checkpoint's config, choice included, on a fresh float model
    QATController(QATConfig.from_dict(entry["config"])).prepare(again, verbose=False)
    assert _bits_and_params(again)[0] == bits


@pytest.mark.slow
def test_a_trained_budget_run_saves_its_choice_and_loads_it_back(coco8, tmp_path):
    from ultralytics import YOLO

    from ultralytics_qat import QATDetectionTrainer
    from ultralytics_qat.checkpoint import load_qat_model

    path = _sensitivity(_model(), tmp_path / "s.json")  # layer names do not depend on the class count
    model = YOLO("yolov8n.yaml")
    model.train(trainer=QATDetectionTrainer, data=str(coco8), project=str(tmp_path), name="b", epochs=1, imgsz=64,
                batch=4, nbs=4, workers=0, plots=False, qat="lsq",
                **{"qat.budget.avg_weight_bits": 3.5, "qat.budget.sensitivity": str(path)})
    choice = model.trainer.qat.config.budget.choice
    assert choice
    path.unlink()
    for name in ("best.pt", "last.pt"):
        loaded, ckpt = load_qat_model(model.trainer.wdir / name)
        assert ckpt["qat"]["config"]["budget"]["choice"] == choice
        bits, params = _bits_and_params(loaded)
        assert all(bits[n] == b for n, b in choice.items()) and average_weight_bits(bits, params) <= 3.5
