"""
Train TarFlow (stage 1, exact maximum likelihood) or BiFlow's reverse model (stage 2, F frozen),
under python or torchrun, on CPU or GPUs. One code path: DDP when launched by torchrun (gloo on CPU,
NCCL on GPU).

    python train.py                                   # stage 1, built-in digits, CPU preset
    python train.py --stage reverse --forward_ckpt out/forward.pt   # stage 2 on the same data
    python train.py --resume out/forward.pt           # continue a run; settings from the file
    torchrun --nproc_per_node=8 train.py --preset imagenet64 --data /path/to/imagenet/train
    torchrun --nproc_per_node=8 train.py --stage reverse --preset imagenet64 \\
        --data /path/to/imagenet/train --forward_ckpt out/forward.pt
    torchrun --nproc_per_node=8 train.py --preset itarflow-b2 --data in256_latents \\
        --vae sd-vae-ft-mse.safetensors --out_dir in256   # BiFlow's setting: SD-VAE latents

Writes OUT_DIR/{stage}.pt (atomic, resumable with --resume), OUT_DIR/{stage}_samples.png and
OUT_DIR/{stage}_log.jsonl (one JSON row per --log_every steps: loss and its terms, grad norm, lr,
speed; stage 1 adds held-out bits/dim rows). A fresh run refuses an OUT_DIR that holds a run of the
same stage unless --overwrite is given.

The file reads top to bottom: presets, flags, the resume rules, the per-step randomness, the loop.
"""
import argparse
import datetime
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fid
from data import (HelpFormatter, LatentDataset, Loader, RunLock, UsageError, atomic_write,
                  build_dataset, hms, latent_norm, read_torch_file, run_cli, setup_distributed)
from model import (PAPER_MODELS, PRESETS, FlowConfig, ReverseConfig, ReverseModel, TarFlow,
                   config_from_dict, forward_loss, patchify, reverse_config_for, reverse_loss)
from perceptual import PerceptualLoss, load_weights
from sample import distributed_fid, generate_grid, latent_decoder

# Optimisation defaults per preset. The paper runs follow TarFlow's recipes (AdamW (0.9, 0.95),
# lr 1e-4, batch 256, warm-up of one epoch, cosine to 1e-6, no gradient clipping); the EMA is ours
# (TarFlow samples from the raw weights). The CPU run is sized to finish in minutes on 2 cores; its
# higher lr is why it clips gradients.
_PAPER = dict(lr=1e-4, grad_clip=0.0, ema=0.9999, eval_every=10_000, eval_samples=10_000,
              grad_checkpoint=False, perceptual_every=1)
# The perceptual terms run through the VAE decoder (622 GFLOPs and about 1 GB of saved activations
# an image at 256^2): on every 8th image they about double a step's FLOPs (bench.py's estimate)
_LATENT = dict(_PAPER, batch_size=1024, max_steps=200_000, warmup_steps=1251, perceptual_every=8)
TRAIN_PRESETS = {
    # 4000 steps of batch 32 (128k images, about 2 epochs of the digits' 60k) per stage
    'cpu': dict(batch_size=32, lr=2e-3, max_steps=4000, reverse_max_steps=4000, warmup_steps=100,
                grad_clip=1.0, ema=0.999, eval_every=1000, eval_samples=1000,
                grad_checkpoint=False, perceptual_every=1),
    'imagenet64': dict(_PAPER, batch_size=256, max_steps=1_000_000, warmup_steps=5000),
    # width 1024 keeps ~80 GiB of activations at 32 images per GPU:
    # recompute each flow in the backward (bench.py)
    'imagenet64-1024': dict(_PAPER, batch_size=256, max_steps=1_000_000, warmup_steps=5000,
                            grad_checkpoint=True),
    'imagenet64-p4': dict(_PAPER, batch_size=256, max_steps=1_000_000, warmup_steps=5000),
    # ImageNet 128 and AFHQ 256: batch sizes and epochs of Apple's recipes (one epoch of warm-up)
    'imagenet128': dict(_PAPER, batch_size=768, max_steps=534_000, warmup_steps=1668,
                        grad_checkpoint=True),
    'afhq256': dict(_PAPER, batch_size=256, max_steps=250_000, warmup_steps=60),
    # BiFlow's ablation length, 160 epochs of ImageNet at batch 1024 (its group's batch), one epoch
    # of warm-up; both stages, as for the pixel presets (the paper gives no other schedule)
    'itarflow-b2': _LATENT,
    # 64 of 80 GB without (bench.py): too close
    'itarflow-xl2': dict(_LATENT, grad_checkpoint=True),
    'biflow-b2': _LATENT,
}

# What a --resume may change: where and how often things are written, hardware, and paths to the
# same files (data, weights) on another machine. Everything else defines the run and is taken from
# the checkpoint; a flag that contradicts it is refused.
RESUME_SAFE = {'resume', 'out_dir', 'stop_at', 'device', 'dtype', 'target_dtype', 'compile',
               'grad_checkpoint', 'num_workers', 'log_every', 'ckpt_every', 'sample_every',
               'sample_guidance', 'eval_every', 'eval_samples', 'val_data', 'fid_ref', 'fid_every',
               'fid_samples', 'inception', 'data', 'forward_ckpt', 'lpips', 'vgg', 'convnext',
               'max_skips', 'vae'}


def data_flags(p):
    """The data, and the VAE of latent data."""
    g = p.add_argument_group('data')
    g.add_argument('--data', default='digits',
                   help="'digits' (built-in, no download), an ImageFolder root, "
                   "or a .npz/.npy file")
    g.add_argument('--vae', default=None,
                   help='latent data (made by vae.py encode): the SD-VAE it was encoded with '
                   '(a weight file or a diffusers folder), to decode the sample grids and the FID '
                   "monitor and for stage 2's perceptual terms")
    g.add_argument('--val_data', default=None,
                   help="held-out images for stage 1's bits/dim (None: the digits' val split "
                   "when --data digits, else no evaluation)")


