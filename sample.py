"""
Sample from a checkpoint of either stage (or a state dict saved by Apple's ml-tarflow): a PNG grid,
an ADM .npz, FID; or, training-free with a reverse checkpoint, inpaint or class-edit an image.

    python sample.py --ckpt out/forward.pt                 # TarFlow: exact inverse, CFG, denoising
    python sample.py --ckpt out/reverse.pt --guidance 2    # BiFlow: one pass, training-time CFG
    python sample.py --ckpt out/reverse.pt --guidance_mode inference --guidance 2   # CFG, 2-NFE
    torchrun --nproc_per_node=8 sample.py --ckpt out/reverse.pt --num_samples 50000 \\
        --npz samples.npz --fid VIRTUAL_imagenet64_labeled.npz   # FID-50K, labels uniformly random
    python sample.py --ckpt out/reverse.pt --inpaint img.png --mask mask.png --labels 3
    python sample.py --ckpt out/reverse.pt --edit img.png --labels 3 --to_class 5
    python sample.py --ckpt in256/reverse.pt --vae sd-vae-ft-mse.safetensors   # latents, decoded
    python scripts/trajectory.py --ckpt out/reverse.pt     # the path from z to the image

Sample i is drawn from noise seeded by (--seed, i) and, unless --labels is given, a label drawn
uniformly at random from a stream seeded by --seed: the output does not depend on the batch size or
on the number of ranks, and the default sampler (the sequential exact inverse) is deterministic.
"""
import argparse
import re
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import fid
from data import (HelpFormatter, Progress, UsageError, atomic_write, center_crop, check_flags,
                  check_writable, latent_norm, on_rank0, read_torch_file, run_cli,
                  save_grid, setup_distributed)
from model import (FlowConfig, ReverseConfig, ReverseModel, TarFlow, config_from_dict, edit,
                   inpaint, load_ml_tarflow)
from vae import load_vae


def ml_tarflow_sigma(path, noise_std=None, verbose=True):
    """The sigma an ml-tarflow state dict was trained with: --noise_std, else the last field of
    Apple's file names ({dataset}_model_{P}_{Ch}_{T}_{K}_{sigma:.2f}.pth). Their dicts do not record
    it, and a wrong sigma silently weakens or overdoes Tweedie denoising, so there is no default."""
    m = re.search(r'_(\d*\.\d+)\.pth?$', path)   # the name's last field: no '/' in it
    if noise_std is None and m is None:
        raise UsageError('ml-tarflow state dicts do not record their noise sigma, nor does this '
                         'file name; pass --noise_std (Apple: AFHQ 0.07, ImageNet-128 0.15)')
    sigma, src = (float(m[1]), 'the file name') if noise_std is None else (noise_std, '--noise_std')
    if verbose:
        print(f'ml-tarflow state dict: sigma = {sigma} (from {src})')
    return sigma


class LatentDecoder(torch.nn.Module):
    """The models' space -> pixels for checkpoints trained on latents: undo the per-channel
    normalisation recorded with the latents (vae.py encode), then the frozen SD-VAE decoder.
    (B, C, h, w) -> (B, 3, 8h, 8w) in [-1, 1] (unclipped). Differentiable in its input: stage 2's
    perceptual terms see Dec(G's output)."""

    def __init__(self, vae, latent):
        super().__init__()
        self.vae, self.img_size = vae.eval().requires_grad_(False), latent['img_size']
        for name, t in zip(('mean', 'std'), latent_norm(latent)):
            self.register_buffer(name, t.view(1, -1, 1, 1), persistent=False)   # (1, C, 1, 1)

    def forward(self, x):
        return self.vae.decode(x.float() * self.std + self.mean)


def latent_decoder(latent, path, device='cpu', what='the checkpoint'):
    """The LatentDecoder of latent metadata (a checkpoint's or a latent set's 'latent' entry) from
    the VAE file at path (--vae), which must be the VAE the latents were encoded with (the
    fingerprint of its config and weights is recorded with them)."""
    want = latent['vae']
    vae = None if path is None else load_vae(path, device)   # no SD VAE: refused in one line
    if vae is None or vae.fingerprint != want['fingerprint']:
        raise UsageError(f"--vae {path}: is not the VAE {what}'s latents were encoded with "
                         f"({want['name']}, fingerprint {want['fingerprint']}); pass that one")
    return LatentDecoder(vae, latent).to(device)


