"""
The Stable Diffusion VAE (AutoencoderKL f8c4) in plain PyTorch, and the encoding of a dataset
into its latents once. BiFlow's latent models flow in its 4-channel latents; its frozen decoder
turns their samples into images. Weights come from a local file, as Stability released them.

    python vae.py check sd-vae-ft-mse.safetensors --image cat.png   # config, fingerprint, PSNR
    python vae.py check sd-vae-ft-mse/                              # a diffusers folder
    torchrun --nproc_per_node=8 vae.py encode /path/to/imagenet/train in256_latents \\
        --vae sd-vae-ft-mse.safetensors --img_size 256             # a rerun resumes

From Python: `vae = load_vae(path, device)`; `mean, std = vae.encode(x)`; `x = vae.decode(z)`,
z the unscaled latent. State-dict keys are diffusers' AutoencoderKL names; older uploads (attention
`query/key/value/proj_attn`, 1x1-conv weights) are renamed on load. `encode` writes a latent set
(data.LatentDataset reads it): each image's and its mirror image's posterior mean and std.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from data import (BUILTIN, HelpFormatter, Progress, UsageError, atomic_write, center_crop,
                  check_flags, check_writable, open_source, read_torch_file, run_cli,
                  setup_distributed)

VAE_HINT = ('download the SD VAE, e.g. https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/'
            'main/diffusion_pytorch_model.safetensors (or that of stabilityai/sd-vae-ft-ema)')


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


class MidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


def _resampler(c, up):
    """x2 up: nearest, 3x3 conv. x2 down: pad right and bottom by one, 3x3 conv stride 2 (the
    original LDM code's asymmetric padding). In a Sequential of one: diffusers' keys
    {up,down}samplers.0.conv."""
    scale = nn.Upsample(scale_factor=2.0, mode='nearest') if up else nn.ZeroPad2d((0, 1, 0, 1))
    conv = nn.Conv2d(c, c, 3, padding=1) if up else nn.Conv2d(c, c, 3, stride=2)
    return nn.Sequential(nn.Sequential(OrderedDict(scale=scale, conv=conv)))


def _blocks(ch, n, groups, up):
    """The encoder's down blocks or the decoder's up blocks, of widths ch: each n ResnetBlocks,
    then a x2 resampler (none after the last)."""
    blocks = []
    for i, c in enumerate(ch):
        layers = OrderedDict(resnets=nn.Sequential(
            *[ResnetBlock(ch[max(i - 1, 0)] if j == 0 else c, c, groups) for j in range(n)]))
        if i < len(ch) - 1:
            layers['upsamplers' if up else 'downsamplers'] = _resampler(c, up)
        blocks.append(nn.Sequential(layers))
    return nn.Sequential(*blocks)


def encoder(cfg):
    """(B,3,H,W) image -> (B,2L,H/8,W/8) posterior mean and log-variance."""
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    return nn.Sequential(OrderedDict(
        conv_in=nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1),
        down_blocks=_blocks(ch, cfg.layers_per_block, g, up=False),
        mid_block=MidBlock(ch[-1], g), conv_norm_out=_norm(ch[-1], g), silu=nn.SiLU(),
        conv_out=nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)))


def decoder(cfg):
    """(B,L,h,w) latent -> (B,3,8h,8w) image: the widest block first, one more ResnetBlock each."""
    ch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
    return nn.Sequential(OrderedDict(
        conv_in=nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1), mid_block=MidBlock(ch[0], g),
        up_blocks=_blocks(ch, cfg.layers_per_block + 1, g, up=True),
        conv_norm_out=_norm(ch[-1], g), silu=nn.SiLU(),
        conv_out=nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)))


class VAE(nn.Module):
    """AutoencoderKL. Build it with load_vae; a bare VAE(cfg) has random weights."""
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        # widths as a tuple: equal configs compare (and fingerprint) equal
        self.cfg = cfg = replace(cfg, block_out_channels=tuple(cfg.block_out_channels))
        self.encoder, self.decoder = encoder(cfg), decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x):
        """x (B,3,H,W) in [-1,1] -> posterior (mean, std), each (B,L,H/8,W/8), in fp32 even under
        autocast: latents are computed once, and every later stage inherits their precision."""
        with torch.autocast(x.device.type, enabled=False):
            moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))
            mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))   # LDM's clamp

    def decode(self, z):
        """z (B,L,h,w) unscaled latent -> image (B,3,8h,8w), roughly [-1,1], unclipped.
        Differentiable in z (stage 2's perceptual terms go through it); runs in the caller's
        autocast (bf16 is fine, fp16 can overflow)."""
        return self.decoder(self.post_quant_conv(z))

    @property
    def fingerprint(self):
        """Which network made a latent: 12 hex digits of blake2b over the config (groups change
        the function, no shape) and every weight's name, shape and fp32 bytes. Hashed at each read
        (about 1 s for the SD VAE on CPU), so it never describes weights changed since."""
        h = hashlib.blake2b(json.dumps(asdict(self.cfg), sort_keys=True).encode(), digest_size=6)
        for k, v in sorted(self.state_dict().items()):
            h.update(f'{k}{tuple(v.shape)}'.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


# -----------------------------------------------------------------------------
# Loading

_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
    'U8': torch.uint8, 'BOOL': torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: CPU tensor}: u64 little-endian header size, JSON header, then
    raw little-endian bytes at each tensor's data_offsets (counted from the end of the header)."""
    blob = pathlib.Path(path).read_bytes()
    n = int.from_bytes(blob[:8], 'little')
    body, out = memoryview(blob)[8 + n:], {}
    try:
        for name, info in json.loads(blob[8:8 + n]).items():
            if name != '__metadata__':
                dtype, (start, end) = _SAFETENSORS_DTYPES[info['dtype']], info['data_offsets']
                raw = bytearray(body[start:end])   # a fresh, writable, aligned buffer
                out[name] = (torch.frombuffer(raw, dtype=dtype) if raw
                             else torch.empty(0, dtype=dtype)).reshape(info['shape'])
    # a truncated or corrupt file: bad JSON (a ValueError), a bad entry, or too few bytes
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f'{path}: not a valid safetensors file, truncated or corrupt ({e})') from e
    return out


_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def convert_state_dict(sd):
    """diffusers' current names from either attention naming;
    1x1-conv (4-D) attention weights reshaped to Linear's."""
    out = {}
    for k, v in sd.items():
        if '.attentions.' in k:   # old names; (C,C,1,1) 1x1-conv weights -> (C,C)
            for old, new in _OLD_ATTENTION.items():
                k = k.replace(f'.{old}.', f'.{new}.')
            v = v.flatten(1) if isinstance(v, torch.Tensor) and v.ndim == 4 else v
        out[k] = v
    return out


def config_from_state_dict(sd):
    """VAEConfig from tensor shapes (norm_num_groups cannot be seen in them: the default 32);
    None if not a VAE."""
    def shape(layer):   # its weight's, None if absent
        w = sd.get(f'{layer}.weight')
        return tuple(w.shape) if isinstance(w, torch.Tensor) else None
    ch = []   # the width of each down block: its first conv's output channels
    while shape(f'encoder.down_blocks.{len(ch)}.resnets.0.conv1'):
        ch.append(shape(f'encoder.down_blocks.{len(ch)}.resnets.0.conv1')[0])
    layers = sum(k.startswith('encoder.down_blocks.0.resnets.') and k.endswith('.conv1.weight')
                 for k in sd)
    ends = [shape(k) for k in ('encoder.conv_in', 'decoder.conv_out', 'post_quant_conv')]
    if ch and None not in ends:
        return VAEConfig(ends[0][1], ends[1][0], ends[2][0], tuple(ch), layers)


def _find_weights(path, flag):
    """(weight file, its diffusers config.json or None) of a file or a diffusers folder."""
    if os.path.isdir(path):   # diffusers' names, in the folder or in its vae/
        path = next((f for f in (os.path.join(path, d, f'diffusion_pytorch_model.{e}')
                                 for d in ('', 'vae') for e in ('safetensors', 'bin'))
                     if os.path.isfile(f)), path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{flag} {path}: no such file or folder, or a folder without '
                                'diffusion_pytorch_model.safetensors or .bin (nor in vae/); '
                                + VAE_HINT)
    # a file under diffusers' name: the config.json beside it describes it
    config = os.path.join(os.path.dirname(path), 'config.json')
    named = os.path.basename(path).startswith('diffusion_pytorch_model.')
    return path, config if named and os.path.isfile(config) else None


def load_vae(path, device='cpu', flag='--vae'):
    """A frozen fp32 VAE in eval mode from a weight file (.safetensors, or .bin/.pt/.pth) or a
    diffusers folder (config.json + diffusion_pytorch_model.safetensors/.bin, here or in vae/)."""
    weights, config = _find_weights(path, flag)
    sd = (read_safetensors(weights) if weights.endswith('.safetensors')
          else read_torch_file(weights, flag))
    # anything but a dict is no state dict: the key check below lists what it lacks
    sd, given = convert_state_dict(sd if isinstance(sd, dict) else {}), {}
    if config:   # config.json is authoritative (norm_num_groups is only there)
        try:   # not JSON, not UTF-8 (ValueErrors), or not an object (dict() raises)
            given = dict(json.loads(pathlib.Path(config).read_text()))
        except (ValueError, TypeError) as e:
            raise UsageError(f'{flag} {config}: not a diffusers config.json, a JSON object '
                             f'({e})') from e
    # a field that config.json lacks keeps the value the shapes imply (not a VAE: the default
    # config, so that the key check below lists what is missing)
    cfg = replace(config_from_state_dict(sd) or VAEConfig(),
                  **{f.name: given[f.name] for f in fields(VAEConfig) if f.name in given})
    # one check serves every value that no network can be built of (groups that do not divide a
    # width, a negative count, a string, ...); a network that builds must then fit the weights
    try:
        with torch.device('meta'):   # no random init of weights that are replaced at once
            vae = VAE(cfg)
    except (TypeError, ValueError, IndexError, RuntimeError, ZeroDivisionError) as e:
        raise UsageError(f'{flag} {config or weights}: cannot build an SD VAE of {cfg} ({e}); '
                         'a diffusers config.json beside the weights sets its config') from e
    want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
           for k, v in sd.items()}
    wrong = [f'{k} {got.get(k, "missing")} (want {want.get(k, "none")})'
             for k in sorted(want.keys() | got.keys()) if got.get(k) != want.get(k)]
    if wrong:
        raise UsageError(f'{flag} {weights}: not an SD VAE (AutoencoderKL) of {vae.cfg}: '
                         f'{len(wrong)} keys missing, unexpected or mis-shaped, e.g. '
                         + '; '.join(wrong[:4]))
    vae.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()},
                        assign=True)
    return vae.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# encode: a dataset's images, once, into a latent set (data.LatentDataset reads it)

