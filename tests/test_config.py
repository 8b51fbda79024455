"""qat.yaml schema: defaults, one-line errors for bad keys/types/ranges, overrides, recipe resolution."""

import pytest

from ultralytics_qat.config import DEFAULT_QAT_YAML, QATConfig, describe_options, resolve_qat_yaml
from ultralytics_qat.errors import QATConfigError


def test_bundled_default_yaml_is_the_stable_recipe_on_schema_defaults():
    from ultralytics_qat.config import resolve_qat_yaml

    default = QATConfig.load(DEFAULT_QAT_YAML)
    assert default == QATConfig.load(resolve_qat_yaml("stable")) != QATConfig()  # stabilizers on, unlike the schema
    assert default.qc.enabled and default.oscillation.freeze_threshold == 0.1 and default.bn.reestimate
    cfg = QATConfig()
    assert (cfg.weight.bits, cfg.activation.bits, cfg.first_layer_bits, cfg.last_layer_bits) == (4, 4, 8, 8)
    assert cfg.weight.granularity == "channel" and cfg.amp is False


def test_every_option_is_in_the_default_yaml():
    text = DEFAULT_QAT_YAML.read_text()
    for key, _, _ in describe_options():
        assert key.split(".")[-1] + ":" in text, key


def _error(data) -> str:
    with pytest.raises(QATConfigError) as e:
        QATConfig.from_dict(data)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_it_the_closest_and_the_valid_ones():
    msg = _error({"weight": {"bitz": 3}})
    assert "'weight.bitz'" in msg and "Did you mean 'weight.bits'" in msg and "activation.grid" in msg
    assert "'foo'" in _error({"foo": 1})


@pytest.mark.parametrize("bits", [1, 9, 0, -4])
def test_bits_out_of_range(bits):
    msg = _error({"weight": {"bits": bits}})
    assert "weight.bits" in msg and "2..8" in msg


def test_bad_types_and_values():
    assert "scale_lr_mult" in _error({"optim": {"scale_lr_mult": -0.5}})
    assert "must be int" in _error({"activation": {"bits": "four"}})
    assert "must be int" in _error({"weight": {"bits": True}})
    assert "channel" in _error({"weight": {"granularity": "row"}})
    assert "may not be null" in _error({"weight": {"bits": None}})
    assert "out of range" in _error({"overrides": {"model.1.*": {"weight_bits": 12}}})
    assert "Did you mean 'weight_bits'" in _error({"overrides": {"model.1.*": {"weigth_bits": 4}}})


def test_float_activations_and_int_coercion():
    cfg = QATConfig.from_dict({"activation": {"bits": None}, "optim": {"scale_lr_mult": 2}})
    assert cfg.activation.bits is None and cfg.optim.scale_lr_mult == 2.0


def test_dotted_overrides_apply_on_top_of_a_file(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text("weight:\n  bits: 6\nactivation:\n  bits: 8\n")
    cfg = QATConfig.load(f, overrides={"weight.bits": 3, "optim.scale_lr_mult": 0.5})
    assert (cfg.weight.bits, cfg.activation.bits, cfg.optim.scale_lr_mult) == (3, 8, 0.5)
    with pytest.raises(QATConfigError, match="weight.bitz"):
        QATConfig.load(f, overrides={"weight.bitz": 3})


def test_round_trip_and_qat_block(tmp_path):
    cfg = QATConfig.load(overrides={"weight.bits": 3, "exclude": ["model.2*"]})
    assert QATConfig.from_dict(cfg.to_dict()) == cfg
    f = tmp_path / "train.yaml"
    f.write_text("qat:\n  weight:\n    bits: 5\n")
    assert QATConfig.load(f).weight.bits == 5


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(QATConfigError, match="not found.*bundled recipe"):
        resolve_qat_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight: [1, 2\n")
    with pytest.raises(QATConfigError, match="not valid YAML"):
        QATConfig.load(bad)


def test_bundled_name_resolves():
    assert resolve_qat_yaml("qat.yaml") == DEFAULT_QAT_YAML
    assert resolve_qat_yaml("qat") == DEFAULT_QAT_YAML
