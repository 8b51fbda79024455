"""Ultralytics callbacks that drive a :class:`QATController` — shared by both front doors.

``QATDetectionTrainer`` registers them in its ``__init__`` (so DDP workers get them too). ``add_qat_callbacks`` puts
them, plus the quantizer surgery, on a vanilla Ultralytics trainer:

    >>> from ultralytics import YOLO
    >>> model = YOLO("yolov8n.pt")
    >>> add_qat_callbacks(model, qat="qat.yaml")
    >>> model.train(data="coco8.yaml", epochs=20)

Ultralytics never fires ``optimizer_step``/``on_params_update``, and fires ``on_train_epoch_start`` before
``model.train()``, so the hooks used are the batch and epoch events, and ``on_pretrain_routine_end`` (model,
optimizer, EMA and data loaders all exist there).
"""

from __future__ import annotations

import io
import math

import torch

from ..controller import CKPT_KEY, QATController, is_qat_model, unwrap
from ..stabilize import TrainState


class QATCallbacks:
    """Event handlers connecting an Ultralytics trainer to a controller.

    Args:
        controller: The controller that owns the QAT state.
        surgery: Insert quantizers and rebuild optimizer, scheduler and EMA at ``on_pretrain_routine_end`` (the
            drop-in path; the trainer subclass inserts them in ``get_model`` instead).
    """

    def __init__(self, controller: QATController, surgery: bool = False):
        self.qat = controller
        self.surgery = surgery
        self.batch = 0
        self.log: dict = {}
        self.columns: list | None = None  # qat/* keys of the first epoch: results.csv's header is written once

    def register(self, owner) -> None:
        """Add the handlers to ``owner`` (a trainer or a ``YOLO`` model), ahead of logger callbacks where it matters.

        Handlers of another ``QATCallbacks`` already there are removed first: a DDP worker receives the parent's
        pickled callbacks and then registers its own, and every hook must run once per event.
        """
        for fns in owner.callbacks.values():
            fns[:] = [f for f in fns if not isinstance(getattr(f, "__self__", None), QATCallbacks)]
        for event, fn in (
            ("on_pretrain_routine_end", self.on_pretrain_routine_end),
            ("on_train_epoch_start", self.on_train_epoch_start),
            ("on_train_batch_start", self.on_train_batch_start),
            ("on_train_batch_end", self.on_train_batch_end),
            ("on_model_save", self.on_model_save),
        ):
            owner.add_callback(event, fn)
        # before TensorBoard/CSV loggers read trainer.lr at this event, so qat/* scalars reach them this epoch
        owner.callbacks["on_train_epoch_end"].insert(0, self.on_train_epoch_end)

    # -- state -------------------------------------------------------------------------------------------------------
    def state(self, trainer) -> TrainState:
        def batches():
            for b in trainer.train_loader:
                yield trainer.preprocess_batch(b)

        epoch = getattr(trainer, "epoch", trainer.start_epoch)  # set by the training loop, not before it
        lf = getattr(trainer, "lf", None)
        base = [g.get("initial_lr", g["lr"]) * (lf(epoch) if lf else 1.0) for g in trainer.optimizer.param_groups]
        return TrainState(
            model=unwrap(trainer.model),
            ema=trainer.ema.ema if trainer.ema else None,
            optimizer=trainer.optimizer,
            epoch=epoch,
            epochs=trainer.epochs,
            batch=self.batch,
            batches_per_epoch=len(trainer.train_loader),
            batches=batches,
            log=self.log,
            base_lrs=base,
        )

    # -- events ------------------------------------------------------------------------------------------------------
    def on_pretrain_routine_end(self, trainer) -> None:
        """Quantize (drop-in), restore or calibrate scales, sync the EMA, configure EMA decay, start stabilizers."""
        if self.surgery and not is_qat_model(unwrap(trainer.model)):
            self._dropin_surgery(trainer)
        if self.qat.needs_calibration(trainer.model):
            st = self.state(trainer)
            self.qat.calibrate(trainer.model, st.images())
            trainer.ema.ema.load_state_dict(unwrap(trainer.model).state_dict())
        cfg = self.qat.config.ema
        trainer.ema.decay = lambda x, d=cfg.decay, tau=cfg.tau: d * (1 - math.exp(-x / tau))
        self.epoch_state = self.state(trainer)
        self.qat.run("on_train_start", self.epoch_state)

    def on_train_epoch_start(self, trainer) -> None:
        self.batch, self.log = 0, {}
        self.qat.run("on_epoch_start", self.state(trainer))

    def on_train_batch_start(self, trainer) -> None:
        self.qat.run("on_batch_start", self.state(trainer))

    def on_train_batch_end(self, trainer) -> None:
        self.qat.run("on_batch_end", self.state(trainer))
        self.batch += 1

    def on_train_epoch_end(self, trainer) -> None:
        """Post-QAT stages in the last epoch, BN re-estimation of the EMA, and qat/* scalars for the loggers."""
        final = trainer.epoch + 1 >= trainer.epochs
        self.qat.epoch_end(self.state(trainer), final=final)
        trainer.lr.update(self.csv_row())  # trainer.lr is saved to results.csv and logged to TensorBoard

    def csv_row(self) -> dict:
        """This epoch's qat/* scalars with the first epoch's keys, in its order (NaN where a value is missing).

        Ultralytics writes results.csv's header from the first row only, so the columns must never change.
        """
        if self.columns is None:
            self.columns = list(self.log)
        return {k: float(self.log.get(k, float("nan"))) for k in self.columns}

    def on_model_save(self, trainer) -> None:
        """Add the fp32 QAT state of the EMA to the checkpoints Ultralytics just wrote (it pickles them in fp16)."""
        write_qat_entry(trainer, self.qat)

    # -- drop-in -----------------------------------------------------------------------------------------------------
    def _dropin_surgery(self, trainer) -> None:
        from ultralytics.utils.torch_utils import ModelEMA

        if trainer.world_size > 1:
            from ..errors import QATError

            raise QATError("add_qat_callbacks does not support DDP; use trainer=QATDetectionTrainer for multi-GPU QAT")
        model = unwrap(trainer.model)
        self.qat.prepare(model)
        args = trainer.args
        weight_decay = args.weight_decay * trainer.batch_size * trainer.accumulate / args.nbs
        iterations = math.ceil(len(trainer.train_loader.dataset) / max(trainer.batch_size, args.nbs)) * trainer.epochs
        trainer.optimizer = trainer.build_optimizer(
            model=trainer.model, name=args.optimizer, lr=args.lr0, momentum=args.momentum, decay=weight_decay,
            iterations=iterations,
        )
        self.qat.add_scale_group(trainer.optimizer, trainer.model)
        trainer._setup_scheduler()
        trainer.scheduler.last_epoch = trainer.start_epoch - 1
        trainer.ema = ModelEMA(trainer.model)
        if trainer.resume and str(trainer.args.model).endswith(".pt"):
            ckpt = torch.load(trainer.args.model, map_location="cpu", weights_only=False)
            if ckpt.get("optimizer") is not None:
                trainer.optimizer.load_state_dict(ckpt["optimizer"])
            trainer.ema.updates = ckpt.get("updates", 0)
            if isinstance(ckpt.get(CKPT_KEY), dict):
                QATController.restore(trainer.model, ckpt[CKPT_KEY])
                QATController.restore(trainer.ema.ema, ckpt[CKPT_KEY])