# normalised latent = (latent - mean) / std, per channel; --norm compute measures them instead
LATENT_NORMS = {
    # BiFlow's group's per-channel statistics of sd-vae-ft-mse latents
    'channel': ([0.86488, -0.27787343, 0.21616915, 0.3738409],
                [4.85503674, 5.31922414, 3.93725398, 3.9870003]),
    # Stable Diffusion's single scale factor 0.18215 for every channel, no shift
    'sd': ([0.0], [1 / 0.18215]),
}
# images per shard: the unit of work that a rank writes and marks done, whatever the world size
ENCODE_CHUNK = 1024
# everything encode writes in OUT (and its temporary files, named after these)
LATENT_FILES = ('meta.json', 'progress.json', 'latents.npy', 'labels.npy', 'done')
# the flag that sets each recorded setting, for the refusal of a resume with other settings
_SETTING_FLAGS = {'source': 'SRC', 'split': '--split', 'img_size': '--img_size', 'n': 'SRC/--limit',
                  'latent_shape': '--vae', 'vae_fingerprint': '--vae', 'chunk': '--chunk'}


def _marker(out, j):
    """The mark that shard j is written, holding its sums for --norm compute."""
    return os.path.join(out, 'done', f'{j:06d}.json')


def _prepare_out(out, settings, overwrite, shape):
    """Rank 0, before any rank encodes: refuse an OUT that encode must not write into; then OUT
    with progress.json (the settings, first), the zero-filled latents.npy and labels.npy (each
    created whole under a temporary name) and done/."""
    os.makedirs(out, exist_ok=True)   # (main checked that it can)
    names = os.listdir(out)
    foreign = sorted(x for x in names if x not in LATENT_FILES
                     and not x.startswith(tuple(f + '.' for f in LATENT_FILES)))
    if foreign:
        raise UsageError(f'encode OUT {out}: holds {foreign[0]!r}, which is no part of a latent '
                         'set; give a new or empty folder')
    if 'meta.json' in names and not overwrite:
        raise FileExistsError(f'encode OUT {out}: already holds a complete latent set (meta.json); '
                              'pass --overwrite to re-encode it')
    if 'progress.json' in names and not overwrite:
        old = json.loads(pathlib.Path(out, 'progress.json').read_text())
        for k, v in settings.items():
            if old.get(k) != v:
                raise UsageError(f'encode OUT {out}: holds an unfinished encode made with {k} '
                                 f'{old.get(k)!r}, but this one has {k} {v!r} '
                                 f'({_SETTING_FLAGS[k]}); rerun with the first settings to resume '
                                 'it, or pass --overwrite to start over')
    # meta.json first, so a crash part-way leaves an unfinished set, never a complete-looking mix;
    # without --overwrite only the temporary files of a killed run go
    for name in sorted(names, key=lambda name: name != 'meta.json'):
        path = os.path.join(out, name)
        if overwrite or name not in LATENT_FILES:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not os.path.isfile(os.path.join(out, 'progress.json')):
        atomic_write(os.path.join(out, 'progress.json'),
                     lambda f: f.write(json.dumps(settings, indent=1).encode()))
    for name, dtype, shp in ('latents.npy', np.float32, shape), ('labels.npy', np.int64, shape[:1]):
        path = os.path.join(out, name)
        if not os.path.isfile(path):   # a memory map, sparse until written: ImageNet needs no RAM
            np.lib.format.open_memmap(f'{path}.tmp', 'w+', dtype, shp).flush()
            os.replace(f'{path}.tmp', path)
    os.makedirs(os.path.join(out, 'done'), exist_ok=True)


