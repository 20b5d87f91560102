"""
Train TarFlow (stage 1, exact maximum likelihood) or BiFlow's reverse model G (stage 2, against a
frozen F), under python or torchrun, on CPU or GPUs: DDP when launched by torchrun (gloo on CPU,
NCCL on GPU), bf16 autocast on GPU with the flow math in fp32.

    python train.py                                                  # stage 1, built-in digits
    python train.py --stage reverse --forward_ckpt out/forward.pt    # stage 2 on the same data
    python train.py --resume out/forward.pt                          # continue a run
    torchrun --nproc_per_node=8 train.py --preset imagenet64 --data /path/to/imagenet/train
    torchrun --nproc_per_node=8 train.py --stage reverse --preset imagenet64 \\
        --data /path/to/imagenet/train --forward_ckpt out/forward.pt
    torchrun --nproc_per_node=8 train.py --preset itarflow-b2 --data in256_latents \\
        --vae sd-vae-ft-mse.safetensors --out_dir in256   # BiFlow's setting: SD-VAE latents

Writes OUT_DIR/{stage}.pt (atomically; continue it with --resume), OUT_DIR/{stage}_samples.png and
OUT_DIR/{stage}_log.jsonl (a JSON row every --log_every steps: loss and its terms, grad norm, lr,
speed; plus held-out bits/dim and FID rows). A run claims OUT_DIR for its stage by creating the log
exclusively: a second run into it is refused, and a run that was killed is continued with --resume.
A resume takes every setting from the checkpoint; only these flags may be given with it (RESUMABLE):
--max_steps (a longer or shorter run), --stop_at, --out_dir, the --*_every intervals,
--eval_samples, --fid_samples, --sample_guidance, the hardware flags, and the paths of the files on
another machine (--data, --val_data, --vae, --lpips, --vgg, --convnext, --fid_ref, --inception).

The file reads top to bottom: presets, flags and settings, the per-step randomness, the steps and
their side jobs, setup, then the loop.
"""
import argparse
import json
import math
import os
import pathlib
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fid
from data import (HelpFormatter, LatentDataset, Loader, UsageError, atomic_write, check_flags,
                  check_writable, latent_norm, on_rank0, open_source, run_cli, setup_distributed)
from model import (PRESETS, ReverseModel, TarFlow, forward_loss, reverse_config_for,
                   reverse_loss)
from perceptual import PerceptualLoss, load_weights
from sample import distributed_fid, generate_grid, latent_decoder, read_checkpoint

# Optimisation defaults per preset. The paper runs follow TarFlow's recipes (AdamW (0.9, 0.95),
# lr 1e-4, batch 256, warm-up of one epoch, cosine to 1e-6, no gradient clipping); the EMA is ours
# (TarFlow samples from the raw weights). The CPU run is sized to finish in minutes on 2 cores; its
# higher lr is why it clips gradients.
_PAPER = dict(lr=1e-4, grad_clip=0.0, ema=0.9999, eval_every=10_000, eval_samples=10_000)
# The perceptual terms run through the VAE decoder (622 GFLOPs and about 1 GB of saved activations
# an image at 256^2): on every 8th image they about double a step's FLOPs (bench.py's estimate)
_IN64 = dict(_PAPER, batch_size=256, max_steps=1_000_000, warmup_steps=5000)
_LATENT = dict(_PAPER, batch_size=1024, max_steps=200_000, warmup_steps=1251, perceptual_every=8)
TRAIN_PRESETS = {
    # 4000 steps of batch 32 (128k images, about 2 epochs of the digits' 60k) per stage
    'cpu': dict(batch_size=32, lr=2e-3, max_steps=4000, warmup_steps=100, grad_clip=1.0, ema=0.999,
                eval_every=1000, eval_samples=1000),
    **dict.fromkeys(['imagenet64', 'imagenet64-p4'], _IN64),
    # width 1024 keeps ~80 GiB of activations at 32 images per GPU:
    # recompute each flow in the backward (bench.py)
    'imagenet64-1024': dict(_IN64, grad_checkpoint=True),
    # ImageNet 128 and AFHQ 256: batch sizes and epochs of Apple's recipes (one epoch of warm-up)
    'imagenet128': dict(_PAPER, batch_size=768, max_steps=534_000, warmup_steps=1668,
                        grad_checkpoint=True),
    'afhq256': dict(_PAPER, batch_size=256, max_steps=250_000, warmup_steps=60),
    # BiFlow's ablation length, 160 epochs of ImageNet at batch 1024 (its group's batch), one epoch
    # of warm-up; both stages, as for the pixel presets (the paper gives no other schedule)
    **dict.fromkeys(['itarflow-b2', 'biflow-b2'], _LATENT),
    # 64 of 80 GB without (bench.py): too close
    'itarflow-xl2': dict(_LATENT, grad_checkpoint=True),
}
MIN_LR = 1e-6   # TarFlow's: cosine decay to 1e-6
PERCEPTUAL_WEIGHTS = {'lpips': 0.4, 'convnext': 0.1}   # BiFlow's weights of the two terms
MAX_SKIPS = 20   # this many non-finite steps in a row (seen at a log row): the run has diverged
# What a --resume may change: the run's length, how often things are written, hardware, and the
# paths of the same files on another machine. The rest is the checkpoint's; giving it is refused.
RESUMABLE = set('resume max_steps stop_at out_dir data val_data vae lpips vgg convnext '
                'fid_ref inception log_every ckpt_every sample_every sample_guidance eval_every '
                'eval_samples fid_every fid_samples device compile grad_checkpoint '
                'num_workers'.split())
