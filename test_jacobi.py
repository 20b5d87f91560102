"""
Tests of the parallel (Jacobi / Gauss-Seidel-Jacobi) exact inverse of TarFlow: exactness as
properties on tiny shapes in float64, the guidance modes, segments, the non-finite fallback, G's
initial guess, the planner and the sampler's flags. CPU only, a few seconds.

    pytest test_jacobi.py
"""

from dataclasses import replace

import pytest
import torch

import model as M
import sample
from model import (
    ParallelInverse,
    ReverseModel,
    TarFlow,
    plan_inverse,
    reverse_config_for,
    reverse_guesses,
)
from test_biflow import TINY, make_flow, one_thread  # noqa: F401  (one_thread: the autouse fixture)

N, D = TINY.num_tokens, TINY.token_dim
GUIDANCE_MODES = [
    {},
    dict(guidance=1.5),
    dict(guidance=2.0, ramp=True),
    dict(guidance=1.0, attn_temp=0.7),
    dict(guidance=2.0, ramp=True, attn_temp=0.8),
]
EXACT = 1e-11  # float64: the same math as the sequential inverse, up to round-off


def flow64(**kw):
    return make_flow(replace(TINY, **kw), dtype=torch.float64, scale=0.03)


def noise(b=3, seed=1):
    return torch.randn(b, N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def labels(ncls):
    return torch.tensor([0, 2, -1]) if ncls else None


@torch.no_grad()
@pytest.mark.parametrize('init', ['z', 'random', 'far'])
def test_jacobi_token_0_exact_from_the_start_and_tokens_0_to_k_after_k_passes(init):
    f = flow64()
    z, y = noise(), labels(3)
    guess = {'z': None, 'random': noise(seed=7), 'far': 5 * noise(seed=8)}[init]
    for block in f.blocks:
        ref = block.permute(
            block.reverse(z, y, guidance=1.5, ramp=True)
        )  # in the block's own order
        for k, cached in [(0, True), (1, True), (2, False), (5, True), (5, False), (N - 1, True)]:
            x, info = block.reverse_parallel(
                z, y, guidance=1.5, ramp=True, tol=0.0, max_passes=k, init=guess, cached=cached
            )
            x = block.permute(x)
            assert (x[:, : k + 1] - ref[:, : k + 1]).abs().max() < EXACT, (init, k)
            assert info.passes.eq(k).all() and info.fallbacks == 0
        assert (x - ref).abs().max() < EXACT  # N-1 passes: the sequential result


@torch.no_grad()
@pytest.mark.parametrize('ncls,clip', [(3, 0.0), (3, 2.0), (0, 0.0)])
def test_jacobi_with_tol_0_equals_the_sequential_inverse_in_every_guidance_mode(ncls, clip):
    f = flow64(num_classes=ncls, norm_clip=clip)
    z, y = noise(), labels(ncls)
    for kw in GUIDANCE_MODES:
        ref = f.reverse(z, y, **kw)
        for segment, cached in [(None, True), (5, False), ([None, 4, 1], True)]:
            x, infos = f.reverse_parallel(z, y, **kw, segment=segment, tol=0.0, cached=cached)
            assert (x - ref).abs().max() < EXACT, (kw, segment)
            assert all(i.fallbacks == 0 for i in infos)
    # the guidance modes really differ from each other, so each comparison above tests something
    assert (f.reverse(z, y, **GUIDANCE_MODES[-1]) - f.reverse(z, y)).abs().max() > 1e-3


@torch.no_grad()
def test_jacobi_segment_1_is_the_sequential_inverse():
    f = flow64()
    z, y = noise(), labels(3)
    for block in f.blocks:
        x, info = block.reverse_parallel(z, y, guidance=1.5, segment=1)
        assert torch.equal(x, block.reverse(z, y, guidance=1.5)) and info.passes.eq(N - 1).all()
    # segments of 2 tokens: each exact after 2 passes through the KV cache of the finished ones
    x, info = f.blocks[1].reverse_parallel(z, y, guidance=1.5, segment=2, tol=0.0)
    assert (x - f.blocks[1].reverse(z, y, guidance=1.5)).abs().max() < EXACT
    assert info.passes.eq(2 * ((N - 1) // 2) + (N - 1) % 2).all()


@torch.no_grad()
def test_jacobi_converges_with_a_tolerance_and_converged_samples_stop():
    f = flow64()
    z, y = noise(), labels(3)
    block = f.blocks[0]
    ref = block.reverse(z, y, guidance=1.0)
    x, info = block.reverse_parallel(z, y, guidance=1.0, tol=1e-9)
    assert (
        x - ref
    ).abs().max() < 1e-7 and info.passes.max() < N - 1  # converged well before the N-1 cap
    assert info.changes[-1] <= 1e-9 < info.changes[0]
    start = z.clone()
    start[1] = ref[1]  # sample 1 starts at its solution: one pass shows no change, and it stops
    x2, info2 = block.reverse_parallel(z, y, guidance=1.0, tol=1e-9, init=start)
    assert info2.passes[1] == 1 and info2.passes[0] > 1 and (x2 - ref).abs().max() < 1e-7


@torch.no_grad()
def test_jacobi_non_finite_pass_falls_back_to_the_sequential_inverse_and_is_counted():
    f = flow64()
    z, y = noise(), labels(3)
    guess = z.clone()
    guess[2, 5] = float(
        'nan'
    )  # a broken guess (G's, say) for sample 2: its first pass is non-finite
    for segment in (None, 4):
        ref = f.blocks[0].reverse(z, y, guidance=1.0)
        x, info = f.blocks[0].reverse_parallel(
            z, y, guidance=1.0, segment=segment, tol=0.0, init=guess
        )
        assert info.fallbacks == 1 and torch.isfinite(x).all()
        assert (
            x - ref
        ).abs().max() < EXACT  # sample 2 from reverse(), the others from their passes
    guess[0, 3] = float('inf')
    _, infos = f.reverse_parallel(z, y, tol=0.0, init=[guess, None, None])
    assert [i.fallbacks for i in infos] == [2, 0, 0]


@torch.no_grad()
def test_jacobi_recursion_stays_fp32_under_bf16_autocast():
    f, z, y = make_flow(scale=0.05), noise().float(), labels(3)
    ref = f.reverse(z, y, guidance=1.0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        x, _ = f.reverse_parallel(z, y, guidance=1.0, tol=0.0, segment=[None, 3, None])
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert (
        x - ref
    ).abs().max() < 5e-2 * ref.abs().max()  # bf16 matmuls, fp32 alpha, mu and recursion


@pytest.mark.parametrize(
    'align,denoise', [('hidden', 'learned'), ('hidden', 'score'), ('naive', 'learned')]
)
@torch.no_grad()
def test_jacobi_from_the_reverse_models_guess(align, denoise):
    f = flow64()
    torch.manual_seed(0)
    G = ReverseModel(
        reverse_config_for(
            TINY,
            channels=32,
            layers_per_block=1,
            denoise_layers=1,
            head_dim=16,
            align=align,
            denoise=denoise,
        )
    ).eval()
    z, y = noise(), torch.tensor([0, 2, 1])
    guesses = [
        g if g is None else g.double() for g in reverse_guesses(G, z.float(), y, 1.0)
    ]  # G runs in fp32
    have = [g is not None for g in guesses]
    assert (
        have
        == {
            ('hidden', 'learned'): [True] * 3,
            ('hidden', 'score'): [True] * 3,
            ('naive', 'learned'): [False] * 3,
        }[(align, denoise)]
    )
    assert all(g.shape == z.shape for g in guesses if g is not None)
    x, _ = f.reverse_parallel(z, y, guidance=1.0, tol=0.0, init=guesses)
    assert (x - f.reverse(z, y, guidance=1.0)).abs().max() < EXACT


@torch.no_grad()
def test_jacobi_planner_picks_a_tried_strategy_per_flow_and_the_sampler_is_exact():
    f = flow64()
    z, y = noise(), labels(3)
    plans = plan_inverse(f, z, y, guidance=1.0, tol=0.0, candidates=[N, 4, 1], repeats=1)
    assert len(plans) == TINY.num_blocks
    for p in plans:
        assert p.choice in (N, 4, 1) and set(p.seconds) == set(p.passes) == {N, 4, 1}
        assert p.passes[1] == (N - 1, N - 1)
        assert p.passes[N] is None or p.passes[N][1] <= N - 1   # None: cut off at 1.5x the best
    inv = ParallelInverse('auto', tol=0.0, candidates=[N, 4, 1])
    for _ in range(2):  # planned on the first batch, kept for the second
        x = inv(f, z, y, 1.0)
        assert (x - f.reverse(z, y, guidance=1.0)).abs().max() < EXACT
    assert len(inv.plan) == TINY.num_blocks and len(inv.infos) == 2
    stats = inv.passes_per_flow()
    assert len(stats) == TINY.num_blocks and all(mx <= N - 1 and fb == 0 for _, mx, fb in stats)


@torch.no_grad()
def test_jacobi_deadline_stops_a_strategy_for_the_planner():
    f, z = flow64(), noise()
    with pytest.raises(TimeoutError):
        f.blocks[0].reverse_parallel(z, tol=0.0, deadline=0.0)   # long past: stops after a pass


def test_jacobi_bad_settings_are_one_line_value_errors():
    f, z = flow64(), noise()
    for kw in [dict(segment=0), dict(tol=-1.0), dict(max_passes=-2)]:
        with pytest.raises(ValueError, match='reverse_parallel'):
            f.blocks[0].reverse_parallel(z, **kw)
    with pytest.raises(ValueError, match='one per flow'):
        f.reverse_parallel(z, segment=[None, 2])
    with pytest.raises(ValueError, match="init 'G'"):
        ParallelInverse(init='G')(f, z)


# --------------------------------------------------------------------------------------------------
# sample.py: the sampler-selection flags


def checkpoints(tmp_path):
    """A forward checkpoint, a reverse one (F, a random G) and an ml-tarflow state dict (tiny)."""
    from dataclasses import asdict

    f = make_flow(scale=0.03)
    torch.manual_seed(0)
    g = ReverseModel(
        reverse_config_for(TINY, channels=32, layers_per_block=1, denoise_layers=1, head_dim=16)
    )
    fck, gck, mck = (str(tmp_path / n) for n in ('forward.pt', 'reverse.pt', 'tiny_model_0.05.pth'))
    torch.save(dict(kind='forward', model_config=asdict(TINY), ema=f.state_dict()), fck)
    torch.save(
        dict(
            kind='reverse',
            model_config=asdict(g.cfg),
            ema=g.state_dict(),
            forward_config=asdict(TINY),
            forward=f.state_dict(),
        ),
        gck,
    )
    torch.save(ml_tarflow_state_dict(), mck)
    return fck, gck, mck


def ml_tarflow_state_dict():
    from test_biflow import tiny_state_dict

    return tiny_state_dict()


def run_sample(capsys, *args):
    with torch.no_grad():
        sample.main(
            [
                '--device',
                'cpu',
                '--num_samples',
                '4',
                '--batch_size',
                '2',
                '--no-denoise',
                '--guidance',
                '1',
                *map(str, args),
            ]
        )
    return capsys.readouterr().out


def test_jacobi_sample_flags_every_checkpoint_kind(tmp_path, capsys):
    import numpy as np

    fck, gck, mck = checkpoints(tmp_path)
    npz = {k: str(tmp_path / f'{k}.npz') for k in ('seq', 'par', 'G', 'ml')}
    png = str(tmp_path / 's.png')
    run_sample(capsys, '--ckpt', fck, '--inverse', 'sequential', '--npz', npz['seq'], '--out', png)
    out = run_sample(
        capsys, '--ckpt', fck, '--jacobi_tol', '0', '--npz', npz['par'], '--out', png
    )  # the defaults
    assert 'inverse plan, flow 0: ' in out and 'inverse passes per flow (rank 0, 2 batches' in out
    out = run_sample(
        capsys,
        '--ckpt',
        gck,
        '--exact',
        '--jacobi_init',
        'G',
        '--segment',
        '16,4,1',
        '--jacobi_tol',
        '0',
        '--npz',
        npz['G'],
        '--out',
        png,
    )
    assert (
        'inverse plan' not in out
        and '0: mean 15.0 max 15 | 1: mean 15.0 max 15 | 2: mean 15.0 max 15' in out
    )
    seq = np.load(npz['seq'])['arr_0'].astype(int)
    for k in ('par', 'G'):  # exact passes: the same images up to a rounding flip of one level
        assert np.abs(np.load(npz[k])['arr_0'].astype(int) - seq).max() <= 1
    out = run_sample(capsys, '--ckpt', mck, '--segment', '4', '--npz', npz['ml'], '--out', png)
    assert 'inverse passes per flow' in out


@pytest.mark.parametrize(
    'args,msg',
    [
        (['--segment', '0'], '--segment 0:'),
        (['--segment', 'x'], '--segment x:'),
        (['--jacobi_tol', '-1'], '--jacobi_tol -1.0: must be >= 0'),
        (['--jacobi_max_passes', '0'], '--jacobi_max_passes 0:'),
        (['--jacobi_init', 'G'], '--jacobi_init G: needs a reverse checkpoint'),
        (['--exact'], '--exact: samples a reverse checkpoint'),
        (['--segment', '4,4'], '--segment 4,4: give one length per flow (3)'),
    ],
)
def test_jacobi_sample_bad_flags_are_one_line_errors(tmp_path, capsys, args, msg):
    fck = checkpoints(tmp_path)[0]
    with pytest.raises(SystemExit) as e:
        sample.main(['--ckpt', fck, '--device', 'cpu', *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and msg in err[-1], err
