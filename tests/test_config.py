"""qat.yaml schema: defaults, one-line errors for bad keys/types/ranges, overrides, recipe resolution."""

from dataclasses import fields, is_dataclass

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


# ---- bad input found by a bad-input trial: every one is a one-line QATConfigError, never a traceback or a default ----
def _float_keys(cls=QATConfig, prefix=""):
    for f in fields(cls):
        if is_dataclass(f.default_factory):
            yield from _float_keys(f.default_factory, f"{prefix}{f.name}.")
        elif f.metadata["kind"] is float:
            yield prefix + f.name


FLOAT_KEYS = list(_float_keys())


def test_float_keys_cover_the_nullable_ones():
    assert {"ead.start", "oscillation.freeze_threshold", "optim.scale_lr_mult"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_key_rejects_nan_and_inf(key, value):
    section, _, leaf = key.rpartition(".")
    data = {section: {leaf: value}} if section else {leaf: value}
    msg = _error(data)
    assert f"'{key}={value}' is not a finite number" in msg and "e.g." in msg, msg


def test_huge_int_for_a_float_key_is_one_line():
    msg = _error({"ead": {"k": 10**400}})
    assert "'ead.k=" in msg and "too large for a float" in msg and len(msg) < 300, msg


def test_scale_lr_mult_is_capped_and_the_cap_is_documented():
    assert "out of range; allowed: 0.0..100.0" in _error({"optim": {"scale_lr_mult": 1e6}})
    assert QATConfig.from_dict({"optim": {"scale_lr_mult": 100}}).optim.scale_lr_mult == 100.0
    doc = dict((k, d) for k, _, d in describe_options())["optim.scale_lr_mult"]
    assert doc.startswith("0.0..100.0: ") and "crossed zero" in doc


def test_exponent_floats_that_yaml_1_1_reads_as_strings_are_accepted(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text("qc:\n  lr: 1e-4\n")  # PyYAML reads 1e-4 as a string
    assert QATConfig.load(f, overrides={"afw.lr": "2E-3"}).qc.lr == 1e-4
    assert "not a finite number" in _error({"qc": {"lr": "1e400"}})
    assert "must be float, got str 'fast'" in _error({"qc": {"lr": "fast"}})


@pytest.mark.parametrize(
    "text,needle",
    [
        (b"weight:\n  bits: \xff4\n", "is not UTF-8 text (byte 0xff at offset 16); save it as UTF-8"),
        (b"qat:\n", "the 'qat:' block must hold a mapping of qat keys, got NoneType None"),
        (b"qat: [1, 2]\n", "the 'qat:' block must hold a mapping of qat keys, got list [1, 2]"),
        (b"overrides:\n  3: {weight_bits: 6}\n", "'overrides' keys must be glob strings of conv names"),
        (b"overrides:\n  null: {weight_bits: 6}\n", "got NoneType None; write globs as quoted strings"),
        (b"weight: " + b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
        (b"weight: &w {bits: *w}\n", "'weight.bits' must be int, got dict"),  # a YAML alias that refers to itself
    ],
)
def test_bad_qat_yaml_files_give_one_line_errors(tmp_path, text, needle):
    f = tmp_path / "q.yaml"
    f.write_bytes(text)
    with pytest.raises(QATConfigError) as e:
        QATConfig.load(f)
    assert "\n" not in str(e.value) and needle in str(e.value), e.value


def test_deeply_nested_dicts_give_one_line_errors():
    deep = node = {}
    for _ in range(5000):
        node["bits"] = node = {}
    msg = _error({"weight": {"bits": deep}})
    assert "'weight.bits' must be int, got dict" in msg and len(msg) < 300
    with pytest.raises(QATConfigError, match="must be int, got dict"):
        QATConfig.load(overrides={"weight.bits": deep})


@pytest.mark.parametrize("qat", [3, 2.5, ["qat.yaml"], True])
def test_qat_of_a_wrong_type_names_what_it_takes(qat):
    with pytest.raises(QATConfigError, match=r"is not a qat config; pass a qat.yaml path, a bundled recipe name \(.*stable"):
        QATConfig.load(qat)


@pytest.mark.parametrize(
    "section,value,fix",
    [
        ("qc", 0, "qat.qc.enabled=false"),
        ("oscillation", False, "qat.oscillation.freeze_threshold=null"),
        ("afw", "off", "qat.afw.enabled=false"),
        ("ead", None, "qat.ead.start=null"),
        ("bn", [], "qat.bn.reestimate=false"),
        ("weight", 3, "set its keys instead, e.g. qat.weight.bits=4"),
    ],
)
def test_a_section_given_a_value_is_an_error_not_its_defaults(section, value, fix):
    msg = _error({section: value})
    assert f"'{section}' is a section of keys, not a value" in msg and fix in msg, msg
    with pytest.raises(QATConfigError, match=fix.replace(".", r"\.").replace("(", r"\(")):
        QATConfig.load(overrides={section: value})  # qat.qc=0 on the command line


@pytest.mark.parametrize("exclude", [["*"], ["model.22.*", "**"]])
def test_excluding_every_conv_is_rejected_up_front(exclude):
    msg = _error({"exclude": exclude})
    assert "leaves every conv in float, which is not QAT" in msg and "plain 'yolo train'" in msg, msg
    assert QATConfig.from_dict({"exclude": ["model.2*", "*.cv2.*"]}).exclude == ["model.2*", "*.cv2.*"]


def test_dotted_per_layer_override_keeps_the_glob_whole():
    cfg = QATConfig.load(overrides={"overrides.model.1.conv.weight_bits": 6, "overrides.model.1.conv.activation_bits": 8})
    assert cfg.overrides == {"model.1.conv": {"weight_bits": 6, "activation_bits": 8}}
    assert QATConfig.load(overrides={"overrides.model.2.*": {"weight_bits": 3}}).overrides == {"model.2.*": {"weight_bits": 3}}
    with pytest.raises(QATConfigError, match=r"unknown key 'overrides\.model\.1\.conv\.weigth_bits'\. Did you mean 'weight_bits'"):
        QATConfig.load(overrides={"overrides.model.1.conv.weigth_bits": 6})
    data = {"weight": {"bits": 5}}
    QATConfig.load(data, overrides={"weight.bits": 3})
    assert data == {"weight": {"bits": 5}}  # overrides never write into the caller's dict