def read_checkpoint(path, flag, kinds=('forward', 'reverse'), resume=False, ck=None):
    """-> (ck, model, flow): the train.py checkpoint at path (ck: already read), checked against
    this code before any of it is used: its kind, its configs (config_from_dict: no unknown or
    missing key), every state dict it carries against the state_dict() of the model its config
    builds (keys, shapes, finite weights; resume: 'model' too) and a G's geometry against its F's
    (train.py checks the training state). model holds the EMA weights, flow a reverse
    checkpoint's F (else None), both on the CPU. Anything else: one line naming the file."""
    ck = read_torch_file(path, flag) if ck is None else ck
    try:
        if (kind := ck.get('kind') if isinstance(ck, dict) else None) not in kinds:
            raise ValueError(f"not a {' or '.join(kinds)} checkpoint of train.py (kind {kind!r})")
        flow = kind == 'reverse' and checked_model(ck, 'forward', ('forward',), 'forward')
        model = checked_model(ck, 'model', ('model',) * resume + ('ema',), kind)
        geometry = ('img_size', 'in_channels', 'patch_size', 'num_classes', 'num_blocks')
        if flow and any(getattr(model.cfg, k) != getattr(flow.cfg, k) for k in geometry):
            raise ValueError(f"model_config does not fit forward_config ({', '.join(geometry)})")
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:   # and configs that fail
        raise UsageError(f'{flag} {path}: {e}') from None
    return ck, model, flow or None


def checked_model(ck, name, keys, kind):
    """The model (TarFlow or ReverseModel, by kind) of ck[name + '_config']; ValueError unless
    each ck[key] of keys has its state dict's keys and shapes and finite weights (a config that
    does not build one raises what the config or the model raise). It holds the last."""
    Model, Cfg = (TarFlow, FlowConfig) if kind == 'forward' else (ReverseModel, ReverseConfig)
    model = Model(config_from_dict(Cfg, ck.get(f'{name}_config'), f'{name}_config'))   # or refused
    want = model.state_dict()
    for key in keys:
        sd = ck[key] if isinstance(ck.get(key), dict) else {f'(no {key} weights)': None}
        if diff := sorted(set(want) ^ set(sd)) or [   # keys, then shapes
                k for k in want if getattr(sd[k], 'shape', None) != want[k].shape]:
            raise ValueError(f"{key}: its keys or shapes are not those of {name}_config's model "
                             f'(the first of {len(diff)} that differ: {diff[0]})')
        if not all(t.isfinite().all() for t in sd.values() if t.is_floating_point()):
            raise ValueError(f'{key}: non-finite weights (a diverged run?): give a finite one')
    model.load_state_dict(sd)
    return model


def load_models(path, device='cpu', noise_std=None, verbose=True, vae=None):
    """-> (model, flow, decode): a TarFlow and None, or a BiFlow reverse model and its frozen
    TarFlow; decode is None for pixel models, the LatentDecoder of a latent checkpoint (which needs
    vae, the --vae path). ml-tarflow state dicts need noise_std (their training sigma) unless their
    file name carries it. Sampling uses the EMA weights, as the papers do."""
    ckpt, flow, latent = read_torch_file(path, '--ckpt'), None, None
    if isinstance(ckpt, dict) and any(k.endswith('proj_in.weight') for k in ckpt):   # Apple's
        try:
            model = load_ml_tarflow(ckpt, ml_tarflow_sigma(path, noise_std, verbose))
        except ValueError as e:
            raise UsageError(f'--ckpt {path}: {e}') from None
    else:   # train.py's (G carries the F it inverts: score denoising, inpainting, editing)
        ckpt, model, flow = read_checkpoint(path, '--ckpt', ck=ckpt)
        flow, latent = flow and flow.to(device).eval().requires_grad_(False), ckpt.get('latent')
    decode = latent_decoder(latent, vae, device, f'--ckpt {path}') if latent else None
    # frozen: the score is a gradient w.r.t. the input only, and weights that need grad would make
    # its backward keep every Linear's input and compute weight gradients nobody reads
    return model.to(device).eval().requires_grad_(False), flow, decode


