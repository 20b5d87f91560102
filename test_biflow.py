"""
Tests: exact flow math as properties on tiny shapes, the reverse model and its losses, training (DDP, resume),
sampling and its files, the data pipeline, FID and the perceptual networks. CPU only, no network.

    pytest test_biflow.py            # the whole suite, a few minutes on 2 cores
    pytest test_biflow.py -k flow    # a part of it
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import model as M
from model import (BiFlow, FlowConfig, ReverseConfig, TarFlow, edit, inpaint, load_ml_tarflow, patchify,
                   reverse_config_for, reverse_loss, state_distance, unpatchify)

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = FlowConfig(img_size=8, in_channels=3, patch_size=2, channels=32, num_blocks=3, layers_per_block=2,
                  head_dim=16, num_classes=3, noise_std=0.1)


def make_flow(cfg=TINY, seed=0, dtype=torch.float32, scale=0.1):
    """A TarFlow with random, non-zero output projections (a freshly initialised one is affine per channel)."""
    torch.manual_seed(seed)
    f = TarFlow(cfg).to(dtype)
    with torch.no_grad():
        for b in f.blocks:
            b.proj_out.weight.normal_(0, scale)
    return f.eval()


def naive_block_reverse(block, z, y=None, guidance=0.0, ramp=False, attn_temp=1.0):
    """The inverse without a cache: recompute every token's (alpha, mu) from scratch, one token at a time."""
    x = block.permute(z).clone()
    N = x.shape[1]
    temp = None if attn_temp == 1.0 else torch.full((len(x),), attn_temp)
    for i in range(N - 1):
        a, m = block.params(x, y)
        if guidance:
            au, mu = block.params(x, None if y is None else torch.full_like(y, -1), temp)
            g = guidance * (i + 1) / (N - 1) if ramp else guidance
            a, m = a + g * (a - au), m + g * (m - mu)
        x[:, i + 1] = x[:, i + 1] * torch.exp(a[:, i + 1]) + m[:, i + 1]
    return block.permute(x)


# ----------------------------------------------------------------------------------------------------------------------
# The forward flow: exact math


@pytest.mark.parametrize('clip', [0.0, 2.0])
def test_flow_inverse_of_forward_is_identity(clip):
    f = make_flow(FlowConfig(**{**asdict(TINY), 'norm_clip': clip}))
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, -1])
    z, logdet, traj = f(x, y)
    assert len(traj) == TINY.num_blocks + 1 and torch.equal(traj[-1], z)
    assert not torch.allclose(z, patchify(x, 2), atol=1e-2)  # the flow is not trivially the identity
    assert (f.reverse(z, y) - x).abs().max() < 1e-4


def test_flow_logdet_equals_autograd_jacobian_float64():
    cfg = FlowConfig(img_size=4, in_channels=3, patch_size=2, channels=16, num_blocks=2, layers_per_block=1,
                     head_dim=8, num_classes=2)
    f = make_flow(cfg, dtype=torch.float64, scale=0.3)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([1])
    J = torch.autograd.functional.jacobian(lambda v: f(v, y)[0].flatten(), x).reshape(48, 48)
    _, logdet, _ = f(x, y)
    assert abs(torch.linalg.slogdet(J)[1].item() - logdet.item()) < 1e-8
    assert abs(logdet.item()) > 1e-2  # non-trivial


def test_flow_blocks_are_causal_in_their_own_order():
    cfg = FlowConfig(img_size=4, in_channels=3, patch_size=2, channels=16, num_blocks=2, layers_per_block=2,
                     head_dim=8, num_classes=0)
    f = make_flow(cfg, dtype=torch.float64, scale=0.3)
    x = torch.randn(1, 4, 12, dtype=torch.float64)
    for block in f.blocks:
        J = torch.autograd.functional.jacobian(lambda v: block.permute(block(block.permute(v))[0]), x)
        J = J.reshape(4, 12, 4, 12)  # d z_i / d x_j in the block's order
        for i in range(4):
            for j in range(i + 1, 4):
                assert J[i, :, j].abs().max() == 0  # no token sees a later one
            assert torch.count_nonzero(J[i, :, i] - torch.diag(torch.diagonal(J[i, :, i]))) == 0  # affine per dim
        assert J[3, :, 0].abs().max() > 0  # but it does see earlier ones


