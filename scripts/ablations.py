"""
    nice -n 19 python scripts/ablations.py --out ../ablations --md README.md

BiFlow's ablation table (and TarFlow's guidance sweep) at small scale, on the built-in digits, in
one resumable run:

1. the forward model F: the CPU preset (norm control c = 4); with --forward_norm_row also the same
   run with --norm_clip 0, for the paper's norm-control row with both sides off;
2. one stage-2 run per setting, all against the same frozen F (that row against its own F of the
   same length), with the same steps, seed and data;
3. samples of every model with their FID against 1000 held-out digits (sample.py --npz --fid), the
   share read as the requested class (scripts/score_digits.py), NFE and ms/image at batch 1;
4. results.json in --out, a markdown table (ablations_table.md, and into --md between its table
   markers), the per-depth alignment plot (align_depths.png) and the guidance-sweep plot
   (guidance_sweep.png).

    python scripts/ablations.py --quick --out /tmp/ablations_quick   # every phase, tiny counts

Resuming: run the same command again. Every step writes one output file, and that file is its
marker: a finished training run (its checkpoint at max_steps), a sample file (.npz), a score (.json
beside the .npz), a timing. An unfinished training run is continued with train.py --resume, so an
interrupted run costs at most the steps since its last checkpoint (--ckpt_every 250 here; the
interval does not change the run).

Why subprocesses for training and sampling: each command that makes a number is exactly the command
printed in the table (a reader can rerun one row by hand), one run's memory and global torch state
(seeds, threads) cannot leak into the next, and a crash or divergence in one run is recorded and the
others go on; and jobs can run side by side. The digit classifier and the batch-1 timings run in
this process at the end, so the classifier is trained once for all.

Sizes (sizes()): 700 stage-2 steps, 500 samples per FID. Measured on a shared 2-core machine where
each job got about 20 img/s, FID's Inception ran at about 2 images/s and the stage-2 loss sits on a
plateau for the first 300-600 steps depending on the setting (README's ablation section), these fit
about 80 minutes with two jobs side by side.
"""
import argparse
import json
import os
import statistics
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import data  # noqa: E402
import sample  # noqa: E402
from score_digits import digit_accuracy  # noqa: E402

# -----------------------------------------------------------------------------
# the experiment: what is trained, what is sampled, what the paper reports

# The guidance scale of the CFG rows, fixed before any result was seen: sample.py's default, also
# the scale the README's sampler comparison uses.
W_CFG = 2.0
SWEEP_W = (0.0, 0.5, 1.0, 2.0, 3.0)

# forward models: name -> extra train.py flags (the CPU preset otherwise)
FORWARD = {'F_clip': [], 'F_noclip': ['--norm_clip', '0']}

# stage-2 runs: name -> (forward model, extra train.py flags). Everything not listed is the CPU
# preset's default (hidden alignment, learned denoising, reverse-side norm control,
# training-time CFG).
REVERSE = {
    'G_hidden': ('F_clip', []),
    'G_distill': ('F_clip', ['--align', 'distill']),
    'G_naive': ('F_clip', ['--align', 'naive']),
    'G_score': ('F_clip', ['--denoise', 'score']),
    'G_cfginf': ('F_clip', ['--guidance_mode', 'inference']),
    # norm control off on G's side only: no normalisation of the states, against the clipped F
    'G_nonorm_rev': ('F_clip', ['--no-reverse_norm']),
    # the paper's "norm control: none" turns off both sides: F trained without clipping, G without
    # normalisation. Only with --forward_norm_row: the second F is a whole stage 1 (see NOCLIP)
    'G_nonorm': ('F_noclip', ['--no-reverse_norm']),
}
# The runs that need the F without norm control: 4000 more stage-1 steps, 16 min on an idle 2-core
# machine but over an hour on a shared one, which is more than the rest of the ablation together;
# hence an option.
NOCLIP = {'F_noclip', 'G_nonorm'}
# Models made from a trained one rather than trained: denoise 'none' and 'score' train identically
# (the same targets, with the noisy x^0 for the output, the same parameters, the same random stream;
# test_new_ablations.py checks the losses are equal) and differ only in whether F's Tweedie step
# follows G at sampling. So 'none' is G_score's checkpoint with denoise set to 'none' in its model
# config: one training for two rows.
DERIVED = {'G_nodenoise': ('G_score', {'denoise': 'none'})}

