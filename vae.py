"""
The Stable Diffusion VAE (AutoencoderKL f8c4) in plain PyTorch: BiFlow's latent models flow in its
4-channel latents, and its frozen decoder turns their samples into images. Weights come from a local
file, as released. Encoding a dataset once into such latents is here too:

    python vae.py check diffusion_pytorch_model.safetensors   # a download: config, fingerprint
    python vae.py check sd-vae-ft-mse/ --image cat.png         # a diffusers folder; PSNR
    torchrun --nproc_per_node=8 vae.py encode /path/to/imagenet/train in256_latents \\
        --vae sd-vae-ft-mse.safetensors --img_size 256        # a latent set; a rerun resumes

From Python: `vae = load_vae(path, device)`; `mean, std = vae.encode(x)`; `x = vae.decode(z)`. z is
the unscaled latent (multiplying it by SD's 0.18215 is the caller's business). State-dict keys are
diffusers' current AutoencoderKL names; older uploads (attention `query/key/value/proj_attn`,
1x1-conv weights) are renamed on load. `encode` writes a latent set (see data.LatentDataset): each
image's and its mirror image's posterior mean and std, in chunks that are flushed and marked done,
so an encode killed part-way resumes where it stopped when run again with the same command.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from data import (BUILTIN, HelpFormatter, ImageFolder, Progress, RunLock, UsageError, atomic_write,
                  open_source, read_torch_file, run_cli, setup_distributed)


VAE_HINT = ('download the SD VAE, e.g. '
            'https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/'
            'diffusion_pytorch_model.safetensors (or the same file from stabilityai/sd-vae-ft-ema)')


@dataclass(frozen=True)
class VAEConfig:
    """The released sd-vae-ft-mse / sd-vae-ft-ema config; the image is downsampled
    2**(len(block_out_channels)-1)x."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32


def _count(v):
    """A positive int; JSON's true and 2.0 are not counts (Python's bool is an int)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# diffusers' AutoencoderKL config.json fields that VAEConfig does not hold: the one value this VAE
# implements of each (any other changes the network's function). Fields named neither here nor in
# VAEConfig (sample_size, scaling_factor, latents_mean, force_upcast, ...) do not change it.
_FIXED = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'use_quant_conv': True,
          'use_post_quant_conv': True, 'mid_block_add_attention': True}
_BLOCK_TYPES = {'down_block_types': 'DownEncoderBlock2D', 'up_block_types': 'UpDecoderBlock2D'}
_COUNTS = ('in_channels', 'out_channels', 'latent_channels', 'layers_per_block', 'norm_num_groups')


def config_problem(values):
    """The first field of values (a VAEConfig's, or a diffusers config.json's as JSON gives them)
    that this VAE cannot build or does not implement, as one line 'field value: expected ...';
    None if there is none."""
    for k in _COUNTS:
        if k in values and not _count(values[k]):
            return f'{k} {values[k]!r}: expected a positive integer'
    ch = values.get('block_out_channels')
    if 'block_out_channels' in values and not (
            isinstance(ch, (list, tuple)) and ch and all(map(_count, ch))):
        return (f'block_out_channels {ch!r}: expected a non-empty list of positive integers, '
                'one width per block')
    g = values.get('norm_num_groups')
    if ch and g and any(c % g for c in ch):
        return (f'norm_num_groups {g!r}: expected a divisor of every block_out_channels entry '
                f'{list(ch)} (GroupNorm splits each width into that many groups)')
    for k, want in _FIXED.items():
        if k in values and values[k] != want:
            return f'{k} {values[k]!r}: expected {want!r}, the only value this VAE implements'
    for k, want in _BLOCK_TYPES.items():
        if k in values and (not isinstance(values[k], list) or set(values[k]) - {want}
                            or ch and len(values[k]) != len(ch)):
            return f'{k} {values[k]!r}: expected {want!r} once per block_out_channels entry'
    return None


def _norm(c, groups):
    # every norm of the SD VAE uses 1e-6, not PyTorch's 1e-5
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv where the width changes)."""
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # (B,cin,H,W) -> (B,cout,H,W)
        res = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + res


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions,
    with a residual (the mid block's only attention)."""
    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = _norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        # diffusers' key to_out.0 (its index 1 is a weightless Dropout)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):  # (B,C,H,W)
        B, C, H, W = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B,HW,C)
        # (B,1,HW,C): one head of width C
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(q k^T / sqrt(C)) v, (B,HW,C)
        return x + self.to_out[0](o).transpose(1, 2).reshape(B, C, H, W)


