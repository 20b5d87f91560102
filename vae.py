"""
The Stable Diffusion VAE (AutoencoderKL f8c4) in plain PyTorch: BiFlow's latent models flow in its 4-channel
latents, and its frozen decoder turns their samples into images. Weights come from a local file, as released:

    python vae.py diffusion_pytorch_model.safetensors        # check a download: config, parameters, fingerprint
    python vae.py sd-vae-ft-mse/ --image cat.png              # a diffusers folder; round-trip an image, print PSNR

From Python: `vae = load_vae(path, device)`; `mean, std = vae.encode(x)`; `x = vae.decode(z)`. z is the unscaled
latent (multiplying it by SD's 0.18215 is the caller's business). State-dict keys are diffusers' current
AutoencoderKL names; older uploads (attention `query/key/value/proj_attn`, 1x1-conv weights) are renamed on load.
"""
import argparse
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode


VAE_HINT = ('download the SD VAE, e.g. https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/'
            'diffusion_pytorch_model.safetensors (or the same file from stabilityai/sd-vae-ft-ema)')


@dataclass(frozen=True)
class VAEConfig:
    """The released sd-vae-ft-mse / sd-vae-ft-ema config; the image is downsampled 2**(len(block_out_channels)-1)x."""
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
    return nn.GroupNorm(groups, c, eps=1e-6)  # every norm of the SD VAE uses 1e-6, not PyTorch's 1e-5


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv where the width changes)."""
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # (B,cin,H,W) -> (B,cout,H,W)
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual (the mid block's only attention)."""
    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = _norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' key to_out.0 (its index 1 is a weightless Dropout)

    def forward(self, x):  # (B,C,H,W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B,HW,C)
        q, k, v = (f(h)[:, None] for f in (self.to_q, self.to_k, self.to_v))  # (B,1,HW,C): one head of width C
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(q k^T / sqrt(C)) v, (B,HW,C)
        return x + self.to_out[0](o).transpose(1, 2).reshape(B, C, H, W)


