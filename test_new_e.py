"""
Tests of training at scale without its hazards: the FID reference computed once, per-rank perceptual crops that a
resume redraws, fp32 stage-2 targets under bf16, and non-finite steps skipped on the device. CPU only, no network.

    pytest test_new_e.py
"""
import copy
import functools
import json

import numpy as np
import pytest
import torch

import fid
import model as M
import train
from model import reverse_loss
from perceptual import PerceptualLoss, paired_random_resized_crop
import test_biflow
from test_biflow import QUICK, SMALL, TINY, _FakeInception, batch, fails, imgs, losses, make_pair, train_main

# test_biflow's fixtures: one thread for tiny ops, and a forward and a reverse checkpoint of a few steps
one_thread, trained = test_biflow.one_thread, test_biflow.trained


# ----------------------------------------------------------------------------------------------------------------------
# the FID monitor


def test_train_fid_reference_statistics_are_computed_once(trained, tmp_path, monkeypatch):
    """Rank 0 used to recompute the reference's features at every evaluation while the other ranks waited."""
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: _FakeInception())
    passes = []   # the inputs whose Inception features were computed (a stats .npz is only read)
    real = fid.input_statistics

    def counted(path, *a, **k):
        if fid.input_kind(path) != 'stats':
            passes.append(path)
        return real(path, *a, **k)
    monkeypatch.setattr(fid, 'input_statistics', counted)
    ref = tmp_path / 'ref.npz'
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    run = ['--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt', '--max_steps', 2, *QUICK, '--fid_every', 1,
           '--fid_samples', 12]
    train_main(*run, '--out_dir', tmp_path / 'a', '--fid_ref', ref)
    assert passes == [str(ref)]   # two evaluations, one pass over the reference
    rows = [json.loads(line) for line in open(tmp_path / 'a/reverse_log.jsonl')]
    a = [r for r in rows if 'fid' in r]
    assert [r['step'] for r in a] == [1, 2] and all(np.isfinite(r['fid']) and r['ref'] == str(ref) for r in a)
    stats = tmp_path / 'a/fid_ref_stats.npz'
    assert fid.input_kind(str(stats)) == 'stats'
    # a statistics file is used as it is: no pass over anything, no copy, the same numbers
    train_main(*run, '--out_dir', tmp_path / 'b', '--fid_ref', stats)
    assert passes == [str(ref)] and not (tmp_path / 'b/fid_ref_stats.npz').exists()
    b = [r for r in (json.loads(line) for line in open(tmp_path / 'b/reverse_log.jsonl')) if 'fid' in r]
    assert [r['fid'] for r in b] == pytest.approx([r['fid'] for r in a], rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# perceptual crops: per (seed, step, rank), independent of the global RNG


def test_perceptual_crops_differ_per_rank_and_repeat_per_step():
    x = imgs(6, 3, 40, 40)
    crop = lambda *key: paired_random_resized_crop(x, x, size=16, generator=train.crop_generator(*key))[0]
    r0 = crop(0, 5, 0)
    assert torch.equal(r0, crop(0, 5, 0))   # the same (seed, step, rank): the same boxes, whatever ran before
    assert not torch.allclose(r0, crop(0, 5, 1))   # another rank crops elsewhere (it used to draw the same boxes)
    assert not torch.allclose(r0, crop(0, 6, 0)) and not torch.allclose(r0, crop(1, 5, 0))


def test_reverse_loss_perceptual_terms_ignore_the_global_rng():
    f, g = make_pair()
    x, y, w, eps = batch()
    perceptual = PerceptualLoss.random(crop=32, **SMALL)
    out = []
    for s in (1, 2):
        torch.manual_seed(s)
        loss, terms = reverse_loss(g, f, x, y, w, eps, perceptual, generator=train.crop_generator(0, 3, 0))
        out.append((loss, terms['lpips'], terms['convnext']))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def perceptual_from_files(monkeypatch):
    """Stage 2's --lpips/--vgg/--convnext with small random networks: train.py loads 'files' and builds the loss as it
    does with the published weights (the construction draws from the global RNG, as the real one does)."""
    small = PerceptualLoss.random(crop=32, **SMALL)
    lp, cx = small.lpips.state_dict(), small.convnext.state_dict()
    files = {'vgg': {k: v for k, v in lp.items() if k.startswith('features.')},
             'lpips': {k: v for k, v in lp.items() if k.startswith('lin')}, 'convnext': cx}
    monkeypatch.setattr(train, 'load_weights', lambda path, flag: path and files[flag])
    monkeypatch.setattr(train, 'PerceptualLoss', functools.partial(PerceptualLoss, crop=32, **SMALL))
    return ['--lpips', 'l.pth', '--vgg', 'v.pth', '--convnext', 'c.pt']


def test_train_reverse_resume_with_perceptual_terms_is_exact(trained, tmp_path, monkeypatch):
    run = ['--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt', '--max_steps', 4, *QUICK,
           *perceptual_from_files(monkeypatch)]
    train_main(*run, '--out_dir', tmp_path / 'a')
    train_main(*run, '--out_dir', tmp_path / 'b', '--stop_at', 2)
    torch.manual_seed(123)   # whatever the global RNG holds, the resumed run draws what the straight one drew
    train_main('--resume', tmp_path / 'b/reverse.pt')
    a, b = losses(tmp_path / 'a/reverse_log.jsonl'), losses(tmp_path / 'b/reverse_log.jsonl')
    assert [r['step'] for r in b] == [1, 2, 3, 4] and {'lpips', 'convnext'} <= set(a[0])
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in ('img_per_s', 'ms_per_step'):
                assert ra[k] == rb[k], (k, ra, rb)
    ca, cb = (torch.load(tmp_path / f'{r}/reverse.pt', weights_only=True) for r in 'ab')
    for key in ('model', 'ema'):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])


