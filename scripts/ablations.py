r"""
BiFlow's ablation table of G's switches, and TarFlow's guidance sweep, on the built-in digits:

    OMP_NUM_THREADS=1 nice -n 19 python scripts/ablations.py --out ../ablations \
        --md scripts/ablations.md
    OMP_NUM_THREADS=1 python scripts/ablations.py --quick --out /tmp/abl   # every phase, tiny

1. F: the CPU preset (norm control c = 4);
2. one stage-2 run per switch, all against that frozen F, with the same steps, seed and data;
3. samples of every model with their FID against 1000 held-out digits (sample.py --npz --fid), and
   the share that scripts/score_digits.py reads as the requested class;
4. OUT/results.json, the table (printed, and into --md between its markers), the per-depth
   alignment terms (OUT/align_depths.png) and the guidance sweep (OUT/guidance_sweep.png).

Every number comes from a train.py / sample.py / fid.py command run as a subprocess from the
repository root, --jobs side by side (each with the OMP_NUM_THREADS it inherits). Run the same
command again to resume: every output file is its own marker (a checkpoint at max_steps, a sample
.npz, the FID in the .out log beside it); an unfinished training run continues with train.py
--resume.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import data  # noqa: E402
from score_digits import digit_accuracy  # noqa: E402

W_CFG = 2.0   # the CFG rows' scale, fixed before any result: sample.py's default
SWEEP_W = (0.0, 0.5, 1.0, 2.0, 3.0)
# stage-2 runs: name -> train.py flags beside the CPU preset's, all against the CPU preset's F.
# Norm control is off on G's side only; the paper's row turns off F's clip too (--norm_clip 0):
# a whole second stage 1, longer than the rest of the run on 2 cores, so left out.
REVERSE = {'G_hidden': [], 'G_distill': ['--align', 'distill'], 'G_naive': ['--align', 'naive'],
           'G_score': ['--denoise', 'score'], 'G_nodenoise': ['--denoise', 'none'],
           'G_cfginf': ['--guidance_mode', 'inference'], 'G_nonorm_rev': ['--no-reverse_norm']}
# sequential network evaluations per sample (the CPU preset's F: 4 flows of 63 token steps); 1 else
NFE = {'F_clip': '4×63 + score', 'G_score': '1 + score', 'G_cfginf': '2'}
# group, setting, the paper's FID-50K (BiFlow-B/2 on ImageNet 256 latents), model, guidance, seed
ROWS = [
    ('strategy', 'exact inverse F⁻¹ (+ score denoising)', 44.46, 'F_clip', 0.0, 0),
    ('strategy', 'naive distillation', 43.41, 'G_naive', 0.0, 0),
    ('strategy', 'hidden distillation', 55.00, 'G_distill', 0.0, 0),
    ('strategy', 'hidden alignment (BiFlow)', 36.93, 'G_hidden', 0.0, 0),
    ('denoising', 'none', 100.51, 'G_nodenoise', 0.0, 0),
    ('denoising', "score-based (F's Tweedie step on G's output)", 42.62, 'G_score', 0.0, 0),
    ('denoising', 'learned (BiFlow)', 31.88, 'G_hidden', 0.0, 0),
    ('norm control', "none on G's side only (F clipped)", 45.54, 'G_nonorm_rev', 0.0, 0),
    ('norm control', 'clip + normalise (BiFlow)', 31.88, 'G_hidden', 0.0, 0),
    ('CFG', f'inference-time, w = {W_CFG:g}', 6.90, 'G_cfginf', W_CFG, 0),
    ('CFG', f'training-time, w = {W_CFG:g}', 6.79, 'G_hidden', W_CFG, 0),
    # the FID noise: hidden alignment's row above drawn with noise seed 1 instead of 0
    ('seed noise', 'hidden alignment, noise seed 1', 36.93, 'G_hidden', 0.0, 1),
]
# the sweep's samplers: label, model, w ramped over token positions, samples (a SIZES key)
SWEEP = [('F exact inverse, constant w', 'F_clip', False, 'n_sweep_f'),
         ('F exact inverse, ramped w', 'F_clip', True, 'n_sweep_f'),
         ('G one pass (training-time CFG)', 'G_hidden', False, 'n_sweep_g')]
# 700 stage-2 steps leave the loss plateau of the first 300-600 in every row; with 500 samples per
# FID the full run fits about an hour of 2 shared cores. quick: the pipeline only.
SIZES = {'full': dict(f_flags=[], g_flags=['--max_steps', '700'], n=500, n_sweep_f=300,
                      n_sweep_g=500, ref=1000, classifier_steps=1500),
         'quick': dict(f_flags=['--max_steps', '30', '--eval_samples', '64', '--log_every', '10'],
                       g_flags=['--max_steps', '20', '--eval_samples', '64', '--log_every', '10'],
                       n=48, n_sweep_f=16, n_sweep_g=16, ref=200, classifier_steps=60)}


def run(cmd, log):
    """cmd ('python script.py ...') from the repository root, its output appended to log."""
    print(' '.join(cmd), flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, 'a') as f:
        subprocess.call([sys.executable, *cmd[1:]], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def done(ckpt):
    """Whether a training checkpoint reached its run's max_steps."""
    s = torch.load(ckpt, map_location='cpu', weights_only=True) if os.path.exists(ckpt) else None
    return s is not None and s['step'] >= s['train_config']['max_steps']


