"""dit.py: sizes, adaLN-Zero, guidance, respacing, DDIM and the L_vb terms against float64 closed forms written here
from the papers, q(x_t | x0) and q(x_{t-1} | x_t, x0), the null class, and a tiny DiT that learns its labels."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

import dit

# The same tables, from DDPM's definitions, in float64 numpy (not dit.schedule).
BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster and does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(num_classes=3, channels=4, grid=(1, 2, 2)):
    torch.manual_seed(0)
    return dit.DiT_models["DiT-tiny"](channels=channels, grid=grid, num_classes=num_classes)


def randomise(model):
    """Give the zero-initialised layers weights, so that outputs depend on the input, the time and the label."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


class Spy(torch.nn.Module):
    """Records the batch size and timesteps of every call to the model it wraps."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.calls = model, model.num_classes, []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.tolist()))
        return self.model(x, t, y)


@pytest.mark.parametrize("name,params", [("DiT-L", 458e6), ("DiT-XL", 675e6)])
def test_parameter_counts(name, params):
    with torch.device("meta"):  # no memory is allocated
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


def test_respaced_timesteps_and_the_model_sees_original_indices():
    assert dit.respaced_timesteps(250) == list(range(0, 1000, 4))
    assert dit.respaced_timesteps(50) == list(range(0, 1000, 20))
    assert dit.respaced_timesteps(1) == [0]
    spy = Spy(tiny())
    dit.sample(spy, torch.randn(2, 4, 4), torch.tensor([0, 1]), steps=4, cfg_scale=1.0)
    assert spy.calls == [(2, [750] * 2), (2, [500] * 2), (2, [250] * 2), (2, [0] * 2)]


def test_guidance_scale_one_is_conditional_and_s_extrapolates_epsilon_only():
    spy = Spy(randomise(tiny()))
    x, t, y = torch.randn(3, 4, 4), torch.tensor([10, 500, 990]), torch.tensor([0, 1, 2])
    cond, uncond = spy(x, t, y), spy(x, t, torch.full_like(y, 3))  # two separate calls
    spy.calls.clear()
    torch.testing.assert_close(dit.forward_with_cfg(spy, x, t, y, 1.0), cond)
    out = dit.forward_with_cfg(spy, x, t, y, 2.5)
    assert spy.calls == [(3, [10, 500, 990]), (6, [10, 500, 990] * 2)]  # scale 1: no doubling; else one batch
    torch.testing.assert_close(out[..., :4], uncond[..., :4] + 2.5 * (cond[..., :4] - uncond[..., :4]))
    torch.testing.assert_close(out[..., 4:], cond[..., 4:])  # sigma from the conditional half


@pytest.mark.parametrize("eta,cfg_scale", [(0.0, 1.0), (0.7, 2.0)])
def test_ddim_steps_match_float64_closed_form(eta, cfg_scale):
    """Two DDIM steps, t = 500 -> 0 -> x0, against Song et al. Eq. 12 with sigma from Eq. 16, in float64."""
    model = randomise(tiny())
    z, y = torch.randn(2, 4, 4), torch.tensor([1, 2])
    torch.manual_seed(1)
    out = dit.sample(model, z, y, steps=2, cfg_scale=cfg_scale, eta=eta)
    torch.manual_seed(1)
    x = z.double()
    for t, t_prev in [(500, 0), (0, None)]:
        tt = torch.full((2,), t)
        eps_c = model(x.float(), tt, y)[..., :4].double()
        eps_u = model(x.float(), tt, torch.full_like(y, 3))[..., :4].double()
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        a, a_prev = ABAR[t], (ABAR[t_prev] if t_prev is not None else 1.0)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(2, 4, 4).double()
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)


def _diffusers_ddim_step(eps, t, t_prev, x, eta, variance_noise):
    """diffusers' DDIMScheduler.step (set_alpha_to_one=True, no clipping, epsilon prediction), written from its source
    in float64 numpy; the variance noise comes in as an argument, as diffusers allows."""
    alpha_prod_t = ABAR[t]
    alpha_prod_t_prev = ABAR[t_prev] if t_prev >= 0 else 1.0  # final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (x - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * eps
    prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    return prev_sample + std_dev_t * variance_noise if eta > 0 else prev_sample


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_chain_with_eta_matches_diffusers_formula(eta):
    """Three DDIM steps (t = 666, 333, 0) with forced variance noise against diffusers' step in float64: by the noise
    argument; the default is eta = 1 (the official code's) with torch.randn_like's noise."""
    model = randomise(tiny())
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(2, 4, 4, generator=g), torch.tensor([1, 2])
    draws = torch.randn(3, 2, 4, 4, generator=g)
    x = z.double().numpy()
    for k, (t, t_prev) in enumerate([(666, 333), (333, 0), (0, -1)]):
        tt, xf = torch.full((2,), t), torch.from_numpy(x).float()
        with torch.no_grad():
            eps_c = model(xf, tt, y)[..., :4].double().numpy()
            eps_u = model(xf, tt, torch.full_like(y, 3))[..., :4].double().numpy()
        x = _diffusers_ddim_step(eps_u + 1.5 * (eps_c - eps_u), t, t_prev, x, eta, draws[k].double().numpy())
    calls = []

    def forced(v):
        calls.append(v.shape)
        return draws[len(calls) - 1]

    out = dit.sample(model, z, y, steps=3, eta=eta, noise=forced)
    np.testing.assert_allclose(out.double().numpy(), x, rtol=1e-4, atol=1e-4)
    assert calls == [(2, 4, 4)] * 2  # the last step (to abar = 1) adds no noise
    if eta == 1.0:  # the default draws the same noise from the global generator
        torch.manual_seed(5)
        default = dit.sample(model, z, y, steps=3)
        torch.manual_seed(5)
        draws[:2] = torch.randn(2, 2, 4, 4)
        calls.clear()
        torch.testing.assert_close(default, dit.sample(model, z, y, steps=3, noise=forced), rtol=0, atol=0)


def test_ddim_with_eta_zero_is_deterministic():
    model = randomise(tiny())
    z, y = torch.randn(2, 4, 4), torch.tensor([1, 2])
    torch.manual_seed(0)
    a = dit.sample(model, z, y, steps=5, eta=0.0)
    b = dit.sample(model, z, y, steps=5, eta=0.0)  # the global RNG has moved on
    assert torch.equal(a, b)
    assert not torch.equal(a, dit.sample(model, z, y, steps=5))  # the default: eta = 1


def test_normal_kl_and_discretized_likelihood_match_float64():
    g = torch.Generator().manual_seed(0)
    m1, m2, v1, v2 = torch.randn(4, 100, generator=g)
    kl = dit.normal_kl(m1, v1, m2, v2).double().numpy()
    s1, s2, d = np.exp(0.5 * v1.double().numpy()), np.exp(0.5 * v2.double().numpy()), (m1 - m2).double().numpy()
    np.testing.assert_allclose(kl, np.log(s2 / s1) + (s1 ** 2 + d ** 2) / (2 * s2 ** 2) - 0.5, rtol=1e-4, atol=1e-5)
    # 8-bit bins of [-1,1] (the edge bins open-ended, and holding the latents that fall outside [-1,1]), with x up to
    # 6 standard deviations from the mean, where a difference of CDFs near 1 loses the digits in fp32.
    mean, sd = torch.rand(200, generator=g) * 1.2 - 0.6, torch.exp(torch.rand(200, generator=g) * 3 - 6)
    x = mean + sd * (torch.rand(200, generator=g) * 12 - 6)
    x[:8] = torch.tensor([-1.0, 1.0, -1.5, 1.5, -0.99, 0.99, -1.0, 1.0])
    mean[:8] = torch.tensor([-0.99, 0.99, -1.49, 1.51, -0.99, 0.98, -0.997, 0.997])
    ll = dit.discretized_gaussian_log_likelihood(x, mean, sd.log()).double().numpy()
    xs, ms, sds = x.double().numpy(), mean.double().numpy(), sd.double().numpy()
    lo = np.where(xs < -0.999, -np.inf, xs - 1 / 255)
    hi = np.where(xs > 0.999, np.inf, xs + 1 / 255)
    prob = norm.cdf((hi - ms) / sds) - norm.cdf((lo - ms) / sds)
    assert prob.min() > 1e-10
    np.testing.assert_allclose(ll, np.log(prob), rtol=1e-4, atol=1e-5)


def test_q_sample_marginals():
    x0 = torch.full((40000, 1, 1), 0.7)
    for t in (0, 300, 999):
        xt = dit.q_sample(x0, torch.full((40000,), t), torch.randn_like(x0))
        assert xt.mean().item() == pytest.approx(math.sqrt(ABAR[t]) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ABAR[t], rel=0.05, abs=1e-6)


def test_q_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x0): the product of two Gaussians in x_{t-1}."""
    t = torch.tensor([1, 7, 500, 999])
    x0, xt = torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    mean, logvar = dit.q_posterior(x0, xt, t)
    tn = t.numpy()
    beta, abar_prev = BETAS[tn][:, None, None], ABAR[tn - 1][:, None, None]
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    expected = (np.sqrt(1 - beta) / beta * xt.numpy() + np.sqrt(abar_prev) / (1 - abar_prev) * x0.numpy()) / precision
    np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(logvar.numpy(), np.log(1 / precision), rtol=1e-10)


def test_training_losses_match_an_independent_float64_l_hybrid():
    """L_simple + L_vb for a fixed model output, t = 0 (decoder NLL) and t > 0 (KL), against IDDPM's equations."""
    g = torch.Generator().manual_seed(0)
    B, L, c = 4, 3, 2
    x0, noise = 0.5 * torch.randn(B, L, c, generator=g), torch.randn(B, L, c, generator=g)
    out = torch.cat([torch.randn(B, L, c, generator=g), torch.rand(B, L, c, generator=g) * 2 - 1], dim=-1)
    t = torch.tensor([0, 1, 250, 999])
    terms = dit.training_losses(lambda xt, tt, y: out, x0, torch.zeros(B, dtype=torch.long), t, noise)

    X0, N = x0.double().numpy(), noise.double().numpy()
    eps, v = out[..., :c].double().numpy(), out[..., c:].double().numpy()
    mse, vb = ((N - eps) ** 2).mean(axis=(1, 2)), []

    def tilde(s):  # beta~_s (IDDPM Eq. 12), s >= 1
        return BETAS[s] * (1 - ABAR[s - 1]) / (1 - ABAR[s])

    for i, ti in enumerate(t.tolist()):
        a, a_prev, beta = ABAR[ti], (ABAR[ti - 1] if ti else 1.0), BETAS[ti]
        xt = math.sqrt(a) * X0[i] + math.sqrt(1 - a) * N[i]

        def post_mean(x0_):  # IDDPM Eq. 11
            return (beta * math.sqrt(a_prev) * x0_ + (1 - a_prev) * math.sqrt(1 - beta) * xt) / (1 - a)

        x0_hat = (xt - math.sqrt(1 - a) * eps[i]) / math.sqrt(a)
        frac = (v[i] + 1) / 2
        var = np.exp(frac * np.log(beta) + (1 - frac) * np.log(tilde(max(ti, 1))))  # beta~_0 = 0: clipped to beta~_1
        if ti == 0:
            lo = np.where(X0[i] < -0.999, -np.inf, X0[i] - 1 / 255)
            hi = np.where(X0[i] > 0.999, np.inf, X0[i] + 1 / 255)
            sd = np.sqrt(var)
            bits = -np.log(norm.cdf((hi - post_mean(x0_hat)) / sd) - norm.cdf((lo - post_mean(x0_hat)) / sd))
        else:
            m1, v1, m2 = post_mean(X0[i]), tilde(ti), post_mean(x0_hat)
            bits = 0.5 * (np.log(var / v1) + (v1 + (m1 - m2) ** 2) / var - 1)
        vb.append(bits.mean() / math.log(2))
    assert terms["mse"].item() == pytest.approx(mse.mean(), rel=1e-5)
    assert terms["vb"].item() == pytest.approx(np.mean(vb), rel=1e-4)
    assert terms["loss"].item() == pytest.approx(mse.mean() + np.mean(vb), rel=1e-4)


def test_vb_trains_only_the_variance_channels():
    model = randomise(tiny())
    x0, y, t = torch.randn(4, 4, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 10, 400, 999])
    terms = dit.training_losses(model, x0, y, t, torch.randn_like(x0))
    grad = torch.autograd.grad(terms["vb"], model.out.weight)[0]  # [2c, D]
    assert grad[:4].abs().max() == 0 and grad[4:].abs().max() > 0  # the mean (epsilon) is stopped in L_vb
    terms = dit.training_losses(model, x0, y)  # t and noise drawn inside
    assert set(terms) == {"loss", "mse", "vb"} and all(v.dim() == 0 and v.isfinite() for v in terms.values())


