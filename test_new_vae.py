"""Tests of vae.py, the SD VAE:  OMP_NUM_THREADS=1 python -m pytest test_new_vae.py -q"""
import json
import os
import shutil
import struct

import pytest
import torch

from vae import VAE, VAEConfig, config_from_state_dict, convert_state_dict, load_vae, read_safetensors, vae_decode_flops

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, 'testdata')
TINY = VAEConfig(block_out_channels=(32, 32), layers_per_block=1)  # the smallest VAE with the default 32 groups
OLD_NAMES = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def fixture_io():
    return torch.load(os.path.join(TESTDATA, 'sd_vae_tiny_io.pt'), weights_only=True)


def diffusers_folder(root, weights='diffusion_pytorch_model.safetensors', sd=None):
    """root/vae/{config.json, weights} as diffusers lays out a pipeline's VAE; the fixture's weights unless `sd`."""
    d = os.path.join(root, 'vae')
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, 'config.json'), 'w') as f:
        f.write(fixture_io()['config_json'])
    if sd is None:
        shutil.copy(os.path.join(TESTDATA, 'sd_vae_tiny.safetensors'), os.path.join(d, weights))
    else:
        torch.save(sd, os.path.join(d, weights))
    return d


def outputs(vae, x, mean):
    m, s = vae.encode(x)
    return m, s, vae.decode(mean)


def test_vae_matches_diffusers(tmp_path):
    """Our VAE against diffusers' AutoencoderKL on the fixture in testdata/, made with diffusers 0.42.1 (torch 2.14.1,
    safetensors 0.8.0) by a script kept out of the repository:
      AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      norm_num_groups=16, down_block_types=2 x DownEncoderBlock2D, up_block_types=2 x UpDecoderBlock2D), initialised
      after torch.manual_seed(0); then, from torch.Generator().manual_seed(1), every GroupNorm weight set to
      1 + 0.2 N(0,1) and every bias to 0.1 N(0,1) (so neither keeps its init), and every parameter rounded to fp16.
      sd_vae_tiny.safetensors: those weights as F16, attention renamed to the old query/key/value/proj_attn.
      sd_vae_tiny_io.pt: x = 2 U[0,1) - 1, (2,3,32,32), from the same generator; with the model in float64,
      mean, std = encode(x).latent_dist.{mean,std} and decoded = decode(mean).sample, all float64; config_json =
      save_config's config.json; diffusers = the version.
      sd_vae_keys.json: state-dict key -> shape of AutoencoderKL(block_out_channels=(128, 256, 512, 512),
      layers_per_block=2, latent_channels=4, norm_num_groups=32, 4 x DownEncoderBlock2D / UpDecoderBlock2D).
    norm_num_groups=16 cannot be seen in tensor shapes: loading through the folder also tests config.json."""
    io = fixture_io()
    diffusers_folder(tmp_path)
    vae = load_vae(str(tmp_path))  # found in the vae/ subfolder, as in a pipeline's folder
    assert vae.cfg == VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    got = outputs(vae, io['x'].float(), io['mean'].float())
    assert all(t.dtype == torch.float32 for t in got)
    assert got[0].shape == got[1].shape == (2, 4, 16, 16) and got[2].shape == (2, 3, 32, 32)
    for ours, ref in zip(got, (io['mean'], io['std'], io['decoded'])):
        # fp32 against diffusers' float64, within 1e-5 of the output's scale (measured: 1.1e-6 on the moments, 2.3e-6
        # on decode; diffusers' own fp32 run is 8e-6 off on decode, so an absolute 1e-5 would be round-off luck)
        assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for ours, ref in zip(outputs(vae.double(), io['x'], io['mean']), (io['mean'], io['std'], io['decoded'])):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)  # same math in float64: any deviation shows


def test_vae_full_size_keys_match_diffusers_and_old_names_map_onto_them():
    with open(os.path.join(TESTDATA, 'sd_vae_keys.json')) as f:
        ref = {k: tuple(v) for k, v in json.load(f)['keys'].items()}
    with torch.device('meta'):  # 84M parameters, nothing allocated
        vae = VAE()
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == ref
    decoder = sum(p.numel() for n, p in vae.named_parameters() if n.startswith(('decoder.', 'post_quant_conv.')))
    assert round(decoder / 1e6) == 49  # BiFlow's figure for the SD VAE decoder
    # older uploads: query/key/value/proj_attn, as Linear (2-D) or 1x1-conv (4-D) weights
    for conv in (False, True):
        old = {}
        for k, shape in ref.items():
            if '.attentions.' in k:
                for new, o in OLD_NAMES.items():
                    k = k.replace(f'.{new}.', f'.{o}.')
                shape = shape + (1, 1) if conv and len(shape) == 2 and not k.endswith('group_norm.weight') else shape
            old[k] = torch.empty(shape, device='meta')
        assert sum('.query.' in k or '.proj_attn.' in k for k in old) == 8  # 2 attentions x (query, proj_attn) x 2
        assert {k: tuple(v.shape) for k, v in convert_state_dict(old).items()} == ref
        assert config_from_state_dict(convert_state_dict(old)) == VAEConfig()


