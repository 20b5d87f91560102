"""
Tests of issue 10 (d): paper scale on 8 GPUs. Denoising memory, sample gathering, generators on the model's device,
memory-mapped .npz, FID batch, JPEG draft decoding. CPU only (one test needs CUDA and skips without it).

    OMP_NUM_THREADS=1 python -m pytest -q test_new_d.py
"""
import inspect
import pickle
import textwrap
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fid
import sample
from data import ArrayDataset, ImageFolder, center_crop
from model import SCORE_BUDGET_BYTES, FlowConfig, ReverseModel, reverse_config_for, score_activation_bytes
import test_biflow
from test_biflow import HERE, TINY, make_flow, sample_main, tiny_state_dict, torchrun

one_thread = test_biflow.one_thread   # its autouse fixture: one torch thread per test


# ----------------------------------------------------------------------------------------------------------------------
# model.py: Tweedie denoising within a memory budget


def saved_bytes_per_image(module, x, *args):
    """Bytes of the tensors autograd keeps for the backward of module(x, *args) w.r.t. x, per image: unique storages,
    weights excluded (the same for any batch)."""
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


@pytest.mark.parametrize('cfg', [TINY, FlowConfig(img_size=16, patch_size=4, channels=64, num_blocks=2,
                                                  layers_per_block=3, head_dim=32, num_classes=0)])
def test_score_activation_bytes_match_the_saved_tensors(cfg):
    f = make_flow(cfg).requires_grad_(False)
    x = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    y = torch.arange(3) % cfg.num_classes if cfg.num_classes else None
    full = saved_bytes_per_image(f, x, y)                        # the whole flow, as without checkpointing
    assert abs(score_activation_bytes(cfg, checkpoint=False) / full - 1) < 0.1, (score_activation_bytes(cfg, False), full)
    h = torch.randn(3, cfg.num_tokens, cfg.token_dim)
    one = saved_bytes_per_image(f.blocks[0], h, y)                # what a checkpointed backward recomputes at a time
    est = score_activation_bytes(cfg, checkpoint=True)
    assert one <= est < 1.25 * one, (est, one)


def test_score_activation_bytes_give_small_chunks_at_paper_scale():
    from model import PRESETS
    per = score_activation_bytes(PRESETS['imagenet64'])
    assert 16 <= SCORE_BUDGET_BYTES // per <= 64                  # checkpointed: ~240 MiB per image
    assert 64 * score_activation_bytes(PRESETS['imagenet64'], checkpoint=False) > 100 * 2 ** 30   # the old chunk


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


def test_load_models_freezes_every_model_and_the_score_still_works(tmp_path):
    torch.save(tiny_state_dict(), tmp_path / 'afhq_model_2_64_2_1_0.05.pth')
    f, _ = sample.load_models(str(tmp_path / 'afhq_model_2_64_2_1_0.05.pth'), verbose=False)
    assert not any(p.requires_grad for p in f.parameters())
    x = torch.randn(2, 3, 8, 8)
    out = f.denoise(x, torch.tensor([0, 2]))
    assert torch.isfinite(out).all() and (out - x).abs().max() > 0
    assert not any(p.grad is not None for p in f.parameters())
    # a reverse checkpoint returns G and its F, both frozen
    fwd = make_flow()
    G = ReverseModel(reverse_config_for(TINY, denoise='score'))
    torch.save(dict(kind='reverse', model_config=asdict(G.cfg), ema=G.state_dict(), forward_config=asdict(TINY),
                    forward=fwd.state_dict()), tmp_path / 'reverse.pt')
    G, F = sample.load_models(str(tmp_path / 'reverse.pt'))
    assert not any(p.requires_grad for m in (G, F) for p in m.parameters())
    z = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    assert torch.isfinite(sample.generate(G, F, z, torch.tensor([0, 1]))).all()   # score denoising with F frozen


# ----------------------------------------------------------------------------------------------------------------------
# model.py: TarFlow.sample with a generator


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


# ----------------------------------------------------------------------------------------------------------------------
# sample.py: gathering the shards on rank 0 only


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
    for n, kw in ((1, {{}}), (5, dict(chunk_bytes=2 * 48))):   # shards of 1 and 0 images; of 3 and 2, 2 a step
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
        assert np.array_equal(g['imgs'], (idx[:, None, None, None] * 7 + np.arange(48).reshape(1, 4, 4, 3))
                              .astype(np.uint8))
        assert list(g['labels']) == list(idx * 10) and int(g['bad']) == 3


