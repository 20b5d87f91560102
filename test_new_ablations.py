"""Tests of the ablation script's table and plots (scripts/ablations.py) and of sample.py --trajectory. Tiny models
built here; nothing is trained. Run: pytest test_new_ablations.py"""
import json
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from model import FlowConfig, ReverseModel, TarFlow, reverse_config_for, unpatchify

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'scripts'))
import ablations  # noqa: E402

TINY = FlowConfig(img_size=8, in_channels=3, patch_size=2, channels=32, num_blocks=3, layers_per_block=1,
                  head_dim=16, num_classes=3, noise_std=0.1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one thread is fastest, and a busy machine cannot stall a second one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pair(align='hidden', denoise='learned', guidance_mode='train'):
    """A TarFlow with non-zero output projections (a fresh one is affine per channel) and a G for it."""
    torch.manual_seed(0)
    f = TarFlow(TINY)
    with torch.no_grad():
        for b in f.blocks:
            b.proj_out.weight.normal_(0, 0.1)
    gcfg = reverse_config_for(TINY, align=align, denoise=denoise, guidance_mode=guidance_mode)
    g = ReverseModel(gcfg)
    with torch.no_grad():   # zero-initialised output layers would draw a blank G row
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return f.eval().requires_grad_(False), g.eval().requires_grad_(False)


def cell(png, r, c, size, scale):
    """The image at row r, column c of a save_grid PNG (2-pixel borders, cells enlarged by scale)."""
    s = size * scale
    a = np.array(Image.open(png))
    return a[2 + r * (s + 2):2 + r * (s + 2) + s:scale, 2 + c * (s + 2):2 + c * (s + 2) + s:scale]


# ---------------------------------------------------------------------------------------------------------------------
# sample.py --trajectory


@pytest.mark.parametrize('align,denoise', [('hidden', 'learned'), ('naive', 'learned'), ('hidden', 'none')])
def test_trajectory_columns_are_the_exact_inverse_and_g_heads(tmp_path, align, denoise):
    f, g = make_pair(align, denoise)
    z = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    y = torch.tensor([0, 2])
    png = str(tmp_path / 't.png')
    sample.draw_trajectory(f, png, y, z, guidance=0.0, denoise=True, reverse_model=g)
    T, cols, scale = TINY.num_blocks, TINY.num_blocks + 2, 64 // TINY.img_size
    a = np.array(Image.open(png))
    assert a.shape[:2] == (4 * (8 * scale + 2) + 2, cols * (8 * scale + 2) + 2)   # 2 samples x (F row, G row)
    # F's row: x^0 (column T) is F's exact inverse, the last column its Tweedie-denoised image, both as [-1, 1] images
    x0 = f.reverse(z, y)
    for i in range(2):
        assert np.array_equal(cell(png, 2 * i, T, 8, scale), sample.to_uint8(x0.clamp(-1, 1))[i])
        assert np.array_equal(cell(png, 2 * i, T + 1, 8, scale), sample.to_uint8(f.denoise(x0, y).clamp(-1, 1))[i])
        # z is shown stretched to the full range of its own pixels
        zc = cell(png, 2 * i, 0, 8, scale)
        assert zc.min() == 0 and zc.max() == 255
    # G's row: its one-pass output in the last column, its heads at their depths
    out = g.decode(z, y, torch.zeros(2), forward_model=f)
    preds = g(z, y, torch.zeros(2))
    for i in range(2):
        assert np.array_equal(cell(png, 2 * i + 1, T + 1, 8, scale), sample.to_uint8(out.clamp(-1, 1))[i])
        if len(preds) == 1:   # naive: no heads, the depth columns are left black
            assert cell(png, 2 * i + 1, 1, 8, scale).max() == 0
        else:   # head 0 predicts x^{T-1}: column 1, stretched like F's state there
            c = cell(png, 2 * i + 1, 1, 8, scale)
            assert c.min() == 0 and c.max() == 255
    if denoise == 'learned' and align == 'hidden':   # head T-1 predicts the noisy x^0: shown as an image, unstretched
        p = unpatchify(preds[T - 1], TINY.patch_size, TINY.img_size)
        assert np.array_equal(cell(png, 1, T, 8, scale), sample.to_uint8(p.clamp(-1, 1))[0])


def test_trajectory_flag_forward_and_reverse_checkpoints(tmp_path):
    f, g = make_pair()
    fck, gck = str(tmp_path / 'forward.pt'), str(tmp_path / 'reverse.pt')
    torch.save(dict(kind='forward', model_config=asdict(TINY), ema=f.state_dict()), fck)
    torch.save(dict(kind='reverse', model_config=asdict(g.cfg), ema=g.state_dict(), forward_config=asdict(TINY),
                    forward=f.state_dict()), gck)
    for ck, rows in ((fck, 3), (gck, 6)):
        out = str(tmp_path / f'{os.path.basename(ck)}.png')
        sample.main(['--ckpt', ck, '--trajectory', out, '--num_samples', '3', '--guidance', '1', '--device', 'cpu'])
        h, w = np.array(Image.open(out)).shape[:2]
        assert (h, w) == (rows * 66 + 2, (TINY.num_blocks + 2) * 66 + 2)


# ---------------------------------------------------------------------------------------------------------------------
# scripts/ablations.py: results -> markdown, plots, resume markers


def fake_results():
    rows = [dict(group=gr, setting=s, paper=p, model=m, w=w, key=f'{m}-w{w:g}', fid=100.0 + i, acc=0.5 + i / 100,
                 nfe='1', ms=2.5) for i, (gr, s, p, m, w) in enumerate(ablations.ROWS)]
    rows[0]['fid'] = None   # a failed run shows as a dash, not a crash
    return dict(rows=rows, noise=dict(model='G_hidden', w=0.0, fid=[101.0, 103.5], acc=[0.6, 0.62], delta_fid=2.5),
                sweep={'F const': {'0': dict(acc=0.5, fid=80.0, n=300), '1': dict(acc=0.7, fid=None, n=300)},
                       'G': {'0': dict(acc=0.6, fid=None, n=1000), '2': dict(acc=0.9, fid=None, n=1000)}},
                commands=['python train.py --out_dir OUT/F_clip'], walltimes={'train G_hidden': 300.0, 'FID': 120.0})


def test_markdown_table_from_results():
    md = ablations.markdown(fake_results())
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith('| ') and 'paper FID' not in ln and 'sampler' not in ln
             and not ln.startswith('| F const') and not ln.startswith('| G |')]
    assert len(table) == len(ablations.ROWS)
    assert '| strategy | exact inverse' in table[0] and '| — |' in table[0]   # the missing FID is a dash
    assert '101.0' in md and '|Δ| = 2.50' in md
    assert 'w = 0 | w = 1 | w = 2' in md and '70.0% (n=300)' in md and '50.0% / 80.0' in md
    assert '    python train.py --out_dir OUT/F_clip' in md
    assert 'summed over the 1 side-by-side jobs: 7 min' in md


