"""Distributed training on CPU: the DDP hand-off keeps the qat config; gloo ranks keep identical QAT state."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ultralytics_qat.controller import QATController, quantizers

pytestmark = pytest.mark.slow


def test_ddp_handoff_rebuilds_trainer_with_same_qat_config(coco8, tmp_path):
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.dist import generate_ddp_file
    from ultralytics.utils.patches import torch_load

    from ultralytics_qat import QATDetectionTrainer

    overrides = {"model": "yolov8n.yaml", "data": str(coco8), "project": str(tmp_path), "device": "cpu",
                 "qat": {"weight": {"bits": 3}, "exclude": ["model.9*"]}, "qat.activation.bits": 6}
    parent = QATDetectionTrainer(overrides=overrides)
    with parent.qat_in_args():
        file = generate_ddp_file(parent)  # exactly what Ultralytics' DDP launcher writes for its workers
    assert not hasattr(parent.args, "qat")  # the parent's args stay valid for Ultralytics
    state = torch_load(file.replace(".py", ".pt"), map_location="cpu")
    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir="")
    worker = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])  # as the worker does
    assert worker.qat.config == parent.qat.config
    assert worker.qat.config.weight.bits == 3 and worker.qat.config.activation.bits == 6
    assert not hasattr(worker.args, "qat")
    from ultralytics_qat.engine import QATRun

    for event in ("on_pretrain_routine_end", "on_train_batch_end", "on_train_epoch_end"):  # one QAT hook per event
        owners = [f.__self__ for f in worker.callbacks[event] if isinstance(getattr(f, "__self__", None), QATRun)]
        assert len(owners) == 1 and owners[0].qat is worker.qat, event
    os.remove(file)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out
    return [t for o in items for t in _tensors(o)]


def _worker(rank, world, port, out):
    from ultralytics.nn.tasks import DetectionModel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same init on every rank, as Ultralytics' seeding gives
    model = DetectionModel("yolov8n.yaml", nc=4, verbose=False)
    ctl = QATController()
    ctl.prepare(model, verbose=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)  # as Ultralytics
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data, as a DistributedSampler gives
    ctl.calibrate(ddp, [torch.rand(2, 3, 64, 64, generator=gen)], batches=1)  # ranks would disagree without broadcast
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
    ddp.train()
    for _ in range(3):
        preds = ddp(torch.rand(2, 3, 64, 64, generator=gen))
        loss = sum(t.float().pow(2).mean() for t in _tensors(preds))
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".scale" in k or ".weight" in k}
    state["_qranges"] = torch.stack([q.qrange for _, q in quantizers(model)])
    torch.save(state, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gloo_two_ranks_keep_identical_scales_and_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert set(r0) == set(r1) and any(".scale" in k for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def _batch(gen, n=2, size=64):
    """A detection batch as Ultralytics' preprocess gives it: one box per image."""
    return {"img": torch.rand(n, 3, size, size, generator=gen), "cls": torch.zeros(n, 1),
            "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]] * n), "batch_idx": torch.arange(n, dtype=torch.float32)}


def _recipe_worker(rank, world, port, out):
    """The default recipe (tracking, freezing, EMA, BN re-estimation, QC) driven through its hooks on 2 gloo ranks."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA

    from ultralytics_qat.stabilize import TrainState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=4, verbose=False)
    model.args = get_cfg()  # loss gains, as the trainer sets them
    ctl = QATController(None, {"oscillation.freeze_start": 0.0, "oscillation.momentum": 0.5})
    ctl.prepare(model, verbose=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    gen = torch.Generator().manual_seed(100 + rank)  # training batches differ per rank (DistributedSampler)
    aux = [_batch(torch.Generator().manual_seed(7)) for _ in range(2)]  # the run's own loader: the same on every rank
    ctl.calibrate(ddp, [b["img"] for b in aux], batches=1)
    ema = ModelEMA(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-2, momentum=0.9)
    ctl.add_scale_group(opt, model)
    epochs, nb = 2, 3

    def state(epoch, i=0):
        return TrainState(model=model, ema=ema.ema, optimizer=opt, epoch=epoch, epochs=epochs, batch=i,
                          batches_per_epoch=nb, batches=lambda: iter(aux), log={})

    ctl.run("on_train_start", state(0))
    for epoch in range(epochs):
        ctl.run("on_epoch_start", state(epoch))
        ddp.train()
        for i in range(nb):
            ctl.run("on_batch_start", state(epoch, i))
            loss, _ = ddp(_batch(gen))
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            ema.update(model)
            ctl.run("on_batch_end", state(epoch, i))
        ctl.epoch_end(state(epoch))
    ctl.finalize(state(epochs - 1))
    out_state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out_state.update({f"ema.{k}": v.detach().clone() for k, v in ema.ema.state_dict().items()})
    torch.save(out_state, f"{out}/recipe{rank}.pt")
    dist.destroy_process_group()


def test_gloo_two_ranks_stay_identical_under_the_default_recipe(tmp_path):
    mp.spawn(_recipe_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"recipe{r}.pt") for r in (0, 1))
    assert any(k.endswith(".tracker.frozen") and v.any() for k, v in r0.items())  # freezing acted
    assert any(k.endswith(".tracker.freq") and v.any() for k, v in r0.items())  # tracking acted
    assert set(r0) == set(r1)
    # the training model's BN statistics follow each rank's own data (buffers are not synced, as in Ultralytics);
    # everything else, and the whole EMA after its BN re-estimation on the run's own batches, must agree
    local = ("running_mean", "running_var", "num_batches_tracked")
    for k in r0:
        if not (k.startswith("model.") and k.endswith(local)):
            assert torch.equal(r0[k], r1[k]), k


@torch.no_grad()
def _settle_bn(model, img):
    """BN running statistics of one batch, as a trained model has them (a fresh model's make eval outputs vanish)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()(img)
    for bn in bns:
        bn.momentum = 0.03


def _distill_worker(rank, world, port, out):
    """qat.distill on 2 gloo ranks: each rank holds its own frozen teacher; the student trains through DDP."""
    from copy import deepcopy

    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from ultralytics_qat.config import DistillConfig
    from ultralytics_qat.distill import Distiller

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=4, verbose=False)
    model.args = get_cfg()
    _settle_bn(model, torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    float_weights = deepcopy(model)  # stands in for the float .pt the run starts from
    distiller = Distiller.from_float(model, float_weights, DistillConfig(weight=1.0, loss="both"))
    teacher_start = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    ctl = QATController()
    ctl.prepare(model, verbose=False)
    distiller.wrap(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    gen = torch.Generator().manual_seed(100 + rank)
    ctl.calibrate(ddp, [torch.rand(2, 3, 64, 64, generator=gen)], batches=1)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-2, momentum=0.9)
    ddp.train()
    parts = []
    for _ in range(3):
        loss, _ = ddp(_batch(gen))
        parts.append(loss.detach().clone())
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    teacher = distiller.teacher.state_dict()
    torch.save({"student": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "teacher_moved": [k for k, v in teacher.items() if not torch.equal(v, teacher_start[k])],
                "teacher_grads": [n for n, p in distiller.teacher.named_parameters() if p.grad is not None],
                "parts": torch.stack(parts), "count": distiller.count},
               f"{out}/distill{rank}.pt")
    dist.destroy_process_group()


def test_gloo_two_ranks_distill_from_their_own_frozen_teacher(tmp_path):
    mp.spawn(_distill_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"distill{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        assert r["count"] == 3 and r["parts"].shape == (3, 4)  # box, cls, dfl + the distillation component
        assert (r["parts"][:, 3] > 0).all() and r["parts"].isfinite().all()  # the student (quantized) differs from its float teacher
        assert r["teacher_moved"] == [] and r["teacher_grads"] == []  # frozen, BN statistics included
        assert not any("teacher" in k for k in r["student"])  # the teacher is not in the student's state
    local = ("running_mean", "running_var", "num_batches_tracked")  # BN follows each rank's data, as in Ultralytics
    for k in r0["student"]:
        if not k.endswith(local):
            assert torch.equal(r0["student"][k], r1["student"][k]), k