# The numbers each flag may take; 0 means none (no warm-up, no classes, no clipping, ...)
RANGES = {**dict.fromkeys('max_steps batch_size stop_at log_every ckpt_every sample_every '
                          'eval_every eval_samples fid_every perceptual_every'.split(), '[1, inf)'),
          **dict.fromkeys('lr warmup_steps grad_clip num_classes noise_std norm_clip w_max '
                          'num_workers'.split(), '[0, inf)'),
          'label_drop': '[0, 1]', 'ema': '[0, 1]', 'sample_guidance': '(-inf, inf)',
          'fid_samples': '[2, inf)'}   # a covariance needs 2


def get_args(argv=None):
    """-> (args, given): a fresh run's settings (flag defaults < --preset's < the flags given)
    and the flags given, by name. A default of None comes from --preset (or F's model preset)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument_group('data and model').add_argument
    add('--data', default='digits', help="'digits' (built-in), an ImageFolder root, a .npz/.npy "
        'file, or a latent set of `vae.py encode`')
    add('--vae', help='the SD-VAE that encoded latent --data (weight file or diffusers folder)')
    add('--val_data', help="stage 1's held-out images for bits/dim (None: the data's own split)")
    add('--stage', choices=['forward', 'reverse'], default='forward', help='train F, or G of an F')
    add('--preset', choices=sorted(TRAIN_PRESETS), default='cpu', help='model size and '
        'optimisation; itarflow-b2, itarflow-xl2 and biflow-b2 (stage 2) take latent --data')
    add('--num_classes', type=int, help='stage 1: classes of the model; 0: unconditional')
    add('--noise_std', type=float, help='stage 1: sigma of the training noise')
    add('--noise_type', choices=['gaussian', 'uniform'], default='gaussian', help='stage 1: '
        'Gaussian noise of --noise_std (to sample) or uniform dequantisation (for bits/dim)')
    add('--norm_clip', type=float, help='stage 1: alpha, mu -> c*tanh(./c) (BiFlow); 0: as TarFlow')
    add = p.add_argument_group('optimisation (None: from --preset)').add_argument
    add('--max_steps', type=int, help='optimizer steps of the run')
    add('--batch_size', type=int, help='global batch size over all ranks')
    add('--lr', type=float, help='peak learning rate (then cosine decay to 1e-6)')
    add('--warmup_steps', type=int, help='linear warm-up steps')
    add('--grad_clip', type=float, help='clip the global gradient norm to this; 0: off, as TarFlow')
    add('--ema', type=float, help='EMA decay of the weights that sample')
    add('--label_drop', type=float, default=0.1, help='labels dropped to the null class (for CFG)')
    add('--seed', type=int, default=0, help='seed of the weights, the data order and the noise')
    add = p.add_argument_group('stage 2: the reverse model G').add_argument
    add('--forward_ckpt', help='the forward checkpoint to invert (its EMA weights, frozen)')
    add('--align', choices=['hidden', 'distill', 'naive'], default='hidden', help="G's targets")
    add('--denoise', choices=['learned', 'score', 'none'], default='learned', help='how G denoises')
    add('--reverse_norm', action=argparse.BooleanOptionalAction, default=True,
        help='compare states divided by the target RMS (reverse-side norm control)')
    add('--guidance_mode', choices=['train', 'inference'], default='train', help='G conditioned '
        'on the guidance scale (Eq. 5, 1-NFE) or plain (CFG at inference, 2-NFE)')
    add('--w_max', type=float, default=3.0, help='training-time CFG scales lie in [0, w_max]')
    add('--lpips', help="LPIPS linear weights (lpips' weights/v0.1/vgg.pth); needs --vgg")
    add('--vgg', help="torchvision's vgg16-397923af.pth, the LPIPS trunk")
    add('--convnext', help='convnextv2_base_22k_224_ema.pt for the ConvNeXt feature loss')
    add('--perceptual_every', type=int, default=1,
        help='the perceptual terms see every k-th image (the latent presets: 8)')
    add = p.add_argument_group('outputs and resuming').add_argument
    add('--out_dir', default='out', help='where checkpoints, sample grids and the log go')
    add('--overwrite', action='store_true', help="replace this stage's earlier run in --out_dir")
    add('--resume', help='continue the run saved in this checkpoint, with its settings')
    add('--stop_at', type=int, help='end this job at this step, the schedule unchanged')
    add('--log_every', type=int, default=50, help='steps between log rows')
    add('--ckpt_every', type=int, default=1000, help='steps between checkpoints (and at the end)')
    add('--sample_every', type=int, default=1000, help='steps between sample grids (and the end)')
    add('--sample_guidance', type=float, default=2.0, help='CFG scale of the grids and FID samples')
    add('--eval_every', type=int, help='stage 1: steps between held-out bits/dim')
    add('--eval_samples', type=int, help='stage 1: held-out images per evaluation')
    add('--fid_ref', help='reference statistics (.npz of mu, sigma) for an FID monitor')
    add('--fid_every', type=int, default=10000, help='steps between FID evaluations')
    add('--fid_samples', type=int, default=4096, help='EMA samples per FID (not FID-50K)')
    add('--inception', help='pt_inception-2015-12-05-6726825d.pth for FID')
    add = p.add_argument_group('hardware').add_argument
    add('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    add('--compile', action='store_true', help='torch.compile the model and F (GPU runs)')
    add('--grad_checkpoint', action=argparse.BooleanOptionalAction, default=False,
        help="stage 1: recompute each flow in the backward (less memory; on in big presets)")
    add('--num_workers', type=int, help='data loader workers per rank (None: 0 on CPU, 8 on CUDA)')
    defaults = vars(p.parse_args([]))
    # parsed into a namespace of Nones: argparse fills in no default, so None means "not given"
    given = {k: v for k, v in vars(p.parse_args(argv, argparse.Namespace(
        **dict.fromkeys(defaults)))).items() if v is not None}
    check_flags(given, RANGES)   # and --device
    preset = TRAIN_PRESETS[given.get('preset', defaults['preset'])]
    return argparse.Namespace(**{**defaults, **preset, **given}), given


def settings(argv):
    """-> (args, resume): the run's settings and, with --resume, the checkpoint as the reader
    gives it (checkpoint, EMA model, F or None), whose settings the run keeps but for the
    RESUMABLE flags given now."""
    args, given = get_args(argv)
    # (checkpoint, its EMA model, its F): every part checked against this code (sample.py)
    resume = read_checkpoint(args.resume, '--resume', resume=True) if args.resume else None
    if args.resume:
        ck = resume[0]   # and the training state: settings of this code, optimizer, loader, rng
        state = dict(train_config=dict, step=int, optimizer=dict, loader=dict, rng=torch.Tensor)
        if lost := [k for k, t in state.items() if not isinstance(ck.get(k), t)]:
            raise UsageError(f'--resume {args.resume}: has no valid {", ".join(lost)} (a resume '
                             'needs the whole training state)')
        if (ck['train_config'].keys() != vars(args).keys() or ck['train_config']['stage'] != ck[
                'kind'] or ck['rng'].shape != torch.get_rng_state().shape or ck['loader'].keys()
                != {'epoch', 'step', 'n'} or {'state', 'param_groups'} - ck['optimizer'].keys()):
            raise UsageError(f'--resume {args.resume}: its training state (train_config, '
                             'optimizer, loader or rng) is not the one this train.py saves')
        if fixed := sorted(set(given) - RESUMABLE):
            raise UsageError(f'--resume {args.resume} continues the saved run with its settings: '
                             f'{", ".join("--" + k for k in fixed)} cannot be given; only '
                             f'{", ".join("--" + k for k in sorted(RESUMABLE - {"resume"}))} can')
        # --stop_at and --overwrite belong to the job that gave them, not to the run
        args = argparse.Namespace(**{**ck['train_config'], 'stop_at': None,
                                     'overwrite': False, **given})
        check_flags({'device': args.device}, {})   # the saved --device, on this machine
        if min(args.max_steps, args.stop_at or math.inf) <= ck['step']:
            raise UsageError(f'--resume {args.resume}: the checkpoint is at step {ck["step"]}, '
                             'where this job would stop: raise --max_steps or --stop_at')
    elif args.stage == 'reverse' and not args.forward_ckpt:
        raise UsageError('--stage reverse needs --forward_ckpt (written by --stage forward)')
    if args.stage == 'forward' and args.preset not in PRESETS:
        raise UsageError(f'--preset {args.preset} names a reverse model: stage 1 takes one of '
                         + ', '.join(PRESETS))
    if args.lpips and not args.vgg:
        raise UsageError('--lpips needs --vgg (the VGG16 trunk weights)')
    return args, resume


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to MIN_LR at --max_steps."""
    # step 0 already takes a small step (TarFlow starts from min_lr; see README)
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    # past max_steps (never reached) the cosine would rise again: hold it at MIN_LR
    t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return MIN_LR + 0.5 * (args.lr - MIN_LR) * (1 + math.cos(math.pi * min(t, 1.0)))