@torch.no_grad()
def test_flow_kv_cache_inverse_equals_naive_inverse():
    f = make_flow(scale=0.03)
    z = torch.randn(3, TINY.num_tokens, TINY.token_dim)
    y = torch.tensor([0, 2, 1])
    for block in f.blocks:
        for kw in [{}, dict(guidance=1.5), dict(guidance=2.0, ramp=True, attn_temp=0.7)]:
            fast = block.reverse(z, y, **kw)
            slow = naive_block_reverse(block, z, y, **kw)
            assert (fast - slow).abs().max() < 1e-5, kw


@torch.no_grad()
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
        x[:, i + 1] = x[:, i + 1] * torch.exp(2 * a[:, i + 1] - au[:, i + 1]) + 2 * m[:, i + 1] - mu[:, i + 1]
    assert (guided - block.permute(x)).abs().max() < 1e-5
    assert (guided - block.reverse(z, y)).abs().max() > 1e-3  # guidance changes the sample


@torch.no_grad()
def test_flow_unconditional_attention_temperature_guidance():
    f = make_flow(FlowConfig(**{**asdict(TINY), 'num_classes': 0}), scale=0.03)
    z = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    plain = f.reverse(z, guidance=1.0)               # same model in both streams: guidance is a no-op
    assert (plain - f.reverse(z)).abs().max() < 1e-5
    hot = f.reverse(z, guidance=1.0, attn_temp=2.0)
    assert (hot - plain).abs().max() > 1e-4
    assert (f.blocks[0].reverse(z, None, 1.0, False, 2.0) - naive_block_reverse(f.blocks[0], z, None, 1.0, False,
                                                                                 2.0)).abs().max() < 1e-5


def test_flow_tweedie_denoising_on_an_affine_flow_with_known_score():
    f = TarFlow(TINY)  # zero output weights, random biases: every block is a fixed per-dimension affine map
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, -1, 0])
    z0 = f(torch.zeros_like(x), y)[0]
    a = f(torch.ones_like(x), y)[0] - z0                      # z = a * x + z0, elementwise in token space
    score = unpatchify(-a * (a * patchify(x, 2) + z0), 2, 8)   # grad log N(a x + z0; 0, I) = -a (a x + z0)
    out = f.denoise(x, y, chunk=2)
    assert (out - (x + TINY.noise_std ** 2 * score)).abs().max() < 1e-5
    assert (out - f.denoise(x, y, chunk=64)).abs().max() < 1e-6     # chunking does not change the result
    assert (out - x).abs().max() > 1e-4


def test_flow_norm_control_bounds_alpha_and_mu():
    cfg = FlowConfig(**{**asdict(TINY), 'norm_clip': 0.5})
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
    f = load_ml_tarflow(fix['state_dict']).eval()
    assert (f.cfg.img_size, f.cfg.patch_size, f.cfg.channels, f.cfg.num_blocks, f.cfg.layers_per_block,
            f.cfg.num_classes) == (8, 2, 64, 2, 2, 3)
    z, logdet, _ = f(fix['x'], fix['y'])
    assert (z - fix['z']).abs().max() < 1e-5
    assert (logdet / z[0].numel() - fix['logdets']).abs().max() < 1e-6   # theirs is a per-dimension mean
    # their own sampler's output, guided with the ramp and a temperature, and unguided
    assert (f.reverse(fix['z_rev'], fix['y_rev'], 1.5, True, 0.8) - fix['x_rev_guided']).abs().max() < 1e-4
    assert (f.reverse(fix['z_rev'], fix['y_rev']) - fix['x_rev']).abs().max() < 1e-4


