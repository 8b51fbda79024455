"""Files where Ultralytics puts them: `yolo settings` honoured, no temp folders left behind, coco8 by name offline."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    from ultralytics_qat.utils import make_hermetic
    print("SETTINGS_DIR", make_hermetic())
    from ultralytics.utils import SETTINGS
    from ultralytics_qat.data import bundled_coco8
    print("RUNS_DIR", SETTINGS["runs_dir"])
    print("COCO8", bundled_coco8())
    """
)


def test_make_hermetic_keeps_the_users_settings_and_leaves_no_temp_folder(tmp_path):
    home, tmp = tmp_path / "config", tmp_path / "tmp"
    tmp.mkdir()
    settings = home / "Ultralytics" / "settings.json"
    settings.parent.mkdir(parents=True)
    runs, datasets = tmp_path / "my_runs", tmp_path / "my_datasets"
    settings.write_text(json.dumps({"settings_version": "0.0.8", "runs_dir": str(runs), "datasets_dir": str(datasets),
                                    "sync": False}))
    env = {**os.environ, "XDG_CONFIG_HOME": str(home), "TMPDIR": str(tmp), "YOLO_OFFLINE": "1"}
    env.pop("YOLO_CONFIG_DIR", None)
    env.pop("MPLCONFIGDIR", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert out["SETTINGS_DIR"] == str(home / "Ultralytics")
    assert out["RUNS_DIR"] == str(runs)
    assert out["COCO8"] == str(datasets / "coco8-qat" / "coco8.yaml")
    assert (home / "Ultralytics" / "Arial.ttf").is_file()  # the font Ultralytics would download, so it does not
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("ultralytics_qat")]


def test_coco8_by_name_is_the_bundled_copy(monkeypatch, tmp_path):
    from ultralytics.utils import SETTINGS

    from ultralytics_qat.cli import _train_args

    monkeypatch.setitem(SETTINGS, "datasets_dir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _, _, rest, _ = _train_args({"data": "coco8.yaml", "epochs": 1})
    assert rest["data"] == str(tmp_path / "coco8-qat" / "coco8.yaml")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "coco8.yaml").write_text("path: .\n")  # a local file of that name is the user's own
    monkeypatch.chdir(tmp_path / "own")
    assert _train_args({"data": "coco8.yaml"})[2]["data"] == "coco8.yaml"


def test_readme_val_command_with_coco8_runs_offline(qat_run, monkeypatch, tmp_path, capsys):
    from ultralytics.utils import SETTINGS

    from ultralytics_qat.cli import main

    assert os.environ.get("YOLO_OFFLINE") == "1"
    monkeypatch.setitem(SETTINGS, "datasets_dir", str(tmp_path))
    code = main(["val", f"model={qat_run / 'weights' / 'best.pt'}", "data=coco8.yaml", "imgsz=64", "batch=4",
                 f"project={tmp_path}", "name=v", "plots=False"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "coco8-qat" / "images" / "val").is_dir()
