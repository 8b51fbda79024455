"""Bad input to `yolo-qat` (from a bad-input trial): exit status 2 and exactly one stderr line naming the fix.

Every case drives the real ``main``; none trains (each fails before the first batch, or Model.train is stubbed).
"""

import io
from types import SimpleNamespace

import pytest
import torch
import ultralytics  # noqa: F401  (imported here, not in a test: its LOGGER must bind the real stdout, not a capture)

from ultralytics_qat.cli import main


def _error(argv, capsys) -> str:
    """Run ``yolo-qat argv``: it must exit 2 with one line ``yolo-qat: error: ...`` on stderr; returns that line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("yolo-qat: error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of bad files: corrupt checkpoints, yamls without data keys or not YAML, a non-UTF-8 qat.yaml."""
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.pt").write_bytes(bytes(range(256)) * 4)
    (d / "empty.pt").write_bytes(b"")
    buf = io.BytesIO()
    torch.save({"model": None}, buf)
    (d / "truncated.pt").write_bytes(buf.getvalue()[:200])
    (d / "nodata.yaml").write_text("names: {0: a}\n")
    (d / "args.txt").write_text("epochs: 1\n")
    (d / "broken.yaml").write_text("epochs: [1\n")
    (d / "list.yaml").write_text("- epochs\n")
    (d / "latin1.yaml").write_bytes(b"weight:\n  bits: \xff4\n")
    (d / "qat_null.yaml").write_text("qat:\n")
    (d / "qat_list.yaml").write_text("qat: [weight, bits]\n")
    (d / "int_glob.yaml").write_text("overrides:\n  22: {weight_bits: 8}\n")
    (d / "a_file").write_text("not a folder\n")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints as Ultralytics saves them: a finished run's last.pt (epoch -1, no optimizer) and an interrupted one."""
    from ultralytics.nn.tasks import DetectionModel

    d = tmp_path_factory.mktemp("runs")
    model = DetectionModel("yolov8n.yaml", verbose=False).half()
    finished = {"model": model, "epoch": -1, "optimizer": None, "train_args": {"epochs": 3}}
    torch.save(finished, d / "finished.pt")
    torch.save({**finished, "epoch": 0, "optimizer": {"state": {}, "param_groups": []}}, d / "interrupted.pt")
    return d


@pytest.fixture
def train_calls(monkeypatch, tmp_path):
    """Stub Ultralytics' Model.train: record its keyword arguments instead of training (or raise a given error)."""
    from ultralytics.engine.model import Model

    calls, raises = [], []

    def train(self, **kwargs):
        calls.append(kwargs)
        if raises:
            raise raises[0]
        self.trainer = SimpleNamespace(save_dir=tmp_path)

    monkeypatch.setattr(Model, "train", train)
    return SimpleNamespace(calls=calls, raises=raises)