class Block(nn.Module):
    """An encoder down block or a decoder up block: `n` ResnetBlocks, then a x2 resampler (none on
    the last block). Down: pad right and bottom by one, 3x3 conv stride 2 (the original LDM code's
    asymmetric padding). Up: nearest x2, 3x3 conv."""
    def __init__(self, cin, cout, n, groups, resample=None):  # resample: 'down', 'up' or None
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups)
                                      for j in range(n)])
        self.resample = resample
        # diffusers' keys down_blocks.{i}.downsamplers.0.conv, up_blocks.{i}.upsamplers.0.conv
        if resample:
            conv = (nn.Conv2d(cout, cout, 3, stride=2) if resample == 'down'
                    else nn.Conv2d(cout, cout, 3, padding=1))
            self.add_module(f'{resample}samplers', nn.ModuleList([nn.ModuleDict({'conv': conv})]))

    def forward(self, x):  # (B,cin,H,W) -> (B,cout,H/2,W/2), (B,cout,2H,2W) or (B,cout,H,W)
        for r in self.resnets:
            x = r(x)
        if self.resample == 'down':
            return self.downsamplers[0]['conv'](F.pad(x, (0, 1, 0, 1)))
        if self.resample == 'up':
            return self.upsamplers[0]['conv'](F.interpolate(x, scale_factor=2.0, mode='nearest'))
        return x


class MidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                                                'down' if i < n - 1 else None) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = _norm(ch[-1], g)
        # mean and log-variance
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # (B,3,H,W) -> (B,2L,H/8,W/8)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        # widest first
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g,
                                              'up' if i < n - 1 else None) for i in range(n)])
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # (B,L,h,w) -> (B,3,8h,8w)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """AutoencoderKL. Build it with load_vae; a bare VAE(cfg) has random weights
    (benchmarks, tests)."""
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        problem = config_problem(asdict(cfg))
        if problem:
            raise ValueError(problem)
        # a list of widths as a tuple: equal configs compare (and fingerprint) equal
        self.cfg = cfg = replace(cfg, block_out_channels=tuple(cfg.block_out_channels))
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x):
        """x (B,3,H,W) in [-1,1] -> posterior (mean, std), each (B,L,H/8,W/8), in the weights' dtype
        (fp32) even under autocast: latents are computed once per dataset, and every later stage
        inherits their precision."""
        with torch.autocast(x.device.type, enabled=False):
            moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))
            mean, logvar = moments.chunk(2, dim=1)
        # the clamp of LDM's DiagonalGaussianDistribution
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        """z (B,L,h,w) unscaled latent -> image (B,3,8h,8w), roughly [-1,1], unclipped.
        Differentiable in z (the stage-2 losses go through it); it runs in the caller's autocast
        (bf16 is fine, fp16 can overflow)."""
        return self.decoder(self.post_quant_conv(z))

    def _fingerprints(self):
        """(config and weights, weights only): 12 hex digits of blake2b each, over the sorted
        names, shapes and fp32 bytes of the weights, the first also over the config, in one pass.
        Hashed at every read (about 1 s for the SD VAE on CPU), so they can never describe weights
        changed since."""
        full, weights = hashlib.blake2b(digest_size=6), hashlib.blake2b(digest_size=6)
        # the config first, as canonical JSON: norm_num_groups changes the function, no shape.
        # A field added to VAEConfig must leave this text unchanged at its default value, or no
        # recorded fingerprint would match again
        cfg = json.dumps(asdict(self.cfg), sort_keys=True)
        full.update(f'vae.py config {cfg}\n'.encode())
        for k, v in sorted(self.state_dict().items()):
            for digest in (full, weights):
                digest.update(f'{k}{tuple(v.shape)}'.encode())
                digest.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return full.hexdigest(), weights.hexdigest()

    @property
    def fingerprint(self):
        """Which network made a latent: 12 hex digits over the config and the weights. Check a
        recorded one with matches(), which also takes the weights-only one older files hold."""
        return self._fingerprints()[0]

    @property
    def weights_fingerprint(self):
        """12 hex digits over the weights alone: the fingerprint that older versions recorded (it
        cannot see norm_num_groups)."""
        return self._fingerprints()[1]

    def matches(self, recorded):
        """Whether a fingerprint recorded with latents or a checkpoint names this VAE: its
        fingerprint; or its weights-only one (older versions' files), but only when the config is
        the one the weights' shapes imply, the released norm_num_groups 32. A weights-only
        fingerprint cannot tell which groups encoded, and 32 is all it could be trusted for."""
        full, weights = self._fingerprints()
        return recorded == full or (
            recorded == weights and self.cfg == config_from_state_dict(self.state_dict()))


def vae_decode_flops(cfg: VAEConfig = VAEConfig(), latent_hw: int = 32):
    """FLOPs (2 per multiply-add) of decoding one latent_hw x latent_hw latent, counted by
    FlopCounterMode on the meta device (free at any size): convs and matmuls; norms, SiLU and
    resampling are not counted."""
    with torch.device('meta'):
        vae = VAE(cfg)
        z = torch.zeros(1, cfg.latent_channels, latent_hw, latent_hw)
    with FlopCounterMode(display=False) as fc:
        vae.decode(z)
    return fc.get_total_flops()


# -----------------------------------------------------------------------------
# Loading

_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
    'U8': torch.uint8, 'BOOL': torch.bool,
}


def read_safetensors(path):
    """A .safetensors file -> {name: CPU tensor}: u64 little-endian header size, JSON header, then
    raw little-endian bytes at each tensor's data_offsets (counted from the end of the header)."""
    size = os.path.getsize(path)
    try:
        with open(path, 'rb') as f:
            header_len = int.from_bytes(f.read(8), 'little')
            if size < 8 or 8 + header_len > size:
                raise ValueError(f'header of {header_len} bytes in a {size}-byte file')
            header = json.loads(f.read(header_len))
            out = {}
            for name, info in header.items():
                if name == '__metadata__':
                    continue
                dtype, shape, (start, end) = (_SAFETENSORS_DTYPES[info['dtype']], info['shape'],
                                              info['data_offsets'])
                nbytes = math.prod(shape) * dtype.itemsize
                if (min(shape, default=0) < 0 or end - start != nbytes or start < 0
                        or 8 + header_len + end > size):
                    raise ValueError(f'{name}: data_offsets {start, end} '
                                     f'do not hold {shape} {info["dtype"]}')
                f.seek(8 + header_len + start)
                raw = bytearray(f.read(nbytes))  # a fresh, writable, aligned buffer per tensor
                out[name] = (torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes
                             else torch.empty(shape, dtype=dtype))
    # JSONDecodeError is a ValueError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UsageError(f'{path}: not a valid safetensors file, truncated or corrupt ({e})') from e
    return out


_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def convert_state_dict(sd):
    """diffusers' current names from either attention naming;
    1x1-conv (4-D) attention weights reshaped to Linear's."""
    out = {}
    for k, v in sd.items():
        path, _, leaf = k.rpartition('.')
        parent, _, name = path.rpartition('.')
        if '.attentions.' in k and name in _OLD_ATTENTION:
            k = f'{parent}.{_OLD_ATTENTION[name]}.{leaf}'
        if '.attentions.' in k and isinstance(v, torch.Tensor) and v.ndim == 4:
            v = v.flatten(1)  # (C,C,1,1) -> (C,C)
        out[k] = v
    return out


def config_from_state_dict(sd):
    """VAEConfig from tensor shapes (norm_num_groups cannot be seen in them: the default 32);
    None if not a VAE."""
    def shape(k):
        return tuple(sd[k].shape) if isinstance(sd.get(k), torch.Tensor) else None
    ch = []
    while shape(f'encoder.down_blocks.{len(ch)}.resnets.0.conv1.weight'):
        ch.append(shape(f'encoder.down_blocks.{len(ch)}.resnets.0.conv1.weight')[0])
    layers = sum(1 for k in sd if k.startswith('encoder.down_blocks.0.resnets.')
                 and k.endswith('.conv1.weight'))
    ends = (shape('encoder.conv_in.weight'), shape('decoder.conv_out.weight'),
            shape('post_quant_conv.weight'))
    if not ch or None in ends:
        return None
    return VAEConfig(ends[0][1], ends[1][0], ends[2][0], tuple(ch), layers)


def load_vae(path, device='cpu', flag='--vae'):
    """A frozen fp32 VAE in eval mode from a weight file (.safetensors, or .bin/.pt/.pth) or a
    diffusers folder (config.json + diffusion_pytorch_model.safetensors/.bin, here or in vae/)."""
    weights = config = None
    if os.path.isdir(path):
        for d in (path, os.path.join(path, 'vae')):
            for name in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'):
                if weights is None and os.path.isfile(os.path.join(d, name)):
                    weights, config = os.path.join(d, name), os.path.join(d, 'config.json')
        if weights is None:
            raise FileNotFoundError(f'{flag} {path}: a folder without '
                                    'diffusion_pytorch_model.safetensors or .bin (nor in vae/); '
                                    f'{VAE_HINT}')
    elif os.path.isfile(path):
        weights = path
        # a file under diffusers' name: the config.json beside it describes it
        if os.path.basename(path).startswith('diffusion_pytorch_model.'):
            config = os.path.join(os.path.dirname(path), 'config.json')
    else:
        raise FileNotFoundError(f'{flag} {path}: no such file or folder; {VAE_HINT}')
    sd = (read_safetensors(weights) if weights.endswith('.safetensors')
          else read_torch_file(weights, flag))
    if not isinstance(sd, dict):
        raise UsageError(f'{flag} {weights}: holds a {type(sd).__name__}, '
                         'not a state dict of the SD VAE')
    sd = convert_state_dict(sd)
    # the config from the shapes (not a VAE: the default, so the error lists what is missing)
    cfg = config_from_state_dict(sd) or VAEConfig()
    # a folder's config.json is authoritative (norm_num_groups is only there), field by field
    if config and os.path.isfile(config):
        try:
            with open(config) as f:
                given = json.load(f)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UsageError(f'{flag} {config}: not a diffusers config.json, not JSON ({e})') from e
        if not isinstance(given, dict):
            raise UsageError(f'{flag} {config}: not a diffusers config.json, which is a JSON '
                             f'object, but a {type(given).__name__}')
        problem = config_problem(given)
        if problem:
            raise UsageError(f'{flag} {config}: {problem}')
        # a field it lacks keeps the value that the weights' shapes imply
        names = {f.name for f in fields(VAEConfig)}
        cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                              for k, v in given.items() if k in names})
        problem = config_problem(asdict(cfg))  # its groups against a width from the shapes
        if problem:
            raise UsageError(f'{flag} {config}: {problem}')
    try:
        with torch.device('meta'):  # no random init of weights that are replaced at once
            vae = VAE(cfg)
    except ValueError as e:  # e.g. widths that the default 32 groups do not divide, no config.json
        raise UsageError(f'{flag} {weights}: cannot build an SD VAE of {cfg}: {e}; a diffusers '
                         'config.json beside the weights sets norm_num_groups') from e
    want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
           for k, v in sd.items()}
    problems = [(what, sorted(keys)) for what, keys in [
        ('missing', want.keys() - got.keys()), ('unexpected', got.keys() - want.keys()),
        ('mis-shaped', [f'{k} {got[k]} (want {want[k]})' for k in want.keys() & got.keys()
                        if got[k] != want[k]])] if keys]
    if problems:
        raise UsageError(f'{flag} {weights}: not an SD VAE (AutoencoderKL) of {cfg}: ' + '; '.join(
            f'{len(keys)} {what} keys, e.g. {", ".join(keys[:4])}' for what, keys in problems))
    vae.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()},
                        assign=True)
    return vae.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# encode: a dataset's images, once, into a latent set (data.LatentDataset reads it)