def test_vae_loads_bin_file_and_folder_alike(tmp_path):
    io = fixture_io()
    st = os.path.join(diffusers_folder(tmp_path / 'st'), 'diffusion_pytorch_model.safetensors')
    ref_vae = load_vae(str(tmp_path / 'st'))
    ref = outputs(ref_vae, io['x'].float(), io['mean'].float())
    # .bin with the current names and 1x1-conv attention weights, as a diffusers folder and as the bare file
    sd = convert_state_dict(read_safetensors(os.path.join(TESTDATA, 'sd_vae_tiny.safetensors')))
    sd = {k: v[..., None, None] if '.to_' in k and v.ndim == 2 else v for k, v in sd.items()}
    assert sum(v.ndim == 4 for k, v in sd.items() if '.attentions.' in k) == 8
    d = diffusers_folder(tmp_path / 'bin', 'diffusion_pytorch_model.bin', sd)
    for path in (d, os.path.join(d, 'diffusion_pytorch_model.bin'), st):  # a file reads its folder's config.json
        vae = load_vae(path)
        assert vae.cfg == ref_vae.cfg and vae.fingerprint == ref_vae.fingerprint
        for a, b in zip(outputs(vae, io['x'].float(), io['mean'].float()), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 2 ** -10
    assert vae.fingerprint != ref_vae.fingerprint and len(vae.fingerprint) == 12


@pytest.mark.parametrize('cfg', [TINY, VAEConfig(in_channels=1, out_channels=2, latent_channels=3,
                                                 block_out_channels=(32, 64, 64), layers_per_block=2)])
def test_vae_shapes_inferred_from_a_plain_state_dict(tmp_path, cfg):
    torch.manual_seed(0)
    vae = VAE(cfg)
    torch.save(vae.state_dict(), tmp_path / 'tiny.pt')
    got = load_vae(str(tmp_path / 'tiny.pt'))
    assert got.cfg == cfg and got.fingerprint == vae.fingerprint
    x = torch.rand(2, cfg.in_channels, 16, 16) * 2 - 1
    f = 2 ** (len(cfg.block_out_channels) - 1)
    mean, std = got.encode(x)
    assert mean.shape == std.shape == (2, cfg.latent_channels, 16 // f, 16 // f)
    assert got.decode(mean).shape == (2, cfg.out_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(got.encode(x)[0], vae.encode(x)[0], rtol=0, atol=1e-6)


def test_vae_logvar_is_clamped_like_diffusers():
    vae = VAE(TINY).requires_grad_(False)
    x = torch.zeros(1, 3, 8, 8)
    for bias, logvar in ((1e4, 20.0), (-1e4, -30.0)):
        vae.quant_conv.bias[4:] = bias  # the log-variance half of the moments
        assert torch.equal(vae.encode(x)[1], torch.full((1, 4, 4, 4), logvar / 2).exp())


def test_vae_errors_name_the_flag_the_file_and_the_download(tmp_path):
    missing = str(tmp_path / 'nope.safetensors')
    with pytest.raises(FileNotFoundError, match='--decoder_vae .*nope.safetensors.*sd-vae-ft-mse/resolve/main/'
                       'diffusion_pytorch_model.safetensors.*sd-vae-ft-ema'):
        load_vae(missing, flag='--decoder_vae')
    with pytest.raises(FileNotFoundError, match='--vae .*a folder without .*huggingface.co'):
        load_vae(str(tmp_path))
    # a TarFlow checkpoint (a dict of a state dict and tensors)
    with pytest.raises(ValueError, match=r'ml_tarflow_tiny\.pt: not an SD VAE.*missing keys, e\.g\. decoder.*'
                       r'unexpected keys, e\.g\. logdets'):
        load_vae(os.path.join(TESTDATA, 'ml_tarflow_tiny.pt'))
    sd = VAE(TINY).state_dict()
    sd['encoder.conv_out.weight'] = sd['encoder.conv_out.weight'][:, :16]
    sd['decoder.extra.weight'] = torch.zeros(1)
    del sd['quant_conv.bias']
    torch.save(sd, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match=r'bad\.pt: .*1 missing keys, e\.g\. quant_conv\.bias; 1 unexpected keys, '
                       r'e\.g\. decoder\.extra\.weight; 1 mis-shaped keys, e\.g\. encoder\.conv_out\.weight '
                       r'\(8, 16, 3, 3\) \(want \(8, 32, 3, 3\)\)'):
        load_vae(str(tmp_path / 'bad.pt'))
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(ValueError, match=r'list\.pt: holds a list'):
        load_vae(str(tmp_path / 'list.pt'))
    # widths that the default 32 groups do not divide, with no config.json to say otherwise
    torch.save(VAE(VAEConfig(block_out_channels=(16, 32), norm_num_groups=16)).state_dict(), tmp_path / 'g16.pt')
    with pytest.raises(ValueError, match=r'g16\.pt: cannot build'):
        load_vae(str(tmp_path / 'g16.pt'))
    d = diffusers_folder(tmp_path / 'cfg')
    with open(os.path.join(d, 'config.json'), 'w') as f:
        f.write('{"block_out_channels": [16, ')
    with pytest.raises(ValueError, match=r'vae/config\.json: not a diffusers config\.json'):
        load_vae(d)
    # a truncated safetensors file, a garbage header, a header that points past the end
    data = open(os.path.join(TESTDATA, 'sd_vae_tiny.safetensors'), 'rb').read()
    n = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + n])
    k = next(k for k in header if k != '__metadata__')
    header[k]['data_offsets'][1] += 2
    bad = json.dumps(header).encode()
    for name, blob in [('cut', data[:-100]), ('tiny', data[:5]), ('junk', struct.pack('<Q', 20) + b'{"a": [1, 2' + b' ' * 9),
                       ('offsets', struct.pack('<Q', len(bad)) + bad + data[8 + n:])]:
        path = tmp_path / f'{name}.safetensors'
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=rf'{name}\.safetensors: not a valid safetensors file'):
            load_vae(str(path))


