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

from data import HelpFormatter, UsageError, atomic_write, check_flags, check_writable, run_cli
from model import PRESETS, ReverseModel, TarFlow, reverse_config_for, reverse_loss
from train import ema_update, guidance_scales

GUIDANCE = 1.0   # w of the guided rows; any w != 0 costs the same
ROWS = {   # key: label. Training rows run at --batch_size, sampling rows at each --sample_batches
    'fwd_train': 'forward stage: training step',
    'nll': 'forward model: NLL evaluation',
    'rev_train': 'reverse stage: training step',
    'inverse_cfg': 'F exact inverse + CFG',
    'inverse_cfg_denoise': 'F exact inverse + CFG + denoising',
    'naive_cfg': 'naive inverse + CFG (ml-tarflow, 2 streams)',
    'nfe1_cfg': 'G 1-NFE, training-time CFG',
    'cfg_infer': 'G inference-time CFG (2-NFE)',
}
# speed-ups: (label, slower row, faster row, target or None, the batch the target is for or None)
RATIOS = [
    ('our inverse+CFG vs naive+CFG', 'naive_cfg', 'inverse_cfg', 2.0, None),
    ('1-NFE+CFG vs inverse+CFG+denoise', 'inverse_cfg_denoise', 'nfe1_cfg', 15.0, 1),
    ('1-NFE+CFG vs inverse+CFG', 'inverse_cfg', 'nfe1_cfg', None, None),
    ('training- vs inference-time CFG', 'cfg_infer', 'nfe1_cfg', None, None),
]
# dense bf16 tensor-core peaks (no sparsity) in FLOP/s, the first match in the device's name wins
BF16_PEAK = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12)]


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = parser.add_argument
    a('--preset', choices=sorted(PRESETS), default='cpu', help='model size (model.PRESETS)')
    a('--device', default='auto', help="'auto' (cuda if available), 'cpu' or 'cuda'")
    a('--batch_size', type=int, default=32, help='batch of the training and NLL rows')
    a('--sample_batches', default='1,64', help='comma-separated batch sizes of the sampling rows')
    a('--repeats', type=int, default=7, help='timed calls per row; fast rows go on for 1 s, slow '
      'ones stop at --budget (but not below 3, or --repeats if smaller)')
    a('--warmup', type=int, default=2, help='untimed calls per row first (allocator, kernels)')
    a('--budget', type=float, default=10.0, help='seconds per row after which timing stops')
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
    if not set(args.rows) <= set(ROWS):
        raise UsageError(f'--rows {",".join(args.rows)}: choose from {",".join(ROWS)}')
    args.sample_batches = [int(b) for b in args.sample_batches.split(',')]
    check_flags(vars(args), {'batch_size': '[1, inf)', 'repeats': '[1, inf)', 'warmup': '[0, inf)',
                             'budget': '[0, inf)', 'threads': '[0, inf)'})   # and --device
    check_writable(args.json, '--json')
    return args


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
        auto = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = device = torch.device(auto if args.device == 'auto' else args.device)
        threads = 1 if args.threads is None and device.type == 'cpu' else args.threads
        if threads:
            torch.set_num_threads(threads)
        if device.type == 'cuda':   # TF32 matmuls, as train.py
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        bf16 = args.dtype == 'bf16' or (args.dtype == 'auto' and device.type == 'cuda')
        self.ctx = (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else nullcontext
        torch.manual_seed(args.seed)
        self.cfg = cfg = PRESETS[args.preset]
        self.flow = TarFlow(cfg)
        for block in self.flow.blocks:   # std 0.2/sqrt(width) keeps the inverse finite
            torch.nn.init.normal_(block.proj_out.weight, std=0.2 / math.sqrt(cfg.channels))
        self.flow.to(device).eval().requires_grad_(False)
        self.G = ReverseModel(reverse_config_for(cfg, args.preset)).to(device).eval()
        params = {'forward': sum(p.numel() for p in self.flow.parameters()),
                  'reverse': sum(p.numel() for p in self.G.parameters())}
        if args.compile:
            self.G.compile()   # in place: G.decode's self(...) runs the compiled forward
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
        self.peak = next((peak for gpu, peak in BF16_PEAK if gpu in name), None)
        self.out = dict(vars(args), device=str(device), device_name=name, torch=torch.__version__,
                        dtype='bf16' if bf16 else 'fp32', threads=torch.get_num_threads(),
                        guidance=GUIDANCE, params=params, rows={}, ratios={}, checks={})
        print(f'bench: {args.preset} on {name}, {self.out["threads"]} threads, '
              f'{self.out["dtype"]}{", compiled" * args.compile}, random weights; F '
              f'{params["forward"] / 1e6:.2f}M and G {params["reverse"] / 1e6:.2f}M parameters, '
              f'{cfg.num_tokens} tokens; guided rows at w = {GUIDANCE:g}; read medians')
        print(f'{"row":46s} {"batch":>5s} {"median ms":>11s} {"min ms":>11s} {"img/s":>10s}')

    def labels(self, batch):   # (batch,) random classes, None if F is unconditional
        if self.cfg.num_classes:
            return torch.randint(self.cfg.num_classes, (batch,), device=self.device)

    def time_row(self, key, batch, fn):
        """Time fn as row `key` at `batch`: --warmup calls, then --repeats timed ones, more while
        under 1 s (so that a millisecond row's median shrugs off a stall), fewer past --budget
        (never fewer than min(3, --repeats)). Record the row in out['rows'] and print its line."""
        args = self.args
        sync = torch.cuda.synchronize if self.device.type == 'cuda' else (lambda: None)
        for _ in range(args.warmup):
            fn()
        times, start = [], time.perf_counter()
        while len(times) < args.repeats or (time.perf_counter() - start < 1.0
                                            and len(times) < 100 * args.repeats):
            sync()   # CUDA is asynchronous: start and stop the clock with the device idle
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
            if len(times) >= min(3, args.repeats) and time.perf_counter() - start > args.budget:
                break
        med, best = statistics.median(times), min(times)
        row = self.out['rows'][f'{key}_b{batch}'] = dict(
            row=key, batch=batch, median_ms=med * 1e3, min_ms=best * 1e3, img_per_s=batch / med,
            calls=len(times))
        print(f'{ROWS[key]:46s} {batch:5d} {med * 1e3:11.2f} {best * 1e3:11.2f} '
              f'{batch / med:10.1f}', flush=True)
        return row

    def training_rows(self):
        """fwd_train, nll and rev_train at --batch_size. Each training row steps its own model, so
        that no update touches the models timed for sampling. The batch is drawn even when no
        training row runs: the sampling rows' inputs depend only on --seed."""
        args, cfg, ctx, batch = self.args, self.cfg, self.ctx, self.args.batch_size
        x = torch.rand(batch, cfg.in_channels, cfg.img_size, cfg.img_size, device=self.device)
        x, y, eps = 2 * x - 1, self.labels(batch), torch.randn_like(x)   # images in [-1, 1]
        if 'fwd_train' in args.rows:
            model = TarFlow(cfg).to(self.device).train()

            def nll_loss(net):
                z, logdet, _ = net(x + cfg.noise_std * eps, y)
                return TarFlow.nll_from(z, logdet).mean()
            step = train_step(model, nll_loss, ctx)
            # one counted call: matmuls, and attention as dense where FlopCounterMode knows the
            # kernel (CUDA's; the CPU's fused attention goes uncounted)
            with FlopCounterMode(display=False) as counter:
                step()
            if args.compile:
                model.compile()
            row = self.time_row('fwd_train', batch, step)
            flops = counter.get_total_flops() / batch   # forward + backward, per image
            mfu = self.peak and flops * row['img_per_s'] / self.peak   # None off a known GPU
            row.update(flops_per_image=flops, mfu=mfu)
            print(f'  {flops / 1e9:.3f} GFLOP per image' + (f', MFU {mfu:.1%}' if mfu else ''))
        if 'nll' in args.rows:
            def nll():
                with torch.no_grad(), ctx():
                    self.flow.nll(x + cfg.noise_std * eps, y)
            self.time_row('nll', batch, nll)
        if 'rev_train' in args.rows:
            model = ReverseModel(self.G.cfg).to(self.device).train()
            yr = y if cfg.num_classes else torch.zeros(batch, dtype=torch.long, device=self.device)
            w = guidance_scales(torch.rand(batch, 2, device=self.device), 3.0)   # train.py's draw
            step = train_step(model, lambda net: reverse_loss(net, self.flow, x, yr, w, eps)[0],
                              ctx)
            if args.compile:
                model.compile()
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
            err = (ours - naive).abs().max().item()
            checks[f'naive_equals_ours_w{w:g}'] = dict(max_abs_diff=err)
            if not err <= 1e-4 * max(1.0, ours.abs().max().item()):   # NaN fails too
                raise RuntimeError(f'the naive inverse differs from TarFlow.reverse at w={w:g}: '
                                   f'max |diff| {err:.3g}')
        torch.backends.cuda.matmul.allow_tf32 = tf32
        print(f'  check: the naive inverse equals ours in fp32, max |diff| {err:.1e}')

    def sampling_rows(self):
        """The sampling rows of --rows at each of --sample_batches, on the same noise per batch."""
        naive_reverse = None
        if 'naive_cfg' in self.args.rows:
            from test_biflow import naive_reverse   # Apple's loop lives with the tests
            self.check_naive(naive_reverse)
        flow, G, w = self.flow, self.G, GUIDANCE
        for batch in self.args.sample_batches:
            z = torch.randn(batch, self.cfg.num_tokens, self.cfg.token_dim, device=self.device)
            y, ws = self.labels(batch), torch.full((batch,), w, device=self.device)
            calls = {
                'inverse_cfg': lambda: flow.sample(y, z=z, guidance=w, denoise=False),
                'inverse_cfg_denoise': lambda: flow.sample(y, z=z, guidance=w),
                'naive_cfg': lambda: naive_reverse(flow, z, y, w),
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
    bench.out['total_s'] = time.perf_counter() - start
    atomic_write(args.json, lambda file: file.write(json.dumps(bench.out, indent=1).encode()))
    print(f'total {bench.out["total_s"]:.0f} s; wrote {args.json}')
    return bench.out


if __name__ == '__main__':
    run_cli(main)
