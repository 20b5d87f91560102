r"""
BiFlow's ablation table of G's switches, and TarFlow's guidance sweep, on the built-in digits:

    OMP_NUM_THREADS=1 nice -n 19 python scripts/ablations.py --out ../ablations \
        --md scripts/ablations.md
    OMP_NUM_THREADS=1 python scripts/ablations.py --quick --out /tmp/abl   # every phase, tiny

1. F: the CPU preset (norm control c = 4);
2. one stage-2 run per switch, all against that frozen F, with the same steps, seed and data;
3. samples of every model (sample.py --npz), their FID against 1000 held-out digits (fid.py) and
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
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import data  # noqa: E402
from score_digits import digit_accuracy  # noqa: E402

W_CFG = 2.0   # the CFG rows' scale, fixed before any result: sample.py's default
SWEEP_W = (0.0, 0.5, 1.0, 2.0, 3.0)
# stage-2 runs: name -> train.py flags beside the CPU preset's, all against the CPU preset's F
REVERSE = {
    'G_hidden': [],
    'G_distill': ['--align', 'distill'],
    'G_naive': ['--align', 'naive'],
    'G_score': ['--denoise', 'score'],
    'G_nodenoise': ['--denoise', 'none'],
    'G_cfginf': ['--guidance_mode', 'inference'],
    # norm control off on G's side only; the paper's row turns off F's clip too (--norm_clip 0):
    # a whole second stage 1, longer than the rest of the run on 2 cores, so left out
    'G_nonorm_rev': ['--no-reverse_norm'],
}
# sequential network evaluations per sample (the CPU preset's F: 4 flows of 63 token steps); 1 else
NFE = {'F_clip': '4×63 + score', 'G_score': '1 + score', 'G_cfginf': '2'}
# group, setting, the paper's FID-50K (BiFlow-B/2 on ImageNet 256 latents), model, guidance
ROWS = [
    ('strategy', 'exact inverse F⁻¹ (+ score denoising)', 44.46, 'F_clip', 0.0),
    ('strategy', 'naive distillation', 43.41, 'G_naive', 0.0),
    ('strategy', 'hidden distillation', 55.00, 'G_distill', 0.0),
    ('strategy', 'hidden alignment (BiFlow)', 36.93, 'G_hidden', 0.0),
    ('denoising', 'none', 100.51, 'G_nodenoise', 0.0),
    ('denoising', "score-based (F's Tweedie step on G's output)", 42.62, 'G_score', 0.0),
    ('denoising', 'learned (BiFlow)', 31.88, 'G_hidden', 0.0),
    ('norm control', "none on G's side only (F clipped, G without normalisation)", 45.54,
     'G_nonorm_rev', 0.0),
    ('norm control', 'clip + normalise (BiFlow)', 31.88, 'G_hidden', 0.0),
    ('CFG', f'inference-time, w = {W_CFG:g}', 6.90, 'G_cfginf', W_CFG),
    ('CFG', f'training-time, w = {W_CFG:g}', 6.79, 'G_hidden', W_CFG),
]
# the sweep's samplers: label, model, w ramped over token positions, samples (a sizes() key)
SWEEP = [('F exact inverse, constant w', 'F_clip', False, 'n_sweep_f'),
         ('F exact inverse, ramped w', 'F_clip', True, 'n_sweep_f'),
         ('G one pass (training-time CFG)', 'G_hidden', False, 'n_sweep_g')]


def sizes(quick):
    """700 stage-2 steps leave the loss plateau of the first 300-600 in every row; with 500
    samples per FID the run fits about an hour of 2 shared cores. quick: the pipeline only."""
    if quick:
        small = ['--eval_samples', '64', '--log_every', '10']
        return dict(f_flags=['--max_steps', '30', *small], g_flags=['--max_steps', '20', *small],
                    n=48, n_sweep_f=16, n_sweep_g=16, ref=200, classifier_steps=60)
    return dict(f_flags=[], g_flags=['--max_steps', '700'], n=500, n_sweep_f=300, n_sweep_g=500,
                ref=1000, classifier_steps=1500)


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
    """OUT/name, train.py's run with flags, to its max_steps: kept, continued or trained.
    -> its checkpoint, or None."""
    folder, log = f'{out}/{name}', f'{out}/logs/{name}.out'
    ckpt = f'{folder}/{"reverse" if "reverse" in flags else "forward"}.pt'
    if not os.path.exists(ckpt):   # a run killed before its first checkpoint starts over
        shutil.rmtree(folder, ignore_errors=True)
        run(['python', 'train.py', *flags, '--out_dir', folder, '--ckpt_every', '250'], log)
    if os.path.exists(ckpt) and not done(ckpt):
        run(['python', 'train.py', '--resume', ckpt, '--ckpt_every', '250'], log)
    return ckpt if done(ckpt) else None


def fid_in(log):
    """The last FID that fid.py printed into log ('FID 71.6569  (a vs b)'), or None."""
    text = open(log).read() if os.path.exists(log) else ''
    found = re.findall(r'^FID ([0-9.]+|nan|inf)\b', text, re.M)
    return float(found[-1]) if found else None


def draw(out, ckpt, spec, stats=None):
    """spec = (model, w, seed, n, ramp)'s samples, OUT/samples/KEY.npz, and with stats their FID
    (in the log beside them, KEY.out). -> (npz or None, FID or None)."""
    model, w, seed, n, ramp = spec
    npz = f'{out}/samples/{model}-w{w:g}{"-ramp" * ramp}-s{seed}-n{n}.npz'
    log = npz[:-4] + '.out'
    if ckpt and not os.path.exists(npz):
        run(['python', 'sample.py', '--ckpt', ckpt, '--num_samples', str(n), '--seed', str(seed),
             '--guidance', f'{w:g}', *['--ramp'] * ramp, '--npz', npz, '--out', npz[:-4] + '.png'],
            log)
    if not os.path.exists(npz):
        return None, None
    if stats and fid_in(log) is None:
        run(['python', 'fid.py', npz, stats], log)
    return npz, fid_in(log) if stats else None


def reference(out, sz):
    """The first sz['ref'] digits of the val split, packed, and their FID statistics."""
    npz, log = f'{out}/ref_val{sz["ref"]}.npz', f'{out}/logs/ref.out'
    stats = npz[:-4] + '_stats.npz'
    if not os.path.exists(stats):
        run(['python', 'data.py', 'pack', 'digits', npz, '--split', 'val', '--limit',
             str(sz['ref']), '--img_size', '16'], log)
        run(['python', 'fid.py', npz, '--save_stats', stats], log)
    return npz, stats


def align_keys(rows):
    """The align* keys of log rows in depth order (align{T-2}, the head next to z, first), 'out'."""
    keys = sorted({k for r in rows for k in r if k.startswith('align')}, key=lambda k: -int(k[5:]))
    return keys + (['out'] if any('out' in r for r in rows) else [])


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot(panels, path, xlabel, log=False, size=(640, 300)):
    """panels = {title: {line: [(x, y)]}} side by side, drawn with Pillow: one y range for all
    (log10 with log), each panel's x (xlabel) from 0 to its largest, a colour per line."""
    img = Image.new('RGB', size, 'white')
    d, (W, H) = ImageDraw.Draw(img), size
    f = np.log10 if log else float
    panels = {t: {k: [(x, f(y)) for x, y in line if y is not None and (y > 0 or not log)]
                  for k, line in lines.items()} for t, lines in panels.items()}
    ys = [y for lines in panels.values() for line in lines.values() for _, y in line] or [0]
    lo, hi = min(ys), max(max(ys), min(ys) + 1e-6)
    pw, y0, y1 = W // max(1, len(panels)), 20, H - 20
    for i, (title, lines) in enumerate(panels.items()):
        x0, x1 = i * pw + 45, (i + 1) * pw - 10
        xmax = max([x for line in lines.values() for x, _ in line] + [1e-6])
        d.rectangle([x0, y0, x1, y1], outline='black')
        d.text((x0, 4), title, fill='black')
        d.text((x1 - 60, y1 + 4), f'{xlabel} {xmax:g}', fill='black')
        for v, yy in ((lo, y1), (hi, y0)):
            d.text((i * pw + 2, yy - 5), f'{10 ** v if log else v:.3g}', fill='black')
        for j, (name, line) in enumerate(lines.items()):
            col = COLOURS[j % len(COLOURS)]
            xy = [(x0 + x / xmax * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0))
                  for x, y in line]
            if len(xy) > 1:
                d.line(xy, fill=col, width=2)
            d.text((x0 + 4, y0 + 4 + 12 * j), name, fill=col)
    img.save(path)


