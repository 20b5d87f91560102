"""
Data for TarFlow/BiFlow: a built-in digits dataset, ImageNet-style folders, array files, latent
sets, and a resumable loader; and the few helpers every script shares (files, locks, processes,
errors).

    python data.py show --data digits --img_size 16 --out grid.png      # one row per class
    python data.py pack /path/to/imagenet/train in64.npy --img_size 64  # one memory-mapped file

Every image dataset returns (uint8 tensor (3, H, W), int label) and has .num_classes (0 if
unlabelled) and .targets. A latent set (a folder written by `vae.py encode`: the VAE's posterior
mean and std of each image and of its mirror image, computed once) returns (float32 (2, C, h, w) =
[mean, std], int label) instead; the Loader serves the mirror image's own moments when it flips, and
the trainer draws mean + std * noise each step.

Loader turns a dataset into an endless stream of global batches that is the same for any number of
ranks and continues exactly after a resume: the batch at (epoch e, step s) is
epoch_permutation(n, seed, e)[s*B:(s+1)*B], and rank r takes the contiguous slice [r*b:(r+1)*b] of
it, b = B // world_size.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import random
import socket
import struct
import sys
import tempfile
import time
import warnings
import zipfile

try:
    import fcntl   # POSIX file locks, for RunLock
except ImportError:   # Windows
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset


IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.pgm', '.bmp', '.tif', '.tiff', '.webp', '.gif')


def _hash_seed(*parts) -> int:
    """A 63-bit seed from a tuple, stable across processes and platforms
    (unlike Python's hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


def open_source(src: str, img_size: int, split: str = 'train', seed: int = 0, flag: str = '--data',
                latents: bool = True) -> Dataset:
    """The one place a data source is named: a built-in dataset (BUILTIN, where split and seed
    apply), an ImageNet-layout folder, a .npz/.npy array file, or (if latents) a latent set, a
    folder written by encode. build_dataset (training), pack and encode read their sources through
    it. A latent set records its own sizes (.meta['img_size'], .meta['latent_shape']), so img_size
    is not checked against it: the caller compares them with its model. Every dataset says whether a
    mirror image is a training image of its class (.mirrors) and which held-out split it has
    (.heldout(), None if it has none)."""
    if src in BUILTIN:
        return BUILTIN[src](img_size, split, seed)
    if os.path.isdir(src):
        # before ImageFolder: a latent set's folder has no class subfolders,
        # and an unfinished one must say so
        if is_latent_set(src):
            if not latents:
                raise UsageError(f"{flag} {src!r}: is a latent set already; "
                                 "give the images it was encoded from")
            return LatentDataset(src)
        return ImageFolder(src, img_size)
    if src.endswith(('.npz', '.npy')):
        return ArrayDataset(src, img_size)
    raise UsageError(f"{flag} {src!r}: expected {', '.join(map(repr, BUILTIN))}, "
                     "an existing image folder, or a .npz/.npy file")


def build_dataset(data: str, img_size: int, split: str = 'train', seed: int = 0) -> Dataset:
    """--data -> a dataset to train on (see open_source)."""
    return open_source(data, img_size, split, seed)


class Source(Dataset):
    """What every data source says of itself, beside (item, label) pairs, .num_classes (0 if
    unlabelled) and .targets: whether training may flip its images (.mirrors), its held-out split
    (.heldout()), and image i as uint8 (H, W, 3) for pack (.load(i); None if unreadable)."""
    mirrors = True

    def heldout(self):
        return None

    def load(self, i):
        return self[i][0].permute(1, 2, 0).numpy()

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
        msg = ' '.join(str(e).split())   # one line, whatever the message's own line breaks
        print(f'{os.path.basename(sys.argv[0])}: error: {msg}', file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def atomic_write(path: str, write) -> None:
    """write(f) into a temporary file beside path (unique per process), fsync, then rename over
    path: a crash, a full disk or a second writer never leaves a half-written file at path, and a
    failed write leaves no temporary behind."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(path: str, flag: str) -> None:
    """Fail now, naming the flag, if path cannot be written
    (before hours of work that end by writing it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path}: is a folder, expected a file name')
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{flag} {path}: folder {folder} does not exist')
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f'{flag} {path}: cannot write in {folder} ({e.strerror})') from e


class RunLock:
    """An exclusive lock on the outputs of one run (train.py's OUT_DIR/{stage}.lock, encode's
    OUT/encode.lock), held from acquire() to release() (or the end of the with-block). It is an
    flock on the file, which the OS drops when the process ends, however it ends; the file holds the
    holder's pid, host, start time and command. After a kill -9 the file stays, unlocked: the next
    run says it takes over a stale lock and goes on (a --resume is never blocked). Under torchrun
    only rank 0 takes it, for all ranks. Without fcntl (Windows) nothing is locked."""

    def __init__(self):
        self.fd = self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self, path: str, what: str) -> None:
        """Take the lock at path, or raise a UsageError naming `what` (the flag or folder)
        and the holder."""
        if fcntl is None:
            warnings.warn(f'{path}: no fcntl on this system, so nothing stops two runs writing '
                          f'into {what} at once')
            return
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors='replace').strip()
                os.close(fd)
                raise UsageError(f'{what} is in use by another run ({holder}; lock {path}): '
                                 'wait for it to end, or write elsewhere') from None
            # a releasing run removes the file after we opened it: lock the file that is at path now
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        stale = os.read(fd, 4096).decode(errors='replace').strip()
        # its holder died without releasing it (kill -9, power loss): the OS has dropped its flock
        if stale:
            print(f'{path}: taking over the stale lock of a run that has ended ({stale})',
                  flush=True)
        os.ftruncate(fd, 0)
        holder = (f'pid {os.getpid()} on {socket.gethostname()} since '
                  f'{datetime.datetime.now().isoformat(timespec="seconds")}: {" ".join(sys.argv)}')
        os.pwrite(fd, holder.encode(), 0)
        self.fd, self.path, self.pid = fd, path, os.getpid()

    def release(self) -> None:
        """Remove the file, then drop the lock (a no-op if not held, or in a forked child)."""
        if self.fd is None or self.pid != os.getpid():
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as the scripts want it: the module docstring as written, and every flag's default."""


