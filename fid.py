"""
FID and Inception Score with the TF-2015 Inception network, in plain PyTorch.

    python fid.py samples.npz VIRTUAL_imagenet64_labeled.npz   # samples vs ADM reference stats
    python fid.py path/to/images samples.npz --device cuda      # any two inputs
    python fid.py in64.npy --save_stats ref.npz                  # mu/sigma of one input, to reuse

From Python: fid_from_samples(uint8_nhwc, 'ref.npz') -> {'fid', 'num_samples', 'ref',
'inception_score'}.

An input is an image folder (recursive, all images one size), uint8 (N,H,W,3) images in an .npy
(as `data.py pack` writes them) or in an .npz's arr_0 (ADM's sample format), or statistics: an .npz
with mu and sigma (ADM reference batches, pytorch-fid, --save_stats).
The numbers follow the TF graph of TTUR and ADM (and pytorch-fid, torch-fidelity): pool3 (2048-d) of
inception-2015-12-05, uint8 images resized to 299 with TF1's bilinear, then (x-128)/128, in fp32.
The weights are pytorch-fid's file, read from --inception or the torch.hub cache (never downloaded).
"""
import argparse
import os
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data import (IMG_EXTENSIONS, HelpFormatter, Progress, UsageError, atomic_write, check_flags,
                  check_writable, read_torch_file, run_cli)

WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS
# images per Inception pass: 50 (pytorch-fid's default) leaves a large GPU mostly idle, and the
# batch size does not change the statistics
BATCH_SIZE = 200

# -----------------------------------------------------------------------------
# Preprocessing

def tf1_resize(x, size=299):
    """Bilinear resize of (N,C,H,W) float like TF1's ResizeBilinear:
    src = dst*in/out, no half-pixel shift, edge clamp."""
    # PyTorch's bilinear uses src = (dst+0.5)*in/out-0.5; at 64->299 that moves pool3 by ~10%, so
    # the reference statistics (computed by the TF graph) are only comparable with this mapping
    def along(x, dim):
        n_in = x.shape[dim]
        src = torch.arange(size, device=x.device, dtype=torch.float32) * (n_in / size)
        lo = src.long()   # floor: src < n_in - n_in / size, by a margin far above round-off
        t = (src - lo).view([size if axis == dim else 1 for axis in range(x.ndim)])
        # fresh copies, so the in-place ops below are safe (3x faster)
        below, above = x.index_select(dim, lo), x.index_select(dim, (lo + 1).clamp(max=n_in - 1))
        # below + (above-below)*t: TF's expression, so the result is bit-exact
        return above.sub_(below).mul_(t).add_(below)
    return along(along(x, 3), 2)  # width first, then height: TF's order of interpolation

# -----------------------------------------------------------------------------
# The network: torchvision's Inception3 layout and key names, patched to the TF 2015 graph

def Conv(cin, cout, k, s=1, p=0):
    """conv (no bias) -> BN (TF's epsilon 1e-3, not PyTorch's 1e-5) -> ReLU, torchvision's names."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, k, s, p, bias=False),
                                     bn=nn.BatchNorm2d(cout, eps=1e-3), relu=nn.ReLU(inplace=True)))


# the kernel and padding of the factorised convs: 1x7, 7x1, 1x3, 3x1
K17, K71 = dict(k=(1, 7), p=(0, 3)), dict(k=(7, 1), p=(3, 0))
K13, K31 = dict(k=(1, 3), p=(0, 1)), dict(k=(3, 1), p=(1, 0))


# the pool branches' 3x3 pooling: TF averages over the valid pixels only, and Mixed_7c max-pools
# where torchvision averages
avg_pool, max_pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.MaxPool2d(3, 1, 1)


def chain(block, x, prefix, n):
    """x through a Mixed block's convs prefix_1 ... prefix_n, one after the other."""
    for i in range(1, n + 1):
        x = getattr(block, f'{prefix}_{i}')(x)
    return x


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, p=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, p=1)
        self.branch3x3dbl_3, self.branch_pool = Conv(96, 96, 3, p=1), Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, x, 'branch5x5', 2),
                          chain(self, x, 'branch3x3dbl', 3), self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = Conv(cin, 384, 3, s=2), Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, s=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(self, x, 'branch3x3dbl', 3),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # Mixed_6b/c/d/e, 17x17, 7x7 convs factorised into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1, self.branch7x7_1 = Conv(cin, 192, 1), Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, **K17), Conv(c7, 192, **K71)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **K71)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **K17), Conv(c7, c7, **K71)
        self.branch7x7dbl_5, self.branch_pool = Conv(c7, 192, **K17), Conv(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, x, 'branch7x7', 3),
                          chain(self, x, 'branch7x7dbl', 5), self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, s=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, **K17)
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, **K71), Conv(192, 192, 3, s=2)

    def forward(self, x):
        return torch.cat([chain(self, x, 'branch3x3', 2), chain(self, x, 'branch7x7x3', 4),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # Mixed_7b/c, 8x8, 3x3 convs split into parallel 1x3 and 3x1
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1, self.branch3x3_1 = Conv(cin, 320, 1), Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **K13), Conv(384, 384, **K31)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, p=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **K13), Conv(384, 384, **K31)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3, bd = self.branch3x3_1(x), chain(self, x, 'branch3x3dbl', 2)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(self.pool(x))], 1)