def test_null_class_and_class_dropout():
    model = randomise(tiny(num_classes=3))
    x, t = torch.randn(2, 4, 4), torch.tensor([5, 5])
    assert model(x, t, torch.tensor([3, 3])).isfinite().all()  # label K = 3 is the null class
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([4, 4]))
    y = torch.randint(0, 3, (100_000,))
    y[:10] = -1  # unlabelled samples always take the null class
    dropped = dit.drop_labels(y, 3, torch.rand(len(y), generator=torch.Generator().manual_seed(0)), 0.1)
    changed = dropped != y
    assert (dropped[:10] == 3).all() and changed[10:].float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert (dropped[changed] == 3).all() and torch.equal(dropped[~changed], y[~changed])


def test_grad_ckpt_gives_the_same_gradients_and_no_graph_breaks():
    model = randomise(tiny())
    x, t, y = torch.randn(2, 4, 4), torch.tensor([3, 900]), torch.tensor([0, 3])
    grads = []
    for on in (False, True):
        model.grad_ckpt = on
        model.zero_grad()
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    explained = torch._dynamo.explain(model)(x, t, y)  # traced with checkpointing on: one graph
    assert explained.graph_break_count == 0, explained.break_reasons


def test_labels_are_respected_after_a_little_training():
    """Class 0 -> latents near +1, class 1 -> near -1: samples of each label land on their own side."""
    torch.manual_seed(0)
    model = tiny(num_classes=2, channels=2, grid=(1, 2, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(100):
        y = torch.randint(0, 2, (32,))
        x0 = torch.where(y[:, None, None] == 0, 1.0, -1.0) + 0.1 * torch.randn(32, 4, 2)
        loss = dit.training_losses(model, x0, dit.drop_labels(y, 2, torch.rand(32)))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.randn(32, 4, 2)
    zero = dit.sample(model, z, torch.zeros(32, dtype=torch.long), steps=20)
    one = dit.sample(model, z, torch.ones(32, dtype=torch.long), steps=20)
    assert zero.mean() > 0.5 and one.mean() < -0.5, (zero.mean(), one.mean())