# The rows of the paper's ablations (BiFlow-B/2, FID-50K on ImageNet 256 latents; without CFG except
# the last group), each mapped to the model and guidance that stand for it here.
ROWS = [
    # group, setting, paper FID, model, guidance
    ('strategy', 'exact inverse F⁻¹ (+ score denoising)', 44.46, 'F_clip', 0.0),
    ('strategy', 'naive distillation', 43.41, 'G_naive', 0.0),
    ('strategy', 'hidden distillation', 55.00, 'G_distill', 0.0),
    ('strategy', 'hidden alignment (BiFlow)', 36.93, 'G_hidden', 0.0),
    ('denoising', 'none', 100.51, 'G_nodenoise', 0.0),
    ('denoising', 'score-based (F\'s Tweedie step on G\'s output)', 42.62, 'G_score', 0.0),
    ('denoising', 'learned (BiFlow)', 31.88, 'G_hidden', 0.0),
    ('norm control', 'none (F without clip, G without normalisation)', 45.54, 'G_nonorm', 0.0),
    ('norm control', 'none on G\'s side only (F clipped, G without normalisation)', 45.54,
     'G_nonorm_rev', 0.0),
    ('norm control', 'clip + normalise (BiFlow)', 31.88, 'G_hidden', 0.0),
    ('CFG', f'inference-time, w = {W_CFG:g}', 6.90, 'G_cfginf', W_CFG),
    ('CFG', f'training-time, w = {W_CFG:g}', 6.79, 'G_hidden', W_CFG),
]


def sizes(quick):
    """Step and sample counts. The full sizes fit about an hour of 2 busy CPU cores (see README's
    ablation section); --quick runs every phase in a few minutes, for testing the pipeline only."""
    if quick:
        return dict(f_steps=30, g_steps=20, n=48, n_sweep_f=16, n_sweep_g=16, ref=200,
                    classifier_steps=60, timing_reps=2,
                    extra_train=['--eval_samples', '64', '--log_every', '10'])
    return dict(f_steps=None, g_steps=700, n=500, n_sweep_f=300, n_sweep_g=500, ref=1000,
                classifier_steps=1500, timing_reps=7, extra_train=[])


# -----------------------------------------------------------------------------
# small utilities: json files written atomically, commands run and timed


def read_json(path, default=None):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return default


def write_json(path, obj):
    data.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def show(cmd):
    """A command as a reader would type it from the repository root."""
    return ' '.join(cmd)


