"""The metrics' pretrained networks as the standard tools define them, and where their files are:
the FID Inception for FID and IS (TensorFlow's 2015-12-05 graph in torchvision's Inception3
layout, as pytorch-fid ports it), torchvision's ImageNet Inception (the official ViTok code's)
and StyleGAN-V's I3D for FVD. Apart from evaluate.py, as pytorch-fid's inception.py.
"""
import os

import torch
import torch.nn.functional as F
from torchvision.models import inception as tv_inception

import runtime
from vitok import frames_to_batch

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_FILE}"
TV_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
TV_INCEPTION_URL = f"https://download.pytorch.org/models/{TV_INCEPTION_FILE}"
I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"


class FIDPoolBranch:
    """The TF graph's pool branches, mixed into torchvision's blocks: Mixed_5*, 6* and 7b average
    without counting the zero padding (torchvision's count it); Mixed_7c max-pools (a quirk)."""
    max_pool = False

    def _forward(self, x):
        out = super()._forward(x)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else \
            F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        out[-1] = self.branch_pool(pooled)
        return out


class FIDInceptionA(FIDPoolBranch, tv_inception.InceptionA):
    pass


class FIDInceptionC(FIDPoolBranch, tv_inception.InceptionC):
    pass


class FIDInceptionE(FIDPoolBranch, tv_inception.InceptionE):
    pass


def build_fid_inception():
    """Inception3 with 1008 classes, no aux head and the FID blocks; FID_FILE loads strictly."""
    blocks = [tv_inception.BasicConv2d, FIDInceptionA, tv_inception.InceptionB, FIDInceptionC,
              tv_inception.InceptionD, FIDInceptionE, tv_inception.InceptionAux]
    net = tv_inception.Inception3(num_classes=1008, aux_logits=False, transform_input=False,
                                  inception_blocks=blocks, init_weights=False)
    net.Mixed_7c.max_pool = True
    return net.eval().requires_grad_(False)


def find_weights(path, file, url):
    """path, else the torch hub cache, else a download into it: (path, None), or (None, why)."""
    if path:
        return (path, None) if os.path.exists(path) else (None, f"{path} does not exist")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file)
    if not os.path.exists(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            runtime.download(url, cached)
        except Exception as err:  # offline: say what goes where, and go on
            if os.path.exists(cached):
                os.remove(cached)
            return None, (f"{file} is not in {os.path.dirname(cached)} and could not be "
                          f"downloaded ({err}); download {url} into that folder")
    return cached, None


INCEPTION_LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                    "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                    "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                    "Mixed_7c", "avgpool"]


class InceptionFeatures(torch.nn.Module):
    """x [N,3,H,W] in [-1,1] -> (2048-d pool features, IS logits). network "fid": that of every
    published FID; "torchvision": the official ViTok code's ImageNet one, as it calls it."""

    NAMES = {"fid": "tf-inception-2015-12-05 (pytorch-fid)",
             "torchvision": "torchvision-inception-v3 (the official code's evaluator)"}

    def __init__(self, network, weights):
        super().__init__()
        self.network = network
        if network == "fid":
            self.net = build_fid_inception()
        else:
            self.net = tv_inception.Inception3(num_classes=1000, aux_logits=True,
                                               transform_input=False, init_weights=False)
            self.net.eval().requires_grad_(False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)

    @torch.no_grad()
    def forward(self, x):
        tv = self.network == "torchvision"
        # pytorch-fid's resize; the official code's (metrics.py): nn.Upsample(align_corners=True),
        # its [-1,1] input straight into the blocks (no transform_input, no ImageNet mean/std)
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=tv)
        for name in INCEPTION_LAYERS:
            x = getattr(self.net, name)(x)
        pool = x.flatten(1)  # [N,2048]
        # IS logits: pool features times the fc weight, no bias, as the improved-GAN code
        # (Salimans et al. 2016), ADM's evaluator and torch-fidelity; the official code: fc, bias
        return pool, self.net.fc(pool) if tv else pool @ self.net.fc.weight.T


def i3d_features(i3d, clips):
    """StyleGAN-V's I3D (TorchScript): clips [B,3,T,H,W] in [-1,1], resized to 224^2 -> 400-d."""
    B, C, T, H, W = clips.shape
    frames = F.interpolate(frames_to_batch(clips).float(), size=(224, 224), mode="bilinear",
                           align_corners=False)  # [B*T,3,224,224]
    clips = frames.view(B, T, C, 224, 224).transpose(1, 2)
    return i3d(clips, rescale=False, resize=False, return_features=True)


def load_networks(inception, inception_weights, i3d_weights, video, rank, device):
    """The available feature networks, on the device, and (for the report) their files."""
    nets, used = {}, {}
    file, url = (FID_FILE, FID_URL) if inception == "fid" else (TV_INCEPTION_FILE,
                                                                 TV_INCEPTION_URL)
    path, why = find_weights(inception_weights, file, url)
    if path:
        nets["inception"], used["inception"] = InceptionFeatures(inception, path).to(device), path
    elif rank == 0:
        print(f"FID/IS skipped: {why}, or pass --inception-weights PATH", flush=True)
    if video:
        path, why = find_weights(i3d_weights, I3D_FILE, I3D_URL)
        if path:
            nets["i3d"], used["i3d"] = torch.jit.load(path, map_location=device).eval(), path
        elif rank == 0:
            print(f"FVD skipped: {why}, or pass --i3d-weights PATH", flush=True)
    return nets, used