# ---- qat config on the command line and in qat.yaml files --------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["qat.optim.scale_lr_mult=.inf"], "'optim.scale_lr_mult=inf' is not a finite number; allowed: 0.0..100.0"),
        (["qat.ead.start=.nan"], "'ead.start=nan' is not a finite number; allowed: 0.0..1.0 or null"),
        (["qat.ema.decay=-.inf"], "'ema.decay=-inf' is not a finite number"),
        ([f"qat.qc.lr={10**400}"], "too large for a float; allowed: >= 0.0 (e.g. 'qc.lr=0.001')"),
        (["qat.optim.scale_lr_mult=1000000"], "'optim.scale_lr_mult=1000000.0' is out of range; allowed: 0.0..100.0"),
        (["qat.qc=0"], "'qc' is a section of keys, not a value (got 0); to switch it off use qat.qc.enabled=false"),
        (["qat.oscillation=false"], "to switch it off use qat.oscillation.freeze_threshold=null (freezing)"),
        (["qat.exclude=['*']"], "'exclude' pattern '*' leaves every conv in float, which is not QAT"),
        (["qat.exclude=[model.2.*,'**']"], "'exclude' pattern '**' leaves every conv in float"),
        (["qat=3"], "qat file '3' not found; pass an existing path or a bundled recipe: icml22, lsq, qat"),
        (["qat.exclude=[a"], "'qat.exclude=[a' has an unmatched '[' or ']' bracket; close it"),
        (["qat.weight.bits=" + "[" * 2000 + "]" * 2000], "value of 'qat.weight.bits' is nested too deeply"),
        (["qat=latin1.yaml"], "latin1.yaml is not UTF-8 text (byte 0xff at offset 16); save it as UTF-8"),
        (["qat=qat_null.yaml"], "the 'qat:' block must hold a mapping of qat keys, got NoneType None"),
        (["qat=qat_list.yaml"], "the 'qat:' block must hold a mapping of qat keys, got list ['weight', 'bits']"),
        (["qat=int_glob.yaml"], "'overrides' keys must be glob strings of conv names like 'model.1.conv', got int 22"),
    ],
)
def test_bad_qat_config_is_one_line(args, needle, bad, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    tiny = ["imgsz=64", "epochs=1", "batch=4", "workers=0", "data=nodata.yaml"]  # the qat config is checked first
    err = _error(["train", *tiny, *args], capsys)
    assert needle in err, err


# ---- Ultralytics' own errors, caught where the call is made -----------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["model=corrupt.pt"], "model 'corrupt.pt' could not be loaded (TypeError: not a PyTorch checkpoint"),
        (["model=empty.pt"], "model 'empty.pt' could not be loaded (TypeError: not a PyTorch checkpoint, or the file is "
                             "empty, truncated or corrupted); pass an existing .pt"),
        (["model=truncated.pt"], "'truncated.pt' could not be loaded (TypeError: not a PyTorch checkpoint"),
        (["resume", "model=corrupt.pt"], "model 'corrupt.pt' could not be loaded (TypeError: not a PyTorch"),
        (["data=missing.yaml"], "data=missing.yaml cannot be used: 'missing.yaml' does not exist; pass data= a "
                                "dataset yaml with train: and val: image paths, e.g. data=coco8.yaml"),
        (["data=nodata.yaml"], "data=nodata.yaml cannot be used: nodata.yaml 'train:' key missing; 'train' and 'val' "
                               "are required in all data YAMLs; pass data="),
        (["cfg=missing.yaml"], "cfg file 'missing.yaml' not found; pass an existing yaml of Ultralytics arguments"),
        (["cfg=args.txt"], "cfg=args.txt is not a .yaml file; pass cfg=path/to/args.yaml"),
        (["cfg=broken.yaml"], "cfg file 'broken.yaml' is not valid YAML (line 2: expected ',' or ']'"),
        (["cfg=list.yaml"], "cfg file 'list.yaml' must hold Ultralytics arguments as 'key: value' lines, got list"),
        (["device=99"], "device=99 asks for CUDA GPU(s) that are not here (torch sees"),
        (["imgsz=abc"], "'imgsz=abc' is not a valid image size; pass an int such as imgsz=640"),
        (["imgsz=[a]"], "'imgsz=[a]' is not a valid image size"),
    ],
)
def test_ultralytics_errors_are_one_line(args, needle, bad, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    if not any(a.startswith(("data=", "resume")) for a in args):
        args = [*args, f"data={bad / 'nodata.yaml'}"]  # each case fails before data would be read
    err = _error(["train", "imgsz=64", "epochs=1", "batch=4", "workers=0", *args], capsys)
    assert needle in err, err


def test_unwritable_output_folder_names_it_and_the_fix(bad, coco8, capsys):
    err = _error(["train", f"data={coco8}", f"project={bad / 'a_file' / 'runs'}", "imgsz=64", "epochs=1"], capsys)
    assert f"cannot write the output folder {bad / 'a_file' / 'runs'} (Not a directory" in err, err
    assert err.endswith("pass project= a folder you can write to"), err


# ---- resume -----------------------------------------------------------------------------------------------------
def test_resume_of_a_finished_run_says_nothing_to_resume(runs, capsys, train_calls):
    last = runs / "finished.pt"
    err = _error(["train", "resume", f"model={last}"], capsys)
    assert err == (f"yolo-qat: error: '{last}': training to 3 epochs is finished, nothing to resume; start a new "
                   f"training without resuming, i.e. 'yolo-qat train model={last}'")
    assert not train_calls.calls  # Ultralytics would have started a new training on coco8 (a download) instead


@pytest.mark.parametrize(
    "args,needle",
    [
        (["resume"], "resume needs the run to continue: 'yolo-qat train resume model=<run>/weights/last.pt'"),
        (["resume", "model=yolov8n.yaml"], "'yolov8n.yaml' is not a training checkpoint, so there is nothing to resume"),
        (["resume=missing.pt"], "resume=missing.pt: no such checkpoint; pass the last.pt of an interrupted run"),
        (["resume=corrupt.pt"], "resume=corrupt.pt could not be loaded (TypeError: not a PyTorch checkpoint"),
    ],
)
def test_resume_without_a_resumable_checkpoint_is_one_line(args, needle, bad, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    assert needle in _error(["train", "imgsz=64", "epochs=1", "batch=4", "workers=0", *args], capsys)


def test_resume_without_data_passes_no_data(runs, capsys, train_calls):
    assert main(["train", "resume", f"model={runs / 'interrupted.pt'}"]) == 0
    (kwargs,) = train_calls.calls
    assert kwargs["resume"] is True and "data" not in kwargs  # the run's own data: no bundled coco8, no download


def test_ultralytics_nothing_to_resume_assertion_is_one_line(runs, capsys, train_calls):
    last = runs / "interrupted.pt"  # resume=<path> goes to Ultralytics' own check in the trainer
    train_calls.raises.append(AssertionError(
        f"{last} training to 3 epochs is finished, nothing to resume.\n"
        f"Start a new training without resuming, i.e. 'yolo train model={last}'"
    ))
    err = _error(["train", f"resume={last}"], capsys)
    assert err == (f"yolo-qat: error: '{last}': training to 3 epochs is finished, nothing to resume; start a new "
                   f"training without resuming, i.e. 'yolo-qat train model={last}'")


def test_unexpected_errors_are_not_swallowed(capsys, coco8, train_calls):
    train_calls.raises.append(RuntimeError("a bug, not bad input"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", f"data={coco8}"])


# ---- valid input that was rejected ------------------------------------------------------------------------------
def test_cfg_yaml_may_carry_qat_keys_under_the_command_line(tmp_path, coco8, train_calls):
    cfg = tmp_path / "args.yaml"
    cfg.write_text(f"data: {coco8}\nepochs: 2\nqat: lsq\nqat.weight.bits: 3\n")
    assert main(["train", f"cfg={cfg}", "qat=stable", "epochs=1"]) == 0  # was "'qat' is not a valid YOLO argument"
    (kwargs,) = train_calls.calls
    assert (kwargs["qat"], kwargs["qat.weight.bits"], kwargs["epochs"], kwargs["data"]) == ("stable", 3, 1, str(coco8))


def test_qat_names_stay_strings_and_none_is_null(tmp_path, coco8, train_calls, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "3").write_text("weight: {bits: 3}\n")
    assert main(["train", f"data={coco8}", "qat=3", "qat.activation.bits=None"]) == 0
    (kwargs,) = train_calls.calls
    assert kwargs["qat"] == "3" and kwargs["qat.activation.bits"] is None


def test_a_runs_args_yaml_is_a_valid_cfg(tmp_path, coco8, train_calls):
    cfg = tmp_path / "args.yaml"  # as Ultralytics writes it next to weights/: save_dir is not in default.yaml
    cfg.write_text(f"task: detect\nmode: train\nmodel: yolov8n.yaml\ndata: {coco8}\nepochs: 1\nsave_dir: {tmp_path / 'run'}\n")
    assert main(["train", f"cfg={cfg}"]) == 0  # was "'save_dir' is not a valid YOLO argument"
    (kwargs,) = train_calls.calls
    assert kwargs["save_dir"] == str(tmp_path / "run") and kwargs["data"] == str(coco8)
