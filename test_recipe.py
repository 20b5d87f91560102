"""
Tests of stage 2's recipe options: the cycle term on prior noise (model.cycle_loss, train.py
--cycle) and the probe of G against F on prior and data noise (scripts/probe_reverse.py). CPU, a few seconds.

    pytest test_recipe.py
"""

import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

import model as M
import train
from model import (
    FlowConfig,
    ReverseModel,
    TarFlow,
    cycle_loss,
    patchify,
    reverse_config_for,
    reverse_loss,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'scripts'))
import probe_reverse  # noqa: E402  (scripts/ is not a package)

TINY = FlowConfig(
    img_size=8,
    in_channels=3,
    patch_size=2,
    channels=32,
    num_blocks=3,
    layers_per_block=2,
    head_dim=16,
    num_classes=3,
    noise_std=0.1,
    norm_clip=2.0,
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pair(seed=0, **kw):
    """A frozen F with non-zero output projections (a fresh one is affine per channel), a random G."""
    torch.manual_seed(seed)
    f = TarFlow(TINY)
    with torch.no_grad():
        for b in f.blocks:
            b.proj_out.weight.normal_(0, 0.1)
    f.eval().requires_grad_(False)
    g = ReverseModel(
        reverse_config_for(
            TINY, channels=32, layers_per_block=1, denoise_layers=1, head_dim=16, **kw
        )
    )
    for q in g.parameters():  # zero-initialised gates would make every prediction a constant
        q.data.normal_(0, 0.1)
    return f, g


def batch(B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 8, 8, generator=gen) * 2 - 1
    y, w = torch.tensor([0, 1, 2, -1])[:B], torch.tensor([0.0, 1.0, 2.5, 0.0])[:B]
    return x, y, w, torch.randn(B, 3, 8, 8, generator=gen)


def prior(k=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(k, TINY.num_tokens, TINY.token_dim, generator=gen),
        torch.tensor([2, -1, 0])[:k],
    )


@pytest.mark.parametrize('denoise', ['learned', 'score'])
def test_cycle_is_zero_for_the_exact_inverse_and_not_for_a_perturbed_one(denoise):
    f, g = make_pair(denoise=denoise)
    z, y = prior()
    x0 = patchify(f.reverse(z, y), TINY.patch_size)  # F^-1(z): the noisy x^0 G should predict
    preds = g(z, y, torch.zeros(len(z)))
    i = M.noisy_x0_index(g)
    assert i == (len(g.heads) - 1 if denoise == 'learned' else len(preds) - 1)
    exact = [*preds[:i], x0, *preds[i + 1 :]]
    assert cycle_loss(g, f, z, y, exact).max() < 1e-8  # round-off is ~1e-11 here
    off = [*preds[:i], x0 + 0.05 * torch.randn_like(x0), *preds[i + 1 :]]
    assert cycle_loss(g, f, z, y, off).min() > 1e-4
    assert cycle_loss(g, f, z, y).min() > 1e-3  # a random G is no inverse


def test_cycle_needs_a_noisy_x0_prediction():
    f, g = make_pair(align='naive')  # learned denoising, no heads: nothing predicts the noisy x^0
    with pytest.raises(ValueError, match='noisy x'):
        cycle_loss(g, f, *prior())


def test_cycle_gradient_reaches_g_only_through_f():
    f, g = make_pair()
    z, y = prior()
    cycle_loss(g, f, z, y).mean().backward()
    assert all(q.grad is None for q in f.parameters())
    # the x^0 head and everything before it get a gradient; the denoiser and the output head do not
    assert g.heads[-1].weight.grad.abs().sum() > 0 and g.proj_in.weight.grad.abs().sum() > 0
    assert g.final.weight.grad is None
    # the gradient is F's Jacobian applied to the residual, not the residual itself
    x0 = g(z, y, torch.zeros(3))[-2].detach().requires_grad_(True)
    cycle_loss(g, f, z, y, [None] * (len(g.heads) - 1) + [x0, None]).sum().backward()
    direct = 2 * (x0 - patchify(f.reverse(z, y), 2)).detach()
    assert not torch.allclose(x0.grad / x0.grad.norm(), direct / direct.norm(), atol=1e-2)
    f.requires_grad_(True)  # an F that would be trained is refused
    with pytest.raises(ValueError, match='frozen'):
        cycle_loss(g, f, z, y)


def test_reverse_loss_cycle_adds_its_term_and_changes_nothing_else():
    f, g = make_pair()
    x, y, w, eps = batch()
    base, terms = reverse_loss(g, f, x, y, w, eps)
    same, terms0 = reverse_loss(g, f, x, y, w, eps, cycle=0.0, prior=prior())  # weight 0: ignored
    assert torch.equal(base, same) and terms0.keys() == terms.keys()
    loss, terms1 = reverse_loss(g, f, x, y, w, eps, cycle=0.5, prior=prior())
    assert set(terms1) == set(terms) | {'cycle'}
    for k in terms:  # the data rows batched with the prior rows: the same terms up to round-off
        assert torch.allclose(terms1[k], terms[k], rtol=1e-4), k
    d = cycle_loss(g, f, *prior())
    assert torch.allclose(terms1['cycle'], d.mean(), rtol=1e-4)
    assert torch.allclose(loss, base + 0.5 * M.adaptive(d).mean(), rtol=1e-4)
    loss.backward()  # one pass of G for both kinds of rows: every parameter has a gradient
    assert all(q.grad is not None for q in g.parameters())


def test_train_cycle_flags_are_checked_and_their_noise_is_its_own_stream():
    args, _ = train.get_args([])
    assert args.cycle == 0 and args.cycle_batch is None
    for bad in (
        ['--cycle', '-1'],
        ['--cycle', 'nan'],
        ['--cycle', '1'],
        ['--stage', 'reverse', '--cycle_batch', '0'],
    ):
        with pytest.raises(SystemExit):
            train.get_args(bad)
    args = train.fill_preset_defaults(
        train.get_args(
            ['--stage', 'reverse', '--cycle', '1', '--batch_size', '8', '--cycle_batch', '2']
        )[0]
    )
    x, y = torch.zeros(8, 3, 16, 16), torch.arange(8)
    before = train.step_inputs(args, 5, x, y, 10, 0, 1)
    z, yz = train.prior_noise(args, 5, (64, 12), y, 0, 1, 'cpu')
    assert z.shape == (2, 64, 12) and torch.equal(yz, y[:2])
    assert all(
        torch.equal(a, b) for a, b in zip(before, train.step_inputs(args, 5, x, y, 10, 0, 1))
    )
    assert torch.equal(
        z, train.prior_noise(args, 5, (64, 12), y, 0, 1, 'cpu')[0]
    )  # (seed, step) fixes it
    assert not torch.equal(z, train.prior_noise(args, 6, (64, 12), y, 0, 1, 'cpu')[0])
    args.batch_size = 16  # two ranks of 8 draw the rows of one global draw, each its own slice
    both = torch.cat([train.prior_noise(args, 5, (64, 12), y, r, 2, 'cpu')[0] for r in range(2)])
    assert torch.equal(both[:2], train.prior_noise(args, 5, (64, 12), y, 0, 2, 'cpu')[0])
    assert not torch.equal(both[:2], both[2:])


def test_train_cycle_zero_is_the_default_run_and_cycle_trains(tmp_path):
    quick = [
        '--batch_size',
        '8',
        '--log_every',
        '1',
        '--sample_every',
        '1000',
        '--ckpt_every',
        '1000',
        '--lr',
        '1e-3',
        '--warmup_steps',
        '1',
        '--max_steps',
        '1',
    ]
    torch.manual_seed(
        0
    )  # an untrained CPU-preset F, in the fields of a stage-1 checkpoint stage 2 reads
    flow = TarFlow(M.PRESETS['cpu'])
    ck = str(tmp_path / 'forward.pt')
    torch.save(dict(kind='forward', ema=flow.state_dict(), model_config=asdict(flow.cfg)), ck)
    runs = {'default': [], 'zero': ['--cycle', '0'], 'on': ['--cycle', '1', '--cycle_batch', '4']}
    for name, extra in runs.items():
        train.main(
            [
                '--stage',
                'reverse',
                '--forward_ckpt',
                ck,
                '--out_dir',
                str(tmp_path / name),
                *quick,
                *extra,
            ]
        )
    sd = {n: torch.load(tmp_path / n / 'reverse.pt', weights_only=True)['model'] for n in runs}
    assert all(torch.equal(sd['default'][k], sd['zero'][k]) for k in sd['default'])
    assert any(not torch.equal(sd['default'][k], sd['on'][k]) for k in sd['default'])
    rows = [json.loads(r) for r in open(tmp_path / 'on' / 'reverse_log.jsonl')]
    assert all('cycle' in r for r in rows) and not any(
        'cycle' in json.loads(r) for r in open(tmp_path / 'zero' / 'reverse_log.jsonl')
    )


def test_probe_matches_f_on_its_own_inverse_and_separates_splits():
    f, g = make_pair()
    z, y = prior()
    traj = probe_reverse.inverse_trajectory(f, z, y)
    assert len(traj) == TINY.num_blocks + 1 and torch.equal(traj[-1], z)
    assert torch.allclose(f(M.unpatchify(traj[0], 2, 8), y)[0], z, atol=1e-4)
    r = probe_reverse.prior_gap(g, f, z, y)
    assert set(r) == {f'align{i}' for i in range(TINY.num_blocks)} | {'out', 'cycle'}
    assert all(v > 1e-3 for v in r.values())  # a random G is far from F everywhere
    x, yx, _, eps = batch()
    m = probe_reverse.z_metric(f, x, yx.clamp(min=0), eps)
    assert abs(m['noise_x'] - m['content_x']) < 1e-4 * m['noise_x']   # equal-sized x^0 errors
    assert m['noise'] > 0 and m['content'] > 0
    e = probe_reverse.data_gap(g, f, x, yx.clamp(min=0), eps)
    assert set(e) >= {'out', 'align0'} and all(v > 1e-3 for v in e.values())
