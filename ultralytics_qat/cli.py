"""``yolo-qat``: the plugin's ``yolo`` command, with Ultralytics' exact ``key=value`` grammar plus ``qat=...``.

    yolo-qat train model=yolov8n.pt data=coco8.yaml epochs=20 qat=qat.yaml qat.weight.bits=3
    yolo-qat val model=runs/detect/train/weights/best.pt
    yolo-qat predict model=runs/detect/train/weights/best.pt source=path/to/images
    yolo-qat export model=runs/detect/train/weights/best.pt format=onnx
    yolo-qat train                    # the bundled demo: yolov8n.yaml on coco8, default qat.yaml, offline

Ultralytics' ``yolo`` rejects unknown keys and has no plugin hook, so this is the plugin's ``yolo train`` rather than
a patch of it. Errors print one line naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import os
import re
import sys

MODES = ("train", "val", "predict", "export")
DEMO = {"model": "yolov8n.yaml", "epochs": 10, "imgsz": 160, "batch": 4, "nbs": 4, "workers": 0, "name": "qat-demo"}
HELP = f"""Usage: yolo-qat MODE [key=value ...] [qat=qat.yaml] [qat.<key>=value ...]

  MODE       one of {', '.join(MODES)}; 'yolo-qat train' alone runs the bundled offline demo
  key=value  any Ultralytics argument, exactly as for 'yolo' (e.g. model=yolov8n.pt data=coco8.yaml epochs=20)
  qat=...    a qat.yaml path or a bundled recipe name (default: the bundled qat.yaml)
  qat.k=v    a dotted override of one qat.yaml key, e.g. qat.weight.bits=3 qat.activation.bits=null

Other commands: yolo-qat help | version
Docs: README.md of ultralytics-qat; Ultralytics arguments: https://docs.ultralytics.com/usage/cfg/"""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CLIError(Exception):
    """A usage error reported as one line."""


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """Split ``argv`` into the mode and a dict of ``key=value`` pairs (values parsed like Ultralytics does)."""
    from ultralytics.cfg import merge_equals_args, smart_value

    mode, pairs = None, {}
    for arg in merge_equals_args(list(argv)):
        if "=" in arg:
            k, v = arg.split("=", 1)
            k, v = k.strip(), v.strip()
            if not v:
                raise CLIError(f"missing value for '{k}'; write it as '{k}=value'")
            if k.startswith("qat."):  # qat values are YAML scalars/lists, as in qat.yaml (null, true, [a, b])
                pairs[k] = _yaml_value(k, v)
            else:
                pairs[k] = v if k in {"name", "project"} and v.lower() != "none" else smart_value(v)
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

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise CLIError(f"value of '{key}' is not a YAML value: {text!r}; quote lists like {key}='[a, b]'") from None


def _check_ultralytics_args(args: dict) -> None:
    """Validate Ultralytics keys and value types up front, as ``yolo`` does, but report one line."""
    from difflib import get_close_matches

    from ultralytics.cfg import check_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    for key in args:
        if key not in DEFAULT_CFG_DICT:
            close = get_close_matches(key, list(DEFAULT_CFG_DICT), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CLIError(f"'{key}' is not a valid YOLO argument.{hint} See 'yolo cfg' for all of them, or 'yolo-qat help'")
    try:
        check_cfg(dict(args))
    except (TypeError, ValueError) as e:
        first = next((ln for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()), type(e).__name__)
        raise CLIError(first.strip()) from None


def _train(args: dict) -> None:
    from ultralytics import YOLO

    from .data import bundled_coco8
    from .engine import QATDetectionTrainer, split_qat_overrides

    qat, dotted, rest = split_qat_overrides(args)
    if "cfg" in rest:  # an Ultralytics cfg yaml may carry a qat: block
        import yaml

        with open(rest.pop("cfg")) as f:
            block = yaml.safe_load(f) or {}
        qat = block.pop("qat", qat) if qat is None else qat
        rest = {**block, **rest}
    if "data" not in rest and not rest.get("resume"):
        rest["data"] = str(bundled_coco8())
    model = rest.pop("model", DEMO["model"])
    _check_ultralytics_args(rest)
    try:
        yolo = YOLO(model)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise CLIError(
            f"model '{model}' could not be loaded ({type(e).__name__}); pass an existing .pt or a model .yaml such as "
            "yolov8n.yaml (offline runs cannot download weights by name)"
        ) from None
    yolo.train(trainer=QATDetectionTrainer, qat=qat, **{f"qat.{k}": v for k, v in dotted.items()}, **rest)
    save_dir = yolo.trainer.save_dir
    print(f"\nQAT weights: {save_dir}/weights/best.pt\nValidate:    yolo-qat val model={save_dir}/weights/best.pt")


def _val(args: dict) -> None:
    from .checkpoint import load_qat_yolo
    from .engine import QATDetectionValidator

    if "model" not in args:
        raise CLIError("val needs model=path/to/best.pt (a yolo-qat checkpoint)")
    _check_ultralytics_args(args)
    if str(args["model"]).endswith(".onnx"):  # a yolo-qat export: plain Ultralytics runs it
        from ultralytics import YOLO

        if not os.path.isfile(args["model"]):
            raise CLIError(f"model '{args['model']}' not found; export one with 'yolo-qat export model=best.pt'")
        YOLO(args.pop("model")).val(**args)
        return
    yolo = load_qat_yolo(args.pop("model"), hint="yolo val")
    yolo.val(validator=QATDetectionValidator, **args)


def _predict(args: dict) -> None:
    from .checkpoint import load_qat_yolo

    if "model" not in args:
        raise CLIError("predict needs model=path/to/best.pt (a yolo-qat checkpoint)")
    _check_ultralytics_args(args)
    yolo = load_qat_yolo(args.pop("model"), hint="yolo predict")
    args.setdefault("save", True)
    yolo.predict(**args)


def _export(args: dict) -> None:
    from .export import export

    if "model" not in args:
        raise CLIError("export needs model=path/to/best.pt (a yolo-qat checkpoint)")
    _check_ultralytics_args(args)
    extra = sorted(set(args) - {"model", "format", "imgsz", "opset"})
    if extra:
        raise CLIError(f"'{extra[0]}' is not supported by export; it takes model, format, imgsz and opset")
    f = export(args.pop("model"), **args)
    print(f"\nQAT ONNX:  {f}\nValidate:  yolo-qat val model={f} data=...")


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
        mode, args = parse_args(argv)
        if demo:
            args = dict(DEMO)
            print("yolo-qat: running the bundled demo (yolov8n.yaml on coco8, default qat.yaml, offline)")
        {"train": _train, "val": _val, "predict": _predict, "export": _export}[mode](args)
    except (CLIError, QATError, BackendUnavailableError) as e:
        print(f"yolo-qat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yolo-qat: interrupted; resume training with 'yolo-qat train resume model=<run>/weights/last.pt'", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
