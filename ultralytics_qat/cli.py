"""``yolo-qat``: the plugin's ``yolo`` command, with Ultralytics' exact ``key=value`` grammar plus ``qat=...``.

    yolo-qat train model=yolov8n.pt data=coco8.yaml epochs=20 qat=qat.yaml qat.weight.bits=3
    yolo-qat val model=runs/detect/train/weights/best.pt
    yolo-qat predict model=runs/detect/train/weights/best.pt source=path/to/images
    yolo-qat export model=runs/detect/train/weights/best.pt format=onnx
    yolo-qat train                    # the demo: float vs PTQ vs W4A4 QAT vs ONNX on the shapes set, offline
    yolo-qat report runs/detect/train # rebuild a run's report: qat_stats.db, plots, report.md
    yolo-qat sensitivity model=yolov8n.pt data=coco8.yaml bits=[2,3,4] batches=4

Ultralytics' ``yolo`` rejects unknown keys and has no plugin hook, so this is the plugin's ``yolo train`` rather than
a patch of it. Errors print one line naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

MODES = ("train", "val", "predict", "export", "sensitivity")
DEFAULT_MODEL = "yolov8n.yaml"  # train without model=: QAT from the yaml (a smoke run on the bundled coco8)
HELP = f"""Usage: yolo-qat MODE [key=value ...] [qat=qat.yaml] [qat.<key>=value ...]

  MODE       one of {', '.join(MODES)}; 'yolo-qat train' alone runs the bundled offline demo
  key=value  any Ultralytics argument, exactly as for 'yolo' (e.g. model=yolov8n.pt data=coco8.yaml epochs=20)
  qat=...    a qat.yaml path or a bundled recipe name (default: the bundled qat.yaml)
  qat.k=v    a dotted override of one qat.yaml key, e.g. qat.weight.bits=3 qat.activation.bits=null

Other commands: yolo-qat report RUN_DIR (qat_stats.db, plots and report.md of a run) | help | version
Docs: README.md of ultralytics-qat; Ultralytics arguments: https://docs.ultralytics.com/usage/cfg/"""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EMOJI = re.compile("[\u2600-\u27bf\U0001f300-\U0001faff\ufe0f]")


class CLIError(Exception):
    """A usage error reported as one line."""


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """Split ``argv`` into the mode and a dict of ``key=value`` pairs (values parsed like Ultralytics does)."""
    from ultralytics.cfg import merge_equals_args, smart_value

    mode, pairs = None, {}
    try:
        argv = merge_equals_args(list(argv))
    except SyntaxError as e:  # "'qat.x=[a' has an unmatched '[' or ']' bracket."
        raise CLIError(f"{str(e).rstrip('.')}; close it, e.g. qat.exclude=[model.22.*] or imgsz=[640,480]") from None
    for arg in argv:
        if "=" in arg:
            k, v = arg.split("=", 1)
            k, v = k.strip(), v.strip()
            if not v:
                raise CLIError(f"missing value for '{k}'; write it as '{k}=value'")
            if k.startswith("qat."):  # qat values are YAML scalars/lists, as in qat.yaml (null, true, [a, b])
                pairs[k] = _yaml_value(k, v)
            else:  # paths and names stay strings: qat=3 is a file named 3, not the number
                pairs[k] = v if k in {"name", "project", "qat"} and v.lower() != "none" else smart_value(v)
        elif arg in MODES and mode is None:
            mode = arg
        elif arg in MODES:
            raise CLIError(f"two modes given ('{mode}' and '{arg}'); pass exactly one of {', '.join(MODES)}")
        elif _is_bool_flag(arg):  # `yolo train resume` style: a bare boolean argument means True
            pairs[arg] = True
        else:
            raise CLIError(f"unexpected argument '{arg}'; pass a mode ({', '.join(MODES)}) and key=value pairs")
    if mode is None:
        raise CLIError(f"no mode given; start with one of {', '.join(MODES)}, e.g. 'yolo-qat train qat=qat.yaml'")
    return mode, pairs


def _is_bool_flag(arg: str) -> bool:
    from ultralytics.utils import DEFAULT_CFG_DICT

    return isinstance(DEFAULT_CFG_DICT.get(arg), bool)


