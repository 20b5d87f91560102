"""Issue 8 (part a): FID never negative and only of covariances, sample.py's outputs, sigma of ml-tarflow dicts, bad numbers.

    OMP_NUM_THREADS=1 python -m pytest -q test_new_a.py
"""
import os
import warnings

import numpy as np
import pytest
import torch

import fid
import sample
from model import load_ml_tarflow
from test_biflow import HERE, _FakeInception, _images, _spd, fails, sample_main


def tiny_state_dict():
    """Apple's ml-tarflow state dict of the test data: 8x8 RGB, patch 2 (token dim 12), width 64, 2 flows, 3 classes."""
    return torch.load(os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt'), weights_only=True)['state_dict']


def printed_fid(out):
    """The number after 'FID ' in fid.py's output."""
    return float(out.split('FID ')[1].split()[0])


# ----------------------------------------------------------------------------------------------------------------------
# 1. FID is never negative


def test_fid_is_never_negative(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for n in (200, 40):  # full rank and singular: a set against itself is 0 up to round-off, never below
        mu, s = rng.standard_normal(64), _spd(64, n, n)
        assert fid.frechet_distance(mu, s, mu, s) >= 0
    # a covariance with a round-off-sized negative eigenvalue (accepted, see below) made the unclamped formula
    # -2e-7 here, far from the last digits, printed 'FID -0.0000'
    s = np.diag([1.0, 1.0, -1e-7])
    assert 0 <= fid.frechet_distance(np.zeros(3), s, np.zeros(3), s) < 1e-6
    fid.save_stats(tmp_path / 'a.npz', np.zeros(3), s, 40)
    fid.main([str(tmp_path / 'a.npz'), str(tmp_path / 'a.npz')])
    out = capsys.readouterr().out
    assert '-0.0000' not in out and 0 <= printed_fid(out) < 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# 2. Only covariances; a warning when the sample counts differ


def test_fid_rejects_a_covariance_that_is_not_positive_semi_definite(tmp_path):
    with pytest.raises(ValueError, match='first statistics: sigma is not positive semi-definite.*smallest eigenvalue -1'):
        fid.frechet_distance(np.zeros(4), -np.eye(4), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='second statistics: sigma is not positive semi-definite.*smallest eigenvalue -2'):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -2.0]))
    # round-off-sized negative eigenvalues (relative 1e-9) are tolerated: the distance is that of diag(1, 0)
    assert fid.frechet_distance(np.zeros(2), np.diag([1.0, -1e-9]), np.zeros(2), np.diag([4.0, 0.0])) == \
        pytest.approx(1.0, abs=1e-6)
    # through the CLI, the error names the file
    fid.save_stats(tmp_path / 'good.npz', np.zeros(4), np.eye(4), 40)
    fid.save_stats(tmp_path / 'bad.npz', np.zeros(4), -np.eye(4), 40)
    msg = fails(fid.main, [str(tmp_path / 'good.npz'), str(tmp_path / 'bad.npz')])
    assert 'bad.npz: sigma is not positive semi-definite' in msg and 'smallest eigenvalue -1' in msg


def test_fid_rejects_stats_files_that_are_not_covariances(tmp_path):
    p = lambda name: str(tmp_path / name)
    np.savez(p('asym.npz'), mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r'asym.npz: sigma is not symmetric \(max \|sigma - sigma\^T\| = 0.5\)'):
        fid.load_stats(p('asym.npz'))
    with pytest.raises(ValueError, match='second statistics: sigma is not symmetric'):  # the API checks it too
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    np.savez(p('nan.npz'), mu=np.zeros(2), sigma=np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r'nan.npz: mu must be \(D,\) and sigma \(D,D\), finite'):
        fid.load_stats(p('nan.npz'))
    np.savez(p('shape.npz'), mu=np.zeros(2), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r'shape.npz: mu must be \(D,\) and sigma \(D,D\), finite; got \(2,\) and \(3, 3\)'):
        fid.load_stats(p('shape.npz'))


