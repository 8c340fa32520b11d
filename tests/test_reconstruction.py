import pytest
import torch
from diffusers import DDIMScheduler
from types import SimpleNamespace

from fcre_utils import reconstruction
from fcre_utils.presets import resolve_params
from fcre_utils.models import build_scheduler


class GaussianOptimalEps(torch.nn.Module):
    """Exact noise predictor for data distributed as N(mean, sigma^2 I).

    x_t ~ N(sqrt(a) mean, a sigma^2 + 1 - a), so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a sigma^2 + 1 - a).
    """

    def __init__(self, mean, sigma, alphas_cumprod):
        super().__init__()
        self.mean, self.sigma, self.alphas = mean, sigma, alphas_cumprod.double()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        a = self.alphas[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.sigma**2 + 1 - a)
        return SimpleNamespace(sample=eps)


@pytest.fixture
def alphas():
    return build_scheduler(resolve_params("smoke")).alphas_cumprod.double()


@pytest.fixture
def exact_model(alphas):
    torch.manual_seed(0)
    mean = torch.randn(1, 1, 8, 8, dtype=torch.float64) * 0.3
    return GaussianOptimalEps(mean, 0.5, alphas), mean


def test_reverse_step_matches_diffusers(alphas):
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(100)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x)
    for t in (500, 100, 10):
        expected = scheduler.step(eps, t, x, eta=0.0).prev_sample
        ours = reconstruction.ddim_move(x, eps, alphas[t], alphas[t - 10])
        torch.testing.assert_close(ours, expected)


def test_move_inverts_itself(alphas):
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x)
    moved = reconstruction.ddim_move(x, eps, alphas[40], alphas[90])
    torch.testing.assert_close(reconstruction.ddim_move(moved, eps, alphas[90], alphas[40]), x)


def test_forward_noise_formula(alphas):
    x0 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    x_t, eps = reconstruction.forward_noise(x0, 200, alphas, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_t, alphas[200].sqrt() * x0 + (1 - alphas[200]).sqrt() * eps)


def test_forward_noise_seeded(alphas):
    x0 = torch.zeros(2, 1, 4, 4)
    first, _ = reconstruction.forward_noise(x0, 10, alphas, torch.Generator().manual_seed(5))
    again, _ = reconstruction.forward_noise(x0, 10, alphas, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, again)


def test_round_trip_with_exact_model(exact_model, alphas):
    model, mean = exact_model
    x0 = mean + 0.5 * torch.randn(4, 1, 8, 8, dtype=torch.float64)
    x_t = reconstruction.ddim_invert(model, x0, 100, 1, alphas)[100]
    back = reconstruction.ddim_reverse(model, x_t, 100, 1, alphas)[-1]
    assert (back - x0).abs().max() < 1e-2


def test_round_trip_error_shrinks_with_stride(exact_model, alphas):
    model, mean = exact_model
    x0 = mean + 0.5 * torch.randn(4, 1, 8, 8, dtype=torch.float64)
    errors = []
    for stride in (50, 10, 2):
        x_t = reconstruction.ddim_invert(model, x0, 200, stride, alphas)[200]
        errors.append((reconstruction.ddim_reverse(model, x_t, 200, stride, alphas)[-1] - x0).abs().max().item())
    assert errors[0] > errors[1] > errors[2]


def test_inversion_keeps_requested_states(exact_model, alphas):
    model, mean = exact_model
    states = reconstruction.ddim_invert(model, mean.expand(2, -1, -1, -1), 60, 20, alphas, keep=(0, 20, 40))
    assert sorted(states) == [0, 20, 40, 60]


def test_reverse_returns_every_state(exact_model, alphas):
    model, mean = exact_model
    states = reconstruction.ddim_reverse(model, mean, 60, 20, alphas)
    assert len(states) == 3


@pytest.mark.parametrize("t, stride", [(25, 10), (0, 10), (10, 0)])
def test_bad_grid_rejected(exact_model, alphas, t, stride):
    model, mean = exact_model
    with pytest.raises(ValueError, match="stride"):
        reconstruction.ddim_invert(model, mean, t, stride, alphas)


def test_reconstruct_matches_direct_calls(exact_model, alphas):
    model, mean = exact_model
    x0 = mean + 0.5 * torch.randn(5, 1, 8, 8, dtype=torch.float64)
    recon = reconstruction.reconstruct(model, x0, [20, 40], 10, alphas, batch_size=2, progress=False)

    x_40 = reconstruction.ddim_invert(model, x0, 40, 10, alphas)[40]
    torch.testing.assert_close(recon.x_t[40], x_40)
    torch.testing.assert_close(recon.x0_recon[40], reconstruction.ddim_reverse(model, x_40, 40, 10, alphas)[-1])
    step = reconstruction.ddim_step(model, x_40, 40, 30, alphas)
    torch.testing.assert_close(recon.x_t_roundtrip[40], reconstruction.ddim_step(model, step, 30, 40, alphas))
    # alone, t = 40 inverts in 4 passes and reverses in 4; the round trip reuses the second reverse pass
    assert recon.nfe == {20: 4, 40: 8}


@pytest.mark.parametrize("timesteps, stride", [([20, 40], 10), ([10, 30], 10), ([10], 10), ([50, 100, 200], 10)])
def test_reconstruct_runs_counted_passes(exact_model, alphas, timesteps, stride):
    model, mean = exact_model
    x0 = mean + 0.5 * torch.randn(3, 1, 8, 8, dtype=torch.float64)
    passes = []
    hook = model.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    reconstruction.reconstruct(model, x0, timesteps, stride, alphas, batch_size=2, progress=False)
    hook.remove()
    assert sum(passes) == len(x0) * reconstruction.reconstruction_passes(timesteps, stride)


def test_reconstruct_shares_every_pass(exact_model, alphas):
    # no (state, timestep) input reaches the network twice
    model, mean = exact_model
    x0 = mean + 0.5 * torch.randn(2, 1, 8, 8, dtype=torch.float64)
    inputs = []
    hook = model.register_forward_pre_hook(lambda module, args: inputs.extend((x.numpy().tobytes(), int(t)) for x, t in zip(args[0], args[1])))
    reconstruction.reconstruct(model, x0, [10, 20, 40], 10, alphas, progress=False)
    hook.remove()
    assert len(set(inputs)) == len(inputs)
    # inversion to 40: 4; reverse from 40: 4; from 20: 1 new; from 10: the round trip's pass at timestep 0
    assert len(inputs) == 2 * (4 + 4 + 1 + 1)


def test_reconstruct_empty_rejected(exact_model, alphas):
    model, _ = exact_model
    with pytest.raises(ValueError, match="no images"):
        reconstruction.reconstruct(model, torch.zeros(0, 1, 8, 8), [10], 10, alphas)