def _yaml_value(key: str, text: str):
    import yaml

    if text.lower() == "none":  # Ultralytics' spelling of null (key=None)
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise CLIError(f"value of '{key}' is not a YAML value: {text!r}; quote lists like {key}='[a, b]'") from None
    except RecursionError:
        raise CLIError(f"value of '{key}' is nested too deeply; qat values are scalars or flat lists like [a, b]") from None


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an (Ultralytics) message, without colours, emojis or an 'ERROR' prefix."""
    for line in _ANSI.sub("", str(e)).splitlines():
        line = re.sub(r"^ERROR\b:?", "", _EMOJI.sub("", line).strip()).strip()
        if line:
            return line
    return type(e).__name__


# Valid Ultralytics arguments outside default.yaml (check_dict_alignment's allowed_custom_keys); a run's args.yaml has
# save_dir, so 'cfg=<run>/args.yaml' needs it.
_EXTRA_YOLO_KEYS = {"augmentations", "save_dir"}


def _check_ultralytics_args(args: dict) -> None:
    """Validate Ultralytics keys and value types up front, as ``yolo`` does, but report one line."""
    from difflib import get_close_matches

    from ultralytics.cfg import check_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    for key in args:
        if key not in DEFAULT_CFG_DICT and key not in _EXTRA_YOLO_KEYS:
            close = get_close_matches(key, list(DEFAULT_CFG_DICT), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CLIError(f"'{key}' is not a valid YOLO argument.{hint} See 'yolo cfg' for all of them, or 'yolo-qat help'")
    try:
        check_cfg(dict(args))
    except (TypeError, ValueError) as e:
        raise CLIError(_first_line(e)) from None
    if "imgsz" in args:
        _check_imgsz(args["imgsz"])


def _check_imgsz(imgsz) -> None:
    """Ultralytics checks imgsz only once the model is built; check it up front, as its own check_imgsz parses it."""
    from ultralytics.utils.checks import check_imgsz

    try:
        check_imgsz(imgsz, stride=1, max_dim=2)  # stride 1: parse only, no rounding warning
    except (TypeError, ValueError, ArithmeticError):
        raise CLIError(
            f"'imgsz={imgsz}' is not a valid image size; pass an int such as imgsz=640 (predict and export also take "
            "[h, w], e.g. imgsz=[480,640])"
        ) from None


def _train(args: dict) -> None:
    from .engine import QATDetectionTrainer

    qat, dotted, rest, model = _train_args(args)
    _check_ultralytics_args(rest)
    yolo = _load_model(model)
    if rest.get("resume") is True:
        _check_resumable(yolo, model)
    with _ultralytics_errors(rest, mode="train"):
        yolo.train(trainer=QATDetectionTrainer, qat=qat, **{f"qat.{k}": v for k, v in dotted.items()}, **rest)
    save_dir = yolo.trainer.save_dir
    print(f"\nQAT weights: {save_dir}/weights/best.pt\nValidate:    yolo-qat val model={save_dir}/weights/best.pt")


def _train_args(args: dict) -> tuple:
    """(qat, dotted qat overrides, Ultralytics arguments, model) of a train command, cfg= merged in."""
    from .data import bundled_coco8
    from .engine import split_qat_overrides

    if "cfg" in args:  # an Ultralytics cfg yaml, which may carry qat: and qat.<key>: too; the command line wins
        args = {**_read_cfg(args.pop("cfg")), **args}
    qat, dotted, rest = split_qat_overrides(args)
    _check_resume_arg(rest)
    if "data" not in rest and not rest.get("resume"):  # a resumed run keeps its own data: never the demo's, no download
        rest["data"] = str(bundled_coco8())
    _bundled_by_name(rest)
    return qat, dotted, rest, rest.pop("model", DEFAULT_MODEL)


def _bundled_by_name(args: dict) -> None:
    """``data=coco8.yaml`` (no such local file) is the bundled copy: the same images, found offline, no download."""
    data = args.get("data")
    if isinstance(data, str) and data in {"coco8.yaml", "coco8"} and not Path(data).is_file():
        from .data import bundled_coco8

        args["data"] = str(bundled_coco8())


def _check_resume_arg(args: dict) -> None:
    resume = args.get("resume")
    if resume is True and "model" not in args:
        raise CLIError("resume needs the run to continue: 'yolo-qat train resume model=<run>/weights/last.pt'")
    if isinstance(resume, str) and not Path(resume).is_file():  # Ultralytics would resume the newest last.pt it finds
        raise CLIError(f"resume={resume}: no such checkpoint; pass the last.pt of an interrupted run, i.e. "
                       "'yolo-qat train resume model=<run>/weights/last.pt'")


def _read_cfg(path) -> dict:
    """The arguments in an Ultralytics cfg yaml (``cfg=args.yaml``), or a one-line error."""
    from .config import read_yaml_file

    p = Path(str(path))
    if p.suffix not in {".yaml", ".yml"}:
        raise CLIError(f"cfg={path} is not a .yaml file; pass cfg=path/to/args.yaml with Ultralytics arguments as "
                       "'key: value' lines")
    if not p.is_file():
        raise CLIError(f"cfg file '{path}' not found; pass an existing yaml of Ultralytics arguments, e.g. a run's args.yaml")
    block = read_yaml_file(p, CLIError, f"cfg file '{path}'", "yaml", "it holds Ultralytics 'key: value' lines")
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise CLIError(f"cfg file '{path}' must hold Ultralytics arguments as 'key: value' lines, got "
                       f"{type(block).__name__} {str(block)[:40]!r}")
    return {str(k): v for k, v in block.items() if k != "cfg"}


def _load_model(model):
    """``YOLO(model)``; a missing, unreadable or corrupt model is a one-line error (this call only loads the file)."""
    import pickle

    from ultralytics import YOLO

    try:
        return YOLO(model)
    except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError, AttributeError, KeyError, RuntimeError) as e:
        raise CLIError(
            f"model '{model}' could not be loaded ({_load_failure(e)}); pass an existing .pt (e.g. a run's "
            "weights/last.pt) or a model .yaml such as yolov8n.yaml"
        ) from None


def _load_failure(e: BaseException) -> str:
    import pickle

    if isinstance(e, (FileNotFoundError, ConnectionError)):
        return f"{type(e).__name__}; offline runs cannot download weights by name"
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e.strerror}"
    text = _first_line(e)
    if isinstance(e, (EOFError, UnicodeDecodeError, pickle.UnpicklingError)) or "truncated or corrupted" in text:
        return f"{type(e).__name__}: not a PyTorch checkpoint, or the file is empty, truncated or corrupted"
    return f"{type(e).__name__}: {text.split('. ')[0]}"


def _check_resumable(yolo, model) -> None:
    """Ultralytics' own resume test, as an error: for ``resume`` it would silently start a new training (on coco8)."""
    ckpt = getattr(yolo, "ckpt", None) or {}
    if not ckpt:
        raise CLIError(f"'{model}' is not a training checkpoint, so there is nothing to resume; resume a run's last.pt, "
                       "i.e. 'yolo-qat train resume model=<run>/weights/last.pt', or train without resume")
    from .checkpoint import resume_refusal

    why = resume_refusal(model, ckpt)
    if why:
        raise CLIError(why)


