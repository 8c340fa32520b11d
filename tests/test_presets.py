import pytest

from fcre_utils.presets import PRESETS, Params, params_from_dict, params_to_dict, resolve_params


def test_every_preset_resolves():
    for name in PRESETS:
        assert isinstance(resolve_params(name), Params)


def test_override_replaces_value():
    params = resolve_params("smoke", {"epochs": 7, "timesteps": [10, 30]})
    assert params.epochs == 7
    assert params.timesteps == [10, 30]


def test_int_accepted_for_float():
    params = resolve_params("smoke", {"learning_rate": 1})
    assert params.learning_rate == 1.0
    assert isinstance(params.learning_rate, float)


def test_unknown_preset_rejected():
    with pytest.raises(KeyError, match="unknown preset 'fast'"):
        resolve_params("fast")


def test_unknown_parameter_rejected():
    with pytest.raises(KeyError, match="unknown parameter 'epoch'"):
        resolve_params("smoke", {"epoch": 3})


@pytest.mark.parametrize(
    "name, value",
    [("epochs", "ten"), ("epochs", 2.5), ("attention", 1), ("timesteps", 50), ("band_candidates", [[0.1, "x"]])],
)
def test_wrong_type_rejected(name, value):
    with pytest.raises(TypeError, match=f"parameter '{name}"):
        resolve_params("smoke", {name: value})


def test_dict_round_trip():
    params = resolve_params("quick")
    assert params_from_dict(params_to_dict(params)) == params


def test_quick_preset_sizes():
    params = resolve_params("quick")
    n_eval_nonmembers = params.n_nonmembers - round(params.calibration_fraction * params.n_nonmembers)
    assert n_eval_nonmembers >= 1000
    assert params.dataset == "pneumoniamnist"
