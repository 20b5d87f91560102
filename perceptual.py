"""
The frozen perceptual networks of BiFlow's stage-2 loss, like Inception in fid.py: they are not part
of either flow. LPIPS-VGG and ConvNeXt-V2 distances between the output image and the clean image, on
paired random-resized crops. Their weights come from local files, as their authors publish them; a
missing file says where to get it.

    python train.py --stage reverse --forward_ckpt out/forward.pt \
        --lpips vgg.pth --vgg vgg16-397923af.pth --convnext convnextv2_base_22k_224_ema.pt
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UsageError, read_torch_file

HINTS = {  # where the weights come from, for the error messages
    'vgg': "download torchvision's VGG16: https://download.pytorch.org/models/vgg16-397923af.pth",
    'lpips': "get LPIPS' v0.1 linear weights (also in the lpips PyPI package): https://github.com/"
             "richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    'convnext': "download ConvNeXt-V2-Base 22k 224: https://dl.fbaipublicfiles.com/convnext/"
                "convnextv2/im22k/convnextv2_base_22k_224_ema.pt",
}
# the inputs' normalisation: lpips' ScalingLayer for [-1,1] images, ImageNet's for [0,1] ones
LPIPS_SHIFT, LPIPS_SCALE = torch.tensor([-.030, -.088, -.188]), torch.tensor([.458, .448, .450])
IMAGENET_MEAN, IMAGENET_STD = torch.tensor([.485, .456, .406]), torch.tensor([.229, .224, .225])


def load_weights(path, flag):
    """The state dict in a local weight file for --lpips/--vgg/--convnext (None passes through);
    a missing file says what to get."""
    # on CPU: lpips' file holds CUDA tensors
    return path and read_torch_file(path, f'--{flag}', f'; {HINTS[flag]}')


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk;
    keys match torchvision `features.*` and lpips `lin{k}.model.1.weight`."""
    CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]
    TAPS = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3: their indices in torchvision's features

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            layers += [nn.MaxPool2d(2)] if v == 'M' else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == 'M' else v
        self.features = nn.Sequential(*layers)  # 30 modules, indices 0..29 as in torchvision
        for k, ch in enumerate((64, 128, 256, 512, 512)):
            # a 1x1 conv to one channel, at lpips' key lin{k}.model.1.weight (0 was a Dropout)
            lin = nn.Sequential(nn.Identity(), nn.Conv2d(ch, 1, 1, bias=False))
            self.add_module(f'lin{k}', nn.ModuleDict({'model': lin}))
        self.requires_grad_(False)

    def forward(self, a, b):
        """a, b: (B,3,H,W) in [-1,1] -> (B,) distances."""
        shift, scale = (v.view(1, 3, 1, 1).to(a) for v in (LPIPS_SHIFT, LPIPS_SCALE))
        x = (torch.cat([a, b]) - shift) / scale  # (2B,3,H,W), one trunk pass for both
        d, lins = 0, iter(self.get_submodule(f'lin{k}.model') for k in range(5))
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                # unit length over channels (+eps: a zero vector's gradient is 0, not NaN)
                fa, fb = (x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)).chunk(2)
                # (B,1): a weighted channel sum, averaged over space
                d = d + next(lins)((fa - fb) ** 2).mean((2, 3))
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
        self.gamma, self.beta = (nn.Parameter(torch.zeros(1, 1, 1, dim)) for _ in range(2))

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (B,1,1,C) spatial L2/channel
        return self.gamma * (x * gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-V2 block: dwconv7 -> LN -> MLP(4x) with GELU and GRN -> residual."""
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.grn = nn.Linear(dim, 4 * dim), GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):  # (B,C,H,W)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (B,H,W,C)
        return x + self.pwconv2(self.grn(F.gelu(self.pwconv1(y)))).permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 trunk with the official key names;
    the classifier head is left out (22k classes, unused)."""
    def __init__(self, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(LayerNorm2d(c, eps=1e-6), nn.Conv2d(c, c_next, 2, stride=2))
            for c, c_next in zip(dims, dims[1:])])
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
                                     for depth, dim in zip(depths, dims)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.requires_grad_(False)

    def features(self, x):
        """x: (B,3,H,W) in [-1,1] -> (B, dims[-1]) pooled, LayerNormed pre-classifier features."""
        # the official recipe feeds [0,1] images normalised with ImageNet's mean and std
        mean, std = (v.view(1, 3, 1, 1).to(x) for v in (IMAGENET_MEAN, IMAGENET_STD))
        x = ((x + 1) / 2 - mean) / std
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))  # (B,C,H/s,W/s)
        return self.norm(x.mean((2, 3)))


