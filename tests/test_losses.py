"""losses.py against independent formulas: MSE, LPIPS plumbing, the discriminator's shape and blocks, hinge, ramp."""
import math

import pytest
import torch

import losses
from runtime import UserError
import vitok


def test_mse_matches_float64_and_frames_fold_clip_major():
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert losses.mse_loss(x, y).item() == pytest.approx(((x.double() - y.double()) ** 2).mean().item(), rel=1e-6)
    video = torch.randn(2, 3, 4, 8, 8)
    folded = vitok.frames_to_batch(video)
    assert folded.shape == (8, 3, 8, 8) and torch.equal(folded[5], video[1, :, 1])


def test_lpips_random_backbone_is_zero_on_identical_and_averages_frames():
    lpips = losses.LPIPS(pretrained=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert lpips(x, x.flip(-1)).item() > 0
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.train().training
    clip, other = torch.rand(1, 3, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 3, 32, 32) * 2 - 1
    per_frame = torch.stack([lpips(other[:, :, t], clip[:, :, t]) for t in range(3)])
    assert lpips(other, clip).item() == pytest.approx(per_frame.mean().item(), rel=1e-5)
    assert lpips(other, clip, reduce=False).shape == (1,)


def test_lpips_equals_the_lpips_package_and_its_bf16_trunk_stays_close():
    torch.manual_seed(0)
    lpips = losses.LPIPS(pretrained=False)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    reference = lpips.net(y, x).flatten()  # the package's own forward, image pair by pair
    torch.testing.assert_close(lpips(y, x, reduce=False), reference, rtol=1e-5, atol=1e-7)
    lpips.precision = "bf16"  # the VGG trunk under bf16 autocast, as train_ae.py runs it on GPU
    assert (lpips(y, x, reduce=False) - reference).abs().max() < 0.02 * reference.abs().max()


def test_lpips_without_vgg_weights_names_file_folder_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        losses.LPIPS(pretrained=True)
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message and "--lpips-weight 0" in message


@pytest.mark.parametrize("size,blocks", [(256, 6), (128, 5)])
def test_discriminator_shapes_and_channels(size, blocks):
    disc = losses.Discriminator(size)
    assert len(disc.blocks) == blocks
    assert [b.conv1.out_channels for b in disc.blocks] == [min(16384 // size * 2 ** (i + 1), 512) for i in range(blocks)]
    x = torch.randn(2, 3, size, size, requires_grad=True)
    feats = disc.blocks(disc.from_rgb(x))
    assert feats.shape[-2:] == (4, 4)
    logits = disc(x)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0


def test_discriminator_folds_video_frames_and_refuses_other_sizes():
    disc = losses.Discriminator(32)
    assert disc(torch.randn(2, 3, 3, 32, 32)).shape == (6,)
    with pytest.raises(ValueError, match="built for 32"):
        disc(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="power-of-two"):
        losses.Discriminator(48)


def test_blur_is_normalised_binomial_and_both_block_paths_stay_aligned():
    blur = losses.Blur(1, pad=1)
    expected = torch.tensor([1.0, 3, 3, 1])
    torch.testing.assert_close(blur.kernel[0, 0], torch.outer(expected, expected) / 64)
    # An impulse seen through the main path alone and through the skip path alone lands on the same output pixel:
    # the blur paddings keep the two stride-2 paths on one grid.
    torch.manual_seed(0)
    block = losses.ResBlock(1, 1).double()
    for conv in (block.conv0, block.conv1):
        torch.nn.init.zeros_(conv.bias)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[..., conv.weight.shape[-1] // 2, conv.weight.shape[-1] // 2] = 1.0  # identity taps
    with torch.no_grad():
        block.skip.weight.fill_(1.0)
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[..., 8, 8] = 1.0
    both = block(x)
    with torch.no_grad():
        block.skip.weight.zero_()
    main = block(x)
    skip = both - main

    def centroid(m):
        m = m[0, 0].abs()
        ii, jj = torch.meshgrid(torch.arange(8.0, dtype=m.dtype), torch.arange(8.0, dtype=m.dtype), indexing="ij")
        return torch.stack([(m * ii).sum() / m.sum(), (m * jj).sum() / m.sum()])

    assert main.shape == skip.shape == (1, 1, 8, 8)
    torch.testing.assert_close(centroid(main), centroid(skip), atol=1e-6, rtol=0)


def test_discriminator_width_follows_the_resolution_and_init_is_xavier():
    assert [losses.disc_channels(s) for s in (512, 256, 128, 64, 16)] == [32, 64, 128, 256, 512]
    disc = losses.Discriminator(128)
    assert disc.from_rgb.out_channels == 128 and disc.from_rgb.bias.abs().max() == 0
    fan_in, fan_out = 3 * 9, 128 * 9
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert disc.from_rgb.weight.abs().max() <= bound and disc.from_rgb.weight.abs().max() > 0.9 * bound


def test_hinge_generator_loss_and_ramp_on_known_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2] -> 1
    assert losses.d_hinge_loss(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    assert losses.g_adv_loss(fake).item() == pytest.approx(1 / 3)  # -mean([-2, 0, 1])
    assert [losses.adv_weight(s, 100) for s in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert losses.adv_weight(5, 0) == 1.0
