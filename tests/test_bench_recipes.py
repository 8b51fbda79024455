"""scripts/bench_recipes.py's logic: recipe specs, what a row calls final, the reuse of finished runs, the mixed budget.

No training here: the benchmark itself is run by hand (BENCHMARKS.md).
"""

import json
from pathlib import Path

import pytest

from qat_test_utils import load_script

MAP = "metrics/mAP50-95(B)"


@pytest.fixture(scope="module")
def br():
    return load_script("bench_recipes")


def test_recipe_specs(br):
    assert br.parse_recipe("default") == ("qat.yaml", {}, False)
    assert br.parse_recipe("lsq") == ("lsq", {}, False)
    assert br.parse_recipe("stable+mixed+distill") == ("stable", {"qat.distill.weight": 1.0}, True)
    assert br.parse_recipe("default+distill=0.5") == ("qat.yaml", {"qat.distill.weight": 0.5}, False)
    assert br.parse_recipe("default+distill=2:both") == (
        "qat.yaml", {"qat.distill.weight": 2.0, "qat.distill.loss": "both"}, False)
    assert br.parse_recipe("default+optim.scale_lr_mult=0.1+mixed") == (
        "qat.yaml", {"qat.optim.scale_lr_mult": 0.1}, True)
    for bad in ("nope", "default+fast", "qat.yaml+distill", "default+distill=x", "default+distill=0", "default+mixed=2",
                "default+distill=1:kl", "default+distill=0:head", "default+optim.nope=1",
                "default+optim.scale_lr_mult=-1", "default+weight.bits=12"):
        with pytest.raises(SystemExit, match="bundled recipe"):
            br.parse_recipe(bad)


def _run_dir(tmp_path: Path, maps: list[float]) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    lines = ["epoch,time,metrics/mAP50-95(B),qat/osc_frac"] + [f"{i + 1},{i},{m},0.01" for i, m in enumerate(maps)]
    (d / "results.csv").write_text("\n".join(lines) + "\n")
    return d


def test_final_is_after_post_qat_and_collapse_reads_the_epochs(br, tmp_path, monkeypatch):
    d = _run_dir(tmp_path, [0.30, 0.40, 0.37])
    monkeypatch.setattr(br, "post_qat_map", lambda _: None)
    row = br.summarize("x", d, fp_map=0.5, wall=1.0, control=0.4)
    assert row["final"] == row["last_epoch"] == 0.37 and row["best"] == 0.40 and row["best_epoch"] == 2
    assert row["fair"] == pytest.approx(92.5) and row["retained"] == pytest.approx(74.0)
    assert row["epoch_s"] == pytest.approx(2 / 3)  # results.csv's clock at the last epoch, per epoch
    assert not row["collapse"]  # 0.37 is within 10% of 0.40
    monkeypatch.setattr(br, "post_qat_map", lambda _: 0.42)  # QC after the loop lifted it
    row = br.summarize("x", d, fp_map=0.5, wall=1.0, control=0.4)
    assert row["final"] == 0.42 and row["last_epoch"] == 0.37 and row["best"] == 0.40
    assert row["fair"] == pytest.approx(105.0)
    (tmp_path / "b").mkdir()
    d2 = _run_dir(tmp_path / "b", [0.30, 0.40, 0.35])
    assert br.summarize("x", d2, fp_map=0.5, wall=1.0)["collapse"]  # 12.5% below the best epoch, QC or not


def test_a_finished_run_is_reused_only_with_the_same_arguments(br, tmp_path):
    d = tmp_path / "runs" / "tag"
    d.mkdir(parents=True)
    (d / "results.csv").write_text("epoch\n1\n")
    args = dict(model="missing-model.pt", epochs=3, lr0=0.001)
    (d / "bench_done.json").write_text(json.dumps({"args": br.run_key(args), "wall_s": 12.5}))
    assert br.train("tag", tmp_path, **dict(args)) == (d, 12.5)
    with pytest.raises(Exception):  # other arguments: trained again (and this model file does not exist)
        br.train("tag", tmp_path, **{**args, "epochs": 4})
    with pytest.raises(Exception):  # --rerun: trained again
        br.train("tag", tmp_path, rerun=True, **dict(args))


def test_a_run_of_another_thread_count_is_not_reused(br, tmp_path, monkeypatch):
    from ultralytics.utils import torch_utils

    d = tmp_path / "runs" / "tag"
    d.mkdir(parents=True)
    (d / "results.csv").write_text("epoch\n1\n")
    args = dict(model="missing-model.pt", epochs=3)
    (d / "bench_done.json").write_text(json.dumps({"args": br.run_key(args), "threads": 1, "wall_s": 2}))
    monkeypatch.setattr(torch_utils, "NUM_THREADS", 1)
    assert br.train("tag", tmp_path, **dict(args)) == (d, 2)
    monkeypatch.setattr(torch_utils, "NUM_THREADS", 2)  # sums in another order: its numbers are another run's
    with pytest.raises(Exception):
        br.train("tag", tmp_path, **dict(args))


