"""
Times every training and sampling path of TarFlow (the forward model F) and BiFlow (its learned
reverse G) side by side in one run, so each speed-up is a ratio measured on the same machine at the
same moment.

    python bench.py                           # cpu preset on this machine: a table and bench.json
    python bench.py --rows inverse_cfg,naive_cfg,nfe1_cfg
                                              # a subset of rows, for a quick look
    python bench.py --threads 0               # PyTorch's thread default (bench's on CPU: 1)
    python bench.py --preset imagenet64 --device cuda --compile --sample_batches 1,64
                                              # paper size, with MFU
    python bench.py --rows memory             # projected GPU memory of the paper presets
    python bench.py --rows nfe1_cfg,vae_decode --device cuda
                                              # G's one pass vs the SD-VAE decoder (256x256 on CUDA)

Models are randomly initialised: speed does not depend on training. A row is warm-up calls, then
timed calls (with torch.cuda.synchronize() around each on CUDA); the median and the minimum are
reported, and every ratio is a ratio of medians from this run. "naive" rows rebuild the reference
sampler (Apple's ml-tarflow: KV cache grown by torch.cat, CFG as two sequential passes) from the
same modules, checked to give the same output before it is timed.
"""
import argparse
import copy
import json
import functools
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from data import HelpFormatter, atomic_write
from model import (JACOBI_TOL, PRESETS, SCORE_BUDGET_BYTES, FlowConfig, ParallelInverse,
                   ReverseConfig, ReverseModel, TarFlow, forward_loss, reverse_config_for,
                   reverse_guesses, reverse_loss, score_activation_bytes, unpatchify)
from perceptual import LPIPS, ConvNeXtV2, PerceptualLoss
from sample import generate, load_models
from train import TRAIN_PRESETS, ema_update, guidance_scales
from vae import VAE, vae_decode_flops

GUIDANCE = 1.0  # w of the guided rows; any w != 0 costs the same
ROWS = {  # key: label. Training rows run at --batch_size, sampling rows at each of --sample_batches
    'fwd_train': 'forward stage: training step',
    'nll': 'forward model: NLL evaluation',
    'rev_train': 'reverse stage: training step',
    'inverse': 'F exact inverse',
    'inverse_cfg': 'F exact inverse + CFG',
    'inverse_cfg_static': 'F exact inverse + CFG, fixed-shape step (a CUDA graph on GPU)',
    'denoise': 'F Tweedie denoising',
    'inverse_cfg_denoise': 'F exact inverse + CFG + denoising',
    'inverse_par': 'F parallel inverse (auto strategy), from z',
    'inverse_par_cfg': 'F parallel inverse + CFG (auto), from z',
    'inverse_par_cfg_g': "F parallel inverse + CFG (auto), from G's guess",
    'inverse_par_cfg_denoise': 'F parallel inverse + CFG (auto) + denoising',
    'naive': 'naive inverse (reference loop)',
    'naive_cfg': 'naive inverse + CFG (2 sequential streams)',
    'nfe1': 'G 1-NFE',
    'nfe1_cfg': 'G 1-NFE, training-time CFG',
    'cfg_infer': 'G inference-time CFG (2-NFE)',
    'vae_decode': 'SD-VAE decoder (f8c4, random weights), per --vae_latent',
}
# imagenet64 FLOPs and H100 time; projected GPU memory of the paper presets; the parallel inverse's
# launches and FLOPs at imagenet64
EXTRAS = ('estimate', 'memory', 'jacobi_projection')
# speed-ups: (label, slower row, faster row, target, the target's batch: None for every batch)
RATIOS = [
    ('our inverse vs naive', 'naive', 'inverse', None, None),
    ('our inverse+CFG vs naive+CFG', 'naive_cfg', 'inverse_cfg', 2.0, None),
    ('1-NFE+CFG vs inverse+CFG+denoise', 'inverse_cfg_denoise', 'nfe1_cfg', 15.0, 1),
    ('1-NFE+CFG vs inverse+CFG', 'inverse_cfg', 'nfe1_cfg', None, None),
    ('fixed-shape (graph) vs sliced step', 'inverse_cfg', 'inverse_cfg_static', None, None),
    ('1-NFE vs inverse', 'inverse', 'nfe1', None, None),
    ('parallel vs sequential inverse', 'inverse', 'inverse_par', None, None),
    ('parallel vs sequential inverse + CFG', 'inverse_cfg', 'inverse_par_cfg', 2.0, 1),
    ("parallel + CFG: G's guess vs z", 'inverse_par_cfg', 'inverse_par_cfg_g', None, None),
    ('parallel vs sequential, + CFG + denoising', 'inverse_cfg_denoise', 'inverse_par_cfg_denoise',
     None, None),
    ('parallel + CFG vs naive + CFG', 'naive_cfg', 'inverse_par_cfg', None, None),
    ('training- vs inference-time CFG', 'cfg_infer', 'nfe1_cfg', None, None),
]
# dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched in order against
# torch.cuda.get_device_name()
BF16_PEAK = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12)]
ESTIMATE = dict(preset='imagenet64', gpu='H100 SXM', peak=989e12, mfu=0.4, gpus=8,
                images=256 * 1_000_000)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = parser.add_argument
    a('--preset', choices=sorted(PRESETS), default='cpu',
      help='model size (model.PRESETS); G from REVERSE_PRESETS')
    a('--device', default='auto', help="'auto' (cuda if available), 'cpu' or 'cuda'")
    a('--batch_size', type=int, default=32,
      help='batch of the training and NLL rows (TarFlow: 256 over 8 GPUs)')
    a('--sample_batches', default='1,64', help='comma-separated batch sizes of the sampling rows')
    a('--repeats', type=int, default=7, help='timed calls per row; fast rows go on for 1 s, slow '
      'ones stop at --budget (but not below 3, or --repeats if smaller)')
    a('--warmup', type=int, default=2,
      help='untimed calls per row first (allocator, kernels, optimizer state)')
    a('--budget', type=float, default=10.0,
      help='seconds per row after which timing stops (once 3 calls are in)')
    a('--dtype', choices=['auto', 'bf16', 'fp32'], default='auto', help='autocast dtype of every '
      'row; auto = bf16 on CUDA as train.py (sample.py samples in fp32: pass fp32 for its speed)')
    a('--compile', action=argparse.BooleanOptionalAction, default=False,
      help="torch.compile both training steps and G's one pass. The exact inverse stays eager: "
      "its single-token step slices the KV cache at the token's position, so it would recompile "
      "for every token")
    a('--threads', type=int, default=None, help="CPU threads; default 1 on CPU, for stable timings "
      'on a shared machine (the token loop is tiny ops, and each one waits for every thread); '
      "0 = PyTorch's default")
    a('--rows', default='all', help=f"comma-separated subset of: {','.join([*ROWS, *EXTRAS])}")
    a('--json', default='bench.json', help='where to write the results (atomically)')
    a('--seed', type=int, default=0, help='seed of the random weights and inputs')
    a('--ckpt', default=None, help='a forward or reverse checkpoint whose F (and G) replace the '
      "random ones in the sampling rows: the parallel inverse's passes depend on the weights "
      "(random ones converge in fewer passes than a trained F's flow next to the noise)")
    a('--jacobi_tol', type=float, default=JACOBI_TOL, help="the parallel rows' tolerance on the "
      'change per pass (sample.py --jacobi_tol)')
    a('--jacobi_plot', default=None, help='write a PNG of the change per pass against the pass, '
      "one line per flow (plain Jacobi to 1e-6, from z and from G's guess), e.g. "
      'scripts/jacobi_passes.png')
    a('--vae_latent', type=int, default=0, help='latent side of the vae_decode row (the image is '
      "8x). 0: 32 on CUDA (256x256, BiFlow's ImageNet setting), the preset's img_size/8 on CPU (2 "
      'at the cpu preset: a 16x16 image, so that a batch-64 call takes seconds, not minutes)')
    args = parser.parse_args(argv)
    args.rows = [*ROWS, *EXTRAS] if args.rows == 'all' else args.rows.split(',')
    bad = [row for row in args.rows if row not in ROWS and row not in EXTRAS]
    if bad:
        parser.error(f'--rows: unknown {bad}; choose from {[*ROWS, *EXTRAS]}')
    args.sample_batches = [int(b) for b in args.sample_batches.split(',')]
    if args.jacobi_tol < 0:
        parser.error(f'--jacobi_tol {args.jacobi_tol}: must be >= 0')
    return args