def step_inputs(args, step, x, y, num_classes, rank, world):
    """-> (eps, y, w), the random inputs of one step: training noise eps (x's shape), labels with
    --label_drop of them replaced by the null class -1 (None for an unconditional model), and stage
    2's guidance scales w (B,): a quarter at 0, the rest uniform in [0, w_max], 0 where the label
    was dropped.
    All are drawn for the whole global batch from (seed, step) and then sliced: one process and W
    ranks see the same numbers, and a resume continues the stream. They are drawn on x's device (a
    GPU's own generator): no host-to-device copy, nothing for the step to wait on."""
    B, b = args.batch_size, args.batch_size // world
    # a prime stride keeps the streams of (seed, step) and
    # (seed + 1, step') apart for any run shorter than 1M steps
    gen = torch.Generator(device=x.device).manual_seed(args.seed * 1_000_003 + step)
    # draw for all B, keep this rank's rows: ranks are disjoint and match one process row for row
    eps = torch.randn((B, *x.shape[1:]), generator=gen, device=x.device)[rank * b:(rank + 1) * b]
    # columns: label drop, w = 0?, w
    u = torch.rand(B, 3, generator=gen, device=x.device)[rank * b:(rank + 1) * b]
    y = torch.where(u[:, 0] < args.label_drop, -1, y) if num_classes else None
    w = (guidance_scales(u[:, 1:], args.w_max) if args.stage == 'reverse'
         and args.guidance_mode == 'train' else torch.zeros_like(u[:, 1]))
    # dropped labels train the null class, unguided
    return eps, y, w if y is None else torch.where(y < 0, 0.0, w)