# normalised latent = (latent - mean) / std, per channel;
# --norm compute measures them on the encoded set instead
LATENT_NORMS = {
    # BiFlow's group's per-channel statistics of sd-vae-ft-mse latents
    'channel': ([0.86488, -0.27787343, 0.21616915, 0.3738409],
                [4.85503674, 5.31922414, 3.93725398, 3.9870003]),
    # Stable Diffusion's single scale factor 0.18215 for every channel, no shift
    'sd': ([0.0], [1 / 0.18215]),
}
# images per unit of work: what a rank flushes and marks done, whatever the number of ranks
ENCODE_CHUNK = 1024
# everything encode writes in OUT (and the temporary files of its atomic writes, named after these)
LATENT_FILES = ('meta.json', 'progress.json', 'latents.npy', 'labels.npy', 'done')
ENCODE_LOCK = 'encode.lock'   # held by the running encode (RunLock), removed when it ends


class _Readable(Dataset):
    """(i, uint8 (3, H, W), label, readable) per image: the item the dataset serves (ImageFolder's
    substitute for an unreadable file) and whether image i itself could be read, so encode can count
    failures made in its workers."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(self.ds, ImageFolder):
            # decoded once when readable; the substitute is only looked for when not
            arr = self.ds.load(i)
            if arr is None:
                x, y = self.ds[i]
                return i, x, y, False
            return (i, torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(),
                    int(self.ds.targets[i]), True)
        x, y = self.ds[i]
        return i, x, y, True


def _encode_collate(items):
    return (torch.tensor([it[0] for it in items]), torch.stack([it[1] for it in items]),
            torch.tensor([it[2] for it in items], dtype=torch.int64),
            torch.tensor([it[3] for it in items]))


# the flags that set each recorded setting, for the message
# when a rerun's settings differ from the unfinished set's
_SETTING_FLAGS = {'source': 'SRC', 'split': '--split', 'img_size': '--img_size', 'n': 'SRC/--limit',
                  'latent_shape': '--vae', 'vae_fingerprint': '--vae', 'chunk': '--chunk'}


def _settings_fingerprint(out: str, vae, overwrite: bool) -> str:
    """The VAE's fingerprint in an encode's settings. An unfinished encode in OUT that recorded an
    older version's weights-only fingerprint, which this VAE matches (VAE.matches), keeps it: it
    resumes."""
    new = vae.fingerprint
    try:
        with open(os.path.join(out, 'progress.json')) as f:
            old = json.load(f).get('vae_fingerprint')
    except (OSError, ValueError, AttributeError):   # none, or unreadable: _check_out says which
        return new
    resumable = not overwrite and old != new and vae.matches(old)
    return old if resumable else new


def _check_out(out: str, settings: dict | None, overwrite: bool) -> None:
    """Refuse an OUT that encode must not write into; reads only (every rank runs it before rank 0
    writes). Without settings (before the VAE is loaded), only what needs none: a foreign folder, a
    complete set."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UsageError(f"encode OUT {out}: is a file, "
                         "expected a folder (new, empty, or an unfinished latent set)")
    names = os.listdir(out)
    foreign = sorted(name for name in names if name != ENCODE_LOCK and
                     not any(name == f or name.startswith(f + '.') for f in LATENT_FILES))
    if foreign:
        raise UsageError(f"encode OUT {out}: holds {foreign[0]!r}, "
                         "which is no part of a latent set; give a new or empty folder")
    if overwrite:
        return
    if 'meta.json' in names:
        raise FileExistsError(f"encode OUT {out}: already holds a complete latent set (meta.json); "
                              "pass --overwrite to re-encode it")
    if settings is None:
        return
    if 'progress.json' in names:
        with open(os.path.join(out, 'progress.json')) as f:
            old = json.load(f)
        for k, v in settings.items():
            if old.get(k) != v:
                raise UsageError(f"encode OUT {out}: holds an unfinished encode made with {k} "
                                 f"{old.get(k)!r}, but this one has {k} {v!r} "
                                 f"({_SETTING_FLAGS[k]}); rerun with the first settings "
                                 "to resume it, or pass --overwrite to start over")
    elif 'latents.npy' in names or 'done' in names:
        # progress.json is written first, so someone removed it
        raise UsageError(f"encode OUT {out}: holds latents.npy or done/ but no progress.json, "
                         "so it cannot be resumed; pass --overwrite to start over")


