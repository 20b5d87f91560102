"""
How many digit samples read as the class they were asked for: a quick quality number for the CPU
recipe, beside FID. A small CNN is trained here, seeded, on the digits' train split (about 20 s on
CPU) and reads every file:

    python data.py pack digits val.npz --split val --img_size 16   # real digits: the ceiling
    python scripts/score_digits.py val.npz F.npz G.npz             # sample.py --npz files

Each file is an ADM-style .npz: arr_0 uint8 (N, H, W, 3) images, arr_1 (N,) requested labels.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from data import Digits, HelpFormatter, Loader, UsageError, run_cli  # noqa: E402


def digit_accuracy(files, img_size=16, steps=1500, seed=0):
    """-> {file: share of its samples that the CNN reads as their requested class (arr_1)}.
    Every file is read before the CNN trains, so a bad one fails at once."""
    samples = {path: dict(np.load(path)) if os.path.isfile(path) else {} for path in files}
    for path, arrays in samples.items():
        if not {'arr_0', 'arr_1'} <= set(arrays):
            raise UsageError(f'{path}: not a sample.py --npz file (arr_0 images, arr_1 labels)')
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64 * (img_size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    batches = iter(Loader(Digits(img_size), 128, seed=seed + 1))
    for _ in range(steps):
        x, y = next(batches)
        # samples may keep a little noise: train on clean to lightly noised digits
        x = x + 0.05 * torch.randn_like(x) * torch.rand(len(x), 1, 1, 1)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    read = lambda a: net(torch.from_numpy(a['arr_0']).permute(0, 3, 1, 2) / 127.5 - 1)  # noqa: E731
    return {path: float((read(a).argmax(1).numpy() == a['arr_1']).mean())
            for path, a in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('files', nargs='+', help='sample files written by sample.py --npz; add a packed '
                   'val split (data.py pack digits --split val) to see the CNN on real digits')
    p.add_argument('--img_size', type=int, default=16, help='image side in pixels')
    p.add_argument('--steps', type=int, default=1500, help='classifier training steps (batch 128)')
    args = p.parse_args(argv)
    for path, acc in digit_accuracy(args.files, args.img_size, args.steps).items():
        print(f'{path}: {100 * acc:.1f}% read as the requested class')


if __name__ == '__main__':
    run_cli(main)