TABLE_START, TABLE_END = '<!-- ablations-table:start -->', '<!-- ablations-table:end -->'


def pct(v):
    return '—' if v is None else f'{100 * v:.1f}%'


def markdown(res):
    """The generated part of ablations.md: the table, the FID noise, the guidance sweep."""
    n, ref = res['sizes']['n'], res['sizes']['ref']
    L = [f'| ablation | setting | paper FID-50K (B/2) | FID ({n} samples vs {ref} held-out) | '
         'read as class | NFE |', '|---' * 6 + '|']
    L += [f"| {r['group']} | {r['setting']} | {r['paper']:.2f} | "
          f"{'—' if r['fid'] is None else format(r['fid'], '.1f')} | {pct(r['acc'])} | "
          f"{NFE.get(r['model'], '1')} |" for r in res['rows']]
    if res.get('noise'):
        (f0, f1), (a0, a1) = res['noise']['fid'], res['noise']['acc']
        L += ['', f'FID noise: the same model (G_hidden, w = 0) sampled with seeds 0 and 1 gives '
              f'FID {f0:.2f} and {f1:.2f} (|Δ| = {abs(f0 - f1):.2f}), read-as-class {pct(a0)} and '
              f'{pct(a1)}. Gaps smaller than a few times |Δ| are not resolved by this FID.']
    ws = sorted({float(w) for c in res['sweep'].values() for w in c})
    L += ['', '| sampler | ' + ' | '.join(f'w = {w:g}' for w in ws) + ' |', '|---' * (1 + len(ws))
          + '|'] + [f'| {name} | ' + ' | '.join(
              pct(p['acc']) + ('' if p['fid'] is None else f" / {p['fid']:.1f}") + f" (n={p['n']})"
              for p in (c[f'{w:g}'] for w in ws)) + ' |' for name, c in res['sweep'].items()]
    return '\n'.join(L + ['', "Cells: read as class / FID where computed (the table's), "
                          '(n = samples).']) + '\n'