def model_flags(p):
    """The stage, the preset and the model."""
    g = p.add_argument_group('model and preset')
    g.add_argument('--stage', choices=['forward', 'reverse'], default='forward',
                   help='forward: TarFlow by maximum likelihood; '
                   'reverse: BiFlow reverse model against a frozen forward checkpoint')
    g.add_argument('--preset', choices=sorted(TRAIN_PRESETS), default='cpu',
                   help='model size and optimisation defaults; the latent ones '
                   '(itarflow-b2, itarflow-xl2, and biflow-b2 for stage 2) need latent --data')
    g.add_argument('--num_classes', type=int, default=None,
                   help='stage 1: classes of the model (None: from --preset); 0 trains an '
                   'unconditional model, e.g. on unlabelled data')
    g.add_argument('--noise_std', type=float, default=None,
                   help='stage 1: sigma of the training noise (None: from --preset)')
    g.add_argument('--noise_type', choices=['gaussian', 'uniform'], default='gaussian',
                   help='stage 1: gaussian noise of --noise_std (for sampling) or uniform '
                   'dequantisation (for bits/dim)')
    g.add_argument('--norm_clip', type=float, default=None,
                   help="stage 1: bound alpha, mu to c*tanh(./c), BiFlow's norm control; "
                   "0 = TarFlow exactly (None: from --preset: 4 for cpu, 0 for the paper presets)")


def optim_flags(p):
    """The optimiser and its schedule."""
    g = p.add_argument_group('optimisation (None: from --preset)')
    g.add_argument('--max_steps', type=int, default=None, help='optimizer steps')
    g.add_argument('--batch_size', type=int, default=None, help='global batch size over all ranks')
    g.add_argument('--lr', type=float, default=None, help='peak learning rate')
    g.add_argument('--min_lr', type=float, default=1e-6,
                   help='learning rate at the end of the cosine decay')
    g.add_argument('--warmup_steps', type=int, default=None, help='linear warm-up steps')
    g.add_argument('--weight_decay', type=float, default=1e-4,
                   help='AdamW weight decay (on all parameters, as TarFlow)')
    g.add_argument('--grad_clip', type=float, default=None,
                   help='clip the global gradient norm to this; 0: off, as TarFlow '
                   '(cpu: 1, the paper presets: 0)')
    g.add_argument('--ema', type=float, default=None,
                   help='EMA decay of the weights used for sampling')
    g.add_argument('--label_drop', type=float, default=0.1,
                   help='probability of replacing a label by the null class (for CFG)')
    g.add_argument('--seed', type=int, default=0,
                   help='seed for weights, data order, noise and labels')


def reverse_flags(p):
    """Stage 2's reverse model and its losses."""
    g = p.add_argument_group('stage 2: the reverse model')
    g.add_argument('--forward_ckpt', default=None,
                   help='the forward checkpoint to invert (its EMA weights, frozen)')
    g.add_argument('--align', choices=['hidden', 'distill', 'naive'], default='hidden',
                   help='how to supervise G')
    g.add_argument('--denoise', choices=['learned', 'score', 'none'], default='learned',
                   help='how G gets clean images')
    g.add_argument('--reverse_norm', action=argparse.BooleanOptionalAction, default=True,
                   help='compare states divided by the target RMS (reverse-side norm control)')
    g.add_argument('--guidance_mode', choices=['train', 'inference'], default='train',
                   help='train G conditioned on the guidance scale (Eq. 5, 1-NFE) or plain '
                   '(CFG at inference, 2-NFE)')
    g.add_argument('--w_max', type=float, default=3.0,
                   help='guidance scales for training-time CFG are drawn in [0, w_max]')
    g.add_argument('--lpips', default=None,
                   help="LPIPS linear weights (lpips' weights/v0.1/vgg.pth); needs --vgg")
    g.add_argument('--vgg', default=None, help="torchvision's vgg16-397923af.pth, the LPIPS trunk")
    g.add_argument('--convnext', default=None,
                   help='convnextv2_base_22k_224_ema.pt for the ConvNeXt feature loss')
    g.add_argument('--lpips_weight', type=float, default=0.4, help='weight of the LPIPS term')
    g.add_argument('--convnext_weight', type=float, default=0.1, help='weight of the ConvNeXt term')
    g.add_argument('--perceptual_every', type=int, default=None,
                   help='the perceptual terms see every k-th image of the global batch (the same '
                   'images for any number of ranks; None: from --preset, 8 for latents, where they '
                   'run through the VAE decoder)')
    g.add_argument('--cycle', type=float, default=0.0,
                   help='weight of the cycle term ||F(G(z)) - z||^2 on prior noise z ~ N(0, I) at '
                   'w = 0, through the frozen F (model.cycle_loss), added to the data-pair terms '
                   'with the same adaptive weighting; 0: off')
    g.add_argument('--cycle_batch', type=int, default=None,
                   help='prior noise draws per rank and step for --cycle '
                   "(None: the per-rank batch); their labels are the batch's first ones")
    g.add_argument('--target_dtype', choices=['fp32', 'bf16'], default='fp32',
                   help="F's forward pass for the targets: fp32 (exact, as the flow math "
                   "everywhere) or inside the bf16 autocast (faster; the states move by 0.3-2%%)")


def output_flags(p):
    """What is written, how often, and resuming."""
    g = p.add_argument_group('logging, checkpoints and resuming')
    g.add_argument('--out_dir', default='out',
                   help='where checkpoints, sample grids and the log go')
    g.add_argument('--overwrite', action=argparse.BooleanOptionalAction, default=False,
                   help='replace an earlier run of this stage in --out_dir (refused without)')
    g.add_argument('--resume', default=None,
                   help='continue the run saved in this checkpoint, with its settings (model, EMA, '
                   'optimizer, step, data position); flags that would change the run are refused')
    g.add_argument('--stop_at', type=int, default=None,
                   help='stop (with a checkpoint) after this step without changing the schedule, '
                   'to split a run into jobs; continue with --resume')
    g.add_argument('--max_skips', type=int, default=20,
                   help='stop the run after this many non-finite steps in a row')
    g.add_argument('--log_every', type=int, default=50,
                   help='print and log metrics every this many steps')
    g.add_argument('--eval_every', type=int, default=None,
                   help='stage 1: held-out bits/dim every this many steps (None: from --preset)')
    g.add_argument('--eval_samples', type=int, default=None,
                   help='stage 1: held-out images per evaluation (None: from --preset)')
    g.add_argument('--ckpt_every', type=int, default=1000,
                   help='write the checkpoint every this many steps (and at the end)')
    g.add_argument('--sample_every', type=int, default=1000,
                   help='write a sample grid every this many steps (and at the end)')
    g.add_argument('--sample_guidance', type=float, default=2.0,
                   help='guidance scale of the periodic sample grids and the FID monitor')


