"""dit.py: sizes, adaLN-Zero, guidance, DDIM against float64 closed forms, the VB terms, and label conditioning."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import dit


def tiny(num_classes=3, channels=4, grid=(1, 2, 2)):
    torch.manual_seed(0)
    return dit.DiT_models["DiT-tiny"](channels=channels, grid=grid, num_classes=num_classes)


def randomise(model):
    """Give the zero-initialised layers weights, so outputs depend on inputs, time and label."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("name,params", [("DiT-L", 458e6), ("DiT-XL", 675e6)])
def test_parameter_counts(name, params):
    with torch.device("meta"):
        model = dit.DiT_models[name](channels=16, grid=(1, 16, 16), num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.02)


def test_adaln_zero_starts_at_zero_output_and_identity_blocks():
    model = tiny()
    x, t, y = torch.randn(2, 4, 4), torch.tensor([3, 900]), torch.tensor([0, 3])
    assert torch.equal(model(x, t, y), torch.zeros(2, 4, 8))
    h, c = torch.randn(2, 4, 128), torch.randn(2, 128)
    cos, sin = dit.rope_table((1, 2, 2), 64, "cpu")
    for block in model.blocks:
        assert torch.equal(block(h, c, cos, sin), h)


def test_respaced_timesteps():
    assert dit.respaced_timesteps(250) == list(range(0, 1000, 4))
    assert dit.respaced_timesteps(50) == list(range(0, 1000, 20))


def test_guidance_scale_one_is_conditional_and_s_extrapolates():
    model = randomise(tiny())
    x, t, y = torch.randn(3, 4, 4), torch.tensor([10, 500, 990]), torch.tensor([0, 1, 2])
    cond = model(x, t, y)[..., :4]
    uncond = model(x, t, torch.full_like(y, 3))[..., :4]
    torch.testing.assert_close(dit.guided_eps(model, x, t, y, 1.0), cond)
    torch.testing.assert_close(dit.guided_eps(model, x, t, y, 2.5), uncond + 2.5 * (cond - uncond), rtol=1e-5,
                               atol=1e-6)


def test_ddim_is_deterministic_and_one_step_matches_float64_closed_form():
    model = randomise(tiny())
    z, y = torch.randn(2, 4, 4), torch.tensor([1, 2])
    a, b = dit.sample(model, z, y, steps=5, cfg_scale=2.0), dit.sample(model, z, y, steps=5, cfg_scale=2.0)
    assert torch.equal(a, b)
    # One step (steps=1: t = 0 -> x_prev is the predicted x0); two steps: t = 500 then 0.
    out = dit.sample(model, z, y, steps=2, cfg_scale=1.0)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    x = z.double()
    for t_now, t_prev in [(500, 0), (0, None)]:
        eps = model(x.float(), torch.full((2,), t_now), y)[..., :4].double()
        x0 = (x - math.sqrt(1 - abar[t_now]) * eps) / math.sqrt(abar[t_now])
        a_prev = abar[t_prev] if t_prev is not None else 1.0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps  # DDIM Eq. 12 with sigma = 0
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-5)


def test_vb_terms_match_float64_formulas():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    v1, v2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    kl = dit.normal_kl(m1, v1, m2, v2)
    s1, s2 = np.exp(0.5 * v1.double().numpy()), np.exp(0.5 * v2.double().numpy())
    expected = np.log(s2 / s1) + (s1 ** 2 + (m1.double().numpy() - m2.double().numpy()) ** 2) / (2 * s2 ** 2) - 0.5
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-4, atol=1e-5)
    x = torch.cat([torch.rand(50, generator=g) * 1.8 - 0.9, torch.tensor([-1.0, 1.0])]).double()
    mean, log_scale = torch.randn(52, generator=g).double() * 0.1, torch.full((52,), -3.0).double()
    ll = dit.discretized_gaussian_log_likelihood(x, mean, log_scale)
    xs, ms, sd = x.double().numpy(), mean.double().numpy(), np.exp(-3.0)
    upper, lower = norm.cdf((xs - ms + 1 / 255) / sd), norm.cdf((xs - ms - 1 / 255) / sd)
    prob = np.where(xs < -0.999, upper, np.where(xs > 0.999, 1 - lower, upper - lower))
    np.testing.assert_allclose(ll.numpy(), np.log(np.maximum(prob, 1e-12)), rtol=1e-3, atol=1e-4)


def test_q_sample_marginals():
    x0 = torch.full((20000, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = dit.q_sample(x0, t, torch.randn_like(x0))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[300]
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


def test_vb_trains_only_the_variance_channels():
    model = randomise(tiny())
    x0, y, t = torch.randn(4, 4, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 10, 400, 999])
    terms = dit.training_losses(model, x0, y, t, torch.randn_like(x0))
    grad = torch.autograd.grad(terms["vb"], model.out.weight)[0]  # [2c, D]
    assert grad[:4].abs().max() == 0 and grad[4:].abs().max() > 0  # the mean (epsilon) is stopped in L_vb
    assert terms["loss"].item() == pytest.approx((terms["mse"] + terms["vb"]).item(), rel=1e-6)


def test_labels_are_respected_after_a_little_training():
    torch.manual_seed(0)
    model = tiny(num_classes=2, channels=2, grid=(1, 2, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(100):
        y = torch.randint(0, 2, (32,))
        x0 = torch.where(y[:, None, None] == 0, 1.0, -1.0) + 0.1 * torch.randn(32, 4, 2)
        y = torch.where(torch.rand(32) < 0.1, torch.full_like(y, 2), y)  # class dropout to the null class
        loss = dit.training_losses(model, x0, y, torch.randint(0, 1000, (32,)), torch.randn_like(x0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.randn(32, 4, 2)
    zero = dit.sample(model, z, torch.zeros(32, dtype=torch.long), steps=20, cfg_scale=1.0)
    one = dit.sample(model, z, torch.ones(32, dtype=torch.long), steps=20, cfg_scale=1.0)
    assert zero.mean() > 0.5 and one.mean() < -0.5, (zero.mean(), one.mean())