# --------------------------------------------------------------------------------------------------------------------
# Ultralytics' failures of a train/val/predict call that are the user's input, each recognised by type and message.
@contextmanager
def _ultralytics_errors(args: dict, mode: str):
    """Turn the known input failures of an Ultralytics call into one-line CLIErrors; anything else propagates."""
    from .errors import BackendUnavailableError, QATError

    try:
        yield
    except (QATError, BackendUnavailableError):
        raise
    except (AssertionError, OSError, RuntimeError, SyntaxError, ValueError) as e:
        for recognise in (_dataset_failure, _device_failure, _resume_failure, _output_failure):
            msg = recognise(e, args, mode)
            if msg:
                raise CLIError(msg) from None
        raise


_DATASET = re.compile(r"Dataset '(?P<data>.*?)' (error|for task=\S+ not found)(?P<detail>.*)", re.S)
_YAML_NAME = re.compile(r"[^\s'\"]+\.ya?ml")


def _dataset_failure(e, args, mode) -> str | None:
    """The trainer wraps dataset check failures as "Dataset 'x' error ..."; the validator lets them through bare."""
    text = _EMOJI.sub("", _ANSI.sub("", str(e)))
    if isinstance(e, (RuntimeError, FileNotFoundError)) and (m := _DATASET.match(text)):
        data, detail = m["data"], m["detail"]
    elif mode == "val" and isinstance(e, (FileNotFoundError, SyntaxError)) and (m := _YAML_NAME.search(text)):
        data, detail = args.get("data") or m[0], text  # "'x.yaml' does not exist", "x.yaml 'train:' key missing"
    else:
        return None
    lines = [ln.strip(" .") for ln in detail.splitlines() if ln.strip(" .")]
    return (f"data={data} cannot be used: {'; '.join(lines[:2]) or 'not found'}; pass data= a dataset yaml with "
            "train: and val: image paths, e.g. data=coco8.yaml")


