import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fid
import model
import sample
import train
from model import PAPER_MODELS, PRESETS, FlowConfig, ReverseModel, TarFlow, reverse_config_for, reverse_loss
from perceptual import PerceptualLoss
from vae import VAE, VAEConfig

from test_biflow import QUICK, SMALL, _FakeInception, fails, perceptual_from_files, sample_main, train_main   # noqa


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_latent_presets_have_the_papers_parameter_counts():
    """iTARFlow-B/2 and XL/2 (stage 1) and BiFlow-B/2 (stage 2, against each) within 10% of the counts the paper
    reports, on 4 x 32 x 32 latents in 256 tokens; counted on the meta device (nothing allocated)."""
    with torch.device('meta'):
        for (stage, preset), (name, paper) in PAPER_MODELS.items():
            f = PRESETS['itarflow-b2' if stage == 'reverse' and preset == 'biflow-b2' else preset]
            assert (f.in_channels, f.img_size, f.num_tokens, f.token_dim) == (4, 32, 256, 16)
            m = TarFlow(f) if stage == 'forward' else ReverseModel(reverse_config_for(f, preset))
            n = sum(p.numel() for p in m.parameters())
            assert abs(n / paper - 1) < 0.10, (stage, preset, name, n, paper)


def test_posterior_sample_is_normalised_and_the_same_for_any_world_size():
    """mu + s*eps, normalised per channel; ranks slice one global draw, so 2 ranks see what 1 process sees."""
    args = argparse.Namespace(batch_size=6, seed=3)
    g = torch.Generator().manual_seed(0)
    moments = torch.stack([torch.randn(6, 4, 2, 2, generator=g), torch.rand(6, 4, 2, 2, generator=g)], 1)
    mean, std = torch.tensor([1., -1., 0., 2.]), torch.tensor([2., 4., 1., 0.5])
    one = train.posterior_sample(args, 7, moments, mean, std, 0, 1)
    two = torch.cat([train.posterior_sample(args, 7, moments[r * 3:(r + 1) * 3], mean, std, r, 2) for r in range(2)])
    assert torch.equal(one, two) and one.shape == (6, 4, 2, 2)
    eps = (one * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1) - moments[:, 0]) / moments[:, 1]
    assert torch.allclose(eps, torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(3 * 1_000_003 + 7 +
                                                                                               2 ** 40)), atol=1e-4)
    assert not torch.equal(one, train.posterior_sample(args, 8, moments, mean, std, 0, 1))   # a new draw each step


TINY_VAE = VAEConfig(block_out_channels=(32, 32), layers_per_block=1)   # factor 2: 16 px -> 4 x 8 x 8
LATENT = {'img_size': 16, 'latent_shape': [4, 8, 8], 'vae': {'name': 'tiny.pt', 'fingerprint': None},
          'norm': {'kind': 'channel', 'mean': [0.5, -0.5, 0.0, 1.0], 'std': [2.0, 1.0, 0.5, 3.0]}}


