"""
BiFlow's ablation table of G's switches (and TarFlow's guidance sweep) on the built-in digits:

    nice -n 19 python scripts/ablations.py --out ../ablations --md scripts/ablations.md
    python scripts/ablations.py --quick --out /tmp/ablations_quick   # every phase, tiny counts

1. F: the CPU preset (norm control c = 4); with --forward_norm_row also one with --norm_clip 0;
2. one stage-2 run per switch, every one against the same frozen F, with the same steps, seed, data;
3. samples of every model with their FID against 1000 held-out digits (sample.py --npz --fid) and
   the share read as the requested class (scripts/score_digits.py);
4. OUT/results.json, the table (OUT/ablations_table.md, and into --md between its markers), the
   per-depth alignment terms (OUT/align_depths.png) and the guidance sweep (OUT/guidance_sweep.png).

Every number comes from the command printed in the table, run as a subprocess from the repository
root (--jobs side by side, --threads each). Run the same command again to resume: every output file
is its own marker (a checkpoint at max_steps, a sample .npz, its FID in the .out log beside it,
OUT/accuracy.json), and an unfinished training run continues with train.py --resume.
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
# name -> (the F it trains against, None for an F; its train.py flags beside the CPU preset's)
RUNS = {
    'F_clip': (None, []),
    'F_noclip': (None, ['--norm_clip', '0']),
    'G_hidden': ('F_clip', []),
    'G_distill': ('F_clip', ['--align', 'distill']),
    'G_naive': ('F_clip', ['--align', 'naive']),
    'G_score': ('F_clip', ['--denoise', 'score']),
    'G_cfginf': ('F_clip', ['--guidance_mode', 'inference']),
    'G_nonorm_rev': ('F_clip', ['--no-reverse_norm']),   # norm control off on G's side only
    'G_nonorm': ('F_noclip', ['--no-reverse_norm']),     # the paper's row: off on both sides
}
# only with --forward_norm_row: a whole second stage 1, longer than the rest of the run on 2 cores
NOCLIP = {'F_noclip', 'G_nonorm'}
# denoise 'none' trains exactly as 'score' (a test checks it): one training, its config changed
DERIVED = {'G_nodenoise': ('G_score', {'denoise': 'none'})}
NFE_F = '4×63 + score'   # the CPU preset's F: 4 flows of 63 token steps, then Tweedie's step
# group, setting, the paper's FID-50K (BiFlow-B/2, ImageNet 256), model, guidance, NFE
ROWS = [
    ('strategy', 'exact inverse F⁻¹ (+ score denoising)', 44.46, 'F_clip', 0.0, NFE_F),
    ('strategy', 'naive distillation', 43.41, 'G_naive', 0.0, '1'),
    ('strategy', 'hidden distillation', 55.00, 'G_distill', 0.0, '1'),
    ('strategy', 'hidden alignment (BiFlow)', 36.93, 'G_hidden', 0.0, '1'),
    ('denoising', 'none', 100.51, 'G_nodenoise', 0.0, '1'),
    ('denoising', "score-based (F's Tweedie step on G's output)", 42.62, 'G_score', 0.0,
     '1 + score'),
    ('denoising', 'learned (BiFlow)', 31.88, 'G_hidden', 0.0, '1'),
    ('norm control', 'none (F without clip, G without normalisation)', 45.54, 'G_nonorm', 0.0,
     '1'),
    ('norm control', "none on G's side only (F clipped, G without normalisation)", 45.54,
     'G_nonorm_rev', 0.0, '1'),
    ('norm control', 'clip + normalise (BiFlow)', 31.88, 'G_hidden', 0.0, '1'),
    ('CFG', f'inference-time, w = {W_CFG:g}', 6.90, 'G_cfginf', W_CFG, '2'),
    ('CFG', f'training-time, w = {W_CFG:g}', 6.79, 'G_hidden', W_CFG, '1'),
]
# the sweep's samplers: label, model, ramped w, samples (a sizes() key)
SWEEP = [('F exact inverse, constant w', 'F_clip', False, 'n_sweep_f'),
         ('F exact inverse, ramped w', 'F_clip', True, 'n_sweep_f'),
         ('G one pass (training-time CFG)', 'G_hidden', False, 'n_sweep_g')]


def sizes(quick):
    """Steps and samples: 700 stage-2 steps leave the loss plateau of the first 300-600 in every
    row, and with 500 samples per FID the run fits about an hour on 2 shared cores."""
    if quick:
        return dict(f_steps=30, g_steps=20, n=48, n_sweep_f=16, n_sweep_g=16, ref=200,
                    classifier_steps=60, extra_train=['--eval_samples', '64', '--log_every', '10'])
    return dict(f_steps=None, g_steps=700, n=500, n_sweep_f=300, n_sweep_g=500, ref=1000,
                classifier_steps=1500, extra_train=[])


def read_json(path, default):
    return json.load(open(path)) if os.path.exists(path) else default


def write_json(path, obj):
    data.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def run(cmd, log, threads):
    """cmd (as printed, 'python script ...') from the repository root, its output appended to log.
    -> the exit code."""
    print(' '.join(cmd), flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, 'a') as f:
        return subprocess.call([sys.executable, *cmd[1:]], cwd=ROOT, stdout=f,
                               stderr=subprocess.STDOUT, env=env)


def train_status(ckpt):
    """'done' (a checkpoint at max_steps), 'partial' or 'none'."""
    if not os.path.exists(ckpt):
        return 'none'
    saved = torch.load(ckpt, map_location='cpu', weights_only=True)
    return 'done' if saved['step'] >= saved['train_config']['max_steps'] else 'partial'


def train_flags(out, name, sz):
    """train.py's flags for a run (beside --out_dir)."""
    fwd, flags = RUNS[name]
    if fwd is None:
        return flags + (['--max_steps', str(sz['f_steps'])] if sz['f_steps'] else [])
    return ['--stage', 'reverse', '--forward_ckpt', os.path.join(out, fwd, 'forward.pt'),
            '--max_steps', str(sz['g_steps'])] + flags