def noise_for(seed, indices, model, device):
    """z (B, N, d) of global sample indices under --seed, sample i from its own generator seeded
    by seed * 2**32 + i (one stream per (seed, index), never shared between seeds for i < 2**32):
    the noise of sample i does not depend on the batch size or the number of ranks."""
    shape = (model.cfg.num_tokens, model.cfg.token_dim)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        seed * 2 ** 32 + int(i))) for i in indices]).to(device)


@torch.no_grad()
def generate(model, flow, z, labels, guidance=0.0, guidance_mode='auto', ramp=False, attn_temp=1.0,
             denoise=True, kv_dtype=None, jacobi=None):
    """Decode noise tokens z (B, N, d) into images (B, C, H, W) in [-1, 1] (unclipped).
    TarFlow: the exact inverse (sequential; jacobi=tol: Jacobi fixed point), CFG on alpha and mu,
    optional Tweedie denoising. BiFlow: one pass conditioned on w (training-time CFG, 1-NFE) or
    Eq. 4 inference-time CFG (2-NFE)."""
    if isinstance(model, TarFlow):
        return model.sample(labels, guidance=guidance, ramp=ramp, attn_temp=attn_temp,
                            denoise=denoise, z=z, kv_dtype=kv_dtype, jacobi=jacobi)
    # train: w is an input of G (the guided sample in one pass); inference: Eq. 4, cond + null
    train = (model.cfg.guidance_mode if guidance_mode == 'auto' else guidance_mode) == 'train'
    return model.decode(z, labels, torch.full((len(z),), float(guidance) * train),
                        inference_w=0.0 if train else guidance, flow=flow)


def to_uint8(x):
    """[-1, 1] floats (B, C, H, W) -> uint8 (B, H, W, C) with rounding; non-finite values become
    mid-grey (the sample count stays N, and sample_shard counts the bad ones)."""
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate_grid(model, flow, path, guidance=1.0, seed=0, decode=None, n=None):
    """A grid of one row per class (10 per row; n: the first n samples only) written to path, from
    the same noise at every call so that successive checkpoints compare sample for sample
    (train.py's grids)."""
    imgs, _, _ = sample_shard(model, flow, n, 0, 1, seed, 16, guidance=guidance, decode=decode)
    save_grid(imgs, path, nrow=10 if model.cfg.num_classes else 8)


