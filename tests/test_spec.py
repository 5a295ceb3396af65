import pytest

from cnnserve.core.spec import ModelSpec, SpecError


def spec(**kw):
    base = dict(arch="lenet5", channels=1, height=28, width=28, mean=(0.5,), std=(0.25,), labels=("a", "b"))
    return ModelSpec(**{**base, **kw})


def test_round_trip_json():
    s = spec(resize="center-crop", crop_pct=0.9)
    assert ModelSpec.from_json(s.to_json()) == s
    assert s.num_classes == 2 and s.input_shape == (1, 28, 28)


@pytest.mark.parametrize("kw, msg", [
    (dict(channels=2), "channels"),
    (dict(mean=(0.5, 0.5)), "one value per channel"),
    (dict(std=(0.0,)), "std must be positive"),
    (dict(resize="squash"), "resize must be one of"),
    (dict(labels=("a", "a")), "unique"),
    (dict(height=0), "positive"),
])
def test_invalid_specs_are_refused(kw, msg):
    with pytest.raises(SpecError, match=msg):
        spec(**kw)


def test_unknown_format_and_malformed():
    d = spec().to_dict()
    with pytest.raises(SpecError, match="unknown spec format"):
        ModelSpec.from_dict({**d, "format": "other/9"})
    d.pop("height")
    with pytest.raises(SpecError, match="malformed"):
        ModelSpec.from_dict(d)
    with pytest.raises(SpecError, match="not valid JSON"):
        ModelSpec.from_json("{")
