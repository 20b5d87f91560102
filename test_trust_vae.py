"""
Tests that the latent setting can be trusted: the VAE fingerprint covers the config as well as the
weights (files of older versions, which recorded the weights alone, still load where that can be
trusted), config.json is checked field by field, and three results are pinned to their definitions:
the latent decoder (with the normalisation from encode to training), LPIPS against the `lpips`
package, and the fingerprint's sensitivity. CPU, no network, lpips not needed.

    pytest test_trust_vae.py
"""
import json
import math
import os

import pytest
import torch

import model
import sample
import train
import vae as vae_mod
from data import LatentDataset, encode, latent_norm
from model import FlowConfig
from perceptual import LPIPS, PerceptualLoss
from test_biflow import (QUICK, TESTDATA, TINY_VAE, diffusers_folder, one_thread,  # noqa: F401
                         pixels, train_main)
from vae import VAE, VAEConfig, load_vae

# the fingerprints (of the weights alone) that vae.py printed for these weights before fingerprints
# covered the config: the testdata fixture's (sd_vae_tiny.safetensors) and int_vae()'s
LEGACY_FIXTURE = '30eb12bcaa95'
LEGACY_INT = '5e4e8f004fc1'


def int_vae(cfg=TINY_VAE):
    """A VAE of cfg (by default 32 groups, the config its shapes imply) with weights k/64, k an
    integer in [-8, 8] drawn from seed 17 in sorted key order (GroupNorm weights 1 + k/64): exact in
    fp32 on any machine, so that their fingerprint is a constant."""
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in VAE(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(17)
    sd = {k: torch.randint(-8, 9, shapes[k], generator=g).float() / 64 for k in sorted(shapes)}
    net = VAE(cfg).requires_grad_(False)
    net.load_state_dict({k: v + 1 if 'norm' in k and k.endswith('weight') else v
                         for k, v in sd.items()})
    return net.eval()


def folder(root, sd, config):
    """root/{config.json, diffusion_pytorch_model.bin}: a diffusers VAE folder; returns root."""
    os.makedirs(root, exist_ok=True)
    torch.save(sd, os.path.join(root, 'diffusion_pytorch_model.bin'))
    with open(os.path.join(root, 'config.json'), 'w') as f:
        json.dump(config, f)
    return str(root)


def cfg_json(cfg, **changes):
    """The diffusers config.json of a VAEConfig, with changes."""
    n = len(cfg.block_out_channels)
    c = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'in_channels': cfg.in_channels,
         'out_channels': cfg.out_channels, 'latent_channels': cfg.latent_channels,
         'block_out_channels': list(cfg.block_out_channels),
         'layers_per_block': cfg.layers_per_block, 'norm_num_groups': cfg.norm_num_groups,
         'down_block_types': ['DownEncoderBlock2D'] * n, 'up_block_types': ['UpDecoderBlock2D'] * n,
         'sample_size': 32, 'scaling_factor': 0.18215}
    return {**c, **changes}


def latent_meta(fingerprint, mean=(0.5, -0.5, 0.3, 1.0), std=(2.0, 1.0, 0.5, 3.0)):
    """The 'latent' entry of a checkpoint (a latent set's meta.json has these keys too)."""
    return {'img_size': 16, 'latent_shape': [4, 8, 8],
            'vae': {'name': 'v.pt', 'fingerprint': fingerprint},
            'norm': {'kind': 'compute', 'mean': list(mean), 'std': list(std)}}


def fixture_vae(root):
    """The testdata VAE (pinned to diffusers; 16 groups, from its config.json), loaded from root."""
    diffusers_folder(root)
    return load_vae(str(root))


# --------------------------------------------------------------------------------------------------
# LPIPS against the lpips package


def vgg_trunk(seed):
    """torchvision vgg16 `features.*` weights drawn from seed by one torch.Generator, conv by conv
    in layer order, weight before bias: weight N(0, 2 / fan_in) (He), bias N(0, 0.1^2), fp32."""
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in LPIPS().state_dict().items() if k.startswith('features.')}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(shapes, key=lambda k: (int(k.split('.')[1]), k.endswith('bias'))):
        s = shapes[k]
        scale = math.sqrt(2 / math.prod(s[1:])) if len(s) == 4 else 0.1
        out[k] = torch.randn(s, generator=g) * scale
    return out


