"""The tokenizer: sizes against the paper's tables, tubelets, 3D RoPE, the KL bottleneck, checkpointing, learning."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vitok

# Paper Tables 3-5: (name, input shape, tokens, params in M, GMACs of one encode + decode forward)
PAPER = [
    ("S-B/16", (1, 3, 256, 256), 256, 129.0, 34.8),
    ("S-L/16", (1, 3, 256, 256), 256, 426.8, 113.4),
    ("S-B/16", (1, 3, 512, 512), 1024, 129.0, 160.8),
    ("S-B/4x8", (1, 3, 16, 128, 128), 1024, 129.0, 160.8),
]


@pytest.mark.parametrize("name,shape,tokens,params,gmacs", PAPER)
def test_params_and_macs_match_paper(name, shape, tokens, params, gmacs):
    with torch.device("meta"):  # nothing is allocated or computed; FlopCounterMode counts every matmul and SDPA
        model = vitok.from_name(name, channels=16).eval()
        x = torch.empty(shape)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, rel=0.01)
    with FlopCounterMode(display=False) as counter:
        x_hat, posterior = model(x)
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, rel=0.01)
    assert posterior.mean.shape == (1, tokens, 16) and x_hat.shape == shape


def test_from_name_parses_every_size():
    for enc, dec in itertools.product("SBL", repeat=2):
        with torch.device("meta"):
            model = vitok.from_name(f"{enc}-{dec}/2x8", channels=8)
        assert model.encoder.blocks[0].norm1.normalized_shape[0] == vitok.VIT_SIZES[enc]["width"]
        assert len(model.decoder.blocks) == vitok.VIT_SIZES[dec]["depth"]
        assert (model.tubelet_size, model.patch_size, model.channels) == (2, 8, 8)
    assert vitok.from_name("tiny").patch_size == 16  # the model of train_ae.py --preset tiny
    with pytest.raises(ValueError, match="unknown tokenizer name 'S-X/16'"):
        vitok.from_name("S-X/16")


def test_patchify_is_a_strided_conv_and_round_trips():
    model = vitok.from_name("T-T/2x4", channels=4)
    x = torch.randn(2, 3, 4, 8, 12)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 2 * 2 * 3, 3 * 2 * 4 * 4)
    torch.testing.assert_close(model.unpatchify(tokens, (2, 2, 3)), x, rtol=0, atol=0)
    # The linear tubelet embedding equals a Conv3d with kernel = stride = tubelet, flattened in (t,h,w) order.
    weight = model.embed.weight.view(-1, 3, 2, 4, 4)
    conv = F.conv3d(x, weight, model.embed.bias, stride=(2, 4, 4)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.embed(tokens), conv, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_offsets():
    grid, head_dim = (3, 4, 5), 64
    cos, sin = vitok.rope_table(grid, head_dim, "cpu")
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    L = math.prod(grid)
    Q = vitok.apply_rope(q.expand(1, 1, L, head_dim), cos.double(), sin.double())[0, 0]  # [L, Dh]
    K = vitok.apply_rope(k.expand(1, 1, L, head_dim), cos.double(), sin.double())[0, 0]
    scores = Q @ K.T  # [L, L]
    pos = torch.tensor(list(itertools.product(*map(range, grid))))  # [L, 3] in (t,h,w) raster order
    offsets = (pos[:, None] - pos[None, :]).reshape(-1, 3)
    by_offset = {}
    for offset, score in zip(map(tuple, offsets.tolist()), scores.flatten().tolist()):
        by_offset.setdefault(offset, []).append(score)
    for values in by_offset.values():
        assert max(values) - min(values) < 1e-5  # the table itself is fp32
    # ... and every axis is actually rotated: moving along t, h or w alone changes the score.
    zero = by_offset[(0, 0, 0)][0]
    for offset in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert abs(by_offset[offset][0] - zero) > 1e-3
    assert vitok.rope_split(64) == (8, 12, 12) and vitok.rope_split(72) == (12, 12, 12)


def test_kl_matches_torch_distributions_averaged_over_tokens_and_channels():
    zeros = torch.zeros(2, 5, 8)
    assert vitok.DiagonalGaussian(torch.cat([zeros, zeros], -1)).kl().abs().max() == 0
    mean, logvar = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    posterior = vitok.DiagonalGaussian(torch.cat([mean, logvar], -1))
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))
    expected = torch.distributions.kl_divergence(q, p).mean(dim=(1, 2))  # a mean, not a sum, per sample
    torch.testing.assert_close(posterior.kl().double(), expected, rtol=1e-5, atol=1e-6)
    clamped = vitok.DiagonalGaussian(torch.full((1, 1, 2), 100.0))
    assert clamped.logvar.max() == 20.0


def test_mode_is_deterministic_and_sample_is_not():
    model = vitok.from_name("T-T/8", channels=4).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = model.encode(x), model.encode(x)
        assert torch.equal(a.mode(), b.mode()) and not torch.equal(a.sample(), a.sample())
        noise = torch.randn_like(a.mean)
        torch.testing.assert_close(a.sample(noise), a.mean + (0.5 * a.logvar).exp() * noise)
        assert torch.equal(model(x)[0], model(x)[0])  # eval forward decodes the mean


def test_images_are_one_frame_videos_and_any_divisible_size_works():
    model = vitok.from_name("T-T/8", channels=4).eval()
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        image, _ = model(x)
        video, _ = model(x.unsqueeze(2))
        assert image.shape == x.shape and video.shape == (1, 3, 1, 16, 24)
        torch.testing.assert_close(image, video.squeeze(2))
        assert model(torch.randn(1, 3, 3, 32, 8))[0].shape == (1, 3, 3, 32, 8)
        assert model.encode(torch.randn(1, 3, 64, 64)).mean.shape == (1, 64, 4)
    with pytest.raises(ValueError, match=r"1x20x16 .* tubelet 1x8x8"):
        model.encode(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"3x16x16 .* tubelet 2x8x8"):
        vitok.from_name("T-T/2x8").encode(torch.randn(1, 3, 3, 16, 16))


def test_grad_checkpointing_gives_equal_values_and_gradients():
    torch.manual_seed(0)
    model = vitok.from_name("T-T/8", channels=4)
    x = torch.randn(2, 3, 2, 16, 16)
    results = []
    for on in (False, True):
        model.encoder.grad_ckpt = model.decoder.grad_ckpt = on
        model.zero_grad()
        x_hat, posterior = model(x, noise=torch.ones(2, 8, 4))
        (x_hat.square().mean() + posterior.kl().mean()).backward()
        results.append((x_hat.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_stays_close_to_fp32():
    model = vitok.from_name("T-T/8", channels=4).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        reference = model(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_hat = model(x)[0].float()
    assert torch.isfinite(x_hat).all()
    assert (x_hat - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 keeps about 3 significant digits


def test_block_loop_compiles_without_graph_breaks():
    model = vitok.from_name("T-T/8", channels=4)
    explained = torch._dynamo.explain(model)(torch.randn(1, 3, 24, 16))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_model_does_not_recompile_after_the_first_call():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    vitok._ROPE_CACHE.clear()  # the first call fills the RoPE table cache: no guard may depend on it
    raw = vitok.from_name("T-T/8", channels=4)
    model = torch.compile(raw, backend="eager")
    for _ in range(3):
        model(torch.randn(2, 3, 16, 16))
        raw(torch.randn(2, 3, 16, 16))  # an eager call in between (the EMA's grids, DiT's samples) fills the cache
    assert counters["stats"]["unique_graphs"] == 1


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    # A batch of smooth synthetic images: coloured discs and bars on gradient backgrounds.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = []
    for i in range(8):
        cx, cy, r = torch.rand(3) * 0.6 - 0.3
        shape = ((xx - cx) ** 2 + (yy - cy) ** 2 < (0.3 + r.abs()) ** 2) if i % 2 else ((xx - cx).abs() < 0.2)
        colour = torch.rand(3, 1, 1) * 2 - 1
        images.append(torch.where(shape, colour, 0.5 * xx * torch.rand(3, 1, 1)))
    x = torch.stack(images)  # [8,3,32,32]
    model = vitok.from_name("T-T/8", channels=16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        x_hat, posterior = model(x)
        loss = F.mse_loss(x_hat, x) + 1e-3 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_from_checkpoint_prefers_ema(tmp_path):
    model, ema = vitok.from_name("T-T/8", channels=4), vitok.from_name("T-T/8", channels=4)
    config = {"kind": "ae", "model": "T-T/8", "channels": 4, "image_size": 16, "num_frames": 1}
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "step": 3, "config": config}, tmp_path / "a.pt")
    loaded = vitok.from_checkpoint(tmp_path / "a.pt")
    assert not loaded.training
    torch.testing.assert_close(loaded.state_dict(), ema.state_dict())
    torch.save({"model": {}, "step": 0, "config": {**config, "kind": "dit"}}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="d.pt is a DiT checkpoint .*, not a tokenizer"):
        vitok.from_checkpoint(tmp_path / "d.pt")
    assert vitok.from_checkpoint(torch.load(tmp_path / "a.pt")).state_dict().keys() == ema.state_dict().keys()


def test_rope_table_is_built_on_the_device_without_a_host_copy(monkeypatch):
    # Under torch.compile the table is rebuilt inside the graph every forward, so a tensor made on
    # the CPU there is a blocking host-to-device copy per forward on a GPU. "meta" stands in for it.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.seen.add((str(func), t.device.type))
            return out

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # bypass the cache
    with Devices() as mode:
        cos, sin = vitok.rope_table((2, 4, 4), 64, torch.device("meta"))
    assert {device for _, device in mode.seen} == {"meta"}, sorted(mode.seen)
    assert cos.shape == sin.shape == (32, 32) and cos.dtype == sin.dtype == torch.float32
