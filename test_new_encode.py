"""
Tests of data.py encode and latent sets: resume after a kill, mirror-image moments, the Loader over latents, two
ranks against one process, refused outputs, the recorded normalisation. CPU only, no network, a few seconds each.

    pytest test_new_encode.py
"""
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import (LATENT_NORMS, Digits, LatentDataset, Loader, build_dataset, encode, epoch_flips, epoch_permutation,
                  latent_norm)

HERE = os.path.dirname(os.path.abspath(__file__))
# 40 digits of 16 pixels in chunks of 8, batches of 4: 5 chunks of 2 batches, latents 4x2x2
SMALL = dict(img_size=16, batch_size=4, chunk=8, limit=40)
CLI = ['--img_size', '16', '--batch_size', '4', '--chunk', '8', '--limit', '40', '--workers', '0', '--device', 'cpu']


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one thread is fastest, and a busy machine cannot stall a second one. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StandInVAE:
    """vae.py's interface on a fixed random 8x8 convolution of stride 8: 4 latent channels, downsampling 8. Not
    mirror-symmetric, so the mirror image's latent differs from the mirrored latent. Counts its calls; with
    fail_after it raises on the call after that many, as a kill part-way through a run would stop it."""

    def __init__(self, seed=0, fail_after=None):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(8, 3, 8, 8, generator=g) / 8
        self.cfg = types.SimpleNamespace(latent_channels=4)
        self.fingerprint = f'standin{seed}'
        self.calls, self.fail_after = 0, fail_after

    def encode(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError('killed')
        z = F.conv2d(x, self.weight.to(x.device), stride=8)
        return z[:, :4], 0.05 + torch.sigmoid(z[:, 4:])


def run_encode(out, vae=None, **kw):
    vae = StandInVAE() if vae is None else vae
    encode('digits', str(out), vae, **{**SMALL, 'vae_name': 'standin.pt', **kw})
    return vae


def files(out):
    """{name: bytes} of a folder's files."""
    return {f: open(os.path.join(out, f), 'rb').read() for f in sorted(os.listdir(out))}


def pixels(i):
    """Digit i as the encoder sees it: float (1, 3, 16, 16) in [-1, 1]."""
    return Digits(16)[i][0][None].float() / 127.5 - 1


def cli(*args):
    """data.py's command line in this process, with the stand-in VAE as vae.load_vae; (SystemExit/None, stderr)."""
    fake = types.ModuleType('vae')
    fake.load_vae = lambda path, device: StandInVAE()
    err, saved = io.StringIO(), sys.modules.get('vae')
    sys.modules['vae'] = fake
    try:
        with contextlib.redirect_stderr(err):
            data.main([str(a) for a in args])
    finally:
        if saved is None:
            del sys.modules['vae']
        else:
            sys.modules['vae'] = saved


def test_encode_writes_the_documented_set(tmp_path):
    vae = run_encode(tmp_path / 'a')
    assert vae.calls == 1 + 2 * 10   # one blank image for the latent shape, then each batch and its mirror images
    assert sorted(os.listdir(tmp_path / 'a')) == ['labels.npy', 'latents.npy', 'meta.json']   # bookkeeping gone
    meta = json.load(open(tmp_path / 'a' / 'meta.json'))
    assert meta == {'format': 'latents', 'version': 1, 'n': 40, 'img_size': 16, 'latent_shape': [4, 2, 2],
                    'num_classes': 10, 'source': 'digits', 'split': 'train',
                    'vae': {'name': 'standin.pt', 'fingerprint': 'standin0'},
                    'norm': {'kind': 'channel', 'mean': LATENT_NORMS['channel'][0], 'std': LATENT_NORMS['channel'][1]},
                    'unreadable': 0}
    lat, lab = np.load(tmp_path / 'a' / 'latents.npy'), np.load(tmp_path / 'a' / 'labels.npy')
    assert lat.dtype == np.float32 and lat.shape == (40, 2, 2, 4, 2, 2)
    assert lab.dtype == np.int64 and lab.tolist() == Digits(16).targets[:40].tolist()
    ds = build_dataset(str(tmp_path / 'a'), 16)
    assert isinstance(ds, LatentDataset) and len(ds) == 40 and ds.num_classes == 10 and ds.meta == meta


def test_encode_resumes_after_a_kill_without_redoing_finished_chunks(tmp_path):
    run_encode(tmp_path / 'straight')
    # killed in the second batch of chunk 1: the probe, chunk 0's 2 batches (4 calls), chunk 1's first batch (2)
    with pytest.raises(RuntimeError, match='killed'):
        run_encode(tmp_path / 'killed', StandInVAE(fail_after=7))
    assert os.listdir(tmp_path / 'killed' / 'done') == ['000000.json']   # chunk 0 only
    assert not (tmp_path / 'killed' / 'meta.json').exists()
    with pytest.raises(ValueError, match='did not finish.*rerun the same'):
        build_dataset(str(tmp_path / 'killed'), 16)
    (tmp_path / 'killed' / 'latents.npy.tmp999').write_bytes(b'')   # what a SIGKILL in an atomic write leaves
    (tmp_path / 'killed' / 'done' / '000001.json.x1y2.tmp').write_bytes(b'{"chunk": 1')
    resumed = run_encode(tmp_path / 'killed')
    assert resumed.calls == 1 + 2 * 8   # chunks 1 to 4 only: chunk 0 was not encoded again
    assert files(tmp_path / 'killed') == files(tmp_path / 'straight')


def test_encode_image_folders_and_arrays_with_an_unreadable_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for k in range(10):
        os.makedirs(tmp_path / 'src' / f'c{k % 2}', exist_ok=True)
        img = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / 'src' / f'c{k % 2}' / f'{k}.png')
    (tmp_path / 'src' / 'c0' / '3_broken.png').write_bytes(b'not a png')   # sorted between 2.png and 4.png
    # decoded in a worker process (its warning goes to that process's stderr), counted all the same
    encode(str(tmp_path / 'src'), str(tmp_path / 'a'), StandInVAE(), 16, batch_size=4, chunk=4, workers=1)
    msg = capsys.readouterr().out
    assert '1 unreadable' in msg and '3_broken.png' in msg
    ds = LatentDataset(str(tmp_path / 'a'))
    assert len(ds) == 11 and ds.num_classes == 2 and ds.meta['unreadable'] == 1
    assert ds.targets.tolist() == [0] * 6 + [1] * 5
    assert torch.equal(ds.item(2, True)[0], ds.item(3, True)[0])   # c0/3_broken.png: the next readable file's
    with pytest.warns(UserWarning, match='3_broken'):   # a packed array serves the same images, so the same latents
        data.pack(str(tmp_path / 'src'), str(tmp_path / 'p.npy'), 16)
    encode(str(tmp_path / 'p.npy'), str(tmp_path / 'b'), StandInVAE(), 16, batch_size=4, chunk=4)
    assert files(tmp_path / 'b')['latents.npy'] == files(tmp_path / 'a')['latents.npy']
    assert files(tmp_path / 'b')['labels.npy'] == files(tmp_path / 'a')['labels.npy']