def train(out, name, flags):
    """OUT/name, train.py's run with flags: kept when done, else continued with --resume from
    its checkpoint, else (re)started. -> its checkpoint once at max_steps, else None."""
    folder = f'{out}/{name}'
    ckpt = f'{folder}/{"reverse" if "reverse" in flags else "forward"}.pt'
    if not done(ckpt):   # a run killed before its first checkpoint starts over
        args = (['--resume', ckpt] if os.path.exists(ckpt) else
                [*flags, '--out_dir', folder, '--ckpt_every', '250', '--overwrite'])
        run(['python', 'train.py', *args], f'{out}/logs/{name}.out')
    return ckpt if done(ckpt) else None


def fid_in(log):
    """The last FID that sample.py or fid.py printed into log ('FID 71.6569 ...'), or None."""
    text = open(log).read() if os.path.exists(log) else ''
    found = re.findall(r'^FID ([0-9.]+|nan|inf)\b', text, re.M)
    return float(found[-1]) if found else None


def draw(out, ckpt, spec, stats=None):
    """spec = (model, w, seed, n, ramp)'s samples, OUT/samples/KEY.npz, and with stats their FID
    (in the log beside them, KEY.out; a lost FID draws the samples again).
    -> (npz or None, FID or None)."""
    model, w, seed, n, ramp = spec
    npz = f'{out}/samples/{model}-w{w:g}{"-ramp" * ramp}-s{seed}-n{n}.npz'
    log = npz[:-4] + '.out'
    if ckpt and (not os.path.exists(npz) or stats and fid_in(log) is None):
        run(['python', 'sample.py', '--ckpt', ckpt, '--num_samples', str(n), '--seed', str(seed),
             '--guidance', f'{w:g}', *['--ramp'] * ramp, '--npz', npz, '--out', npz[:-4] + '.png',
             *['--fid', stats] * bool(stats)], log)
    return npz if os.path.exists(npz) else None, fid_in(log) if stats else None


def reference(out, sz):
    """FID statistics of the first sz['ref'] digits of the val split (packed first), or None."""
    npz, log = f'{out}/ref_val{sz["ref"]}.npz', f'{out}/logs/ref.out'
    stats = npz[:-4] + '_stats.npz'
    if not os.path.exists(stats):
        run(['python', 'data.py', 'pack', 'digits', npz, '--split', 'val', '--limit',
             str(sz['ref']), '--img_size', '16'], log)
        run(['python', 'fid.py', npz, '--save_stats', stats], log)
    return stats if os.path.exists(stats) else None   # None: samples are drawn without FIDs


def align_curves(path):
    """train.py's reverse_log.jsonl -> {term: [(step, value)]}: the align* terms in depth order
    (align{T-2}, the head next to z, first), then 'out'; {} without the file."""
    rows = [json.loads(r) for r in open(path)] if os.path.exists(path) else []
    keys = sorted({k for r in rows for k in r if k.startswith('align')}, key=lambda k: -int(k[5:]))
    return {k: [(r['step'], r.get(k)) for r in rows] for k in keys + ['out'] * bool(rows)}


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot(panels, path, xlabel, log='', sharey=True):
    """panels = {title: {line: [(x, y)]}} side by side in 640x300 pixels, drawn with Pillow: each
    panel's x (xlabel) from its smallest to its largest, one y range for all (each panel its own
    without sharey), log10 on the axes that log names ('x', 'y' or 'xy'), a colour per line."""
    fx, fy = (math.log10 if a in log else float for a in 'xy')
    panels = {t: {k: [(fx(x), fy(y)) for x, y in line
                      if y is not None and (not log or min(x, y) > 0)]
                  for k, line in lines.items()} for t, lines in panels.items()}
    span = lambda v: (min(v or [0]), max(max(v or [0]), min(v or [0]) + 1e-6))  # noqa: E731
    lo, hi = span([y for lines in panels.values() for line in lines.values() for _, y in line])
    img = Image.new('RGB', (640, 300), 'white')
    d, pw, y0, y1 = ImageDraw.Draw(img), 640 // max(1, len(panels)), 20, 280
    for i, (title, lines) in enumerate(panels.items()):
        x0, x1 = i * pw + 45, (i + 1) * pw - 10
        xmin, xmax = span([x for line in lines.values() for x, _ in line])
        if not sharey:
            lo, hi = span([y for line in lines.values() for _, y in line])
        d.rectangle([x0, y0, x1, y1], outline='black')
        d.text((x0, 4), title, fill='black')
        for v, xx, label in ((xmin, x0, ''), (xmax, x1 - 90, xlabel)):
            d.text((xx, y1 + 4), f'{label} {10 ** v if "x" in log else v:.3g}', fill='black')
        for v, yy in ((lo, y1), (hi, y0)):
            d.text((i * pw + 2, yy - 5), f'{10 ** v if "y" in log else v:.3g}', fill='black')
        for j, (name, line) in enumerate(lines.items()):
            col = COLOURS[j % len(COLOURS)]
            d.line([(x0 + (x - xmin) / (xmax - xmin) * (x1 - x0),
                     y1 - (y - lo) / (hi - lo) * (y1 - y0)) for x, y in line], fill=col, width=2)
            d.text((x0 + 4, y0 + 4 + 12 * j), name, fill=col)
    img.save(path)