def write_qat_entry(trainer, controller: QATController) -> None:
    """Rewrite the checkpoints of this epoch with ``ckpt["qat"]`` (fp32 EMA state and the config) added."""
    if not trainer.last.exists():
        return
    ckpt = torch.load(trainer.last, map_location="cpu", weights_only=False)
    ckpt[CKPT_KEY] = controller.checkpoint_entry(trainer.ema.ema)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    data = buffer.getvalue()
    trainer.last.write_bytes(data)
    if trainer.best_fitness == trainer.fitness:
        trainer.best.write_bytes(data)
    if trainer.save_period > 0 and trainer.epoch % trainer.save_period == 0:
        (trainer.wdir / f"epoch{trainer.epoch}.pt").write_bytes(data)


def add_qat_callbacks(model, qat=None, **overrides) -> QATController:
    """Make a vanilla Ultralytics ``model.train(...)`` run QAT: quantizers, calibration, stabilizers, checkpoints.

    Args:
        model: An Ultralytics ``YOLO`` object (or anything with ``add_callback``/``callbacks``).
        qat: qat.yaml path, bundled recipe name, dict or QATConfig; None = the bundled default.
        **overrides: Dotted qat overrides, e.g. ``**{"weight.bits": 3}``.

    Returns:
        The controller, for inspection after training.
    """
    controller = QATController(qat, overrides)
    QATCallbacks(controller, surgery=True).register(model)
    return controller
