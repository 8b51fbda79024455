"""The run report: per-layer statistics, qat_stats.db, plots, report.md, results.png, qat.yaml, `yolo-qat report`."""

import csv
import shutil
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from ultralytics_qat.cli import main
from ultralytics_qat.report import DB_FILE, LAYERS_CSV, LayerStats, read_layers_csv, read_run
from ultralytics_qat.report.plots import results_columns

EPOCHS, LAYERS = 2, 57  # the qat_run fixture: 2 epochs of yolov8n (57 quantized convs, default qat.yaml)
PLOTS = ("train-vs-val-loss", "metrics-mAP", "oscillation-heatmap", "scale-drift")


def _results_csv(run: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(run / "results.csv")))
    return [h.strip() for h in rows[0]], rows[1:]


def _valid_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def _valid_svg(path: Path) -> bool:
    return ET.parse(path).getroot().tag.endswith("svg")


def test_a_qat_run_leaves_its_report(qat_run):
    for name in (LAYERS_CSV, DB_FILE, "report.md", "qat.yaml"):
        assert (qat_run / name).is_file(), name
    for stem in PLOTS:
        assert _valid_png(qat_run / "qat_report" / f"{stem}.png"), stem
        assert _valid_svg(qat_run / "qat_report" / f"{stem}.svg"), stem
    text = (qat_run / "report.md").read_text()
    assert "| best epoch" in text and "post-QAT stages" in text and "57 quantized convs" in text


def test_the_run_config_is_saved_beside_and_in_args_yaml(qat_run):
    saved = yaml.safe_load((qat_run / "qat.yaml").read_text())
    assert saved["weight"]["bits"] == 4
    assert yaml.safe_load((qat_run / "args.yaml").read_text())["qat"] == saved


def test_the_database_holds_every_results_scalar_and_each_layer_each_epoch(qat_run):
    header, rows = _results_csv(qat_run)
    con = sqlite3.connect(qat_run / DB_FILE)
    db = {(e, n): v for e, n, v in con.execute("SELECT epoch, name, value FROM results")}
    assert len(db) == EPOCHS * (len(header) - 1)
    for row in rows:
        epoch = int(float(row[0]))
        for name, value in zip(header[1:], row[1:]):
            assert db[(epoch, name)] == pytest.approx(float(value)), name
    counts = dict(con.execute("SELECT stage || ':' || epoch, COUNT(*) FROM layers GROUP BY stage, epoch"))
    assert counts == {"start:0": LAYERS, "epoch:1": LAYERS, "epoch:2": LAYERS, "post_qat:2": LAYERS}
    n_layers = con.execute("SELECT COUNT(DISTINCT layer) FROM layers").fetchone()[0]
    assert n_layers == LAYERS
    bits = {b for (b,) in con.execute("SELECT DISTINCT w_bits FROM layers")}
    assert bits == {4.0, 8.0}  # first conv at 8 bits, the rest at 4 (default qat.yaml)
    low = con.execute("SELECT COUNT(*) FROM layers WHERE stage='epoch' AND w_bits=4 AND osc_frac IS NOT NULL "
                      "AND frozen_frac IS NOT NULL AND w_scale_mean > 0 AND a_scale_mean > 0").fetchone()[0]
    assert low == EPOCHS * (LAYERS - 7)  # every tracked 4-bit layer, every epoch
    drift0 = con.execute("SELECT MAX(ABS(w_scale_drift)) FROM layers WHERE stage='start'").fetchone()[0]
    assert drift0 == 0.0
    shifted = con.execute("SELECT COUNT(*) FROM layers WHERE stage='epoch' AND bn_mean_shift > 0").fetchone()[0]
    assert shifted == EPOCHS * LAYERS  # BN re-estimated before each validation (default bn.reestimate)
    post = dict(con.execute("SELECT name, value FROM post_qat"))
    assert "fitness" in post and "metrics.metrics/mAP50-95(B)" in post and "qat/qc_loss_end" in post


def test_results_png_panels_are_per_epoch_curves_with_the_qat_ones(qat_run):
    run = read_run(qat_run)
    cols = results_columns(run)
    assert "qat/osc_frac" in cols and "qat/frozen_frac" in cols
    assert all(sum(v == v for v in run.results[c]) == EPOCHS for c in cols)  # no single-point panel
    assert not any(c.startswith("lr/") for c in cols)


@pytest.fixture
def run_copy(qat_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(qat_run, dst)
    return dst


def test_yolo_qat_report_rebuilds_from_the_run_folder_with_events(run_copy, capsys):
    for f in [run_copy / DB_FILE, run_copy / "report.md", *(run_copy / "qat_report").iterdir()]:
        f.unlink()
    (run_copy / "qat_events.jsonl").write_text(
        '{"epoch": 2, "source": "collapse_guard", "action": "rollback", "message": "mAP50-95 fell to 0"}\nnot json\n')
    assert main(["report", str(run_copy)]) == 0
    assert "QAT report:" in capsys.readouterr().out
    assert _valid_png(run_copy / "results.png")
    for stem in PLOTS:
        assert _valid_png(run_copy / "qat_report" / f"{stem}.png") and _valid_svg(run_copy / "qat_report" / f"{stem}.svg")
    con = sqlite3.connect(run_copy / DB_FILE)
    assert con.execute("SELECT epoch, source, action FROM events").fetchall() == [(2, "collapse_guard", "rollback")]
    post = dict(con.execute("SELECT name, value FROM post_qat"))  # read back from weights/last.pt
    assert "fitness" in post
    assert "| 2 | collapse_guard | rollback | mAP50-95 fell to 0 |" in (run_copy / "report.md").read_text()


@pytest.mark.parametrize("make, expected", [
    (lambda p: p / "missing", "not found"),
    (lambda p: p, "has no results.csv"),
])
def test_yolo_qat_report_on_a_bad_folder_is_one_line(tmp_path, capsys, make, expected):
    assert main(["report", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_yolo_qat_report_needs_one_folder(capsys):
    assert main(["report"]) == 2
    assert "report takes one run folder" in capsys.readouterr().err


def test_a_failing_report_costs_one_warning_not_the_run(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ultralytics_qat.engine import run as run_module

    warnings = []
    monkeypatch.setattr(run_module, "LOGGER", SimpleNamespace(warning=warnings.append, info=lambda *a: None))
    run_module.QATRun().write_report(SimpleNamespace(save_dir=tmp_path / "gone"))  # read_run raises: must not escape
    assert len(warnings) == 1 and "run report not written" in warnings[0] and "\n" not in warnings[0]


def test_resume_keeps_the_layer_rows_of_the_epochs_the_checkpoint_holds(run_copy):
    stats = LayerStats()
    stats.start(run_copy, model=None, epochs_done=1)  # the start rows are there: the model is not read
    rows = read_layers_csv(run_copy / LAYERS_CSV)
    assert {(r["stage"], r["epoch"]) for r in rows} == {("start", 0), ("epoch", 1)}
    assert len(rows) == 2 * LAYERS
    assert stats.start_scales and all(w > 0 for w, _ in stats.start_scales.values())