class Progress:
    """One line every `every` seconds on long work: 'what done/total (pct) | rate/s | ETA'; silent
    if not enabled (ranks other than 0)."""

    def __init__(self, total: int, what: str, enabled: bool = True, every: float = 30.0):
        self.total, self.what, self.enabled, self.every = total, what, enabled, every
        self.t0 = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if not self.enabled or (now - self.last < self.every and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        print(f'{self.what} {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) | '
              f'{rate:.1f}/s | ETA {hms((self.total - done) / max(rate, 1e-9))}', flush=True)


def hms(seconds: float) -> str:
    """A duration as h:mm:ss."""
    s = round(seconds)
    return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


def save_grid(images: np.ndarray, path: str, nrow: int, min_side: int = 64) -> None:
    """uint8 images (B, H, W, C) -> one PNG, nrow per row with 2-pixel white borders, written
    atomically. Images smaller than min_side are enlarged by an integer factor (nearest neighbour),
    so 16-pixel samples can be seen."""
    s = max(1, min_side // images.shape[1])
    images = images.repeat(s, axis=1).repeat(s, axis=2)
    B, H, W, C = images.shape
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + 2) + 2, nrow * (W + 2) + 2, C), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = im
    atomic_write(path, lambda f: Image.fromarray(
        grid.squeeze(-1) if C == 1 else grid).save(f, format='PNG'))