def posterior_sample(args, step, moments, mean, std, rank, world):
    """Latent data: a sample of each image's VAE posterior, mu + s * eps, normalised per channel
    ((. - mean) / std). moments (b, 2, C, h, w) = [mu, s] of the image or its flip (the loader's
    choice). eps is drawn, like step_inputs', for the global batch from (seed, step) and sliced,
    from a stream of its own (offset 2**40)."""
    B, b = args.batch_size, args.batch_size // world
    gen = torch.Generator(device=moments.device).manual_seed(args.seed * 1_000_003 + step + 2 ** 40)
    mu, s = moments.unbind(1)
    eps = torch.randn((B, *mu.shape[1:]), generator=gen, device=mu.device)[rank * b:(rank + 1) * b]
    return (mu + s * eps - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)   # (b, C, h, w)


def crop_generator(seed, step, rank):
    """The CPU generator of one rank's perceptual crop boxes at one step. Ranks crop differently
    (one global generator gave every rank the same boxes), and a resume redraws the boxes of the
    uninterrupted run, whatever else used the global RNG. The CPU generator keeps 32 bits of a seed:
    odd multipliers mix (seed, step) and rank into them, so one rank's steps never share boxes, nor
    do two ranks at one step."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 0x9E3779B1
                                          + rank * 0x85EBCA77) % 2**32)


def guidance_scales(u, w_max):
    """Training-time CFG's scales from uniforms u (B, 2): a quarter at w = 0, so that G keeps the
    plain conditional sample (the paper is silent; see README), the rest uniform in [0, w_max]."""
    return torch.where(u[:, 0] < 0.25, 0.0, u[:, 1] * w_max)


def stage_loss(args, model, flow, x, y, w, eps, perceptual, step, rank):
    """-> (loss, metrics) of one step: stage 1 the exact NLL of the noisy data; stage 2 G's
    alignment with F's trajectory (computed inside, without gradients, in fp32), one distance per
    aligned depth, plus the perceptual terms, whose crop boxes come from (seed, step, rank)."""
    if args.stage == 'forward':
        loss, nll, _ = forward_loss(model, x, y, eps, args.noise_type,
                                    checkpoint=args.grad_checkpoint)
        metrics = {'loss': loss.detach()}
        if args.noise_type == 'uniform':   # the bin constant only applies to dequantised data
            metrics['bpd'] = TarFlow.bits_per_dim(nll.detach()).mean()
        return loss, metrics
    if y is None:   # an unconditional G: index 0 is its null class
        y = torch.zeros(len(x), dtype=torch.long, device=x.device)
    crops = crop_generator(args.seed, step, rank) if perceptual else None
    loss, terms = reverse_loss(model, flow, x, y, w, eps, perceptual, PERCEPTUAL_WEIGHTS,
                               generator=crops, perceptual_every=args.perceptual_every)
    return loss, {'loss': loss.detach(), **terms}


def update(loss, model, ema, opt, step, args):
    """Backward (DDP averages the gradients, so every rank agrees on finiteness), clip, then an
    optimizer and EMA step that is skipped on the device when the gradient is not finite: an `if`
    would wait for the GPU on every step. -> (gradient norm, bad), 0-dim tensors on the device."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
    bad = ~torch.isfinite(gnorm)
    opt.found_inf = bad.float()   # fused AdamW leaves weights, moments and step alone where it is 1
    opt.step()
    # the EMA's decay is (1+t)/(10+t) early on, so that a short run does not average in the random
    # initial weights, capped at --ema; on a bad step the EMA stays as it was
    ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)), ok=~bad)
    return gnorm.detach(), bad


