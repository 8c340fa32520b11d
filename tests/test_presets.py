import pytest

from fcre_utils.presets import PRESETS, Params, params_from_dict, params_to_dict, resolve_params


def test_every_preset_resolves():
    for name in PRESETS:
        assert isinstance(resolve_params(name), Params)


def test_override_replaces_value():
    params = resolve_params("smoke", {"epochs": 7, "timesteps": [20, 60]})
    assert params.epochs == 7
    assert params.timesteps == [20, 60]


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ddim_stride": 30}, "timestep 20 in timesteps must be a positive multiple of ddim_stride=30"),
        ({"timesteps": []}, "timesteps is empty"),
        ({"timesteps": [1000]}, "timestep 1000"),
        ({"band_candidates": [[0.9, 0.1]]}, r"band \[0.9, 0.1\]"),
        ({"band_low": 0.5, "band_high": 0.5}, r"band \[0.5, 0.5\]"),
        ({"calibration_fraction": 1.5}, "calibration_fraction=1.5"),
        ({"n_members": 0}, "n_members=0"),
        ({"ddim_stride": 0}, "ddim_stride=0"),
        ({"select_on_calibration": False, "secmi_t": 30}, "secmi_t=30"),
        ({"pia_t": 1000}, "pia_t=1000"),
        ({"lowpass_cutoffs": [0.0]}, "low-pass cutoff 0.0"),
        ({"lowpass_cutoffs": []}, "lowpass_cutoffs is empty"),
        ({"lowpass_cutoffs": [2.0]}, r"low-pass cutoff 2.0 must be in \(0, 1.4142\)"),
        ({"lowpass_cutoffs": [0.5, 0.5]}, "lowpass_cutoffs=.* lists a value twice"),
        ({"timesteps": [20, 20]}, "timesteps=.* lists a value twice"),
        ({"dataset": ""}, "dataset is empty"),
        ({"n_members": 3}, "n_members=3 with calibration_fraction=0.5 leaves a split with fewer than 2 images"),
        ({"bootstrap_resamples": 1}, "bootstrap_resamples=1"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8'"),
        ({"select_on_calibration": False, "fcre_t": 30}, "fcre_t=30"),
        ({"naive_t": 1000}, "naive_t=1000"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"image_size": 16}, "image_size=16"),
    ],
)
def test_invalid_combination_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_params("smoke", overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"calibration_fraction": 0.0}, "gives 0 of n_members=24"),
        ({"band_candidates": []}, "band_candidates is empty"),
        ({"band_candidates": [[1.45, 2.0]]}, r"band \[1.45, 2.0\]"),
        ({"seed": -1}, "seed=-1"),
        ({"block_out_channels": []}, "block_out_channels=\\[\\]"),
        ({"block_out_channels": [8, 12]}, "multiples of 8"),
        ({"layers_per_block": 0}, "layers_per_block=0"),
        ({"beta_end": 2.0}, "beta_end=2.0"),
        ({"beta_start": 0.03}, "beta_start=0.03"),
        ({"dataset": "images.npy"}, "path to an .npz file"),
        ({"history_every": -1}, "history_every=-1"),
        ({"ring_width": 0.0}, "ring_width=0.0"),
        ({"heatmap_edges": [0.5, 0.2]}, r"heatmap_edges=\[0.5, 0.2\]"),
        ({"ablation_strides": [15]}, "ablation stride 15 must be a positive divisor"),
        ({"ablation_member_sizes": [24]}, r"ablation member-set size 24 must be in \[2, n_members=24\)"),
    ],
)
def test_more_combinations_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_params("smoke", overrides)


def test_float_text_accepted():
    assert resolve_params("smoke", {"learning_rate": "1e-3"}).learning_rate == 0.001