def test_perceptual_terms_see_decoded_latents_and_train_g_only():
    """BiFlow's stage-2 recipe in latent space: LPIPS/ConvNeXt on Dec(G's output) vs Dec(clean latent). The VAE is
    frozen (no gradient), G gets one, and the terms equal those computed on the decoded images directly."""
    torch.manual_seed(0)
    vae = VAE(TINY_VAE)
    dec = sample.LatentDecoder(vae, LATENT)
    fcfg = FlowConfig(img_size=8, in_channels=4, patch_size=2, channels=32, num_blocks=2, layers_per_block=1,
                      head_dim=16, num_classes=3, noise_std=0.3)
    F = TarFlow(fcfg).requires_grad_(False)
    G = ReverseModel(reverse_config_for(fcfg, 'cpu', channels=32, head_dim=16))
    for p in G.final.parameters():   # the zero-initialised output layer would give G no gradient below it
        torch.nn.init.normal_(p, std=0.02)
    perc = PerceptualLoss.random(crop=32, **SMALL)
    perc.decode = dec
    x, y, w = torch.randn(2, 4, 8, 8), torch.tensor([0, 2]), torch.zeros(2)
    eps = torch.randn_like(x)
    loss, terms = reverse_loss(G, F, x, y, w, eps, perc, {'lpips': 1.0, 'convnext': 1.0},
                               generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert {'lpips', 'convnext'} <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    assert all(p.grad is None for p in vae.parameters())
    assert G.final.weight.grad.abs().sum() > 0
    # the same numbers as the perceptual loss on the decoded images, with the same crop boxes
    out = model.unpatchify(G(F(x + 0.3 * eps, y)[2][-1], y, w)[-1].detach(), 2, 8)
    perc.decode = None
    with torch.no_grad():
        direct = perc(dec(out), dec(x), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(direct['lpips'].mean(), terms['lpips'], rtol=1e-4, atol=1e-6)


def test_latent_path_end_to_end(tmp_path, monkeypatch):
    """The BiFlow setting at toy size with a tiny random VAE: encode digits, train both stages (stage 2 with the
    perceptual terms through the decoder, both with the FID monitor on decoded samples), sample both stages to
    decoded images with FID; and the refusals: no --vae, another VAE, latents of the wrong shape, pixels for a latent
    preset."""
    torch.manual_seed(0)
    vae_file, other_vae = tmp_path / 'tiny_vae.pt', tmp_path / 'other_vae.pt'
    torch.save(VAE(TINY_VAE).state_dict(), vae_file)
    torch.save(VAE(TINY_VAE).state_dict(), other_vae)   # same architecture, other weights
    lat = tmp_path / 'lat'
    data.main(['encode', 'digits', str(lat), '--vae', str(vae_file), '--img_size', '16', '--limit', '48',
               '--batch_size', '16', '--workers', '0'])
    meta = json.load(open(lat / 'meta.json'))
    assert meta['latent_shape'] == [4, 8, 8] and meta['img_size'] == 16
    monkeypatch.setitem(model.PRESETS, 'tinylat', FlowConfig(img_size=8, in_channels=4, patch_size=2, channels=32,
                                                             num_blocks=2, layers_per_block=1, head_dim=16,
                                                             num_classes=10, noise_std=0.3, norm_clip=4.0))
    monkeypatch.setitem(model.REVERSE_PRESETS, 'tinylat', dict(channels=32, layers_per_block=1, denoise_layers=1,
                                                               head_dim=16))
    monkeypatch.setitem(train.TRAIN_PRESETS, 'tinylat', dict(train.TRAIN_PRESETS['cpu'], perceptual_every=2))
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: _FakeInception())
    ref = tmp_path / 'ref_stats.npz'
    imgs = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    fid.save_stats(ref, *fid.compute_statistics(fid._array_batches(imgs, 8), _FakeInception())[:2], 20)
    run = tmp_path / 'run'
    common = ['--data', lat, '--vae', vae_file, '--preset', 'tinylat', '--out_dir', run, '--max_steps', 3, *QUICK,
              '--fid_ref', ref, '--fid_every', 3, '--fid_samples', 6]
    train_main(*common)
    train_main('--stage', 'reverse', '--forward_ckpt', run / 'forward.pt', *common, *perceptual_from_files(monkeypatch))
    for stage in ('forward', 'reverse'):
        ck = torch.load(run / f'{stage}.pt', weights_only=True)
        assert ck['latent'] == {k: meta[k] for k in ('img_size', 'latent_shape', 'vae', 'norm')}
        rows = [json.loads(line) for line in open(run / f'{stage}_log.jsonl')]
        assert all(np.isfinite(r['loss']) for r in rows if 'loss' in r) and any('fid' in r for r in rows)
        assert Image.open(run / f'{stage}_samples.png').size == (10 * 66 + 2, 10 * 66 + 2)   # decoded 16 px, shown 4x
    assert {'lpips', 'convnext'} <= set(rows[0])   # stage 2's perceptual terms, through the decoder
    for stage in ('forward', 'reverse'):
        sample_main('--ckpt', run / f'{stage}.pt', '--vae', vae_file, '--num_samples', 4, '--batch_size', 3,
                    '--npz', tmp_path / f'{stage}.npz', '--out', tmp_path / f'{stage}.png', '--fid', ref)
        out = np.load(tmp_path / f'{stage}.npz')
        assert out['arr_0'].shape == (4, 16, 16, 3) and out['arr_0'].dtype == np.uint8
    # refusals, each naming the flag or file
    ck = run / 'reverse.pt'
    assert '--vae' in fails(sample_main, '--ckpt', ck, '--out', tmp_path / 'x.png')
    assert 'fingerprint' in fails(sample_main, '--ckpt', ck, '--vae', other_vae, '--out', tmp_path / 'x.png')
    other = ['--out_dir', tmp_path / 'other', '--max_steps', 1, *QUICK]
    assert 'holds latents of shape (4, 8, 8)' in fails(train_main, '--data', lat, '--vae', vae_file, *other)
    assert 'data.py encode' in fails(train_main, '--preset', 'tinylat', *other)
    assert '--vae' in fails(train_main, '--data', lat, '--preset', 'tinylat', *other)
    assert 'fingerprint' in fails(train_main, '--data', lat, '--vae', other_vae, '--preset', 'tinylat', *other)