class FIDInception(nn.Module):
    """InceptionV3 of the TF 2015 graph, with the keys of pytorch-fid's weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, s=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, p=1), Conv(64, 80, 1)
        self.Conv2d_4a_3x3, self.Mixed_5b = Conv(80, 192, 3), InceptionA(192, 32)
        self.Mixed_5c, self.Mixed_5d = InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a, self.Mixed_6b = InceptionB(288), InceptionC(768, 128)
        self.Mixed_6c, self.Mixed_6d = InceptionC(768, 160), InceptionC(768, 160)
        self.Mixed_6e, self.Mixed_7a = InceptionC(768, 192), InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, avg_pool), InceptionE(2048, max_pool)
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes, for the Inception Score

    def forward(self, x):
        """uint8 or 0..255 float (N,3,H,W) -> {'pool3': (N,2048), 'logits': (N,1008) float64}."""
        # the metric is defined in true fp32: no autocast, no TF32 convs
        with torch.autocast(x.device.type, enabled=False), \
                torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            # TF graph's normalisation: [0,255] -> [-1, 0.9921875]
            x = (tf1_resize(x.float(), 299) - 128) / 128
            # oneDNN convs run ~1.5x faster on NHWC activations (measured; features move ~1e-6)
            if x.device.type == 'cpu':
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N,64,147,147)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))  # (N,192,71,71)
            x = F.max_pool2d(x, 3, 2)  # (N,192,35,35)
            for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
                # -> (N,768,17,17) after 6a, (N,2048,8,8) after 7a
                x = getattr(self, 'Mixed_' + name)(x)
            feats = x.mean((2, 3))  # (N,2048) pool3
        # IS uses the logits *without* the bias, as ADM's evaluator and torch-fidelity do
        return {'pool3': feats, 'logits': feats.double() @ self.fc.weight.double().t()}


def load_inception(path=None, device='cpu'):
    """FIDInception in eval mode on device, its weights from path or the torch.hub cache."""
    path = path or os.path.join(torch.hub.get_dir(), 'checkpoints', WEIGHTS)
    hint = f'; download {WEIGHTS_URL} there, or give its path with --inception'
    model = FIDInception()
    try:
        model.load_state_dict(read_torch_file(path, '--inception', hint))
    except RuntimeError as e:
        raise UsageError(f'--inception {path}: not the FID Inception state dict {WEIGHTS} '
                         f'({str(e).splitlines()[0]})') from None
    return model.to(device).eval()  # eval: BN must use the stored statistics

# -----------------------------------------------------------------------------
# Inputs: an image folder, images in an .npy or an .npz's arr_0, statistics (an .npz's mu, sigma)

def _check_images(shape, dtype, name, fortran=False):
    """Raise unless shape and dtype are those of >= 2 uint8 (N,H,W,3) images (a covariance needs 2)
    in C order."""
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 2 or fortran:
        raise UsageError(f'{name}: expected at least 2 uint8 images of shape (N,H,W,3) in C order, '
                         f'got {dtype} {tuple(shape)}{" in Fortran order" * fortran}')


def _array_batches(a, batch_size):
    return (a[i:i + batch_size] for i in range(0, len(a), batch_size))


def _file_batches(path, batch_size):
    """Yields the shape of the images in an .npy or in an .npz's arr_0, checked from the header to
    be uint8 (N,H,W,3), then uint8 (n,H,W,3) batches of them read from the file in turn (50k images
    of 256^2 are ~10 GB)."""
    with open(path, 'rb') as file:
        f = file if path.endswith('.npy') else zipfile.ZipFile(file).open('arr_0.npy')
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0)(f)
        _check_images(shape, dtype, path, fortran)
        yield shape
        for i in range(0, shape[0], batch_size):
            raw = bytearray(f.read(min(batch_size, shape[0] - i) * int(np.prod(shape[1:]))))
            yield np.frombuffer(raw, np.uint8).reshape(-1, *shape[1:])  # writable, as torch wants


def _folder_files(folder):
    """Sorted image files under folder (recursive): >= 2, each readable and all of one size, checked
    from their headers (a stray file fails now, not after minutes of features)."""
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMG_EXTENSIONS))
    if len(files) < 2:
        raise UsageError(f'{folder}: {len(files)} images ({" ".join(IMG_EXTENSIONS)}) found, '
                         'FID needs at least 2')
    first = None
    for path in files:
        try:
            with Image.open(path) as im:
                size, first = im.size, first or (im.size, path)   # first: (size, path) of files[0]
        except Exception as e:
            raise UsageError(f'{path}: cannot read image ({e})') from None
        if size != first[0]:
            raise UsageError(f'{path}: size {size} differs from {first[1]} {first[0]}; '
                             'FID inputs must all have one size (resize or crop them first)')
    return files


def _folder_batches(files, batch_size):
    """uint8 (n,H,W,3) batches of the given image files, any mode (L, P, RGBA, ...) as RGB."""
    for i in range(0, len(files), batch_size):
        batch = []
        for path in files[i:i + batch_size]:
            with Image.open(path) as im:
                batch.append(np.asarray(im.convert('RGB')))
        yield np.stack(batch)


def _images(path, batch_size=BATCH_SIZE):
    """(N, uint8 (n,H,W,3) batches) of an image folder or array file, checked before the first."""
    if os.path.isdir(path):
        files = _folder_files(path)
        return len(files), _folder_batches(files, batch_size)
    batches = _file_batches(path, batch_size)
    return next(batches)[0], batches


def _read_stats(path):
    """{'mu', 'sigma' (float64), 'num_samples' (None if not stored)} of a statistics .npz, checked
    to be a covariance (eigh and Cholesky read one triangle: an asymmetric sigma is refused)."""
    with np.load(path, allow_pickle=False) as z:  # input_kind words its errors
        mu, sigma = z['mu'].astype(np.float64), z['sigma'].astype(np.float64)
        n = int(z['num_samples']) if 'num_samples' in z.files else None
    if (mu.ndim != 1 or sigma.shape != mu.shape * 2 or not np.isfinite(np.append(mu, sigma)).all()
            or not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * np.abs(sigma).max(initial=0))):
        raise UsageError(f'{path}: mu must be (D,) and sigma (D,D), finite and symmetric (a '
                         f'covariance); got {mu.shape} and {sigma.shape}')
    _psd_factor(sigma, path)
    return dict(mu=mu, sigma=sigma, num_samples=n)


def input_kind(path):
    """'folder', 'samples' (images in an .npy or an .npz's arr_0) or 'stats' (an .npz with mu and
    sigma), each checked as far as it can be before the features; else a one-line error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such file or folder')
    keys = []
    try:
        if os.path.isfile(path) and not path.endswith('.npy'):
            with zipfile.ZipFile(path) as z:
                keys = [name.removesuffix('.npy') for name in z.namelist()]
        # ADM reference batches hold arr_0 too; their mu/sigma cover the whole train set
        if 'mu' in keys and 'sigma' in keys:
            _read_stats(path)
            return 'stats'
        if os.path.isdir(path) or path.endswith('.npy') or 'arr_0' in keys:
            _images(path)
            return 'folder' if os.path.isdir(path) else 'samples'
    except (OSError, zipfile.BadZipFile, ValueError, TypeError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f'{path}: not a readable .npy or .npz of numbers ({e})') from None
    raise UsageError(f"{path}: expected 'mu' and 'sigma' (statistics) or 'arr_0' (uint8 images) "
                     f"in the .npz, found {keys}")

