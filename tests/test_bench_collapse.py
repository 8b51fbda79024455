"""scripts/bench_collapse.py's pure logic: peak-then-drop detection, argument parsing, how a run's arguments are built.

No training here: the benchmark itself is run by hand (BENCHMARKS.md "Collapse benchmark").
"""

import json
import math

import pytest

from qat_test_utils import load_script



@pytest.fixture(scope="module")
def bc():
    return load_script("bench_collapse")


def test_peak_then_drop_is_a_collapse(bc):
    s = bc.collapse_stats([0.20, 0.30, 0.28, 0.25, 0.26])
    assert s["peak"] == 0.30 and s["peak_epoch"] == 2 and s["final"] == 0.26
    assert s["drop"] == pytest.approx(0.04 / 0.30)
    assert s["worst_drop"] == pytest.approx(0.05 / 0.30)
    assert s["collapsed"]


def test_rising_curve_and_recovered_dip_do_not_collapse(bc):
    assert not bc.collapse_stats([0.1, 0.2, 0.3])["collapsed"]
    dip = bc.collapse_stats([0.30, 0.10, 0.29])  # fell by 67% and came back within 10% of the peak
    assert dip["worst_drop"] == pytest.approx(2 / 3) and not dip["collapsed"]
    early = bc.collapse_stats([0.20, 0.10, 0.15, 0.30])  # a dip before the peak counts against the best so far
    assert early["worst_drop"] == pytest.approx(0.5) and early["drop"] == 0.0 and not early["collapsed"]
    assert bc.collapse_stats([0.04, 0.0, 0.3])["worst_drop"] == 0.0  # best so far below min_peak: noise


def test_drop_threshold_boundary_and_custom_drop(bc):
    assert bc.collapse_stats([0.5, 0.45])["collapsed"]  # exactly 10% below the peak counts
    assert not bc.collapse_stats([0.5, 0.451])["collapsed"]
    assert not bc.collapse_stats([0.5, 0.45], drop=0.2)["collapsed"]
    assert bc.collapse_stats([0.5, 0.39], drop=0.2)["collapsed"]


def test_low_peak_is_noise_not_collapse(bc):
    assert not bc.collapse_stats([0.03, 0.01])["collapsed"]  # below the default min_peak 0.05
    assert bc.collapse_stats([0.03, 0.01], min_peak=0.02)["collapsed"]
    zero = bc.collapse_stats([0.0, 0.0])
    assert zero["drop"] == 0.0 and not zero["collapsed"]


def test_first_epoch_reaching_the_peak_and_nan_ignored(bc):
    s = bc.collapse_stats([0.2, 0.4, float("nan"), 0.4, 0.3])
    assert s["peak_epoch"] == 2 and s["final"] == 0.3 and s["collapsed"]
    empty = bc.collapse_stats([float("nan")])
    assert empty["peak"] is None and not empty["collapsed"]


def test_pick_collapsed_takes_the_largest_drop(bc):
    rows = [{"setting": "a", "collapsed": True, "drop": 0.12}, {"setting": "b", "collapsed": False, "drop": 0.5},
            {"setting": "c", "collapsed": True, "drop": 0.30}]
    assert bc.pick_collapsed(rows) == "c"
    assert bc.pick_collapsed([rows[1]]) is None


