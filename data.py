"""
Data for TarFlow/BiFlow: a built-in digits dataset, ImageNet-style folders, array files, latent
sets, and a resumable loader; and the few helpers every script shares (files, processes, errors).

    python data.py pack /path/to/imagenet/train in64.npy --img_size 64 --workers 16  # + .labels.npy
    python data.py pack digits val.npz --img_size 16 --split val --limit 1000     # FID reference

Every image dataset returns (uint8 tensor (3, H, W), int label) and has .num_classes (0 if
unlabelled) and .targets. A latent set (a folder written by `vae.py encode`: the VAE's posterior
mean and std of each image and of its mirror image, computed once) returns (float32 (2, C, h, w) =
[mean, std], int label) instead; the Loader serves the mirror image's own moments when it flips, and
the trainer draws mean + std * noise each step.

Loader turns a dataset into an endless stream of global batches that is the same for any number of
ranks and continues exactly after a resume: the batch at (epoch e, step s) is
epoch_order(n, seed, e)[0][s*B:(s+1)*B], and rank r takes the contiguous slice [r*b:(r+1)*b] of
it, b = B // world_size.
"""
import argparse
import functools
import hashlib
import json
import os
import pathlib
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset


IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.pgm', '.bmp', '.tif', '.tiff', '.webp', '.gif')


def _hash_seed(*parts) -> int:
    """A 63-bit seed from a tuple, stable across processes and platforms (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


def open_source(src: str, img_size: int, split: str = 'train', seed: int = 0, flag: str = '--data',
                latents: bool = True) -> Dataset:
    """The one place a data source is named: a built-in dataset (BUILTIN, where split and seed
    apply), an ImageNet-layout folder, a .npz/.npy array file, or (if latents) a latent set, a
    folder written by encode. Training, pack and encode read their sources through it. A latent set
    records its own sizes (.meta['img_size'], .meta['latent_shape']): the caller compares them with
    its model."""
    if src in BUILTIN:
        return BUILTIN[src](img_size, split, seed)
    if os.path.isdir(src):
        # a folder encode wrote to (complete or not), before ImageFolder: it has no class folders
        if {'meta.json', 'progress.json', 'latents.npy'} & set(os.listdir(src)):
            if not latents:
                raise UsageError(f"{flag} {src!r}: is a latent set; give the images it encodes")
            return LatentDataset(src)
        return ImageFolder(src, img_size)
    if src.endswith(('.npz', '.npy')) and os.path.isfile(src):
        return ArrayDataset(src, img_size)
    raise UsageError(f"{flag} {src!r}: expected {', '.join(map(repr, BUILTIN))}, "
                     "an existing image folder, or an existing .npz/.npy file")


class Source(Dataset):
    """What every data source says of itself, beside (item, label) pairs, .num_classes (0 if
    unlabelled) and .targets: whether training may flip its images (.mirrors), its held-out split
    (.heldout(), None if it has none), image i as uint8 (H, W, 3) for pack (.load(i); None if
    unreadable), and item i as the Loader serves it (.item(i, flip): mirrored if flip)."""
    mirrors = True

    def __len__(self):
        return len(self.targets)   # one label per item

    def heldout(self):
        return None

    def load(self, i):
        return self[i][0].permute(1, 2, 0).numpy()

    def item(self, i, flip=False):
        x, y = self[i]
        return (x.flip(-1) if flip else x), y

# -----------------------------------------------------------------------------
# files and processes: the few helpers every script shares
# (model.py does no I/O and no distributed work)


class UsageError(ValueError):
    """A bad input that the user can fix (a flag, a file, a folder). Its message is one line that
    names the input and the fix; the scripts print it without a traceback and exit with code 2, as
    argparse does."""


def run_cli(main, argv=None):
    """Run a script's main(argv). An anticipated error ends it as argparse's errors do:
    'prog: error: message' on stderr, exit code 2, no traceback. Anticipated means a UsageError, or
    an OSError that the project raised with a message of its own (it has no errno, unlike the
    OS's). Any other exception is a bug and keeps its traceback."""
    try:
        return main(argv)
    except (UsageError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        line = f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(e).split())}"   # one line
        sys.stderr.write(line + '\n')   # one write (stderr is line-buffered): no interleaving
        if path := os.environ.get('TORCHELASTIC_ERROR_FILE'):   # torchrun's summary shows it
            pathlib.Path(path).write_text(json.dumps({'message': {'message': line, 'extraInfo': {
                'py_callstack': line, 'timestamp': str(int(time.time()))}}}))
        raise SystemExit(2) from None