TABLE_START, TABLE_END = '<!-- ablations-table:start -->', '<!-- ablations-table:end -->'


def pct(v):
    return '—' if v is None else f'{100 * v:.1f}%'


def markdown(res):
    """The generated part of ablations.md: the table, then the guidance sweep."""
    n, ref = res['sizes']['n'], res['sizes']['ref']
    L = [f'| ablation | setting | paper FID-50K (B/2) | FID ({n} samples vs {ref} held-out) | '
         'read as class | NFE |', '|---' * 6 + '|']
    L += [f"| {r['group']} | {r['setting']} | {r['paper']:.2f} | "
          f"{'—' if r['fid'] is None else format(r['fid'], '.1f')} | {pct(r['acc'])} | "
          f"{NFE.get(r['model'], '1')} |" for r in res['rows']]
    ws = list(next(iter(res['sweep'].values())))   # the same w's for every sampler
    L += ['', '| sampler | ' + ' | '.join(f'w = {w}' for w in ws) + ' |', '|---' * (1 + len(ws))
          + '|'] + [f'| {name} | ' + ' | '.join(f"{pct(c[w]['acc'])} (n={c[w]['n']})" for w in ws)
                    + ' |' for name, c in res['sweep'].items()]
    return '\n'.join(L + ['', 'Sweep cells: read as class (n = samples).']) + '\n'


def write_md(path, table):
    """Put table between path's markers (added at its end if missing), keeping the prose around."""
    head, _, rest = (open(path).read() if os.path.exists(path) else '').partition(TABLE_START)
    tail = rest.partition(TABLE_END)[2] if rest else '\n'
    text = f'{head}{TABLE_START}\n{table}{TABLE_END}{tail}'
    data.atomic_write(path, lambda f: f.write(text.encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    add = p.add_argument
    add('--out', default='ablations', help='folder of every run, sample and result (not the repo)')
    add('--md', help='also write the table into this markdown file, between its markers')
    add('--quick', action='store_true', help='tiny step and sample counts: the pipeline in minutes')
    add('--jobs', type=int, default=2, help='commands run side by side')
    a = p.parse_args(argv)
    out, sz = os.path.abspath(a.out), SIZES['quick' if a.quick else 'full']
    table = {(m, w, seed, sz['n'], False) for *_, m, w, seed in ROWS}
    # the sweep's specs by sampler and w (a ramped w = 0 is the constant one)
    sweep = {label: {f'{w:g}': (m, w, 0, sz[n], ramp and w > 0) for w in SWEEP_W}
             for label, m, ramp, n in SWEEP}
    specs = sorted(table | {s for c in sweep.values() for s in c.values()})
    with ThreadPoolExecutor(a.jobs) as pool:
        stats = pool.submit(reference, out, sz)
        ckpts = {'F_clip': train(out, 'F_clip', sz['f_flags'])}
        g = ['--stage', 'reverse', '--forward_ckpt', f'{out}/F_clip/forward.pt', *sz['g_flags']]
        ckpts.update(zip(REVERSE, pool.map(lambda n: train(out, n, g + REVERSE[n]), REVERSE)))
        stats = stats.result()
        drawn = dict(zip(specs, pool.map(
            lambda s: draw(out, ckpts.get(s[0]), s, stats if s in table else None), specs)))
    # one classifier (seeded: the same in every invocation) reads every file
    acc = digit_accuracy([npz for npz, _ in drawn.values() if npz], steps=sz['classifier_steps'])
    score = lambda s: dict(fid=drawn[s][1], acc=acc.get(drawn[s][0]), n=s[3])  # noqa: E731
    res = dict(sizes=sz, rows=[
        dict(group=g, setting=s, paper=pf, model=m, w=w, seed=seed,
             **score((m, w, seed, sz['n'], False))) for g, s, pf, m, w, seed in ROWS],
        sweep={label: {w: score(s) for w, s in c.items()} for label, c in sweep.items()})
    data.atomic_write(f'{out}/results.json', lambda f: f.write(json.dumps(res, indent=1).encode()))
    plot({f'{k} ({n})': align_curves(f'{out}/{n}/reverse_log.jsonl') for k, n in
          (('hidden alignment', 'G_hidden'), ('hidden distillation', 'G_distill'))},
         f'{out}/align_depths.png', 'step', log='y')
    plot({'share read as class against guidance w': {label: [(float(w), p['acc']) for w, p in
          c.items()] for label, c in res['sweep'].items()}}, f'{out}/guidance_sweep.png', 'w')
    md = markdown(res)
    if a.md:
        write_md(a.md, md)
    print(md)


if __name__ == '__main__':
    main()