def test_parse_search_all_or_named(bc):
    a = bc.parse_args(["--search"])
    assert a.search == list(bc.SETTINGS) and a.compare is None
    name = next(iter(bc.SETTINGS))
    a = bc.parse_args(["--search", name, "--compare", "auto", "--recipes", "lsq", "default", "--drop", "0.2"])
    assert a.search == [name] and a.compare == "auto" and a.recipes == ["lsq", "default"] and a.drop == 0.2
    assert bc.parse_args(["--compare", name]).recipes == list(bc.COMPARE)


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to do"),
    (["--search", "no-such-setting"], "unknown setting"),
    (["--compare", "no-such-setting"], "unknown setting"),
    (["--compare", "auto"], "--compare auto picks"),
    (["--search", "--recipes", "lsq", "paper"], "unknown --recipes"),
    (["--search", "--drop", "1.5"], "--drop must be"),
])
def test_bad_arguments_exit_with_a_message(bc, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bc.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_run_args_setting_wins_and_fp_is_substituted(bc):
    setting = {"model": "fp", "epochs": 3, "qat.weight.bits": 3, "batch": 8}
    args = bc.run_args(setting, bc.COMPARE["stable"], "/x/fp.pt", "data.yaml", 1)
    assert args["model"] == "/x/fp.pt" and args["batch"] == 8 and args["nbs"] == bc.COMMON["nbs"]
    assert args["qat"] == "stable" and args["qat.collapse.action"] == "warn" and args["seed"] == 1
    assert "qat.collapse.action" not in bc.run_args(setting, bc.COMPARE["default"], "/x/fp.pt", "d", 0)
    flt = bc.run_args(setting, bc.COMPARE["float"], "/x/fp.pt", "d", 0)
    assert flt["model"] == "/x/fp.pt" and flt["epochs"] == 3 and not [k for k in flt if k.startswith("qat")]
    assert bc.run_args(setting, {"qat": "r", "qat.weight.bits": 8}, "/x/fp.pt", "d", 0)["qat.weight.bits"] == 3
    with pytest.raises(ValueError):
        bc.run_args(setting, bc.COMPARE["lsq"], None, "d", 0)


def test_settings_describe_the_problem_not_a_stabilizer(bc):
    stabilizers = ("qat.ema", "qat.bn", "qat.oscillation", "qat.scalegrad", "qat.qc", "qat.afw", "qat.ead",
                   "qat.collapse", "qat.schedule")
    for name, s in bc.SETTINGS.items():
        assert "model" in s and s.get("epochs"), name
        assert not [k for k in s if k == "qat" or k.startswith(stabilizers)], name
    from ultralytics_qat.config import QATConfig

    for name, s in bc.SETTINGS.items():  # every qat.* key of a setting is a real config key
        QATConfig.load(None, {k[4:]: v for k, v in s.items() if k.startswith("qat.")})


def test_read_curves_from_a_run_folder(bc, tmp_path):
    (tmp_path / "results.csv").write_text(
        "epoch,metrics/mAP50-95(B),qat/osc_frac,qat/weight_scale_mean\n1,0.30,0.01,0.05\n2,0.20,0.02,0.06\n")
    layers = ["stage,epoch,layer,w_scale_drift", "start,0,a,", "epoch,1,a,0.1", "epoch,1,b,0.3", "epoch,2,a,0.4",
              "epoch,2,b,0.6", "post_qat,2,a,9.0"]
    (tmp_path / "qat_layers.csv").write_text("\n".join(layers) + "\n")
    (tmp_path / "qat_events.jsonl").write_text(json.dumps({"epoch": 2, "action": "warn", "message": "m"}) + "\n")
    c = bc.read_curves(tmp_path)
    assert c["map"] == [0.30, 0.20] and c["osc"] == [0.01, 0.02] and c["w_scale_mean"] == [0.05, 0.06]
    assert c["w_scale_drift"] == pytest.approx([0.2, 0.5])
    assert c["events"] == [{"epoch": 2, "action": "warn"}] and c["post_qat_map"] is None
    assert math.isclose(bc.collapse_stats(c["map"])["drop"], 1 / 3)


def test_tables_show_every_run_and_epoch(bc):
    def row(name, curve, events=()):
        return {"setting": name, "recipe": name, "map": curve, "osc": [0.01] * len(curve),
                "w_scale_drift": [0.1] * len(curve), "events": list(events), "post_qat_map": None, "wall_s": 12.0,
                **bc.collapse_stats(curve)}

    rows = [row("lsq", [0.3, 0.2, 0.1]), row("default", [0.3, 0.29], [{"epoch": 2, "action": "restore"}])]
    search = bc.search_table(rows).splitlines()
    assert len(search) == 4 and "| lsq | 3 | 0.300 | 1 | 0.100 | 66.7 |" in search[2] and "| yes |" in search[2]
    text = bc.compare_tables(rows)
    assert "| default | 0.300 | 1 | 0.290 | 3.3 | 3.3 | no | restore@2 | - |" in text
    assert "| 3 | 0.100 | - |" in text  # a shorter run leaves its later epochs empty
    epoch_rows = [line for line in text.splitlines() if line.startswith("| 1 | ")]
    assert len(epoch_rows) == 3  # one per-epoch table each for mAP, oscillation, scale drift