def test_read_safetensors_reads_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {'F64': torch.randn(2, 3, generator=g, dtype=torch.float64), 'F32': torch.randn(5, generator=g),
            'F16': torch.randn(1, 2, 2, generator=g).half(), 'BF16': torch.randn(3, generator=g).bfloat16(),
            'I64': torch.tensor([-2 ** 40, 7]), 'I32': torch.tensor([[-5, 6]], dtype=torch.int32),
            'I16': torch.tensor([-300], dtype=torch.int16), 'I8': torch.tensor([-128, 127], dtype=torch.int8),
            'U8': torch.tensor([0, 255], dtype=torch.uint8), 'BOOL': torch.tensor([True, False, True]),
            'scalar': torch.tensor(1.5), 'empty': torch.zeros(0, 3)}
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for name, t in want.items():  # the layout as the safetensors spec writes it
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b''
        dtype = {'scalar': 'F32', 'empty': 'F32'}.get(name, name)
        header[name] = dict(dtype=dtype, shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    (tmp_path / 'all.safetensors').write_bytes(struct.pack('<Q', len(h)) + h + b''.join(blobs))
    got = read_safetensors(str(tmp_path / 'all.safetensors'))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def test_vae_decode_is_differentiable_with_frozen_weights(tmp_path):
    torch.save(VAE(TINY).state_dict(), tmp_path / 'tiny.pt')
    vae = load_vae(str(tmp_path / 'tiny.pt'))
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


def test_vae_decode_flops_match_a_count_of_the_layers():
    """FlopCounterMode on the meta device against 2 x multiply-adds of every conv, Linear and attention product."""
    vae, macs = VAE(TINY), []

    def count(module, inputs, out):
        if isinstance(module, torch.nn.Conv2d):
            macs.append(out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        elif isinstance(module, torch.nn.Linear):
            macs.append(out.numel() * module.in_features)
    for m in vae.modules():
        m.register_forward_hook(count)
    hw = 5
    with torch.no_grad():
        vae.decode(torch.zeros(1, 4, hw, hw))
    c, n = TINY.block_out_channels[-1], hw * hw  # the mid block's attention: q k^T and (attention) v
    assert vae_decode_flops(TINY, hw) == 2 * (sum(macs) + 2 * n * n * c)


def test_bench_vae_decode_row(tmp_path):
    import bench
    with torch.random.fork_rng():
        out = bench.main(['--rows', 'vae_decode', '--sample_batches', '1,2', '--vae_latent', '1', '--repeats', '1',
                          '--warmup', '0', '--budget', '0', '--device', 'cpu', '--threads', '0', '--json', str(tmp_path / 'b.json')])
    assert set(out['rows']) == {'vae_decode_b1', 'vae_decode_b2'} and out['rows']['vae_decode_b2']['median_ms'] > 0
    v = out['vae']
    assert v['latent'] == 1 and round(v['decoder_params'] / 1e6) == 49
    assert v['flops_per_image'] == vae_decode_flops(VAEConfig(), 1)
    assert round(v['flops_per_image_256'] / 2e9) == 311  # multiply-adds; BiFlow quotes 308 G