def _prepare_out(out: str, settings: dict, overwrite: bool, shape: tuple) -> None:
    """Rank 0, before any rank encodes: OUT with progress.json, done/, and the zero-filled
    latents.npy and labels.npy (each created under a temporary name and renamed, so an existing one
    is always whole)."""
    os.makedirs(out, exist_ok=True)
    # meta.json first: a crash part-way leaves an unfinished set, never a complete-looking mix.
    # Without --overwrite, only the temporary files of a killed run go (no rank writes yet, so
    # none is in use)
    for name in sorted(os.listdir(out), key=lambda name: not name.startswith('meta.json')):
        path = os.path.join(out, name)
        if name != ENCODE_LOCK and (overwrite or name not in LATENT_FILES):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    done = os.path.join(out, 'done')
    for name in os.listdir(done) if os.path.isdir(done) else []:
        if not name.endswith('.json'):   # a mark's temporary file
            os.remove(os.path.join(done, name))
    progress = os.path.join(out, 'progress.json')
    # first, so any other file of an unfinished set comes with its settings
    if not os.path.isfile(progress):
        atomic_write(progress, lambda f: f.write(json.dumps(settings, indent=1).encode()))
    lat, lab = os.path.join(out, 'latents.npy'), os.path.join(out, 'labels.npy')
    if not (os.path.isfile(lat) and os.path.isfile(lab)):
        # marks without their arrays mean nothing
        shutil.rmtree(os.path.join(out, 'done'), ignore_errors=True)
        for path, dtype, shp in ((lat, np.float32, shape), (lab, np.int64, shape[:1])):
            tmp = f'{path}.tmp{os.getpid()}'
            # a memory map, sparse until written, so ImageNet never has to fit in RAM;
            # dropped (closed) at once
            np.lib.format.open_memmap(tmp, 'w+', dtype, shp).flush()
            os.replace(tmp, path)
    os.makedirs(os.path.join(out, 'done'), exist_ok=True)


def _marker(out: str, j: int) -> str:
    """The mark that chunk j is encoded and flushed."""
    return os.path.join(out, 'done', f'{j:06d}.json')