def test_fid_warns_when_the_sample_counts_differ(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)
    fid.save_stats(tmp_path / 'a40.npz', mu, sigma, 40)
    fid.save_stats(tmp_path / 'b50.npz', mu, sigma, 50)
    fid.save_stats(tmp_path / 'c40.npz', mu, sigma, 40)
    fid.save_stats(tmp_path / 'adm.npz', mu, sigma)  # reference statistics without a count: nothing to compare
    with pytest.warns(UserWarning, match=r'40 images .*a40.npz.* with 50 .*b50.npz.*biased by the sample count'):
        fid.main([str(tmp_path / 'a40.npz'), str(tmp_path / 'b50.npz')])
    np.savez(tmp_path / 'ref30.npz', arr_0=_images(30, seed=1))
    with pytest.warns(UserWarning, match=r'40 images \(samples\) with 30'):
        r = fid.fid_from_samples(_images(40), str(tmp_path / 'ref30.npz'), inception=_FakeInception())
    assert r['fid'] > 0  # a warning, not a failure
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fid.main([str(tmp_path / 'a40.npz'), str(tmp_path / 'c40.npz')])
        fid.main([str(tmp_path / 'a40.npz'), str(tmp_path / 'adm.npz')])


# ----------------------------------------------------------------------------------------------------------------------
# 3. sample.py checks its output paths first and writes the .npz before the grid


def test_sample_checks_output_paths_before_loading_or_sampling(tmp_path, monkeypatch):
    torch.save(tiny_state_dict(), tmp_path / 'tiny.pth')
    monkeypatch.setattr(sample, 'load_models', lambda *a, **k: pytest.fail('loaded before checking the outputs'))
    monkeypatch.setattr(sample, 'sample_shard', lambda *a, **k: pytest.fail('sampled before checking the outputs'))
    base = ['--ckpt', tmp_path / 'tiny.pth', '--noise_std', 0.05, '--num_samples', 3]
    msg = fails(sample_main, *base, '--out', tmp_path / 'g.png', '--npz', tmp_path / 'nope' / 's.npz')
    assert '--npz' in msg and 'nope' in msg
    msg = fails(sample_main, *base, '--out', tmp_path / 'nope' / 'g.png')
    assert '--out' in msg and 'nope' in msg
    msg = fails(sample_main, *base, '--out', tmp_path)  # a folder
    assert '--out' in msg and 'is a folder' in msg