def test_lpips_matches_the_lpips_package():
    """Our LPIPS-VGG against numbers made once by the lpips package (the fixture records its
    version), by a script kept out of the repository: lpips.LPIPS(net='vgg', pnet_rand=True,
    pretrained=True), with the package's v0.1 linear weights (kept in the fixture, 6 KB) and its
    VGG16 trunk replaced by vgg_trunk(seed) (regenerated here, never stored), in float64, on 3 pairs
    of uint8 images of 40x32 each read as x / 127.5 - 1: unrelated, a noisy copy, a shifted tinted
    copy. Pins the input shift and scale, the taps after each ReLU, the unit norm over channels,
    the channel weights and the spatial mean."""
    fx = torch.load(os.path.join(TESTDATA, 'lpips_vgg_fixture.pt'), weights_only=True)
    assert fx['made_with']['lpips'] == '0.1.4'
    trunk = vgg_trunk(fx['seed'])
    # the trunk is the one the numbers were made with: a change of torch's generator shows here
    for k, want in fx['trunk_probe'].items():
        assert torch.allclose(trunk[k].flatten()[:4], want, rtol=1e-5, atol=1e-7), \
            f'{k}: the trunk generator changed; remake the fixture'
    total = sum(float(v.double().square().sum()) for v in trunk.values())
    assert abs(total / float(fx['trunk_sq_sum']) - 1) < 1e-6, 'the trunk generator changed'
    ref = fx['lpips']
    assert ref.shape == (3,) and ref.min() > 0.01 and len(set(ref.tolist())) == 3
    m = PerceptualLoss(fx['lin'], trunk, None, crop=None)   # lpips' and torchvision's key names
    a, b = (fx[k].float() / 127.5 - 1 for k in ('a', 'b'))
    with torch.no_grad():
        got = m.lpips(a, b)
        # fp32 (inputs rounded to fp32 too) against float64: measured 1e-7 relative
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(m.lpips(b, a).double(), ref, rtol=1e-5, atol=0)   # symmetric
        assert torch.equal(m(a, b)['lpips'], got)   # the loss's term, uncropped, is that number
        # the same math in float64: measured 2e-16
        a, b = (fx[k].double() / 127.5 - 1 for k in ('a', 'b'))
        torch.testing.assert_close(m.lpips.double()(a, b), ref, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------
# the latent decoder, and the normalisation between encode, training and decoding


def test_latent_decoder_undoes_the_mean_and_the_std(tmp_path):
    """LatentDecoder(x) = vae.decode(x * std + mean) per channel, on a non-zero mean: a decoder that
    dropped the mean (or added it before scaling) would shift every decoded colour."""
    vae = fixture_vae(tmp_path)
    latent = latent_meta(None)
    dec = sample.LatentDecoder(vae, latent)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(latent['norm']['mean']).view(1, 4, 1, 1)
    std = torch.tensor(latent['norm']['std']).view(1, 4, 1, 1)
    with torch.no_grad():
        want = vae.decode(x * std + mean)
        got = dec(x)
        assert got.shape == (2, 3, 16, 16)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # the mean matters here: leaving it out moves the output far beyond the tolerance
        assert (vae.decode(x * std) - want).abs().max() > 100 * 1e-5


@pytest.mark.parametrize('norm', ['channel', 'compute'])
def test_encode_then_normalise_then_decode_is_the_vae_round_trip(tmp_path, norm):
    """data.py encode (the normalisation it records) -> train.posterior_sample (the normalisation F
    and G see) -> LatentDecoder gives vae.decode(posterior mean) of each image: the three users of
    (mean, std) agree. The posterior std is set to 0, so the sample is the mean. 'channel' has means
    up to 0.86; 'compute' records the set's own."""
    vae = fixture_vae(tmp_path / 'vae')
    encode('digits', str(tmp_path / 'lat'), vae, img_size=16, batch_size=4, chunk=4, limit=4,
           norm=norm, vae_name='tiny')
    ds = LatentDataset(str(tmp_path / 'lat'))
    mean, std = latent_norm(ds.meta)
    assert mean.abs().max() > 0.2   # a non-zero mean, or the test could not see it dropped
    moments = torch.stack([ds.item(i)[0] for i in range(4)])   # (4, 2, C, h, w): [mean, std]
    moments[:, 1] = 0
    args = type('Args', (), {'batch_size': 4, 'seed': 0})()
    x = train.posterior_sample(args, 0, moments, mean, std, 0, 1)
    dec = sample.LatentDecoder(vae, {k: ds.meta[k] for k in ('img_size', 'latent_shape', 'vae',
                                                             'norm')})   # as train.py saves it
    with torch.no_grad():
        want = torch.cat([vae.decode(vae.encode(pixels(i))[0]) for i in range(4)])
        torch.testing.assert_close(dec(x), want, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# the fingerprint: of config and weights; older files' of the weights alone


def test_fingerprint_sees_one_weight_changed_by_1e_6_relative(tmp_path):
    """A change below fp16's resolution (2^-10 relative, the older test's step, is above it): a
    fingerprint of rounded weights would miss it. Both fingerprints see it."""
    vae = fixture_vae(tmp_path)
    before = vae._fingerprints()
    for name in ('encoder.conv_in.weight', 'decoder.conv_out.bias'):
        w = dict(vae.named_parameters())[name]
        old = w.detach().flatten()[1].clone()
        new = old * (1 + 1e-6)
        assert old != 0 and new != old and new.half() == old.half()   # fp32 holds it, fp16 not
        with torch.no_grad():
            w.view(-1)[1] = new
        after = vae._fingerprints()
        assert after[0] != before[0] and after[1] != before[1], name
        with torch.no_grad():
            w.view(-1)[1] = old
        assert vae._fingerprints() == before


def test_fingerprint_covers_the_config(tmp_path):
    """The same weights with norm_num_groups 8, 16 or 32 are three encoders: three fingerprints,
    and one weights-only fingerprint (all that older versions recorded)."""
    sd = int_vae().state_dict()
    vaes = [load_vae(folder(tmp_path / str(g), sd, cfg_json(TINY_VAE, norm_num_groups=g)))
            for g in (8, 16, 32)]
    assert [v.cfg.norm_num_groups for v in vaes] == [8, 16, 32]
    assert len({v.fingerprint for v in vaes}) == 3
    assert {v.weights_fingerprint for v in vaes} == {LEGACY_INT}
    with torch.no_grad():
        means = [v.encode(pixels(0))[0] for v in vaes]
    assert (means[0] - means[2]).abs().max() > 1e-2   # they are different networks
    for v in vaes:
        assert v.matches(v.fingerprint) and sum(v.matches(u.fingerprint) for u in vaes) == 1
        assert not v.matches(None) and len(v.fingerprint) == 12


def test_older_weights_only_fingerprints_match_only_the_released_config(tmp_path):
    """Latent sets and checkpoints of older versions hold the weights-only fingerprint (LEGACY_*:
    what that code printed for these weights). It matches a VAE of the config that its shapes imply
    (32 groups: a bare weight file, or a config.json saying 32), not one whose config.json says
    16."""
    net = int_vae()
    assert net.weights_fingerprint == LEGACY_INT and net.fingerprint != LEGACY_INT
    fx = fixture_vae(tmp_path / 'fx')   # stored bytes, the same hash as before
    assert fx.weights_fingerprint == LEGACY_FIXTURE
    assert not fx.matches(LEGACY_FIXTURE)   # its config.json has 16 groups
    torch.save(net.state_dict(), tmp_path / 'bare.pt')
    bare = load_vae(str(tmp_path / 'bare.pt'))
    g32 = load_vae(folder(tmp_path / 'g32', net.state_dict(), cfg_json(TINY_VAE)))
    g16 = load_vae(folder(tmp_path / 'g16', net.state_dict(),
                          cfg_json(TINY_VAE, norm_num_groups=16)))
    assert bare.matches(LEGACY_INT) and g32.matches(LEGACY_INT)
    assert bare.fingerprint == g32.fingerprint and not g16.matches(LEGACY_INT)


def test_latent_decoder_loads_old_and_new_files_and_refuses_another_config(tmp_path):
    """sample.latent_decoder (sample.py's, and train.py's for --data) on the 'latent' entry of a
    checkpoint or latent set: today's fingerprint or an older file's weights-only one, each with its
    VAE; the refusals are one line naming --vae, and the groups where only the old hash fits."""
    net = int_vae()
    torch.save(net.state_dict(), tmp_path / 'bare.pt')
    bare = str(tmp_path / 'bare.pt')
    g16 = folder(tmp_path / 'g16', net.state_dict(), cfg_json(TINY_VAE, norm_num_groups=16))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for fp in (net.fingerprint, LEGACY_INT):
        dec = sample.latent_decoder(latent_meta(fp), bare)
        with torch.no_grad():
            torch.testing.assert_close(dec(z), net.decode(z * dec.std + dec.mean), rtol=0,
                                       atol=1e-5)
    with pytest.raises(ValueError, match=rf'^--vae .*g16: has the weights .*weights-only '
                       rf'fingerprint {LEGACY_INT}.*norm_num_groups 32 .* has 16; '
                       r'.*re-encode[^\n]*$'):
        sample.latent_decoder(latent_meta(LEGACY_INT), g16)
    with pytest.raises(ValueError, match=rf'^--vae .*g16: is not the VAE .*fingerprint '
                       rf'{net.fingerprint}\)[^\n]*$'):
        sample.latent_decoder(latent_meta(net.fingerprint), g16)


def test_encode_resumes_an_unfinished_encode_of_an_older_version(tmp_path, monkeypatch):
    """An encode killed part-way under an older version left progress.json with the weights-only
    fingerprint: the same command resumes it (finished chunks not redone, ending byte-identical to
    an uninterrupted encode), and meta.json records today's fingerprint. With the same weights under
    another config.json, the unfinished encode is refused, naming --vae."""
    net = int_vae()
    torch.save(net.state_dict(), tmp_path / 'bare.pt')
    vae = load_vae(str(tmp_path / 'bare.pt'))
    kw = dict(img_size=16, batch_size=4, chunk=4, limit=8, vae_name='bare.pt')
    encode('digits', str(tmp_path / 'straight'), vae, **kw)
    real, calls = VAE.encode, []

    def dies_on_the_fifth_call(self, x):   # the shape probe, chunk 0 (images, mirrors), chunk 1
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt('killed')
        return real(self, x)
    monkeypatch.setattr(VAE, 'encode', dies_on_the_fifth_call)
    out = tmp_path / 'old'
    with pytest.raises(KeyboardInterrupt):
        encode('digits', str(out), vae, **kw)
    progress = json.load(open(out / 'progress.json'))
    assert progress['vae_fingerprint'] == vae.fingerprint
    progress['vae_fingerprint'] = LEGACY_INT   # as the older version wrote it
    (out / 'progress.json').write_text(json.dumps(progress))
    g16 = load_vae(folder(tmp_path / 'g16', net.state_dict(),
                          cfg_json(TINY_VAE, norm_num_groups=16)))
    with pytest.raises(ValueError, match=rf"vae_fingerprint '{LEGACY_INT}'.*--vae[^\n]*$"):
        encode('digits', str(out), g16, **kw)
    calls.clear()
    monkeypatch.setattr(VAE, 'encode', lambda self, x: calls.append(1) or real(self, x))
    encode('digits', str(out), vae, **kw)
    assert len(calls) == 1 + 2   # the probe, then chunk 1 only
    meta = json.load(open(out / 'meta.json'))
    assert meta['vae']['fingerprint'] == vae.fingerprint != LEGACY_INT
    for f in ('latents.npy', 'labels.npy', 'meta.json'):
        assert (out / f).read_bytes() == (tmp_path / 'straight' / f).read_bytes(), f


def test_an_older_latent_set_trains_both_stages_and_its_checkpoints_sample(tmp_path, monkeypatch):
    """A latent set of an older version (meta.json with the weights-only fingerprint) trains stage 1
    and stage 2 with its VAE; the checkpoints, which carry that fingerprint as older ones do, decode
    through sample.py's loader; the same weights under another config.json are refused by both."""
    net = int_vae()
    torch.save(net.state_dict(), tmp_path / 'bare.pt')
    bare = str(tmp_path / 'bare.pt')
    lat = tmp_path / 'lat'
    encode('digits', str(lat), load_vae(bare), img_size=16, batch_size=8, chunk=8, limit=16,
           vae_name='bare.pt')
    meta = json.load(open(lat / 'meta.json'))
    meta['vae']['fingerprint'] = LEGACY_INT   # as the older version wrote it
    (lat / 'meta.json').write_text(json.dumps(meta))
    monkeypatch.setitem(model.PRESETS, 'tinylat', FlowConfig(
        img_size=8, in_channels=4, patch_size=2, channels=32, num_blocks=2, layers_per_block=1,
        head_dim=16, num_classes=10, noise_std=0.3, norm_clip=4.0))
    monkeypatch.setitem(model.REVERSE_PRESETS, 'tinylat', dict(
        channels=32, layers_per_block=1, denoise_layers=1, head_dim=16))
    monkeypatch.setitem(train.TRAIN_PRESETS, 'tinylat', train.TRAIN_PRESETS['cpu'])
    run = tmp_path / 'run'
    common = ['--data', lat, '--vae', bare, '--preset', 'tinylat', '--out_dir', run,
              '--max_steps', 2, *QUICK]
    train_main(*common)
    train_main('--stage', 'reverse', '--forward_ckpt', run / 'forward.pt', *common)
    g16 = folder(tmp_path / 'g16', net.state_dict(), cfg_json(TINY_VAE, norm_num_groups=16))
    for stage in ('forward', 'reverse'):
        ck = str(run / f'{stage}.pt')
        assert torch.load(ck, weights_only=True)['latent']['vae']['fingerprint'] == LEGACY_INT
        _, _, dec = sample.load_models(ck, vae=bare, verbose=False)
        with torch.no_grad():
            assert dec(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)
        with pytest.raises(ValueError, match='--vae .*norm_num_groups 32'):
            sample.load_models(ck, vae=g16, verbose=False)
    with pytest.raises(ValueError, match='--vae .*norm_num_groups 32'):
        train_main('--data', lat, '--vae', g16, '--preset', 'tinylat', '--out_dir',
                   tmp_path / 'other', *QUICK)


# --------------------------------------------------------------------------------------------------
# config.json, field by field

POSITIVE, WIDTHS = 'a positive integer', 'a non-empty list of positive integers'
DIVISOR = 'a divisor of every block_out_channels entry'
BAD_CONFIGS = [
    ('norm_num_groups', 0, POSITIVE), ('norm_num_groups', -8, POSITIVE),
    ('norm_num_groups', True, POSITIVE), ('norm_num_groups', 16.0, POSITIVE),
    ('norm_num_groups', '32', POSITIVE), ('norm_num_groups', None, POSITIVE),
    ('norm_num_groups', 5, DIVISOR), ('norm_num_groups', 64, DIVISOR),
    ('latent_channels', -4, POSITIVE), ('in_channels', [3], POSITIVE),
    ('layers_per_block', 1.5, POSITIVE), ('out_channels', False, POSITIVE),
    ('block_out_channels', '32', WIDTHS), ('block_out_channels', [], WIDTHS),
    ('block_out_channels', [32, '32'], WIDTHS), ('block_out_channels', [32, 0], WIDTHS),
    ('block_out_channels', 32, WIDTHS),
    ('act_fn', 'relu', "'silu'"), ('use_quant_conv', False, 'True'),
    ('mid_block_add_attention', False, 'True'),
    ('_class_name', 'UNet2DConditionModel', "'AutoencoderKL'"),
    ('down_block_types', ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'],
     "'DownEncoderBlock2D' once per"),
    ('up_block_types', ['UpDecoderBlock2D'], "'UpDecoderBlock2D' once per"),
]


@pytest.mark.parametrize('field,value,allowed', BAD_CONFIGS)
def test_vae_config_json_is_checked_field_by_field(tmp_path, capsys, field, value, allowed):
    """Each bad value is one ValueError line naming the file, the field, the value and what is
    allowed, before anything is built (norm_num_groups 0 was a ZeroDivisionError, latent_channels
    -4 a RuntimeError, block_out_channels "32" a formatting error); `python vae.py PATH` reports it
    through argparse, exit code 2, no traceback."""
    d = folder(tmp_path / 'v', int_vae().state_dict(), cfg_json(TINY_VAE, **{field: value}))
    with pytest.raises(ValueError) as e:
        load_vae(d)
    msg = str(e.value)
    assert msg.startswith(f"--vae {os.path.join(d, 'config.json')}: {field} {value!r}: ")
    assert f'expected {allowed}' in msg and '\n' not in msg
    with pytest.raises(SystemExit) as e:
        vae_mod.main([d])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    assert err.splitlines()[-1].endswith(f': error: {msg.replace("--vae", "path", 1)}')


def test_vae_config_json_shape_and_fallbacks(tmp_path):
    """A config.json that is not an object is refused; fields it lacks keep what the weights' shapes
    imply, and its groups are checked against those widths; a VAEConfig is checked the same way."""
    sd = int_vae().state_dict()
    with pytest.raises(ValueError, match=r'list/config\.json: not a diffusers config\.json, which '
                                         r'is a JSON object, but a list$'):
        load_vae(folder(tmp_path / 'list', sd, [1, 2]))
    vae = load_vae(folder(tmp_path / 'few', sd, {'norm_num_groups': 16}))
    assert vae.cfg == VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=16)
    with pytest.raises(ValueError, match=r'few3/config\.json: norm_num_groups 3: expected a '
                                         r'divisor .*\[32, 32\]'):
        load_vae(folder(tmp_path / 'few3', sd, {'norm_num_groups': 3}))
    with pytest.raises(ValueError, match=r'^latent_channels 0: expected a positive integer$'):
        VAE(VAEConfig(latent_channels=0))
    # widths given as a list build (and fingerprint) the same VAE as a tuple
    assert VAE(VAEConfig(block_out_channels=[32, 32], layers_per_block=1)).cfg == TINY_VAE
