"""QAT fine-tune defaults (qat.finetune): applied only to float-checkpoint starts, a user's value always wins."""

import pytest
import torch
from ultralytics import YOLO

from qat_test_utils import TRAIN_ARGS
from ultralytics_qat import QATDetectionTrainer, add_qat_callbacks
from ultralytics_qat.config import QATConfig
from ultralytics_qat.engine.run import _float_start


@pytest.fixture(scope="module")
def float_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "fp.pt"
    YOLO("yolov8n.yaml").save(path)  # a float checkpoint as Ultralytics writes it
    return path


# a recipe's fine-tune values (the bundled default keeps every one null: Ultralytics' choice measured best)
FT = {"optimizer": "AdamW", "lr0": 1e-4, "warmup_epochs": 1.0, "warmup_bias_lr": 0.0, "mosaic": 0.0, "close_mosaic": 0}
FT_OVERRIDES = {f"qat.finetune.{k}": v for k, v in FT.items()}


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if "fine-tuning a float checkpoint" in r.getMessage()]


def _trainer(tmp_path, **kw):
    return QATDetectionTrainer(overrides=dict(project=str(tmp_path), name="t", **kw))


def test_bundled_default_keeps_ultralytics_choices(float_pt, coco8, tmp_path, caplog):
    assert all(v is None for v in vars(QATConfig.load().finetune).values())
    t = _trainer(tmp_path, model=str(float_pt), data=str(coco8))
    assert (t.args.optimizer, t.args.warmup_bias_lr, t.args.mosaic) == ("auto", 0.1, 1.0)
    assert not _lines(caplog)


def test_float_start_gets_the_recipe_values_and_user_values_win(float_pt, coco8, tmp_path, caplog):
    ft = QATConfig.load(overrides={k.removeprefix("qat."): v for k, v in FT_OVERRIDES.items()}).finetune
    t = _trainer(tmp_path, model=str(float_pt), data=str(coco8), lr0=0.02, mosaic=0.5, **FT_OVERRIDES)
    assert (t.args.optimizer, t.args.warmup_epochs, t.args.warmup_bias_lr, t.args.close_mosaic) == (
        ft.optimizer, ft.warmup_epochs, ft.warmup_bias_lr, ft.close_mosaic)
    assert (t.args.lr0, t.args.mosaic) == (0.02, 0.5)  # the user's
    (line,) = _lines(caplog)
    assert f"optimizer={ft.optimizer}" in line and "yours kept: lr0=0.02 mosaic=0.5" in line and "\n" not in line
    assert "warmup_bias_lr: 0.0" in (t.save_dir / "args.yaml").read_text()


def test_yaml_qat_checkpoint_and_resume_starts_keep_ultralytics_args(qat_run, coco8, tmp_path, caplog, float_pt):
    for model in ("yolov8n.yaml", str(qat_run / "weights" / "best.pt")):
        t = _trainer(tmp_path, model=model, data=str(coco8), **FT_OVERRIDES)
        assert (t.args.optimizer, t.args.warmup_bias_lr, t.args.mosaic) == ("auto", 0.1, 1.0), model
    assert not _lines(caplog)
    assert not _float_start({"model": str(float_pt), "resume": True}) and _float_start({"model": str(float_pt)})
    assert _float_start({"model": "yolov8n.yaml", "pretrained": str(float_pt)})
    assert not _float_start({"model": str(qat_run / "weights" / "last.pt")})
    t = _trainer(tmp_path, model=str(float_pt), data=str(coco8), **{**FT_OVERRIDES, "qat.finetune.optimizer": None,
                                                                       "qat.finetune.warmup_bias_lr": None})
    assert (t.args.optimizer, t.args.warmup_bias_lr, t.args.mosaic) == ("auto", 0.1, 0.0)  # null = Ultralytics'


@pytest.mark.slow
def test_dropin_door_applies_them_to_the_optimizer_it_builds(float_pt, coco8, tmp_path, caplog):
    seen = {}

    def grab(trainer):
        seen["opt"] = type(trainer.optimizer).__name__
        seen["lr"] = {g["initial_lr"] for g in trainer.optimizer.param_groups if g.get("param_group") != "qat_scale"}
        seen["args"] = trainer.args
        raise KeyboardInterrupt

    model = YOLO(str(float_pt))
    add_qat_callbacks(model, **{k.removeprefix("qat."): v for k, v in FT_OVERRIDES.items()})
    model.add_callback("on_pretrain_routine_end", grab)
    with pytest.raises(KeyboardInterrupt):
        model.train(data=str(coco8), project=str(tmp_path), warmup_epochs=2.0, **{**TRAIN_ARGS, "epochs": 1})
    ft = QATConfig.load(overrides={k.removeprefix("qat."): v for k, v in FT_OVERRIDES.items()}).finetune
    assert seen["opt"] == ft.optimizer and seen["lr"] == {ft.lr0}
    assert seen["args"].warmup_epochs == 2.0 and seen["args"].warmup_bias_lr == ft.warmup_bias_lr
    (line,) = _lines(caplog)
    assert "yours kept: warmup_epochs=2.0" in line
    assert not any("optimizer=auto ignores" in r.getMessage() for r in caplog.records)
    assert torch.load(float_pt, weights_only=False).get("qat") is None