# -----------------------------------------------------------------------------
# Statistics and distances

@torch.inference_mode()
def compute_statistics(batches, model, keep_logits=False, total=None):
    """(mu, sigma, n, logits or None) of pool3 in float64 over uint8 NHWC batches.
    total: the image count, for a progress line on large inputs."""
    device = next(model.parameters()).device
    feats, logits = [], []
    progress = Progress(total or 0, 'Inception features', enabled=bool(total))
    for b in batches:
        out = model(torch.from_numpy(np.ascontiguousarray(b)).to(device).permute(0, 3, 1, 2))
        feats.append(out['pool3'].double().cpu().numpy())  # (B,2048)
        if keep_logits:
            logits.append(out['logits'].cpu())
        progress.update(sum(map(len, feats)))
    f = np.concatenate(feats)  # (N,2048), 0.8 GB for 50k
    return f.mean(0), np.cov(f, rowvar=False), len(f), torch.cat(logits) if logits else None


def _psd_factor(cov, name):
    """A with A A^T = cov: Cholesky when cov is positive definite (the usual case, N > D), else
    V sqrt(w) from the eigendecomposition (singular cov, N <= D). Eigenvalues below -1e-6 max|w|
    are a negative variance, not round-off."""
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        w, V = np.linalg.eigh(cov)
        if len(w) and w[0] < -1e-6 * np.abs(w).max():
            raise UsageError(f'{name}: sigma is not positive semi-definite (smallest eigenvalue '
                             f'{w[0]:.4g}, largest {w[-1]:.4g}), so not a covariance') from None
        return V * np.sqrt(np.clip(w, 0, None))