def fid_flags(p):
    """The FID monitor of EMA samples."""
    g = p.add_argument_group('FID monitor')
    g.add_argument('--fid_ref', default=None,
                   help='log FID of EMA samples against this reference '
                   '(stats .npz, .npz or folder)')
    g.add_argument('--fid_every', type=int, default=10000, help='steps between FID evaluations')
    g.add_argument('--fid_samples', type=int, default=4096,
                   help='samples per FID evaluation (a monitor, not FID-50K)')
    g.add_argument('--inception', default=None, help='path to pt_inception-2015-12-05-6726825d.pth')


def hardware_flags(p):
    """Devices, precision and speed."""
    g = p.add_argument_group('hardware')
    g.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu' or 'cuda'")
    g.add_argument('--dtype', choices=['auto', 'bf16', 'fp32'], default='auto',
                   help='autocast dtype; auto = bf16 on CUDA')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the model (GPU runs)')
    g.add_argument('--grad_checkpoint', action=argparse.BooleanOptionalAction, default=None,
                   help="stage 1: recompute each flow's activations in the backward (one more "
                   "forward pass, about T times less activation memory; None: from --preset, on "
                   "where bench.py projects more than 80 GB)")
    g.add_argument('--num_workers', type=int, default=None,
                   help='data loader workers per rank (None: 0 on CPU, 8 on CUDA)')


def get_args(argv=None):
    """-> (args, explicit): the flags with preset defaults filled in, and the names of the flags
    given on the command line (a resume takes everything else from the checkpoint)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for add_flags in (data_flags, model_flags, optim_flags, reverse_flags, output_flags,
                      fid_flags, hardware_flags):
        add_flags(p)
    args = p.parse_args(argv)
    # the flags given on the command line: parse again into a namespace that has every attribute
    # already, so that argparse fills in no default and only the given flags change
    unset = object()
    given = p.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
    explicit = {k for k, v in vars(given).items() if v is not unset}
    # bad numbers fail here, in one line naming the flag,
    # not as a traceback (or a silent no-op) steps later
    for k in ('max_steps', 'batch_size', 'perceptual_every', 'log_every', 'ckpt_every',
              'sample_every', 'fid_every', 'fid_samples', 'warmup_steps', 'eval_every',
              'eval_samples', 'max_skips', 'stop_at', 'num_classes', 'num_workers', 'cycle_batch'):
        v = getattr(args, k)
        # 0 means "none" for these
        low = 0 if k in ('warmup_steps', 'num_classes', 'num_workers') else 1
        if v is not None and v < low:
            p.error(f'--{k} {v}: must be an integer >= {low}')
    for k, lo, hi in (('label_drop', 0, 1), ('ema', 0, 1), ('lr', 0, math.inf),
                      ('noise_std', 0, math.inf), ('grad_clip', 0, math.inf),
                      ('norm_clip', 0, math.inf), ('w_max', 0, math.inf), ('cycle', 0, math.inf)):
        v = getattr(args, k)
        if v is not None and not lo <= v <= hi:  # also refuses nan
            p.error(f'--{k} {v}: must be in [{lo}, {hi}]')
    if args.lpips and not args.vgg:
        p.error('--lpips needs --vgg (the VGG16 trunk weights)')
    if args.cycle and args.stage == 'forward':
        p.error('--cycle is a stage-2 term (--stage reverse)')
    if args.resume and args.overwrite:
        p.error('--resume continues a run, --overwrite replaces one: pass one of them')
    return args, explicit


def fill_preset_defaults(args):
    """Flags left at None take the value of their --preset (stage 2 has its own step count)."""
    preset = dict(TRAIN_PRESETS[args.preset])
    # a preset may give stage 2 its own length; the paper presets do not: both stages run max_steps
    reverse_steps = preset.pop('reverse_max_steps', None)
    if args.stage == 'reverse' and reverse_steps:
        preset['max_steps'] = reverse_steps
    for k, v in preset.items():
        if getattr(args, k, None) is None:   # an explicit flag wins over the preset
            setattr(args, k, v)
    return args


def resume_args(args, explicit, ckpt, path):
    """The saved run's settings, with the flags given now that are safe to change; any other given
    flag that contradicts the checkpoint is an error naming the flag and both values."""
    saved = ckpt['train_config']
    # the stage is the checkpoint's kind; saying otherwise is a mistake worth naming, not a switch
    if 'stage' in explicit and args.stage != ckpt['kind']:
        raise UsageError(f'--resume {path} is a {ckpt["kind"]} checkpoint, '
                         f'but --stage is {args.stage}')
    # a flag repeated with the saved value is fine (a job script may pass all of them each time)
    bad = [f'--{k} {getattr(args, k)} (the checkpoint has {saved[k]})'
           for k in sorted(explicit - RESUME_SAFE)
           if k in saved and getattr(args, k) != saved[k]]
    if bad:
        raise UsageError(f'--resume {path}: a resume continues the saved run, but '
                         + '; '.join(bad) + '. Only these may change: '
                         f'{", ".join("--" + k for k in sorted(RESUME_SAFE - {"resume"}))}')
    # flags that belong to one invocation, never taken from the checkpoint
    per_job = {'resume', 'stop_at', 'overwrite'}
    # defaults, overridden by the saved settings (flags added since then keep their defaults),
    # then by the given flags
    merged = {**vars(args),
              **{k: v for k, v in saved.items() if k in vars(args) and k not in per_job}}
    merged.update({k: getattr(args, k) for k in explicit})
    merged['stage'] = ckpt['kind']
    return argparse.Namespace(**merged)


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --min_lr at --max_steps."""
    # step 0 already takes a small step (TarFlow starts from min_lr; see README)
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    # past max_steps (never reached) the cosine would rise again: hold it at min_lr
    t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def step_inputs(args, step, x, y, num_classes, rank, world):
    """The random inputs of one step: training noise eps (x's shape), labels with --label_drop of
    them replaced by the null class -1 (None for an unconditional model), and stage 2's guidance
    scales w (B,): a quarter at 0, the rest uniform in [0, w_max], 0 where the label was dropped.
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
    w = torch.zeros_like(u[:, 1])
    if args.stage == 'reverse' and args.guidance_mode == 'train':
        w = guidance_scales(u[:, 1:], args.w_max)
        if y is not None:
            w = torch.where(y < 0, 0.0, w)   # dropped labels train the null class, unguided
    return eps, y, w


def posterior_sample(args, step, moments, mean, std, rank, world):
    """Latent data: a sample of each image's VAE posterior, mu + s * eps, normalised per channel
    ((. - mean) / std). moments (b, 2, C, h, w) = [mu, s] of the image or its flip (the loader's
    choice). eps is drawn, like step_inputs', for the global batch from (seed, step) and sliced,
    from a stream of its own (offset 2**40)."""
    B, b = args.batch_size, args.batch_size // world
    gen = torch.Generator(device=moments.device).manual_seed(args.seed * 1_000_003 + step + 2 ** 40)
    eps = torch.randn((B, *moments.shape[2:]), generator=gen, device=moments.device)
    eps = eps[rank * b:(rank + 1) * b]
    mu, s = moments.unbind(1)
    return (mu + s * eps - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)   # (b, C, h, w)


def prior_noise(args, step, shape, y, rank, world, device):
    """--cycle's prior noise z ~ N(0, I) of one step: --cycle_batch draws per rank (None: the rank's
    batch), (n_prior, N, d), with the labels of the rank's first n_prior rows. Drawn, like
    step_inputs', for all ranks from (seed, step) and sliced, from a stream of its own (offset
    2**41): the data's noise, labels and scales are the same with and without the term."""
    b = args.batch_size // world
    n_prior = min(args.cycle_batch or b, b)
    gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step + 2 ** 41)
    z = torch.randn((n_prior * world, *shape), generator=gen, device=device)
    return z[rank * n_prior:(rank + 1) * n_prior], y[:n_prior]


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