def _device_failure(e, args, mode) -> str | None:
    m = re.match(r"Invalid (\w+) 'device=(.*?)'", str(e)) if isinstance(e, ValueError) else None
    if not m:
        return None
    if m[1] == "CUDA":
        import torch

        seen = torch.cuda.device_count()
        return (f"device={m[2]} asks for CUDA GPU(s) that are not here (torch sees {seen}); pass device=cpu"
                f"{f' or a GPU index below {seen}' if seen else ''}, or leave device= out")
    return f"{_first_line(e).rstrip('.')}; pass device=cpu, or leave device= out"


_FINISHED = re.compile(r"(?P<model>.+) training to (?P<epochs>\d+) epochs is finished, nothing to resume")


def _resume_failure(e, args, mode) -> str | None:
    if isinstance(e, AssertionError) and (m := _FINISHED.match(_first_line(e))):
        from .checkpoint import finished_message

        return finished_message(m["model"], m["epochs"])
    if isinstance(e, FileNotFoundError) and str(e).startswith("Resume checkpoint not found"):
        why = f" ({_load_failure(e.__cause__)})" if e.__cause__ else ""
        return (f"resume={args.get('resume')} could not be loaded{why}; pass the last.pt of an interrupted run, "
                "i.e. 'yolo-qat train resume model=<run>/weights/last.pt'")
    return None


def _output_failure(e, args, mode) -> str | None:
    """An OSError on the output folder (or a folder above it) that Ultralytics creates: not writable, or a file."""
    if not isinstance(e, OSError) or not e.filename or args.get("resume"):
        return None
    from types import SimpleNamespace

    from ultralytics.cfg import get_save_dir

    out = get_save_dir(SimpleNamespace(project=args.get("project"), name=args.get("name"), task="detect", mode=mode,
                                       exist_ok=True, save_dir=args.get("save_dir")))
    bad = Path(os.fsdecode(e.filename)).resolve()
    if bad != out and out not in bad.parents and bad not in out.parents:
        return None
    why = e.strerror or type(e).__name__
    return (f"cannot write the output folder {out.parent} ({why}: '{os.fsdecode(e.filename)}'); pass project= a "
            "folder you can write to")


def _val(args: dict) -> None:
    from .checkpoint import load_qat_yolo
    from .engine import QATDetectionValidator

    if "model" not in args:
        raise CLIError("val needs model=path/to/best.pt (a yolo-qat checkpoint)")
    _check_ultralytics_args(args)
    _bundled_by_name(args)
    if str(args["model"]).rstrip("/\\").endswith((".onnx", "_openvino_model")):  # an export: plain Ultralytics runs it
        from ultralytics import YOLO

        if not os.path.exists(args["model"]):
            raise CLIError(f"model '{args['model']}' not found; export one with 'yolo-qat export model=best.pt'")
        with _ultralytics_errors(args, mode="val"):
            YOLO(args.pop("model")).val(**args)
        return
    yolo = load_qat_yolo(args.pop("model"), hint="yolo val")
    with _ultralytics_errors(args, mode="val"):
        yolo.val(validator=QATDetectionValidator, **args)


def _predict(args: dict) -> None:
    from .checkpoint import load_qat_yolo

    if "model" not in args:
        raise CLIError("predict needs model=path/to/best.pt (a yolo-qat checkpoint)")
    _check_ultralytics_args(args)
    yolo = load_qat_yolo(args.pop("model"), hint="yolo predict")
    args.setdefault("save", True)
    with _ultralytics_errors(args, mode="predict"):
        yolo.predict(**args)


