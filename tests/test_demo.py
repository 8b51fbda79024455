"""The no-argument demo (float vs PTQ vs QAT vs ONNX), on a tiny profile: it runs end to end and reuses its cache."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_demo_table_and_cached_float_model(tmp_path, capsys, monkeypatch):
    from ultralytics_qat import demo

    profile = demo.DemoProfile(n_train=16, n_val=8, imgsz=64, batch=8, fp_epochs=2, qat_epochs=1)
    rows = demo.run_demo(profile, project=tmp_path / "runs", cache_dir=tmp_path / "cache", data_dir=tmp_path / "shapes")
    out = capsys.readouterr().out
    assert [r.model.split(" ")[0] for r in rows] == ["float", "PTQ", "QAT", "QAT"]
    assert all(0.0 <= r.map50_95 <= 1.0 for r in rows)
    for r in rows[0], rows[2], rows[3]:
        assert r.file.is_file() and r.size_mb > 0
    assert rows[3].file.suffix == ".onnx" and rows[3].size_mb < rows[2].size_mb  # INT4 weights
    assert "% of float" in out and "QAT run:" in out and str(rows[2].file.parents[1]) in out
    cached = tmp_path / "cache" / profile.cache_name
    assert cached.is_file() and rows[0].file == cached

    def no_training(*a, **k):
        raise AssertionError("the cached float model must be reused, not retrained")

    monkeypatch.setattr("ultralytics.YOLO.train", no_training)
    assert demo._float_model(profile, {}, cached, "x") == cached