# ----------------------------------------------------------------------------------------------------------------------
# stage-2 targets: F's trajectory in fp32 inside a bf16 autocast, unless --target_dtype bf16


def test_reverse_targets_are_fp32_under_bf16_autocast_unless_asked(monkeypatch):
    f, g = make_pair()
    x, y, w, eps = batch()
    _, _, exact = f(x + TINY.noise_std * eps, y)   # fp32, no autocast
    seen = []
    real = M.align_targets
    monkeypatch.setattr(M, 'align_targets', lambda G, traj, clean: seen.append(traj) or real(G, traj, clean))
    for fp32 in (True, False):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            reverse_loss(g, f, x, y, w, eps, fp32_targets=fp32)
    fp32_traj, bf16_traj = seen
    assert all(t.dtype == torch.float32 and torch.allclose(t, e, rtol=0, atol=1e-6) for t, e in zip(fp32_traj, exact))
    rel = max(((t.float() - e).norm() / e.norm()).item() for t, e in zip(bf16_traj[1:], exact[1:]))
    assert rel > 1e-4, rel   # bf16 really moves the states: the flag is what keeps them exact
    assert train.get_args([])[0].target_dtype == 'fp32'
    assert 'invalid choice' in fails(train_main, '--target_dtype', 'fp16')


# ----------------------------------------------------------------------------------------------------------------------
# non-finite steps: skipped on the device, counted on the device, checked at the log rows


def test_train_skipped_step_leaves_weights_ema_and_optimizer_bitwise_unchanged(tmp_path, monkeypatch):
    calls, real_loss = [], train.forward_loss

    def nan_at_step_2(*a, **k):   # the second step's loss is NaN, the others are fine
        calls.append(1)
        loss, nll, traj = real_loss(*a, **k)
        return (loss * float('nan') if len(calls) == 2 else loss), nll, traj
    monkeypatch.setattr(train, 'forward_loss', nan_at_step_2)
    steps, real_step = [], torch.optim.AdamW.step

    def recorded_step(self, *a, **k):   # the optimizer's state and weights around each step, and its skip flag
        snapshot = lambda: (copy.deepcopy(self.state_dict()['state']),
                            [p.detach().clone() for grp in self.param_groups for p in grp['params']])
        before = snapshot()
        out = real_step(self, *a, **k)
        steps.append((self.found_inf.item(), before, snapshot()))
        return out
    monkeypatch.setattr(torch.optim.AdamW, 'step', recorded_step)
    emas, real_ema = [], train.ema_update

    def recorded_ema(ema, model, decay, ok=None):
        before = [p.clone() for p in ema.parameters()]
        real_ema(ema, model, decay, ok)
        emas.append((before, [p.clone() for p in ema.parameters()]))
    monkeypatch.setattr(train, 'ema_update', recorded_ema)
    train_main('--out_dir', tmp_path, '--max_steps', 3, *QUICK)
    assert [s[0] for s in steps] == [0.0, 1.0, 0.0] and len(emas) == 3   # no host-side `if`: every step steps

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    for i, (flag, (state0, params0), (state1, params1)) in enumerate(steps):
        moments = lambda state: [v for s in state.values() for v in s.values()]   # exp_avg, exp_avg_sq, step
        assert same(params0, params1) == same(moments(state0), moments(state1)) == same(*emas[i]) == (i == 1), i
    assert [r['skipped'] for r in losses(tmp_path / 'forward_log.jsonl')] == [0, 1, 1]
    assert torch.load(tmp_path / 'forward.pt', weights_only=True)['step'] == 3


def test_train_divergence_is_checked_at_the_log_rows(tmp_path, monkeypatch):
    real = train.forward_loss
    monkeypatch.setattr(train, 'forward_loss', lambda *a, **k: (lambda r: (r[0] * float('nan'), *r[1:]))(real(*a, **k)))
    with pytest.raises(SystemExit, match='stopping at step 4: 4 non-finite steps in a row .--max_skips 2, checked at'):
        train_main('--out_dir', tmp_path, '--max_steps', 10, *QUICK, '--max_skips', 2, '--log_every', 4)
    assert not (tmp_path / 'forward.pt').exists() and not (tmp_path / 'forward_log.jsonl').exists()
