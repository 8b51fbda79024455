"""qat.distill: the frozen float teacher supervises the QAT student, and never enters the student's checkpoints."""

import copy
import csv
import math
import pickle

import pytest
import torch

from ultralytics_qat.config import QATConfig
from ultralytics_qat.controller import QATController
from ultralytics_qat.distill import (ENTRY_KEY, DistillCriterion, Distiller, build_distiller, feat_term, head_outputs,
                                     head_term)
from ultralytics_qat.errors import QATCheckpointError, QATError
from ultralytics_qat.quant import class_count


def _model(nc=4):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    m.args = get_cfg()  # loss gains, as the trainer sets them
    return m


def _batch(n=2, size=64):
    g = torch.Generator().manual_seed(3)
    return {"img": torch.rand(n, 3, size, size, generator=g), "cls": torch.zeros(n, 1),
            "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]] * n), "batch_idx": torch.arange(n, dtype=torch.float32)}


def _student_and_distiller(loss="both"):
    float_model = _model()
    cfg = QATConfig.from_dict({"distill": {"weight": 1.0, "loss": loss}})
    distiller = Distiller(copy.deepcopy(float_model), cfg.distill, None)
    student = float_model
    ctl = QATController(cfg)
    ctl.prepare(student, verbose=False)
    ctl.calibrate(student, [_batch()["img"]], batches=1)
    distiller.wrap(student)
    return student, distiller


def test_terms_are_zero_at_a_match_and_positive_otherwise():
    m = _model().eval()
    with torch.no_grad():
        (out,) = head_outputs(m(_batch()["img"]))
    assert abs(float(head_term(out, out, 2.0))) < 1e-4 and float(feat_term(out, out)) == 0.0
    other = {k: (v * 1.5 if torch.is_tensor(v) else [f * 1.5 for f in v]) for k, v in out.items()}
    assert float(head_term(other, out, 1.0)) > 1e-3 and float(feat_term(other, out)) > 1e-3


def test_feat_term_stays_bounded_where_the_teacher_has_a_constant_channel():
    gen = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 8, 4, 4, generator=gen)]
    t[0][:, 3] = 0.25  # a dead channel: the teacher never varies it
    s = [t[0].clone()]
    s[0][:, 3] += 0.01  # the student is off by a hundredth on it
    term = float(feat_term({"feats": s}, {"feats": t}))
    spread = float(t[0].std((0, 2, 3)).mean())
    # in units of a tenth of the level's spread: ~ (0.01 / (0.1 * spread))^2 / 8 channels, not (0.01 / 1e-6)^2
    assert 0 < term < 1.0 and term == pytest.approx((0.01 / (0.1 * spread)) ** 2 / 8, rel=0.2)


