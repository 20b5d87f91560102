"""
Times every training and sampling path of TarFlow (the forward model F) and BiFlow (its learned
reverse G) side by side in one run, so that each speed-up is a ratio measured on the same machine
at the same moment.

    python bench.py                                   # cpu preset: a table and bench.json
    python bench.py --rows inverse_cfg,naive_cfg,nfe1_cfg    # a subset of rows
    python bench.py --threads 0                       # PyTorch's thread default (bench's: 1 on CPU)
    python bench.py --preset imagenet64 --device cuda --compile --sample_batches 1,64   # with MFU

Models are randomly initialised: speed does not depend on training. A row is warm-up calls, then
timed calls (with the device synchronised around each on CUDA); the median and the minimum are
reported, and every ratio is a ratio of medians from this run. The naive rows run Apple's
ml-tarflow inverse (KV caches grown by torch.cat, CFG as two sequential streams; naive_reverse in
test_biflow.py) on the same modules, checked to give our inverse's output before it is timed.
"""
import argparse
import copy
import json
import math
import statistics
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from data import HelpFormatter, atomic_write
from model import PRESETS, ReverseModel, TarFlow, reverse_config_for, reverse_loss
from train import ema_update, guidance_scales

GUIDANCE = 1.0   # w of the guided rows; any w != 0 costs the same
ROWS = {   # key: label. Training rows run at --batch_size, sampling rows at each --sample_batches
    'fwd_train': 'forward stage: training step',
    'nll': 'forward model: NLL evaluation',
    'rev_train': 'reverse stage: training step',
    'inverse': 'F exact inverse',
    'inverse_cfg': 'F exact inverse + CFG',
    'denoise': 'F Tweedie denoising',
    'inverse_cfg_denoise': 'F exact inverse + CFG + denoising',
    'naive': 'naive inverse (Apple ml-tarflow)',
    'naive_cfg': 'naive inverse + CFG (2 sequential streams)',
    'nfe1': 'G 1-NFE',
    'nfe1_cfg': 'G 1-NFE, training-time CFG',
    'cfg_infer': 'G inference-time CFG (2-NFE)',
}
# speed-ups: (label, slower row, faster row, target or None, the batch the target is for or None)
RATIOS = [
    ('our inverse vs naive', 'naive', 'inverse', None, None),
    ('our inverse+CFG vs naive+CFG', 'naive_cfg', 'inverse_cfg', 2.0, None),
    ('1-NFE+CFG vs inverse+CFG+denoise', 'inverse_cfg_denoise', 'nfe1_cfg', 15.0, 1),
    ('1-NFE+CFG vs inverse+CFG', 'inverse_cfg', 'nfe1_cfg', None, None),
    ('1-NFE vs inverse', 'inverse', 'nfe1', None, None),
    ('training- vs inference-time CFG', 'cfg_infer', 'nfe1_cfg', None, None),
]
# dense bf16 tensor-core peaks (no sparsity) in FLOP/s, the first match in the device's name wins
BF16_PEAK = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12)]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = parser.add_argument
    a('--preset', choices=sorted(PRESETS), default='cpu',
      help='model size (model.PRESETS); G from model.REVERSE_PRESETS')
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
      help="torch.compile both training steps and G's one pass; the exact inverse stays eager "
      "(its token step would recompile at every token's position)")
    a('--threads', type=int, default=None, help='CPU threads; default 1 on CPU, for stable timings '
      "on a shared machine (the token loop is tiny ops); 0 = PyTorch's default")
    a('--rows', default='all', help=f"comma-separated subset of: {','.join(ROWS)}")
    a('--json', default='bench.json', help='where to write the results (atomically)')
    a('--seed', type=int, default=0, help='seed of the random weights and inputs')
    args = parser.parse_args(argv)
    args.rows = list(ROWS) if args.rows == 'all' else args.rows.split(',')
    bad = [row for row in args.rows if row not in ROWS]
    if bad:
        parser.error(f'--rows: unknown {bad}; choose from {list(ROWS)}')
    args.sample_batches = [int(b) for b in args.sample_batches.split(',')]
    return args