def train(out, name, sz, threads):
    """OUT/name/STAGE.pt trained to max_steps: kept, continued, or trained. -> its path or None."""
    folder = os.path.join(out, name)
    ckpt = os.path.join(folder, ('forward' if RUNS[name][0] is None else 'reverse') + '.pt')
    status = train_status(ckpt)
    if status == 'partial':
        run(['python', 'train.py', '--resume', ckpt, '--ckpt_every', '250'],
            os.path.join(out, 'logs', name + '.out'), threads)
    elif status == 'none':   # a run killed before its first checkpoint starts over
        shutil.rmtree(folder, ignore_errors=True)
        run(['python', 'train.py', *train_flags(out, name, sz), *sz['extra_train'],
             '--out_dir', folder, '--ckpt_every', '250'], os.path.join(out, 'logs', name + '.out'),
            threads)
    return ckpt if train_status(ckpt) == 'done' else None


def derive(out, name, ckpts):
    """DERIVED[name]: its source's checkpoint with a sampling-only field of the config changed."""
    src, change = DERIVED[name]
    path = os.path.join(out, name, 'reverse.pt')
    if not os.path.exists(path) and ckpts.get(src):
        saved = torch.load(ckpts[src], map_location='cpu', weights_only=True)
        saved['model_config'].update(change)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data.atomic_write(path, lambda f: torch.save(saved, f))
    return path if os.path.exists(path) else None


def sample_key(model, w, seed, n, ramp=False):
    return f'{model}-w{w:g}{"-ramp" if ramp else ""}-s{seed}-n{n}'


def sample_cmd(ckpt, w, seed, n, npz, ramp=False, fid_stats=None):
    return (['python', 'sample.py', '--ckpt', ckpt, '--num_samples', str(n), '--seed', str(seed),
             '--guidance', f'{w:g}'] + ['--ramp'] * ramp + ['--npz', npz, '--out', npz[:-4] + '.png']
            + (['--fid', fid_stats] if fid_stats else []))