@pytest.mark.slow
def test_the_term_is_a_loss_component_whose_gradient_reaches_the_student_only():
    student, distiller = _student_and_distiller("both")  # head and feat terms (the doors' tests train each alone)
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=1e-2)
    for _ in range(2):
        total, items = student.loss(_batch())
        assert total.shape == (4,) and float(total[-1].detach()) > 0 and set(items) == {"box_loss", "cls_loss", "dfl_loss"}
        opt.zero_grad()
        total[-1].backward()  # the distillation component alone
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
        opt.step()
    assert not distiller.teacher.training and not any(p.requires_grad for p in distiller.teacher.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for k, v in distiller.teacher.state_dict().items():  # BN statistics included: the teacher never moves
        assert torch.equal(v, teacher_before[k]), k
    assert distiller.epoch_mean() > 0 and math.isnan(distiller.epoch_mean())  # the mean resets


def test_the_teacher_is_never_part_of_the_student():
    student, distiller = _student_and_distiller()
    teacher_params = {id(p) for p in distiller.teacher.parameters()}
    assert not teacher_params & {id(p) for p in student.parameters()}
    assert not any(m is distiller.teacher for m in student.modules())
    assert isinstance(student.criterion, DistillCriterion)
    clone = copy.deepcopy(student)  # e.g. an EMA made later: the plain criterion, no teacher
    assert not isinstance(clone.criterion, DistillCriterion)
    plain = _model()
    QATController(QATConfig()).prepare(plain, verbose=False)
    plain.criterion = plain.init_criterion()
    assert len(pickle.dumps(student)) < 1.01 * len(pickle.dumps(plain))


def test_distill_needs_float_weights():
    with pytest.raises(QATError, match="needs the float weights"):
        build_distiller(_model(), None, False, QATConfig.from_dict({"distill": {"weight": 1.0}}).distill)


def test_head_distillation_refuses_a_teacher_of_another_class_count():
    coco_teacher = _model(nc=80)  # e.g. yolov8n.pt fine-tuned on a 4-class dataset: its class outputs are not these
    for loss in ("head", "both"):
        cfg = QATConfig.from_dict({"distill": {"weight": 1.0, "loss": loss}}).distill
        with pytest.raises(QATError, match="predicts 80 classes and the dataset has 4"):
            build_distiller(_model(nc=4), coco_teacher, False, cfg)
    feat = QATConfig.from_dict({"distill": {"weight": 1.0, "loss": "feat"}}).distill
    assert class_count(build_distiller(_model(nc=4), coco_teacher, False, feat).teacher) == 4  # neck features apply


# -- through the trainer (both doors) ----------------------------------------------------------------------------------
SHORT = dict(epochs=1, imgsz=64, batch=4, nbs=4, workers=0, plots=False, seed=0, deterministic=True)


@pytest.fixture(scope="module")
def float_pt(tmp_path_factory):
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("float") / "fp.pt"
    YOLO("yolov8n.yaml").save(path)
    return path


def _train(float_pt, coco8, project, name, door="trainer", qat="lsq", **dotted):
    from ultralytics import YOLO

    from ultralytics_qat import QATDetectionTrainer, add_qat_callbacks

    model = YOLO(str(float_pt))
    args = dict(data=str(coco8), project=str(project), name=name, **SHORT)
    if door == "trainer":
        model.train(trainer=QATDetectionTrainer, qat=qat, **{f"qat.{k}": v for k, v in dotted.items()}, **args)
        run = model.trainer.qat_run
    else:
        add_qat_callbacks(model, qat=qat, **dotted)
        model.train(**args)
        run = next(f.__self__ for f in model.trainer.callbacks["on_train_epoch_end"] if hasattr(f, "__self__")
                   and type(f.__self__).__name__ == "QATRun")
    return model.trainer, run


def _float_state(float_pt):
    from ultralytics.nn.tasks import load_checkpoint

    return load_checkpoint(float_pt)[0].state_dict()


def _check_teacher(run, float_pt):
    d = run.distiller
    assert not d.teacher.training and not any(p.requires_grad for p in d.teacher.parameters())
    fp = _float_state(float_pt)
    for k, v in d.teacher.state_dict().items():  # after training: still exactly the float model
        assert torch.equal(v.cpu(), fp[k].to(v.dtype)), k


def _distill_column(trainer):
    with open(trainer.save_dir / "results.csv") as f:
        return [float(r["qat/distill_loss"]) for r in csv.DictReader(f)]


def _tensors(obj, prefix=""):
    """Every tensor in a checkpoint (modules by state_dict), by path."""
    if isinstance(obj, torch.nn.Module):
        return {f"{prefix}{k}": v for k, v in obj.state_dict().items()}
    if torch.is_tensor(obj):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _tensors(val, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _tensors(val, f"{prefix}{i}/").items()}
    return {}


@pytest.mark.slow
def test_both_doors_distill_and_keep_the_teacher_frozen(float_pt, coco8, tmp_path):
    trainer, run = _train(float_pt, coco8, tmp_path, "door1", door="trainer", qat="qat", **{"distill.weight": 1.0})
    _check_teacher(run, float_pt)
    assert all(v > 0 and math.isfinite(v) for v in _distill_column(trainer))
    trainer, run = _train(float_pt, coco8, tmp_path, "door2", door="callbacks", **{"distill.weight": 1.0,
                                                                                  "distill.loss": "feat"})
    _check_teacher(run, float_pt)
    assert all(v > 0 and math.isfinite(v) for v in _distill_column(trainer))


@pytest.mark.slow
def test_checkpoints_hold_the_teacher_source_but_not_the_teacher(float_pt, coco8, tmp_path):
    import shutil

    float_pt = shutil.copy(float_pt, tmp_path / "fp.pt")  # this test changes the file
    plain, _ = _train(float_pt, coco8, tmp_path, "plain")
    distilled, run = _train(float_pt, coco8, tmp_path, "distill", **{"distill.weight": 1.0})
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(t.wdir / name, map_location="cpu", weights_only=False) for t in (plain, distilled))
        assert b["qat"][ENTRY_KEY] == run.distiller.source and ENTRY_KEY not in a["qat"]
        ta, tb = _tensors(a), _tensors(b)
        assert set(ta) == set(tb), name  # same tensors, none of the teacher's
        size_a, size_b = ((t.wdir / name).stat().st_size for t in (plain, distilled))
        assert abs(size_b - size_a) < 0.01 * size_a, (name, size_a, size_b)

    # resume/fine-tune from the checkpoint: the teacher is rebuilt from the float file the entry records
    from ultralytics.nn.tasks import load_checkpoint

    weights = load_checkpoint(distilled.last)[0]
    cfg = QATConfig.from_dict({"distill": {"weight": 1.0}}).distill
    rebuilt = build_distiller(_model(80), weights, True, cfg)
    fp = _float_state(float_pt)
    assert all(torch.equal(v, fp[k].to(v.dtype)) for k, v in rebuilt.teacher.state_dict().items())
    with open(float_pt, "ab") as f:
        f.write(b"\0")  # the float file changed since the run started
    with pytest.raises(QATCheckpointError, match="changed since the run started"):
        build_distiller(_model(80), weights, True, cfg)
    float_pt.unlink()
    with pytest.raises(QATCheckpointError, match="no longer exists"):
        build_distiller(_model(80), weights, True, cfg)


def test_ddp_pickles_the_run_without_its_teacher():
    """DDP pickles the callbacks (so the run) for its workers: each rank builds its own teacher in get_model."""
    from ultralytics_qat.engine import QATRun

    run = QATRun(None, {"distill.weight": 1.0})
    run.distiller = Distiller(_model(), run.qat.config.distill, None)
    data = pickle.dumps(run)
    assert pickle.loads(data).distiller is None
    assert len(data) < 0.1 * len(pickle.dumps(run.distiller.teacher))