def measure(fn, device, warmup, repeats, budget, min_seconds=1.0):
    """Seconds per call of fn: warm-up calls, then `repeats` timed ones, more while under
    min_seconds (so that a millisecond row's median shrugs off a stall), fewer past `budget`
    (never fewer than min(3, repeats))."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds
                                   and len(times) < 100 * repeats):
        sync()   # CUDA is asynchronous: start and stop the clock with the device idle
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min(3, repeats) and time.perf_counter() - start > budget:
            break
    return times


def training_flops(cfg, batch=2):
    """FLOPs per image of a forward-stage training step (forward + backward), counted by
    FlopCounterMode on the meta device: nothing is computed. Attention counts as dense."""
    with torch.device('meta'):
        model = TarFlow(cfg)
        x = torch.zeros(batch, cfg.in_channels, cfg.img_size, cfg.img_size)
        y = torch.zeros(batch, dtype=torch.long) if cfg.num_classes else None
    with FlopCounterMode(display=False) as counter:
        z, logdet, _ = model(x, y)
        TarFlow.nll_from(z, logdet).mean().backward()
    return counter.get_total_flops() / batch


def train_step(model, loss_fn, ctx):
    """One optimizer step as train.py takes it: autocast loss, backward, clipping, AdamW, EMA."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4,
                            fused=True)
    ema = copy.deepcopy(model).requires_grad_(False)

    def step():
        with ctx():
            loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        bad = ~torch.isfinite(gnorm)   # as train.py: a non-finite step is skipped without a sync
        opt.found_inf = bad.float()
        opt.step()
        ema_update(ema, model, 0.999, ok=~bad)
    return step