def test_encode_mirror_moments_are_the_mirror_images_posterior(tmp_path):
    vae = run_encode(tmp_path / 'a')
    ds = LatentDataset(str(tmp_path / 'a'))
    for i in [0, 9, 39]:
        x = pixels(i)
        (m, s), (fm, fs) = vae.encode(x), vae.encode(x.flip(-1))
        item, flipped = ds.item(i, False)[0], ds.item(i, True)[0]
        assert item.dtype == torch.float32 and item.shape == (2, 4, 2, 2) and ds.item(i, True)[1] == ds.targets[i]
        assert torch.allclose(item, torch.cat([m, s]), atol=1e-6) and torch.equal(ds[i][0], item)
        assert torch.allclose(flipped, torch.cat([fm, fs]), atol=1e-6)
        assert (flipped[0] - m[0].flip(-1)).abs().max() > 0.1   # not the mirrored latent
        assert (s > 0).all() and (fs > 0).all()


def test_loader_serves_latent_moments_and_the_mirror_images_when_flipping(tmp_path):
    run_encode(tmp_path / 'a')
    ds = LatentDataset(str(tmp_path / 'a'))
    flips = epoch_flips(40, 3, 0)
    assert 0 < int(flips.sum()) < 40
    for workers in (0, 1):   # a worker gets the dataset pickled: the memory map is reopened, not copied
        L = Loader(ds, 8, seed=3, flip=True, num_workers=workers)
        for s in range(5):
            x, y = next(L)
            idx = epoch_permutation(40, 3, 0)[s * 8:(s + 1) * 8]
            assert x.dtype == torch.float32 and x.shape == (8, 2, 4, 2, 2) and y.dtype == torch.int64
            assert torch.equal(x, torch.stack([ds.item(i, bool(flips[i]))[0] for i in idx.tolist()]))
            assert torch.equal(y, torch.from_numpy(ds.targets[idx.numpy()]))
    back = pickle.loads(pickle.dumps(ds))
    assert back._arr is None and torch.equal(back.item(5, True)[0], ds.item(5, True)[0])
    x, _ = next(Loader(ds, 8, seed=3))   # no flip: the images' own moments
    assert torch.equal(x, torch.stack([ds[i][0] for i in epoch_permutation(40, 3, 0)[:8].tolist()]))