def ema_decay(step, decay):
    """The EMA's decay at a step: (1+t)/(10+t) early on, so that a short run is not an average
    dominated by the random initial weights, capped at --ema."""
    return min(decay, (1 + step) / (10 + step))


def load_checkpoint_file(path, flag='--resume'):
    """A checkpoint written by this script, loaded safely;
    anything else is an error naming the file."""
    ckpt = read_torch_file(path, flag)   # weights_only: a checkpoint can never run code
    if not isinstance(ckpt, dict) or ckpt.get('kind') not in ('forward', 'reverse'):
        raise UsageError(f'{path} is not a checkpoint written by train.py '
                         '(no kind forward/reverse)')
    return ckpt


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


def trim_log(path, step):
    """Drop the rows a crashed run logged after its last checkpoint, so that a resumed run's log
    reads as one run."""
    if os.path.exists(path):
        # every row carries its step; rows at the checkpoint's step or before were logged by the
        # run that saved it
        rows = [line for line in open(path) if line.strip() and json.loads(line)['step'] <= step]
        atomic_write(path, lambda f: f.write(''.join(rows).encode()))


@torch.no_grad()
def heldout_bits_per_dim(model, dataset, n, batch_size, rank, world, device, ctx):
    """Bits/dim of the first n held-out images under uniform dequantisation, the number TarFlow
    reports (an upper bound on the discrete NLL, whatever noise the model was trained on). Image i's
    dequantisation noise is seeded by i, so evaluations compare across steps and world sizes. Every
    rank gets the same value."""
    was = model.training
    model.eval()
    # rank r scores images r, r+W, ...: disjoint, all covered
    idx = list(range(rank, min(n, len(dataset)), world))
    # sums, not means, are reduced: the ranks' shares differ by one image when W does not divide n
    total = torch.zeros(2, dtype=torch.float64, device=device)   # summed nll, image count
    for start in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[start:start + batch_size]]
        # uint8 -> the model's [-1, 1]
        x = torch.stack([im for im, _ in items]).to(device).float() / 127.5 - 1
        y = (torch.tensor([lab for _, lab in items], device=device)
             if model.cfg.num_classes else None)
        # the dequantisation noise of image i is fixed:
        # evaluations differ only because the model does
        eps = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(i))
                           for i in idx[start:start + batch_size]]).to(device)
        with ctx:
            _, nll, _ = forward_loss(model, x, y, eps, noise='uniform')
        total += torch.stack([nll.double().sum(),
                              torch.tensor(len(x), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train(was)
    return TarFlow.bits_per_dim(total[0] / total[1]).item()


def fmt(v):
    """A log value at 4 significant digits."""
    return f'{v:.4g}' if isinstance(v, float) else str(v)


def check_labels(dataset, cfg, flag):
    """The labels of a data set (training or held-out) against the classes of the model
    that reads them."""
    if cfg.num_classes and not dataset.num_classes:
        raise UsageError(f'{flag} has no labels, but the model is class-conditional '
                         f'({cfg.num_classes} classes): give labelled data, or train an '
                         'unconditional model (--num_classes 0, in stage 1)')
    # an unconditional model ignores labels
    if cfg.num_classes and dataset.num_classes > cfg.num_classes:
        raise UsageError(f'{flag} has {dataset.num_classes} classes (labels up to '
                         f'{dataset.num_classes - 1}); the model has {cfg.num_classes}')


def settings(argv):
    """-> (args, resume): the flags with their preset's defaults, or, with --resume, the saved run's
    settings (and the loaded checkpoint), checked against each other."""
    args, explicit = get_args(argv)
    resume = load_checkpoint_file(args.resume) if args.resume else None
    args = fill_preset_defaults(
        resume_args(args, explicit, resume, args.resume) if resume else args)
    if args.stage == 'forward' and args.preset not in PRESETS:
        raise UsageError(f'--preset {args.preset} names a reverse model: stage 1 takes one of '
                         f'{", ".join(PRESETS)}')
    if args.stage == 'reverse' and not resume and not args.forward_ckpt:
        raise UsageError('--stage reverse needs --forward_ckpt '
                         '(a checkpoint written by --stage forward)')
    if resume and resume['step'] >= args.max_steps:
        raise UsageError(f'--resume {args.resume}: the run is complete (step {resume["step"]} of '
                         f'--max_steps {args.max_steps}); nothing to do')
    if resume and args.stop_at is not None and args.stop_at <= resume['step']:
        raise UsageError(f'--stop_at {args.stop_at}: the checkpoint is already at '
                         f'step {resume["step"]}')
    return args, resume


def processes(args):
    """-> (rank, world, device, bf16): one rank per GPU (or CPU process), the same initial weights
    on every rank; TF32 and bf16 autocast on GPU."""
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise UsageError(f'--batch_size {args.batch_size} is not divisible by the '
                         f'number of ranks ({world})')
    if (args.lpips or args.convnext) and (args.batch_size // world) % args.perceptual_every:
        raise UsageError(f'--perceptual_every {args.perceptual_every} must divide the batch of '
                         f'each rank ({args.batch_size // world}), so that the same images get the '
                         'terms on any number of ranks')
    torch.manual_seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device, (args.dtype == 'bf16'
                                 or (args.dtype == 'auto' and device.type == 'cuda'))


def claim_outputs(args, resume, lock, master):
    """-> (checkpoint path, log path, continuing). One run at a time writes a stage's files: the
    lock (rank 0's, for all ranks) is taken before the check for an earlier run, so that two runs
    started together cannot both pass it. A fresh run never replaces an earlier one unless asked to;
    resuming from the file this run writes continues it, and resuming from elsewhere must not
    clobber the run that is here."""
    ckpt_path = os.path.join(args.out_dir, f'{args.stage}.pt')
    log_path = os.path.join(args.out_dir, f'{args.stage}_log.jsonl')
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f'--out_dir {args.out_dir}: is a file, expected a folder '
                         '(new or holding runs)')
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        lock.acquire(os.path.join(args.out_dir, f'{args.stage}.lock'),
                     f'--out_dir {args.out_dir} ({args.stage} stage)')
    continuing = bool(resume) and os.path.abspath(args.resume) == os.path.abspath(ckpt_path)
    if not continuing and not args.overwrite:
        for path in (ckpt_path, log_path):
            if os.path.exists(path):
                raise FileExistsError(f'{path} exists (an earlier run): continue it with --resume '
                                      f'{ckpt_path}, pick another --out_dir, or pass --overwrite '
                                      'to replace it')
    return ckpt_path, log_path, continuing


def build_models(args, resume, device):
    """-> (model, ema, flow, cfg, flow_latent): the model this stage trains and its EMA copy (what
    samples, evaluates and is saved as 'ema'; it starts equal to the model); in stage 2 the frozen F
    (EMA weights of --forward_ckpt, or the copy a reverse checkpoint carries) and the latent
    metadata F was trained on. On resume the checkpoint defines the models."""
    flow, flow_latent = None, None
    if args.stage == 'forward':
        if resume:
            cfg = config_from_dict(FlowConfig, resume['model_config'])
        else:
            given = {k: getattr(args, k) for k in ('norm_clip', 'noise_std', 'num_classes')
                     if getattr(args, k) is not None}
            cfg = replace(PRESETS[args.preset], **given)
            # record what the model was built with, so that the saved train_config says what ran
            args.norm_clip, args.noise_std, args.num_classes = (cfg.norm_clip, cfg.noise_std,
                                                                cfg.num_classes)
        model = TarFlow(cfg)
    else:
        if resume:
            fcfg, fweights, flow_latent = (resume['forward_config'], resume['forward'],
                                           resume.get('latent'))
        else:
            fck = load_checkpoint_file(args.forward_ckpt, '--forward_ckpt')
            if fck['kind'] != 'forward':
                raise UsageError(f'--forward_ckpt {args.forward_ckpt} is a {fck["kind"]} '
                                 'checkpoint, not a forward one')
            fcfg, fweights, flow_latent = fck['model_config'], fck['ema'], fck.get('latent')
            del fck   # F's weights are copied below: free the rest of the file
        flow = TarFlow(config_from_dict(FlowConfig, fcfg))
        flow.load_state_dict(fweights)
        flow.to(device).eval().requires_grad_(False)  # F is frozen: never trained, never updated
        if resume:
            cfg = config_from_dict(ReverseConfig, resume['model_config'])
        else:
            cfg = reverse_config_for(flow.cfg, args.preset, align=args.align, denoise=args.denoise,
                                     norm=args.reverse_norm, guidance_mode=args.guidance_mode)
        model = ReverseModel(cfg)
    model.to(device)
    ema = type(model)(cfg).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    return model, ema, flow, cfg, flow_latent


def load_data(args, cfg, flow_latent, resume, device):
    """-> (dataset, latent, decode, norm, val), each input checked against the model before the
    first step: latent data (vae.py encode) must fit the model's geometry, the VAE and, in stage 2,
    F's latents (latent: the metadata saved with the checkpoint; decode: its LatentDecoder; norm:
    its per-channel (mean, std)); labels must match the model's classes; val is stage 1's held-out
    set for bits/dim (--val_data, or the data's own held-out split), checked as the data is."""
    dataset = build_dataset(args.data, cfg.img_size, 'train', args.seed)
    latent = decode = norm = None
    if isinstance(dataset, LatentDataset):
        meta = dataset.meta
        latent = {k: meta[k] for k in ('img_size', 'latent_shape', 'vae', 'norm')}
        if tuple(meta['latent_shape']) != (cfg.in_channels, cfg.img_size, cfg.img_size):
            raise UsageError(f'--data {args.data} holds latents of shape '
                             f'{tuple(meta["latent_shape"])} (C, h, w), but the model takes '
                             f'{cfg.in_channels}x{cfg.img_size}x{cfg.img_size} (' +
                             (f'--preset {args.preset})' if args.stage == 'forward'
                              else 'the geometry of F)'))
        if args.stage == 'forward' and (args.noise_type != 'gaussian' or args.val_data):
            raise UsageError('--noise_type uniform and --val_data measure bits/dim of 8-bit '
                             'pixels; latent data has no such bins: train latents with Gaussian '
                             'noise, without --val_data')
        norm = tuple(stat.to(device) for stat in latent_norm(meta))
        # checks the VAE's fingerprint
        decode = latent_decoder(latent, args.vae, device, f'--data {args.data}')
        if args.stage == 'reverse':   # G learns F's inverse on F's own data distribution
            # F's recorded VAE against the one that made these latents
            # (an older file records an older fingerprint)
            fl = flow_latent or {}
            same_vae = decode.vae.matches(fl.get('vae', {}).get('fingerprint'))
            if fl.get('norm') != latent['norm'] or not same_vae:
                raise UsageError(f'--data {args.data}: F was trained on other latents (another VAE '
                                 'or normalisation) than these; stage 2 must see the data F was '
                                 'trained on')
    elif cfg.in_channels != 3:
        raise UsageError('the model takes SD-VAE latents '
                         f'({cfg.in_channels}x{cfg.img_size}x{cfg.img_size}), but --data '
                         f'{args.data} is pixels: encode it once with `python vae.py encode SRC '
                         'OUT --vae PATH` and train on OUT')
    if resume and resume.get('latent') != latent:
        raise UsageError(f'--resume {args.resume} was trained on other data (latents: '
                         f'{resume.get("latent") is not None}) than --data {args.data} (latents: '
                         f'{latent is not None}, or another VAE or normalisation)')
    check_labels(dataset, cfg, f'--data {args.data}')
    val = None
    if args.stage == 'forward':   # pixels only (checked above)
        val_data = args.val_data or f'the held-out split of {args.data}'
        val = (build_dataset(args.val_data, cfg.img_size, 'val', args.seed)
               if args.val_data else dataset.heldout())
        if isinstance(val, LatentDataset):
            raise UsageError(f'--val_data {val_data}: a latent set; bits/dim are measured '
                             'on 8-bit pixel images')
        if val is not None:
            check_labels(val, cfg, f'--val_data {val_data}')
    return dataset, latent, decode, norm, val


def restore(resume, model, ema, opt, loader):
    """Continue a run exactly: weights, EMA, optimizer moments, data position and RNG.
    -> the step."""
    model.load_state_dict(resume['model'])
    ema.load_state_dict(resume['ema'])
    opt.load_state_dict(resume['optimizer'])
    loader.load_state_dict(resume['loader'])
    torch.set_rng_state(resume['rng'])
    return resume['step']


def print_header(args, model, world, device, bf16, latent):
    """What trains, where, with which settings (all of them, so that a log is self-describing)."""
    name, paper = PAPER_MODELS.get((args.stage, args.preset), (None, None))
    n_params = sum(param.numel() for param in model.parameters())
    print(f'{args.stage} model: {n_params / 1e6:.2f}M parameters' +
          (f' ({name} in the paper: {paper / 1e6:.0f}M)' if name else '') +
          f', {world} rank(s) on {device}, {"bf16" if bf16 else "fp32"}' +
          (f', latents of {latent["vae"]["name"]}' if latent else ''))
    for k, v in sorted(vars(args).items()):
        print(f'  {k:16s} {v}')


def fid_reference(args, device, master, world):
    """The FID monitor's reference statistics, checked against the network and computed once per job
    before the first step (recomputed at every evaluation, they kept the other ranks waiting past
    NCCL's timeout). A stats .npz is used as it is. -> its path, or None without --fid_ref."""
    if not args.fid_ref:
        return None
    if master:
        fid.check_reference(args.fid_ref, fid.load_inception(args.inception, device))
    if fid.input_kind(args.fid_ref) == 'stats':
        return args.fid_ref
    path = os.path.join(args.out_dir, 'fid_ref_stats.npz')
    # a gloo group with a long timeout for the others' wait:
    # a large reference can take NCCL's 10 minutes
    group = (dist.new_group(backend='gloo', timeout=datetime.timedelta(hours=12))
             if world > 1 else None)
    if master:
        print(f'FID reference statistics of {args.fid_ref} -> {path}')
        ref = fid.input_statistics(args.fid_ref, fid.load_inception(args.inception, device),
                                   device=device)
        fid.save_stats(path, ref['mu'], ref['sigma'], ref['num_samples'])
    if world > 1:
        dist.barrier(group=group)
        dist.destroy_process_group(group)
    return path


def wrap(model, flow, args, world, device):
    """-> (the model to step, the F that computes stage 2's targets): compiled with --compile (F's
    pass is ~44% of a stage-2 step's FLOPs), then the model in DDP over several ranks, with bucket
    views (the gradients live in DDP's buckets, no second copy of them)."""
    flow_fn = flow
    if args.compile:
        model = torch.compile(model)
        if flow is not None:
            flow_fn = torch.compile(flow)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                    gradient_as_bucket_view=True)
    return model, flow_fn


def perceptual_terms(args, decode, device):
    """Stage 2's optional perceptual terms (frozen networks, weights from local files), or None. On
    latents they compare decoded images: the frozen VAE decodes, G gets the gradient."""
    if args.stage != 'reverse' or not (args.lpips or args.convnext):
        return None
    perceptual = PerceptualLoss(*(load_weights(getattr(args, k), k)
                                  for k in ('lpips', 'vgg', 'convnext')))
    perceptual.decode = decode
    return perceptual.to(device)


def stage_loss(args, cfg, model, flow_fn, x, y, w, eps, perceptual, step, rank, world):
    """-> (loss, metrics, traj) of one step: stage 1 the exact NLL of the noisy data (traj, the
    per-block states, feeds the log row's block norms), stage 2 the alignment of G with F's
    trajectory (traj None). F's trajectory is computed inside, without gradients (fp32 unless
    --target_dtype bf16); the stage-2 terms are one distance per aligned depth, and the crop boxes
    of the perceptual terms come from (seed, step, rank), so a resume redraws them."""
    if args.stage == 'forward':
        loss, nll, traj = forward_loss(model, x, y, eps, args.noise_type,
                                       checkpoint=args.grad_checkpoint)
        metrics = {'loss': loss.detach()}
        if args.noise_type == 'uniform':   # the bin constant only applies to dequantised data
            metrics['bpd'] = TarFlow.bits_per_dim(nll.detach()).mean()
        return loss, metrics, traj
    # --cycle: prior noise and labels, G's rows beside the data's in the same pass
    prior = (prior_noise(args, step, (cfg.num_tokens, cfg.token_dim), y, rank, world, x.device)
             if args.cycle else None)
    loss, terms = reverse_loss(model, flow_fn, x, y, w, eps, perceptual,
                               {'lpips': args.lpips_weight, 'convnext': args.convnext_weight},
                               generator=(crop_generator(args.seed, step, rank)
                                          if perceptual else None),
                               fp32_targets=args.target_dtype == 'fp32',
                               perceptual_every=args.perceptual_every,
                               cycle=args.cycle, prior=prior)
    return loss, {'loss': loss.detach(), **terms}, None


def update(loss, model, ema, opt, step, args):
    """Backward (DDP averages the gradients, so every rank agrees on finiteness), clip, then an
    optimizer and EMA step that is skipped on the device when the gradient is not finite: an `if`
    would wait for the GPU on every step. -> (gradient norm, bad), 0-dim tensors on the device."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                           args.grad_clip if args.grad_clip > 0 else math.inf)
    bad = ~torch.isfinite(gnorm)
    # fused AdamW leaves weights, moments and step count alone where it is 1
    opt.found_inf = bad.float()
    opt.step()
    ema_update(ema, model, ema_decay(step, args.ema), ok=~bad)   # and the EMA stays as it was
    return gnorm, bad


@torch.no_grad()
def recon_rmse(G, flow, x, y, eps):
    """The log row's reconstruction error |G(F(x + sigma eps)) - x| (rms, over pixels) at w = 0,
    of the EMA G."""
    _, _, traj = flow(x + flow.cfg.noise_std * eps, y)
    rec = G(traj[-1], y)[-1]
    return (rec.float() - patchify(x.float(), G.cfg.patch_size)).pow(2).mean().sqrt().item()


def interval_means(acc, cnt, world):
    """The metric sums of an interval of cnt steps -> their means over the steps and the ranks, in
    the order the metrics were added (loss, bits/dim or the stage-2 terms, gnorm). One reduction,
    one read from the device."""
    keys = list(acc)
    vals = torch.stack([acc[k] for k in keys])
    if world > 1:
        dist.all_reduce(vals)
        vals /= world
    return {k: v / cnt for k, v in zip(keys, vals.tolist())}


def print_row(row, max_steps, eta):
    """One line per log row: the important fields first, 4 significant digits,
    'skipped' only when not 0."""
    fields = [f'{k} {"[" + ", ".join(map(fmt, v)) + "]" if isinstance(v, list) else fmt(v)}'
              for k, v in row.items() if k != 'step' and not (k == 'skipped' and not v)]
    step = row['step']
    print(f'step {step}/{max_steps} ({100 * step / max_steps:.0f}%) | ' + ' | '.join(fields)
          + f' | ETA {hms(eta)}')


def log_row(args, step, means, lr, img_per_s, ms_per_step, skipped, ema, flow, x, y, eps, traj):
    """One log row: the losses and their diagnostics (interval means over ranks), stage 2's
    reconstruction error of the last batch, then speed, in a fixed field order; stage 1 adds the
    per-block output norms, where a flow that blows up shows first."""
    row = {'step': step, **means}
    gnorm = row.pop('gnorm')
    if args.stage == 'reverse':
        row['recon_rmse'] = recon_rmse(ema, flow, x, y, eps)
    row.update(gnorm=gnorm, lr=lr, img_per_s=img_per_s, ms_per_step=ms_per_step, skipped=skipped)
    if args.stage == 'forward':
        row['block_norms'] = [state.detach().float().pow(2).mean().item() for state in traj[1:]]
    return row


def make_loader(args, dataset, rank, world, device):
    """Each rank's slice of one global batch, in an order that a resume continues exactly."""
    # decoding JPEGs needs workers on GPU; on CPU they would compete with the model for the cores
    workers = (args.num_workers if args.num_workers is not None
               else (8 if device.type == 'cuda' else 0))
    return Loader(dataset, args.batch_size, rank, world, args.seed, num_workers=workers,
                  pin_memory=device.type == 'cuda', flip=dataset.mirrors)


def checkpoint(args, raw, ema, opt, step, cfg, loader, latent, flow):
    """Everything the next step needs; the reverse stage carries its frozen F, and latent data its
    VAE and normalisation (latent is None for pixel data)."""
    ck = dict(kind=args.stage, model=raw.state_dict(), ema=ema.state_dict(),
              optimizer=opt.state_dict(), step=step, model_config=asdict(cfg),
              train_config=vars(args), loader=loader.state_dict(), rng=torch.get_rng_state(),
              latent=latent)
    if flow is not None:
        ck.update(forward_config=asdict(flow.cfg), forward=flow.state_dict())
    return ck


def check_streak(longest, step, args, ckpt_path):
    """Stop a run whose longest streak of non-finite steps reached --max_skips: it has diverged."""
    if longest >= args.max_skips:
        raise SystemExit(f'stopping at step {step}: {longest} non-finite steps in a row '
                         f'(--max_skips {args.max_skips}, checked at each log row); the run has '
                         f'diverged. {ckpt_path} keeps the last checkpoint written before it (if '
                         'any): lower --lr or set --grad_clip, then --resume it')


def main(argv=None):
    # released however train() ends; the OS drops it if the process is killed
    with RunLock() as lock:
        train(argv, lock)


def train(argv, lock):
    args, resume = settings(argv)
    rank, world, device, bf16 = processes(args)
    master = rank == 0
    print0 = print if master else (lambda *a, **kw: None)
    # fp32 flow math always
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    ckpt_path, log_path, continuing = claim_outputs(args, resume, lock, master)

    # ---- models, optimizer, data, the resumed state
    model, ema, flow, cfg, flow_latent = build_models(args, resume, device)
    # TarFlow's optimizer: AdamW (0.9, 0.95), weight decay on every parameter (no groups). Fused
    # (CPU and CUDA): it takes AMP's found_inf flag, which skips a non-finite step on the device
    # instead of a host-side `if`
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay, fused=True)
    dataset, latent, decode, norm, val = load_data(args, cfg, flow_latent, resume, device)
    loader = make_loader(args, dataset, rank, world, device)
    step = 0
    if resume:
        step = restore(resume, model, ema, opt, loader)
        if master:   # the rows a crashed run logged after its checkpoint go
            trim_log(log_path, step)
        print0(f'resumed from {args.resume} at step {step}')
    del resume   # the loaded tensors are copied into the models: free them
    perceptual = perceptual_terms(args, decode, device)

    # `raw` stays the plain module for saving, EMA and sampling
    raw, (model, flow_fn) = model, wrap(model, flow, args, world, device)
    if master:
        # --overwrite: the old log goes with the old run
        if not continuing and os.path.exists(log_path):
            os.remove(log_path)
        print_header(args, raw, world, device, bf16, latent)
    fid_ref = fid_reference(args, device, master, world)

    # ---- the loop's side jobs: log rows, checkpoints, sample grids, FID; rank 0 writes, all sync
    def log(row):
        """Append one JSON row to the log (rank 0); a resume trims rows past its checkpoint."""
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(row) + '\n')

    def save():
        """Everything the next step needs, in one atomically written file;
        the reverse stage carries its frozen F."""
        if master:
            ck = checkpoint(args, raw, ema, opt, step, cfg, loader, latent, flow)
            atomic_write(ckpt_path, lambda f: torch.save(ck, f))
        if world > 1:   # no rank runs ahead (and could fail) while rank 0 is still writing
            dist.barrier()

    def samples():
        """A grid of EMA samples, one row per class: the quickest look at whether training works."""
        if master:
            generate_grid(ema, flow, os.path.join(args.out_dir, f'{args.stage}_samples.png'),
                          guidance=args.sample_guidance, seed=args.seed, decode=decode)

    def fid_monitor():
        """FID of EMA samples drawn by every rank against the reference statistics;
        rank 0 gets the number."""
        return distributed_fid(ema, flow, fid_ref, args.fid_samples, guidance=args.sample_guidance,
                               seed=args.seed, rank=rank, world=world, device=device,
                               inception=args.inception, decode=decode)

    # ---- training loop
    it = iter(loader)
    # acc: metric sums since the last log row, kept on the device, like the skipped steps: their
    # count, the current streak and the longest streak since the last row (a step never waits for
    # the host to read them)
    acc, t0, seen = {}, time.time(), 0
    skipped, streak, worst = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
    model.train()
    # the end of this job: --stop_at splits a run into jobs without touching its schedule
    stop = min(args.max_steps, args.stop_at or args.max_steps)
    while step < stop:
        # a batch and this step's randomness: noise, dropped labels (CFG), guidance scales
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # (b, 2, C, h, w) posterior moments -> this step's normalised latent sample (b, C, h, w)
        if latent:
            x = posterior_sample(args, step, x, *norm, rank, world)
        eps, y, w = step_inputs(args, step, x, y, cfg.num_classes, rank, world)
        # set by hand each step: the schedule is a function of the step, so resume is exact
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group['lr'] = lr
        if args.stage == 'reverse' and y is None:  # unconditional: index 0 is G's null class
            y = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        with ctx:
            loss, metrics, traj = stage_loss(args, cfg, model, flow_fn, x, y, w, eps, perceptual,
                                             step, rank, world)
        gnorm, bad = update(loss, raw, ema, opt, step, args)
        # a streak means divergence, not a bad batch: it is checked at the log rows
        skipped, streak = skipped + bad, (streak + 1) * bad
        worst = torch.maximum(worst, streak)
        # accumulate on device; the values are read only when a row is logged
        metrics['gnorm'] = gnorm.detach()
        for k, v in metrics.items():
            acc[k] = acc.get(k, 0.) + v.float()
        seen += x.shape[0] * world   # images over all ranks, for img/s
        step += 1

        # the log row: means over the interval and over ranks, then diagnostics, then speed
        if step % args.log_every == 0 or step == stop:
            # divergence is checked here, every --log_every steps,
            # not after each step (that would sync every step)
            n_skipped, longest = skipped.item(), worst.item()
            check_streak(longest, step, args, ckpt_path)
            worst = streak.clone()   # a streak that goes on counts in the next interval too
            cnt = (step - 1) % args.log_every + 1   # the last interval can be shorter
            dt = time.time() - t0
            row = log_row(args, step, interval_means(acc, cnt, world), lr, seen / dt,
                          1000 * dt / cnt, n_skipped, ema, flow, x, y, eps, traj)
            if master:
                # ETA from the last interval
                print_row(row, args.max_steps, round((stop - step) * dt / cnt))
            log(row)   # the jsonl row keeps full precision
            acc, seen, t0 = {}, 0, time.time()   # a new interval
        # checkpoint (never mid-divergence), then held-out bits/dim (stage 1), grid and FID, each
        # on its own interval and at the end: the checkpoint of a step is written before the work
        # that could fail at it, so a failure there loses no steps
        if (step % args.ckpt_every == 0 or step == stop) and streak.item() == 0:
            save()
        if val is not None and (step % args.eval_every == 0 or step == stop):
            # no activations kept: a larger batch fits
            bpd = heldout_bits_per_dim(ema, val, args.eval_samples,
                                       max(64, 2 * args.batch_size // world),
                                       rank, world, device, ctx)
            print0(f'step {step}: held-out {bpd:.4f} bits/dim (EMA, uniform dequantisation, '
                   f'{min(args.eval_samples, len(val))} images)')
            log({'step': step, 'val_bpd': bpd})
        if step % args.sample_every == 0 or step == stop:
            samples()
        # FID at the end of the run, not of a job:
        # a --stop_at job would otherwise add a row the run never logs
        if args.fid_ref and (step % args.fid_every == 0 or step == args.max_steps):
            r = fid_monitor()
            if master:
                print(f'step {step}: FID {r["fid"]:.3f} on {r["num_samples"]} EMA samples vs '
                      f'{args.fid_ref}')
                log({'step': step, 'fid': r['fid'], 'fid_samples': r['num_samples'],
                     'ref': args.fid_ref})
    if world > 1:   # a clean exit: torchrun reports a rank that leaves the group open
        dist.destroy_process_group()


if __name__ == '__main__':
    run_cli(main)
