"""
The frozen perceptual networks of BiFlow's stage-2 loss, like Inception in fid.py: they are not part
of either flow. LPIPS-VGG and ConvNeXt-V2 distances between the output image and the clean image, on
paired random-resized crops. Their weights come from local files, as their authors publish them; a
missing file says where to get it.

    python train.py --stage reverse --forward_ckpt out/forward.pt \
        --lpips vgg.pth --vgg vgg16-397923af.pth --convnext convnextv2_base_22k_224_ema.pt
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UsageError, read_torch_file

PERCEPTUAL_HINTS = {  # where the weights come from, for the error messages
    'vgg': "download torchvision's VGG16 weights: "
           "https://download.pytorch.org/models/vgg16-397923af.pth",
    'lpips': "get LPIPS' v0.1 linear weights lpips/weights/v0.1/vgg.pth "
             "(in the `lpips` PyPI package, or "
             "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth)",
    'convnext': "download ConvNeXt-V2-Base 22k 224: "
                "https://dl.fbaipublicfiles.com/convnext/convnextv2/im22k/convnextv2_base_22k_224_ema.pt",
}


def load_weights(path, flag):
    """A local weight file for --lpips/--vgg/--convnext (None passes through);
    a missing one says what to get."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--{flag} {path}: file not found; {PERCEPTUAL_HINTS[flag]}')
    return read_torch_file(path, f'--{flag}')  # on CPU: lpips' file holds CUDA tensors


def _unit(f, eps=1e-10):
    """Unit-normalise over channels;
    vector_norm's backward is 0 (not NaN) where a feature vector is all zero."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk;
    keys match torchvision `features.*` and lpips `lin{k}.model.1.weight`."""
    # VGG16 up to relu5_3
    CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]
    # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's features
    TAPS = (3, 8, 15, 22, 29)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)  # 30 modules, indices 0..29 as in torchvision
        # 1x1 conv to one channel; ModuleDict+Identity reproduce lpips'
        for k, ch in enumerate(self.CHANNELS):
            # key lin{k}.model.1.weight (index 0 was a train-time Dropout)
            lin = nn.Sequential(nn.Identity(), nn.Conv2d(ch, 1, 1, bias=False))
            self.add_module(f'lin{k}', nn.ModuleDict({'model': lin}))
        # ScalingLayer: maps [-1,1] inputs to (roughly) ImageNet-normalised ones
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)

    def forward(self, a, b):
        """a, b: (B,3,H,W) in [-1,1] -> (B,) distances."""
        x = (torch.cat([a, b]) - self.shift) / self.scale  # (2B,3,H,W), one trunk pass for both
        d = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                fa, fb = _unit(x).chunk(2)
                lin = getattr(self, f'lin{self.TAPS.index(i)}')['model']
                # (B,1): weighted channel sum, spatial mean
                d = d + lin((fa - fb) ** 2).mean((2, 3))
        return d[:, 0]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B,C,H,W) tensor (the official 'channels_first' LayerNorm)."""
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalisation on channels-last (B,H,W,C) input,
    official param names/shapes."""
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (B,1,1,C) spatial L2/channel
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-V2 block: dwconv7 -> LN -> MLP(4x) with GELU and GRN -> residual."""
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):  # (B,C,H,W)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (B,H,W,C)
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 trunk with the official key names;
    the classifier head is left out (22k classes, unused)."""
    def __init__(self, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4),
                                                              LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(3):
            down = nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), down))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
                                     for depth, dim in zip(depths, dims)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        # the official recipe feeds [0,1] images normalised with ImageNet mean/std
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)

    def features(self, x):
        """x: (B,3,H,W) in [-1,1] -> (B, dims[-1]) pooled, LayerNormed pre-classifier features."""
        x = ((x + 1) / 2 - self.mean) / self.std
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))  # (B,C,H/s,W/s)
        return self.norm(x.mean((2, 3)))


def _uniform(lo, hi, g):
    return float(torch.empty(()).uniform_(lo, hi, generator=g))