def test_write_md_keeps_prose_and_replaces_only_the_table(tmp_path):
    p = str(tmp_path / 'A.md')
    ablations.write_md(p, 'first table\n')
    with open(p) as f:
        text = f.read()
    with open(p, 'w') as f:
        f.write('# prose before\n\n' + text + '\nprose after\n')
    ablations.write_md(p, 'second table\n')
    ablations.write_md(p, 'second table\n')   # idempotent
    with open(p) as f:
        text = f.read()
    assert 'first table' not in text and text.count('second table') == 1
    assert text.startswith('# prose before') and text.rstrip().endswith('prose after')


def fake_log(scale, steps=10):
    return [dict(step=50 * (i + 1), align2=scale * 0.5 / (i + 1), align1=scale * 0.2 / (i + 1),
                 align0=scale * 0.1 / (i + 1), out=0.3 / (i + 1), loss=1.0) for i in range(steps)]


def test_align_keys_in_depth_order():
    assert ablations.align_keys(fake_log(1)) == ['align2', 'align1', 'align0', 'out']
    assert ablations.align_keys([dict(step=1, out=0.1)]) == ['out']   # naive: the output term only


def test_plot_alignment_draws_both_panels(tmp_path):
    p = str(tmp_path / 'a.png')
    ablations.plot_alignment({'hidden': fake_log(1), 'distill': fake_log(10)}, p)
    a = np.array(Image.open(p).convert('RGB'))
    assert a.shape == (300, 640, 3)
    coloured = (a.max(2).astype(int) - a.min(2)) > 60    # the depth lines are coloured, the frame black
    assert coloured[:, :320].sum() > 100 and coloured[:, 320:].sum() > 100
    ablations.plot_alignment({'empty': []}, p)            # no terms logged: a note, not a crash
    assert os.path.exists(p)


