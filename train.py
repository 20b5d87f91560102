"""
Train TarFlow (stage 1, exact maximum likelihood) or BiFlow's reverse model (stage 2, F frozen), under python or
torchrun, on CPU or GPUs. One code path: DDP when launched by torchrun (gloo on CPU, NCCL on GPU).

    python train.py                                              # stage 1, built-in digits, CPU preset: a few minutes
    python train.py --stage reverse --forward_ckpt out/forward.pt   # stage 2 on the same data
    torchrun --nproc_per_node=8 train.py --preset imagenet64 --data /path/to/imagenet/train
    torchrun --nproc_per_node=8 train.py --stage reverse --preset imagenet64 --data /path/to/imagenet/train \\
        --forward_ckpt out/forward.pt

Writes OUT_DIR/{stage}.pt (atomic, resumable with --resume), OUT_DIR/{stage}_samples.png and OUT_DIR/{stage}_log.jsonl.
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import Loader, atomic_write, build_dataset, read_torch_file, setup_distributed
from model import (PERCEPTUAL_HINTS, PRESETS, BiFlow, FlowConfig, PerceptualLoss, ReverseConfig, TarFlow,
                   config_from_dict, forward_loss, patchify, reverse_config_for, reverse_loss)
from sample import distributed_fid, generate_grid

# Optimisation defaults per preset. The paper runs follow TarFlow's recipes (AdamW (0.9, 0.95), lr 1e-4, batch 256,
# warm-up of one epoch, cosine to 1e-6, no gradient clipping); the EMA is ours (TarFlow samples from the raw weights).
# The CPU run is sized to finish in minutes on 2 cores; its higher lr is why it clips gradients.
_PAPER = dict(lr=1e-4, grad_clip=0.0, ema=0.9999, eval_every=10_000, eval_samples=10_000)
TRAIN_PRESETS = {
    'cpu': dict(batch_size=32, lr=2e-3, max_steps=4000, reverse_max_steps=4000, warmup_steps=100, grad_clip=1.0,
                ema=0.999, eval_every=1000, eval_samples=1000),
    'imagenet64': dict(_PAPER, batch_size=256, max_steps=1_000_000, warmup_steps=5000),
    'imagenet64-1024': dict(_PAPER, batch_size=256, max_steps=1_000_000, warmup_steps=5000),
    'imagenet64-p4': dict(_PAPER, batch_size=256, max_steps=1_000_000, warmup_steps=5000),
    'imagenet128': dict(_PAPER, batch_size=768, max_steps=534_000, warmup_steps=1668),
    'afhq256': dict(_PAPER, batch_size=256, max_steps=250_000, warmup_steps=60),
}

# What a --resume may change: where and how often things are written, hardware, and paths to the same files (data,
# weights) on another machine. Everything else defines the run and is taken from the checkpoint; a flag that
# contradicts it is refused.
RESUME_SAFE = {'resume', 'out_dir', 'stop_at', 'device', 'dtype', 'compile', 'num_workers', 'log_every',
               'ckpt_every', 'sample_every', 'sample_cfg', 'eval_every', 'eval_samples', 'val_data', 'fid_ref',
               'fid_every', 'fid_samples', 'inception', 'data', 'forward_ckpt', 'lpips', 'vgg', 'convnext', 'max_skips'}


def get_args(argv=None):
    """-> (args, explicit): the flags with preset defaults filled in, and the names of the flags given on the command
    line (a resume takes everything else from the checkpoint)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--stage', choices=['forward', 'reverse'], default='forward', help='forward: TarFlow by maximum likelihood; '
      'reverse: BiFlow reverse model against a frozen forward checkpoint')
    a('--data', default='digits', help="'digits' (built-in, no download), an ImageFolder root, or a .npz/.npy file")
    a('--val_data', default=None, help="held-out images for stage 1's bits/dim (default: the digits' val split "
      "when --data digits, else none)")
    a('--preset', choices=sorted(PRESETS), default='cpu', help='model size and optimisation defaults')
    a('--num_classes', type=int, default=None, help='stage 1: classes of the model (default: from --preset); '
      '0 trains an unconditional model, e.g. on unlabelled data')
    a('--out_dir', default='out', help='where checkpoints, sample grids and the log go')
    a('--overwrite', action='store_true', help='replace an earlier run of this stage in --out_dir (refused without)')
    a('--max_steps', type=int, default=None, help='optimizer steps (default: from --preset)')
    a('--stop_at', type=int, default=None, help='stop (with a checkpoint) after this step without changing the '
      'schedule, to split a run into jobs; continue with --resume')
    a('--batch_size', type=int, default=None, help='global batch size over all ranks (default: from --preset)')
    a('--lr', type=float, default=None, help='peak learning rate (default: from --preset)')
    a('--min_lr', type=float, default=1e-6, help='learning rate at the end of the cosine decay')
    a('--warmup_steps', type=int, default=None, help='linear warm-up steps (default: from --preset)')
    a('--weight_decay', type=float, default=1e-4, help='AdamW weight decay (on all parameters, as TarFlow)')
    a('--grad_clip', type=float, default=None, help='clip the global gradient norm to this; 0: off, as TarFlow '
      '(default: from --preset: 1 for cpu, 0 for the paper presets)')
    a('--ema', type=float, default=None, help='EMA decay of the weights used for sampling (default: from --preset)')
    a('--label_drop', type=float, default=0.1, help='probability of replacing a label by the null class (for CFG)')
    a('--noise_std', type=float, default=None, help='stage 1: sigma of the training noise (default: from --preset)')
    a('--noise_type', choices=['gaussian', 'uniform'], default='gaussian',
      help='stage 1: gaussian noise of --noise_std (for sampling) or uniform dequantisation (for bits/dim)')
    a('--norm_clip', type=float, default=None, help='stage 1: bound alpha, mu to c*tanh(./c), BiFlow\'s norm control; '
      '0 = TarFlow exactly (default: from --preset: 4 for cpu, 0 for the paper presets)')
    a('--forward_ckpt', default=None, help='stage 2: the forward checkpoint to invert (its EMA weights, frozen)')
    a('--align', choices=['hidden', 'distill', 'naive'], default='hidden', help='stage 2: how to supervise G')
    a('--denoise', choices=['learned', 'score', 'none'], default='learned', help='stage 2: how G gets clean images')
    a('--reverse_norm', action=argparse.BooleanOptionalAction, default=True,
      help='stage 2: compare states divided by the target RMS (reverse-side norm control)')
    a('--guidance_mode', choices=['train', 'inference'], default='train',
      help='stage 2: train G conditioned on the guidance scale (Eq. 5, 1-NFE) or plain (CFG at inference, 2-NFE)')
    a('--w_max', type=float, default=3.0, help='stage 2: guidance scales for training-time CFG are drawn in [0, w_max]')
    a('--lpips', default=None, help="stage 2: LPIPS linear weights (lpips' weights/v0.1/vgg.pth); needs --vgg")
    a('--vgg', default=None, help="stage 2: torchvision's vgg16-397923af.pth, the LPIPS trunk")
    a('--convnext', default=None, help='stage 2: convnextv2_base_22k_224_ema.pt for the ConvNeXt feature loss')
    a('--lpips_weight', type=float, default=0.4, help='stage 2: weight of the LPIPS term')
    a('--convnext_weight', type=float, default=0.1, help='stage 2: weight of the ConvNeXt term')
    a('--resume', default=None, help='continue the run saved in this checkpoint, with its settings (model, EMA, '
      'optimizer, step, data position); flags that would change the run are refused')
    a('--max_skips', type=int, default=20, help='stop the run after this many non-finite steps in a row')
    a('--device', default='auto', help="'auto' (cuda if available), 'cpu' or 'cuda'")
    a('--dtype', choices=['auto', 'bf16', 'fp32'], default='auto', help='autocast dtype; auto = bf16 on CUDA')
    a('--compile', action='store_true', help='torch.compile the model (GPU runs)')
    a('--seed', type=int, default=0, help='seed for weights, data order, noise and labels')
    a('--num_workers', type=int, default=None, help='data loader workers per rank (default: 0 on CPU, 8 on CUDA)')
    a('--log_every', type=int, default=50, help='print and log metrics every this many steps')
    a('--eval_every', type=int, default=None, help="stage 1: held-out bits/dim every this many steps (default: "
      "from --preset)")
    a('--eval_samples', type=int, default=None, help='stage 1: held-out images per evaluation (default: from --preset)')
    a('--sample_every', type=int, default=1000, help='write a sample grid every this many steps (and at the end)')
    a('--ckpt_every', type=int, default=1000, help='write the checkpoint every this many steps (and at the end)')
    a('--sample_cfg', type=float, default=2.0, help='guidance scale of the periodic sample grids')
    a('--fid_ref', default=None, help='log FID of EMA samples against this reference (stats .npz, .npz or folder)')
    a('--fid_every', type=int, default=10000, help='steps between FID evaluations (needs --fid_ref)')
    a('--fid_samples', type=int, default=4096, help='samples per FID evaluation (a monitor, not FID-50K)')
    a('--inception', default=None, help='path to pt_inception-2015-12-05-6726825d.pth for --fid_ref')
    args = p.parse_args(argv)
    # the flags given on the command line: parse again with every default suppressed
    for action in p._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(p.parse_args(argv)))
    for k in ('max_steps', 'batch_size', 'log_every', 'ckpt_every', 'sample_every', 'fid_every', 'fid_samples',
              'warmup_steps', 'eval_every', 'eval_samples', 'max_skips', 'stop_at', 'num_classes', 'num_workers'):
        v = getattr(args, k)
        low = 0 if k in ('warmup_steps', 'num_classes', 'num_workers') else 1
        if v is not None and v < low:
            p.error(f'--{k} {v}: must be an integer >= {low}')
    for k, lo, hi in (('label_drop', 0, 1), ('ema', 0, 1), ('lr', 0, math.inf), ('noise_std', 0, math.inf),
                      ('grad_clip', 0, math.inf), ('norm_clip', 0, math.inf), ('w_max', 0, math.inf)):
        v = getattr(args, k)
        if v is not None and not lo <= v <= hi:  # also refuses nan
            p.error(f'--{k} {v}: must be in [{lo}, {hi}]')
    if args.lpips and not args.vgg:
        p.error('--lpips needs --vgg (the VGG16 trunk weights)')
    if args.resume and args.overwrite:
        p.error('--resume continues a run, --overwrite replaces one: pass one of them')
    return args, explicit