def test_flow_ml_tarflow_import_rejects_bad_state_dicts():
    fix = torch.load(os.path.join(HERE, 'testdata', 'ml_tarflow_tiny.pt'), weights_only=True)
    with pytest.raises(ValueError, match='not an ml-tarflow state dict'):
        load_ml_tarflow({'foo': torch.zeros(1)})
    sd = dict(fix['state_dict'])
    sd['var'] = sd['var'] * 2
    with pytest.raises(ValueError, match='VP mode'):
        load_ml_tarflow(sd)


# ----------------------------------------------------------------------------------------------------------------------
# The reverse model and the stage-2 loss


def make_pair(seed=0, **kw):
    f = make_flow(seed=seed)
    f.requires_grad_(False)
    torch.manual_seed(seed)
    g = BiFlow(reverse_config_for(TINY, channels=32, layers_per_block=1, denoise_layers=1, head_dim=16, **kw))
    return f, g


def batch(B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 8, 8, generator=gen) * 2 - 1
    return x, torch.tensor([0, 1, 2, -1])[:B], torch.tensor([0.0, 1.0, 2.5, 0.0])[:B], torch.randn(B, 3, 8, 8,
                                                                                                  generator=gen)


@pytest.mark.parametrize('align', ['hidden', 'distill', 'naive'])
@pytest.mark.parametrize('denoise', ['learned', 'score', 'none'])
def test_reverse_every_switch_gives_finite_loss_and_gradients_everywhere(align, denoise):
    f, g = make_pair(align=align, denoise=denoise)
    x, y, w, eps = batch()
    loss, terms = reverse_loss(g, f, x, y, w, eps)
    loss.backward()
    n_align = 0 if align == 'naive' else (TINY.num_blocks if denoise == 'learned' else TINY.num_blocks - 1)
    assert set(terms) == {f'align{TINY.num_blocks - 1 - i}' for i in range(n_align)} | {'out'}
    assert torch.isfinite(loss)
    # every parameter is used (DDP needs no find_unused_parameters) and gets a gradient
    for name, p in g.named_parameters():
        assert p.grad is not None, name
    assert all(p.grad is None for p in f.parameters())
    out = g.decode(torch.randn(2, TINY.num_tokens, TINY.token_dim), torch.tensor([0, 1]), torch.tensor([0.0, 1.0]),
                   forward_model=f)
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
    """If G(z|c,w) = (1+w) x^i - w G(z|null) exactly, every alignment term of the loss is zero (Eq. 5)."""
    f, g = make_pair(norm=False)
    x, y, w, eps = batch()
    _, _, traj = f(x + TINY.noise_std * eps, y)
    targets = M.align_targets(g, traj, patchify(x, 2))
    uncond = [torch.randn_like(t) for t in targets]

    class Oracle(BiFlow):
        def forward(self, z, y=None, w=None, cfg_infer=0.0):
            if bool((y < 0).all()):   # the null-class pass of Eq. 5
                return uncond
            wv = w.view(-1, 1, 1)
            return [(1 + wv) * t - wv * u for t, u in zip(targets, uncond)]

    oracle = Oracle(g.cfg)
    _, terms = reverse_loss(oracle, f, x, y, w, eps)
    assert all(v < 1e-10 for v in terms.values()), terms
    g.cfg.guidance = 'inference'    # plain training ignores w: the same oracle is now wrong where w > 0
    oracle.cfg.guidance = 'inference'
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
    assert torch.allclose(g.decode(z, y, w, forward_model=f), f.denoise(raw, y), atol=1e-6)
    with pytest.raises(ValueError, match='forward_model'):
        g.decode(z, y, w)
    # alignment: distillation routes the hidden state through token space, hidden alignment only reads it
    for align, depends in [('hidden', False), ('distill', True)]:
        f, g = make_pair(align=align)
        for p in g.parameters():
            p.data.normal_(0, 0.1)
        a = g(z, y, w)[-1]
        g.heads[0].weight.data.mul_(2)
        assert (g(z, y, w)[-1] - a).abs().max() > 1e-4 if depends else torch.equal(g(z, y, w)[-1], a)
    # reverse norm control: distances are scale-invariant with it, not without
    p, t = torch.randn(2, 4, 12), torch.randn(2, 4, 12)
    assert torch.allclose(state_distance(10 * p, 10 * t, True), state_distance(p, t, True), rtol=1e-4)
    assert torch.allclose(state_distance(10 * p, 10 * t, False), 100 * state_distance(p, t, False))
    # inference-time CFG at w = 0 is the plain conditional pass; w > 0 changes it; batching equals two passes
    f, g = make_pair(guidance='inference')
    for q in g.parameters():
        q.data.normal_(0, 0.1)
    assert torch.allclose(g(z, y, cfg_infer=0.0)[-1], g(z, y)[-1])
    assert (g(z, y, cfg_infer=1.5)[-1] - g(z, y)[-1]).abs().max() > 1e-4


