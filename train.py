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
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import Loader, atomic_write, build_dataset, read_torch_file, setup_distributed
from model import (PERCEPTUAL_HINTS, PRESETS, BiFlow, PerceptualLoss, FlowConfig, ReverseConfig, TarFlow, config_from_dict, patchify,
                   reverse_config_for, reverse_loss)

# Optimisation defaults per preset: the paper's runs (TarFlow README recipes: AdamW 1e-4, batch 256, warm-up of one
# epoch, cosine to 1e-6) and a CPU run sized to finish in minutes on 2 cores.
TRAIN_PRESETS = {
    'cpu': dict(batch_size=32, lr=2e-3, max_steps=4000, reverse_max_steps=4000, warmup_steps=100, ema=0.999),
    'imagenet64': dict(batch_size=256, lr=1e-4, max_steps=1_000_000, warmup_steps=5000, ema=0.9999),
    'imagenet64-1024': dict(batch_size=256, lr=1e-4, max_steps=1_000_000, warmup_steps=5000, ema=0.9999),
    'imagenet64-p4': dict(batch_size=256, lr=1e-4, max_steps=1_000_000, warmup_steps=5000, ema=0.9999),
    'imagenet128': dict(batch_size=768, lr=1e-4, max_steps=534_000, warmup_steps=1668, ema=0.9999),
    'afhq256': dict(batch_size=256, lr=1e-4, max_steps=250_000, warmup_steps=60, ema=0.9999),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--stage', choices=['forward', 'reverse'], default='forward', help='forward: TarFlow by maximum likelihood; '
      'reverse: BiFlow reverse model against a frozen forward checkpoint')
    a('--data', default='digits', help="'digits' (built-in, no download), an ImageFolder root, or a .npz/.npy file")
    a('--preset', choices=sorted(PRESETS), default='cpu', help='model size and optimisation defaults')
    a('--out_dir', default='out', help='where checkpoints, sample grids and the log go')
    a('--max_steps', type=int, default=None, help='optimizer steps (default: from --preset)')
    a('--stop_at', type=int, default=None, help='stop (with a checkpoint) after this step without changing the '
      'schedule, to split a run into jobs; continue with --resume')
    a('--batch_size', type=int, default=None, help='global batch size over all ranks (default: from --preset)')
    a('--lr', type=float, default=None, help='peak learning rate (default: from --preset)')
    a('--min_lr', type=float, default=1e-6, help='learning rate at the end of the cosine decay')
    a('--warmup_steps', type=int, default=None, help='linear warm-up steps (default: from --preset)')
    a('--weight_decay', type=float, default=1e-4, help='AdamW weight decay (on all parameters, as TarFlow)')
    a('--grad_clip', type=float, default=1.0, help='clip the global gradient norm to this (0: off)')
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
    a('--resume', default=None, help='continue from this checkpoint (model, EMA, optimizer, step, data position)')
    a('--device', default='auto', help="'auto' (cuda if available), 'cpu' or 'cuda'")
    a('--dtype', choices=['auto', 'bf16', 'fp32'], default='auto', help='autocast dtype; auto = bf16 on CUDA')
    a('--compile', action='store_true', help='torch.compile the model (GPU runs)')
    a('--seed', type=int, default=0, help='seed for weights, data order, noise and labels')
    a('--num_workers', type=int, default=None, help='data loader workers per rank (default: 0 on CPU, 8 on CUDA)')
    a('--log_every', type=int, default=50, help='print and log metrics every this many steps')
    a('--sample_every', type=int, default=1000, help='write a sample grid every this many steps (and at the end)')
    a('--ckpt_every', type=int, default=1000, help='write the checkpoint every this many steps (and at the end)')
    a('--sample_cfg', type=float, default=2.0, help='guidance scale of the periodic sample grids')
    a('--fid_ref', default=None, help='log FID of EMA samples against this reference (stats .npz, .npz or folder)')
    a('--fid_every', type=int, default=10000, help='steps between FID evaluations (needs --fid_ref)')
    a('--fid_samples', type=int, default=4096, help='samples per FID evaluation (a monitor, not FID-50K)')
    a('--inception', default=None, help='path to pt_inception-2015-12-05-6726825d.pth for --fid_ref')
    args = p.parse_args(argv)
    preset = dict(TRAIN_PRESETS[args.preset])
    reverse_steps = preset.pop('reverse_max_steps', None)
    if args.stage == 'reverse' and reverse_steps:
        preset['max_steps'] = reverse_steps
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.stage == 'reverse' and not args.forward_ckpt:
        p.error('--stage reverse needs --forward_ckpt (a checkpoint written by --stage forward)')
    if args.lpips and not args.vgg:
        p.error('--lpips needs --vgg (the VGG16 trunk weights)')
    return args


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --min_lr at --max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def step_randomness(args, step, shape, rank, world, device):
    """Noise, label-drop and guidance draws for this step, made for the whole global batch from (seed, step) and then
    sliced: one process and W ranks see the same numbers, and a resumed run continues the same stream."""
    B, b = args.batch_size, args.batch_size // world
    g = torch.Generator(device='cpu').manual_seed(args.seed * 1_000_003 + step)
    eps = torch.randn((B, *shape), generator=g)[rank * b:(rank + 1) * b]
    u = torch.rand(B, 3, generator=g)[rank * b:(rank + 1) * b]
    return eps.to(device, non_blocking=True), u.to(device)


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