def test_encode_two_ranks_write_the_same_bytes_as_one_process(tmp_path):
    cli('encode', 'digits', tmp_path / 'one', '--vae', 'w/standin.pt', *CLI)
    driver = tmp_path / 'driver.py'   # data.py's command line with the stand-in as vae.load_vae
    driver.write_text(f"import sys, types\nsys.path.insert(0, {HERE!r})\nimport data, test_new_encode as t\n"
                      "sys.modules['vae'] = types.SimpleNamespace(load_vae=lambda path, device: t.StandInVAE())\n"
                      "data.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29531',
                        str(driver), 'encode', 'digits', str(tmp_path / 'two'), '--vae', 'w/standin.pt', *CLI],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'encoded (rank 0 of 2)' in r.stdout and '5 to do by 2 rank(s)' in r.stdout
    assert files(tmp_path / 'two') == files(tmp_path / 'one')


def test_encode_refuses_a_complete_set_unless_overwrite(tmp_path):
    out = tmp_path / 'a'
    cli('encode', 'digits', out, '--vae', 'w/standin.pt', *CLI)
    before = {f: (os.stat(out / f).st_mtime_ns, b) for f, b in files(out).items()}
    with pytest.raises(FileExistsError, match=f'{out}.*complete.*pass --overwrite'):
        cli('encode', 'digits', out, '--vae', 'w/standin.pt', *CLI)
    assert {f: (os.stat(out / f).st_mtime_ns, b) for f, b in files(out).items()} == before   # nothing touched
    cli('encode', 'digits', out, '--vae', 'w/standin.pt', *CLI, '--overwrite', '--norm', 'sd')
    assert json.load(open(out / 'meta.json'))['norm']['kind'] == 'sd'
    assert files(out)['latents.npy'] == before['latents.npy'][1]


def test_encode_refuses_an_unfinished_set_made_with_other_settings(tmp_path):
    out = tmp_path / 'a'
    with pytest.raises(RuntimeError, match='killed'):
        run_encode(out, StandInVAE(fail_after=7))
    before = files(out / 'done')
    for kw, what in [(dict(img_size=24), 'img_size 16.*img_size 24.*--img_size'), (dict(limit=32), 'n 40.*n 32'),
                     (dict(vae=StandInVAE(seed=1)), "vae_fingerprint 'standin0'.*'standin1'.*--vae"),
                     (dict(chunk=16), 'chunk 8.*chunk 16.*--chunk'), (dict(split='val'), "split 'train'.*'val'")]:
        with pytest.raises(ValueError, match=f'{out}.*unfinished.*{what}.*--overwrite'):
            run_encode(out, **kw)
    assert files(out / 'done') == before
    run_encode(out, vae=StandInVAE(seed=1), overwrite=True)   # --overwrite starts over with the new settings
    assert json.load(open(out / 'meta.json'))['vae']['fingerprint'] == 'standin1'