@torch.no_grad()
def ema_update(ema, model, decay, ok=None):
    """ema <- decay * ema + (1 - decay) * model, over the parameters (neither model has buffers).
    ok: a 0-dim tensor, 1 to update, 0 to keep the EMA as it is (a skipped step), decided on the
    device without a host sync."""
    e, m = list(ema.parameters()), list(model.parameters())
    # ema + w (model - ema), as a lerp; a 0-dim tensor weight has no fast foreach lerp,
    # so sub, scale and add
    d = torch._foreach_sub(m, e)
    torch._foreach_mul_(d, (1 - decay) * ok if ok is not None else 1 - decay)
    torch._foreach_add_(e, d)


@torch.no_grad()
def heldout_bits_per_dim(model, dataset, n, batch_size, rank, world, device, ctx):
    """Bits/dim of the first n held-out images under uniform dequantisation, the number TarFlow
    reports (an upper bound on the discrete NLL, whatever noise the model was trained on). Image i's
    dequantisation noise is seeded by i, so evaluations compare across steps and world sizes. Every
    rank gets the same value."""
    n, total = min(n, len(dataset)), torch.zeros((), dtype=torch.float64, device=device)
    # rank r scores images r, r+W, ...: disjoint, all covered; the sum is reduced, then divided
    for start in range(rank, n, world * batch_size):
        ids = range(start, min(n, start + world * batch_size), world)
        images, labels = zip(*(dataset[i] for i in ids))
        x = torch.stack(images).to(device).float() / 127.5 - 1   # uint8 -> the model's [-1, 1]
        y = torch.tensor(labels, device=device) if model.cfg.num_classes else None
        eps = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(i))
                           for i in ids]).to(device)
        with ctx:
            total += forward_loss(model, x, y, eps, noise='uniform')[1].double().sum()
    if world > 1:
        dist.all_reduce(total)
    return TarFlow.bits_per_dim(total / n).item()