def fill_preset_defaults(args):
    """Flags left at None take the value of their --preset (stage 2 has its own step count)."""
    preset = dict(TRAIN_PRESETS[args.preset])
    reverse_steps = preset.pop('reverse_max_steps', None)
    if args.stage == 'reverse' and reverse_steps:
        preset['max_steps'] = reverse_steps
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def resume_args(args, explicit, ckpt, path):
    """The saved run's settings, with the flags given now that are safe to change; any other given flag that
    contradicts the checkpoint is an error naming the flag and both values."""
    saved = ckpt['train_config']
    if 'stage' in explicit and args.stage != ckpt['kind']:
        raise ValueError(f'--resume {path} is a {ckpt["kind"]} checkpoint, but --stage is {args.stage}')
    bad = [f'--{k} {getattr(args, k)} (the checkpoint has {saved[k]})' for k in sorted(explicit - RESUME_SAFE)
           if k in saved and getattr(args, k) != saved[k]]
    if bad:
        raise ValueError(f'--resume {path}: a resume continues the saved run, but ' + '; '.join(bad) + '. Only these '
                         f'may change: {", ".join("--" + k for k in sorted(RESUME_SAFE - {"resume"}))}')
    per_job = {'resume', 'stop_at', 'overwrite'}   # belong to one invocation, never taken from the checkpoint
    merged = {**vars(args), **{k: v for k, v in saved.items() if k in vars(args) and k not in per_job}}
    merged.update({k: getattr(args, k) for k in explicit})
    merged['stage'] = ckpt['kind']
    return argparse.Namespace(**merged)


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --min_lr at --max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def step_inputs(args, step, x, y, num_classes, rank, world):
    """The random inputs of one step: training noise eps (x's shape), labels with --label_drop of them replaced by
    the null class -1 (None for an unconditional model), and stage 2's guidance scales w (B,): a quarter at 0, the
    rest uniform in [0, w_max], 0 where the label was dropped. All are drawn for the whole global batch from
    (seed, step) and then sliced: one process and W ranks see the same numbers, and a resume continues the stream."""
    B, b = args.batch_size, args.batch_size // world
    g = torch.Generator(device='cpu').manual_seed(args.seed * 1_000_003 + step)
    eps = torch.randn((B, *x.shape[1:]), generator=g)[rank * b:(rank + 1) * b].to(x.device, non_blocking=True)
    u = torch.rand(B, 3, generator=g)[rank * b:(rank + 1) * b].to(x.device)
    y = torch.where(u[:, 0] < args.label_drop, -1, y) if num_classes else None
    w = torch.zeros_like(u[:, 1])
    if args.stage == 'reverse' and args.guidance_mode == 'train':
        w = torch.where(u[:, 1] < 0.25, 0.0, u[:, 2] * args.w_max)
        if y is not None:
            w = torch.where(y < 0, 0.0, w)   # dropped labels train the null class, unguided
    return eps, y, w