def test_reverse_inpainting_keeps_the_noise_of_the_known_region_and_edit_runs():
    f, g = make_pair()
    x, y, _, eps = batch()
    redraw = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    redraw[:, :, 4:, :] = True           # regenerate the bottom half
    noise = torch.randn(4, TINY.num_tokens, TINY.token_dim)
    out, z = inpaint(g, f, x, redraw, y, noise, 1.0, eps)
    zf = f(x + TINY.noise_std * eps, y)[0]
    keep = ~patchify(redraw.float(), 2).bool().any(-1)    # (B, N)
    assert keep.sum() == 4 * 8 and torch.equal(z[keep], zf[keep]) and torch.equal(z[~keep], noise[~keep])
    assert out.shape == x.shape
    e = edit(g, f, x, y, torch.tensor([1, 2, 0, 1]), 1.0, eps)
    assert e.shape == x.shape and torch.isfinite(e).all()


# ----------------------------------------------------------------------------------------------------------------------
# Training, sampling and their files (through the command lines)


def torchrun(script, args, cwd, port, check=True):
    """Run a script under torchrun with 2 CPU ranks (gloo), one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
                        os.path.join(HERE, script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    if check and r.returncode:
        raise AssertionError(f'{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return r


def train_main(*args):
    import train
    train.main([str(a) for a in args])


def sample_main(*args):
    import sample
    with torch.no_grad():
        sample.main([str(a) for a in args])


def fails(fn, *args):
    """Run fn(*args) expecting a clean failure; return its message (argparse errors included)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises((SystemExit, ValueError, FileNotFoundError)) as e:
        fn(*args)
    return f'{e.value} {err.getvalue()}'


def losses(path):
    return [json.loads(line) for line in open(path) if 'loss' in line]