def frechet_distance(mu1, sigma1, mu2, sigma2, names=('first statistics', 'second statistics')):
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64. names label the two inputs in
    errors. Clamped at 0: round-off made a set's distance to itself -1e-17 (printed -0.0000)."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise UsageError(f'{names[0]} and {names[1]} do not match: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {s1.shape} vs {s2.shape}')
    # For any A with A A^T = S1, S1 S2 = A (A^T S2) has the eigenvalues of the symmetric PSD
    # A^T S2 A, so Tr sqrt(S1 S2) = sum sqrt(eigvalsh(A^T S2 A)): real by construction and ~10x
    # faster than scipy's sqrtm at 2048-d.
    A, d = _psd_factor(s1, names[0]), mu1 - mu2
    ev = np.linalg.eigvalsh(A.T @ s2 @ A)
    return max(0.0, float(d @ d + np.trace(s1) + np.trace(s2)
                          - 2 * np.sqrt(np.clip(ev, 0, None)).sum()))


def fid_between(a, b, names):
    """FID between two input_statistics dicts. FID falls as N grows (it is biased by ~1/N), so FIDs
    compare only at one N: a warning (not a failure) when both sizes are known and differ."""
    if None not in (n := (a['num_samples'], b['num_samples'])) and n[0] != n[1]:
        warnings.warn(f'FID compares {n[0]} images ({names[0]}) with {n[1]} ({names[1]}): FID is '
                      'biased by the sample count, so compare it only with FIDs at the same sizes')
    return frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma'], names)


