"""QATRun: the one object that owns a QAT training run inside an Ultralytics trainer.

Both front doors call it the same way. ``QATDetectionTrainer`` overrides the trainer methods in
:data:`TRAINER_HOOKS` to delegate here; ``add_qat_callbacks`` binds the very same methods onto a vanilla trainer
instance at ``on_pretrain_routine_start`` (fired in the trainer's ``__init__``, before ``get_model``), so the two
doors share surgery, config adoption, the AMP policy, the optimizer's scale group, exact restore on resume and NaN
recovery, checkpoint writing and the finalize step. This module is the only code that reads Ultralytics' trainer.

Life of a run:
    ``get_model``         build the model, load float weights, insert quantizers, load QAT weights (their own config)
    ``build_optimizer``   Ultralytics' optimizer plus a scale group that follows the weight group's lr
    pretrain end          calibrate on the run's own loader, sync the EMA, QAT EMA decay, stabilizers start
    batches, epoch end    stabilizer hooks; before each validation BN re-estimation of the EMA
    ``save_model``        last.pt resumable, best.pt compact (deploy kind), each written atomically
    ``final_eval``        post-QAT stages once, whatever stopped training; validate; final files; validate best.pt

Auxiliary passes (calibration, BN re-estimation, QC, AFW) read a loader of their own over the training dataset,
with their own random streams: the training iterator and its augmentation randomness are never touched.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from copy import copy
from datetime import datetime
from functools import partial

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from ..config import QATConfig
from ..controller import QATController, unwrap
from ..distill import ENTRY_KEY as DISTILL_KEY
from ..distill import build_distiller
from ..errors import QATCheckpointError, QATError
from ..quant import class_count
from ..report import LayerStats
from ..stabilize import TrainState
from ..utils import LOGGER

# Trainer methods the run takes over (both doors); each maps to a QATRun method of the same name without underscores.
TRAINER_HOOKS = ("get_model", "get_validator", "build_optimizer", "save_model", "_load_checkpoint_state", "final_eval",
                 "plot_metrics")


class AuxBatches:
    """Preprocessed batches of the training dataset from a loader of their own, with their own random streams.

    Ultralytics' augmentations draw from Python's and NumPy's global generators; around every batch this swaps in
    the pass's own generator states and back, so a pass changes neither the training batches nor their augmentation.
    """

    def __init__(self, dataset, batch_size: int, seed: int, preprocess):
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=getattr(dataset, "collate_fn", None),
            generator=torch.Generator().manual_seed(seed),
        )
        self.preprocess = preprocess
        rng = random.Random(seed)
        self._py = rng.getstate()
        self._np = np.random.RandomState(seed).get_state()

    def __len__(self) -> int:
        return len(self.loader)

    @contextmanager
    def _own_random(self):
        saved = random.getstate(), np.random.get_state()
        random.setstate(self._py)
        np.random.set_state(self._np)
        try:
            yield
        finally:
            self._py, self._np = random.getstate(), np.random.get_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def __call__(self):
        it = iter(self.loader)
        while True:
            with self._own_random():
                batch = next(it, None)
            if batch is None:
                return
            yield self.preprocess(batch)


class QATRun:
    """A QAT run's life in an Ultralytics trainer (see module docstring).

    Args:
        qat: qat.yaml path, bundled recipe name, dict or QATConfig; None = the bundled default.
        overrides: Dotted qat overrides, e.g. ``{"weight.bits": 3}``.
        dropin: Drive a vanilla trainer (``add_qat_callbacks``): bind the trainer hooks at ``on_pretrain_routine_start``.
    """

    def __init__(self, qat=None, overrides: dict | None = None, dropin: bool = False):
        self.qat = QATController(qat, overrides)
        self.explicit = qat is not None or bool(overrides)  # a user-given config must agree with a QAT checkpoint's
        self.dropin = dropin
        self.bound = False
        self.batch = 0
        self.log: dict = {}
        self.columns: list | None = None  # qat/* keys of the first epoch: results.csv's header is written once
        self.post_qat: dict | None = None  # what the post-QAT stages did, saved in the final checkpoints
        self._aux: AuxBatches | None = None
        self.layers = LayerStats()  # per-layer statistics per epoch: <run>/qat_layers.csv (rank 0)
        self._finalizing = False  # final_eval's validations are not epochs the collapse guard watches
        self.distiller = None  # qat.distill: the frozen float teacher (never inside the student's module tree)

    def __getstate__(self):  # DDP pickles the callbacks (and so this run) for its workers: no loader, no teacher
        return {**self.__dict__, "_aux": None, "distiller": None}

    # -- doors -------------------------------------------------------------------------------------------------------
    def register(self, owner) -> None:
        """Add the event handlers to ``owner`` (a trainer or a ``YOLO`` model); a built trainer is bound at once.

        Handlers of another QATRun already there are removed first: a DDP worker receives the parent's pickled
        callbacks and then registers its own, and every hook must run once per event.
        """
        for fns in owner.callbacks.values():
            fns[:] = [f for f in fns if not isinstance(getattr(f, "__self__", None), QATRun)]
        events = ["on_pretrain_routine_end", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
                  "on_fit_epoch_end"]
        if self.dropin:
            events.insert(0, "on_pretrain_routine_start")
        for event in events:
            owner.add_callback(event, getattr(self, event))
        # before TensorBoard/CSV loggers read trainer.lr at this event, so qat/* scalars reach them this epoch
        owner.callbacks["on_train_epoch_end"].insert(0, self.on_train_epoch_end)
        if self.dropin and hasattr(owner, "save_model") and getattr(owner, "args", None) is not None:
            self.bind(owner)  # add_qat_callbacks(trainer) after its __init__: on_pretrain_routine_start has passed

    def bind(self, trainer) -> None:
        """Drop-in door: what ``QATDetectionTrainer`` does by subclassing, done on a vanilla trainer instance."""
        if self.bound:
            return
        if trainer.ddp or trainer.world_size > 1:
            raise QATError("add_qat_callbacks does not support DDP; use trainer=QATDetectionTrainer for multi-GPU QAT")
        from ultralytics.utils import DEFAULT_CFG_DICT

        args = vars(trainer.args)  # merged already: a value other than Ultralytics' default is the user's
        if self.apply_arg_policy(args, {k for k, v in args.items() if v != DEFAULT_CFG_DICT.get(k, v)}):
            from ultralytics.utils import YAML

            YAML.save(trainer.save_dir / "args.yaml", args)  # args.yaml was written before this event
        self.check_resume(trainer)
        for name in TRAINER_HOOKS:
            setattr(trainer, name, partial(getattr(self, name.strip("_")), trainer, getattr(trainer, name)))
        self.bound = True

    def apply_arg_policy(self, args: dict, user: set | None = None) -> bool:
        """Ultralytics args QAT changes: AMP off unless ``qat.amp``; ``qat.finetune`` values for a float start unless
        the user set them (``user``: the keys the user gave; None = every key in ``args``). True if ``args`` changed."""
        changed = self._finetune_defaults(args, set(args) if user is None else user)
        if self.qat.config.amp or args.get("amp") is False:
            return changed
        if args.get("amp") is not None:
            LOGGER.info("QAT: AMP switched off (fake quantization needs fp32; set qat.amp=true to keep it)")
        args["amp"] = False
        return True

    def _finetune_defaults(self, args: dict, user: set) -> bool:
        """QAT fine-tune hyperparameters (``qat.finetune``) for a start from a trained float checkpoint, in one line."""
        ft = {k: v for k, v in vars(self.qat.config.finetune).items() if v is not None}
        if not ft or not _float_start(args):
            return False
        chosen = {k: v for k, v in ft.items() if k not in user}
        kept = [f"{k}={args[k]}" for k in ft if k in user]
        args.update(chosen)
        if chosen:
            LOGGER.info(f"QAT: fine-tuning a float checkpoint with {' '.join(f'{k}={v}' for k, v in chosen.items())} "
                        f"(qat.finetune; Ultralytics' defaults are for training from scratch, see BENCHMARKS.md)"
                        f"{'; yours kept: ' + ' '.join(kept) if kept else ''}; qat.finetune.<key>=null keeps "
                        "Ultralytics' choice")
        return bool(chosen)

    def check_resume(self, trainer) -> None:
        """Refuse, in one line and before any data is loaded, to resume a finished run or a deploy checkpoint."""
        if not getattr(trainer, "resume", False):
            return
        path = trainer.args.model
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        why = ckpt_io.resume_refusal(path, ckpt)
        if why:
            raise QATCheckpointError(why)

    # -- trainer hooks (both doors) ----------------------------------------------------------------------------------
    def get_model(self, trainer, base, cfg=None, weights=None, verbose=True):
        """Build the detection model; float ``weights`` load before the quantizers go in, QAT ones (exactly) after."""
        from ultralytics.utils import RANK

        qat_weights = weights is not None and ckpt_io.carries_qat(weights)
        nc, src_nc = trainer.data.get("nc"), class_count(weights) if weights is not None else None
        if qat_weights and None not in (nc, src_nc) and nc != src_nc:
            raise QATCheckpointError(
                f"'{trainer.args.model}' is a QAT checkpoint for {src_nc} classes and this dataset has {nc}; its learned "
                "quantizers do not carry over to a new class count: start QAT from the float model"
            )
        if qat_weights:
            self._adopt_checkpoint_config(weights, bool(trainer.args.resume))
        model = base(cfg=cfg, weights=None, verbose=verbose)
        if weights is not None and not qat_weights:
            # float weights go in before the quantizers: on a new class count Ultralytics' load may replace the whole
            # class branch (its width follows nc), which would drop quantizers inserted before it
            model.load(weights, verbose=False)  # its count would include the quantizers a float model cannot fill
        if self.qat.config.distill.weight > 0:  # the teacher is the float model, copied before quantizers go in
            self.distiller = build_distiller(model, weights, qat_weights, self.qat.config.distill)
        self.qat.prepare(model, verbose=verbose and RANK in {-1, 0})
        if qat_weights:
            model.load(weights, verbose=False)
            ckpt_io.restore_exact(model, weights)
        if weights is not None and verbose and RANK in {-1, 0}:
            LOGGER.info(_transfer_line(model, weights, qat_weights))
        return model

    def _adopt_checkpoint_config(self, weights, resume: bool) -> None:
        saved = getattr(weights, "qat_config", None)
        if saved is None:
            return
        saved = QATConfig.from_dict(saved, source="checkpoint")
        if self.explicit and saved != self.qat.config and not resume:
            raise QATCheckpointError(
                "the model is a QAT checkpoint trained with a different qat config; drop qat=... to continue with "
                "its own config, or start from the float model"
            )
        self.qat.set_config(saved)

    def get_validator(self, trainer, base=None):
        """A QAT-aware validator (loads QAT checkpoints exactly for the final evaluation)."""
        from .validator import QATDetectionValidator

        return QATDetectionValidator(trainer.test_loader, save_dir=trainer.save_dir, args=copy(trainer.args),
                                     _callbacks=trainer.callbacks)

    def build_optimizer(self, trainer, base, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimizer, with the learned scales in their own group (no weight decay, lr x multiplier)."""
        if str(name).lower() == "auto":
            self._warn_ignored_lr(trainer.args)
        optimizer = base(model, name, lr, momentum, decay, iterations)
        self.qat.add_scale_group(optimizer, model)
        return optimizer

    @staticmethod
    def _warn_ignored_lr(args) -> None:
        from ultralytics.utils import DEFAULT_CFG_DICT

        ignored = [f"{k}={getattr(args, k)}" for k in ("lr0", "momentum") if getattr(args, k) != DEFAULT_CFG_DICT[k]]
        if ignored:
            LOGGER.warning(f"QAT: optimizer=auto ignores {' and '.join(ignored)}; set optimizer=AdamW (or SGD) to "
                           "train with them")

    def load_checkpoint_state(self, trainer, base, ckpt) -> None:
        """Resume and NaN recovery: Ultralytics' state, then the exact QAT state into model and EMA, QAT EMA decay."""
        entry = ckpt.get(ckpt_io.CKPT_KEY)
        if not isinstance(entry, dict):
            raise QATCheckpointError(
                f"'{trainer.args.model}' has no QAT state to resume from; resume it with 'yolo train resume "
                f"model={trainer.args.model}', or start QAT from it without resume"
            )
        if entry.get("kind") == "deploy":
            raise QATCheckpointError(f"'{trainer.args.model}' is a deploy checkpoint without training state; resume "
                                     "from the run's last.pt")
        base(ckpt)
        ckpt_io.restore(trainer.model, entry)
        ckpt_io.restore(trainer.ema.ema, entry)
        self.qat.load_stabilizer_states(entry.get("stabilizers", {}))
        self.configure_ema(trainer)  # Ultralytics rebuilt the EMA with its own decay
        _drop_rows_after(trainer.csv, ckpt.get("epoch", -1) + 1)

    def save_model(self, trainer, base=None) -> bool:
        """Write last.pt (resumable), best.pt (compact) and period checkpoints, each atomically."""
        self._resync_nonfinite_ema(trainer)
        self.watch_collapse(trainer)  # before writing: last.pt holds what the guard did and its state
        ema = trainer.ema.ema
        config = self.qat.config.to_dict()
        trainer.wdir.mkdir(parents=True, exist_ok=True)
        resume = self._ckpt(trainer, ckpt_io.resume_pickle(ema), ckpt_io.resume_entry(ema, config), resumable=True)
        ckpt_io.atomic_save(resume, trainer.last)
        if trainer.save_period > 0 and trainer.epoch % trainer.save_period == 0:
            ckpt_io.atomic_save(resume, trainer.wdir / f"epoch{trainer.epoch}.pt")
        if trainer.best_fitness == trainer.fitness:
            self._save_deploy(trainer, trainer.best)
        return True

    def final_eval(self, trainer, base=None) -> None:
        """After the loop, whatever ended it: post-QAT stages, final compact files, then validate best.pt."""
        from ultralytics.utils import LOCAL_RANK, RANK
        from ultralytics.utils.torch_utils import torch_distributed_zero_first

        self._finalizing = True
        with torch_distributed_zero_first(LOCAL_RANK):
            if RANK in {-1, 0} and trainer.ema is not None and trainer.last.exists():
                post_is_best = self._finalize(trainer) if self.qat.has_post_qat else None
                self._save_deploy(trainer, trainer.last, final=True)
                if post_is_best or not trainer.best.exists():
                    self._save_deploy(trainer, trainer.best, final=True)
                else:
                    self._finish_file(trainer, trainer.best)
        if trainer.best.exists():  # as Ultralytics' final_eval, without its in-place strip_optimizer
            LOGGER.info(f"\nValidating {trainer.best}...")
            trainer.validator.args.plots = trainer.args.plots
            trainer.validator.args.compile = False
            trainer.metrics = trainer.validator(model=trainer.best)
            trainer.metrics.pop("fitness", None)
            trainer.epoch += 1  # log best metrics at step epochs+1, not overwriting last epoch
            trainer.run_callbacks("on_fit_epoch_end")
            trainer.epoch -= 1
        if RANK in {-1, 0}:
            self.write_report(trainer)

    def save_run_config(self, save_dir) -> None:
        """The resolved qat config beside args.yaml (qat.yaml), and in args.yaml under ``qat:`` (the run's own record;
        ``yolo-qat train cfg=<run>/args.yaml`` reads it back)."""
        import yaml
        from ultralytics.utils import YAML

        config = self.qat.config.to_dict()
        (save_dir / "qat.yaml").write_text("# resolved qat config of this run (ultralytics-qat)\n" +
                                           yaml.safe_dump(config, sort_keys=False))
        args_file = save_dir / "args.yaml"
        args = YAML.load(args_file) if args_file.is_file() else None
        if isinstance(args, dict) and args.get("qat") != config:
            YAML.save(args_file, {**args, "qat": config})

    def write_report(self, trainer) -> None:
        """The run report (qat_stats.db, plots, report.md); a failure costs one warning line, never the run."""
        from ..report import write_report

        try:
            path = write_report(trainer.save_dir, self.post_qat, results_png=False)
            LOGGER.info(f"QAT: run report {path}")
        except Exception as e:  # noqa: BLE001  (the weights are saved; a report is not worth a failed run)
            LOGGER.warning(f"QAT: run report not written ({type(e).__name__}: {e}); retry with 'yolo-qat report "
                           f"{trainer.save_dir}'")

    def plot_metrics(self, trainer, base=None) -> None:
        """results.png with the QAT curves (qat/osc_frac, qat/frozen_frac) and no single-point panels."""
        from ..report import plot_results_png, read_run

        try:
            files = plot_results_png(read_run(trainer.save_dir, self.post_qat), trainer.save_dir)
        except Exception as e:  # noqa: BLE001
            LOGGER.warning(f"QAT: results.png not drawn ({type(e).__name__}: {e})")
            return
        for f in files:
            trainer.on_plot(f)

    # -- events ------------------------------------------------------------------------------------------------------
    def on_pretrain_routine_start(self, trainer) -> None:
        self.bind(trainer)

    def on_pretrain_routine_end(self, trainer) -> None:
        """Calibrate (fresh scales only), sync the EMA, QAT EMA decay, start the stabilizers."""
        if self.dropin and not self.bound:  # a DDP worker: on_pretrain_routine_start never fired
            raise QATError("add_qat_callbacks does not support DDP; use trainer=QATDetectionTrainer for multi-GPU QAT")
        if self.qat.needs_calibration(trainer.model):
            self.qat.calibrate(trainer.model, self.state(trainer).images())
            trainer.ema.ema.load_state_dict(unwrap(trainer.model).state_dict())
        self.configure_ema(trainer)
        guard = self.qat.collapse_guard
        if guard is not None:
            guard.can_act = trainer.world_size <= 1
            guard.load_best = partial(self._best_state, trainer)
        if self.distiller is not None:
            self.distiller.to(trainer.device)
        self.qat.run("on_train_start", self.state(trainer))
        if _main_process():
            self.layers.start(trainer.save_dir, trainer.ema.ema, trainer.start_epoch)
            self.save_run_config(trainer.save_dir)

    def on_train_epoch_start(self, trainer) -> None:
        self.batch, self.log = 0, {}
        if self.distiller is not None:  # each epoch: a resume or NaN recovery may have rebuilt the criterion
            self.distiller.wrap(unwrap(trainer.model))
        self.qat.run("on_epoch_start", self.state(trainer))

    def on_train_batch_start(self, trainer) -> None:
        self.qat.run("on_batch_start", self.state(trainer))

    def on_train_batch_end(self, trainer) -> None:
        self.qat.run("on_batch_end", self.state(trainer))
        self.batch += 1

    def on_train_epoch_end(self, trainer) -> None:
        """Stop on broken scales; stabilizer logs, BN re-estimation of the EMA; qat/* scalars for the loggers."""
        fatal, warning = ckpt_io.scale_problems(trainer.model)
        loss_ok = trainer.loss is None or bool(torch.isfinite(trainer.loss).all())
        if fatal and loss_ok:  # a non-finite loss is Ultralytics' NaN recovery's to handle (it reloads last.pt)
            guard = self.qat.collapse_guard
            event = guard.recover(self.state(trainer), fatal) if guard is not None else None
            if event is None:
                raise QATError(f"QAT diverged in epoch {trainer.epoch + 1}: {fatal}; last.pt holds the last good epoch. "
                               "Retrain with a lower lr0 or qat.optim.scale_lr_mult")
            self._log_event(trainer, event)
            warning = ckpt_io.scale_problems(trainer.model)[1]
        if warning:  # the forward clamps them to a tiny step: those channels output zeros
            LOGGER.warning(f"QAT: epoch {trainer.epoch + 1}: {warning}; the scales' lr is too high for them, lower "
                           "qat.optim.scale_lr_mult (Adam steps by about lr whatever the scale's size)")
        self.layers.snapshot_bn(trainer.ema.ema)
        if self.distiller is not None:
            self.log["qat/distill_loss"] = self.distiller.epoch_mean()
        self.qat.epoch_end(self.state(trainer))
        self.layers.record(trainer.ema.ema, trainer.epoch + 1)
        trainer.lr.update(self.csv_row())  # trainer.lr is saved to results.csv and logged to TensorBoard

    def on_fit_epoch_end(self, trainer) -> None:
        self.watch_collapse(trainer)  # save=False: save_model did not run this epoch

    def watch_collapse(self, trainer) -> None:
        """Give the epoch's validation fitness to the collapse guard (once per epoch); record what it fired."""
        guard = self.qat.collapse_guard
        if guard is None or self._finalizing or trainer.ema is None:
            return
        event = guard.observe(self.state(trainer), trainer.fitness)
        if event is not None:
            self._log_event(trainer, event)

    @staticmethod
    def _log_event(trainer, event: dict) -> None:
        with open(trainer.save_dir / "qat_events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def _best_state(self, trainer) -> dict | None:
        """The exact QAT state of best.pt (the guard's fallback when its in-memory copy is gone, e.g. after resume)."""
        if not trainer.best.exists():
            return None
        model, _ = ckpt_io.load_qat_model(trainer.best)
        return {k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}

    def csv_row(self) -> dict:
        """This epoch's qat/* scalars with the first epoch's keys, in its order (NaN where a value is missing).

        Ultralytics writes results.csv's header from the first row only, so the columns must never change.
        """
        if self.columns is None:
            self.columns = list(self.log)
        return {k: float(self.log.get(k, float("nan"))) for k in self.columns}

    # -- helpers -----------------------------------------------------------------------------------------------------
    def state(self, trainer, final: bool = False) -> TrainState:
        """What the stabilizers see now."""
        epoch = getattr(trainer, "epoch", trainer.start_epoch)  # set by the training loop, not before it
        lf = getattr(trainer, "lf", None)
        base = [g.get("initial_lr", g["lr"]) * (lf(epoch) if lf else 1.0) for g in trainer.optimizer.param_groups]
        aux = self.aux_batches(trainer)
        return TrainState(
            model=unwrap(trainer.model), ema=trainer.ema.ema if trainer.ema else None, optimizer=trainer.optimizer,
            epoch=epoch, epochs=trainer.epochs, batch=self.batch, batches_per_epoch=len(aux), batches=aux,
            log=self.log, base_lrs=base, final=final, scheduler=getattr(trainer, "scheduler", None),
        )

    def aux_batches(self, trainer) -> AuxBatches:
        """The run's own batches of the training dataset (built once; see :class:`AuxBatches`)."""
        dataset = trainer.train_loader.dataset
        if self._aux is None or self._aux.loader.dataset is not dataset or self._aux.loader.batch_size != trainer.batch_size:
            self._aux = AuxBatches(dataset, trainer.batch_size, int(trainer.args.seed) + 1, trainer.preprocess_batch)
        return self._aux

    def configure_ema(self, trainer) -> None:
        """The QAT EMA decay ``d * (1 - exp(-updates / tau))`` from ``qat.ema``."""
        if trainer.ema is not None:
            cfg = self.qat.config.ema
            trainer.ema.decay = partial(_ema_decay, cfg.decay, cfg.tau)

    def _finalize(self, trainer) -> bool:
        """Post-QAT stages on the EMA and their validation; True if the result should be best.pt."""
        before = trainer.best_fitness
        state = self.state(trainer, final=True)
        self.layers.snapshot_bn(trainer.ema.ema)
        self.qat.finalize(state)
        self.layers.record(trainer.ema.ema, trainer.epoch + 1, "post_qat")
        # the validator directly: trainer.validate() broadcasts EMA buffers, a collective only rank 0 would reach here
        metrics = trainer.validator(trainer) or {}
        fitness = metrics.pop("fitness", None)
        trainer.metrics, trainer.fitness = metrics, fitness
        if fitness is not None and (before is None or fitness > before):
            trainer.best_fitness = fitness
        better = before is None or fitness is None or fitness >= before
        self.post_qat = {"epoch": trainer.epoch, "fitness": _num(fitness), "best_fitness_before": _num(before),
                         "in_best": bool(better), **{k: _num(v) for k, v in state.log.items()
                                                     if k.startswith(("qat/qc", "qat/afw"))},
                         "metrics": {k: _num(v) for k, v in metrics.items()}}
        if better:
            LOGGER.info(f"QAT: post-QAT model fitness {_fmt(fitness)} (best epoch before: {_fmt(before)}); it is "
                        "best.pt and last.pt")
        else:
            LOGGER.warning(f"QAT: post-QAT model fitness {_fmt(fitness)} is below the best epoch's {_fmt(before)}; "
                           "best.pt keeps that epoch, last.pt holds the post-QAT model")
        return better

    def _ckpt(self, trainer, pickled, entry, resumable: bool) -> dict:
        """The checkpoint dict Ultralytics' save_model writes (resumable) or strip_optimizer leaves (final)."""
        from ultralytics import __version__
        from ultralytics.utils import DEFAULT_CFG_DICT, DEFAULT_CFG_KEYS
        from ultralytics.utils.torch_utils import convert_optimizer_state_dict_to_fp16

        if self.post_qat is not None:
            entry = {**entry, "post_qat": self.post_qat}
        if resumable:
            entry = {**entry, "stabilizers": self.qat.stabilizer_states()}
        if self.distiller is not None:  # where the teacher comes from on resume (never the teacher itself)
            entry = {**entry, DISTILL_KEY: self.distiller.source}
        out = {
            "epoch": trainer.epoch,
            "best_fitness": trainer.best_fitness,
            "stopper": {"best_fitness": trainer.stopper.best_fitness, "best_epoch": trainer.stopper.best_epoch},
            "model": None,  # resume and final checkpoints derive from the EMA
            "ema": pickled,
            "updates": trainer.ema.updates,
            "optimizer": None,
            "scaler": trainer.scaler.state_dict(),
            "train_args": vars(trainer.args),
            "train_metrics": {**(trainer.metrics or {}), "fitness": trainer.fitness},
            "train_results": trainer.read_results_csv(),
            "date": datetime.now().astimezone().isoformat(),
            "version": __version__,
            "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com",
            ckpt_io.CKPT_KEY: entry,
        }
        if resumable:
            out["optimizer"] = convert_optimizer_state_dict_to_fp16(trainer.optimizer.state_dict())
        else:  # what strip_optimizer leaves: the EMA as the model, no training state
            if hasattr(pickled, "args") and not isinstance(pickled.args, dict):
                pickled.args = dict(pickled.args)
            for p in pickled.parameters():
                p.requires_grad = False
            out.update(model=pickled, ema=None, best_fitness=None, stopper=None, updates=None, scaler=None)
            args = {**DEFAULT_CFG_DICT, **out["train_args"]}
            out["train_args"] = {k: v for k, v in args.items() if k in DEFAULT_CFG_KEYS}
        return out

    def _save_deploy(self, trainer, path, final: bool = False) -> None:
        pickled, entry = ckpt_io.deploy_pickle_and_entry(trainer.ema.ema, self.qat.config.to_dict())
        out = self._ckpt(trainer, pickled, entry, resumable=False)
        if final:
            out["epoch"] = -1
        ckpt_io.atomic_save(out, path)

    def _finish_file(self, trainer, path) -> None:
        """Mark an earlier epoch's deploy checkpoint final (as strip_optimizer would), atomically."""
        out = torch.load(path, map_location="cpu", weights_only=False)
        out.update(epoch=-1, train_results=trainer.read_results_csv())
        if self.post_qat is not None and isinstance(out.get(ckpt_io.CKPT_KEY), dict):
            out[ckpt_io.CKPT_KEY]["post_qat"] = self.post_qat
        ckpt_io.atomic_save(out, path)

    @staticmethod
    def _resync_nonfinite_ema(trainer) -> None:
        """As Ultralytics' save_model: EMA tensors poisoned by a transient NaN come back from the live model."""
        ema = trainer.ema.ema
        model_sd = unwrap(trainer.model).state_dict()
        with torch.no_grad():
            for k, v in ema.state_dict().items():
                if v.is_floating_point() and not torch.isfinite(v).all() and torch.isfinite(model_sd[k]).all():
                    v.copy_(model_sd[k])


def _float_start(args: dict) -> bool:
    """True when training starts from float weights: a ``.pt`` model (or ``pretrained=``) that is not a QAT
    checkpoint, and not a resume. A file not on disk yet is an Ultralytics download, i.e. a float model."""
    from pathlib import Path

    if args.get("resume"):
        return False
    src = args.get("model")
    if not (isinstance(src, (str, Path)) and str(src).endswith(".pt")):
        src = args.get("pretrained")
        if not (isinstance(src, (str, Path)) and str(src).endswith(".pt")):
            return False
    if not Path(src).is_file():
        return True
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
    except Exception:  # Ultralytics reports an unreadable model file itself, in its own words
        return False
    return not (isinstance(ckpt, dict) and isinstance(ckpt.get(ckpt_io.CKPT_KEY), dict))


def _drop_rows_after(csv_path, epochs_done: int) -> None:
    """Forget results.csv rows of epochs the checkpoint does not hold (written before a save that a kill cut off)."""
    if epochs_done < 1 or not csv_path.exists():
        return
    lines = csv_path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if _epoch_of(ln) <= epochs_done]
    if len(keep) < len(lines):
        tmp = csv_path.with_name(f".{csv_path.name}.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(csv_path)


def _epoch_of(line: str) -> float:
    try:
        return float(line.split(",", 1)[0])
    except ValueError:
        return -1.0


def _ema_decay(decay: float, tau: float, updates: int) -> float:
    return decay * (1 - math.exp(-updates / tau))


def _transfer_line(model, weights, qat_weights: bool) -> str:
    """What ``model.load`` transferred, float weights and QAT state counted apart."""
    src = (weights.get("ema") or weights["model"]) if isinstance(weights, dict) else weights
    csd, dst = src.state_dict(), model.state_dict()
    quant = [k for k in dst if "fake_quant." in k]
    plain = [k for k in dst if "fake_quant." not in k]
    n = sum(k in csd and csd[k].shape == dst[k].shape for k in plain)
    line = f"Transferred {n}/{len(plain)} items from pretrained weights"
    if qat_weights:
        nq = sum(k in csd and csd[k].shape == dst[k].shape for k in quant)
        return f"{line} and {nq}/{len(quant)} QAT items (quantizers, trackers)"
    return f"{line}; the {len(quant)} QAT items (quantizers, trackers) start from calibration"


def _main_process() -> bool:
    from ultralytics.utils import RANK

    return RANK in {-1, 0}


def _num(v) -> float | None:
    return None if v is None else float(v)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{float(v):.5f}"