def write_md(path, table):
    """Put table between path's markers (added at its end if missing), keeping the prose around."""
    text = open(path).read() if os.path.exists(path) else ''
    if TABLE_START not in text:
        text += f'\n{TABLE_START}\n{TABLE_END}\n'
    head, rest = text.split(TABLE_START, 1)
    text = f'{head}{TABLE_START}\n{table}{TABLE_END}{rest.split(TABLE_END, 1)[1]}'
    data.atomic_write(path, lambda f: f.write(text.encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument('--out', default='ablations',
                   help='folder for every run, sample and result (outside the repository)')
    p.add_argument('--md', default=None,
                   help='also write the table into this markdown file, between its markers')
    p.add_argument('--quick', action='store_true',
                   help='tiny step and sample counts: tests the pipeline in minutes')
    p.add_argument('--jobs', type=int, default=2, help='commands run side by side')
    a = p.parse_args(argv)
    out, sz = os.path.abspath(a.out), sizes(a.quick)
    table = {(r[3], r[4], 0, sz['n'], False) for r in ROWS} | {('G_hidden', 0.0, 1, sz['n'], False)}
    sweep = {(label, w): (model, w, 0, sz[n], ramp and w > 0)   # ramped w = 0 is constant w = 0
             for label, model, ramp, n in SWEEP for w in SWEEP_W}
    specs = sorted(table | set(sweep.values()))
    with ThreadPoolExecutor(a.jobs) as pool:
        ref = pool.submit(reference, out, sz)
        ckpts = {'F_clip': train(out, 'F_clip', sz['f_flags'])}
        g = ['--stage', 'reverse', '--forward_ckpt', f'{out}/F_clip/forward.pt', *sz['g_flags']]
        ckpts.update(zip(REVERSE, pool.map(lambda n: train(out, n, g + REVERSE[n]), REVERSE)))
        ref_npz, stats = ref.result()
        drawn = dict(zip(specs, pool.map(
            lambda s: draw(out, ckpts.get(s[0]), s, stats if s in table else None), specs)))
    # one classifier (seeded: the same in every invocation) reads every file
    acc = digit_accuracy([ref_npz] + [npz for npz, _ in drawn.values() if npz],
                         steps=sz['classifier_steps'])
    score = lambda s: dict(fid=drawn[s][1], acc=acc.get(drawn[s][0]), n=s[3])  # noqa: E731
    res = dict(sizes=sz, sweep={}, rows=[
        dict(group=g, setting=s, paper=pf, model=m, w=w, **score((m, w, 0, sz['n'], False)))
        for g, s, pf, m, w in ROWS])
    s0, s1 = (score(('G_hidden', 0.0, seed, sz['n'], False)) for seed in (0, 1))
    if s0['fid'] is not None and s1['fid'] is not None:
        res['noise'] = dict(fid=[s0['fid'], s1['fid']], acc=[s0['acc'], s1['acc']])
    for (label, w), spec in sweep.items():
        res['sweep'].setdefault(label, {})[f'{w:g}'] = score(spec)
    data.atomic_write(f'{out}/results.json', lambda f: f.write(json.dumps(res, indent=1).encode()))
    logs = {f'{k} ({n})': [json.loads(r) for r in open(f'{out}/{n}/reverse_log.jsonl')]
            for k, n in (('hidden alignment', 'G_hidden'), ('hidden distillation', 'G_distill'))
            if os.path.exists(f'{out}/{n}/reverse_log.jsonl')}
    plot({k: {t: [(r['step'], r.get(t)) for r in rows] for t in align_keys(rows)}
          for k, rows in logs.items()}, f'{out}/align_depths.png', 'step', log=True)
    plot({'read as class (%) against guidance w': {
        label: [(float(w), None if p['acc'] is None else 100 * p['acc']) for w, p in c.items()]
        for label, c in res['sweep'].items()}}, f'{out}/guidance_sweep.png', 'w', size=(640, 260))
    md = markdown(res)
    if a.md:
        write_md(a.md, md)
    print(md)


if __name__ == '__main__':
    main()
