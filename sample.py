"""
Sample from a checkpoint of either stage (or a state dict saved by Apple's ml-tarflow): a PNG grid,
an ADM .npz, FID.

    python sample.py --ckpt out/forward.pt                 # TarFlow: exact inverse, CFG, denoising
    python sample.py --ckpt out/reverse.pt --guidance 2    # BiFlow: one pass, training-time CFG
    python sample.py --ckpt out/reverse.pt --guidance_mode inference --guidance 2   # CFG, 2-NFE
    torchrun --nproc_per_node=8 sample.py --ckpt out/reverse.pt --num_samples 50000 \\
        --npz samples.npz --fid VIRTUAL_imagenet64_labeled.npz   # FID-50K, labels uniformly random
    # training-free uses of the pair (F, G): inpainting and class editing
    python sample.py --ckpt out/reverse.pt --inpaint img.png --mask mask.png --labels 3
    python sample.py --ckpt out/reverse.pt --edit img.png --labels 3 --to_class 5
    python sample.py --ckpt in256/reverse.pt --vae sd-vae-ft-mse.safetensors   # latents, decoded

Sample i is drawn from noise seeded by (--seed, i) and, unless --labels is given, a label drawn
uniformly at random from a stream seeded by --seed: the output does not depend on the batch size or
on the number of ranks.
"""
import argparse
import math
import os
import re

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import fid
from data import (HelpFormatter, Progress, UsageError, atomic_write, center_crop, check_writable,
                  latent_norm, read_torch_file, run_cli, save_grid, setup_distributed)
from model import (JACOBI_TOL, FlowConfig, ParallelInverse, ReverseConfig, ReverseModel,
                   TarFlow, config_from_dict, edit, inpaint, load_ml_tarflow, unpatchify)
from vae import load_vae

# Sample i of --seed seed uses noise from the generator seeded by seed * 2**32 + i: one stream
# per (seed, index), never shared between seeds for i < 2**32. The random labels come from their
# own stream, seeded apart from every noise stream.
NOISE_SEEDS_PER_SEED = 2 ** 32
LABEL_SEED_OFFSET = 12345


def noise_seeds(seed, indices):
    """The generator seeds of the noise of global sample indices under --seed."""
    return [seed * NOISE_SEEDS_PER_SEED + int(i) for i in indices]


def ml_tarflow_sigma(path, noise_std=None, verbose=True):
    """The sigma an ml-tarflow state dict was trained with: --noise_std, else the last field of
    Apple's file names (afhq_model_8_768_8_8_0.07.pth, imagenet_model_4_1024_8_8_0.15.pth). Their
    dicts do not record it, and a wrong sigma silently weakens or overdoes Tweedie denoising, so
    there is no default."""
    # Apple's logs write the file as {dataset}_model_{P}_{Ch}_{T}_{K}_{sigma:.2f}.pth
    m = re.search(r'_(\d*\.\d+)\.pth?$', os.path.basename(path))
    named = float(m.group(1)) if m else None
    if noise_std is None and named is None:
        raise UsageError('ml-tarflow state dicts do not record the noise sigma they were trained '
                         'with and the file name does not end in it; pass --noise_std (Apple: AFHQ '
                         '0.07, ImageNet-128 0.15, ImageNet-64 0.05)')
    sigma = named if noise_std is None else noise_std
    if verbose:
        if named is not None and noise_std is not None and noise_std != named:
            print(f'note: --noise_std {noise_std} overrides the sigma {named} in the file name '
                  f'{os.path.basename(path)}')
        print(f'ml-tarflow state dict: sigma = {sigma} (from '
              f'{"the file name" if noise_std is None else "--noise_std"})')
    return sigma