def _crop_box(h, w, scale, ratio, g):
    """Sample (top, left, height, width) like torchvision's RandomResizedCrop,
    with a central fallback."""
    for _ in range(10):
        area = h * w * _uniform(*scale, g)
        r = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), g))
        cw, ch = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            return top, left, ch, cw
    r = w / h  # fallback: the whole image, with aspect ratio clamped into range
    cw, ch = ((w, round(w / ratio[0])) if r < ratio[0]
              else (round(h * ratio[1]), h) if r > ratio[1]
              else (w, h))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def paired_random_resized_crop(a, b, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               generator=None):
    """Crop a and b (B,C,H,W) with the same random box per sample,
    bicubic+antialias resize -> (B,C,size,size) each."""
    assert a.shape == b.shape, (a.shape, b.shape)
    H, W = a.shape[-2:]
    outs = []
    for i in range(a.shape[0]):
        top, left, ch, cw = _crop_box(H, W, scale, ratio, generator)
        pair = torch.stack([a[i], b[i]])[:, :, top:top + ch, left:left + cw]  # (2,C,ch,cw)
        outs.append(F.interpolate(pair, size=(size, size), mode='bicubic', align_corners=False,
                                  antialias=True))
    out = torch.stack(outs, dim=1)  # (2,B,C,size,size)
    return out[0], out[1]


def _check(sd, want, name):
    """Raise ValueError naming --name unless sd has every tensor of want, with the same shape."""
    sd = sd if isinstance(sd, dict) else {}
    bad = [key for key, tensor in want.items()
           if not (isinstance(sd.get(key), torch.Tensor) and sd[key].shape == tensor.shape)]
    if bad:
        raise UsageError(f"--{name}: {len(bad)} of {len(want)} expected tensors missing or "
                         f"mis-shaped (e.g. {bad[0]!r}); wrong file? {PERCEPTUAL_HINTS[name]}")


class PerceptualLoss(nn.Module):
    """Frozen LPIPS-VGG and ConvNeXt-V2 distances
    between paired random-resized crops of pred and target."""
    def __init__(self, lpips=None, vgg=None, convnext=None, crop: int | None = 224, *,
                 depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)):
        """lpips, vgg, convnext: state dicts as their authors publish them
        (train.py reads the files)."""
        super().__init__()
        self.crop = crop  # None/0: no crop, compare whole images
        # latent models: a frozen decoder to pixels (sample.LatentDecoder), set by train.py
        self.decode = None
        self.lpips = self.convnext = None
        if (lpips is None) != (vgg is None):
            raise UsageError(f"LPIPS needs both --lpips and --vgg; {PERCEPTUAL_HINTS['lpips']}; "
                             f"{PERCEPTUAL_HINTS['vgg']}")
        if lpips is not None:
            self.lpips = LPIPS()
            want = self.lpips.state_dict()
            _check(vgg, {key: want[key] for key in want if key.startswith('features.')}, 'vgg')
            _check(lpips, {key: want[key] for key in want if key.startswith('lin')}, 'lpips')
            self.lpips.load_state_dict({key: vgg[key] if key.startswith('features.') else lpips[key]
                                        for key in want})
        if convnext is not None:
            self.convnext = ConvNeXtV2(depths, dims)  # defaults: ConvNeXt-V2-Base
            sd = convnext.get('model', convnext) if isinstance(convnext, dict) else convnext
            want = self.convnext.state_dict()
            _check(sd, want, 'convnext')
            self.convnext.load_state_dict({key: sd[key] for key in want})  # drops head.*

    @classmethod
    def random(cls, crop=32, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), seed=0):
        """Randomly initialised LPIPS (positive lin weights) and a small ConvNeXt-V2, for tests."""
        m = cls(None, None, None, crop)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            m.lpips, m.convnext = LPIPS(), ConvNeXtV2(depths, dims)
            for k in range(5):  # lpips' trained lin weights are non-negative; keep distances >= 0
                getattr(m.lpips, f'lin{k}')['model'][1].weight.uniform_(0, 1)
        return m

    def forward(self, pred, target, generator=None):
        """pred, target: (B,3,H,W) in [-1,1] (latents (B,C,h,w) with a decoder set) -> dict of
        per-sample (B,) terms: 'lpips', 'convnext' (those configured)."""
        # BiFlow's recipe: Dec(G's output) against Dec(clean latent); G gets the gradient
        if self.decode is not None:
            with torch.no_grad():
                target = self.decode(target)
            pred = self.decode(pred)
        if self.crop:
            pred, target = paired_random_resized_crop(pred, target, self.crop, generator=generator)
        out = {}
        if self.lpips is not None:
            out['lpips'] = self.lpips(pred, target)
        if self.convnext is not None:
            f = self.convnext.features(torch.cat([pred, target]))  # (2B,D)
            fp, ft = f.chunk(2)
            out['convnext'] = ((fp - ft) ** 2).sum(1)
        return out
