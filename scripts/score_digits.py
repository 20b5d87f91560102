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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from data import Digits, HelpFormatter, Loader, UsageError, run_cli  # noqa: E402


def digit_accuracy(files, img_size=16, steps=1500, seed=0):
    """-> {file: share of its samples that the CNN reads as their requested class (arr_1)}."""
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
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    out = {}
    for path in files:
        with np.load(path) as arrays:
            if 'arr_1' not in arrays.files:
                raise UsageError(f'{path}: needs arr_1 (the requested labels) beside arr_0')
            x = torch.from_numpy(arrays['arr_0']).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                out[path] = float((net(x).argmax(1).numpy() == arrays['arr_1']).mean())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('files', nargs='+',
                   help='sample files written by sample.py --npz; include a packed val split '
                   '(data.py pack digits --split val) to see the classifier on real digits')
    p.add_argument('--img_size', type=int, default=16, help='image side in pixels')
    p.add_argument('--steps', type=int, default=1500, help='classifier training steps (batch 128)')
    args = p.parse_args(argv)
    for path in args.files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no such file')
    for path, acc in digit_accuracy(args.files, args.img_size, args.steps).items():
        print(f'{path}: {100 * acc:.1f}% read as the requested class')


if __name__ == '__main__':
    run_cli(main)