class Bench:
    """One run: the flags, the device, the autocast context, the models that the sampling rows time
    (F with random non-zero output weights, so that the inverse does real work; G as initialised)
    and the results that go to --json."""

    def __init__(self, args):
        self.args = args
        if args.device == 'auto':
            args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = device = torch.device(args.device)
        threads = (1 if device.type == 'cpu' else 0) if args.threads is None else args.threads
        if threads:
            torch.set_num_threads(threads)
        if device.type == 'cuda':   # TF32 matmuls, as train.py
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        bf16 = args.dtype == 'bf16' or (args.dtype == 'auto' and device.type == 'cuda')
        self.ctx = (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else nullcontext
        torch.manual_seed(args.seed)
        self.cfg = cfg = PRESETS[args.preset]
        self.rcfg = reverse_config_for(cfg, args.preset)
        self.flow = TarFlow(cfg)
        for block in self.flow.blocks:   # std 0.2/sqrt(width) keeps the inverse finite
            torch.nn.init.normal_(block.proj_out.weight, std=0.2 / math.sqrt(cfg.channels))
        self.flow.to(device).eval().requires_grad_(False)
        self.G = ReverseModel(self.rcfg).to(device).eval()
        params = {'forward': sum(p.numel() for p in self.flow.parameters()),
                  'reverse': sum(p.numel() for p in self.G.parameters())}
        if args.compile:
            self.G.compile()   # in place: G.decode's self(...) runs the compiled forward
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
        self.peak = next((peak for gpu, peak in BF16_PEAK if gpu in name), None)
        self.out = dict(preset=args.preset, device=str(device), device_name=name,
                        dtype='bf16' if bf16 else 'fp32', torch=torch.__version__,
                        threads=torch.get_num_threads(), compile=args.compile,
                        batch_size=args.batch_size, sample_batches=args.sample_batches,
                        repeats=args.repeats, warmup=args.warmup, guidance=GUIDANCE,
                        params=params, rows={}, ratios={}, checks={})
        print(f'bench: preset {args.preset} on {name} ({self.out["threads"]} threads), '
              f'{self.out["dtype"]}, torch {torch.__version__}{", compiled" * args.compile}; '
              f'median and min of >= {args.repeats} timed calls after {args.warmup} warm-up; '
              'a shared machine is noisy: read medians')
        print(f'F: {params["forward"] / 1e6:.2f}M parameters, {cfg.num_tokens} tokens x '
              f'{cfg.token_dim}; G: {params["reverse"] / 1e6:.2f}M parameters; random weights; '
              f'guided rows use w = {GUIDANCE:g}')
        print(f'{"row":46s} {"batch":>5s} {"median ms":>11s} {"min ms":>11s} {"img/s":>10s}')

    def labels(self, batch):   # (batch,) random classes, None if F is unconditional
        if self.cfg.num_classes:
            return torch.randint(self.cfg.num_classes, (batch,), device=self.device)

    def images(self, batch):   # (batch, C, H, W) uniform in [-1, 1]
        shape = (batch, self.cfg.in_channels, self.cfg.img_size, self.cfg.img_size)
        return torch.rand(shape, device=self.device) * 2 - 1

    def time_row(self, key, batch, fn):
        """Time fn as row `key` at `batch`: record it in out['rows'] and print its line."""
        args = self.args
        times = measure(fn, self.device, args.warmup, args.repeats, args.budget)
        med, best = statistics.median(times), min(times)
        self.out['rows'][f'{key}_b{batch}'] = dict(row=key, batch=batch, median_ms=med * 1e3,
                                                   min_ms=best * 1e3, img_per_s=batch / med,
                                                   calls=len(times))
        print(f'{ROWS[key]:46s} {batch:5d} {med * 1e3:11.2f} {best * 1e3:11.2f} '
              f'{batch / med:10.1f}', flush=True)
        return self.out['rows'][f'{key}_b{batch}']

    def training_rows(self):
        """fwd_train, nll and rev_train at --batch_size. Each training row steps its own model, so
        that no update touches the models timed for sampling. The batch is drawn even when no
        training row runs: the sampling rows' inputs depend only on --seed."""
        args, cfg, ctx, batch = self.args, self.cfg, self.ctx, self.args.batch_size
        x, y = self.images(batch), self.labels(batch)
        eps = torch.randn_like(x)
        if 'fwd_train' in args.rows:
            model = TarFlow(cfg).to(self.device).train()
            if args.compile:
                model.compile()

            def nll_loss(net):
                z, logdet, _ = net(x + cfg.noise_std * eps, y)
                return TarFlow.nll_from(z, logdet).mean()
            row = self.time_row('fwd_train', batch, train_step(model, nll_loss, ctx))
            flops = training_flops(cfg)
            row.update(flops_per_image=flops, device_bf16_peak=self.peak,
                       mfu=self.peak and flops * row['img_per_s'] / self.peak)
            print(f'  {flops / 1e9:.3f} GFLOP per training image (forward + backward), '
                  f'{flops * row["img_per_s"] / 1e12:.3f} TFLOP/s' +
                  (f', MFU {100 * row["mfu"]:.1f}% of bf16 peak' if self.peak else ''))
        if 'nll' in args.rows:
            def nll():
                with torch.no_grad(), ctx():
                    self.flow.nll(x + cfg.noise_std * eps, y)
            self.time_row('nll', batch, nll)
        if 'rev_train' in args.rows:
            model = ReverseModel(self.rcfg).to(self.device).train()
            if args.compile:
                model.compile()
            yr = y if cfg.num_classes else torch.zeros(batch, dtype=torch.long, device=self.device)
            w = guidance_scales(torch.rand(batch, 2, device=self.device), 3.0)   # train.py's draw
            step = train_step(model, lambda net: reverse_loss(net, self.flow, x, yr, w, eps)[0],
                              ctx)
            self.time_row('rev_train', batch, step)

    @torch.no_grad()
    def check_naive(self, naive_reverse):
        """Apples to apples: the naive inverse must give our output, in exact fp32 (TF32 off), at
        w = 0 and w = GUIDANCE; RuntimeError if it does not."""
        z = torch.randn(2, self.cfg.num_tokens, self.cfg.token_dim, device=self.device)
        y, checks = self.labels(2), self.out['checks']
        tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
        for w in (0.0, GUIDANCE):
            ours, naive = self.flow.reverse(z, y, w), naive_reverse(self.flow, z, y, w)
            err, scale = (ours - naive).abs().max().item(), ours.abs().max().item()
            checks[f'naive_equals_ours_w{w:g}'] = dict(max_abs_diff=err, max_abs=scale)
            if not (math.isfinite(scale) and err <= 1e-4 * max(1.0, scale)):
                raise RuntimeError(f'the naive inverse differs from TarFlow.reverse at w={w:g}: '
                                   f'max |diff| {err:.3g} (max |x| {scale:.3g})')
        torch.backends.cuda.matmul.allow_tf32 = tf32
        print('  check: the naive inverse equals ours in fp32, max |diff| '
              f'{max(check["max_abs_diff"] for check in checks.values()):.1e}')

    def sampling_rows(self):
        """The sampling rows of --rows at each of --sample_batches, on the same noise per batch."""
        from test_biflow import naive_reverse   # the reference loop lives with the tests
        if 'naive' in self.args.rows or 'naive_cfg' in self.args.rows:
            self.check_naive(naive_reverse)
        flow, G, w = self.flow, self.G, GUIDANCE
        for batch in self.args.sample_batches:
            z = torch.randn(batch, self.cfg.num_tokens, self.cfg.token_dim, device=self.device)
            y, x = self.labels(batch), self.images(batch)
            ws = torch.full((batch,), w, device=self.device)
            calls = {
                'inverse': lambda: flow.sample(y, z=z, denoise=False),
                'inverse_cfg': lambda: flow.sample(y, z=z, guidance=w, denoise=False),
                'denoise': lambda: flow.denoise(x, y),
                'inverse_cfg_denoise': lambda: flow.sample(y, z=z, guidance=w),
                'naive': lambda: naive_reverse(flow, z, y),
                'naive_cfg': lambda: naive_reverse(flow, z, y, w),
                'nfe1': lambda: G.decode(z, y, torch.zeros_like(ws), flow=flow),
                'nfe1_cfg': lambda: G.decode(z, y, ws, flow=flow),
                'cfg_infer': lambda: G.decode(z, y, inference_w=w, flow=flow),
            }
            for key, fn in calls.items():
                if key in self.args.rows:
                    def call(fn=fn):
                        with torch.no_grad(), self.ctx():
                            fn()
                    self.time_row(key, batch, call)

    def speedups(self):
        """Every ratio of RATIOS whose two rows this run timed, as a ratio of medians per batch,
        and its target's verdict (a target for one batch is judged only at that batch)."""
        rows, out = self.out['rows'], self.out
        for label, slow, fast, target, target_batch in RATIOS:
            got = {f'b{b}': rows[f'{slow}_b{b}']['median_ms'] / rows[f'{fast}_b{b}']['median_ms']
                   for b in self.args.sample_batches
                   if f'{slow}_b{b}' in rows and f'{fast}_b{b}' in rows}
            if not got:
                continue
            out['ratios'][label] = got
            line = '   '.join(f'{at}: {ratio:7.1f}x' for at, ratio in got.items())
            judged = {at: ratio >= target for at, ratio in got.items()
                      if target and target_batch in (None, int(at[1:]))}
            if judged:
                out['checks'][f'{label} >= {target:g}x'] = judged
                line += f'   target >= {target:g}x: ' + ', '.join(
                    f'{at} {"met" if met else "NOT met"}' for at, met in judged.items())
            print(f'  {label:40s} {line}')


def main(argv=None):
    """Run the rows of --rows in the table's order, print them, write the results to --json;
    -> the results."""
    args = get_args(argv)
    start = time.perf_counter()
    bench = Bench(args)
    bench.training_rows()
    bench.sampling_rows()
    print('speed-ups (ratio of medians, this run)')
    bench.speedups()
    out = bench.out
    out['total_s'] = time.perf_counter() - start
    atomic_write(args.json, lambda file: file.write(json.dumps(out, indent=1).encode()))
    print(f'total {out["total_s"]:.0f} s; wrote {args.json}')
    return out


if __name__ == '__main__':
    main()