def atomic_write(path: str, write) -> None:
    """write(f) into a temporary file beside path (unique per process), fsync, then rename over
    path: a crash, a full disk or a second writer never leaves a half-written file at path, and a
    failed write leaves no temporary behind. The file gets the user's umask."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp',
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, 'wb') as f:
            os.umask(umask := os.umask(0))   # reading the umask means setting it: set it back
            os.fchmod(fd, 0o666 & ~umask)   # the user's umask, as any tool's files (not 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:   # after a failed write (after a rename, tmp is gone)
        if os.path.exists(tmp):
            os.remove(tmp)


def check_flags(values: dict, ranges: dict) -> None:
    """Refuse in one line, before any work, a flag's number outside its interval (ranges: flag ->
    '[1, inf)', '(0, 1]', ...; an open end excludes its bound, so nan and (at an open inf) inf are
    refused; a flag set to None passes) and a --device that is not 'auto', 'cpu', 'cuda' or
    'cuda:N' of a GPU this machine has."""
    for k, r in ranges.items():
        lo, hi = map(float, r[1:-1].split(','))
        if (v := values.get(k)) is not None and not (
                (lo < v if r[0] == '(' else lo <= v) and (v < hi if r[-1] == ')' else v <= hi)):
            raise UsageError(f'--{k} {v}: must be in {r}')
    device, gpus = values.get('device') or 'auto', torch.cuda.device_count()
    if not (device in ('auto', 'cpu', 'cuda') or device[:5] == 'cuda:' and device[5:].isdigit()):
        raise UsageError(f"--device {device}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith('cuda') and int(device[5:] or 0) >= gpus:
        raise UsageError(f'--device {device}: this machine has {gpus} CUDA GPU(s): try cpu')


def check_writable(path: str, flag: str, folder: bool = False) -> None:
    """Fail now, naming the flag, unless a file can be written at path (folder: in the folder path,
    made if missing), before the work that ends by writing it. A file is made there and removed:
    permission bits say nothing of a read-only disk, nor to root."""
    where = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        if os.path.exists(path) and os.path.isdir(path) != folder:
            raise UsageError(f'{flag} {path}: is a {"file" if folder else "folder"}')
        os.makedirs(where, exist_ok=True) if folder else None
        tempfile.TemporaryFile(dir=where).close()
    except OSError:   # missing, not a folder, read-only, no permission
        raise UsageError(f'{flag} {path}: folder {where} is missing or read-only') from None


def on_rank0(check, rank: int, world: int):
    """check() on rank 0 alone (a costly check, or one of a file that rank 0 writes), its refusal
    raised on every rank: no rank is left waiting in a collective for one that has exited.
    -> what check returned (None on the other ranks)."""
    try:
        result, box = check() if rank == 0 else None, [None]
    except (UsageError, OSError) as e:
        result, box = None, [str(e)]
    if world > 1:
        torch.distributed.broadcast_object_list(box)
    if box[0]:
        raise UsageError(box[0])
    return result


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as the scripts want it: the module docstring as written, and every flag's default."""