def _export(args: dict) -> None:
    from .export import EXPORT_KEYS, export

    if "model" not in args:
        raise CLIError("export needs model=path/to/best.pt (a yolo-qat checkpoint)")
    legacy = {k: args.pop(k) for k in ("half", "int8") if k in args}  # Ultralytics' deprecated spellings of quantize
    _check_ultralytics_args(args)
    extra = sorted(set(args) - {"model", "format", *EXPORT_KEYS})
    if extra:
        raise CLIError(f"'{extra[0]}' is not supported by yolo-qat export; it takes model, format, "
                       f"{', '.join(EXPORT_KEYS)}")
    qonnx = str(args.get("format", "onnx")).lower() == "qonnx"
    with _ultralytics_errors(args, mode="val"):  # data= runs Ultralytics' validator for the mAP parity
        f = export(args.pop("model"), **args, **legacy)
    then = "Run:        FINN / hls4ml, or qonnx.core.onnx_exec" if qonnx else f"Validate:   yolo-qat val model={f} data=..."
    print(f"\nQAT export: {f}\n{then}")


def _report(rest: list[str]) -> None:
    """``yolo-qat report RUN_DIR``: write a training run's report from its folder alone."""
    if len(rest) != 1 or "=" in rest[0]:
        raise CLIError("report takes one run folder: 'yolo-qat report runs/detect/train'")
    from .report import write_report

    path = write_report(rest[0])
    print(f"QAT report: {path}\nDatabase:   {path.parent / 'qat_stats.db'}\nPlots:      {path.parent / 'qat_report'}")


def _sensitivity(args: dict) -> None:
    """``yolo-qat sensitivity model=fp.pt data=x.yaml [bits=[2,3,4]] [batches=4] [split imgsz batch seed device ...]``."""
    from .quant.sensitivity import format_table, load, run_sensitivity

    if "model" not in args:
        raise CLIError("sensitivity needs model=path/to/float.pt (the float model QAT will start from)")
    extra = {k: args.pop(k) for k in ("bits", "batches") if k in args}
    qat, dotted, rest, _ = _train_args({**args, "model": args["model"]})  # qat=/qat.* pick the layer policy
    _check_ultralytics_args(rest)
    allowed = {"data", "imgsz", "batch", "seed", "split", "device", "project", "name", "exist_ok"}
    bad = sorted(set(rest) - allowed)
    if bad:
        raise CLIError(f"'{bad[0]}' is not supported by sensitivity; it takes model, data, bits, batches, "
                       f"{', '.join(sorted(allowed - {'data'}))} and qat/qat.* keys")
    yolo = _load_model(args["model"])
    with _ultralytics_errors(rest, mode="val"):
        paths = run_sensitivity(yolo.model, qat=qat, overrides=dotted, **extra, **rest)
    print("\n" + format_table(load(paths["json"])))
    print(f"\nSensitivity: {paths['json']}\nUse it:      yolo-qat train model={args['model']} "
          f"qat.budget.sensitivity={paths['json']} qat.budget.avg_weight_bits=3.5")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``yolo-qat`` and ``python -m ultralytics_qat``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in {"help", "-h", "--help"}:
        print(HELP)
        return 0
    if argv[0] in {"version", "--version"}:
        from . import __version__

        print(__version__)
        return 0
    demo = argv == ["train"]
    if demo or os.environ.get("YOLO_OFFLINE", "").lower() in {"1", "true"}:
        from .utils import make_hermetic

        make_hermetic()  # before Ultralytics is imported: no DNS probe, no font or version downloads
    from .errors import BackendUnavailableError, QATError

    try:
        if argv[0] == "report":
            _report(argv[1:])
            return 0
        mode, args = parse_args(argv)
        if demo:
            from .demo import run_demo

            print("yolo-qat: running the demo (float vs PTQ vs W4A4 QAT vs ONNX on the bundled shapes set, offline)")
            run_demo()
            return 0
        {"train": _train, "val": _val, "predict": _predict, "export": _export, "sensitivity": _sensitivity}[mode](args)
    except (CLIError, QATError, BackendUnavailableError) as e:
        print(f"yolo-qat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yolo-qat: interrupted; resume training with 'yolo-qat train resume model=<run>/weights/last.pt'", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