def parse_fid(log):
    """The last 'FID 71.66 ...' line that sample.py --fid or fid.py printed into log, or None."""
    found = re.findall(r'^FID ([0-9.]+|nan|inf)\b', open(log).read() if os.path.exists(log) else '',
                       re.M)
    return float(found[-1]) if found else None


def draw(out, ckpt, spec, stats, threads):
    """The samples of spec = (model, w, seed, n, ramp) in OUT/samples/KEY.npz and, with stats, their
    FID (an FID lost to an interruption is redone by fid.py alone). -> (npz or None, FID or None)."""
    npz = os.path.join(out, 'samples', sample_key(*spec) + '.npz')
    log = npz[:-4] + '.out'
    _, w, seed, n, ramp = spec
    if ckpt is None or not os.path.exists(npz) and run(
            sample_cmd(ckpt, w, seed, n, npz, ramp, stats), log, threads):
        return None, None
    if stats and parse_fid(log) is None:
        run(['python', 'fid.py', npz, stats], log, threads)
    return npz, parse_fid(log) if stats else None


def reference(out, sz, threads):
    """The first sz['ref'] digits of the val split, packed, and their FID statistics."""
    npz = os.path.join(out, f'ref_val{sz["ref"]}.npz')
    stats, log = npz[:-4] + '_stats.npz', os.path.join(out, 'logs', 'ref.out')
    if not os.path.exists(npz):
        run(['python', 'data.py', 'pack', 'digits', npz, '--split', 'val', '--limit',
             str(sz['ref']), '--img_size', '16'], log, threads)
    if not os.path.exists(stats):
        run(['python', 'fid.py', npz, '--save_stats', stats], log, threads)
    return npz, stats


def read_log(path):
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def align_keys(rows):
    """align* keys in depth order (align{T-2}, the first head, next to z), then 'out'."""
    keys = sorted({k for r in rows for k in r if k.startswith('align')}, key=lambda k: -int(k[5:]))
    return keys + (['out'] if any('out' in r for r in rows) else [])


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def plot(panels, path, log=False, size=(640, 300)):
    """panels = {title: {line: [(x, y)]}} side by side with Pillow, on one shared y range (log10
    with log): a colour per line, x from 0 to each panel's largest x."""
    W, H = size
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    f = np.log10 if log else float
    pts = {t: {k: [(x, f(y)) for x, y in line if y is not None and (y > 0 or not log)]
               for k, line in lines.items()} for t, lines in panels.items()}
    ys = [y for lines in pts.values() for line in lines.values() for _, y in line]
    lo, hi = (min(ys), max(ys)) if ys else (0, 1)
    hi = hi if hi > lo else lo + 1
    top, bottom, pw = 20, H - 20, W // len(panels)
    for i, (title, lines) in enumerate(pts.items()):
        x0, x1 = i * pw + 45, (i + 1) * pw - 10
        xmax = max((x for line in lines.values() for x, _ in line), default=1) or 1
        d.rectangle([x0, top, x1, bottom], outline='black')
        d.text((x0, 4), title, fill='black')
        d.text((x1 - 40, bottom + 4), f'{xmax:g}', fill='black')
        for v in (lo, hi):
            d.text((2 + i * pw, bottom - (v - lo) / (hi - lo) * (bottom - top) - 5),
                   f'{10 ** v if log else v:.3g}', fill='black')
        for j, (name, line) in enumerate(lines.items()):
            col = COLOURS[j % len(COLOURS)]
            xy = [(x0 + x / xmax * (x1 - x0), bottom - (y - lo) / (hi - lo) * (bottom - top))
                  for x, y in line]
            if len(xy) > 1:
                d.line(xy, fill=col, width=2)
            d.text((x0 + 4, top + 4 + 12 * j), name, fill=col)
    img.save(path)


TABLE_START, TABLE_END = '<!-- ablations-table:start -->', '<!-- ablations-table:end -->'


def pct(v):
    return '—' if v is None else f'{100 * v:.1f}%'


