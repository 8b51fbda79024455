"""README promises that must stay true: the qat.yaml reference table and the commands CI runs."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_qat_reference_table_is_current():
    spec = importlib.util.spec_from_file_location("qat_reference", ROOT / "scripts" / "qat_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    assert mod.reference_table() in readme, "run: python scripts/qat_reference.py and paste into README.md"


def test_ci_runs_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert 'pip install -e ".[dev]" && yolo-qat train' in readme