def read_torch_file(path: str, flag: str):
    """torch.load(weights_only=True) on CPU, with errors that name the flag and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{flag} {path}: no such file')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # not a torch file, or one that needs pickled code (never loaded, for safety)
        raise UsageError(f'{flag} {path}: not a loadable torch file ({type(e).__name__})') from e


def setup_distributed(device_arg: str):
    """(rank, world, device): DDP when launched by torchrun (NCCL on GPU, gloo on CPU), a single
    process otherwise."""
    cuda = torch.cuda.is_available() if device_arg == 'auto' else device_arg.startswith('cuda')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        rank, world, local = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE']),
                              int(os.environ['LOCAL_RANK']))
        device = torch.device(f'cuda:{local}') if cuda else torch.device('cpu')
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if cuda else 'gloo')
        return rank, world, device
    return 0, 1, torch.device('cuda' if cuda else 'cpu')

# -----------------------------------------------------------------------------
# built-in digits


class Digits(Source):
    """The ten digits in Pillow's built-in font, random colours/size/position/rotation,
    deterministic per index."""
    SIZES = {'train': 60000, 'val': 10000}
    mirrors = False   # a mirrored digit is no digit: never flipped in training
    _glyphs = None  # per-process cache: digit -> tight 'L' mask at high resolution

    def __init__(self, img_size: int = 16, split: str = 'train', seed: int = 0):
        if split not in self.SIZES:
            raise UsageError(f"digits split {split!r}: expected one of {sorted(self.SIZES)}")
        if img_size < 8:
            raise UsageError(f"--img_size {img_size}: digits need at least 8 pixels")
        self.img_size, self.split, self.seed = img_size, split, seed
        self.num_classes = 10
        # balanced classes, label readable without drawing
        self.targets = np.arange(self.SIZES[split]) % 10

    def __len__(self):
        return self.SIZES[self.split]

    def heldout(self):
        """The val split, drawn as this one is (stage 1's held-out bits/dim)."""
        return Digits(self.img_size, 'val', self.seed)

    def load(self, i):
        """uint8 (H, W, 3), as ImageFolder.load,
        so pack() can write a digits split to an array file."""
        return self[i][0].permute(1, 2, 0).numpy()

    @classmethod
    def glyphs(cls):
        """Render each digit once, bold, and crop it to its ink;
        every image is a resized/rotated copy."""
        if cls._glyphs is None:
            try:
                # scalable Aileron (Pillow >= 10.1)
                font, stroke = ImageFont.load_default(size=96), 3
            except (ImportError, OSError):
                # no FreeType: the tiny bitmap font, upscaled below;
                # its 1-pixel strokes become bold by upscaling
                font, stroke = ImageFont.load_default(), 0
            glyphs = {}
            for d in range(10):
                canvas = Image.new('L', (256, 256), 0)
                ImageDraw.Draw(canvas).text((64, 64), str(d), fill=255, font=font,
                                            stroke_width=stroke, stroke_fill=255)
                g = canvas.crop(canvas.getbbox())  # tight box around the ink
                # bitmap fallback: upscale blockily once, so later resizes only shrink
                if g.height < 64:
                    g = g.resize((g.width * 96 // g.height, 96), Image.NEAREST)
                glyphs[d] = g
            cls._glyphs = glyphs
        return cls._glyphs

    def __getitem__(self, i):
        label = int(self.targets[i])
        rng = random.Random(_hash_seed('digits', self.seed, self.split, int(i)))
        # draw at 4x and box-downsample so edges are antialiased like a real photo of a digit
        S = 4 * self.img_size
        g = self.glyphs()[label]
        h = rng.uniform(0.55, 0.85) * S
        g = g.resize((max(1, round(g.width * h / g.height)), max(1, round(h))), Image.BILINEAR)
        g = g.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, expand=True)
        # jitter within the free margin (at most 10% of the side)
        # so the digit never leaves the frame
        x0, y0 = (S - g.width) / 2, (S - g.height) / 2
        jx, jy = min(max(x0, 0), 0.1 * S), min(max(y0, 0), 0.1 * S)
        mask = Image.new('L', (S, S), 0)
        mask.paste(g, (round(x0 + rng.uniform(-jx, jx)), round(y0 + rng.uniform(-jy, jy))))
        m = np.asarray(mask.reduce(4), dtype=np.float32)[:, :, None] / 255.0
        fg, bg = self._colours(rng)
        img = bg + (fg - bg) * m
        return torch.from_numpy(np.rint(img).astype(np.uint8)).permute(2, 0, 1).contiguous(), label

    @staticmethod
    def _colours(rng):
        """Random foreground/background RGB whose luma differs by at least 100/255
        (readable at 16x16)."""
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        while True:
            fg = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
            bg = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
            if abs(float((fg - bg) @ luma)) >= 100:
                return fg, bg

# built-in datasets by name (no download), each built as (img_size, split, seed)
BUILTIN = {'digits': Digits}

# -----------------------------------------------------------------------------
# image folders and array files


def _gray_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """The values of a 32-bit integer ('I') or float ('F') image -> uint8, scaled from the range
    they are stored in (Pillow's own conversion clips them at 255): integers in [0, 255] as they
    are, in [0, 65535] as 16-bit, up to 2**31 - 1 as 32-bit; floats in [0, 1] as fractions of white,
    in [0, 255] as 8-bit levels. Anything else (negative, NaN, larger) has no range to read, and the
    image is refused by name."""
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    tops = (255, 65535, 2 ** 31 - 1) if mode == 'I' else (1.0, 255.0)
    top = next((t for t in tops if 0 <= lo and hi <= t), None)   # NaN fails both comparisons
    if top is None:
        raise UsageError(f'PIL mode {mode} image with values in [{lo:g}, {hi:g}]: expected '
                         + ('integers in [0, 2**31 - 1]' if mode == 'I'
                            else 'floats in [0, 1] or [0, 255]'))
    return np.rint(a.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha dropped and EXIF orientation ignored (as in ADM); 16-bit, 32-bit
    and float grayscale scaled from their range, not clipped."""
    if img.mode.startswith('I;16'):
        # Pillow's own I;16 -> RGB conversion clips at 255,
        # which would turn most 16-bit images white
        a = np.asarray(img).astype(np.float32) / 257.0
        img = Image.fromarray(np.rint(a).astype(np.uint8), 'L')
    elif img.mode in ('I', 'F'):
        img = Image.fromarray(_gray_to_8bit(np.asarray(img), img.mode), 'L')
    elif img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')  # avoids Pillow's warning for palette transparency given as bytes
    return img.convert('RGB')


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while possible, BICUBIC to min side == size,
    crop the centre -> (H, W, 3)."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


class ImageFolder(Source):
    """root/<class>/<image> (ImageNet layout), labels = index in the sorted class names,
    ADM centre crop."""

    def __init__(self, root: str, img_size: int):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root, self.img_size = root, img_size
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise UsageError(f"image folder {root!r} has no class subfolders "
                             "(expected root/<class>/<image>)")
        self.files, targets = [], []
        # listing only, no decoding, so ImageNet indexes in seconds
        for c, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.files.append(os.path.join(dirpath, f))
                        targets.append(c)
        if not self.files:
            raise UsageError(f"image folder {root!r} has class subfolders but no images "
                             f"({', '.join(IMG_EXTENSIONS)})")
        self.targets = np.array(targets, dtype=np.int64)
        self.num_classes = len(self.classes)
        # paths that failed in this process (DataLoader workers keep their own sets)
        self.unreadable = set()

    @property
    def num_unreadable(self) -> int:
        """How many distinct files failed to decode in this process."""
        return len(self.unreadable)

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """Decode and crop file i -> uint8 (H, W, 3),
        or None (with a warning, once per file) if unreadable."""
        path = self.files[i]
        try:
            with Image.open(path) as img:
                # JPEG: decode at 1/2, 1/4 or 1/8 scale with the short side still >= img_size, the
                # halvings ADM's BOX steps would make, for a fraction of the decoding time; a no-op
                # for other formats
                img.draft('RGB', (self.img_size, self.img_size))
                return center_crop(_to_rgb(img), self.img_size)
        except Exception as e:
            # truncated, corrupt, unsupported mode...: any failure means "unreadable"
            if path not in self.unreadable:
                self.unreadable.add(path)
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
            return None

    def __getitem__(self, i):
        # Substitute for an unreadable file: the next readable file in sorted order (wrapping), with
        # its own label. Deterministic, keeps batches full, and the neighbour is almost always from
        # the same class.
        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            arr = self.load(j)
            if arr is not None:
                return (torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(),
                        int(self.targets[j]))
        raise UsageError(f"image folder {self.root!r}: no file could be read")


def labels_path(npy_path: str) -> str:
    """Where pack keeps the labels of X.npy: X.labels.npy beside it."""
    return npy_path[:-len('.npy')] + '.labels.npy'


MAX_COMPRESSED_NPZ = 2 ** 31   # unpacked bytes of a compressed arr_0 that each rank may hold in RAM


def npz_memmap(path: str, key: str = 'arr_0'):
    """A read-only memory map of array `key` of an .npz whose member is stored uncompressed
    (np.savez), else None (np.savez_compressed). np.load cannot map inside a zip, but a stored
    member is the .npy file's bytes verbatim."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + '.npy')
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, 'rb') as f:
        f.seek(info.header_offset)
        # the local header: its name and extra-field lengths may differ from the central directory's
        head = f.read(30)
        if head[:4] != b'PK\x03\x04':
            raise UsageError(f'{path}: damaged zip (no local header for {key}.npy)')
        f.seek(info.header_offset + 30 + sum(struct.unpack('<HH', head[26:30])))
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            return None   # pickled objects: np.load refuses them with its own message
        return np.memmap(path, dtype, 'r', f.tell(), shape, 'F' if fortran else 'C')


class ArrayDataset(Source):
    """ADM .npz (arr_0 uint8 (N,H,W,3), optional arr_1 labels) or a packed .npy, read by memory map:
    ImageNet 64 is 15.7 GB, which 8 ranks must not each load. A compressed .npz is read into RAM,
    and refused when large."""

    def __init__(self, path: str, img_size: int):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"array file {path!r} does not exist")
        self.path, self.img_size = path, img_size
        if path.endswith('.npz'):
            with np.load(path) as f:
                if 'arr_0' not in f.files:
                    raise UsageError(f"{path}: no 'arr_0' (found {f.files}); expected ADM format")
                labels = f['arr_1'] if 'arr_1' in f.files else None
                self._arr = npz_memmap(path)
                if self._arr is None:
                    size = f.zip.getinfo('arr_0.npy').file_size
                    if size > MAX_COMPRESSED_NPZ:
                        raise UsageError(f"{path}: arr_0 is compressed "
                                         f"({size / 2 ** 30:.1f} GiB unpacked), so every rank "
                                         "would hold a copy in RAM; re-save it with np.savez "
                                         "(uncompressed, read by memory map) or as an .npy")
                    self._arr = f['arr_0']
        else:
            self._arr = np.load(path, mmap_mode='r')
            lp = labels_path(path)
            labels = np.load(lp) if os.path.isfile(lp) else None
        a = self._arr
        if a.dtype != np.uint8:
            raise UsageError(f"{path}: images must be uint8, got {a.dtype}")
        if a.ndim != 4 or a.shape[3] != 3:
            raise UsageError(f"{path}: images must have shape (N, H, W, 3), got {a.shape}")
        if a.shape[1:3] != (img_size, img_size):
            raise UsageError(f"{path}: images are {a.shape[1]}x{a.shape[2]} "
                             f"but --img_size is {img_size}")
        if labels is not None:
            integer = np.issubdtype(labels.dtype, np.integer)
            if labels.ndim != 1 or len(labels) != len(a) or not integer:
                raise UsageError(f"{path}: labels must be {len(a)} integers, "
                                 f"got {labels.dtype} {labels.shape}")
            if len(labels) and labels.min() < 0:
                raise UsageError(f"{path}: labels must be >= 0, got {labels.min()}")
        self.targets = np.zeros(len(a), np.int64) if labels is None else labels.astype(np.int64)
        self.num_classes = 0 if labels is None or not len(labels) else int(labels.max()) + 1
        self._len = len(a)

    def __getstate__(self):
        # a memmap is reopened lazily in each worker: pickling it would copy the whole array
        return ({**self.__dict__, '_arr': None} if isinstance(self._arr, np.memmap)
                else self.__dict__)

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        if self._arr is None:
            self._arr = (npz_memmap(self.path) if self.path.endswith('.npz')
                         else np.load(self.path, mmap_mode='r'))
        return (torch.from_numpy(np.array(self._arr[i])).permute(2, 0, 1).contiguous(),
                int(self.targets[i]))


def _identity(x):
    return x


class _Indexed(Dataset):
    """(i, uint8 (H,W,3) or None, label) per file,
    so pack can read in workers and still count failures."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, self.ds.load(i), int(self.ds.targets[i])


def pack(src_dir: str, out: str, img_size: int, num_workers: int = 0, split: str = 'train',
         limit: int | None = None) -> None:
    """Centre-crop an image folder into one .npy (memory-mapped, labels in X.labels.npy) or
    ADM .npz, atomically. src_dir 'digits' writes the first `limit` images of a built-in split
    instead (e.g. FID reference images)."""
    if not out.endswith(('.npy', '.npz')):
        raise UsageError(f"pack output {out!r}: must end in .npy or .npz")
    ds = open_source(src_dir, img_size, split, flag='pack SRC', latents=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    shape, tmp = (n, img_size, img_size, 3), f"{out}.tmp{os.getpid()}"
    # .npy is written through a memmap so ImageNet never has to fit in RAM
    images = (np.lib.format.open_memmap(tmp, 'w+', np.uint8, shape) if out.endswith('.npy')
              else np.empty(shape, np.uint8))
    labels, bad, progress = ds.targets[:n].copy(), [], Progress(n, 'packed')
    for i, arr, _ in DataLoader(_Indexed(ds, n), batch_size=None, num_workers=num_workers,
                                collate_fn=_identity):
        if arr is None:
            bad.append(i)
        else:
            images[i] = arr
        progress.update(i + 1)
    if len(bad) == n:
        raise UsageError(f"pack: no image in {src_dir!r} could be read")
    # unreadable rows get ImageFolder's substitute (next readable file, its label), so the packed
    # array serves exactly what the folder would, item for item, and training from either gives
    # the same batches
    ok = np.setdiff1d(np.arange(n), bad)
    for i in bad:
        j = ok[np.searchsorted(ok, i) % len(ok)]
        images[i], labels[i] = images[j], labels[j]
    if out.endswith('.npy'):
        images.flush()
        del images  # close the memmap before renaming
        with open(tmp + '.labels', 'wb') as f:
            np.save(f, labels)
        # labels first, so an existing X.npy always has them
        os.replace(tmp + '.labels', labels_path(out))
    else:
        with open(tmp, 'wb') as f:
            np.savez(f, arr_0=images, arr_1=labels)
    os.replace(tmp, out)
    print(f"packed {n} images of {img_size}x{img_size} from {src_dir} into {out}; "
          f"{len(bad)} unreadable" + (" (each replaced by the next readable file)" if bad else ""))
    for i in bad:
        print(f"  unreadable: {ds.files[i]}")

# -----------------------------------------------------------------------------
# latent sets: images encoded once by the VAE (vae.py encode writes them), read here


def is_latent_set(path: str) -> bool:
    """A folder that encode wrote to (complete or not):
    it holds meta.json, progress.json or latents.npy."""
    return any(os.path.exists(os.path.join(path, f))
               for f in ('meta.json', 'progress.json', 'latents.npy'))


def latent_norm(meta: dict):
    """(mean, std), float32 tensors of shape (C,), of a latent set's meta:
    normalised = (latent - mean) / std, with mean and std broadcast over (C, h, w) as
    mean[:, None, None]."""
    return (torch.tensor(meta['norm']['mean'], dtype=torch.float32),
            torch.tensor(meta['norm']['std'], dtype=torch.float32))


class LatentDataset(Source):
    """A latent set written by encode: OUT/latents.npy float32 (N, 2, 2, C, h, w) =
    [image, mirror image] x [posterior mean, std], read by memory map (ImageNet 256 is 84 GB),
    OUT/labels.npy int64 (N,), OUT/meta.json. item(i, flip) -> (float32 (2, C, h, w) =
    [mean, std] of image i, or of its mirror image if flip, label); ds[i] is item(i, False).
    The trainer draws a posterior sample mean + std * noise and normalises it (latent_norm)."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, 'meta.json')
        if not os.path.isfile(meta_path):
            if is_latent_set(path):
                raise UsageError(f"latent set {path!r}: the encode that writes it did not finish "
                                 "(no meta.json); rerun the same `vae.py encode` command "
                                 "to resume it")
            raise FileNotFoundError(f"latent set {path!r}: no meta.json "
                                    "(write one with `vae.py encode`)")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get('format') != 'latents' or meta.get('version') != 1:
            raise UsageError(f"{meta_path}: not a latent set of version 1 "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        self.path, self.meta, self.latent_shape = path, meta, tuple(meta['latent_shape'])
        self._arr = np.load(os.path.join(path, 'latents.npy'), mmap_mode='r')
        labels = np.load(os.path.join(path, 'labels.npy'))
        n = meta['n']
        if self._arr.dtype != np.float32 or self._arr.shape != (n, 2, 2, *self.latent_shape):
            raise UsageError(f"{path}/latents.npy: expected float32 "
                             f"{(n, 2, 2, *self.latent_shape)} as meta.json says, got "
                             f"{self._arr.dtype} {self._arr.shape}")
        if labels.shape != (n,):
            raise UsageError(f"{path}/labels.npy: expected {n} labels as meta.json says, "
                             f"got shape {labels.shape}")
        self.targets = labels.astype(np.int64)
        self.num_classes = int(meta['num_classes'])

    def __getstate__(self):
        # reopened lazily in each DataLoader worker: pickling the memmap would copy the whole array
        return {**self.__dict__, '_arr': None}

    def __len__(self):
        return len(self.targets)

    def item(self, i, flip=False):
        if self._arr is None:
            self._arr = np.load(os.path.join(self.path, 'latents.npy'), mmap_mode='r')
        return torch.from_numpy(np.array(self._arr[i, int(flip)])), int(self.targets[i])

    def __getitem__(self, i):
        return self.item(i)

# -----------------------------------------------------------------------------
# deterministic, sharded, resumable loading


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The dataset order of one epoch; the same on every rank."""
    gen = torch.Generator().manual_seed(_hash_seed('perm', seed, epoch))
    return torch.randperm(n, generator=gen)


def epoch_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Per-index horizontal flip decisions of one epoch (bool (n,)),
    independent of the order and of the rank."""
    gen = torch.Generator().manual_seed(_hash_seed('flip', seed, epoch))
    return torch.rand(n, generator=gen) < 0.5


class _BatchSampler:
    """Endless [(index, flip), ...] for this rank, starting at (epoch, step)."""

    def __init__(self, n, global_batch, rank, world_size, seed, flip, epoch, step):
        self.n, self.B, self.b, self.rank = n, global_batch, global_batch // world_size, rank
        self.seed, self.flip, self.epoch, self.step = seed, flip, epoch, step

    def __iter__(self):
        epoch, step = self.epoch, self.step
        while True:
            perm = epoch_permutation(self.n, self.seed, epoch)
            flips = (epoch_flips(self.n, self.seed, epoch) if self.flip
                     else torch.zeros(self.n, dtype=torch.bool))
            for s in range(step, self.n // self.B):
                start = s * self.B + self.rank * self.b
                idx = perm[start:start + self.b]
                yield list(zip(idx.tolist(), flips[idx].tolist()))
            epoch, step = epoch + 1, 0


class _Flippable(Dataset):
    """dataset[(i, flip)] -> the item, mirrored left-right if flip."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, flip = key
        # a latent's mirror image is not the mirror image's latent
        if isinstance(self.ds, LatentDataset):
            return self.ds.item(i, flip)
        x, y = self.ds[i]
        return (x.flip(-1) if flip else x), y


def _collate(items):
    """uint8 images -> float32 in [-1, 1] inside the worker, so pinned memory holds the final
    tensor; a latent set's float32 moments pass through as they are, (B, 2, C, h, w)."""
    x = torch.stack([x for x, _ in items])
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    return x, torch.tensor([y for _, y in items], dtype=torch.int64)


class Loader:
    """Endless iterator over this rank's share of deterministic global batches;
    state_dict() resumes exactly."""

    def __init__(self, dataset, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False, flip: bool = False):
        if global_batch <= 0 or global_batch % world_size:
            raise UsageError(f"--batch_size {global_batch} must be a positive multiple of the "
                             f"world size {world_size}")
        if len(dataset) < global_batch:
            raise UsageError(f"--batch_size {global_batch} is larger than the dataset "
                             f"({len(dataset)} items)")
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory, self.flip = num_workers, pin_memory, flip
        # drop_last: every step has a full global batch
        self.steps_per_epoch = len(dataset) // global_batch
        self.epoch, self.step = 0, 0
        self._it = None

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'step': self.step, 'n': len(self.dataset)}

    def load_state_dict(self, d) -> None:
        # the position means nothing in other data
        if d.get('n', len(self.dataset)) != len(self.dataset):
            raise UsageError(f"the checkpoint's data position is in a dataset of {d['n']} items, "
                             f"but --data has {len(self.dataset)}: resume with the same data")
        epoch, step = int(d['epoch']), int(d['step'])
        self.epoch, self.step = epoch + step // self.steps_per_epoch, step % self.steps_per_epoch
        self._it = None  # drop prefetched batches (and workers); restart at the new position

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            sampler = _BatchSampler(len(self.dataset), self.global_batch, self.rank,
                                    self.world_size, self.seed, self.flip, self.epoch, self.step)
            self._it = iter(DataLoader(_Flippable(self.dataset), batch_sampler=sampler,
                                       collate_fn=_collate, num_workers=self.num_workers,
                                       pin_memory=self.pin_memory))
        batch = next(self._it)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

# -----------------------------------------------------------------------------
# command line


def show(ds, out: str, per_class: int = 10, max_classes: int = 10) -> None:
    """A PNG with one row per class (first items of each class),
    or the first items if unlabelled."""
    k = max(1, min(ds.num_classes, max_classes))
    rows = [(np.flatnonzero(ds.targets == c)[:per_class] if ds.num_classes
             else np.arange(c * per_class, min(len(ds), (c + 1) * per_class)))
            for c in range(k)]
    save_grid(np.stack([ds[int(i)][0].permute(1, 2, 0).numpy() for idx in rows for i in idx]),
              out, nrow=per_class)
    print(f"wrote {out} ({k} classes x {per_class})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    show_cmd = sub.add_parser('show', help='save a grid of dataset images, one row per class',
                              formatter_class=HelpFormatter)
    show_cmd.add_argument('--data', default='digits',
                          help="'digits', an image folder, or a .npz/.npy file")
    show_cmd.add_argument('--img_size', type=int, default=16, help='image side in pixels')
    show_cmd.add_argument('--split', default='train', help="digits split: 'train' or 'val'")
    show_cmd.add_argument('--per_class', type=int, default=10, help='images per row')
    show_cmd.add_argument('--out', default='grid.png', help='output PNG path')
    pack_cmd = sub.add_parser('pack',
                              help='centre-crop an image folder into one .npy (or ADM .npz) file',
                              formatter_class=HelpFormatter)
    pack_cmd.add_argument('src',
                          help="image folder in ImageNet layout SRC/<class>/<image>, or 'digits'")
    pack_cmd.add_argument('out',
                          help='output .npy (labels go to OUT.labels.npy) or .npz (arr_0, arr_1)')
    pack_cmd.add_argument('--img_size', type=int, default=64, help='output side in pixels')
    pack_cmd.add_argument('--workers', type=int, default=0,
                          help='decoding processes (0 = in this process)')
    pack_cmd.add_argument('--split', default='train', help="with SRC 'digits': 'train' or 'val'")
    pack_cmd.add_argument('--limit', type=int, default=None,
                          help='pack only the first LIMIT images')
    a = p.parse_args(argv)
    if a.cmd == 'show':
        ds = build_dataset(a.data, a.img_size, a.split)
        if isinstance(ds, LatentDataset):
            p.error(f'--data {a.data}: a latent set; showing its images would need the VAE decoder')
        show(ds, a.out, a.per_class)
    else:
        pack(a.src, a.out, a.img_size, a.workers, a.split, a.limit)


if __name__ == '__main__':
    run_cli(main)