def markdown(res):
    """The generated part of ablations.md: the table, the FID noise, the sweep, the commands."""
    sz = res['sizes']
    L = [f"| ablation | setting | paper FID-50K (B/2) | FID ({sz['n']} samples vs {sz['ref']} "
         'held-out) | read as class | NFE |', '|---|---|---|---|---|---|']
    L += [f"| {r['group']} | {r['setting']} | {r['paper']:.2f} | "
          f"{'—' if r.get('fid') is None else format(r['fid'], '.1f')} | {pct(r.get('acc'))} | "
          f"{r['nfe']} |" for r in res['rows']]
    if res.get('noise'):
        (f0, f1), (a0, a1) = res['noise']['fid'], res['noise']['acc']
        L += ['', f'FID noise: the same model (G_hidden, w = 0) sampled with seeds 0 and 1 gives '
              f'FID {f0:.2f} and {f1:.2f} (|Δ| = {abs(f0 - f1):.2f}), read-as-class {pct(a0)} and '
              f'{pct(a1)}. Gaps smaller than a few times |Δ| are not resolved by this FID.']
    if res.get('sweep'):
        ws = sorted({float(w) for c in res['sweep'].values() for w in c})
        L += ['', '| sampler | ' + ' | '.join(f'w = {w:g}' for w in ws) + ' |',
              '|---|' + '---|' * len(ws)]
        for name, c in res['sweep'].items():
            cells = [c.get(f'{w:g}', {}) for w in ws]
            L.append(f'| {name} | ' + ' | '.join(
                pct(p.get('acc')) + ('' if p.get('fid') is None else f" / {p['fid']:.1f}")
                + f" (n={p.get('n', '?')})" for p in cells) + ' |')
        L += ['', "Cells: read as class / FID where computed (the table's), (n = samples)."]
    L += ['', 'Commands (OUT = the --out folder):', ''] + ['    ' + c for c in res['commands']]
    return '\n'.join(L) + '\n'