def test_encode_bad_inputs_fail_clearly(tmp_path):
    for size in ('100', '0'):
        with pytest.raises(SystemExit):
            cli('encode', 'digits', tmp_path / 'a', '--vae', 'w', '--img_size', size)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        data.main(['encode', 'digits', str(tmp_path / 'a'), '--vae', 'w', '--img_size', '100'])
    assert '--img_size 100: must be a positive multiple of 8' in err.getvalue()
    assert not (tmp_path / 'a').exists()
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('not a latent set')
    with pytest.raises(ValueError, match="mine.*'notes.txt'.*new or empty folder"):
        run_encode(tmp_path / 'mine')
    with pytest.raises(ValueError, match="SRC 'cifar'"):
        encode('cifar', str(tmp_path / 'b'), StandInVAE(), 16)
    with pytest.raises(ValueError, match='--norm channel.*3.*--norm compute'):
        three = StandInVAE()
        three.weight = three.weight[:6]
        three.encode = lambda x: (F.conv2d(x, three.weight, stride=8)[:, :3], torch.ones(len(x), 3, 2, 2))
        run_encode(tmp_path / 'c', three)
    with pytest.raises(FileNotFoundError, match='no meta.json'):
        LatentDataset(str(tmp_path))


def test_encode_records_each_normalisation(tmp_path):
    for kind in ('channel', 'sd', 'compute'):
        run_encode(tmp_path / kind, norm=kind)
    meta = {k: json.load(open(tmp_path / k / 'meta.json')) for k in ('channel', 'sd', 'compute')}
    assert meta['channel']['norm']['mean'] == [0.86488, -0.27787343, 0.21616915, 0.3738409]
    assert meta['channel']['norm']['std'] == [4.85503674, 5.31922414, 3.93725398, 3.9870003]
    assert meta['sd']['norm'] == {'kind': 'sd', 'mean': [0.0] * 4, 'std': [1 / 0.18215] * 4}
    lat = np.load(tmp_path / 'compute' / 'latents.npy').astype(np.float64)   # (N, 2, 2, C, h, w)
    mean, std = lat[:, :, 0], lat[:, :, 1]
    mu = mean.mean((0, 1, 3, 4))   # posterior samples mean + std * eps over images and mirror images
    var = (mean ** 2).mean((0, 1, 3, 4)) + (std ** 2).mean((0, 1, 3, 4)) - mu ** 2
    assert np.allclose(meta['compute']['norm']['mean'], mu, rtol=1e-9, atol=1e-12)
    assert np.allclose(meta['compute']['norm']['std'], np.sqrt(var), rtol=1e-9)
    m, s = latent_norm(meta['compute'])
    assert m.dtype == s.dtype == torch.float32 and m.shape == s.shape == (4,)
    # the normalised samples of this set: about zero mean and unit variance per channel
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(lat[:, :, 0] + lat[:, :, 1] * torch.randn(lat[:, :, 0].shape, generator=g,
                                                                   dtype=torch.float64).numpy())
    z = (x.float() - m[:, None, None]) / s[:, None, None]
    assert z.mean((0, 1, 3, 4)).abs().max() < 0.2 and ((z.var((0, 1, 3, 4)) - 1).abs() < 0.2).all()


def test_encode_with_the_real_tiny_vae(tmp_path):
    vae_mod = pytest.importorskip('vae')
    torch.manual_seed(0)
    net = vae_mod.VAE(vae_mod.VAEConfig(block_out_channels=(32, 32), layers_per_block=1))
    torch.save(net.state_dict(), tmp_path / 'tiny_vae.pt')
    vae = vae_mod.load_vae(str(tmp_path / 'tiny_vae.pt'), torch.device('cpu'))
    data.main(['encode', 'digits', str(tmp_path / 'a'), '--vae', str(tmp_path / 'tiny_vae.pt'), '--img_size', '16',
               '--limit', '12', '--batch_size', '4', '--chunk', '8', '--workers', '0', '--device', 'cpu',
               '--norm', 'compute'])
    ds = LatentDataset(str(tmp_path / 'a'))
    C = vae.cfg.latent_channels
    assert ds.meta['vae'] == {'name': 'tiny_vae.pt', 'fingerprint': vae.fingerprint}
    assert ds.latent_shape == (C, 8, 8)   # two blocks downsample by 2: the shape comes from the VAE, not a constant
    with torch.no_grad():
        for i in (0, 11):
            x = pixels(i)
            (m, s), (fm, fs) = vae.encode(x), vae.encode(x.flip(-1))
            assert torch.allclose(ds.item(i, False)[0], torch.cat([m, s]), atol=1e-5)
            assert torch.allclose(ds.item(i, True)[0], torch.cat([fm, fs]), atol=1e-5)