class Block(nn.Module):
    """An encoder down block or a decoder up block: `n` ResnetBlocks, then a x2 resampler (none on the last block).
    Down: pad right and bottom by one, 3x3 conv stride 2 (the original LDM code's asymmetric padding). Up: nearest
    x2, 3x3 conv."""
    def __init__(self, cin, cout, n, groups, resample=None):  # resample: 'down', 'up' or None
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n)])
        self.resample = resample
        if resample:  # diffusers' keys down_blocks.{i}.downsamplers.0.conv, up_blocks.{i}.upsamplers.0.conv
            conv = nn.Conv2d(cout, cout, 3, stride=2) if resample == 'down' else nn.Conv2d(cout, cout, 3, padding=1)
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
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):  # (B,3,H,W) -> (B,2L,H/8,W/8)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)  # widest first
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
    """AutoencoderKL. Build it with load_vae; a bare VAE(cfg) has random weights (benchmarks, tests)."""
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
        """x (B,3,H,W) in [-1,1] -> posterior (mean, std), each (B,L,H/8,W/8), in the weights' dtype (fp32) even
        under autocast: latents are computed once per dataset, and every later stage inherits their precision."""
        with torch.autocast(x.device.type, enabled=False):
            mean, logvar = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype))).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp of LDM's DiagonalGaussianDistribution

    def decode(self, z):
        """z (B,L,h,w) unscaled latent -> image (B,3,8h,8w), roughly [-1,1], unclipped. Differentiable in z (the
        stage-2 losses go through it); it runs in the caller's autocast (bf16 is fine, fp16 can overflow)."""
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
            for h in (full, weights):
                h.update(f'{k}{tuple(v.shape)}'.encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
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
    """FLOPs (2 per multiply-add) of decoding one latent_hw x latent_hw latent, counted by FlopCounterMode on the
    meta device (free at any size): convs and matmuls; norms, SiLU and resampling are not counted."""
    with torch.device('meta'):
        vae = VAE(cfg)
        z = torch.zeros(1, cfg.latent_channels, latent_hw, latent_hw)
    with FlopCounterMode(display=False) as fc:
        vae.decode(z)
    return fc.get_total_flops()


# -----------------------------------------------------------------------------
# Loading

_SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                       'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                       'U8': torch.uint8, 'BOOL': torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: CPU tensor}: u64 little-endian header size, JSON header, then raw
    little-endian bytes at each tensor's data_offsets (counted from the end of the header)."""
    size = os.path.getsize(path)
    try:
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            if size < 8 or 8 + n > size:
                raise ValueError(f'header of {n} bytes in a {size}-byte file')
            header = json.loads(f.read(n))
            out = {}
            for name, info in header.items():
                if name == '__metadata__':
                    continue
                dtype, shape, (start, end) = _SAFETENSORS_DTYPES[info['dtype']], info['shape'], info['data_offsets']
                nbytes = math.prod(shape) * dtype.itemsize
                if min(shape, default=0) < 0 or end - start != nbytes or start < 0 or 8 + n + end > size:
                    raise ValueError(f'{name}: data_offsets {start, end} do not hold {shape} {info["dtype"]}')
                f.seek(8 + n + start)
                raw = bytearray(f.read(nbytes))  # a fresh, writable, aligned buffer per tensor
                out[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f'{path}: not a valid safetensors file, truncated or corrupt ({e})') from e
    return out


_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def convert_state_dict(sd):
    """diffusers' current names from either attention naming; 1x1-conv (4-D) attention weights reshaped to Linear's."""
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
    """VAEConfig from tensor shapes (norm_num_groups cannot be seen in them: the default 32); None if not a VAE."""
    def shape(k):
        return tuple(sd[k].shape) if isinstance(sd.get(k), torch.Tensor) else None
    ch = []
    while shape(f'encoder.down_blocks.{len(ch)}.resnets.0.conv1.weight'):
        ch.append(shape(f'encoder.down_blocks.{len(ch)}.resnets.0.conv1.weight')[0])
    layers = sum(1 for k in sd if k.startswith('encoder.down_blocks.0.resnets.') and k.endswith('.conv1.weight'))
    ends = shape('encoder.conv_in.weight'), shape('decoder.conv_out.weight'), shape('post_quant_conv.weight')
    if not ch or None in ends:
        return None
    return VAEConfig(ends[0][1], ends[1][0], ends[2][0], tuple(ch), layers)


def _torch_file(path, flag):
    """A .bin/.pt state dict, loaded safely (weights_only: a file can never run code). vae.py imports nothing of the
    project (data.py imports it to encode), so this is its own small copy of data.read_torch_file."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'{flag} {path}: not a loadable torch file ({type(e).__name__})') from e


def load_vae(path, device='cpu', flag='--vae'):
    """A frozen fp32 VAE in eval mode from a weight file (.safetensors, or .bin/.pt/.pth) or a diffusers folder
    (config.json + diffusion_pytorch_model.safetensors/.bin, here or in vae/)."""
    weights = config = None
    if os.path.isdir(path):
        for d in (path, os.path.join(path, 'vae')):
            for name in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'):
                if weights is None and os.path.isfile(os.path.join(d, name)):
                    weights, config = os.path.join(d, name), os.path.join(d, 'config.json')
        if weights is None:
            raise FileNotFoundError(f'{flag} {path}: a folder without diffusion_pytorch_model.safetensors or .bin '
                                    f'(nor in vae/); {VAE_HINT}')
    elif os.path.isfile(path):  # a file under diffusers' name: the config.json beside it describes it
        weights = path
        if os.path.basename(path).startswith('diffusion_pytorch_model.'):
            config = os.path.join(os.path.dirname(path), 'config.json')
    else:
        raise FileNotFoundError(f'{flag} {path}: no such file or folder; {VAE_HINT}')
    sd = read_safetensors(weights) if weights.endswith('.safetensors') else _torch_file(weights, flag)
    if not isinstance(sd, dict):
        raise ValueError(f'{flag} {weights}: holds a {type(sd).__name__}, not a state dict of the SD VAE')
    sd = convert_state_dict(sd)
    # the config from the shapes (not a VAE: the default, so the error lists what is missing)
    cfg = config_from_state_dict(sd) or VAEConfig()
    # a folder's config.json is authoritative (norm_num_groups is only there), field by field
    if config and os.path.isfile(config):
        try:
            with open(config) as f:
                c = json.load(f)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f'{flag} {config}: not a diffusers config.json, not JSON ({e})') from e
        if not isinstance(c, dict):
            raise ValueError(f'{flag} {config}: not a diffusers config.json, which is a JSON '
                             f'object, but a {type(c).__name__}')
        problem = config_problem(c)
        if problem:
            raise ValueError(f'{flag} {config}: {problem}')
        # a field it lacks keeps the value that the weights' shapes imply
        names = {f.name for f in fields(VAEConfig)}
        cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                              for k, v in c.items() if k in names})
        problem = config_problem(asdict(cfg))  # its groups against a width from the shapes
        if problem:
            raise ValueError(f'{flag} {config}: {problem}')
    try:
        with torch.device('meta'):  # no random init of weights that are replaced at once
            vae = VAE(cfg)
    except ValueError as e:  # e.g. widths that the default 32 groups do not divide, no config.json
        raise ValueError(f'{flag} {weights}: cannot build an SD VAE of {cfg}: {e}; a diffusers '
                         'config.json beside the weights sets norm_num_groups') from e
    want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in sd.items()}
    problems = [(what, sorted(keys)) for what, keys in [
        ('missing', want.keys() - got.keys()), ('unexpected', got.keys() - want.keys()),
        ('mis-shaped', [f'{k} {got[k]} (want {want[k]})' for k in want.keys() & got.keys() if got[k] != want[k]])] if keys]
    if problems:
        raise ValueError(f'{flag} {weights}: not an SD VAE (AutoencoderKL) of {cfg}: ' + '; '.join(
            f'{len(keys)} {what} keys, e.g. {", ".join(keys[:4])}' for what, keys in problems))
    vae.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()}, assign=True)
    return vae.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('path', help='weight file (.safetensors, .bin, .pt) or diffusers folder')
    p.add_argument('--image', default=None, help='round-trip this image (cropped to a multiple of 8), print the PSNR '
                   "(sd-vae-ft-mse's model card: 24.5 +/- 3.7 dB on COCO 2017 val at 256x256)")
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    args = p.parse_args(argv)
    try:
        vae = load_vae(args.path, args.device, flag='path')
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    count = {part: sum(t.numel() for t in getattr(vae, part).parameters()) for part in ('encoder', 'decoder')}
    full, weights = vae._fingerprints()
    print(f'{vae.cfg}\nencoder {count["encoder"] / 1e6:.2f}M, '
          f'decoder {count["decoder"] / 1e6:.2f}M parameters; fingerprint {full} '
          f'(of the weights alone, as older versions recorded it: {weights})')
    if args.image:
        f = 2 ** (len(vae.cfg.block_out_channels) - 1)  # the downsampling factor, 8
        img = np.array(Image.open(args.image).convert('RGB'))  # (H,W,3) uint8, writable
        img = img[:img.shape[0] // f * f, :img.shape[1] // f * f]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(args.device)  # (1,3,H,W)
        with torch.no_grad():
            y = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).mean().item()  # on [0,1]
        print(f'{args.image} {tuple(x.shape[2:])}: PSNR of decode(mean) {10 * math.log10(1 / mse):.2f} dB')


if __name__ == '__main__':
    main()