class Progress:
    """One line every 30 seconds on long work: 'what done/total | rate/s | ETA'; silent if not
    enabled (ranks other than 0)."""

    def __init__(self, total: int, what: str, enabled: bool = True):
        self.total, self.what, self.enabled, self.t0 = total, what, enabled, time.time()
        self.last = self.t0

    def update(self, done: int) -> None:
        if self.enabled and (time.time() - self.last >= 30 or done >= self.total):
            self.last, rate = time.time(), done / max(time.time() - self.t0, 1e-9)
            eta = timedelta(seconds=round((self.total - done) / max(rate, 1e-9)))
            print(f'{self.what} {done}/{self.total} | {rate:.1f}/s | ETA {eta}', flush=True)


def save_grid(images: np.ndarray, path: str, nrow: int, min_side: int = 64) -> None:
    """uint8 images (B, H, W, C) -> one PNG, nrow per row with 2-pixel white borders, written
    atomically. Images smaller than min_side are enlarged by an integer factor (nearest neighbour),
    so 16-pixel samples can be seen."""
    images = images.repeat(s := max(1, min_side // images.shape[1]), 1).repeat(s, 2)
    B, H, W, C = images.shape   # a white border above and left of each image, missing cells white
    cells = np.pad(images, ((0, -B % nrow), (2, 0), (2, 0), (0, 0)), constant_values=255)
    grid = cells.reshape(-1, nrow, H + 2, W + 2, C).swapaxes(1, 2).reshape(-1, nrow * (W + 2), C)
    grid = np.pad(grid, ((0, 2), (0, 2), (0, 0)), constant_values=255)   # and the bottom, right
    atomic_write(path, lambda f: Image.fromarray(grid[..., 0] if C == 1 else grid).save(f, 'PNG'))


def read_torch_file(path: str, flag: str, hint: str = ''):
    """torch.load(weights_only=True) on CPU, with errors that name the flag and the file; hint
    (where to get the file) follows the error of a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{flag} {path}: no such file{hint}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # not a torch file, or one that needs pickled code (never loaded, for safety)
        raise UsageError(f'{flag} {path}: not a loadable torch file ({type(e).__name__})') from e


def setup_distributed(device_arg: str):
    """(rank, world, device): DDP when launched by torchrun (NCCL on GPU, gloo on CPU; a rank on the
    GPU of its LOCAL_RANK), a single process otherwise (on --device's GPU, 'cuda' and 'auto': 0)."""
    cuda = torch.cuda.is_available() if device_arg == 'auto' else device_arg.startswith('cuda')
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK'] if ddp else device_arg[5:] or 0}"
                          if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
    if not ddp:
        return 0, 1, device
    torch.distributed.init_process_group('nccl' if cuda else 'gloo')
    return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), device

# -----------------------------------------------------------------------------
# built-in digits

@functools.lru_cache(maxsize=None)
def _glyph(d: int) -> Image.Image:
    """Digit d drawn once, bold, in Pillow's scalable default font (Pillow >= 10.1), cropped to its
    ink: an 'L' mask that every image of d resizes and rotates."""
    canvas = Image.new('L', (256, 256), 0)
    ImageDraw.Draw(canvas).text((64, 64), str(d), fill=255, font=ImageFont.load_default(size=96),
                                stroke_width=3, stroke_fill=255)
    return canvas.crop(canvas.getbbox())


class Digits(Source):
    """The ten digits in Pillow's built-in font, random colours/size/position/rotation,
    deterministic per index."""
    SIZES = {'train': 60000, 'val': 10000}
    mirrors = False   # a mirrored digit is no digit: never flipped in training

    def __init__(self, img_size: int = 16, split: str = 'train', seed: int = 0):
        if img_size < 8:
            raise UsageError(f"--img_size {img_size}: digits need at least 8 pixels")
        if split not in self.SIZES:   # --split of pack and encode
            raise UsageError(f"digits split {split!r}: expected one of {sorted(self.SIZES)}")
        self.img_size, self.split, self.seed, self.num_classes = img_size, split, seed, 10
        self.targets = np.arange(self.SIZES[split]) % 10   # balanced, readable without drawing

    def heldout(self):
        """The val split, drawn as this one is (stage 1's held-out bits/dim)."""
        return Digits(self.img_size, 'val', self.seed)

    def __getitem__(self, i):
        rng, label = random.Random(_hash_seed('digits', self.seed, self.split, int(i))), int(i) % 10
        # drawn at 4x and box-downsampled, so edges are antialiased like a photo of a digit
        S, g, h = 4 * self.img_size, _glyph(label), rng.uniform(0.55, 0.85) * 4 * self.img_size
        g = g.resize((max(1, round(g.width * h / g.height)), max(1, round(h))), Image.BILINEAR)
        g = g.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, expand=True)
        # jitter within the free margin (at most 10% of the side): the digit never leaves the frame
        x0, y0 = (S - g.width) / 2, (S - g.height) / 2
        jx, jy = min(max(x0, 0), 0.1 * S), min(max(y0, 0), 0.1 * S)
        mask = Image.new('L', (S, S), 0)
        mask.paste(g, (round(x0 + rng.uniform(-jx, jx)), round(y0 + rng.uniform(-jy, jy))))
        m = np.asarray(mask.reduce(4), dtype=np.float32)[:, :, None] / 255.0   # (H, W, 1)
        # foreground and background colours whose luma differs by >= 100/255 (readable at 16x16)
        fg = bg = np.zeros(3, np.float32)
        while abs(float((fg - bg) @ np.float32([0.299, 0.587, 0.114]))) < 100:   # luma
            fg, bg = np.array([[rng.randrange(256) for _ in 'rgb'] for _ in 'fb'], np.float32)
        img = np.rint(bg + (fg - bg) * m).astype(np.uint8)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), label