def main(argv=None):
    args = get_args(argv)
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
    resume = load_checkpoint_file(args.resume) if args.resume else None

    # ---- models
    forward_model = None
    if args.stage == 'forward':
        cfg = config_from_dict(FlowConfig, resume['model_config']) if resume else PRESETS[args.preset]
        if not resume:
            cfg = FlowConfig(**{**asdict(cfg), **{k: getattr(args, k) for k in ('norm_clip', 'noise_std')
                                                  if getattr(args, k) is not None}})
        model = TarFlow(cfg)
    else:
        fck = load_checkpoint_file(args.forward_ckpt, '--forward_ckpt')
        if fck['kind'] != 'forward':
            raise ValueError(f'--forward_ckpt {args.forward_ckpt} is a {fck["kind"]} checkpoint, not a forward one')
        forward_model = TarFlow(config_from_dict(FlowConfig, fck['model_config']))
        forward_model.load_state_dict(fck['ema'])
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
    step = 0
    dataset = build_dataset(args.data, cfg.img_size, 'train', args.seed)
    if cfg.num_classes and dataset.num_classes > cfg.num_classes:
        raise ValueError(f'--data {args.data} has {dataset.num_classes} classes; the model has {cfg.num_classes}')
    workers = args.num_workers if args.num_workers is not None else (8 if device.type == 'cuda' else 0)
    loader = Loader(dataset, args.batch_size, rank, world, args.seed, num_workers=workers,
                    pin_memory=device.type == 'cuda', flip=args.data != 'digits')
    if resume:
        model.load_state_dict(resume['model'])
        ema.load_state_dict(resume['ema'])
        opt.load_state_dict(resume['optimizer'])
        loader.load_state_dict(resume['loader'])
        step = resume['step']
        print0(f'resumed from {args.resume} at step {step}')
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
        print(f'{args.stage} model: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, '
              f'{world} rank(s) on {device}, {"bf16" if bf16 else "fp32"}')
        for k, v in sorted(vars(args).items()):
            print(f'  {k:16s} {v}')
    ckpt_path = os.path.join(args.out_dir, f'{args.stage}.pt')
    log_path = os.path.join(args.out_dir, f'{args.stage}_log.jsonl')
    if master and not resume and os.path.exists(log_path):
        os.remove(log_path)

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
            from sample import generate_grid
            generate_grid(ema, forward_model, os.path.join(args.out_dir, f'{args.stage}_samples.png'),
                          guidance=args.sample_cfg, seed=args.seed)

    def fid():
        from sample import distributed_fid
        return distributed_fid(ema, forward_model, args.fid_ref, args.fid_samples, guidance=args.sample_cfg,
                               seed=args.seed, rank=rank, world=world, device=device, inception=args.inception)

    # ---- training loop
    it = iter(loader)
    shape = (cfg.in_channels, cfg.img_size, cfg.img_size)
    acc, skipped, t0, seen = {}, 0, time.time(), 0
    model.train()
    stop = min(args.max_steps, args.stop_at or args.max_steps)
    while step < stop:
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        eps, u = step_randomness(args, step, shape, rank, world, device)
        if cfg.num_classes:
            y = torch.where(u[:, 0] < args.label_drop, -1, y)
        else:
            y = None
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group['lr'] = lr
        with ctx:
            if args.stage == 'forward':
                if args.noise_type == 'gaussian':
                    xn = x + cfg.noise_std * eps
                else:  # uniform dequantisation in the 256 bins of width 2/256; Phi(eps) ~ U(0, 1), same stream
                    xn = ((x + 1) * 127.5 + 0.5 * (1 + torch.erf(eps / math.sqrt(2)))) / 128 - 1
                z, logdet, traj = model(xn, y)
                nll = TarFlow.nll_from(z, logdet)
                loss = nll.mean()
                metrics = {'loss': loss.detach(), 'bpd': TarFlow.bits_per_dim(nll.detach()).mean()}
            else:
                # training-time CFG: a quarter of the conditional samples at w = 0, the rest uniform in [0, w_max];
                # dropped labels train the null class at w = 0
                w = torch.where(u[:, 1] < 0.25, 0.0, u[:, 2] * args.w_max) if args.guidance_mode == 'train' else \
                    torch.zeros_like(u[:, 1])
                if y is not None:
                    w = torch.where(y < 0, 0.0, w)
                else:  # unconditional: index 0 is G's null class
                    y = torch.zeros(x.shape[0], dtype=torch.long, device=device)
                loss, terms = reverse_loss(model, forward_model, x, y, w, eps, perceptual, weights)
                metrics = {'loss': loss.detach(), **terms}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip if args.grad_clip > 0 else 1e30)
        if torch.isfinite(gnorm):  # DDP averaged the gradients, so every rank takes the same branch
            opt.step()
            ema_update(ema, raw, min(args.ema, (1 + step) / (10 + step)))
        else:
            skipped += 1
            print0(f'step {step}: non-finite loss/gradient ({loss.item():.4g}, {gnorm.item():.4g}); update skipped')
        metrics['gnorm'] = gnorm.detach()
        for k, v in metrics.items():
            acc[k] = acc.get(k, 0.) + v.float()
        seen += x.shape[0] * world
        step += 1

        if step % args.log_every == 0 or step == stop:
            keys = sorted(acc)
            vals = torch.stack([acc[k] for k in keys])
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            cnt = (step - 1) % args.log_every + 1
            row = {k: v / cnt for k, v in zip(keys, vals.tolist())}
            dt = time.time() - t0
            row.update(step=step, lr=lr, img_per_s=seen / dt, skipped=skipped)
            if args.stage == 'forward':  # per-block output norms: a flow that blows up shows here first
                row['block_norms'] = [t.detach().float().pow(2).mean().item() for t in traj[1:]]
            else:
                with torch.no_grad():  # reconstruction |G(F(x)) - x| with the EMA model at w = 0
                    _, _, tr = forward_model(x + forward_model.cfg.noise_std * eps, y)
                    rec = ema(tr[-1], y)[-1]
                    row['recon_rmse'] = (rec.float() - patchify(x.float(), cfg.patch_size)).pow(2).mean().sqrt().item()
            if master:
                print(f'step {step}/{args.max_steps} | ' + ' | '.join(
                    f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items() if k != 'step'))
                with open(log_path, 'a') as f:
                    f.write(json.dumps(row) + '\n')
            acc, seen, t0 = {}, 0, time.time()
        if step % args.ckpt_every == 0 or step == stop:
            save()
        if step % args.sample_every == 0 or step == stop:
            samples()
        if args.fid_ref and (step % args.fid_every == 0 or step == args.max_steps):
            r = fid()
            if master:
                print(f'step {step}: FID {r["fid"]:.3f} on {r["num_samples"]} EMA samples vs {args.fid_ref}')
                with open(log_path, 'a') as f:
                    f.write(json.dumps({'step': step, f'fid{r["num_samples"]}': r['fid'], 'ref': args.fid_ref}) + '\n')
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