def encode(src: str, out: str, vae, img_size: int, batch_size: int = 64, norm: str = 'channel',
           limit: int | None = None, overwrite: bool = False, split: str = 'train',
           chunk: int = ENCODE_CHUNK, workers: int = 0, vae_name: str = 'vae',
           rank: int = 0, world: int = 1, device='cpu') -> None:
    """Encode SRC's images (ADM centre crop) and their mirror images into the latent set OUT (see
    LatentDataset): vae.encode(x in [-1, 1], (B, 3, H, W)) -> (mean, std), each (B, C, h, w). The
    images are split into chunks of `chunk`; the ranks share the chunks not done yet, and each
    finished chunk is flushed and then marked done (OUT/done/<chunk>.json, with its unreadable
    images and its sums for --norm compute). A rerun after a kill redoes only unmarked chunks;
    rank 0 writes meta.json, atomically and last, once every chunk is done."""
    if norm not in ('channel', 'sd', 'compute'):
        raise UsageError(f"--norm {norm!r}: expected 'channel', 'sd' or 'compute'")
    device = torch.device(device)
    _check_out(out, None, overwrite)   # a complete set is refused at once, before SRC is listed
    ds = open_source(src, img_size, split, flag='encode SRC', latents=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise UsageError(f"encode SRC {src!r}: holds no images")
    # the latent shape from one blank image: the VAE decides its channels and downsampling
    with torch.no_grad():
        C, h, w = vae.encode(torch.zeros(1, 3, img_size, img_size, device=device))[0].shape[1:]
    if norm == 'channel' and C != len(LATENT_NORMS['channel'][0]):
        raise UsageError("--norm channel: its statistics are for the 4 channels of sd-vae-ft-mse, "
                         f"but --vae {vae_name} has {C}; use --norm compute")
    settings = {'source': src if src in BUILTIN else os.path.abspath(src),
                'split': split if src in BUILTIN else None,
                'img_size': img_size, 'n': n, 'latent_shape': [C, h, w],
                'vae_fingerprint': _settings_fingerprint(out, vae, overwrite), 'chunk': chunk}
    # one encode at a time writes into OUT (rank 0 holds the lock for all ranks), taken before the
    # checks of what OUT holds, so that two encodes started together cannot both pass them
    lock = RunLock()
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        lock.acquire(os.path.join(out, ENCODE_LOCK), f'encode OUT {out}')
    try:
        # the ranks wait for each other at a few points, and a slow file listing or the last chunk
        # may take longer than NCCL's 10-minute timeout: they wait in a 12-hour gloo group
        group = (dist.new_group(backend='gloo', timeout=datetime.timedelta(hours=12)) if world > 1
                 else None)

        def sync():
            if group is not None:
                dist.barrier(group=group)

        # every rank, before anything is written: each fails with the message
        _check_out(out, settings, overwrite)
        sync()
        if rank == 0:
            _prepare_out(out, settings, overwrite, (n, 2, 2, C, h, w))
        sync()
        chunks = math.ceil(n / chunk)
        todo = [j for j in range(chunks) if not os.path.isfile(_marker(out, j))]
        sync()   # every rank has read the same marks before any rank adds one
        # the unfinished chunks, dealt round-robin: balanced after a resume too
        mine = todo[rank::world]
        lat = np.load(os.path.join(out, 'latents.npy'), mmap_mode='r+')
        lab = np.load(os.path.join(out, 'labels.npy'), mmap_mode='r+')
        bounds = {j: (j * chunk, min(n, (j + 1) * chunk)) for j in mine}
        # batches never cross a chunk's end
        batches = [list(range(s, min(s + batch_size, bounds[j][1]))) for j in mine
                   for s in range(bounds[j][0], bounds[j][1], batch_size)]
        loader = DataLoader(_Readable(ds), batch_sampler=batches, collate_fn=_encode_collate,
                            num_workers=workers, pin_memory=device.type == 'cuda')
        total = sum(end - start for start, end in bounds.values())
        if rank == 0:
            print(f"encoding {n} images of {img_size}x{img_size} from {src} into {out}: "
                  f"latents {C}x{h}x{w}, {chunks - len(todo)} of {chunks} chunks done before, "
                  f"{len(todo)} to do by {world} rank(s)", flush=True)
        progress = Progress(total, 'encoded' + (f' (rank 0 of {world})' if world > 1 else ''),
                            enabled=rank == 0)
        done, bad, sums = 0, [], np.zeros((3, C))
        with torch.no_grad():
            for idx, x, y, readable in loader:
                x = x.to(device, non_blocking=True).float() / 127.5 - 1   # as the Loader's pixels
                mean, std = vae.encode(x)
                # the mirror image's own posterior, not the mirrored latent
                fmean, fstd = vae.encode(x.flip(-1))
                moments = (torch.stack([torch.stack([mean, std], 1),
                                        torch.stack([fmean, fstd], 1)], 1).float().cpu().numpy())
                if moments.shape[1:] != (2, 2, C, h, w):
                    raise UsageError(f"--vae {vae_name}: encoded {tuple(mean.shape)} and "
                                     f"{tuple(std.shape)} from {tuple(x.shape)}, expected "
                                     f"({len(x)}, {C}, {h}, {w}) each")
                i0, i1 = int(idx[0]), int(idx[-1]) + 1
                lat[i0:i1], lab[i0:i1] = moments, y.numpy()
                bad += idx[~readable].tolist()
                # per-channel sums for --norm compute, over images, mirror images, positions
                m64 = moments.astype(np.float64)
                sums += np.stack([m64[:, :, 0].sum((0, 1, 3, 4)),
                                  (m64[:, :, 0] ** 2).sum((0, 1, 3, 4)),
                                  (m64[:, :, 1] ** 2).sum((0, 1, 3, 4))])
                j = i0 // chunk
                if i1 == bounds[j][1]:   # the chunk is whole: on disk first, then marked done
                    lat.flush()
                    lab.flush()
                    mark = {'chunk': j, 'unreadable': bad, 'sum_mean': sums[0].tolist(),
                            'sum_mean_sq': sums[1].tolist(), 'sum_std_sq': sums[2].tolist()}
                    atomic_write(_marker(out, j), lambda f: f.write(json.dumps(mark).encode()))
                    bad, sums = [], np.zeros((3, C))
                done += i1 - i0
                progress.update(done)
        del lat, lab
        sync()   # every chunk is marked
        if rank == 0:
            _finish(out, ds, src, split, n, img_size, [C, h, w], norm,
                    vae_name, vae.fingerprint, chunks)
        if group is not None:
            dist.destroy_process_group(group)
    finally:
        lock.release()


def _finish(out, ds, src, split, n, img_size, latent_shape, norm,
            vae_name, fingerprint, chunks) -> None:
    """Rank 0, once every chunk is marked:
    the normalisation, meta.json (atomically, last), then the bookkeeping."""
    marks = []
    for j in range(chunks):
        if not os.path.isfile(_marker(out, j)):
            raise UsageError(f"encode OUT {out}: chunk {j} was not finished by any rank; "
                             "rerun the same command")
        with open(_marker(out, j)) as f:
            marks.append(json.load(f))
    C, h, w = latent_shape
    if norm == 'compute':
        # posterior samples mean + std * eps: E[x] = E[mean], Var[x] = E[mean^2] + E[std^2] - E[x]^2
        avg = np.array([[mark['sum_mean'], mark['sum_mean_sq'], mark['sum_std_sq']]
                        for mark in marks])
        avg = avg.sum(0) / (n * 2 * h * w)   # E[mean], E[mean^2], E[std^2] per channel
        mean, std = avg[0].tolist(), np.sqrt(avg[1] + avg[2] - avg[0] ** 2).tolist()
    else:
        mean, std = LATENT_NORMS[norm]
        mean, std = (mean * C, std * C) if len(mean) == 1 else (mean, std)
    bad = [i for mark in marks for i in mark['unreadable']]
    meta = {'format': 'latents', 'version': 1, 'n': n, 'img_size': img_size,
            'latent_shape': latent_shape, 'num_classes': int(ds.num_classes), 'source': src,
            **({'split': split} if src in BUILTIN else {}),
            'vae': {'name': vae_name, 'fingerprint': fingerprint},
            'norm': {'kind': norm, 'mean': mean, 'std': std}, 'unreadable': len(bad)}
    atomic_write(os.path.join(out, 'meta.json'),
                 lambda f: f.write((json.dumps(meta, indent=1) + '\n').encode()))
    os.remove(os.path.join(out, 'progress.json'))
    shutil.rmtree(os.path.join(out, 'done'))
    print(f"encoded {n} images of {img_size}x{img_size} from {src} into {out}: "
          f"latents {C}x{h}x{w}, norm {norm}; {len(bad)} unreadable"
          + (" (each replaced by the next readable file)" if bad else ""), flush=True)
    for i in bad:
        print(f"  unreadable: {ds.files[i]}")


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    check = sub.add_parser('check', help='load a VAE: its config, parameters and fingerprint; '
                           'optionally round-trip an image', formatter_class=HelpFormatter)
    check.add_argument('path', help='weight file (.safetensors, .bin, .pt) or diffusers folder')
    check.add_argument('--image', default=None,
                       help='round-trip this image (cropped to a multiple of 8), print the PSNR '
                       "(sd-vae-ft-mse's model card: 24.5 +/- 3.7 dB on COCO 2017 val at 256x256)")
    check.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    enc = sub.add_parser('encode', help='encode images and their mirror images once into VAE '
                         'posterior moments (a latent set to train on); under torchrun the ranks '
                         'share the work; a rerun resumes', formatter_class=HelpFormatter)
    enc.add_argument('src', help='image folder in ImageNet layout SRC/<class>/<image>, '
                     "a .npz/.npy array file, or 'digits'")
    enc.add_argument('out', help='output folder: latents.npy (N, 2, 2, C, h, w) = '
                     '[image, mirror image] x [mean, std], labels.npy, meta.json '
                     '(written last: the set is complete)')
    enc.add_argument('--vae', required=True,
                     help='VAE weights (e.g. sd-vae-ft-mse), read by load_vae')
    enc.add_argument('--img_size', type=int, default=256,
                     help='centre-crop side in pixels, a multiple of 8')
    enc.add_argument('--batch_size', type=int, default=64, help='images per VAE call on each rank '
                     '(their mirror images go in a second call)')
    enc.add_argument('--norm', choices=['channel', 'sd', 'compute'], default='channel',
                     help="per-channel normalisation recorded in meta.json: "
                     "'channel' = BiFlow's statistics of sd-vae-ft-mse, "
                     "'sd' = Stable Diffusion's scale 0.18215, 'compute' = measured on this set")
    enc.add_argument('--limit', type=int, default=None, help='encode only the first LIMIT images')
    enc.add_argument('--split', default='train', help="with SRC 'digits': 'train' or 'val'")
    enc.add_argument('--chunk', type=int, default=ENCODE_CHUNK, help='images per unit of work '
                     '(flushed and marked done together); a resume needs the same value')
    enc.add_argument('--workers', type=int, default=4,
                     help='decoding processes per rank (0 = in the rank itself)')
    enc.add_argument('--overwrite', action='store_true',
                     help='replace a complete or unfinished latent set in OUT')
    enc.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cuda' or 'cpu'")
    args = p.parse_args(argv)
    if args.cmd == 'check':
        check_vae(args.path, args.image, args.device)
    else:
        encode_main(p, args)


def check_vae(path, image, device):
    """Print a VAE's config, parameter counts and fingerprints;
    with an image, its round-trip PSNR."""
    vae = load_vae(path, device, flag='path')
    count = {part: sum(t.numel() for t in getattr(vae, part).parameters())
             for part in ('encoder', 'decoder')}
    full, weights = vae._fingerprints()
    print(f'{vae.cfg}\nencoder {count["encoder"] / 1e6:.2f}M, '
          f'decoder {count["decoder"] / 1e6:.2f}M parameters; fingerprint {full} '
          f'(of the weights alone, as older versions recorded it: {weights})')
    if image:
        down = 2 ** (len(vae.cfg.block_out_channels) - 1)  # the downsampling factor, 8
        img = np.array(Image.open(image).convert('RGB'))  # (H, W, 3) uint8, writable
        img = img[:img.shape[0] // down * down, :img.shape[1] // down * down]
        # (1, 3, H, W) in [-1, 1]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
        with torch.no_grad():
            y = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).mean().item()  # on [0, 1]
        print(f'{image} {tuple(x.shape[2:])}: '
              f'PSNR of decode(mean) {10 * math.log10(1 / mse):.2f} dB')


def encode_main(p, a):
    """`vae.py encode`: check the flags and OUT before the VAE loads, then encode on every rank."""
    if a.img_size <= 0 or a.img_size % 8:
        p.error(f'--img_size {a.img_size}: must be a positive multiple of 8 '
                '(the VAE downsamples by 8)')
    for flag, v, low in (('--batch_size', a.batch_size, 1), ('--limit', a.limit, 1),
                         ('--chunk', a.chunk, 1), ('--workers', a.workers, 0)):
        if v is not None and v < low:
            p.error(f'{flag} {v}: must be an integer >= {low}')
    rank, world, device = setup_distributed(a.device)
    # fp32 throughout: cuDNN would otherwise run the convolutions in TF32
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _check_out(a.out, None, a.overwrite)   # before the VAE is loaded: a refusal comes at once
    encode(a.src, a.out, load_vae(a.vae, device), a.img_size, a.batch_size, a.norm, a.limit,
           a.overwrite, a.split, a.chunk, a.workers, os.path.basename(os.path.normpath(a.vae)),
           rank, world, device)
    if world > 1:
        # a clean exit: torchrun reports a rank that leaves the group open
        dist.destroy_process_group()


if __name__ == '__main__':
    run_cli(main)