def test_sample_writes_the_npz_before_the_grid(tmp_path, monkeypatch):
    torch.save(tiny_state_dict(), tmp_path / 'tiny.pth')

    def unwritable(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(sample, 'save_grid', unwritable)  # --out breaks after the check, at the very end
    with pytest.raises(OSError, match='disk full'):
        sample_main('--ckpt', tmp_path / 'tiny.pth', '--noise_std', 0.05, '--num_samples', 3, '--labels', '1',
                    '--npz', tmp_path / 's.npz', '--out', tmp_path / 'g.png')
    s = np.load(tmp_path / 's.npz')  # the samples survive
    assert s['arr_0'].shape == (3, 8, 8, 3) and list(s['arr_1']) == [1, 1, 1]


# ----------------------------------------------------------------------------------------------------------------------
# 4. The sigma of ml-tarflow state dicts: from --noise_std or Apple's file names, never a silent default


def test_sample_ml_tarflow_sigma_from_file_name_or_noise_std(tmp_path, capsys):
    sd = tiny_state_dict()
    for name, sigma in [('afhq_model_8_768_8_8_0.07.pth', 0.07), ('imagenet_model_4_1024_8_8_0.15.pth', 0.15)]:
        torch.save(sd, tmp_path / name)
        model, _ = sample.load_models(str(tmp_path / name))
        assert model.cfg.noise_std == pytest.approx(sigma)
        assert f'sigma = {sigma} (from the file name)' in capsys.readouterr().out
    # both given and different: --noise_std wins, with a note
    model, _ = sample.load_models(str(tmp_path / 'afhq_model_8_768_8_8_0.07.pth'), noise_std=0.1)
    out = capsys.readouterr().out
    assert model.cfg.noise_std == pytest.approx(0.1)
    assert 'note: --noise_std 0.1 overrides the sigma 0.07' in out and 'sigma = 0.1 (from --noise_std)' in out
    # no sigma anywhere: an error that says what to pass, not 0.05
    torch.save(sd, tmp_path / 'tiny.pth')
    assert '--noise_std' in fails(sample.load_models, str(tmp_path / 'tiny.pth'))
    msg = fails(sample_main, '--ckpt', tmp_path / 'tiny.pth', '--num_samples', 2, '--out', tmp_path / 'g.png')
    assert '--ckpt' in msg and 'tiny.pth' in msg and '--noise_std' in msg
    sample_main('--ckpt', tmp_path / 'tiny.pth', '--noise_std', 0.05, '--num_samples', 2, '--out', tmp_path / 'g.png')
    assert 'sigma = 0.05 (from --noise_std)' in capsys.readouterr().out
    with pytest.raises(TypeError, match='noise_std'):  # the library call has no default either
        load_ml_tarflow(sd)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Bad numbers and damaged state dicts: one-line errors that name the flag or the tensor


@pytest.mark.parametrize('args,flag,allowed', [
    (['--batch_size', 0], '--batch_size', '>= 1'), (['--batch_size', -1], '--batch_size', '>= 1'),
    (['--num_samples', 0], '--num_samples', '>= 1'), (['--num_samples', -3], '--num_samples', '>= 1'),
    (['--labels', 'a,b'], '--labels', 'integer'), (['--labels', '1,,2'], '--labels', 'integer')])
def test_sample_bad_numbers_are_argparse_errors(tmp_path, args, flag, allowed):
    torch.save(tiny_state_dict(), tmp_path / 'tiny.pth')
    msg = fails(sample_main, '--ckpt', tmp_path / 'tiny.pth', '--noise_std', 0.05, '--out', tmp_path / 'g.png', *args)
    assert f'error: {flag} {args[1]}: ' in msg and allowed in msg, msg


def test_ml_tarflow_import_names_the_damaged_tensor(tmp_path):
    sd = tiny_state_dict()
    w = sd['blocks.0.proj_out.weight']  # (2 x 12, 64)

    def load(**changed):
        return load_ml_tarflow({**sd, **{k.replace('__', '.'): v for k, v in changed.items()}}, noise_std=0.05)
    for bad, shape in [(w[:-1], '(23, 64)'), (w.T, '(64, 24)')]:  # truncated, transposed: damaged, not VP
        with pytest.raises(ValueError, match='proj_out') as e:
            load(blocks__0__proj_out__weight=bad)
        assert f'blocks.0.proj_out.weight has shape {shape}, expected (24, 64)' in str(e.value)
        assert 'VP' not in str(e.value)
    with pytest.raises(ValueError, match='VP models'):  # exactly d rows: the mean only, as ml-tarflow's VP models
        load(blocks__0__proj_out__weight=w[:12])
    with pytest.raises(ValueError, match=r'blocks.0.proj_out.weight has shape \(1536,\), expected a matrix'):
        load(blocks__0__proj_out__weight=w.flatten())
    with pytest.raises(ValueError, match=r'blocks.1.proj_out.weight.*\[23, 64\]'):  # another block: PyTorch's list
        load(blocks__1__proj_out__weight=sd['blocks.1.proj_out.weight'][:-1])
    # sample.py names the flag and the file too
    torch.save({**sd, 'blocks.0.proj_out.weight': w[:-1]}, tmp_path / 'cut_0.05.pth')
    msg = fails(sample_main, '--ckpt', tmp_path / 'cut_0.05.pth', '--out', tmp_path / 'g.png')
    assert '--ckpt' in msg and 'cut_0.05.pth' in msg and 'blocks.0.proj_out.weight has shape (23, 64)' in msg