# --------------------------------------------------------------------------------------------------
# The baseline: the reference sampler's token loop, rebuilt from our modules


@torch.no_grad()
def naive_reverse(model: TarFlow, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0):
    """TarFlow.reverse with each block's reference loop (MetaBlock.reverse_reference): z (B, N, d)
    -> the noisy image (B, C, H, W)."""
    tokens = z.float()
    for block in reversed(model.blocks):
        tokens = block.reverse_reference(tokens, y, guidance, ramp, attn_temp)
    return unpatchify(tokens, model.cfg.patch_size, model.cfg.img_size)


# --------------------------------------------------------------------------------------------------
# Memory: a projection per GPU at the paper presets' sizes, from bytes measured on small probes


def saved_bytes(fn):
    """Bytes of the distinct tensors that autograd saves for the backward while fn() runs: what a
    training step keeps until its backward (counted by storage, so views and re-saves count
    once)."""
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


def _step_bytes(cfg, rcfg, bf16, batch=2):
    """Per-image saved bytes of one training step of F (rcfg None) or G, measured on the CPU: the
    difference between two batch sizes removes what does not grow with the batch (weights, and
    their bf16 copies)."""
    torch.manual_seed(0)
    flow = TarFlow(cfg)
    model = flow if rcfg is None else ReverseModel(rcfg)
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if bf16 else nullcontext()
    out = []
    for b in (batch, 2 * batch):
        shape = (b, cfg.in_channels, cfg.img_size, cfg.img_size)
        x, eps = torch.rand(shape) * 2 - 1, torch.randn(shape)
        y = torch.randint(max(cfg.num_classes, 1), (b,)) if cfg.num_classes else None
        w = torch.ones(b)

        def step():
            with ctx:
                if rcfg is None:
                    forward_loss(flow, x, y, eps)
                else:
                    reverse_loss(model, flow, x, y, w, eps)
        out.append(saved_bytes(step))
    return (out[1] - out[0]) / batch


def activation_bytes(cfg, stage='forward', bf16=True, rpreset=None):
    """Bytes one training image keeps for the backward at cfg's size, projected from probes of
    cfg's width and 16 tokens: per token, one layer costs the same whatever the token count (the
    attention kernels keep O(N) per token, not the N x N scores) and the depth only repeats layers
    and flows. Measured probes: (flows T, layers K, denoiser layers L) = (1,1,1), (1,2,1),
    (2,1,1), (1,1,2); the last two only for G."""
    # 16 tokens, one layer
    probe = replace(cfg, img_size=4 * cfg.patch_size, num_blocks=1, layers_per_block=1)
    if stage == 'forward':
        one, two = (_step_bytes(replace(probe, layers_per_block=layers), None, bf16)
                    for layers in (1, 2))
        # per 16 tokens: a layer's tensors, and a flow's own
        layer, per_flow = two - one, one - (two - one)
        return cfg.num_tokens / 16 * cfg.num_blocks * (per_flow + cfg.layers_per_block * layer)
    rev_cfg = reverse_config_for(cfg, rpreset or 'imagenet64')

    # a G probe: one group of one layer and a one-layer denoiser, unless kw says otherwise
    def rp(**kw):
        return replace(reverse_config_for(probe, rpreset or 'imagenet64'),
                       **{'num_blocks': 1, 'layers_per_block': 1, 'denoise_layers': 1, **kw})
    base = _step_bytes(probe, rp(), bf16)
    layer = _step_bytes(probe, rp(layers_per_block=2), bf16) - base
    # a group's head etc.
    group = _step_bytes(replace(probe, num_blocks=2), rp(num_blocks=2), bf16) - base - layer
    den = _step_bytes(probe, rp(denoise_layers=2), bf16) - base
    rest = base - group - layer - den
    groups = rev_cfg.num_blocks * (group + rev_cfg.layers_per_block * layer)
    return cfg.num_tokens / 16 * (rest + groups + rev_cfg.denoise_layers * den)