def write_md(md_path, table):
    """Put the table between md_path's markers (the prose around it is kept), or append it."""
    block = f'{TABLE_START}\n{table}{TABLE_END}'
    text = open(md_path).read() if os.path.exists(md_path) else ''
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip('\n') + ('\n\n' if text else '') + block + '\n'
    data.atomic_write(md_path, lambda f: f.write(text.encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument('--out', default='ablations',
                   help='folder for every run, sample and result (outside the repository)')
    p.add_argument('--quick', action='store_true',
                   help='tiny step and sample counts: tests the pipeline in minutes')
    p.add_argument('--md', default=None,
                   help='also write the table into this markdown file, between its markers')
    p.add_argument('--sweep', action=argparse.BooleanOptionalAction, default=True,
                   help="TarFlow's guidance sweep (accuracy against w; FID where it is a table row)")
    p.add_argument('--forward_norm_row', action=argparse.BooleanOptionalAction, default=False,
                   help='also train an F with --norm_clip 0 (a whole stage 1) for the paper\'s '
                   'norm-control row with both sides off; without it only G\'s side is turned off')
    p.add_argument('--jobs', type=int, default=2, help='commands run side by side')
    p.add_argument('--threads', type=int, default=1,
                   help='threads per command: on a shared machine one per job never waits for a '
                   'core that someone else holds')
    a = p.parse_args(argv)
    out, sz = os.path.abspath(a.out), sizes(a.quick)
    torch.set_num_threads(a.threads)   # the digit classifier runs in this process
    names = [n for n in RUNS if a.forward_norm_row or n not in NOCLIP]
    rows = [r for r in ROWS if r[3] in names or r[3] in DERIVED]
    table = {(r[3], r[4], 0, sz['n'], False) for r in rows} | {('G_hidden', 0.0, 1, sz['n'], False)}
    sweep = {(label, w): (model, w, 0, sz[n], ramp and w > 0)   # ramped w = 0 is constant w = 0
             for label, model, ramp, n in SWEEP for w in SWEEP_W} if a.sweep else {}
    ckpts = {}
    with ThreadPoolExecutor(a.jobs) as pool:
        ref = pool.submit(reference, out, sz, a.threads)
        for is_f in (True, False):   # every F, then every G against them
            todo = [n for n in names if (RUNS[n][0] is None) == is_f]
            ckpts.update(zip(todo, pool.map(lambda n: train(out, n, sz, a.threads), todo)))
        ckpts.update({n: derive(out, n, ckpts) for n in DERIVED})
        ref_npz, stats = ref.result()
        specs = sorted(table | set(sweep.values()))
        drawn = dict(zip(specs, pool.map(lambda s: draw(out, ckpts.get(s[0]), s, stats * (
            s in table), a.threads), specs)))
    acc = read_json(os.path.join(out, 'accuracy.json'), {})
    todo = [f for f in [ref_npz] + [npz for npz, _ in drawn.values() if npz] if f not in acc]
    if todo:   # one seeded classifier reads every file
        acc.update(digit_accuracy(todo, steps=sz['classifier_steps']))
        write_json(os.path.join(out, 'accuracy.json'), acc)
    score = lambda s: dict(fid=drawn[s][1], acc=acc.get(drawn[s][0]), n=s[3])  # noqa: E731
    logs = {n: read_log(os.path.join(out, n, 'reverse_log.jsonl')) for n in names}
    res = dict(sizes={k: v for k, v in sz.items() if k != 'extra_train'}, rows=[
        dict(group=g, setting=s, paper=pf, model=m, w=w, nfe=nfe, **score((m, w, 0, sz['n'], False)))
        for g, s, pf, m, w, nfe in rows])
    s0, s1 = (score(('G_hidden', 0.0, seed, sz['n'], False)) for seed in (0, 1))
    if s0['fid'] is not None and s1['fid'] is not None:
        res['noise'] = dict(fid=[s0['fid'], s1['fid']], acc=[s0['acc'], s1['acc']])
    res['sweep'] = {}
    for (label, w), spec in sweep.items():
        res['sweep'].setdefault(label, {})[f'{w:g}'] = score(spec)
    res['final_terms'] = {n: {k: r[-1][k] for k in align_keys(r) + ['recon_rmse'] if k in r[-1]}
                          for n, r in logs.items() if r}
    res['commands'] = [' '.join(['python', 'train.py', *train_flags('OUT', n, sz),
                                 '--out_dir', f'OUT/{n}']) for n in names]
    res['commands'] += [f'# OUT/{n}/reverse.pt: OUT/{src}/reverse.pt with model_config {change}'
                        for n, (src, change) in DERIVED.items()]
    res['commands'] += list(dict.fromkeys(' '.join(sample_cmd(
        f'OUT/{m}/{"forward" if m.startswith("F") else "reverse"}.pt', w, 0, sz['n'],
        f'OUT/samples/{sample_key(m, w, 0, sz["n"])}.npz', fid_stats=f'OUT/{os.path.basename(stats)}'))
        for *_, m, w, _ in rows))
    if sweep:
        res['commands'].append(f"# sweep: the sample.py commands above with --guidance W (and "
                               f"--ramp), --num_samples {sz['n_sweep_f']} for F, "
                               f"{sz['n_sweep_g']} for G, no --fid")
    write_json(os.path.join(out, 'results.json'), res)
    md = markdown(res)
    data.atomic_write(os.path.join(out, 'ablations_table.md'), lambda f: f.write(md.encode()))
    plot({f'{k} ({n})': {t: [(r['step'], r.get(t)) for r in logs[n]] for t in align_keys(logs[n])}
          for k, n in (('hidden alignment', 'G_hidden'), ('hidden distillation', 'G_distill'))},
         os.path.join(out, 'align_depths.png'), log=True)
    if sweep:
        plot({'read as class (%) against guidance w': {
            label: [(float(w), None if p['acc'] is None else 100 * p['acc']) for w, p in c.items()]
            for label, c in res['sweep'].items()}}, os.path.join(out, 'guidance_sweep.png'),
            size=(640, 260))
    if a.md:
        write_md(a.md, md)
    print(md)


if __name__ == '__main__':
    main()