def load_checkpoint_file(path, flag='--resume'):
    """A checkpoint written by this script, loaded safely; anything else is an error naming the file."""
    ckpt = read_torch_file(path, flag)
    if not isinstance(ckpt, dict) or ckpt.get('kind') not in ('forward', 'reverse'):
        raise ValueError(f'{path} is not a checkpoint written by train.py (no kind forward/reverse)')
    return ckpt


def load_weights(path, flag):
    """A local weight file for --lpips/--vgg/--convnext (None passes through); a missing one says what to get."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--{flag} {path}: file not found; {PERCEPTUAL_HINTS[flag]}')
    return read_torch_file(path, f'--{flag}')  # on CPU: lpips' file holds CUDA tensors


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over the parameters (neither model has buffers)."""
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1 - decay)


def trim_log(path, step):
    """Drop the rows a crashed run logged after its last checkpoint, so that a resumed run's log reads as one run."""
    if os.path.exists(path):
        rows = [line for line in open(path) if line.strip() and json.loads(line)['step'] <= step]
        atomic_write(path, lambda f: f.write(''.join(rows).encode()))


@torch.no_grad()
def heldout_bits_per_dim(model, dataset, n, batch_size, rank, world, device, ctx):
    """Bits/dim of the first n held-out images under uniform dequantisation, the number TarFlow reports (an upper
    bound on the discrete NLL, whatever noise the model was trained on). Image i's dequantisation noise is seeded by
    i, so evaluations compare across steps and world sizes. Every rank gets the same value."""
    was = model.training
    model.eval()
    idx = list(range(rank, min(n, len(dataset)), world))
    total = torch.zeros(2, dtype=torch.float64, device=device)   # summed nll, image count
    for s in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[s:s + batch_size]]
        x = torch.stack([im for im, _ in items]).to(device).float() / 127.5 - 1
        y = torch.tensor([lab for _, lab in items], device=device) if model.cfg.num_classes else None
        eps = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(i))
                           for i in idx[s:s + batch_size]]).to(device)
        with ctx:
            _, nll, _ = forward_loss(model, x, y, eps, noise='uniform')
        total += torch.stack([nll.double().sum(), torch.tensor(len(x), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train(was)
    return TarFlow.bits_per_dim(total[0] / total[1]).item()


def fmt(v):
    """A log value at 4 significant digits."""
    return f'{v:.4g}' if isinstance(v, float) else str(v)


def main(argv=None):
    args, explicit = get_args(argv)
    resume = load_checkpoint_file(args.resume) if args.resume else None
    args = fill_preset_defaults(resume_args(args, explicit, resume, args.resume) if resume else args)
    if args.stage == 'reverse' and not resume and not args.forward_ckpt:
        raise ValueError('--stage reverse needs --forward_ckpt (a checkpoint written by --stage forward)')
    if resume and resume['step'] >= args.max_steps:
        raise ValueError(f'--resume {args.resume}: the run is complete (step {resume["step"]} of --max_steps '
                         f'{args.max_steps}); nothing to do')
    if resume and args.stop_at is not None and args.stop_at <= resume['step']:
        raise ValueError(f'--stop_at {args.stop_at}: the checkpoint is already at step {resume["step"]}')
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    if args.batch_size % world:
        raise ValueError(f'--batch_size {args.batch_size} is not divisible by the number of ranks ({world})')
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = args.dtype == 'bf16' or (args.dtype == 'auto' and device.type == 'cuda')
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # ---- files: a fresh run never replaces an earlier one unless asked to
    ckpt_path = os.path.join(args.out_dir, f'{args.stage}.pt')
    log_path = os.path.join(args.out_dir, f'{args.stage}_log.jsonl')
    continuing = resume and os.path.abspath(args.resume) == os.path.abspath(ckpt_path)
    if not continuing and not args.overwrite:
        for path in (ckpt_path, log_path):
            if os.path.exists(path):
                raise FileExistsError(f'{path} exists (an earlier run): continue it with --resume {ckpt_path}, '
                                      f'pick another --out_dir, or pass --overwrite to replace it')

    # ---- models: on resume the checkpoint defines them (a reverse checkpoint carries its frozen F)
    forward_model = None
    if args.stage == 'forward':
        if resume:
            cfg = config_from_dict(FlowConfig, resume['model_config'])
        else:
            cfg = replace(PRESETS[args.preset], **{k: getattr(args, k) for k in ('norm_clip', 'noise_std',
                                                                                  'num_classes')
                                                   if getattr(args, k) is not None})
            args.norm_clip, args.noise_std, args.num_classes = cfg.norm_clip, cfg.noise_std, cfg.num_classes
        model = TarFlow(cfg)
    else:
        if resume:
            fcfg, fweights = resume['forward_config'], resume['forward']
        else:
            fck = load_checkpoint_file(args.forward_ckpt, '--forward_ckpt')
            if fck['kind'] != 'forward':
                raise ValueError(f'--forward_ckpt {args.forward_ckpt} is a {fck["kind"]} checkpoint, not a forward one')
            fcfg, fweights = fck['model_config'], fck['ema']
        forward_model = TarFlow(config_from_dict(FlowConfig, fcfg))
        forward_model.load_state_dict(fweights)
        forward_model.to(device).eval().requires_grad_(False)  # F is frozen: never trained, never updated
        if resume:
            cfg = config_from_dict(ReverseConfig, resume['model_config'])
        else:
            cfg = reverse_config_for(forward_model.cfg, args.preset, align=args.align, denoise=args.denoise,
                                     norm=args.reverse_norm, guidance=args.guidance_mode)
        model = BiFlow(cfg)
    model.to(device)
    ema = type(model)(cfg).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.type == 'cuda')

    # ---- data: labels must match the model's classes; unlabelled data needs an unconditional model
    dataset = build_dataset(args.data, cfg.img_size, 'train', args.seed)
    if cfg.num_classes and not dataset.num_classes:
        raise ValueError(f'--data {args.data} has no labels, but the model is class-conditional ({cfg.num_classes} '
                         'classes): pass --num_classes 0 to train an unconditional model' +
                         (' (in stage 1)' if args.stage == 'reverse' else ''))
    if dataset.num_classes > cfg.num_classes:
        raise ValueError(f'--data {args.data} has {dataset.num_classes} classes; the model has {cfg.num_classes}'
                         + (' (pass --num_classes 0 to ignore the labels)' if not cfg.num_classes else ''))
    val = None
    if args.stage == 'forward':
        val_data = args.val_data or ('digits' if args.data == 'digits' else None)
        val = val_data and build_dataset(val_data, cfg.img_size, 'val', args.seed)
    workers = args.num_workers if args.num_workers is not None else (8 if device.type == 'cuda' else 0)
    loader = Loader(dataset, args.batch_size, rank, world, args.seed, num_workers=workers,
                    pin_memory=device.type == 'cuda', flip=args.data != 'digits')
    step = 0
    if resume:
        model.load_state_dict(resume['model'])
        ema.load_state_dict(resume['ema'])
        opt.load_state_dict(resume['optimizer'])
        loader.load_state_dict(resume['loader'])
        torch.set_rng_state(resume['rng'])
        step = resume['step']
        if master:
            trim_log(log_path, step)
        print0(f'resumed from {args.resume} at step {step}')
    del resume
    perceptual = None
    if args.stage == 'reverse' and (args.lpips or args.convnext):
        perceptual = PerceptualLoss(*(load_weights(getattr(args, k), k) for k in ('lpips', 'vgg', 'convnext')))
        perceptual.to(device)
    weights = {'lpips': args.lpips_weight, 'convnext': args.convnext_weight}

    raw = model
    if args.compile:
        model = torch.compile(model)  # compile before DDP, keep `raw` for saving, EMA and sampling
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)

    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        if not continuing and os.path.exists(log_path):   # --overwrite: the old log goes with the old run
            os.remove(log_path)
        print(f'{args.stage} model: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, '
              f'{world} rank(s) on {device}, {"bf16" if bf16 else "fp32"}')
        for k, v in sorted(vars(args).items()):
            print(f'  {k:16s} {v}')

    def log(row):
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(row) + '\n')

    def save():
        if master:
            ck = dict(kind=args.stage, model=raw.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                      step=step, model_config=asdict(cfg), train_config=vars(args), loader=loader.state_dict(),
                      rng=torch.get_rng_state())
            if forward_model is not None:
                ck.update(forward_config=asdict(forward_model.cfg), forward=forward_model.state_dict())
            atomic_write(ckpt_path, lambda f: torch.save(ck, f))
        if world > 1:
            dist.barrier()

    def samples():
        if master:
            generate_grid(ema, forward_model, os.path.join(args.out_dir, f'{args.stage}_samples.png'),
                          guidance=args.sample_cfg, seed=args.seed)

    def fid():
        return distributed_fid(ema, forward_model, args.fid_ref, args.fid_samples, guidance=args.sample_cfg,
                               seed=args.seed, rank=rank, world=world, device=device, inception=args.inception)

    # ---- training loop
    it = iter(loader)
    acc, skipped, in_a_row, t0, seen = {}, 0, 0, time.time(), 0
    model.train()
    stop = min(args.max_steps, args.stop_at or args.max_steps)
    while step < stop:
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        eps, y, w = step_inputs(args, step, x, y, cfg.num_classes, rank, world)
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group['lr'] = lr
        with ctx:
            if args.stage == 'forward':
                loss, nll, traj = forward_loss(model, x, y, eps, args.noise_type)
                metrics = {'loss': loss.detach()}
                if args.noise_type == 'uniform':   # the bin constant only applies to dequantised data
                    metrics['bpd'] = TarFlow.bits_per_dim(nll.detach()).mean()
            else:
                if y is None:  # unconditional: index 0 is G's null class
                    y = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                loss, terms = reverse_loss(model, forward_model, x, y, w, eps, perceptual, weights)
                metrics = {'loss': loss.detach(), **terms}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        if torch.isfinite(gnorm):  # DDP averaged the gradients, so every rank takes the same branch
            opt.step()
            ema_update(ema, raw, min(args.ema, (1 + step) / (10 + step)))
            in_a_row = 0
        else:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            print0(f'step {step}: non-finite loss/gradient ({loss.item():.4g}, {gnorm.item():.4g}); update skipped')
            if in_a_row >= args.max_skips:
                raise SystemExit(f'stopping at step {step + 1}: {in_a_row} non-finite steps in a row (--max_skips '
                                 f'{args.max_skips}); the run has diverged. {ckpt_path} keeps the last checkpoint '
                                 'written before it (if any): lower --lr or set --grad_clip, then --resume it')
        metrics['gnorm'] = gnorm.detach()
        for k, v in metrics.items():
            acc[k] = acc.get(k, 0.) + v.float()
        seen += x.shape[0] * world
        step += 1

        if step % args.log_every == 0 or step == stop:
            keys = list(acc)   # the order metrics were added: loss, bits/dim or the stage-2 terms, gnorm
            vals = torch.stack([acc[k] for k in keys])
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            cnt = (step - 1) % args.log_every + 1
            row = {'step': step, **{k: v / cnt for k, v in zip(keys, vals.tolist())}}
            if args.stage == 'reverse':
                with torch.no_grad():  # reconstruction |G(F(x)) - x| with the EMA model at w = 0
                    _, _, tr = forward_model(x + forward_model.cfg.noise_std * eps, y)
                    rec = ema(tr[-1], y)[-1]
                    row['recon_rmse'] = (rec.float() - patchify(x.float(), cfg.patch_size)).pow(2).mean().sqrt().item()
            row['gnorm'] = row.pop('gnorm')
            dt = time.time() - t0
            row.update(lr=lr, img_per_s=seen / dt, ms_per_step=1000 * dt / cnt, skipped=skipped)
            if args.stage == 'forward':  # per-block output norms: a flow that blows up shows here first
                row['block_norms'] = [t.detach().float().pow(2).mean().item() for t in traj[1:]]
            eta = round((stop - step) * dt / cnt)
            print0(f'step {step}/{args.max_steps} ({100 * step / args.max_steps:.0f}%) | ' + ' | '.join(
                f'{k} {"[" + ", ".join(map(fmt, v)) + "]" if isinstance(v, list) else fmt(v)}'
                for k, v in row.items() if k != 'step' and not (k == 'skipped' and not v)) +
                f' | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}')
            log(row)
            acc, seen, t0 = {}, 0, time.time()
        if val is not None and (step % args.eval_every == 0 or step == stop):
            bpd = heldout_bits_per_dim(ema, val, args.eval_samples, max(64, 2 * args.batch_size // world), rank,
                                       world, device, ctx)   # no activations kept: a larger batch fits
            print0(f'step {step}: held-out {bpd:.4f} bits/dim (EMA, uniform dequantisation, '
                   f'{min(args.eval_samples, len(val))} images)')
            log({'step': step, 'val_bpd': bpd})
        if (step % args.ckpt_every == 0 or step == stop) and in_a_row == 0:   # never save mid-divergence
            save()
        if step % args.sample_every == 0 or step == stop:
            samples()
        if args.fid_ref and (step % args.fid_every == 0 or step == args.max_steps):
            r = fid()
            if master:
                print(f'step {step}: FID {r["fid"]:.3f} on {r["num_samples"]} EMA samples vs {args.fid_ref}')
                log({'step': step, 'fid': r['fid'], 'fid_samples': r['num_samples'], 'ref': args.fid_ref})
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
