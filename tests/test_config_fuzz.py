"""Fuzzing the qat config with hypothesis: any overrides give a config or one line of QATConfigError, nothing else."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ultralytics_qat.config import QATConfig, _leaf_keys
from ultralytics_qat.errors import QATConfigError

KEYS = _leaf_keys(QATConfig)
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["*", "1e-3", "channel", "tensor", "auto", "mse", ".nan"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=6)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), st.text(min_size=1, max_size=20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=3))
def test_any_overrides_give_a_valid_config_or_one_line_error(overrides):
    try:
        cfg = QATConfig.load(None, overrides)
    except QATConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "_MISSING_TYPE" not in msg, msg
        return
    for key in KEYS:  # an accepted config holds no NaN/inf anywhere
        v = cfg.to_dict()
        for part in key.split("."):
            v = v[part]
        assert not (isinstance(v, float) and not math.isfinite(v)), (key, v)