class LatentDecoder(torch.nn.Module):
    """The models' space -> pixels for checkpoints trained on latents: undo the per-channel
    normalisation recorded with the latents (vae.py encode), then the frozen SD-VAE decoder.
    (B, C, h, w) -> (B, 3, 8h, 8w) in [-1, 1] (unclipped). Differentiable in its input: stage 2's
    perceptual terms see Dec(G's output)."""

    def __init__(self, vae, latent):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.img_size = latent['img_size']   # of the decoded images
        mean, std = latent_norm(latent)
        self.register_buffer('mean', mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', std.view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.vae.decode(x.float() * self.std + self.mean)


def latent_decoder(latent, path, device='cpu', what='the checkpoint'):
    """The LatentDecoder of latent metadata (a checkpoint's or a latent set's 'latent' entry) from
    the VAE file at path (--vae). The VAE must be the one the latents were encoded with:
    VAE.matches checks the recorded fingerprint (of config and weights; older files': of the
    weights, for 32 groups)."""
    want = latent['vae']
    if path is None:
        raise UsageError(f"{what} is trained on SD-VAE latents: pass --vae with the VAE they were "
                         f"encoded with ({want['name']}, fingerprint {want['fingerprint']}), a "
                         "weight file or a diffusers folder")
    vae = load_vae(path, device)   # a file that is no SD VAE is refused in one line
    if not vae.matches(want['fingerprint']):
        if want['fingerprint'] == vae.weights_fingerprint:   # an older file's, and not 32 groups
            raise UsageError(
                f"--vae {path}: has the weights {what}'s latents were encoded with "
                f"({want['name']}, weights-only fingerprint {want['fingerprint']}, as older "
                "versions recorded it), but that fingerprint vouches only for norm_num_groups 32 "
                f"and this VAE's config.json has {vae.cfg.norm_num_groups}; use the VAE with 32 "
                "groups, or re-encode the latents with this one")
        raise UsageError(
            f"--vae {path}: is not the VAE {what}'s latents were encoded with ({want['name']}, "
            f"fingerprint {want['fingerprint']}): its fingerprint of config and weights is "
            f"{vae.fingerprint}")
    return LatentDecoder(vae, latent).to(device)


def load_models(path, device='cpu', noise_std=None, verbose=True, vae=None):
    """-> (model, flow, decode): a TarFlow and None, or a BiFlow reverse model and its frozen
    TarFlow (EMA weights); decode is None for pixel models, the LatentDecoder of a latent checkpoint
    (which needs vae, the --vae path). noise_std overrides the sigma of a TarFlow; ml-tarflow state
    dicts need it unless their file name carries it."""
    ckpt = read_torch_file(path, '--ckpt')
    # sampling uses the EMA weights, as the papers do;
    # the raw weights are only for resuming training
    if isinstance(ckpt, dict) and ckpt.get('kind') == 'forward':
        model = TarFlow(config_from_dict(FlowConfig, ckpt['model_config']))
        model.load_state_dict(ckpt['ema'])
        flow = None
    elif isinstance(ckpt, dict) and ckpt.get('kind') == 'reverse':
        # G, plus the F it inverts (for score denoising, inpainting and editing)
        model = ReverseModel(config_from_dict(ReverseConfig, ckpt['model_config']))
        model.load_state_dict(ckpt['ema'])
        flow = TarFlow(config_from_dict(FlowConfig, ckpt['forward_config']))
        flow.load_state_dict(ckpt['forward'])
        flow.to(device).eval().requires_grad_(False)
    elif isinstance(ckpt, dict) and any(k.endswith('proj_in.weight') for k in ckpt):
        # a bare state dict: Apple's
        try:
            model, flow = load_ml_tarflow(ckpt, ml_tarflow_sigma(path, noise_std, verbose)), None
        except ValueError as e:
            raise UsageError(f'--ckpt {path}: {e}') from None
    else:
        raise UsageError(f'--ckpt {path}: neither a train.py checkpoint '
                         'nor an ml-tarflow state dict')
    # Tweedie denoising's step is sigma^2: it must be right
    if noise_std is not None and isinstance(model, TarFlow):
        model.cfg.noise_std = noise_std
    latent = ckpt.get('latent') if isinstance(ckpt, dict) else None
    decode = latent_decoder(latent, vae, device, f'--ckpt {path}') if latent else None
    # frozen: the score is a gradient w.r.t. the input only, and weights that need grad would make
    # its backward keep every Linear's input and compute weight gradients nobody reads
    return model.to(device).eval().requires_grad_(False), flow, decode


def noise_for(seeds, model, device):
    """z (B, N, d) for the given generator seeds, each sample from its own generator: the noise of
    sample i does not depend on the batch size or the number of ranks."""
    c = model.cfg
    return torch.stack([torch.randn(c.num_tokens, c.token_dim,
                                    generator=torch.Generator().manual_seed(seed))
                        for seed in seeds]).to(device)


@torch.no_grad()
def generate(model, flow, z, labels, guidance=0.0, guidance_mode='auto', ramp=False, attn_temp=1.0,
             denoise=True, kv_dtype=None, static=False, inverse=None, exact=False):
    """Decode noise tokens z (B, N, d) into images in [-1, 1] (unclipped).
    TarFlow: exact inverse, CFG on alpha and mu, optional Tweedie denoising. inverse: a
    model.ParallelInverse (Jacobi passes per flow), None for the sequential token loop. exact: for
    BiFlow, F's exact inverse instead of G's pass (from G's predictions when inverse.init is 'G').
    BiFlow: one pass conditioned on w (training-time CFG, 1-NFE) or Eq. 4
    inference-time CFG (2-NFE)."""
    if isinstance(model, TarFlow) or exact:
        flow, G = (model, None) if isinstance(model, TarFlow) else (flow, model)
        if inverse is None:   # N-1 sequential steps per block, then one backward pass for the score
            return flow.sample(labels, guidance=guidance, ramp=ramp, attn_temp=attn_temp,
                               denoise=denoise, z=z, kv_dtype=kv_dtype, static=static)
        x = inverse(flow, z, labels, guidance, ramp, attn_temp, G=G)
        return flow.denoise(x, labels) if denoise else x
    mode = model.cfg.guidance_mode if guidance_mode == 'auto' else guidance_mode
    if mode == 'train':   # w is an input of G: the guided sample in a single pass
        return model.decode(z, labels, torch.full((len(z),), float(guidance)), flow=flow)
    return model.decode(z, labels, inference_w=guidance, flow=flow)   # cond + null streams


def log_inverse(inverse, what):
    """Print the parallel inverse's strategy per flow (the planner's measurements with
    --segment auto) and the passes each flow took, mean and max over the samples, with the
    sequential fallbacks."""
    if inverse.plan is not None:
        for t, pl in enumerate(inverse.plan):
            tried = ', '.join(f'{"seq" if seg == 1 else seg}: {1e3 * sec:.1f} ms/' +
                              ('cut' if pl.passes[seg] is None else str(pl.passes[seg][1]))
                              for seg, sec in pl.seconds.items())
            choice = 'sequential' if pl.choice == 1 else f'segment {pl.choice}'
            print(f'inverse plan, flow {t}: {choice} (first batch; ms/max passes by segment '
                  f"length, 'cut' = stopped past 1.5x the best: {tried})")
    stats = inverse.passes_per_flow()
    print(f'inverse passes per flow ({what}; flow 0 next to the data): ' + ' | '.join(
        f'{t}: mean {mean:.1f} max {mx}' + (f', {fb} fell back' if fb else '')
        for t, (mean, mx, fb) in enumerate(stats)))


def to_uint8(x):
    """[-1, 1] floats (B, C, H, W) -> uint8 (B, H, W, C) with rounding;
    non-finite values become mid-grey."""
    # grey rather than dropped: the sample count stays N, and sample_shard counts the bad ones
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_labels(num_classes, per_class=10, max_classes=10):
    """Labels for a look-at grid: one row per class (the first max_classes),
    or None for an unconditional model."""
    if not num_classes:
        return None
    return torch.arange(min(num_classes, max_classes)).repeat_interleave(per_class)


def generate_grid(model, flow, path, guidance=1.0, seed=0, decode=None):
    """A grid of one row per class (10 per row), written to path. Used by train.py during training.
    decode: the LatentDecoder of a latent model (None for pixels)."""
    device = next(model.parameters()).device
    labels = grid_labels(model.cfg.num_classes)
    n = len(labels) if labels is not None else 64
    # the same noise at every call,
    # so that grids from successive checkpoints compare sample for sample
    z = noise_for(noise_seeds(seed, range(n)), model, device)
    x = generate(model, flow, z, None if labels is None else labels.to(device), guidance)
    if decode is not None:
        with torch.no_grad():
            # the VAE decoder's activations are large
            x = torch.cat([decode(xb) for xb in x.split(16)])
    save_grid(to_uint8(x), path, nrow=10 if labels is not None else 8)


def draw_labels(n, num_classes, seed):
    """Uniformly random labels for samples 0..n-1 (ADM, DiT and TarFlow's FID protocol),
    the same on every rank."""
    if not num_classes:   # unconditional: no labels at all (arr_1 is then zeros)
        return None
    return torch.randint(num_classes, (n,),
                         generator=torch.Generator().manual_seed(seed + LABEL_SEED_OFFSET))


def sample_shard(model, flow, n, rank, world, seed, batch_size, labels=None, progress=False,
                 decode=None, **kw):
    """Rank r decodes the contiguous global indices [r*ceil(n/W), ...) in batches.
    -> (uint8 NHWC, labels, #non-finite)
    progress: print samples done (this rank's count times the world size), samples/s and ETA.
    decode: a latent model's LatentDecoder: Tweedie denoising happens in latent space, then the VAE
    decodes to pixels."""
    device = next(model.parameters()).device
    per = math.ceil(n / world)   # the last rank may get fewer (even none); the total is exactly n
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    # every rank draws all n labels from the same stream
    # and takes its slice: the labels do not depend on W
    all_labels = labels if labels is not None else draw_labels(n, model.cfg.num_classes, seed)
    out, bad, meter = [], 0, Progress(n, 'samples', enabled=progress)
    for s in range(0, len(idx), batch_size):
        bi = idx[s:s + batch_size]
        y = None if all_labels is None else all_labels[bi].to(device)
        x = generate(model, flow, noise_for(noise_seeds(seed, bi), model, device), y, **kw)
        if decode is not None:
            with torch.no_grad():
                x = decode(x)
        # count, never drop or redraw: a sampler that diverges must show in the numbers
        bad += int((~torch.isfinite(x.flatten(1))).any(1).sum())
        out.append(to_uint8(x))
        meter.update(min(n, (s + len(bi)) * world))
    H = model.cfg.img_size if decode is None else decode.img_size
    imgs = np.concatenate(out) if out else np.zeros((0, H, H, 3), np.uint8)
    lab = np.zeros(len(idx), np.int64) if all_labels is None else all_labels[idx].numpy()
    return imgs, lab, bad


def gather_shards(imgs, labels, bad, world, chunk_bytes=2 ** 26):
    """All ranks' samples on rank 0 in global index order (others get None); non-finite counts
    summed. Only rank 0 receives, chunk_bytes per rank at a time, straight into the output:
    50K samples at 256^2 are ~10 GB, which an all-gather would copy to every rank."""
    if world == 1:
        return imgs, labels, bad
    rank = dist.get_rank()
    # NCCL moves CUDA tensors only (setup_distributed set this rank's device);
    # gloo moves CPU tensors
    dev = (torch.device('cuda', torch.cuda.current_device())
           if dist.get_backend() == 'nccl' else torch.device('cpu'))
    meta = [None] * world if rank == 0 else None
    dist.gather_object((len(imgs), labels, bad), meta, dst=0)        # small: counts and labels
    longest = torch.tensor(len(imgs), device=dev)
    dist.all_reduce(longest, dist.ReduceOp.MAX)                      # every rank loops as often
    shape = imgs.shape[1:]                                           # (H, W, C)
    # images per rank and step
    rows = max(1, min(int(longest), chunk_bytes // int(np.prod(shape))))
    if rank == 0:
        # shards are contiguous index ranges in rank order,
        # so rank r's rows start after those of ranks < r
        starts = np.cumsum([0] + [shard[0] for shard in meta])
        out = np.empty((starts[-1], *shape), np.uint8)
    for s in range(0, int(longest), rows):
        # one size on every rank, as gather needs
        piece = torch.zeros(rows, *shape, dtype=torch.uint8)
        piece[:len(imgs[s:s + rows])] = torch.from_numpy(imgs[s:s + rows])
        got = [torch.empty_like(piece, device=dev) for _ in range(world)] if rank == 0 else None
        dist.gather(piece.to(dev), got, dst=0)
        if rank == 0:
            for r, gathered in enumerate(got):
                count = min(rows, max(0, meta[r][0] - s))
                out[starts[r] + s:starts[r] + s + count] = gathered[:count].cpu().numpy()
    if rank:
        return None, None, None
    return out, np.concatenate([shard[1] for shard in meta]), sum(shard[2] for shard in meta)


def distributed_fid(model, flow, ref, n, guidance, seed, rank, world, device,
                    inception=None, decode=None):
    """FID of n EMA samples against ref, for train.py's periodic monitor.
    Rank 0 gets the result, others None."""
    was = model.training   # train.py passes its EMA model mid-training: restore its mode afterwards
    model.eval()
    imgs, labels, _ = gather_shards(*sample_shard(model, flow, n, rank, world, seed, 64,
                                                  guidance=guidance, decode=decode), world)
    model.train(was)
    return (fid.fid_from_samples(imgs, ref, fid.load_inception(inception, device), device)
            if imgs is not None else None)


def image_size(path, flag):
    """(width, height) of an image file, read from its header;
    a missing or unreadable file names the flag."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError) as e:
        raise UsageError(f'{flag} {path}: not a readable image ({type(e).__name__})') from e


def load_image(path, size):
    """An RGB image file, centre-cropped and resized to size, as (1, 3, size, size) in [-1, 1]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    # the same ADM centre crop as the training data, so an image is seen as F saw its training set
    arr = np.array(center_crop(Image.open(path).convert("RGB"), size))
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1


@torch.no_grad()
def draw_trajectory(flow, path, labels, z, guidance=0.0, ramp=False,
                    denoise=True, reverse_model=None):
    """A picture of sampling as a trajectory: for each sample a row z = x^T, x^{T-1}, ..., x^0,
    clean image along F's exact inverse (one MetaBlock.reverse per column), and, given G, a row
    beneath of what G's heads predict at the same depths (head number `head` is aligned with
    x^{T-1-head}, model.align_targets), its output in the last column.
    z (B, N, d), labels (B,) or None. z and the states x^T..x^1 are not images and their scale grows
    with depth, so each is shown min-max normalised over its own pixels; x^0, G's prediction of it
    and the clean images are images in [-1, 1] and are shown as such (clipped), so the noise left
    before denoising stays visible."""
    c = flow.cfg
    # tokens -> (B, C, H, W)
    img = lambda tokens: unpatchify(tokens.float(), c.patch_size, c.img_size)   # noqa: E731
    # each image stretched from its own range to [-1, 1]
    stretch = lambda x: (x - x.amin((1, 2, 3), keepdim=True)) / (   # noqa: E731
        x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True)).clamp(min=1e-8) * 2 - 1
    states, x = [z], z.float()
    for block in reversed(flow.blocks):   # x^T -> x^{T-1} -> ... -> x^0, as TarFlow.reverse
        x = block.reverse(x, labels, guidance, ramp)
        states.append(x)
    x0 = img(states[-1])
    cols = ([stretch(img(state)) for state in states[:-1]]
            + [x0, flow.denoise(x0, labels) if denoise else x0])
    rows = [torch.stack(cols, 1)]   # (B, T + 2, C, H, W)
    if reverse_model is not None:
        train_w = reverse_model.cfg.guidance_mode == 'train'
        preds = reverse_model(z, labels,
                              torch.full((len(z),), float(guidance)) if train_w else None,
                              0.0 if train_w else guidance)
        out = reverse_model.decode(z, labels,
                                   torch.full((len(z),), float(guidance)) if train_w else None,
                                   0.0 if train_w else guidance, flow)
        T = len(states) - 1
        # column j holds x^{T-j}; head number `head` predicts x^{T-1-head},
        # so it goes to column head + 1 ('naive' has no heads)
        gcols = [stretch(img(z))] + [torch.zeros_like(x0) - 1 for _ in range(T)] + [out]
        for head, pred in enumerate(preds[:-1]):
            gcols[head + 1] = stretch(img(pred)) if head + 1 < T else img(pred)
        rows.append(torch.stack(gcols, 1))
    grid = torch.stack(rows, 1).flatten(0, 2)   # sample by sample: F's row, then G's
    save_grid(to_uint8(grid.clamp(-1, 1)), path, nrow=len(cols))


def get_args(argv=None):
    """-> (parser, args, labels or None). Flags in groups, each with its default in --help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group('what to sample, and where it goes')
    g.add_argument('--ckpt', required=True,
                   help='a train.py checkpoint (forward or reverse) or an ml-tarflow state dict')
    g.add_argument('--vae', default=None,
                   help='latent checkpoints: the SD-VAE their latents were encoded with '
                   '(a weight file or a diffusers folder); samples are decoded to pixels after '
                   'Tweedie denoising')
    g.add_argument('--out', default='samples.png',
                   help='the PNG grid to write (at most 100 samples)')
    g.add_argument('--num_samples', type=int, default=None,
                   help='how many samples (default: a grid of 10 per class)')
    g.add_argument('--npz', default=None,
                   help='also write the samples as an ADM .npz (arr_0 uint8 NHWC, arr_1 labels)')
    g.add_argument('--labels', default=None,
                   help='comma-separated class labels (cycled), instead of uniformly random ones')
    g.add_argument('--seed', type=int, default=0, help='noise and label seed')
    g.add_argument('--trajectory', default=None,
                   help="write a PNG of F's exact inverse block by block "
                   "(and G's predictions at the same depths, for a reverse checkpoint) "
                   'for --num_samples (default 4) samples')
    g = p.add_argument_group('guidance')
    g.add_argument('--guidance', type=float, default=2.0,
                   help='classifier-free guidance scale w (0: none); x = (1+w) cond - w uncond')
    g.add_argument('--guidance_mode', choices=['auto', 'train', 'inference'], default='auto',
                   help='BiFlow: auto = as trained; train = w as input (1-NFE); '
                   'inference = Eq. 4 CFG (2-NFE)')
    g.add_argument('--ramp', action=argparse.BooleanOptionalAction, default=False,
                   help='TarFlow: guidance grows linearly over token positions (used for its FID)')
    g.add_argument('--attn_temp', type=float, default=1.0,
                   help='TarFlow: attention temperature of the guiding (unconditional) stream; '
                   '!= 1 gives guidance for unconditional models')
    g = p.add_argument_group('TarFlow: exact inverse and denoising')
    g.add_argument('--denoise', action=argparse.BooleanOptionalAction, default=True,
                   help='Tweedie denoising x + sigma^2 grad log p(x) after the exact inverse')
    g.add_argument('--kv_dtype', choices=['fp32', 'bf16'], default='fp32',
                   help="the exact inverse's KV cache: bf16 halves its memory and reads "
                   "(alpha, mu and the recursion stay fp32)")
    g.add_argument('--cuda_graph', action=argparse.BooleanOptionalAction, default=False,
                   help="run the exact inverse's per-token step on fixed shapes "
                   "(whole cache, mask row), captured in a CUDA graph on GPU: no per-op launch "
                   "cost (on CPU the same fixed-shape step runs eagerly)")
    g.add_argument('--inverse', choices=['parallel', 'sequential'], default='parallel',
                   help="the exact inverse: parallel = Jacobi passes over each flow's tokens, the "
                   "strategy per flow set by --segment; sequential = the token-by-token loop "
                   "(--kv_dtype, --cuda_graph apply to it)")
    g.add_argument('--segment', default='auto',
                   help='--inverse parallel: tokens solved together in each flow. auto = time '
                   'every strategy on the first batch and keep the fastest per flow (printed); an '
                   'integer for every flow (the token count: plain Jacobi; 1: sequential); or one '
                   'per flow, comma-separated from block 0 (next to the data), e.g. 64,64,64,1')
    g.add_argument('--jacobi_tol', type=float, default=JACOBI_TOL,
                   help='--inverse parallel: a sample stops once the largest change of its tokens '
                   "in a pass is <= this (in the flow's token space); 0: exact passes to the cap")
    g.add_argument('--jacobi_max_passes', type=int, default=None,
                   help='--inverse parallel: at most this many passes per segment '
                   "(default: the segment's length, after which it is exact)")
    g.add_argument('--jacobi_init', choices=['z', 'G'], default='z',
                   help="--inverse parallel: each flow's first guess, its input z or "
                   "(with --exact, a reverse checkpoint) G's prediction of its output")
    g.add_argument('--exact', action='store_true',
                   help="a reverse checkpoint: sample its F's exact inverse "
                   "(and Tweedie denoising) instead of G's one pass")
    g.add_argument('--noise_std', type=float, default=None,
                   help="the sigma the model was trained with: overrides a checkpoint's; needed "
                   "for ml-tarflow state dicts unless their file name ends in it "
                   "(afhq_model_8_768_8_8_0.07.pth)")
    g = p.add_argument_group('FID')
    g.add_argument('--fid', default=None,
                   help='compute FID of the samples against this reference '
                   '(stats .npz, .npz or folder)')
    g.add_argument('--inception', default=None,
                   help='path to pt_inception-2015-12-05-6726825d.pth for --fid')
    g = p.add_argument_group('inpainting and editing (a reverse checkpoint: it carries F and G)')
    g.add_argument('--inpaint', default=None,
                   help='image to complete: keep the noise of the known tokens, redraw the rest')
    g.add_argument('--mask', default=None,
                   help='with --inpaint: image of the same size, white = region to regenerate')
    g.add_argument('--edit', default=None,
                   help='image to re-draw as class --to_class (encoded with --labels as its class)')
    g.add_argument('--to_class', type=int, default=None, help='with --edit: the target class')
    g = p.add_argument_group('hardware')
    g.add_argument('--batch_size', type=int, default=64,
                   help='samples per forward batch on each rank')
    g.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    args = p.parse_args(argv)
    # bad numbers fail here, in one line naming the flag, before any model is loaded
    if args.batch_size < 1:
        p.error(f'--batch_size {args.batch_size}: must be an integer >= 1')
    if args.num_samples is not None and args.num_samples < 1:
        p.error(f'--num_samples {args.num_samples}: must be an integer >= 1')
    # the mask is cropped as the image is, so only one of the same size lines up
    if args.inpaint and args.mask:
        sizes = {flag: image_size(path, flag)
                 for flag, path in (('--inpaint', args.inpaint), ('--mask', args.mask))}
        if sizes['--inpaint'] != sizes['--mask']:
            p.error(f'--mask {args.mask}: is {"x".join(map(str, sizes["--mask"]))} pixels, but '
                    f'--inpaint {args.inpaint} is {"x".join(map(str, sizes["--inpaint"]))}; '
                    'give a mask of the same size')
    if args.jacobi_tol < 0:
        p.error(f'--jacobi_tol {args.jacobi_tol}: must be >= 0')
    if args.jacobi_max_passes is not None and args.jacobi_max_passes < 1:
        p.error(f'--jacobi_max_passes {args.jacobi_max_passes}: must be an integer >= 1')
    if args.segment != 'auto':
        try:
            segs = [int(v) for v in args.segment.split(',')]
        except ValueError:
            segs = [0]
        if min(segs) < 1:
            p.error(f"--segment {args.segment}: 'auto', an integer >= 1, or one such integer per "
                    'flow, comma-separated')
        args.segment = segs[0] if len(segs) == 1 else segs
    labels = None   # None: uniformly random labels (the FID protocol), or a grid's rows
    if args.labels:
        try:
            labels = torch.tensor([int(label) for label in args.labels.split(',')])
        except ValueError:
            p.error(f'--labels {args.labels}: expected comma-separated integer class labels '
                    '(0 .. num_classes-1)')
    return p, args, labels


def main(argv=None):
    p, args, labels = get_args(argv)

    # ---- processes, then the outputs: check what can be checked before hours of sampling
    rank, world, device = setup_distributed(args.device)
    # before loading and sampling: a FID-50K run must not end in a path it cannot write
    if rank == 0:
        for flag, path in (('--out', args.out), ('--npz', args.npz)):
            if path is not None:
                check_writable(path, flag)
    # TF32 matmuls; sampling stays in fp32 otherwise (the inverse compounds errors)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # --fid: the network and the reference are checked now, not after the samples are drawn
    inception = None
    if args.fid and rank == 0:
        inception = fid.load_inception(args.inception, device)
        fid.check_reference(args.fid, inception)

    # ---- the model(s): a TarFlow, or a reverse model G with the frozen F it was trained against
    model, flow, decode = load_models(args.ckpt, device, args.noise_std,
                                      verbose=rank == 0, vae=args.vae)
    ncls = model.cfg.num_classes
    kw = dict(guidance=args.guidance, guidance_mode=args.guidance_mode, ramp=args.ramp,
              attn_temp=args.attn_temp, denoise=args.denoise,
              kv_dtype=torch.bfloat16 if args.kv_dtype == 'bf16' else None, static=args.cuda_graph)
    exact = flow is None or args.exact   # the samples come from F's exact inverse
    if args.exact and flow is None:
        p.error('--exact: samples a reverse checkpoint by its F; a forward checkpoint is sampled '
                'exactly already')
    if args.jacobi_init == 'G' and (not args.exact or args.inverse != 'parallel'):
        p.error('--jacobi_init G: needs a reverse checkpoint with --exact and --inverse parallel '
                '(G makes the guess)')
    T = (flow or model).cfg.num_blocks
    if isinstance(args.segment, list) and exact and len(args.segment) != T:
        p.error(f'--segment {",".join(map(str, args.segment))}: give one length per flow ({T}), '
                'or one for all')
    inverse = None
    if exact and args.inverse == 'parallel':
        inverse = ParallelInverse(args.segment, args.jacobi_tol, args.jacobi_max_passes,
                                  args.jacobi_init)
    kw.update(inverse=inverse, exact=args.exact)
    if labels is not None:
        # only knowable once the model is loaded
        if ncls == 0 or labels.min() < 0 or labels.max() >= ncls:
            p.error(f'--labels {args.labels}: the model has {ncls} classes')

    # a look at the path from z to the image, not a sampler: one process, a few samples
    if args.trajectory:
        if decode is not None:
            p.error('--trajectory draws the states of pixel models '
                    "(a latent model's states are latents)")
        n = args.num_samples or 4
        y = (None if not ncls
             else (labels if labels is not None
                   else torch.arange(n) % ncls).repeat(n)[:n].to(device))
        tarflow, G = (flow, model) if flow is not None else (model, None)
        draw_trajectory(tarflow, args.trajectory, y,
                        noise_for(noise_seeds(args.seed, range(n)), tarflow, device),
                        args.guidance, args.ramp, args.denoise, G)
        print(f'wrote {args.trajectory}: {n} samples, z to the image along the exact inverse' +
              (", G's predictions beneath each" if G is not None else ''))
        return

    # ---- training-free uses of (F, G): one image in, a grid of results out, in one process
    if args.inpaint or args.edit:
        if world > 1:
            p.error('--inpaint/--edit run in one process')
        if flow is None:
            p.error('--inpaint/--edit need a reverse checkpoint (it carries both F and G)')
        if decode is not None:
            p.error('--inpaint/--edit work on pixel checkpoints '
                    '(a latent one would need the VAE encoder here)')
        if ncls and labels is None:
            p.error('--inpaint/--edit on a class-conditional model need --labels '
                    '(the class of the image)')
        src = load_image(args.inpaint or args.edit, model.cfg.img_size).to(device)
        y = None if labels is None else labels[:1].to(device)
        # F encodes noisy data (it was trained on x + sigma*eps),
        # so the encoding noise is seeded like the samples'
        eps = torch.randn(src.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
        if args.inpaint:
            if not args.mask:
                p.error('--inpaint needs --mask')
            n = args.num_samples or 8   # several completions of one image, each from its own noise
            mask = load_image(args.mask, model.cfg.img_size).to(device).mean(1, keepdim=True)
            redraw = (mask > 0).expand(n, -1, -1, -1)
            if not redraw.any():
                p.error(f'--mask {args.mask}: has no white pixel inside the centre crop, so '
                        'nothing to complete')
            noise = noise_for(noise_seeds(args.seed, range(n)), model, device)
            x, _ = inpaint(model, flow, src.expand(n, -1, -1, -1), redraw,
                           None if y is None else y.expand(n), noise, args.guidance,
                           eps.expand(n, -1, -1, -1))
            # input, hole, results
            shown = torch.cat([src, torch.where(redraw[:1], torch.zeros_like(src), src), x])
        else:
            if args.to_class is None or not 0 <= args.to_class < ncls:
                p.error(f'--edit needs --to_class in [0, {ncls})')
            x = edit(model, flow, src, y, torch.tensor([args.to_class], device=device),
                     args.guidance, eps)
            shown = torch.cat([src, x])
        save_grid(to_uint8(shown), args.out, nrow=len(shown))
        print(f'wrote {args.out}: the input, '
              f'{"the masked input, " if args.inpaint else ""}{len(x)} result(s)')
        return

    # ---- which samples: a look-at grid (a row per class),
    # or N with labels drawn uniformly (the FID protocol)
    if args.num_samples is None:
        n = 100 if ncls else 64
        labels = grid_labels(ncls) if labels is None else labels
    else:
        n = args.num_samples
    if labels is not None:   # --labels 3,5 cycles: 3, 5, 3, 5, ...
        labels = labels.repeat(math.ceil(n / len(labels)))[:n]
    # each rank decodes its share of global indices; rank 0 alone writes and scores the whole set
    imgs, labs, bad = gather_shards(*sample_shard(model, flow, n, rank, world, args.seed,
                                                  args.batch_size, labels,
                                                  progress=rank == 0 and n > args.batch_size,
                                                  decode=decode, **kw), world)
    if rank == 0:
        assert len(imgs) == n, (len(imgs), n)   # exactly N, whatever the number of ranks
        if bad:
            print(f'WARNING: {bad} of {n} samples had non-finite values '
                  '(kept, written as grey pixels)')
        if args.npz:  # first: the samples are the costly part, the grid is only a look at them
            atomic_write(args.npz, lambda f: np.savez(f, arr_0=imgs, arr_1=labs))
            print(f'wrote {args.npz}: arr_0 {imgs.shape} uint8, arr_1 labels '
                  f'({"random" if args.labels is None else "given"})')
        if inverse is not None:
            log_inverse(inverse, f'rank 0, {len(inverse.infos)} batches')
        # the grid shows the first 100: for a class-conditional default run, one row per class
        save_grid(imgs[:min(n, 100)], args.out, nrow=10 if ncls else 8)
        print(f'wrote {min(n, 100)} of {n} samples to {args.out}')
        # the distance is printed with N and the reference, so the number cannot be misread
        if args.fid:
            res = fid.fid_from_samples(imgs, args.fid, inception, device)
            print(f'FID {res["fid"]:.4f} on {n} samples vs {args.fid}' +
                  (f' | IS {res["inception_score"]:.3f}'
                   if res.get('inception_score') is not None else ''))
    # a clean exit, together: rank 0 may still be writing and scoring when the others get here
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()   # torchrun reports a rank that leaves the group open


if __name__ == '__main__':
    run_cli(main)