def build_models(args, resume, device):
    """-> (model, ema, flow, cfg, data_latent): the model this stage trains and its EMA copy
    (which samples, evaluates and is saved as 'ema'); in stage 2 the frozen F (the EMA weights of
    --forward_ckpt, or the copy a reverse checkpoint carries). data_latent: the latent metadata
    the data must have ('any' for a fresh stage 1: F's data in stage 2, the run's on resume)."""
    ck, ema, flow = resume or (None, None, None)
    if args.stage == 'reverse' and not resume:   # F: the EMA weights of a forward checkpoint
        ck, flow, _ = read_checkpoint(args.forward_ckpt, '--forward_ckpt', ('forward',))
    data_latent = ck.get('latent') if ck else 'any'   # G learns F's inverse on F's own data
    if args.stage == 'forward':
        keys = ('norm_clip', 'noise_std', 'num_classes')   # the model's flags; None: its preset's
        cfg = ema.cfg if resume else replace(
            PRESETS[args.preset], **{k: v for k in keys if (v := getattr(args, k)) is not None})
        vars(args).update({k: getattr(cfg, k) for k in keys})   # the settings say what was built
        model = TarFlow(cfg).to(device)
    else:   # (finite weights, checked by the reader: with a non-finite F every step would skip)
        flow = flow.to(device).eval().requires_grad_(False)
        cfg = ema.cfg if resume else reverse_config_for(
            flow.cfg, args.preset, align=args.align, denoise=args.denoise,
            norm=args.reverse_norm, guidance_mode=args.guidance_mode)
        model = ReverseModel(cfg).to(device)
    ema = (ema if resume else type(model)(cfg)).to(device).requires_grad_(False)
    if not resume:
        ema.load_state_dict(model.state_dict())
    return model, ema, flow, cfg, data_latent


def load_data(args, cfg, data_latent, device):
    """-> (dataset, latent, decode, norm, val), checked against the model before the first step:
    latent data (vae.py encode) must fit the model's geometry and the VAE, and be the data the
    model (or F) was trained on (latent: the metadata the checkpoint saves; decode: its
    LatentDecoder; norm: its per-channel (mean, std)); labels must fit the model's classes. val:
    stage 1's held-out pixel images for bits/dim (--val_data, or the data's own split), or None."""
    dataset = open_source(args.data, cfg.img_size, 'train', args.seed)
    if not len(dataset):
        raise UsageError(f'--data {args.data}: holds no images')
    model_shape = (cfg.in_channels, cfg.img_size, cfg.img_size)
    latent = decode = norm = None
    if isinstance(dataset, LatentDataset):
        latent = {k: dataset.meta[k] for k in ('img_size', 'latent_shape', 'vae', 'norm')}
        if (shape := tuple(latent['latent_shape'])) != model_shape:
            raise UsageError(f'--data {args.data} holds latents of shape {shape} (C, h, w), but '
                             f'the model takes {model_shape}: pick the --preset of that shape')
        norm = tuple(stat.to(device) for stat in latent_norm(dataset.meta))
        decode = latent_decoder(latent, args.vae, device, f'--data {args.data}')   # the same VAE
    elif cfg.in_channels != 3:
        raise UsageError(f'the model takes SD-VAE latents {model_shape}, but --data {args.data} '
                         'is pixels: encode it with `python vae.py encode SRC OUT --vae PATH`')
    if data_latent != 'any' and latent != data_latent:   # G learns F's inverse on F's own data
        raise UsageError(f'--data {args.data}: not the data that {args.resume or args.forward_ckpt}'
                         ' was trained on (pixels or latents, their VAE and normalisation)')
    if latent and args.val_data:
        raise UsageError('--val_data: bits/dim are of 8-bit pixels, not of latents')
    val = (None if args.stage == 'reverse' else dataset.heldout() if not args.val_data
           else open_source(args.val_data, cfg.img_size, 'val', args.seed))
    for ds, flag in ((dataset, f'--data {args.data}'),   # labels against the model's classes
                     (val, f'--val_data {args.val_data or "(the held-out split)"}')):
        if ds is not None and cfg.num_classes and not 0 < ds.num_classes <= cfg.num_classes:
            raise UsageError(f'{flag} has {ds.num_classes or "no"} classes, the model '
                             f'{cfg.num_classes}: give data with its labels, or train an '
                             'unconditional model (--num_classes 0, in stage 1)')
    return dataset, latent, decode, norm, val


def claim(args, step, ckpt, log):
    """Claim --out_dir for this stage (rank 0, for all ranks). The log is the claim: a fresh run
    creates it exclusively (O_EXCL: of two runs started together, one is refused); a --resume of
    the checkpoint beside it takes the run over, dropping the rows that a killed run logged after
    that checkpoint."""
    check_writable(args.out_dir, '--out_dir', folder=True)
    if args.resume and os.path.abspath(args.resume) == os.path.abspath(ckpt):
        # a row without its newline is the half-written last one of a killed run
        rows = ([r for r in open(log) if r.endswith('\n') and json.loads(r)['step'] <= step]
                if os.path.exists(log) else [])
        atomic_write(log, lambda f: f.write(''.join(rows).encode()))
    else:   # --overwrite empties an earlier run's log (its checkpoint goes at the first save)
        try:
            os.close(os.open(log, os.O_CREAT | os.O_WRONLY | (
                os.O_TRUNC if args.overwrite else os.O_EXCL), 0o666))   # rw for all, less umask
        except FileExistsError:
            raise UsageError(f'{log} exists (an earlier run): continue it with --resume {ckpt}, '
                             'pick another --out_dir, or pass --overwrite to replace it') from None
    # the folder's stage is this run's now: a killed run's temporaries (atomic_write's) go
    for tmp in pathlib.Path(args.out_dir).glob(args.stage + '*.*.tmp'):
        tmp.unlink()