def _crop_box(h, w, scale, ratio, g):
    """(top, left, height, width) as torchvision's RandomResizedCrop draws it: up to 10 tries of an
    area fraction uniform in scale and an aspect ratio log-uniform in ratio, else the whole image
    (torchvision's fallback for a square image; it clamps other aspect ratios into ratio)."""
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        s, t = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        area, r = h * w * (scale[0] + (scale[1] - scale[0]) * s), math.exp(lo + (hi - lo) * t)
        cw, ch = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = (int(torch.randint(0, n + 1, (), generator=g)) for n in (h - ch, w - cw))
            return top, left, ch, cw
    return 0, 0, h, w


def paired_random_resized_crop(a, b, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               generator=None):
    """Crop a and b (B,C,H,W) with the same random box per sample,
    bicubic+antialias resize -> (B,C,size,size) each."""
    crops = []
    for i in range(len(a)):
        top, left, ch, cw = _crop_box(*a.shape[-2:], scale, ratio, generator)
        pair = torch.stack([a[i], b[i]])[:, :, top:top + ch, left:left + cw]  # (2,C,ch,cw)
        crops.append(F.interpolate(pair, size=(size, size), mode='bicubic', antialias=True))
    return torch.stack(crops, dim=1).unbind(0)  # (2,B,C,size,size) -> a's, b's


def _load(net, sd, name, keep=''):
    """Load the keys of net's state dict that start with keep from sd (extra keys ignored); if any
    is missing or mis-shaped, one error naming --name and where its file comes from."""
    want = {k: v for k, v in net.state_dict().items() if k.startswith(keep)}
    sd = sd.get('model', sd) if isinstance(sd, dict) else {}  # ConvNeXt's files: {'model': ...}
    bad = [k for k, v in want.items() if getattr(sd.get(k), 'shape', None) != v.shape]
    if bad:
        raise UsageError(f"--{name}: {len(bad)} of {len(want)} expected tensors missing or "
                         f"mis-shaped (e.g. {bad[0]!r}); {HINTS[name]}")
    net.load_state_dict({k: sd[k] for k in want}, strict=False)
    return net


class PerceptualLoss(nn.Module):
    """Frozen LPIPS-VGG and ConvNeXt-V2 distances
    between paired random-resized crops of pred and target."""
    def __init__(self, lpips=None, vgg=None, convnext=None, crop: int | None = 224, *,
                 depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)):
        """lpips, vgg, convnext: state dicts as their authors publish them (load_weights reads
        the files); depths, dims: ConvNeXt-V2's (default: Base)."""
        super().__init__()
        # crop None/0: compare whole images; decode: for latent models, a frozen decoder to pixels
        # (sample.LatentDecoder), set by train.py
        self.crop, self.decode, self.lpips, self.convnext = crop, None, None, None
        if lpips is not None or vgg is not None:  # LPIPS needs both (None: all missing)
            self.lpips = _load(LPIPS(), vgg, 'vgg', 'features.')
            _load(self.lpips, lpips, 'lpips', 'lin')
        if convnext is not None:
            # the classifier head is left out
            self.convnext = _load(ConvNeXtV2(depths, dims), convnext, 'convnext')

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
        out = {'lpips': self.lpips(pred, target)} if self.lpips is not None else {}
        if self.convnext is not None:
            fp, ft = self.convnext.features(torch.cat([pred, target])).chunk(2)  # (B,D) each
            out['convnext'] = ((fp - ft) ** 2).sum(1)
        return out