def test_a_run_of_an_edited_recipe_file_is_not_reused(br, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  scale_lr_mult: 1.0\n")
    args = dict(model="fp.pt", epochs=3, qat=str(recipe), **{"qat.weight.bits": 4})
    before = br.run_key(args)
    assert br.run_key(dict(args)) == before
    recipe.write_text("optim:\n  scale_lr_mult: 0.1\n")  # same name, other content: the old run must not count
    assert br.run_key(args) != before
    assert br.run_key({**args, "qat.weight.bits": 3}) != br.run_key(args)


def test_mixed_budget_is_the_uniform_models_average_bits(br):
    w3, w4 = (br.uniform_avg_bits(Path("yolov8n.yaml"), "qat.yaml", b) for b in (3, 4))
    assert 3 < w3 < w4 < 8  # the first and last layers stay at 8 bits and count at 8
    assert br.uniform_avg_bits(Path("yolov8n.yaml"), "qat.yaml", 8) == 8
    assert br.uniform_avg_bits(Path("yolov8n.yaml"), "lsq", 3) == pytest.approx(w3)


def _row(run, fair, curve=(0.3,)):
    return {"run": run, "fair": fair, "curve": list(curve), "final": curve[-1], "best": max(curve)}


def test_comparisons_pair_each_variant_with_its_base_per_seed(br):
    rows = {s: [_row("fp", None, (0.4,)), _row("fp+ft (fair control)", 100.0), _row("ptq w4a4", 20.0),
                _row("lsq w4a4", 90.0 - s), _row("default w4a4", 92.0), _row("default+distill w4a4", 95.0 + s),
                _row("default+mixed w4.30a4", 91.0), _row("default w3a3", 80.0), _row("lsq w3a3", 81.0)]
            for s in (0, 1)}
    text = br.comparisons(rows)
    assert "- default vs lsq at A4: +2.0 / +3.0 points of the fair control (mean +2.5; ahead in 2 of 2)" in text
    assert "- default+distill vs default at A4: +3.0 / +4.0" in text
    assert "- default+mixed vs default at A4: -1.0 / -1.0 points of the fair control (mean -1.0; ahead in 0 of 2)" in text
    assert "- default vs lsq at A3: -1.0 / -1.0" in text and "ptq" not in text
    assert br.epoch1(rows[0][4], 0.4) == pytest.approx(75.0) and br.epoch1(rows[0][2], 0.4) is None


def test_json_files_of_one_work_folder_merge_per_seed(br):
    a = {"0": [_row("fp", None), _row("lsq w4a4", 90.0)], "1": [_row("fp", None), _row("lsq w4a4", 88.0)]}
    b = {"0": [_row("fp", None), _row("default w4a4", 93.0)], "1": [_row("fp", None), _row("default w4a4", 91.0)]}
    merged = br.merge_rows([a, b])
    assert sorted(merged) == [0, 1]
    assert [r["run"] for r in merged[1]] == ["fp", "lsq w4a4", "default w4a4"]
    assert "default vs lsq at A4: +3.0 / +3.0" in br.comparisons(merged)


def test_train_args_are_checked_and_name_their_runs(br):
    assert br.parse_train_args(["mosaic=0", "optimizer=AdamW", "lr0=6.25e-4"]) == {
        "mosaic": 0, "optimizer": "AdamW", "lr0": 6.25e-4}
    for bad, why in (("mosaik=0", "not an Ultralytics training argument"), ("epochs=3", "set by the benchmark"),
                     ("mosaic", "KEY=VALUE"), ("qat.weight.bits=3", "not an Ultralytics")):
        with pytest.raises(SystemExit, match=why):
            br.parse_train_args([bad])
    assert br.args_suffix({}, None) == ""
    assert br.args_suffix({"mosaic": 0, "lr0": 0.001}, 1) == "@mosaic=0,lr0=0.001,stop1"
    assert br.args_suffix({}, 1) == "@stop1"


def test_a_stopped_run_is_not_reused_for_a_full_one(br, tmp_path):
    d = tmp_path / "runs" / "tag"
    d.mkdir(parents=True)
    (d / "results.csv").write_text("epoch\n1\n")
    args = dict(model="missing-model.pt", epochs=15)
    (d / "bench_done.json").write_text(json.dumps({"args": br.run_key({**args, "stop after epoch": 1}), "wall_s": 3}))
    assert br.train("tag", tmp_path, stop_after=1, **dict(args)) == (d, 3)
    with pytest.raises(Exception):  # the full schedule: trained again (and this model file does not exist)
        br.train("tag", tmp_path, **dict(args))


def test_other_training_arguments_compare_with_the_same_recipe(br):
    rows = {0: [_row("fp", None, (0.4,)), _row("default w4a4", 92.0), _row("default@mosaic=0 w4a4", 90.5),
                _row("default@stop1 w4a4", 80.0), _row("default@mosaic=0,stop1 w4a4", 81.0),
                _row("default+distill@stop1 w4a4", 83.0), _row("fp+ft@mosaic=0 (fair control)", 100.0)]}
    text = br.comparisons(rows)
    assert "- default@mosaic=0 vs default at A4: -1.5" in text
    assert "- default@mosaic=0,stop1 vs default@stop1 at A4: +1.0" in text  # stopped runs against stopped ones
    assert "- default+distill@stop1 vs default@stop1 at A4: +3.0" in text
    assert "default@stop1 vs default " not in text and "fp+ft" not in text
    assert br.epoch1(rows[0][-1], 0.4) is None and br.epoch1(rows[0][3], 0.4) == pytest.approx(75.0)