@functools.lru_cache
def perceptual_bytes(bf16=True, latent_hw=32, crop=224):
    """Bytes one image's perceptual terms keep for the backward in the latent setting (stage 2 with
    --lpips and --convnext): the SD-VAE decoder from a latent_hw^2 latent, then LPIPS-VGG16 and
    ConvNeXt-V2-Base on the crop. All three are convolutions and norms over the image (the
    decoder's one attention keeps O(N) too), so each is measured on two small images and the
    difference scaled to the full pixel count: the weights, which are saved as well (the input
    gradient needs them), cancel. Random weights, frozen, as in training."""
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if bf16 else nullcontext()
    torch.manual_seed(0)
    vae = VAE().requires_grad_(False)
    nets = PerceptualLoss(None, None, None, crop=None)
    nets.lpips, nets.convnext = LPIPS(), ConvNeXtV2()
    nets.requires_grad_(False)

    # saved bytes per pixel of the last two dims, weights cancelled
    def per_pixel(fn, shape, small, large):
        x1, x2 = (torch.rand(*shape, side, side, requires_grad=True) for side in (small, large))
        with ctx:
            return ((saved_bytes(lambda: fn(x2)) - saved_bytes(lambda: fn(x1)))
                    / (large ** 2 - small ** 2))
    return (per_pixel(vae.decode, (1, 4), 2, 4) * latent_hw ** 2 +
            per_pixel(lambda x: nets(x, x.detach()), (1, 3), 32, 64) * crop ** 2)


