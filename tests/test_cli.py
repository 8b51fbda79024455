"""yolo-qat grammar and one-line errors (exit status 2, no traceback)."""

import subprocess
import sys

import pytest

from ultralytics_qat.cli import main, parse_args, CLIError


def test_grammar_matches_yolo():
    mode, args = parse_args(["train", "model=yolov8n.yaml", "epochs=3", "lr0=1e-4", "name=run1", "qat.weight.bits=3",
                             "qat.activation.bits=null", "imgsz", "=", "64"])
    assert mode == "train"
    assert args == {"model": "yolov8n.yaml", "epochs": 3, "lr0": 1e-4, "name": "run1", "qat.weight.bits": 3,
                    "qat.activation.bits": None, "imgsz": 64}


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "epochz=3"], "'epochz' is not a valid YOLO argument. Did you mean 'epochs'?"),
        (["train", "epochs=abc"], "'epochs' must be an int"),
        (["train", "qat.weight.bitz=3"], "unknown key 'weight.bitz'. Did you mean 'weight.bits'?"),
        (["train", "qat.weight.bits=1"], "'weight.bits=1' is out of range; allowed: 2..8"),
        (["train", "qat.optim.scale_lr_mult=-1"], "scale_lr_mult=-1.0' is out of range"),
        (["train", "qat=missing.yaml"], "qat file 'missing.yaml' not found"),
        (["train", "qat.exclude=[model.99.*]", "epochs=1", "imgsz=32"], "matches no quantizable conv"),
        (["fly"], "unexpected argument 'fly'"),
        (["val"], "val needs model="),
        (["val", "model=best.txt"], "not a PyTorch checkpoint"),
        (["val", "model=missing.onnx"], "not found"),
        (["train", "resume", "model=missing.pt"], "could not be loaded"),
    ],
)
def test_bad_input_gives_one_line_errors(argv, needle, capsys, coco8):
    if argv[0] == "train":
        argv = [*argv, f"data={coco8}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("yolo-qat: error:") and needle in err, err


def test_module_entry_point_and_help():
    r = subprocess.run([sys.executable, "-m", "ultralytics_qat", "help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "yolo-qat MODE" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ultralytics_qat", "train", "qat.weight.bits=9"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "weight.bits=9" in r.stderr


def test_parse_errors():
    with pytest.raises(CLIError, match="two modes"):
        parse_args(["train", "val"])
    with pytest.raises(CLIError, match="no mode"):
        parse_args(["epochs=3"])