def inception_score(logits, splits=10):
    """(mean, std) over splits of exp(mean KL(p(y|x) || p(y)));
    ADM uses 10 splits of 5000 on unbiased logits. Needs >= splits rows."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1)
    # KL(p(y|x) || p(y)) of each sample, 0 log 0 = 0
    scores = [(torch.special.xlogy(q, q) - torch.special.xlogy(q, q.mean(0, keepdim=True)))
              .sum(1).mean().exp().item() for q in torch.tensor_split(probs, splits)]
    return float(np.mean(scores)), float(np.std(scores))

# -----------------------------------------------------------------------------
# API for sample.py / train.py

def input_statistics(path, model=None, batch_size=BATCH_SIZE, device='cpu', keep_logits=False):
    """{'mu', 'sigma', 'num_samples' (None for ADM stats), 'logits'} of any input;
    loads the model if needed."""
    if input_kind(path) == 'stats':  # checked before the network loads
        return dict(_read_stats(path), logits=None)
    total, batches = _images(path, batch_size)
    model = model if model is not None else load_inception(device=device)
    mu, sigma, n, logits = compute_statistics(batches, model, keep_logits, total)
    return dict(mu=mu, sigma=sigma, num_samples=n, logits=logits)


def check_reference(path, model):
    """Check an FID reference before the work that ends in it (drawing samples, training), against
    the network that will compare with it: statistics must have as many features as its pool3
    (2048 for the FID Inception; model.fc.in_features). -> the reference's kind."""
    kind = input_kind(path)
    if kind == 'stats' and len(mu := _read_stats(path)['mu']) != model.fc.in_features:
        raise UsageError(f'{path}: statistics of {len(mu)} features, but the Inception compares '
                         f'{model.fc.in_features}; recompute: fid.py IMAGES --save_stats STATS')
    return kind


def fid_from_samples(samples, ref, inception=None, device='cpu', batch_size=BATCH_SIZE):
    """FID (and IS, from 10 samples) of uint8 (N,H,W,3) samples against ref (any input)."""
    _check_images(samples.shape, samples.dtype, 'samples')
    model = inception if inception is not None else load_inception(device=device)
    r = input_statistics(ref, model, batch_size, device)
    mu, sigma, n, logits = compute_statistics(_array_batches(samples, batch_size), model, True,
                                              len(samples))
    fid = fid_between(dict(mu=mu, sigma=sigma, num_samples=n), r, ('samples', ref))
    return dict(fid=fid, num_samples=n, ref=ref,
                inception_score=inception_score(logits)[0] if n >= 10 else None)


def save_stats(path, mu, sigma, num_samples=None):
    """Write mu/sigma in the pytorch-fid/ADM key layout (plus num_samples when known)."""
    extra = {} if num_samples is None else dict(num_samples=np.int64(num_samples))
    atomic_write(path, lambda f: np.savez(f, mu=np.float64(mu), sigma=np.float64(sigma), **extra))

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('inputs', nargs='+', metavar='PATH', help='two inputs to compare, or one with '
                   '--save_stats: each a folder, an .npy/.npz of images or an .npz of mu/sigma')
    p.add_argument('--inception', default=None, metavar='PATH',
                   help=f"Inception weights {WEIGHTS}; None: torch.hub's cache (TORCH_HOME)")
    p.add_argument('--batch_size', type=int, default=BATCH_SIZE, help='images per Inception pass')
    p.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu' or 'cuda:N'")
    p.add_argument('--save_stats', default=None, metavar='OUT.npz',
                   help='with one input: write its mu/sigma here')
    args = p.parse_args(argv)
    if len(args.inputs) != (1 if args.save_stats else 2):
        raise UsageError('give two inputs to compare, or one input with --save_stats')
    check_flags(vars(args), {'batch_size': '[1, inf)'})   # and --device
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    # every input and the output checked before the network loads and the features run
    kinds = [input_kind(path) for path in args.inputs]
    if args.save_stats:
        check_writable(args.save_stats, '--save_stats')
    model = load_inception(args.inception, args.device) if set(kinds) != {'stats'} else None
    stats = []
    for path, kind in zip(args.inputs, kinds):
        s = input_statistics(path, model, args.batch_size, args.device, keep_logits=True)
        line = f'{path}: {kind}, N={s["num_samples"] or "?"}'
        if s['logits'] is not None and len(s['logits']) >= 10:
            line += ', IS={:.3f} ± {:.3f} (10 splits)'.format(*inception_score(s['logits']))
        print(line)
        stats.append(s)
    if args.save_stats:
        save_stats(args.save_stats, stats[0]['mu'], stats[0]['sigma'], stats[0]['num_samples'])
        return print(f'wrote {args.save_stats}')
    print(f'FID {fid_between(*stats, args.inputs):.4f}  ({args.inputs[0]} vs {args.inputs[1]})')


if __name__ == '__main__':
    run_cli(main)