def memory_projection(name, world=8, fid_batch=256, num_samples=50_000, reverse_preset=None):
    """GiB per GPU of the paper run of preset `name` on `world` GPUs (and rank 0's host RAM for the
    50K gather). Training: fp32 weights, gradients, AdamW's two moments and the EMA (20 bytes a
    parameter), plus the saved activations of the per-GPU batch under bf16 autocast. The
    allocator's peak adds the backward's temporaries of a layer or two on top. Sampling: fp32
    weights plus the KV cache of one flow (k and v of every layer, both CFG streams), or the
    denoising chunk's activations (model.score_activation_bytes, checkpointed per flow)."""
    cfg, GiB = PRESETS[name], 2 ** 30
    train = TRAIN_PRESETS[name]
    b = train['batch_size'] // world
    # the SD-VAE presets: images are 8x the latent side, and stage 2 decodes them for LPIPS
    latent = cfg.in_channels == 4
    with torch.device('meta'):   # parameter counts without allocating them
        pf = sum(param.numel() for param in TarFlow(cfg).parameters())
        G = ReverseModel(reverse_config_for(cfg, name))
        pg = sum(param.numel() for param in G.parameters())
    act = activation_bytes(cfg)
    if train['grad_checkpoint']:   # one flow's activations, plus every flow's input (fp32)
        act = act / cfg.num_blocks + cfg.num_blocks * cfg.num_tokens * cfg.token_dim * 4
    cache = cfg.layers_per_block * 2 * (2 * fid_batch) * cfg.num_tokens * cfg.channels * 4
    chunk = max(1, SCORE_BUDGET_BYTES // score_activation_bytes(cfg))
    perceptual = b // train['perceptual_every']   # images a step puts through the perceptual terms
    image_side = 8 * cfg.img_size if latent else cfg.img_size
    rows = {
        'stage 1 training' + (' (checkpointed)' if train['grad_checkpoint'] else ''):
            (20 * pf + b * act) / GiB,
        'stage 2 training':
            (20 * pg + 4 * pf + b * activation_bytes(cfg, 'reverse', rpreset=name)) / GiB,
        **({f'+ perceptual terms on {perceptual} images': perceptual * perceptual_bytes() / GiB}
           if latent else {}),
        f'exact inverse + CFG, batch {fid_batch}': (4 * pf + cache) / GiB,
        f'denoising, chunk {chunk}': (4 * pf + chunk * score_activation_bytes(cfg)) / GiB,
        f'{num_samples // 1000}K gather (rank 0 host RAM)': num_samples * image_side ** 2 * 3 / GiB,
    }
    return dict(batch_per_gpu=b, params_forward=pf, params_reverse=pg, rows=rows)


# --------------------------------------------------------------------------------------------------
# Measuring


def measure(fn, device, warmup, repeats, budget, min_seconds=1.0):
    """Seconds per call of fn: warm-up calls, then `repeats` timed ones, more while under
    min_seconds (a millisecond row gets enough calls for its median to shrug off a stall), fewer
    past `budget` (never < min(3, repeats))."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds
                                   and len(times) < 100 * repeats):
        sync()  # CUDA is asynchronous: start and stop the clock with the device idle
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min(3, repeats) and time.perf_counter() - start > budget:
            break
    return times


def training_flops(cfg, batch=2):
    """FLOPs per image of a forward-stage training step (forward + backward), counted by
    FlopCounterMode on the meta device: nothing is computed, any preset is free. Attention counts
    as dense (causal masking not subtracted)."""
    with torch.device('meta'):
        model = TarFlow(cfg)
        x = torch.zeros(batch, cfg.in_channels, cfg.img_size, cfg.img_size)
        y = torch.zeros(batch, dtype=torch.long) if cfg.num_classes else None
    with FlopCounterMode(display=False) as fc:
        z, logdet, _ = model(x, y)
        TarFlow.nll_from(z, logdet).mean().backward()
    return fc.get_total_flops() / batch


def latent_flops(name):
    """FLOPs per image of each path of a latent preset (BiFlow's setting, 256x256 through the
    SD-VAE), counted by FlopCounterMode on the meta device (dense attention): F's training step;
    G's (its step, F's pass for the targets, the null-class pass of Eq. 5, and on every
    perceptual_every-th image the decoder twice, forward and the input gradient, and its forward on
    the target: 3 decoder passes); the exact inverse with CFG (two streams of F's forward: the
    cached token steps add up to one parallel pass), Tweedie denoising (F's score, checkpointed);
    G's one pass; the VAE decode. The perceptual nets at 224 (about 60 GFLOPs) are left out."""
    cfg = PRESETS[name]
    with torch.device('meta'):
        flow, G = TarFlow(cfg), ReverseModel(reverse_config_for(cfg, name))
        x = torch.zeros(1, cfg.in_channels, cfg.img_size, cfg.img_size)
        z, y = torch.zeros(1, cfg.num_tokens, cfg.token_dim), torch.zeros(1, dtype=torch.long)
        w = torch.zeros(1)

    def count(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()
    f_pass, one_pass = count(lambda: flow(x, y)), count(lambda: G(z, y, w))
    g_step = count(lambda: sum(output.sum() for output in G(z, y, w)).backward())
    decode = vae_decode_flops(VAE().cfg, cfg.img_size)
    flow.requires_grad_(False)
    # the score: a forward and the input gradient, plus the checkpoint's recompute
    xg = x.clone().requires_grad_()
    score = f_pass + count(lambda: TarFlow.nll_from(*flow(xg, y)[:2]).sum().backward())
    decodes = 3 * decode / TRAIN_PRESETS[name]['perceptual_every']
    return {'stage 1 training': training_flops(cfg, batch=1),
            'stage 2 training': g_step + f_pass + one_pass + decodes,
            'exact inverse + CFG': 2 * f_pass, 'Tweedie denoising': score,
            'G one pass (1-NFE)': one_pass, 'VAE decode': decode}


def plot_changes(curves, path, tol=None, size=(640, 300)):
    """The change per pass (largest over the batch, log scale) against the pass, a line per label
    (name -> [changes]), drawn with Pillow; a grey line at tol."""
    from PIL import Image, ImageDraw, ImageFont
    width, height = size
    img = Image.new('RGB', size, 'white')
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    vals = [change for changes in curves.values() for change in changes
            if change > 0 and math.isfinite(change)]
    vals += [tol] if tol else []
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    hi = hi if hi > lo else lo + 1
    x0, x1, top, bottom = 50, width - 150, 20, height - 30
    pmax = max(len(changes) for changes in curves.values())
    draw.rectangle([x0, top, x1, bottom], outline='black')
    title = 'largest change in a pass (log scale) against the pass, per flow'
    draw.text((x0, 4), title + (f'; grey: tolerance {tol:g}' if tol else ''),
              fill='black', font=font)

    def xy(npass, change):   # pixel coordinates of a change after npass passes
        return (x0 + npass / pmax * (x1 - x0),
                bottom - (math.log10(change) - lo) / (hi - lo) * (bottom - top))
    for exponent in range(lo, hi + 1):
        tick = xy(1, 10.0 ** exponent)[1]
        draw.line([x0 - 3, tick, x0, tick], fill='black')
        draw.text((4, tick - 5), f'1e{exponent}', fill='black', font=font)
    for npass in range(0, pmax + 1, max(1, pmax // 8)):
        draw.text((xy(npass, 1)[0] - 4, bottom + 6), str(npass), fill='black', font=font)
    if tol:
        draw.line([xy(0, tol), xy(pmax, tol)], fill=(170, 170, 170))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
               (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]
    flows = list(dict.fromkeys(label.split(',')[0] for label in curves))   # one colour per flow
    for j, (name, changes) in enumerate(curves.items()):
        pts = [xy(npass + 1, change) for npass, change in enumerate(changes)
               if change > 0 and math.isfinite(change)]
        col = colours[flows.index(name.split(',')[0]) % len(colours)]
        if 'from G' in name:                            # lighter from G's guess
            col = tuple((channel + 2 * 255) // 3 for channel in col)
        if len(pts) > 1:
            draw.line(pts, fill=col, width=2)
        draw.text((x1 + 10, top + 14 * j), f'{name} ({len(changes)})', fill=col, font=font)
    img.save(path)


@torch.no_grad()
def jacobi_curves(flow, G, z, y, w):
    """Each flow's change per pass, plain Jacobi to a tolerance of 1e-6 from its exact (sequential)
    input, from z and (with G) from G's guess:
    {label: [largest change over the batch, per pass]}."""
    guesses = reverse_guesses(G, z, y, w) if G is not None else [None] * len(flow.blocks)
    curves, tokens = {}, z   # tokens: flow t's exact input
    for t in reversed(range(len(flow.blocks))):
        block = flow.blocks[t]
        curves[f'flow {t}, from z'] = block.reverse_parallel(tokens, y, w, tol=1e-6)[1].changes
        if guesses[t] is not None:
            info = block.reverse_parallel(tokens, y, w, tol=1e-6, init=guesses[t])[1]
            curves[f'flow {t}, from G'] = info.changes
        tokens = block.reverse(tokens, y, w)
    return curves


class OpCount(TorchDispatchMode):
    """Counts the operators that run kernels (views excluded): on CUDA, one launch each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def jacobi_projection(name='imagenet64', passes=(8, 32, 128)):
    """Kernel launches per batch and FLOPs per sample of one flow's inverse + CFG at preset `name`,
    sequential against parallel (plain Jacobi) at each pass count in passes. Launches: operators
    counted on the CPU on a narrow model of the preset's depth (the count depends on neither width
    nor batch): per token step (from two token counts) and per pass (from 1 and 2 passes). FLOPs:
    FlopCounterMode on the meta device; the sequential steps add up to one parallel pass (both
    streams), each Jacobi pass is one."""
    cfg = PRESETS[name]
    narrow = [replace(cfg, channels=64, img_size=side * cfg.patch_size, num_blocks=1)
              for side in (4, 8)]

    def ops(probe, fn):
        torch.manual_seed(0)
        block = TarFlow(probe).blocks[0].eval()
        z, y = torch.randn(1, probe.num_tokens, probe.token_dim), torch.zeros(1, dtype=torch.long)
        with OpCount() as oc:
            fn(block, z, y)
        return oc.count
    seq = [ops(probe, lambda block, z, y: block.reverse(z, y, GUIDANCE)) for probe in narrow]
    step = (seq[1] - seq[0]) / (narrow[1].num_tokens - narrow[0].num_tokens)
    par = [ops(narrow[0], lambda block, z, y, npass=npass:
               block.reverse_parallel(z, y, GUIDANCE, tol=0.0, max_passes=npass))
           for npass in (1, 2)]
    per_pass = par[1] - par[0]
    with torch.device('meta'):
        block = TarFlow(cfg).blocks[0]
        with FlopCounterMode(display=False) as fc:
            block(torch.zeros(2, cfg.num_tokens, cfg.token_dim), torch.zeros(2, dtype=torch.long))
    flops = fc.get_total_flops()   # one pass of both streams for one sample = sequential's total
    N = cfg.num_tokens
    rows = {'sequential': dict(launches=(N - 1) * step + seq[0] - (narrow[0].num_tokens - 1) * step,
                               gflop=flops / 1e9)}
    for npass in passes:
        rows[f'parallel, {npass} passes'] = dict(launches=par[0] + (npass - 1) * per_pass,
                                                 gflop=npass * flops / 1e9)
    return dict(preset=name, tokens=N, launches_per_step=step,
                launches_per_pass=per_pass, rows=rows)


def bf16_peak(device):
    if device.type != 'cuda':
        return None, 'none (not CUDA)'
    name = torch.cuda.get_device_name(device)
    return next(((peak, name) for model, peak in BF16_PEAK if model in name),
                (None, f'unknown ({name})'))


def jacobi_report(row, inv):
    """Print and record a parallel row's plan (segment length per flow, 1 = sequential) and passes
    per flow."""
    stats = inv.passes_per_flow()
    fallbacks = sum(fb for _, _, fb in stats)
    row['jacobi'] = dict(choice=[plan.choice for plan in inv.plan],
                         passes=[(mean, mx) for mean, mx, _ in stats],
                         fallbacks=fallbacks,
                         plan_ms={t: {strategy: 1e3 * seconds
                                      for strategy, seconds in plan.seconds.items()}
                                  for t, plan in enumerate(inv.plan)})
    print('  strategy per flow (0 = next to the data): ' +
          ', '.join(f'{t}: {"seq" if plan.choice == 1 else plan.choice}'
                    for t, plan in enumerate(inv.plan)) +
          '; passes mean/max: ' + ', '.join(f'{mean:.1f}/{mx}' for mean, mx, _ in stats) +
          (f'; {fallbacks} fell back' if fallbacks else ''))


def train_step(model, loss_fn, ctx, device):
    """One optimizer step as train.py takes it: autocast loss, backward, clipping, AdamW, EMA."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95),
                            weight_decay=1e-4, fused=True)
    ema = copy.deepcopy(model).requires_grad_(False)

    def step():
        with ctx():
            loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # as train.py: a non-finite step is skipped on the device, without a sync
        bad = ~torch.isfinite(gnorm)
        opt.found_inf = bad.float()
        opt.step()
        ema_update(ema, model, 0.999, ok=~bad)
    return step


# --------------------------------------------------------------------------------------------------
# One run: what every row shares, then a function per group of rows, in the order they print


@dataclass
class Session:
    """What the rows of one run share: the flags, the device, the autocast context (a factory), F's
    and G's configs, the models the sampling rows time, and the results that go to --json."""
    args: argparse.Namespace
    device: torch.device
    ctx: Callable                  # () -> bf16 autocast, or a null context in fp32
    cfg: FlowConfig
    rcfg: ReverseConfig
    flow: TarFlow
    G: ReverseModel
    trained_g: bool                # G's weights come from --ckpt
    out: dict

    def labels(self, batch):
        if not self.cfg.num_classes:
            return None
        return torch.randint(self.cfg.num_classes, (batch,), device=self.device)

    def images(self, batch):
        shape = (batch, self.cfg.in_channels, self.cfg.img_size, self.cfg.img_size)
        return torch.rand(shape, device=self.device) * 2 - 1

    def time_row(self, key, batch, fn, label=None, warmup=None):
        """Time fn as row `key` at `batch` (--warmup warm-up calls unless warmup is given): record
        the row in out['rows'] and print its line of the table."""
        args = self.args
        warmup = args.warmup if warmup is None else warmup
        ts = measure(fn, self.device, warmup, args.repeats, args.budget)
        med, best = statistics.median(ts), min(ts)
        self.out['rows'][f'{key}_b{batch}'] = dict(row=key, batch=batch, median_ms=med * 1e3,
                                                   min_ms=best * 1e3, img_per_s=batch / med,
                                                   calls=len(ts))
        print(f'{label or ROWS[key]:46s} {batch:5d} {med * 1e3:11.2f} {best * 1e3:11.2f} '
              f'{batch / med:10.1f}', flush=True)


def setup_device(args):
    """The device of --device, with --threads set, and TF32 matmuls on CUDA as train.py uses."""
    if args.device == 'auto':
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(args.device)
    threads = (1 if device.type == 'cpu' else 0) if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def timed_models(args, device):
    """-> (cfg, rcfg, F, G, whether G is trained): the models the sampling rows time, in eval mode.
    Random F has non-zero output weights, so that the inverse does real work (std 0.2/sqrt(width),
    0.02 at the cpu preset, keeps it finite); random G is as initialised (speed does not depend on
    the weights). With --ckpt its F (and G) replace the random ones."""
    cfg = PRESETS[args.preset]
    # (model, F or None, decode) of a checkpoint
    loaded = load_models(args.ckpt, device, verbose=False) if args.ckpt else None
    if loaded:
        cfg = (loaded[1] or loaded[0]).cfg
    rcfg = reverse_config_for(cfg, args.preset)
    flow = TarFlow(cfg)
    for block in flow.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.2 / math.sqrt(cfg.channels))
    flow.to(device).eval().requires_grad_(False)
    G = ReverseModel(rcfg).to(device).eval()
    if loaded:   # only the sampling rows use its weights: the training rows build their own models
        flow, G = (loaded[0], G) if loaded[1] is None else (loaded[1], loaded[0])
    return cfg, rcfg, flow, G, loaded is not None and loaded[1] is not None


def start_session(args):
    """Device, seed and models of the run, and its results so far: the settings and parameter
    counts."""
    device = setup_device(args)
    bf16 = args.dtype == 'bf16' or (args.dtype == 'auto' and device.type == 'cuda')
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    torch.manual_seed(args.seed)
    cfg, rcfg, flow, G, trained_g = timed_models(args, device)
    params = {'forward': sum(param.numel() for param in flow.parameters()),
              'reverse': sum(param.numel() for param in G.parameters())}
    if args.compile:
        G.compile()  # in place, so that G.decode's self(...) runs the compiled forward
    out = dict(preset=args.preset, ckpt=args.ckpt, jacobi_tol=args.jacobi_tol,
               device=str(device), device_name=bf16_peak(device)[1],
               dtype='bf16' if bf16 else 'fp32', torch=torch.__version__,
               threads=torch.get_num_threads(), compile=args.compile, batch_size=args.batch_size,
               sample_batches=args.sample_batches, repeats=args.repeats, warmup=args.warmup,
               guidance=GUIDANCE, params=params, rows={}, ratios={}, checks={})
    return Session(args, device, ctx, cfg, rcfg, flow, G, trained_g, out)


def print_header(session):
    """The run's settings, the models' sizes and the table's column heads."""
    args, out, params = session.args, session.out, session.out['params']
    print(f'bench: preset {args.preset} on {session.device} ({out["threads"]} threads), '
          f'{out["dtype"]}, torch {torch.__version__}{", compiled" if args.compile else ""}; '
          f'median and min of >= {args.repeats} timed calls (>= 1 s, <= {args.budget:g} s) after '
          f'{args.warmup} warm-up; a shared machine is noisy: read medians')
    print(f'weights: {args.ckpt or "random"} (G: {"trained" if session.trained_g else "random"}); '
          f'parallel rows: tolerance {args.jacobi_tol:g}, strategy planned on an untimed call')
    print(f'F (TarFlow): {params["forward"] / 1e6:.2f}M parameters, {session.cfg.num_tokens} '
          f'tokens x {session.cfg.token_dim}; G (BiFlow): {params["reverse"] / 1e6:.2f}M '
          f'parameters; guided rows use w = {GUIDANCE}')
    print(f'{"row":46s} {"batch":>5s} {"median ms":>11s} {"min ms":>11s} {"img/s":>10s}')


def report_mfu(row, cfg, device):
    """Add the FLOPs per training image and the MFU against the device's bf16 peak to the fwd_train
    row, and print them."""
    flops = training_flops(cfg)
    peak, name = bf16_peak(device)
    row.update(flops_per_image=flops, device_bf16_peak=peak,
               mfu=flops * row['img_per_s'] / peak if peak else None)
    print(f'  {flops / 1e9:.3f} GFLOP per training image (FlopCounterMode; forward + backward), '
          f'{flops * row["img_per_s"] / 1e12:.3f} TFLOP/s achieved; MFU vs bf16 peak: ' +
          (f'{100 * row["mfu"]:.1f}% of {peak / 1e12:.0f} TFLOP/s ({name})' if peak else name))


def training_rows(session):
    """The fwd_train, nll and rev_train rows at --batch_size. Each training step updates its own
    trainable copy: updates must not touch the models timed for sampling. The batch is drawn even
    when no training row runs, so that the sampling rows' inputs depend only on --seed."""
    args, cfg, ctx, device = session.args, session.cfg, session.ctx, session.device
    batch = args.batch_size
    x, y = session.images(batch), session.labels(batch)
    eps = torch.randn(batch, cfg.in_channels, cfg.img_size, cfg.img_size, device=device)
    if 'fwd_train' in args.rows:
        model = TarFlow(cfg).to(device).train()
        if args.compile:
            model.compile()

        def nll_loss(net):
            z, logdet, _ = net(x + cfg.noise_std * eps, y)
            return TarFlow.nll_from(z, logdet).mean()
        session.time_row('fwd_train', batch, train_step(model, nll_loss, ctx, device))
        report_mfu(session.out['rows'][f'fwd_train_b{batch}'], cfg, device)
        del model
    if 'nll' in args.rows:
        def nll():
            with torch.no_grad(), ctx():
                session.flow.nll(x + cfg.noise_std * eps, y)
        session.time_row('nll', batch, nll)
    if 'rev_train' in args.rows:
        model = ReverseModel(session.rcfg).to(device).train()
        if args.compile:
            model.compile()
        yr = y if cfg.num_classes else torch.zeros(batch, dtype=torch.long, device=device)
        w = guidance_scales(torch.rand(batch, 2, device=device), 3.0)   # train.py's draw
        step = train_step(model, lambda net: reverse_loss(net, session.flow, x, yr, w, eps)[0],
                          ctx, device)
        session.time_row('rev_train', batch, step)
        del model


def check_naive_baseline(session):
    """Apples to apples: the naive baseline must compute our output, in exact fp32 (TF32 off), at
    w = 0 and w = GUIDANCE; raises RuntimeError if it does not."""
    flow, cfg, checks = session.flow, session.cfg, session.out['checks']
    zc = torch.randn(2, cfg.num_tokens, cfg.token_dim, device=session.device)
    yc = session.labels(2)
    # exact fp32 while the check runs
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    for w in (0.0, GUIDANCE):
        ours, naive = flow.reverse(zc, yc, w), naive_reverse(flow, zc, yc, w)
        err, scale = (ours - naive).abs().max().item(), ours.abs().max().item()
        checks[f'naive_equals_ours_w{w:g}'] = dict(max_abs_diff=err, max_abs=scale)
        if not (math.isfinite(scale) and err <= 1e-4 * max(1.0, scale)):
            raise RuntimeError(f'naive baseline differs from MetaBlock.reverse at w={w}: '
                               f'max |diff| {err:.3g} (max |x| {scale:.3g}); the comparison would '
                               'not be apples to apples')
    torch.backends.cuda.matmul.allow_tf32 = tf32
    print('  check: naive baseline equals MetaBlock.reverse (max |diff| '
          f'{max(check["max_abs_diff"] for check in checks.values()):.1e}, fp32)')


def sampling_calls(session, z, yb, xb):
    """-> (calls, inverses): every sampling row's call on noise z, labels yb and images xb, keyed by
    row in the order the rows print, and the ParallelInverse of each parallel row."""
    flow, G, tol = session.flow, session.G, session.args.jacobi_tol
    calls = {
        'inverse': lambda: generate(flow, None, z, yb, 0.0, denoise=False),
        'inverse_cfg': lambda: generate(flow, None, z, yb, GUIDANCE, denoise=False),
        'inverse_cfg_static': lambda: generate(flow, None, z, yb, GUIDANCE, denoise=False,
                                               static=True),
        'denoise': lambda: flow.denoise(xb, yb),
        'inverse_cfg_denoise': lambda: generate(flow, None, z, yb, GUIDANCE, denoise=True),
        'naive': lambda: naive_reverse(flow, z, yb, 0.0),
        'naive_cfg': lambda: naive_reverse(flow, z, yb, GUIDANCE),
        'nfe1': lambda: generate(G, flow, z, yb, 0.0, guidance_mode='train'),
        'nfe1_cfg': lambda: generate(G, flow, z, yb, GUIDANCE, guidance_mode='train'),
        'cfg_infer': lambda: generate(G, flow, z, yb, GUIDANCE, guidance_mode='inference'),
    }
    inverses = {}
    for key, w, den, init in [('inverse_par', 0.0, False, 'z'),
                              ('inverse_par_cfg', GUIDANCE, False, 'z'),
                              ('inverse_par_cfg_g', GUIDANCE, False, 'G'),
                              ('inverse_par_cfg_denoise', GUIDANCE, True, 'z')]:
        inv = inverses[key] = ParallelInverse('auto', tol, init=init)
        calls[key] = functools.partial(generate, G if init == 'G' else flow, flow, z, yb, w,
                                       denoise=den, inverse=inv, exact=init == 'G')
    return calls, inverses


def check_parallel_matches_sequential(session, batch, z, yb, calls):
    """The parallel rows' samples before denoising, within 1e-3 of the sequential inverse's."""
    args, checks = session.args, session.out['checks']
    with session.ctx():
        ref = generate(session.flow, None, z, yb, GUIDANCE, denoise=False)
        for key in ('inverse_par_cfg', 'inverse_par_cfg_g'):
            if key in args.rows:
                err = (calls[key]() - ref).abs().max().item()
                checks[f'{key}_b{batch} within 1e-3 of sequential'] = dict(max_abs_diff=err,
                                                                            met=err <= 1e-3)
                print(f'  check: {ROWS[key]} vs sequential, batch {batch}: max |diff| {err:.1e} '
                      f'(target <= 1e-3: {"met" if err <= 1e-3 else "NOT met"})')


def sampling_rows(session):
    """The sampling rows of --rows at each of --sample_batches; a parallel row's strategy is planned
    on an untimed call first, and its line is followed by its plan and passes."""
    args, cfg = session.args, session.cfg
    for batch in args.sample_batches:
        z = torch.randn(batch, cfg.num_tokens, cfg.token_dim, device=session.device)
        yb, xb = session.labels(batch), session.images(batch)
        calls, inverses = sampling_calls(session, z, yb, xb)
        for key, fn in calls.items():
            if key in args.rows:
                def call(fn=fn):
                    with session.ctx():
                        return fn()
                if key in inverses:
                    call()   # the planner times every strategy on this call; the row, the choice
                session.time_row(key, batch, call)
                if key in inverses:
                    jacobi_report(session.out['rows'][f'{key}_b{batch}'], inverses[key])
        if 'inverse_par_cfg' in args.rows:
            check_parallel_matches_sequential(session, batch, z, yb, calls)


def vae_decode_rows(session):
    """The frozen SD-VAE decoder that a latent-space BiFlow runs after its one pass, at each of
    --sample_batches, then its parameters, FLOPs and FLOP rate."""
    args, device, out = session.args, session.device, session.out
    hw = args.vae_latent or (32 if device.type == 'cuda' else max(1, session.cfg.img_size // 8))
    vae = VAE().to(device).eval().requires_grad_(False)
    for batch in args.sample_batches:
        zl = torch.randn(batch, vae.cfg.latent_channels, hw, hw, device=device)

        def decode(zl=zl):
            with torch.no_grad(), session.ctx():
                vae.decode(zl)
        # one warm-up call: the slowest row on CPU by far, and nothing in it needs more to settle
        session.time_row('vae_decode', batch, decode,
                         f'SD-VAE decode, {hw}x{hw} latent -> {8 * hw}x{8 * hw}',
                         min(args.warmup, 1))
    params = sum(param.numel() for name, param in vae.named_parameters()
                 if name.startswith(('decoder.', 'post_quant_conv.')))
    flops, flops256 = vae_decode_flops(vae.cfg, hw), vae_decode_flops(vae.cfg, 32)
    rate = flops * out['rows'][f'vae_decode_b{args.sample_batches[-1]}']['img_per_s']
    out['vae'] = dict(latent=hw, decoder_params=params, flops_per_image=flops,
                      flops_per_image_256=flops256, flop_per_s=rate)
    print(f'  SD-VAE decoder: {params / 1e6:.2f}M parameters, {flops256 / 1e9:.0f} GFLOP per '
          f'256x256 image = {flops256 / 2e9:.0f}G multiply-adds (BiFlow quotes 49M and 308 GFLOPs: '
          f'a count of multiply-adds); {flops / 1e9:.2f} GFLOP per {8 * hw}x{8 * hw} image, '
          f'{rate / 1e12:.3f} TFLOP/s at batch {args.sample_batches[-1]}')


def speedup_rows(out, batches):
    """Every speed-up of RATIOS that this run timed both rows of, as a ratio of medians per batch,
    and its target's verdict; a target at a batch this run did not time is not judged."""
    rows = out['rows']
    if any(f'{slow}_b{b}' in rows and f'{fast}_b{b}' in rows for _, slow, fast, _, _ in RATIOS
           for b in batches):
        print('speed-ups (ratio of medians, this run)')
    for label, slow, fast, target, target_batch in RATIOS:
        got = {f'b{b}': rows[f'{slow}_b{b}']['median_ms'] / rows[f'{fast}_b{b}']['median_ms']
               for b in batches if f'{slow}_b{b}' in rows and f'{fast}_b{b}' in rows}
        if not got:
            continue
        out['ratios'][label] = got
        line = '   '.join(f'{at}: {ratio:7.1f}x' for at, ratio in got.items())
        judged = {at: ratio for at, ratio in got.items()
                  if target_batch is None or at == f'b{target_batch}'}
        if target and judged:
            verdicts = {at: ratio >= target for at, ratio in judged.items()}
            out['checks'][f'{label} >= {target:g}x'] = verdicts
            line += (f'   target >= {target:g}x ' +
                     ('' if target_batch is None else f'at b{target_batch}') + ': ' +
                     ', '.join(f'{at} {"met" if met else "NOT met"}'
                               for at, met in verdicts.items()))
        print(f'  {label:40s} {line}')


def estimate_rows(out):
    """Back-of-envelope estimates for the paper runs, labelled as such: imagenet64's training time
    on ESTIMATE's GPUs, and the FLOPs per image of every path of BiFlow's latent setting."""
    est = ESTIMATE
    flops = training_flops(PRESETS[est['preset']])
    per_gpu = est['mfu'] * est['peak'] / flops
    days = est['images'] / (per_gpu * est['gpus']) / 86400
    out['estimate'] = dict(est, flops_per_image=flops, images_per_s_per_gpu=per_gpu, days=days)
    print(f'estimate, not a measurement: {est["preset"]} training = {flops / 1e12:.2f} TFLOP per '
          f'image (FlopCounterMode, meta device); on an {est["gpu"]} ({est["peak"] / 1e12:.0f} '
          f'TFLOP/s bf16) at {100 * est["mfu"]:.0f}% MFU: {per_gpu:.0f} img/s per GPU, '
          f'{per_gpu * est["gpus"]:.0f} on {est["gpus"]}; {est["images"] / 1e6:.0f}M images '
          f'(200 epochs: 1M steps x 256) in {days:.1f} days')
    out['latent_estimate'] = {}
    for name in ('itarflow-b2', 'itarflow-xl2'):
        paths = out['latent_estimate'][name] = latent_flops(name)
        print(f'estimate, not a measurement: {name} (256x256 via the SD-VAE), GFLOP per image: ' +
              ' | '.join(f'{path} {flops / 1e9:.0f}' for path, flops in paths.items()) +
              f'; at {100 * est["mfu"]:.0f}% MFU of an {est["gpu"]}: stage 1 '
              f'{est["mfu"] * est["peak"] / paths["stage 1 training"]:.0f} img/s per GPU')


def memory_rows(out):
    """The projected GPU memory of the paper presets (memory_projection), labelled as such: probes
    measured on this machine, scaled to the paper sizes."""
    print('memory projection per GPU, 8 GPUs, GiB (training: states + saved bf16 activations; '
          'probes measured on this machine, see memory_projection)')
    out['memory'] = {}
    for name in ('imagenet64', 'imagenet64-1024', 'imagenet64-p4', 'imagenet128', 'afhq256',
                 'itarflow-b2', 'itarflow-xl2'):
        proj = out['memory'][name] = memory_projection(name)
        print(f'  {name} (batch {proj["batch_per_gpu"]}/GPU; F '
              f'{proj["params_forward"] / 1e6:.0f}M, G {proj["params_reverse"] / 1e6:.0f}M): ' +
              ' | '.join(f'{what} {gib:.1f}' for what, gib in proj['rows'].items()))


def jacobi_projection_rows(out):
    """The parallel inverse's kernel launches and FLOPs at paper size (jacobi_projection), labelled
    as a projection."""
    jp = out['jacobi_projection'] = jacobi_projection()
    print(f'projection, not a measurement: one flow of {jp["preset"]} ({jp["tokens"]} tokens), '
          f'inverse + CFG, {jp["launches_per_step"]:.0f} kernel launches per token step, '
          f'{jp["launches_per_pass"]:.0f} per Jacobi pass:')
    for method, row in jp['rows'].items():
        print(f'  {method}: {row["launches"]:.0f} launches per batch, '
              f'{row["gflop"]:.1f} GFLOP/sample')


def write_jacobi_plot(session):
    """--jacobi_plot: the change per pass of every flow at batch 64, from z and (with a trained G)
    from G's guess, drawn to the PNG and kept in the results."""
    args, cfg = session.args, session.cfg
    zc = torch.randn(64, cfg.num_tokens, cfg.token_dim, device=session.device, generator=None)
    curves = jacobi_curves(session.flow, session.G if session.trained_g else None, zc,
                           session.labels(64), GUIDANCE)
    plot_changes(curves, args.jacobi_plot, args.jacobi_tol)
    session.out['jacobi_curves'] = curves
    print(f'wrote {args.jacobi_plot}: change per pass per flow, batch 64, w = {GUIDANCE:g}; '
          'passes to 1e-6: ' +
          ', '.join(f'{label} {len(changes)}' for label, changes in curves.items()))


def main(argv=None):
    """Run the rows of --rows in the table's order, print them, and write the results to --json;
    -> the results."""
    args = get_args(argv)
    t_start = time.perf_counter()
    session = start_session(args)
    out = session.out
    print_header(session)
    training_rows(session)
    if 'naive' in args.rows or 'naive_cfg' in args.rows:
        check_naive_baseline(session)
    sampling_rows(session)
    if 'vae_decode' in args.rows:
        vae_decode_rows(session)
    speedup_rows(out, args.sample_batches)
    if 'estimate' in args.rows:
        estimate_rows(out)
    if 'memory' in args.rows:
        memory_rows(out)
    if 'jacobi_projection' in args.rows:
        jacobi_projection_rows(out)
    if args.jacobi_plot:
        write_jacobi_plot(session)
    out['total_s'] = time.perf_counter() - t_start
    print(f'total {out["total_s"]:.0f} s; wrote {args.json}')
    atomic_write(args.json, lambda file: file.write(json.dumps(out, indent=1).encode()))
    return out


if __name__ == '__main__':
    main()