QUICK = ['--batch_size', '8', '--log_every', '1', '--sample_every', '1000', '--ckpt_every', '2', '--lr', '1e-3',
         '--warmup_steps', '2']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A forward and a reverse checkpoint from a few steps of each stage on the built-in data (CPU preset)."""
    d = tmp_path_factory.mktemp('run')
    train_main('--out_dir', d, '--max_steps', 4, *QUICK)
    train_main('--stage', 'reverse', '--forward_ckpt', d / 'forward.pt', '--out_dir', d, '--max_steps', 4, *QUICK)
    return d


def test_train_checkpoints_have_the_documented_layout(trained):
    for stage in ('forward', 'reverse'):
        ck = torch.load(trained / f'{stage}.pt', weights_only=True)
        assert ck['kind'] == stage and ck['step'] == 4
        assert {'model', 'ema', 'optimizer', 'model_config', 'train_config', 'rng', 'loader'} <= set(ck)
        assert isinstance(ck['model_config'], dict) and isinstance(ck['train_config'], dict)
        assert (trained / f'{stage}_samples.png').exists()
        assert not list(trained.glob('*.tmp'))
    ck = torch.load(trained / 'reverse.pt', weights_only=True)
    fwd = torch.load(trained / 'forward.pt', weights_only=True)
    assert all(torch.equal(ck['forward'][k], fwd['ema'][k]) for k in fwd['ema'])   # F frozen, carried along


def test_train_forward_loss_falls_on_the_builtin_data(tmp_path):
    train_main('--out_dir', tmp_path, '--max_steps', 40, '--batch_size', 16, '--log_every', 10, '--sample_every',
               1000, '--ckpt_every', 1000)
    rows = losses(tmp_path / 'forward_log.jsonl')
    assert rows[-1]['loss'] < rows[0]['loss'] - 0.5, rows


def test_train_reverse_loss_falls(trained, tmp_path):
    train_main('--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt', '--out_dir', tmp_path, '--max_steps',
               30, '--batch_size', 16, '--log_every', 10, '--sample_every', 1000, '--ckpt_every', 1000)
    rows = losses(tmp_path / 'reverse_log.jsonl')
    assert rows[-1]['out'] < 0.5 * rows[0]['out'], rows


@pytest.mark.parametrize('stage', ['forward', 'reverse'])
def test_train_ddp_two_ranks_equal_one_process(stage, trained, tmp_path):
    args = ['--max_steps', '3', *QUICK]
    if stage == 'reverse':
        args += ['--stage', 'reverse', '--forward_ckpt', str(trained / 'forward.pt')]
    train_main('--out_dir', tmp_path / 'one', *args)
    torchrun('train.py', ['--out_dir', str(tmp_path / 'two'), *args], tmp_path, 29517)
    one, two = losses(tmp_path / f'one/{stage}_log.jsonl'), losses(tmp_path / f'two/{stage}_log.jsonl')
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a['loss'] - b['loss']) < 1e-4 * max(1, abs(a['loss'])), (a, b)
        assert abs(a['gnorm'] - b['gnorm']) < 1e-3 * a['gnorm'], (a, b)


@pytest.mark.parametrize('stage', ['forward', 'reverse'])
def test_train_resume_equals_training_straight_through(stage, trained, tmp_path):
    extra = ['--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt'] if stage == 'reverse' else []
    train_main(*extra, '--max_steps', 4, *QUICK, '--out_dir', tmp_path / 'a')
    train_main(*extra, '--max_steps', 4, *QUICK, '--out_dir', tmp_path / 'b', '--stop_at', 2)
    train_main(*extra, '--max_steps', 4, *QUICK, '--out_dir', tmp_path / 'b', '--resume', tmp_path / 'b' / f'{stage}.pt')
    a, b = losses(tmp_path / f'a/{stage}_log.jsonl'), losses(tmp_path / f'b/{stage}_log.jsonl')
    assert [r['step'] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in ('img_per_s', 'lr'):
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (k, ra, rb)
    ca = torch.load(tmp_path / f'a/{stage}.pt', weights_only=True)
    cb = torch.load(tmp_path / f'b/{stage}.pt', weights_only=True)
    assert all(torch.equal(ca['ema'][k], cb['ema'][k]) for k in ca['ema'])
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model'])


def test_train_bad_inputs_fail_clearly(tmp_path, trained):
    base = ['--out_dir', tmp_path, '--max_steps', 1]
    cases = [
        (['--data', tmp_path / 'nope'], 'nope'),
        (['--stage', 'reverse'], '--forward_ckpt'),
        (['--stage', 'reverse', '--forward_ckpt', tmp_path / 'missing.pt'], 'missing.pt'),
        (['--stage', 'reverse', '--forward_ckpt', trained / 'reverse.pt'], 'not a forward one'),
        (['--resume', HERE + '/testdata/ml_tarflow_tiny.pt'], 'not a checkpoint written by train.py'),
        (['--stage', 'reverse', '--forward_ckpt', trained / 'forward.pt', '--convnext', tmp_path / 'c.pt'],
         'convnextv2_base_22k_224_ema.pt'),
        (['--lpips', tmp_path / 'l.pth'], '--lpips needs --vgg'),
        (['--preset', 'nope'], "invalid choice: 'nope'"),
    ]
    for args, msg in cases:
        assert msg in fails(train_main, *base, *args), args
    r = torchrun('train.py', [str(a) for a in base] + ['--batch_size', '7'], tmp_path, 29518, check=False)
    assert r.returncode != 0 and '--batch_size 7' in (r.stderr + r.stdout)


def test_sample_grid_npz_and_sharding(trained, tmp_path):
    from PIL import Image
    for stage in ('forward', 'reverse'):
        ck = trained / f'{stage}.pt'
        sample_main('--ckpt', ck, '--out', tmp_path / f'{stage}.png')
        assert Image.open(tmp_path / f'{stage}.png').size == (10 * 18 + 2, 10 * 18 + 2)
        sample_main('--ckpt', ck, '--num_samples', 5, '--batch_size', 2, '--npz', tmp_path / f'{stage}1.npz',
                    '--out', tmp_path / 'g.png')
        torchrun('sample.py', ['--ckpt', str(ck), '--num_samples', '5', '--batch_size', '3', '--npz',
                               str(tmp_path / f'{stage}2.npz'), '--out', str(tmp_path / 'g.png')], tmp_path, 29519)
        a, b = np.load(tmp_path / f'{stage}1.npz'), np.load(tmp_path / f'{stage}2.npz')
        assert a['arr_0'].shape == (5, 16, 16, 3) and a['arr_0'].dtype == np.uint8 and a['arr_1'].shape == (5,)
        # the same samples whatever the batch size and number of ranks (up to float noise in the uint8 rounding)
        assert np.abs(a['arr_0'].astype(int) - b['arr_0']).max() <= 1 and np.array_equal(a['arr_1'], b['arr_1'])
        assert not list(tmp_path.glob('*.tmp*'))
    ck = trained / 'reverse.pt'
    img = tmp_path / 'img.png'
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(img)
    mask = np.zeros((16, 16), np.uint8)
    mask[8:] = 255
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    sample_main('--ckpt', ck, '--inpaint', img, '--mask', tmp_path / 'mask.png', '--labels', 3, '--num_samples', 3,
                '--out', tmp_path / 'inp.png')
    assert Image.open(tmp_path / 'inp.png').size == (5 * 18 + 2, 20)
    sample_main('--ckpt', ck, '--edit', img, '--labels', 3, '--to_class', 5, '--out', tmp_path / 'e.png')
    assert Image.open(tmp_path / 'e.png').size == (2 * 18 + 2, 20)
    for args, msg in [(['--ckpt', tmp_path / 'nope.pt'], 'nope.pt'),
                      (['--ckpt', img], 'img.png'),
                      (['--ckpt', ck, '--labels', 12], '--labels 12'),
                      (['--ckpt', ck, '--edit', img, '--labels', 3], '--to_class'),
                      (['--ckpt', ck, '--inpaint', img, '--labels', 3], '--mask'),
                      (['--ckpt', trained / 'forward.pt', '--edit', img, '--labels', 3, '--to_class', 1], 'reverse')]:
        assert msg in fails(sample_main, *args), args


def test_sample_counts_non_finite_samples():
    import sample
    f = make_flow()
    with torch.no_grad():
        f.blocks[-1].proj_out.bias[:TINY.token_dim].fill_(1e4)   # exp(alpha) overflows in the exact inverse
    imgs, labels, bad = sample.sample_shard(f, None, 3, 0, 1, 0, 2, denoise=False)
    assert bad == 3 and imgs.shape == (3, 8, 8, 3) and imgs.dtype == np.uint8 and labels.shape == (3,)