def check_fid_ref(args, device):
    """--fid_ref must be statistics (the monitor would recompute images' at every evaluation)."""
    if args.fid_ref and fid.check_reference(
            args.fid_ref, fid.load_inception(args.inception, device)) != 'stats':
        raise UsageError(f'--fid_ref {args.fid_ref}: give reference statistics, made once with '
                         f'`python fid.py {args.fid_ref} --save_stats ref_stats.npz`')


def main(argv=None):
    args, resume = settings(argv)
    rank, world, device = setup_distributed(args.device)
    master, cuda = rank == 0, device.type == 'cuda'
    # stage 2's optional perceptual terms see every k-th image, the same for any number of ranks
    perceptual = args.stage == 'reverse' and (args.lpips or args.convnext) or None
    every = args.perceptual_every if perceptual else 1
    if args.batch_size % (world * every):
        raise UsageError(f'--batch_size {args.batch_size}: must split into {world} rank(s) of a '
                         f'multiple of --perceptual_every ({every} with perceptual terms, else 1)')
    torch.manual_seed(args.seed)   # the same initial weights on every rank
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # bf16 autocast on GPU; the flow math inside the models stays fp32
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else nullcontext()

    # ---- models, data, optimizer, the resumed state: every input is checked before the claim
    model, ema, flow, cfg, data_latent = build_models(args, resume, device)
    dataset, latent, decode, norm, val = load_data(args, cfg, data_latent, device)
    if perceptual:   # frozen networks, weights from local files
        perceptual = PerceptualLoss(*(load_weights(getattr(args, k), k)
                                      for k in ('lpips', 'vgg', 'convnext'))).to(device)
        perceptual.decode = decode   # on latents they compare decoded images; G gets the gradient
    on_rank0(lambda: check_fid_ref(args, device), rank, world)
    # TarFlow's AdamW, decay 1e-4 on every parameter (the lr is set at each step). Fused: it takes
    # a found_inf flag, which skips a non-finite step on the device instead of a host-side `if`
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95), weight_decay=1e-4, fused=True)
    # decoding JPEGs needs workers on GPU; on CPU they would compete with the model for the cores
    loader = Loader(dataset, args.batch_size, rank, world, args.seed, pin_memory=cuda,
                    num_workers=8 * cuda if args.num_workers is None else args.num_workers,
                    flip=dataset.mirrors)   # a resume continues its order exactly
    step = resume[0]['step'] if resume else 0
    if resume:   # (the reader loaded the EMA weights)
        for obj, key in ((model, 'model'), (opt, 'optimizer'), (loader, 'loader')):
            obj.load_state_dict(resume[0][key])
        torch.set_rng_state(resume[0]['rng'])
    del resume   # the loaded tensors are copied into the models: free them
    ckpt_path, log_path = (os.path.join(args.out_dir, args.stage + end)
                           for end in ('.pt', '_log.jsonl'))
    on_rank0(lambda: claim(args, step, ckpt_path, log_path), rank, world)
    # `raw` stays the plain module for saving, EMA and sampling; F's pass is ~44% of a stage-2
    # step's FLOPs, so it is compiled too. DDP's gradients live in its buckets (no second copy)
    raw, flow_fn = model, flow
    if args.compile:
        model, flow_fn = torch.compile(model), flow and torch.compile(flow)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if cuda else None,
                    gradient_as_bucket_view=True)
    if master:   # what trains, where, with every setting: a log that describes itself
        print(f'{args.stage} model: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M '
              f'parameters, {world} rank(s) on {device}, {"bf16" if cuda else "fp32"}\n'
              + '\n'.join(f'  {k:16s} {v}' for k, v in sorted(vars(args).items())))

    def log(row, end=''):   # rank 0 prints the step's row, and appends it to the log in full
        if master:
            print(f'step {step}/{args.max_steps} | ' + ' | '.join(
                f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items())
                + end)
            with open(log_path, 'a') as f:
                f.write(json.dumps({'step': step, **row}) + '\n')

    def save():   # rank 0 writes everything the next step needs, atomically; the others wait
        if master:
            ck = dict(kind=args.stage, step=step, latent=latent, model=raw.state_dict(),
                      ema=ema.state_dict(), optimizer=opt.state_dict(), loader=loader.state_dict(),
                      model_config=asdict(cfg), train_config=vars(args), rng=torch.get_rng_state())
            if flow is not None:   # stage 2 carries its frozen F
                ck.update(forward_config=asdict(flow.cfg), forward=flow.state_dict())
            atomic_write(ckpt_path, lambda f: torch.save(ck, f))
        if world > 1:
            dist.barrier()

    # ---- the loop: a step, its log row, then checkpoint, held-out bits/dim, grid and FID; the
    # checkpoint of a step comes before the work that could fail at it
    it, acc, t0 = iter(loader), {}, time.time()
    # non-finite steps, counted on the device (a step never waits for the host): all, the streak
    skipped, streak = torch.zeros(2, dtype=torch.long, device=device).unbind()
    stop = min(args.max_steps, args.stop_at or args.max_steps)   # --stop_at ends the job only
    while step < stop:
        x, y = (t.to(device, non_blocking=True) for t in next(it))
        if latent:   # (b, 2, C, h, w) posterior moments -> a normalised latent sample (b, C, h, w)
            x = posterior_sample(args, step, x, *norm, rank, world)
        eps, y, w = step_inputs(args, step, x, y, cfg.num_classes, rank, world)
        # the lr is a function of the step: a resume continues the schedule exactly
        opt.param_groups[0]['lr'] = lr = lr_at(step, args)
        with ctx:
            loss, metrics = stage_loss(args, model, flow_fn, x, y, w, eps, perceptual, step, rank)
        metrics['gnorm'], bad = update(loss, raw, ema, opt, step, args)
        skipped, streak = skipped + bad, (streak + 1) * bad
        acc = {k: acc.get(k, 0.) + v.float() for k, v in metrics.items()}   # read at log rows
        step += 1
        if step % args.log_every == 0 or step == stop:
            if streak.item() >= MAX_SKIPS:   # checked here: a check per step would sync per step
                raise SystemExit(f'stopping at step {step}: {streak.item()} non-finite steps in a '
                                 f'row: the run has diverged (last checkpoint: {ckpt_path})')
            n, dt = (step - 1) % args.log_every + 1, time.time() - t0   # steps in this interval
            # the metric sums -> means over the interval and the ranks: one reduction, one read
            means = torch.stack(list(acc.values())) / (n * world)
            if world > 1:
                dist.all_reduce(means)
            log({**dict(zip(acc, means.tolist())), 'lr': lr, 'img_per_s': n * args.batch_size / dt,
                 'ms_per_step': 1000 * dt / n, 'skipped': skipped.item()},
                f' | ETA {timedelta(seconds=round((stop - step) * dt / n))}')
            acc, t0 = {}, time.time()
        # the job's last checkpoint is always written: skipped steps left the weights as they were
        if step == stop and (skips := streak.item()) and master:
            print(f'step {step}: the last {skips} step(s) were non-finite and skipped: saving the '
                  f'weights of step {step - skips}')
        if step % args.ckpt_every == 0 and streak.item() == 0 or step == stop:
            save()
        if val is not None and (step % args.eval_every == 0 or step == stop):   # EMA weights
            log({'val_bpd': heldout_bits_per_dim(ema, val, args.eval_samples, max(
                64, 2 * args.batch_size // world), rank, world, device, ctx)})
        if master and (step % args.sample_every == 0 or step == stop):
            generate_grid(ema, flow, os.path.join(args.out_dir, f'{args.stage}_samples.png'),
                          guidance=args.sample_guidance, seed=args.seed, decode=decode)
        # at the run's end, not a job's: a --stop_at job would add a row the run never logs
        if args.fid_ref and (step % args.fid_every == 0 or step == args.max_steps):
            r = distributed_fid(ema, flow, args.fid_ref, args.fid_samples, args.sample_guidance,
                                args.seed, rank, world, device, args.inception, decode)
            if master:   # the other ranks get None
                log({'fid': r['fid'], 'fid_samples': args.fid_samples, 'ref': args.fid_ref})
    # a clean exit, together: rank 0 may still be drawing its grid when the others get here, and a
    # rank that leaves while another still talks to it can abort at exit (torchrun reports both)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    run_cli(main)