# built-in datasets by name (no download), each built as (img_size, split, seed)
BUILTIN = {'digits': Digits}

# -----------------------------------------------------------------------------
# image folders and array files

def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha dropped and EXIF orientation ignored (as in ADM). 16-bit, 32-bit
    and float grayscale (modes I;16, I, F), which Pillow's conversion would clip at 255, are scaled
    from the smallest white level that holds all their values (16-bit from 65535); values outside
    every range (negative, NaN, larger) are refused by name."""
    if img.mode[0] in 'IF':
        a = np.asarray(img).astype(np.float64)
        # the white levels a 16-bit, 32-bit or float grayscale image may be stored with
        whites = (65535.0,) if img.mode.startswith('I;16') else (1.0, 255.0, 65535.0, 2.0 ** 31 - 1)
        white = next((t for t in whites if 0 <= a.min() and a.max() <= t), None)   # NaN: None
        if white is None:
            raise UsageError(f'PIL mode {img.mode} image with values in [{a.min():g}, '
                             f'{a.max():g}]: expected values in [0, {whites[-1]:.0f}]')
        img = Image.fromarray(np.rint(a * (255.0 / white)).astype(np.uint8), 'L')
    elif img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')   # avoids Pillow's warning for palette transparency as bytes
    return img.convert('RGB')


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while possible, BICUBIC to min side == size,
    crop the centre -> (H, W, 3)."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    top, left = (img.height - size) // 2, (img.width - size) // 2
    return np.asarray(img)[top:top + size, left:left + size]


class ImageFolder(Source):
    """root/<class>/<image> (ImageNet layout), labels = index in the sorted class names,
    ADM centre crop. An unreadable file is served as the next readable one."""

    def __init__(self, root: str, img_size: int):
        self.root, self.img_size, self.files, targets = root, img_size, [], []
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        # listing only, no decoding, so ImageNet indexes in seconds
        for c, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
                dirnames.sort()
                found = [f for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
                self.files += [os.path.join(dirpath, f) for f in found]
                targets += [c] * len(found)
        if not self.files:
            raise UsageError(f"image folder {root!r}: has no class subfolders with images "
                             f"(expected root/<class>/<image>, {', '.join(IMG_EXTENSIONS)})")
        self.targets, self.num_classes = np.array(targets, dtype=np.int64), len(self.classes)
        self.unreadable = set()   # paths that failed in this process (each worker has its own)

    def load(self, i):
        """Decode and crop file i -> uint8 (H, W, 3),
        or None (with a warning, once per file) if unreadable."""
        path = self.files[i]
        try:
            with Image.open(path) as img:
                # JPEG: decode at 1/2, 1/4 or 1/8 scale with the short side still >= img_size, the
                # halvings ADM's BOX steps would make, in a fraction of the time (others: no-op)
                img.draft('RGB', (self.img_size, self.img_size))
                return center_crop(_to_rgb(img), self.img_size)
        except Exception as e:   # truncated, corrupt, unsupported mode...: "unreadable"
            if path not in self.unreadable:
                self.unreadable.add(path)
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")

    def __getitem__(self, i):
        # an unreadable file's substitute: the next readable file in sorted order (wrapping), with
        # its own label; deterministic, keeps batches full, almost always of the same class
        for j in ((i + k) % len(self.files) for k in range(len(self.files))):
            arr = self.load(j)
            if arr is not None:
                return torch.from_numpy(arr.copy()).permute(2, 0, 1), int(self.targets[j])
        raise UsageError(f"image folder {self.root!r}: no file could be read")


class _Map(np.memmap):
    """A memory-mapped .npy file that pickles as its path: a DataLoader worker maps the file again
    instead of receiving a copy of the whole array."""

    def __reduce_ex__(self, protocol):
        return np.load, (self.filename, 'r')


class ArrayDataset(Source):
    """A packed .npy (uint8 (N, H, W, 3), read by memory map: ImageNet 64 is 15.7 GB, which 8 ranks
    must not each load; labels in X.labels.npy) or an ADM .npz (arr_0 images, optional arr_1
    labels), read into memory."""

    def __init__(self, path: str, img_size: int):
        try:   # a truncated or foreign file, or pickled objects (never loaded): one line
            if path.endswith('.npz'):   # ADM's: arr_0 images, arr_1 labels; read into memory
                with np.load(path) as f:
                    a, labels = f.get('arr_0', np.zeros(0)), f.get('arr_1')
            else:   # pack's: memory-mapped images, labels in X.labels.npy if any
                a, lp = np.load(path, mmap_mode='r').view(_Map), path[:-4] + '.labels.npy'
                labels = np.load(lp) if os.path.isfile(lp) else None
        except Exception as e:
            raise UsageError(f'{path}: not a readable .npy/.npz ({type(e).__name__})') from None
        if a.dtype != np.uint8 or a.shape[1:] != (img_size, img_size, 3):
            raise UsageError(f"{path}: expected uint8 images (N, {img_size}, {img_size}, 3) for "
                             f"--img_size {img_size} (arr_0 of an .npz), got {a.dtype} {a.shape}")
        if labels is not None and (labels.shape != (len(a),) or labels.dtype.kind not in 'iu'
                                   or (len(a) and labels.min() < 0)):
            raise UsageError(f"{path}: labels must be {len(a)} integers >= 0, "
                             f"got {labels.dtype} {labels.shape}")
        self.num_classes = 0 if labels is None or not len(a) else int(labels.max()) + 1
        self.targets = (np.zeros(len(a)) if labels is None else labels).astype(np.int64)
        self._arr = a

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self._arr[i])).permute(2, 0, 1), int(self.targets[i])


def pack(src_dir: str, out: str, img_size: int, num_workers: int = 0, split: str = 'train',
         limit: int | None = None) -> None:
    """Centre-crop an image folder into one .npy (memory-mapped, labels in X.labels.npy) or
    ADM .npz, atomically. src_dir 'digits' writes the first `limit` images of a built-in split
    instead (e.g. FID reference images)."""
    if not out.endswith(('.npy', '.npz')):
        raise UsageError(f"pack OUT {out!r}: must end in .npy or .npz")
    check_writable(out, 'pack OUT')
    ds = open_source(src_dir, img_size, split, flag='pack SRC', latents=False)
    n, tmp = len(ds) if limit is None else min(limit, len(ds)), f'{out}.tmp{os.getpid()}.npy'
    try:
        # written through a memory map, so ImageNet never has to fit in RAM
        images = np.lib.format.open_memmap(tmp, 'w+', np.uint8, (n, img_size, img_size, 3))
        labels, bad, progress = ds.targets[:n].copy(), [], Progress(n, 'packed')
        # image i (None if unreadable) decoded in a worker (batch_size=None: collate_fn gets i)
        for i, arr in enumerate(DataLoader(range(n), batch_size=None, collate_fn=ds.load,
                                           num_workers=num_workers)):
            bad += [] if arr is not None else [i]
            images[i] = arr if arr is not None else 0
            progress.update(i + 1)
        if len(bad) == n:
            raise UsageError(f"pack SRC {src_dir!r}: no image could be read")
        # an unreadable row gets ImageFolder's substitute (next readable file, its label): the
        # array serves exactly what the folder would, item for item, so training is the same
        ok = np.setdiff1d(np.arange(n), bad)
        for i in bad:
            j = ok[np.searchsorted(ok, i) % len(ok)]
            images[i], labels[i] = images[j], labels[j]
        images.flush()
        if out.endswith('.npz'):
            atomic_write(out, lambda f: np.savez(f, arr_0=images, arr_1=labels))
        else:   # labels first: an X.npy always has them
            atomic_write(out[:-4] + '.labels.npy', lambda f: np.save(f, labels))
            os.replace(tmp, out)
    finally:   # a failed or interrupted pack leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"packed {n} images of {img_size}x{img_size} from {src_dir} into {out}; {len(bad)} "
          f"unreadable{' (each replaced by the next readable file)' if bad else ''}")

# -----------------------------------------------------------------------------
# latent sets: images encoded once by the VAE (vae.py encode writes them), read here


def latent_norm(meta: dict):
    """(mean, std), float32 tensors of shape (C,), of a latent set's meta:
    normalised = (latent - mean[:, None, None]) / std[:, None, None]."""
    return (torch.tensor(meta['norm']['mean'], dtype=torch.float32),
            torch.tensor(meta['norm']['std'], dtype=torch.float32))


class LatentDataset(Source):
    """A latent set written by encode: OUT/latents.npy float32 (N, 2, 2, C, h, w) =
    [image, mirror image] x [posterior mean, std], read by memory map (ImageNet 256 is 84 GB),
    OUT/labels.npy int64 (N,), OUT/meta.json. item(i, flip) -> (float32 (2, C, h, w) =
    [mean, std] of image i, or of its mirror image if flip, label); ds[i] is item(i, False).
    The trainer draws a posterior sample mean + std * noise and normalises it (latent_norm)."""

    def __init__(self, path: str):
        meta_file = pathlib.Path(path, 'meta.json')
        self.meta = meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if meta.get('format') != 'latents':
            raise UsageError(f"latent set {path!r}: no meta.json of a latent set: write one with "
                             "`vae.py encode`, or if it did not finish, rerun the same command")
        # encode writes meta.json last, when the arrays are complete
        self.latent_shape, self.num_classes = tuple(meta['latent_shape']), meta['num_classes']
        self._arr = np.load(os.path.join(path, 'latents.npy'), mmap_mode='r').view(_Map)
        self.targets = np.load(os.path.join(path, 'labels.npy')).astype(np.int64)

    def item(self, i, flip=False):
        return torch.from_numpy(np.array(self._arr[i, int(flip)])), int(self.targets[i])

    __getitem__ = item

# -----------------------------------------------------------------------------
# deterministic, sharded, resumable loading


def epoch_order(n: int, seed: int, epoch: int):
    """(order, flips) of one epoch, the same on every rank: a permutation of the n items, and
    whether item i is mirrored left-right (bool (n,), by index, not by position)."""
    gen = torch.Generator().manual_seed(_hash_seed('perm', seed, epoch))
    return torch.randperm(n, generator=gen), torch.rand(n, generator=gen) < 0.5


class Loader(Iterator):
    """Endless iterator over this rank's share of deterministic global batches;
    state_dict() resumes exactly."""

    def __init__(self, dataset, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False, flip: bool = False):
        if global_batch <= 0 or global_batch % world_size or len(dataset) < global_batch:
            raise UsageError(f"--batch_size {global_batch}: must be a positive multiple of the "
                             f"world size {world_size}, at most the {len(dataset)} items of --data")
        self.dataset, self.global_batch, self.seed, self.flip = dataset, global_batch, seed, flip
        self.rank, self.world_size, self.epoch, self.step = rank, world_size, 0, 0
        self.steps_per_epoch = len(dataset) // global_batch   # drop_last: every batch is full
        self.workers, self._it = dict(num_workers=num_workers, pin_memory=pin_memory), None

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'step': self.step, 'n': len(self.dataset)}

    def load_state_dict(self, d) -> None:
        if d['n'] != len(self.dataset):   # the position means nothing in other data
            raise UsageError(f"the checkpoint's data position is in a dataset of {d['n']} items, "
                             f"but --data has {len(self.dataset)}: resume with the same data")
        # the batch size is a run's for good; prefetched batches (and workers) are dropped
        self.epoch, self.step, self._it = d['epoch'], d['step'], None

    def _batches(self, epoch, step):
        """This rank's [(index, flip), ...] of each step from (epoch, step) on."""
        n, B, b = len(self.dataset), self.global_batch, self.global_batch // self.world_size
        while True:
            perm, flips = epoch_order(n, self.seed, epoch)
            for s in range(step, self.steps_per_epoch):
                idx = perm[s * B + self.rank * b:][:b]
                yield [(i, self.flip and f) for i, f in zip(idx.tolist(), flips[idx].tolist())]
            epoch, step = epoch + 1, 0

    def __getitem__(self, batch):
        """self[[(index, flip), ...]] -> one batch (x, y), made in a DataLoader worker (the Loader
        is its DataLoader's dataset): uint8 images become float32 (B, 3, H, W) in [-1, 1] there, so
        pinned memory holds the final tensor; a latent set's moments (B, 2, C, h, w) pass as
        they are."""
        items = [self.dataset.item(i, flip) for i, flip in batch]
        x = torch.stack([x for x, _ in items])
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
        return x, torch.tensor([y for _, y in items], dtype=torch.int64)

    def __next__(self):
        if self._it is None:
            # batch_size=None: each index the sampler yields is a whole batch; tuple keeps (x, y)
            self._it = iter(DataLoader(self, batch_size=None, collate_fn=tuple, **self.workers,
                                       sampler=self._batches(self.epoch, self.step)))
        self.epoch, self.step = divmod(self.epoch * self.steps_per_epoch + self.step + 1,
                                       self.steps_per_epoch)
        return next(self._it)

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('cmd', choices=['pack'], help='centre-crop SRC into one .npy or ADM .npz file')
    p.add_argument('src', metavar='SRC', help="an image folder SRC/<class>/<image>, or 'digits'")
    p.add_argument('out', metavar='OUT', help='.npy (labels in X.labels.npy) or ADM .npz')
    p.add_argument('--img_size', type=int, default=64, help='image side in pixels')
    p.add_argument('--split', default='train', help="with SRC 'digits': 'train' or 'val'")
    p.add_argument('--limit', type=int, help='pack only the first LIMIT images')
    p.add_argument('--workers', type=int, default=0, help='decoding processes (0: this one)')
    a = p.parse_args(argv)
    check_flags(vars(a), {'img_size': '[1, inf)', 'limit': '[1, inf)', 'workers': '[0, inf)'})
    pack(a.src, a.out, a.img_size, a.workers, a.split, a.limit)


if __name__ == '__main__':
    run_cli(main)