def test_plot_sweep(tmp_path):
    p = str(tmp_path / 's.png')
    ablations.plot_sweep({'F': [(0.0, 50.0), (1.0, 70.0), (3.0, 90.0)], 'G': [(0.0, 60.0), (2.0, None)]}, p)
    a = np.array(Image.open(p).convert('RGB'))
    assert ((a.max(2).astype(int) - a.min(2)) > 60).sum() > 50


def test_train_status_marks_done_and_partial(tmp_path):
    p = str(tmp_path / 'reverse.pt')
    assert ablations.train_status(p) == 'none'
    torch.save(dict(step=5, train_config=dict(max_steps=10)), p)
    assert ablations.train_status(p) == 'partial'
    torch.save(dict(step=10, train_config=dict(max_steps=10)), p)
    assert ablations.train_status(p) == 'done'


@pytest.mark.parametrize('both_sides', [False, True])
def test_train_commands_share_seed_data_and_steps(tmp_path, both_sides):
    cmds = ablations.train_commands(str(tmp_path), ablations.sizes(quick=False), both_sides)
    rev = {k: v for k, v in cmds.items() if v[0] == 'reverse'}
    assert set(rev) == set(ablations.REVERSE) - (set() if both_sides else ablations.NOCLIP)
    assert ('F_noclip' in cmds) == both_sides
    for name, (_, flags) in rev.items():
        assert flags[flags.index('--max_steps') + 1] == str(ablations.sizes(quick=False)['g_steps'])
        assert '--seed' not in flags and '--data' not in flags and '--batch_size' not in flags   # all the defaults
        fwd = flags[flags.index('--forward_ckpt') + 1]
        assert fwd.endswith(('F_noclip/forward.pt' if name == 'G_nonorm' else 'F_clip/forward.pt'))
    assert cmds['F_clip'][1] == [] and (not both_sides or cmds['F_noclip'][1][:2] == ['--norm_clip', '0'])
    rows = ablations.design(both_sides)[2]
    assert {r[3] for r in rows} <= set(cmds) | set(ablations.DERIVED)   # every row's model is trained or derived


def test_sample_key_and_command():
    assert ablations.sample_key('G_hidden', 2.0, 1, 1000) == 'G_hidden-w2-s1-n1000'
    assert ablations.sample_key('F_clip', 0.5, 0, 300, ramp=True) == 'F_clip-w0.5-ramp-s0-n300'
    cmd = ablations.sample_cmd('OUT/F_clip/forward.pt', 0.5, 0, 300, 'OUT/samples/x.npz', ramp=True)
    assert cmd[:2] == ['python', 'sample.py'] and '--ramp' in cmd and cmd[-1] == 'OUT/samples/x.png'
    json.dumps(cmd)


def test_denoise_none_and_score_train_identically():
    """The ablation trains one G for both rows (scripts/ablations.py, DERIVED): the two configs build the same
    parameters from the same seed and have the same loss; only decoding differs (F's Tweedie step)."""
    from model import reverse_loss
    f, _ = make_pair()
    gs = []
    for denoise in ('score', 'none'):
        torch.manual_seed(1)
        gs.append(ReverseModel(reverse_config_for(TINY, denoise=denoise)))
    for (n1, p1), (n2, p2) in zip(gs[0].named_parameters(), gs[1].named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    y, w, eps = torch.tensor([0, 1, -1, 2]), torch.tensor([0., 1., 0., 2.5]), torch.randn(4, 3, 8, 8)
    (l1, t1), (l2, t2) = (reverse_loss(g, f, x, y, w, eps) for g in gs)
    assert torch.equal(l1, l2) and t1.keys() == t2.keys()
    z = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    out_none = gs[1].decode(z, y[:2], torch.zeros(2))
    assert torch.allclose(gs[0].decode(z, y[:2], torch.zeros(2), forward_model=f), f.denoise(out_none, y[:2]))