def encode(src, out, vae, img_size, batch_size=64, norm='channel', limit=None, overwrite=False,
           split='train', chunk=ENCODE_CHUNK, workers=0, vae_name='vae', rank=0, world=1,
           device=torch.device('cpu')):
    """Encode SRC's images (ADM centre crop) and their mirror images into the latent set OUT (see
    data.LatentDataset): vae.encode(x in [-1, 1], (B, 3, H, W)) -> (mean, std), each (B, C, h, w).
    Shard j holds images [j * chunk, (j + 1) * chunk); rank r writes shards r, r + world, ... and
    marks each done once flushed (OUT/done/<j>.json, atomically). A rerun of the same command
    skips the marked shards; rank 0 writes meta.json, atomically and last, once all are done."""
    ds = open_source(src, img_size, split, flag='encode SRC', latents=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise UsageError(f'encode SRC {src!r}: holds no images')
    with torch.no_grad():   # the latent shape, from one blank image
        C, h, w = vae.encode(torch.zeros(1, 3, img_size, img_size, device=device))[0].shape[1:]
    if norm == 'channel' and C != len(LATENT_NORMS['channel'][0]):
        raise UsageError('--norm channel: its statistics are for the 4 channels of sd-vae-ft-mse, '
                         f'but --vae {vae_name} has {C}; use --norm compute')
    settings = {'source': src if src in BUILTIN else os.path.abspath(src),
                'split': split if src in BUILTIN else None, 'img_size': img_size, 'n': n,
                'latent_shape': [C, h, w], 'vae_fingerprint': vae.fingerprint, 'chunk': chunk}
    # the ranks wait for each other in a 12-hour gloo group: the last shards of a resumed encode
    # may take longer than NCCL's 10-minute timeout
    group = world > 1 and dist.new_group(backend='gloo', timeout=datetime.timedelta(hours=12))
    shards = math.ceil(n / chunk)
    if rank == 0:
        _prepare_out(out, settings, overwrite, (n, 2, 2, C, h, w))
        left = sum(not os.path.isfile(_marker(out, j)) for j in range(shards))
        print(f'encoding {n} images of {img_size}x{img_size} from {src} into {out}: latents '
              f'{C}x{h}x{w}, {shards - left} of {shards} shards done before, {left} to do by '
              f'{world} rank(s)', flush=True)
    if group:   # OUT is ready
        dist.barrier(group=group)
    mine = [j for j in range(rank, shards, world) if not os.path.isfile(_marker(out, j))]
    _encode_shards(ds, out, vae, mine, n, chunk, batch_size, workers, device,
                   Progress(sum(min(chunk, n - j * chunk) for j in mine),
                            'encoded' + (f' (rank 0 of {world})' if world > 1 else ''),
                            enabled=rank == 0))
    if group:   # every shard is marked
        dist.barrier(group=group)
    if rank == 0:
        _finish(out, ds, src, settings, norm, vae_name)


def _encode_shards(ds, out, vae, mine, n, chunk, batch_size, workers, device, progress):
    """Encode and write this rank's shards `mine`, marking each done once it is on disk."""
    lat = np.load(os.path.join(out, 'latents.npy'), mmap_mode='r+')   # (n, 2, 2, C, h, w)
    lab = np.load(os.path.join(out, 'labels.npy'), mmap_mode='r+')   # (n,)
    ends = {j: min(n, (j + 1) * chunk) for j in mine}
    batches = [list(range(s, min(s + batch_size, ends[j])))   # never across a shard's end
               for j in mine for s in range(j * chunk, ends[j], batch_size)]
    # an unreadable file: ImageFolder warns, naming it, and serves the next readable one
    loader = DataLoader(ds, batch_sampler=batches, num_workers=workers,
                        pin_memory=device.type == 'cuda')
    done, sums = 0, 0
    with torch.no_grad():
        for idx, (x, y) in zip(batches, loader):
            x = x.to(device, non_blocking=True).float() / 127.5 - 1   # as the Loader's pixels
            # the mirror image's own posterior, not the mirrored latent: (B, 2, 2, C, h, w)
            moments = torch.stack([torch.stack(vae.encode(v), 1) for v in (x, x.flip(-1))], 1)
            i0, i1 = idx[0], idx[-1] + 1
            lat[i0:i1], lab[i0:i1] = moments.float().cpu().numpy(), y.numpy()
            # per-channel sums of mean, mean^2, std^2 over images, mirror images and positions
            m = moments.double().cpu().transpose(0, 2)   # (2 [mean, std], 2, B, C, h, w)
            sums = sums + torch.stack([m[0], m[0] ** 2, m[1] ** 2]).sum((1, 2, 4, 5))
            if i1 == ends[i0 // chunk]:   # the shard is whole: on disk first, then marked done
                lat.flush()
                lab.flush()
                mark = json.dumps(sums.tolist()).encode()
                atomic_write(_marker(out, i0 // chunk), lambda f: f.write(mark))
                sums = 0
            done += i1 - i0
            progress.update(done)


def _finish(out, ds, src, settings, norm, vae_name):
    """Rank 0, once every shard is marked: meta.json (atomically, last), then the bookkeeping."""
    n, img_size, (C, h, w) = settings['n'], settings['img_size'], settings['latent_shape']
    if norm == 'compute':
        # posterior samples mean + std * eps: E[x] = E[mean], Var[x] = E[mean^2] + E[std^2] - E[x]^2
        avg = np.sum([json.loads(pathlib.Path(_marker(out, j)).read_text())
                      for j in range(math.ceil(n / settings['chunk']))], 0) / (n * 2 * h * w)
        mean, std = avg[0].tolist(), np.sqrt(avg[1] + avg[2] - avg[0] ** 2).tolist()
    else:   # one value (sd) serves every channel
        mean, std = (v * (C // len(v)) for v in LATENT_NORMS[norm])
    meta = {'format': 'latents', 'version': 1, 'n': n, 'img_size': img_size,
            'latent_shape': [C, h, w], 'num_classes': int(ds.num_classes), 'source': src,
            **({'split': settings['split']} if src in BUILTIN else {}),
            'vae': {'name': vae_name, 'fingerprint': settings['vae_fingerprint']},
            'norm': {'kind': norm, 'mean': mean, 'std': std}}
    atomic_write(os.path.join(out, 'meta.json'),
                 lambda f: f.write((json.dumps(meta, indent=1) + '\n').encode()))
    os.remove(os.path.join(out, 'progress.json'))
    shutil.rmtree(os.path.join(out, 'done'))
    print(f'encoded {n} images of {img_size}x{img_size} from {src} into {out}: latents '
          f'{C}x{h}x{w}, norm {norm}', flush=True)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    check = sub.add_parser('check', formatter_class=HelpFormatter,
                           help='load a VAE: print its config, size and fingerprint')
    check.add_argument('path', help='weight file (.safetensors, .bin, .pt) or diffusers folder')
    check.add_argument('--image', help="round-trip this image's 256x256 centre crop on the CPU, "
                       "print the PSNR (sd-vae-ft-mse's model card: 24.5 +/- 3.7 dB on COCO)")
    enc = sub.add_parser('encode', formatter_class=HelpFormatter,
                         help='encode images and their mirror images once into a latent set; '
                         'under torchrun the ranks share the shards; a rerun resumes')
    enc.add_argument('src', help="image folder SRC/<class>/<image>, a .npz/.npy file, or 'digits'")
    enc.add_argument('out', help='output folder: latents.npy (N, 2, 2, C, h, w) = [image, mirror] '
                     'x [mean, std], labels.npy, meta.json (written last)')
    enc.add_argument('--vae', required=True, help='VAE weights, as `check` reads them')
    enc.add_argument('--img_size', type=int, default=256, help='centre-crop side, a multiple of 8')
    enc.add_argument('--batch_size', type=int, default=64, help='images per VAE call on each rank')
    enc.add_argument('--norm', choices=['channel', 'sd', 'compute'], default='channel',
                     help="the normalisation recorded: 'channel' = BiFlow's statistics of "
                     "sd-vae-ft-mse, 'sd' = the scale 0.18215, 'compute' = this set's")
    enc.add_argument('--limit', type=int, help='encode only the first LIMIT images')
    enc.add_argument('--split', default='train', help="with SRC 'digits': 'train' or 'val'")
    enc.add_argument('--chunk', type=int, default=ENCODE_CHUNK, help='images per shard')
    enc.add_argument('--workers', type=int, default=4, help='decoding processes per rank')
    enc.add_argument('--overwrite', action='store_true', help='replace a latent set in OUT')
    enc.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cuda' or 'cpu'")
    a = p.parse_args(argv)
    if a.cmd == 'check':
        return check_vae(a.path, a.image)
    check_flags(vars(a), {**dict.fromkeys(['batch_size', 'limit', 'chunk'], '[1, inf)'),
                          'workers': '[0, inf)'})   # and --device
    if a.img_size <= 0 or a.img_size % 8:
        raise UsageError(f'--img_size {a.img_size}: must be a positive multiple of 8 '
                         '(the VAE downsamples by 8)')
    rank, world, device = setup_distributed(a.device)
    check_writable(a.out, 'encode OUT', folder=True)   # before the VAE loads
    if device.type == 'cuda':   # fp32 throughout: cuDNN would run the convolutions in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    encode(a.src, a.out, load_vae(a.vae, device), a.img_size, a.batch_size, a.norm, a.limit,
           a.overwrite, a.split, a.chunk, a.workers, os.path.basename(os.path.normpath(a.vae)),
           rank, world, device)
    if world > 1:   # a clean exit: torchrun reports a rank that leaves the group open
        dist.destroy_process_group()


def check_vae(path, image):
    """Print a VAE's config, parameter counts and fingerprint; with an image, its PSNR."""
    vae = load_vae(path, flag='path')
    size = sum(p.numel() for p in vae.parameters()) / 1e6
    print(f'{vae.cfg}: {size:.2f}M parameters, fingerprint {vae.fingerprint}')
    if image:   # as encode crops it at --img_size 256; PSNR on [0, 1]
        x = torch.from_numpy(center_crop(Image.open(image).convert('RGB'), 256).copy())
        x = x.permute(2, 0, 1)[None].float() / 127.5 - 1   # (1, 3, 256, 256)
        with torch.no_grad():
            mse = ((vae.decode(vae.encode(x)[0]).clamp(-1, 1) - x) / 2).pow(2).mean().item()
        print(f'{image}: PSNR of decode(mean) {-10 * math.log10(mse):.2f} dB')


if __name__ == '__main__':
    run_cli(main)