def test_sample_two_ranks_write_the_npz_of_one_process(tmp_path):
    torch.save(tiny_state_dict(), tmp_path / 'afhq_model_2_64_2_1_0.05.pth')
    args = ['--ckpt', tmp_path / 'afhq_model_2_64_2_1_0.05.pth', '--num_samples', 5, '--batch_size', 2,
            '--out', tmp_path / 'g.png']
    sample_main(*args, '--npz', tmp_path / 'one.npz')
    torchrun('sample.py', [str(a) for a in args] + ['--npz', str(tmp_path / 'two.npz')], tmp_path, 29532)
    a, b = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    assert a['arr_0'].shape == (5, 8, 8, 3) and np.array_equal(a['arr_1'], b['arr_1'])
    assert np.abs(a['arr_0'].astype(int) - b['arr_0']).max() <= 1   # float noise in the uint8 rounding at most


# ----------------------------------------------------------------------------------------------------------------------
# data.py: memory-mapped .npz, JPEG draft decoding; fid.py: the batch


def test_array_dataset_memory_maps_an_uncompressed_npz(tmp_path, monkeypatch):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 4, 1, 1, 2, 3])
    np.savez(tmp_path / 'a.npz', arr_1=labels, arr_0=imgs)    # arr_0 second: its data starts deep in the file
    ds = ArrayDataset(str(tmp_path / 'a.npz'), 8)
    assert isinstance(ds._arr, np.memmap) and ds.num_classes == 5 and list(ds.targets) == list(labels)
    assert len(pickle.dumps(ds)) < imgs.nbytes                  # DataLoader workers reopen the map, no copy
    back = pickle.loads(pickle.dumps(ds))
    for i in range(6):
        assert torch.equal(back[i][0], torch.from_numpy(imgs[i]).permute(2, 0, 1)) and back[i][1] == labels[i]
        assert torch.equal(ds[i][0], back[i][0])
    np.savez_compressed(tmp_path / 'c.npz', imgs, labels)      # compressed: read into RAM while small
    dc = ArrayDataset(str(tmp_path / 'c.npz'), 8)
    assert not isinstance(dc._arr, np.memmap) and torch.equal(dc[3][0], ds[3][0])
    monkeypatch.setattr(data, 'MAX_COMPRESSED_NPZ', imgs.nbytes - 1)
    with pytest.raises(ValueError, match='c.npz.*compressed.*np.savez'):
        ArrayDataset(str(tmp_path / 'c.npz'), 8)
    assert isinstance(ArrayDataset(str(tmp_path / 'a.npz'), 8)._arr, np.memmap)   # no limit on a mapped file


def test_imagefolder_decodes_large_jpegs_at_a_reduced_scale(tmp_path, monkeypatch):
    (tmp_path / 'c').mkdir()
    yy, xx = np.mgrid[0:192, 0:256]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / 'c' / 'a.jpg', quality=95)
    Image.fromarray(smooth).save(tmp_path / 'c' / 'b.png')
    full = center_crop(Image.open(tmp_path / 'c' / 'a.jpg').convert('RGB'), 16)
    sizes = []
    monkeypatch.setattr(data, 'center_crop', lambda img, size: sizes.append(img.size) or center_crop(img, size))
    ds = ImageFolder(str(tmp_path), 16)
    jpg, png = ds.load(0), ds.load(1)
    assert sizes == [(32, 24), (256, 192)]   # JPEG at 1/8: the short side stays >= 16, as ADM's halvings leave it
    assert jpg.shape == (16, 16, 3) and np.abs(jpg.astype(int) - full).mean() < 3
    assert np.array_equal(png, center_crop(Image.fromarray(smooth), 16))   # other formats: unchanged


def test_fid_extracts_features_in_batches_of_200():
    for fn in (fid.input_statistics, fid.load_stats, fid.fid_from_samples):
        assert inspect.signature(fn).parameters['batch_size'].default == 200
    assert fid.BATCH_SIZE == 200