class Runner:
    """Runs commands from the repository root with `threads` threads each, logs them, and keeps each
    one's wall time in OUT/walltimes.json (summed over resumed invocations, so the total is the
    run's, not only the last one's)."""

    def __init__(self, out, threads=1):
        self.out, self.times_path, self.threads = out, os.path.join(out, 'walltimes.json'), threads
        # jobs run in parallel: one writer of the times file at a time
        self.lock = threading.Lock()

    def add_time(self, key, seconds):
        with self.lock:
            t = read_json(self.times_path, {})
            t[key] = t.get(key, 0.0) + seconds
            write_json(self.times_path, t)

    def run(self, key, cmd, log):
        t0 = time.time()
        print(f'[{time.strftime("%H:%M:%S")}] {show(cmd)}', flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with open(log, 'a') as f:
            rc = subprocess.call([sys.executable] + cmd[1:], cwd=ROOT, stdout=f,
                                 stderr=subprocess.STDOUT, env=env)
        self.add_time(key, time.time() - t0)
        print(f'[{time.strftime("%H:%M:%S")}] done ({(time.time() - t0) / 60:.1f} min, '
              f'exit {rc}): {key}', flush=True)
        return rc


# -----------------------------------------------------------------------------
# phase 1 and 2: training


def train_status(ckpt):
    """'done', 'partial' (a checkpoint before max_steps) or 'none'."""
    if not os.path.exists(ckpt):
        return 'none'
    saved = torch.load(ckpt, map_location='cpu', weights_only=True)
    return 'done' if saved['step'] >= saved['train_config']['max_steps'] else 'partial'


def train(runner, out, name, stage, flags):
    """Train one model into OUT/name unless its checkpoint is complete; continue a partial one.
    -> the checkpoint path, or None when the run failed (recorded in OUT/name/FAILED and skipped
    by later invocations; delete it to retry)."""
    folder = os.path.join(out, name)
    ckpt = os.path.join(folder, f'{stage}.pt')
    failed = os.path.join(folder, 'FAILED')
    if os.path.exists(failed):
        print(f'{name}: failed earlier ({open(failed).read().strip()}); skipped')
        return None
    status = train_status(ckpt)
    if status == 'done':
        return ckpt
    os.makedirs(folder, exist_ok=True)
    if status == 'partial':
        cmd = ['python', 'train.py', '--resume', ckpt, '--ckpt_every', '250']
    else:   # no checkpoint yet: a log of a run killed before its first checkpoint is replaced
        cmd = (['python', 'train.py'] + flags
               + ['--out_dir', folder, '--ckpt_every', '250', '--overwrite'])
    rc = runner.run(f'train {name}', cmd, os.path.join(folder, 'train.out'))
    if rc != 0:
        with open(failed, 'w') as f:
            f.write(f'exit code {rc}; see {folder}/train.out\n')
        return None
    return ckpt


def design(forward_norm_row):
    """-> (forward, reverse, rows) of this run: without forward_norm_row, the runs and rows that
    need F_noclip are left out (the paper's both-sides row), and the G-side-only row stands in for
    it."""
    keep = lambda name: forward_norm_row or name not in NOCLIP   # noqa: E731
    return ({k: v for k, v in FORWARD.items() if keep(k)},
            {k: v for k, v in REVERSE.items() if keep(k)},
            [r for r in ROWS if keep(r[3])])


def train_commands(out, sz, forward_norm_row=False):
    """The train.py flags of every model (the commands in the table)."""
    cmds = {}
    forward, reverse, _ = design(forward_norm_row)
    f_steps = ['--max_steps', str(sz['f_steps'])] if sz['f_steps'] else []
    for name, flags in forward.items():
        cmds[name] = ('forward', flags + f_steps + sz['extra_train'])
    for name, (fwd, flags) in reverse.items():
        cmds[name] = ('reverse',
                      ['--stage', 'reverse', '--forward_ckpt', os.path.join(out, fwd, 'forward.pt'),
                       '--max_steps', str(sz['g_steps'])] + flags + sz['extra_train'])
    return cmds


# -----------------------------------------------------------------------------
# phase 3: samples and scores


def sample_key(model, w, seed, n, ramp=False):
    return f'{model}-w{w:g}{"-ramp" if ramp else ""}-s{seed}-n{n}'


def sample_cmd(ckpt, w, seed, n, npz, ramp=False, fid_stats=None):
    return (['python', 'sample.py', '--ckpt', ckpt, '--num_samples', str(n),
             '--seed', str(seed), '--guidance', f'{w:g}']
            + (['--ramp'] if ramp else [])
            + ['--npz', npz, '--out', npz[:-4] + '.png']
            + (['--fid', fid_stats] if fid_stats else []))


def parse_fid(log):
    """The last FID printed by sample.py --fid ('FID 71.6569 on 1000 samples') or fid.py
    ('FID 71.6569  (a vs b)')."""
    with open(log) as f:
        found = re.findall(r'^FID ([0-9.]+|nan|inf)\b', f.read(), re.M)
    return float(found[-1]) if found else None


def draw_samples(runner, out, ckpts, model, w, seed, n, ramp=False, stats=None):
    """OUT/samples/KEY.npz (and with stats, its FID in KEY.json), each unless already there:
    sample.py writes the samples and, in the same command, their FID; an FID lost to an interruption
    is redone with fid.py alone.
    -> (key, npz path, or None if the model is missing or the command failed)."""
    key = sample_key(model, w, seed, n, ramp)
    npz = os.path.join(out, 'samples', key + '.npz')
    if ckpts.get(model) is None:
        return key, None
    meta, log = npz[:-4] + '.json', npz[:-4] + '.out'
    os.makedirs(os.path.dirname(npz), exist_ok=True)
    if not os.path.exists(npz):
        if runner.run(f'sample {key}',
                      sample_cmd(ckpts[model], w, seed, n, npz, ramp, stats), log) != 0:
            return key, None
    if stats and 'fid' not in read_json(meta, {}):
        if not os.path.exists(log) or parse_fid(log) is None:
            runner.run(f'FID {key}', ['python', 'fid.py', npz, stats], log)
        with runner.lock:
            m = read_json(meta, {})
            m.update(fid=parse_fid(log), num_samples=n)
            write_json(meta, m)
    return key, npz


def reference(runner, out, sz):
    """The held-out reference: the first sz['ref'] digits of the val split, packed and reduced to
    FID statistics."""
    npz = os.path.join(out, f'ref_val{sz["ref"]}.npz')
    stats = npz[:-4] + '_stats.npz'
    log = os.path.join(out, 'ref.out')
    if not os.path.exists(npz):
        runner.run('reference pack',
                   ['python', 'data.py', 'pack', 'digits', npz, '--split', 'val', '--limit',
                    str(sz['ref']), '--img_size', '16'], log)
    if not os.path.exists(stats):
        runner.run('reference statistics', ['python', 'fid.py', npz, '--save_stats', stats], log)
    return npz, stats


def derive(out, name, ckpts):
    """A model made from a trained one by changing a sampling-only field of its config (DERIVED)."""
    src, change = DERIVED[name]
    path = os.path.join(out, name, 'reverse.pt')
    if not os.path.exists(path) and ckpts.get(src):
        saved = torch.load(ckpts[src], map_location='cpu', weights_only=True)
        saved['model_config'].update(change)
        saved['derived_from'] = dict(checkpoint=ckpts[src], change=change)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data.atomic_write(path, lambda f: torch.save(saved, f))
    return path if os.path.exists(path) else None


def score_accuracy(runner, npzs, steps):
    """The share read as the requested class, for every file whose NPZ.json lacks it. One classifier
    (seeded, so the same one in every invocation) reads all of them."""
    todo = [npz for npz in npzs if 'acc' not in read_json(npz[:-4] + '.json', {})]
    if todo:
        t0 = time.time()
        for npz, acc in digit_accuracy(todo, steps=steps).items():
            m = read_json(npz[:-4] + '.json', {})
            m['acc'] = acc
            write_json(npz[:-4] + '.json', m)
        runner.add_time('accuracy', time.time() - t0)
    return {npz: read_json(npz[:-4] + '.json', {}).get('acc') for npz in npzs}


def nfe(model, fwd_cfg):
    """The sequential network evaluations of one sample, as a string: F's inverse is T blocks of N-1
    token steps (the CFG streams share a batch), then a forward and backward pass of F for score
    denoising."""
    T, N = fwd_cfg.num_blocks, fwd_cfg.num_tokens
    if isinstance(model, sample.TarFlow):
        return f'{T}×{N - 1} + score'
    if model.cfg.denoise == 'score':
        return '1 + score'
    return '2' if model.cfg.guidance_mode == 'inference' else '1'


def time_batch1(model, forward_model, w, reps):
    """Median ms of one sample at batch 1 (1 thread, as bench.py), after one warm-up call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        z = sample.noise_for([0], model, 'cpu')
        labels = torch.tensor([3]) if model.cfg.num_classes else None
        sample.generate(model, forward_model, z, labels, guidance=w)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sample.generate(model, forward_model, z, labels, guidance=w)
            ts.append(1000 * (time.perf_counter() - t0))
        return statistics.median(ts)
    finally:
        torch.set_num_threads(threads)


def timing(runner, out, ckpts, model, w, reps):
    """{'nfe', 'ms'} of a model at guidance w, cached in OUT/timing.json."""
    path = os.path.join(out, 'timing.json')
    t = read_json(path, {})
    key = f'{model}-w{w:g}'
    if key not in t and ckpts.get(model):
        t0 = time.time()
        net, fm, _ = sample.load_models(ckpts[model], verbose=False)   # pixel models: no decoder
        fcfg = (fm or net).cfg
        t[key] = dict(nfe=nfe(net, fcfg), ms=time_batch1(net, fm, w, reps))
        write_json(path, t)
        runner.add_time('timing', time.time() - t0)
    return t.get(key)


# -----------------------------------------------------------------------------
# logs: the last alignment terms and the per-depth plot


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def align_keys(rows):
    """align* keys in depth order (align{T-2} is the first head, next to z), then 'out'."""
    keys = sorted({k for r in rows for k in r if k.startswith('align')}, key=lambda k: -int(k[5:]))
    return keys + (['out'] if any('out' in r for r in rows) else [])


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44),
           (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_alignment(logs, path, size=(640, 300)):
    """One panel per run (name -> log rows), each the log10 of every alignment term against the
    step, a colour per depth, on one shared y range so that the panels compare. Drawn with Pillow
    alone (no plotting dependency)."""
    W, H = size
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    vals = [v for rows in logs.values() for r in rows for k in align_keys(rows)
            if r.get(k, 0) > 0 for v in [r[k]]]
    if not vals:
        d.text((10, 10), 'no alignment terms logged', fill='black', font=font)
        img.save(path)
        return
    lo, hi = np.log10(min(vals)), np.log10(max(vals))
    hi = hi if hi > lo else lo + 1
    pw = W // len(logs)
    top, bottom = 34, H - 22
    for i, (name, rows) in enumerate(logs.items()):
        x0, x1 = i * pw + 42, (i + 1) * pw - 8
        d.rectangle([x0, top, x1, bottom], outline='black')
        d.text((x0, 4), name, fill='black', font=font)
        steps = [r['step'] for r in rows if 'step' in r]
        smax = max(steps) if steps else 1
        for e in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):   # ticks at 1, 2, 5 per decade
            for mant in (1, 2, 5):
                y = bottom - (e + np.log10(mant) - lo) / (hi - lo) * (bottom - top)
                if top <= y <= bottom:
                    d.line([x0 - 3, y, x0, y], fill='black')
                    d.text((x0 - 38, y - 5), f'{mant * 10.0 ** e:g}', fill='black', font=font)
        d.text((x1 - 60, bottom + 6), f'step {smax}', fill='black', font=font)
        d.text((x0, bottom + 6), 'distance (log scale)', fill='black', font=font)
        for j, k in enumerate(align_keys(rows)):
            pts = [(x0 + r['step'] / smax * (x1 - x0),
                    bottom - (np.log10(r[k]) - lo) / (hi - lo) * (bottom - top))
                   for r in rows if r.get(k, 0) > 0]
            col = COLOURS[j % len(COLOURS)]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            d.text((x0 + 4 + 46 * j, 18), k, fill=col, font=font)
    img.save(path)


def plot_sweep(curves, path, size=(640, 260), key='acc', label='read as class (%)'):
    """Accuracy (or FID) against w, one line per sampler (name -> [(w, value)]), with Pillow."""
    W, H = size
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts_all = [(w, v) for c in curves.values() for w, v in c if v is not None]
    x0, x1, top, bottom = 50, W - 170, 20, H - 30
    d.rectangle([x0, top, x1, bottom], outline='black')
    d.text((x0, 4), f'{label} against guidance w', fill='black', font=font)
    if not pts_all:
        img.save(path)
        return
    wmax = max(w for w, _ in pts_all) or 1
    vlo, vhi = min(v for _, v in pts_all), max(v for _, v in pts_all)
    vhi = vhi if vhi > vlo else vlo + 1
    for v in (vlo, vhi):
        y = bottom - (v - vlo) / (vhi - vlo) * (bottom - top)
        d.text((4, y - 5), f'{v:.3g}', fill='black', font=font)
    for w in sorted({w for w, _ in pts_all}):
        d.text((x0 + w / wmax * (x1 - x0) - 6, bottom + 6), f'{w:g}', fill='black', font=font)
    for j, (name, c) in enumerate(curves.items()):
        col = COLOURS[j % len(COLOURS)]
        pts = [(x0 + w / wmax * (x1 - x0), bottom - (v - vlo) / (vhi - vlo) * (bottom - top))
               for w, v in c if v is not None]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for pt in pts:
            d.ellipse([pt[0] - 3, pt[1] - 3, pt[0] + 3, pt[1] + 3], fill=col)
        d.text((x1 + 10, top + 14 * j), name, fill=col, font=font)
    img.save(path)


# -----------------------------------------------------------------------------
# the markdown table, from results.json alone (tested without any training)

TABLE_START, TABLE_END = '<!-- ablations-table:start -->', '<!-- ablations-table:end -->'


def fmt(v, spec='.1f', suffix=''):
    return '—' if v is None else f'{v:{spec}}{suffix}'


def markdown(res):
    """The generated part of README's ablation section: the ablation table, the FID noise, the
    sweep, the commands, the times."""
    L = []
    n, ref = res.get('sizes', {}).get('n', 1000), res.get('sizes', {}).get('ref', 1000)
    L.append(f'| ablation | setting | paper FID-50K (B/2) | FID ({n} samples vs {ref} held-out) | '
             'read as class | NFE | ms/image (batch 1) |')
    L.append('|---|---|---|---|---|---|---|')
    for r in res['rows']:
        L.append(f"| {r['group']} | {r['setting']} | {r['paper']:.2f} | {fmt(r.get('fid'))} | "
                 f"{fmt(None if r.get('acc') is None else 100 * r['acc'], '.1f', '%')} | "
                 f"{r.get('nfe') or '—'} | {fmt(r.get('ms'))} |")
    nz = res.get('noise') or {}
    if nz:
        L.append('')
        L.append(f"FID noise: the same model ({nz['model']}, w = {nz['w']:g}) sampled with seeds "
                 f"0 and 1 gives FID {fmt(nz['fid'][0], '.2f')} and {fmt(nz['fid'][1], '.2f')} "
                 f"(|Δ| = {fmt(nz['delta_fid'], '.2f')}), read-as-class "
                 f"{fmt(100 * nz['acc'][0], '.1f')}% and {fmt(100 * nz['acc'][1], '.1f')}%. "
                 "Gaps smaller than a few times |Δ| are not resolved by this FID.")
    sw = res.get('sweep') or {}
    if sw:
        L.append('')
        ws = sorted({float(w) for c in sw.values() for w in c})
        L.append('| sampler | ' + ' | '.join(f'w = {w:g}' for w in ws) + ' |')
        L.append('|---|' + '---|' * len(ws))
        for name, c in sw.items():
            cells = []
            for w in ws:
                point = c.get(f'{w:g}') or {}
                acc = fmt(None if point.get('acc') is None else 100 * point['acc'], '.1f', '%')
                fid_text = f" / {point['fid']:.1f}" if point.get('fid') is not None else ''
                cells.append(acc + fid_text + f" (n={point.get('n', '?')})")
            L.append(f'| {name} | ' + ' | '.join(cells) + ' |')
        L.append('')
        L.append('Cells: read as class / FID where computed (the table\'s), (n = samples).')
    L.append('')
    L.append('Commands (OUT = the --out folder):')
    L.append('')
    for cmd in res.get('commands', []):
        L.append('    ' + cmd)
    wt = res.get('walltimes') or {}
    if wt:
        L.append('')
        tot = sum(wt.values())
        groups = {}
        for k, v in wt.items():
            groups[k.split(' ')[0]] = groups.get(k.split(' ')[0], 0) + v
        el = res.get('elapsed')
        L.append((f'Wall time of the script: {el / 60:.0f} min from start to report '
                  '(all invocations). ' if el else '') +
                 f"Its commands' times, summed over the {res.get('jobs', 1)} side-by-side jobs: "
                 f"{tot / 60:.0f} min (" +
                 ', '.join(f'{k} {v / 60:.1f}' for k, v in sorted(groups.items())) + ' min).')
    return '\n'.join(L) + '\n'


def write_md(md_path, table):
    """Put the generated table between the markers of md_path (the prose around it is kept), or
    create the file."""
    block = f'{TABLE_START}\n{table}{TABLE_END}'
    if os.path.exists(md_path):
        text = open(md_path).read()
        if TABLE_START in text and TABLE_END in text:
            head, rest = text.split(TABLE_START, 1)
            text = head + block + rest.split(TABLE_END, 1)[1]
        else:
            text = text.rstrip('\n') + '\n\n' + block + '\n'
    else:
        text = '## Ablations\n\n' + block + '\n'
    data.atomic_write(md_path, lambda f: f.write(text.encode()))


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument('--out', default='ablations',
                   help='folder for every run, sample file and result '
                   '(outside the repository for the full run)')
    p.add_argument('--quick', action='store_true',
                   help='tiny step and sample counts: tests the pipeline in minutes')
    p.add_argument('--md', default=None,
                   help='also write the table into this markdown file, between its markers')
    p.add_argument('--sweep', action=argparse.BooleanOptionalAction, default=True,
                   help="TarFlow's guidance sweep "
                   "(accuracy against w; FID only where a point equals a table row)")
    p.add_argument('--jobs', type=int, default=2,
                   help='commands run side by side '
                   '(a stage-2 run waits for its F, a sample command for its model)')
    p.add_argument('--forward_norm_row', action=argparse.BooleanOptionalAction, default=False,
                   help="also train an F with --norm_clip 0 (a whole stage 1) and the norm-control "
                   "row with both sides off against it, as the paper's; without it, only G's side "
                   "is turned off")
    p.add_argument('--threads', type=int, default=1,
                   help="threads of each command: on a shared machine one thread per job never "
                   "stalls at a barrier waiting for a core someone else holds")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    sz = sizes(a.quick)
    runner = Runner(out, a.threads)
    t_start = time.time()
    torch.set_num_threads(a.threads)

    # ---- every command as a job in one pool; each job first waits for what it needs
    cmds = train_commands(out, sz, a.forward_norm_row)
    FWD, REV, rows_ = design(a.forward_norm_row)
    ckpts, futs = {}, {}

    def train_job(name):
        stage, flags = cmds[name]
        if stage == 'reverse':
            futs[REV[name][0]].result()   # its F first
        ckpt = train(runner, out, name, stage, flags)
        ckpts[name] = ckpt if ckpt and train_status(ckpt) == 'done' else None
        for derived, (src, _) in DERIVED.items():
            if src == name:
                ckpts[derived] = derive(out, derived, ckpts)

    def sample_job(model, w, seed, n, ramp=False, fid_=True):
        futs[model if model not in DERIVED else DERIVED[model][0]].result()
        futs['ref'].result()
        return draw_samples(runner, out, ckpts, model, w, seed, n, ramp, stats if fid_ else None)

    ref_npz, stats = (os.path.join(out, f'ref_val{sz["ref"]}.npz'),
                      os.path.join(out, f'ref_val{sz["ref"]}_stats.npz'))
    # every row's (model, w) at seed 0, and G_hidden at seed 1 too for the FID noise
    table_jobs = [(model, w, 0) for _, _, _, model, w in rows_] + [('G_hidden', 0.0, 1)]
    table_jobs = list(dict.fromkeys(table_jobs))
    sweep_specs = [('F exact inverse, constant w', 'F_clip', False, sz['n_sweep_f']),
                   ('F exact inverse, ramped w', 'F_clip', True, sz['n_sweep_f']),
                   ('G one pass (training-time CFG)', 'G_hidden', False, sz['n_sweep_g'])]
    # the only run on the second F: queued behind the others' samples, so no job idles waiting
    late = 'G_nonorm'
    with ThreadPoolExecutor(a.jobs) as pool:
        for name in FWD:
            futs[name] = pool.submit(train_job, name)
        futs['ref'] = pool.submit(reference, runner, out, sz)
        for name in REV:
            if name != late:
                futs[name] = pool.submit(train_job, name)
        sfuts = {(model, w, seed): pool.submit(sample_job, model, w, seed, sz['n'])
                 for model, w, seed in table_jobs if model != late}
        if late in REV:
            futs[late] = pool.submit(train_job, late)
            sfuts.update({(model, w, seed): pool.submit(sample_job, model, w, seed, sz['n'])
                          for model, w, seed in table_jobs if model == late})
        wfuts = {}
        if a.sweep:
            for label, model, ramp, n in sweep_specs:
                # w = 0 ramped is w = 0 constant: one file; a point equal to a table row reuses it
                for w in SWEEP_W:
                    wfuts[(label, w)] = pool.submit(
                        sample_job, model, w, 0, n, ramp and w > 0,
                        fid_=(model, w, 0) in table_jobs and n == sz['n'])
        for fut in list(futs.values()) + list(sfuts.values()) + list(wfuts.values()):
            # re-raises an error of the script itself (a failed command is recorded, not raised)
            fut.result()

    # ---- results: FID and accuracy per row, batch-1 timing (one thread, one command at a time),
    # the FID noise
    res = dict(sizes={k: v for k, v in sz.items() if k != 'extra_train'}, w_cfg=W_CFG, jobs=a.jobs,
               threads=a.threads, rows=[], commands=[])
    for name, (stage, flags) in cmds.items():
        res['commands'].append(show(['python', 'train.py'] + flags
                                    + ['--out_dir', f'OUT/{name}']).replace(out, 'OUT'))
    for derived, (src, change) in DERIVED.items():
        res['commands'].append(f'# OUT/{derived}/reverse.pt: OUT/{src}/reverse.pt with '
                               f'model_config {change}')
    files = [npz for fut in list(sfuts.values()) + list(wfuts.values())
             for _, npz in [fut.result()] if npz]
    acc = (score_accuracy(runner, sorted(set(files + [ref_npz])), sz['classifier_steps'])
           if files else {})
    res['classifier_on_reference'] = acc.get(ref_npz)
    for group, setting, paper, model, w in rows_:
        key, npz = sfuts[(model, w, 0)].result()
        row = dict(group=group, setting=setting, paper=paper, model=model, w=w, key=key)
        if npz:
            row.update(fid=read_json(npz[:-4] + '.json', {}).get('fid'), acc=acc.get(npz))
            row.update(timing(runner, out, ckpts, model, w, sz['timing_reps']) or {})
            ck = f'OUT/{model}/{"forward" if model.startswith("F") else "reverse"}.pt'
            res['commands'].append(show(sample_cmd(ck, w, 0, sz['n'], f'OUT/samples/{key}.npz',
                                                   fid_stats=f'OUT/{os.path.basename(stats)}')))
        res['rows'].append(row)
    s0, s1 = (read_json(sfuts[('G_hidden', 0.0, seed)].result()[1][:-4] + '.json', {})
              if sfuts[('G_hidden', 0.0, seed)].result()[1] else {} for seed in (0, 1))
    if s0.get('fid') is not None and s1.get('fid') is not None:
        res['noise'] = dict(model='G_hidden', w=0.0, fid=[s0['fid'], s1['fid']],
                            acc=[s0.get('acc'), s1.get('acc')],
                            delta_fid=abs(s0['fid'] - s1['fid']))
    sw = {}
    for (label, w), fut in wfuts.items():
        _, npz = fut.result()
        n = next(n for lb, _, _, n in sweep_specs if lb == label)
        m = read_json(npz[:-4] + '.json', {}) if npz else {}
        sw.setdefault(label, {})[f'{w:g}'] = dict(acc=m.get('acc'), fid=m.get('fid'), n=n)
    res['sweep'] = sw
    if wfuts:
        res['commands'].append('# sweep: the sample.py commands above with --guidance W '
                               f"(and --ramp), --num_samples {sz['n_sweep_f']} for F, "
                               f"{sz['n_sweep_g']} for G, no --fid")
    res['forward_bpd'] = {
        name: next((r['val_bpd']
                    for r in reversed(read_log(os.path.join(out, name, 'forward_log.jsonl')))
                    if 'val_bpd' in r), None)
        for name in FWD}
    logs = {name: read_log(os.path.join(out, name, 'reverse_log.jsonl')) for name in REV}
    res['final_terms'] = {name: {k: rows[-1][k]
                                 for k in align_keys(rows) + ['recon_rmse'] if k in rows[-1]}
                          for name, rows in logs.items() if rows}
    res['walltimes'] = read_json(runner.times_path, {})
    # [start, end] of every invocation, for the wall time
    inv = read_json(os.path.join(out, 'invocations.json'), [])
    inv.append([t_start, time.time()])
    write_json(os.path.join(out, 'invocations.json'), inv)
    res['elapsed'] = sum(end - start for start, end in inv)
    # a model shared by several rows is listed once
    res['commands'] = list(dict.fromkeys(res['commands']))

    write_json(os.path.join(out, 'results.json'), res)
    table = markdown(res)
    data.atomic_write(os.path.join(out, 'ablations_table.md'), lambda f: f.write(table.encode()))
    plot_alignment({'hidden alignment (G_hidden)': logs['G_hidden'],
                    'hidden distillation (G_distill)': logs['G_distill']},
                   os.path.join(out, 'align_depths.png'))
    if res['sweep']:
        plot_sweep({k: [(float(w), None if point['acc'] is None else 100 * point['acc'])
                        for w, point in c.items()]
                    for k, c in res['sweep'].items()}, os.path.join(out, 'guidance_sweep.png'))
    if a.md:
        write_md(a.md, table)
    print(table)
    print(f'this invocation: {(time.time() - t_start) / 60:.1f} min; the whole run '
          f'(all invocations): {sum(res["walltimes"].values()) / 60:.1f} min of commands and '
          'scoring, summed over parallel jobs')


if __name__ == '__main__':
    main()
