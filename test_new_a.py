"""Issue 8 (part a): FID never negative and only of covariances, sample.py's outputs, sigma of ml-tarflow dicts, bad numbers.

    OMP_NUM_THREADS=1 python -m pytest -q test_new_a.py
"""
import warnings

import numpy as np
import pytest

import fid
from test_biflow import _FakeInception, _images, _spd, fails


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