def sample_shard(model, flow, n, rank, world, seed, batch_size, labels=None, progress=False,
                 decode=None, **kw):
    """Rank r decodes its contiguous share of the global indices 0..n-1 in batches (n=None: a
    look-at grid, a row of 10 per class, the first 10 cycled, or 8 x 8 of an unconditional model);
    labels: given ones, cycled (3, 5, 3, 5, ...), else the grid's, else uniformly random ones (the
    FID protocol).
    -> (uint8 NHWC, labels (zeros for an unconditional model), #non-finite). decode: a latent
    model's LatentDecoder, applied after Tweedie denoising in latent space."""
    device, ncls = next(model.parameters()).device, model.cfg.num_classes
    if n is None:
        n = 100 if ncls else 64
        labels = torch.arange(100) // 10 % ncls if labels is None and ncls else labels
    idx = torch.arange(n).tensor_split(world)[rank]   # shares differ by 1 at most (n < W: none)
    if labels is None:   # every rank draws all n from one stream (unconditional: zeros)
        labels = torch.randint(max(ncls, 1), (n,), generator=torch.Generator()
                               .manual_seed(seed + 12345))   # apart from every noise stream
    labels = labels.repeat(-(-n // len(labels)))[:n]
    out, bad, meter = [], 0, Progress(n, 'samples', enabled=progress)
    for s in range(0, len(idx), batch_size):
        bi = idx[s:s + batch_size]
        y = labels[bi].to(device) if ncls else None
        x = generate(model, flow, noise_for(seed, bi, model, device), y, **kw)
        x = x if decode is None else decode(x)
        # count, never drop or redraw: a sampler that diverges must show in the numbers
        bad += int((~torch.isfinite(x.flatten(1))).any(1).sum())
        out.append(to_uint8(x))
        meter.update(min(n, (s + len(bi)) * world))
    H = model.cfg.img_size if decode is None else decode.img_size
    imgs = np.concatenate(out) if out else np.zeros((0, H, H, 3), np.uint8)
    return imgs, labels[idx].numpy(), bad


def gather_shards(imgs, labels, bad, world, chunk_bytes=2 ** 26):
    """All ranks' samples on rank 0 in global index order (others get None), non-finite counts
    summed. Only rank 0 receives, chunk_bytes per rank at a time: 50K samples at 256^2 are ~10 GB,
    which an all-gather would copy to every rank."""
    if world == 1:
        return imgs, labels, bad
    # NCCL moves CUDA tensors only (setup_distributed set this rank's device), gloo CPU tensors
    longest = torch.tensor(len(imgs), device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(longest, dist.ReduceOp.MAX)   # every rank sends as many chunks
    rows = max(1, chunk_bytes // int(np.prod(imgs.shape[1:])))
    got = []
    for part in [(labels, bad)] + [imgs[s:s + rows] for s in range(0, int(longest), rows)]:
        got.append([None] * world if dist.get_rank() == 0 else None)
        dist.gather_object(part, got[-1], dst=0)
    if dist.get_rank():
        return None, None, None
    # shards are contiguous index ranges in rank order: rank r's chunks follow those of ranks < r
    imgs = np.concatenate([chunks[r] for r in range(world) for chunks in got[1:]])
    return imgs, np.concatenate([lab for lab, _ in got[0]]), sum(b for _, b in got[0])


def distributed_fid(model, flow, ref, n, guidance, seed, rank, world, device,
                    inception=None, decode=None):
    """FID of n samples against ref, for train.py's periodic monitor (of its EMA model, in either
    mode: the models have no dropout or batch statistics). Rank 0 gets the result, others None."""
    imgs, _, _ = gather_shards(*sample_shard(model, flow, n, rank, world, seed, 64,
                                             guidance=guidance, decode=decode), world)
    return (fid.fid_from_samples(imgs, ref, fid.load_inception(inception, device), device)
            if imgs is not None else None)


def save_npz(f, **arrays):
    """np.savez with a fixed time stamp in the zip (ZipInfo's default, 1980-01-01): the same
    samples give the same bytes."""
    with zipfile.ZipFile(f, 'w') as z:
        for k, a in arrays.items():
            with z.open(zipfile.ZipInfo(f'{k}.npy'), 'w', force_zip64=True) as g:
                np.lib.format.write_array(g, np.asarray(a))


def read_image(path, flag):
    """An image file as RGB; a missing or unreadable file is refused naming the flag."""
    try:
        return Image.open(path).convert('RGB')   # converting reads the file, then PIL closes it
    except (OSError, ValueError) as e:
        raise UsageError(f'{flag} {path}: not a readable image ({type(e).__name__})') from e


def training_free(args, model, flow, decode, labels, device):
    """--inpaint / --edit with the pair (F, G) of a reverse checkpoint.
    -> (results uint8 NHWC, their labels, the grid: the input, the masked input, the results)."""
    if flow is None or decode is not None or (model.cfg.num_classes and labels is None):
        raise UsageError('--inpaint/--edit need a reverse checkpoint of a pixel model (it carries '
                         'F and G) and, if it is class-conditional, --labels (the image\'s class)')
    img = read_image(args.inpaint or args.edit, '--inpaint' if args.inpaint else '--edit')
    mask = read_image(args.mask, '--mask') if args.inpaint else img
    if mask.size != img.size:   # the mask is cropped as the image is: only the same size lines up
        raise UsageError(f'--mask {args.mask}: is {"x".join(map(str, mask.size))} pixels, but '
                         f'--inpaint is {"x".join(map(str, img.size))}; give one of the same size')
    # the same ADM centre crop as the training data: an image is seen as F saw its training set
    src, mask = (torch.tensor(center_crop(im, model.cfg.img_size)).permute(2, 0, 1)[None]
                 .to(device).float() / 127.5 - 1 for im in (img, mask))   # (1, C, H, W)
    n = 1 if args.edit else args.num_samples or 8   # completions of one image, each its own noise
    y = None if labels is None else labels[:1].expand(n).to(device)
    # F encodes noisy data (it was trained on x + sigma*eps): that noise is seeded like the samples'
    eps = torch.randn(src.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    x, eps = src.expand(n, -1, -1, -1), eps.expand(n, -1, -1, -1)
    if args.edit:
        x = edit(model, flow, x, y, torch.full_like(y, args.to_class), args.guidance, eps)
        return to_uint8(x), np.array([args.to_class]), to_uint8(torch.cat([src, x]))
    redraw = (mask.mean(1, keepdim=True) > 0).expand(n, -1, -1, -1)   # white: redraw
    if not redraw.any():
        raise UsageError(f'--mask {args.mask}: has no white pixel inside the centre crop, so '
                         'nothing to complete')
    x, _ = inpaint(model, flow, x, redraw, y, noise_for(args.seed, range(n), model, device),
                   args.guidance, eps)
    grid = torch.cat([src, torch.where(redraw[:1], 0.0, src), x])   # the hole in mid-grey
    return to_uint8(x), np.full(n, 0 if y is None else int(y[0])), to_uint8(grid)


# The numbers each flag may take (data.check_flags; nan is refused, and inf at an open end)
RANGES = {**dict.fromkeys(['num_samples', 'batch_size'], '[1, inf)'), 'jacobi': '[0, inf)',
          'guidance': '(-inf, inf)', 'attn_temp': '(0, inf)', 'noise_std': '(0, inf)'}


def int_list(text):
    """'3,5' -> [3, 5] (argparse names the flag of a bad one)."""
    return [int(v) for v in text.split(',')]


def get_args(argv=None):
    """-> (parser, args, labels or None). Flags in groups, each with its default in --help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    yes_no = argparse.BooleanOptionalAction
    a = p.add_argument_group('what to sample, where it goes, its FID; the hardware').add_argument
    a('--ckpt', required=True, help='a train.py checkpoint (either stage) or ml-tarflow weights')
    a('--vae', help="latent checkpoints: their SD-VAE (a file or a diffusers folder), to decode")
    a('--out', default='samples.png', help='the PNG grid to write (at most 100 samples)')
    a('--num_samples', type=int, help='how many (default: a grid of 10 per class; --inpaint: 8)')
    a('--npz', help='also write the samples as an ADM .npz (arr_0 uint8 NHWC, arr_1 labels)')
    a('--labels', type=int_list, help='class labels 3,5,... (cycled), not uniformly random ones')
    a('--seed', type=int, default=0, help='noise and label seed')
    a('--fid', help='FID of the samples against this reference (stats .npz, .npz or folder)')
    a('--inception', help='path to pt_inception-2015-12-05-6726825d.pth for --fid')
    a('--batch_size', type=int, default=64, help='samples per forward batch on each rank')
    a('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    a = p.add_argument_group('the sampler: guidance, the exact inverse, denoising').add_argument
    a('--guidance', type=float, default=2.0, help='CFG scale w (0: none): (1+w) cond - w uncond')
    a('--guidance_mode', choices=['auto', 'train', 'inference'], default='auto',
      help='BiFlow: auto = as trained; train = w as input (1-NFE); inference = Eq. 4 CFG (2-NFE)')
    a('--ramp', action=yes_no, default=False, help='TarFlow: guidance grows linearly over tokens')
    a('--attn_temp', type=float, default=1.0, help="TarFlow: the unconditional stream's attention "
      'temperature (!= 1: guidance for unconditional models)')
    a('--denoise', action=yes_no, default=True, help='TarFlow: Tweedie denoising at the end')
    a('--kv_dtype', choices=['fp32', 'bf16'], default='fp32', help='the KV cache (bf16: half)')
    a('--jacobi', type=float, metavar='TOL', help='TarFlow: Jacobi passes over all tokens until '
      'none moves by > TOL (0: exact), not the sequential inverse (the default, deterministic)')
    a('--noise_std', type=float, help='ml-tarflow: its training sigma, if not in its file name')
    a = p.add_argument_group('inpainting and editing (a reverse checkpoint: F and G)').add_argument
    a('--inpaint', help='image to complete: keep the noise of the known tokens, redraw the rest')
    a('--mask', help='with --inpaint: image of the same size, white = region to regenerate')
    a('--edit', help='image to re-draw as class --to_class (encoded with --labels as its class)')
    a('--to_class', type=int, help='with --edit: the target class')
    args = p.parse_args(argv)
    # and --device: one line naming the flag, before any model; FID's covariance needs 2 samples
    check_flags(vars(args), {**RANGES, 'num_samples': '[2, inf)'} if args.fid else RANGES)
    if args.inpaint and args.mask is None or args.edit and args.to_class is None:
        raise UsageError('--inpaint needs --mask (white: redraw); --edit needs --to_class')
    return p, args, None if args.labels is None else torch.tensor(args.labels)


def main(argv=None):
    _, args, labels = get_args(argv)
    rank, world, device = setup_distributed(args.device)
    # TF32 matmuls on a GPU; sampling stays in fp32 otherwise (the inverse compounds errors)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # before loading and sampling, on rank 0 (which writes and scores): a FID-50K run must not end
    # in a path it cannot write, a missing network or a bad reference
    def check():
        for flag, path in (('--out', args.out), ('--npz', args.npz)):
            if path is not None:
                check_writable(path, flag)
        if args.fid:
            inception = fid.load_inception(args.inception, device)
            return fid.check_reference(args.fid, inception) and inception
    inception = on_rank0(check, rank, world)

    # ---- the model(s): a TarFlow, or a reverse model G with the frozen F it was trained against
    model, flow, decode = load_models(args.ckpt, device, args.noise_std, rank == 0, args.vae)
    ncls = model.cfg.num_classes
    for flag, v in (('--labels', args.labels), ('--to_class', args.to_class)):
        if v is not None and not all(0 <= c < ncls for c in np.atleast_1d(v)):
            raise UsageError(f'{flag} {v}: the model has {ncls} classes')

    # ---- the images: an image in and its completions or edit (one process), or samples drawn
    # by index over the ranks: a look-at grid (a row per class), or N (labels drawn uniformly)
    if args.inpaint or args.edit:
        (imgs, labs, grid), bad = training_free(args, model, flow, decode, labels, device), 0
    else:   # each rank decodes its share of global indices; rank 0 alone writes and scores them
        imgs, labs, bad = gather_shards(*sample_shard(
            model, flow, args.num_samples, rank, world, args.seed, args.batch_size, labels,
            rank == 0, decode, guidance=args.guidance, guidance_mode=args.guidance_mode,
            ramp=args.ramp, attn_temp=args.attn_temp, denoise=args.denoise, jacobi=args.jacobi,
            kv_dtype=torch.bfloat16 if args.kv_dtype == 'bf16' else None), world)
        grid = None if imgs is None else imgs[:100]   # a default run: a row per class

    if rank == 0:
        if bad:
            print(f'WARNING: {bad} of {len(imgs)} samples not finite (kept, as grey pixels)')
        if args.npz:  # first: the samples are the costly part, the grid is only a look at them
            atomic_write(args.npz, lambda f: save_npz(f, arr_0=imgs, arr_1=labs))
            print(f'wrote {args.npz}: arr_0 {imgs.shape} uint8, arr_1 {labs.shape} labels')
        # the grid: the first 100 samples, or one row of an image and its completions or edit
        save_grid(grid, args.out,
                  nrow=len(grid) if args.inpaint or args.edit else 10 if ncls else 8)
        print(f'wrote {args.out}: {len(grid)} images ({len(imgs)} samples)')
        if args.fid:   # printed with N and the reference, so the number cannot be misread
            res = fid.fid_from_samples(imgs, args.fid, inception, device)
            print(f'FID {res["fid"]:.4f} on {len(imgs)} samples vs {args.fid}' + (
                f' | IS {res["inception_score"]:.3f}' if res.get('inception_score') else ''))
    # a clean exit, together: rank 0 may still be writing and scoring when the others get here
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()   # torchrun reports a rank that leaves the group open


if __name__ == '__main__':
    run_cli(main)
