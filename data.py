"""Data for lth_ref: CIFAR-10/100 (and a synthetic stand-in) as uint8 tensors on the device.

load_dataset() finds, extracts or downloads the CIFAR python archive, validates every batch file and
returns a Data with the whole set on the device. train_batches() shuffles, random-crops (4-pixel zero
padding) and flips a batch in one gather on the device, then normalizes; test_batches() only normalizes.
All training randomness comes from the caller's torch.Generator, so an epoch is reproducible.
Runtime deps: torch, numpy, stdlib. Importing this file does nothing.
"""

import codecs
import functools
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

# ---- constants ----
IMAGE_SHAPE = (3, 32, 32)  # (C, H, W) of every image
CROP_PAD = 4  # pixels of zero padding on each side before the random 32x32 crop
DOWNLOAD_TIMEOUT_S = 60  # seconds without data before a download gives up
DOWNLOAD_CHUNK = 1 << 20  # bytes read per chunk while downloading / hashing

SYNTH_TRAIN = 5000  # synthetic training examples
SYNTH_TEST = 500  # synthetic test examples (small: evaluated after every epoch)
SYNTH_CLASSES = 10
SYNTH_SEED = 20220  # fixed: the synthetic set is the same on every machine
SYNTH_WAVES = 4  # cosine waves summed into one class pattern
SYNTH_MAX_FREQ = 3  # cycles per image, per axis: keeps patterns smooth (low frequency)
SYNTH_CONTRAST = 40.0  # pixel units: std of a class pattern around mid-grey
SYNTH_CONTRAST_JITTER = 0.3  # per-example contrast factor drawn from 1 +- this
SYNTH_BRIGHTNESS = 20.0  # pixel units: std of a per-example, per-channel brightness offset
SYNTH_NOISE = 50.0  # pixel units: std of i.i.d. per-pixel Gaussian noise


@dataclass(frozen=True)
class CifarSpec:
    name: str  # for messages
    archive: str  # file name of the .tar.gz
    folder: str  # folder inside the archive
    url: str
    md5: str  # of the archive, as published on the CIFAR page
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str  # "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)
    num_classes: int


CIFAR10 = CifarSpec(
    "CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", 10)
CIFAR100 = CifarSpec(
    "CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
    ("train",), ("test",), "fine_labels", 100)


class DataError(Exception):
    """A data problem the user can fix; the message is a full sentence with the fix."""


@dataclass
class Data:
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32), on the device
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor  # uint8 (M, 3, 32, 32)
    test_y: torch.Tensor  # int64 (M,)
    num_classes: int
    mean: torch.Tensor  # float32 (3,), pixel units 0..255, from the full training set
    std: torch.Tensor  # float32 (3,), pixel units 0..255


# ---- CIFAR files: md5, download, safe extraction ----
def file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(DOWNLOAD_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path: str, expected: str, hint: str) -> None:
    """Raise DataError (with `hint`, the fix) unless the file at `path` has md5 `expected`."""
    got = file_md5(path)
    if got != expected:
        raise DataError(f"{path} is corrupt (md5 {got}, expected {expected}). {hint}")


def download(spec: CifarSpec, data_dir: str, log) -> str:
    """Download spec.archive into data_dir: temp file -> md5 check -> atomic rename. Returns its path."""
    dest = os.path.join(data_dir, spec.archive)
    fix = f"Put {spec.archive} (or the extracted {spec.folder}/) into {os.path.abspath(data_dir)} and run again."
    os.makedirs(data_dir, exist_ok=True)
    log(f"downloading {spec.name} from {spec.url} to {dest}")
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=spec.archive + ".", suffix=".part")
    try:
        try:
            with os.fdopen(fd, "wb") as out, \
                    urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, out, DOWNLOAD_CHUNK)
        except Exception as e:  # URLError, HTTPError, timeout, reset, disk full: all mean "no archive"
            raise DataError(f"could not download {spec.name} from {spec.url} ({e}). {fix}") from None
        check_md5(tmp, spec.md5, f"The download is corrupt and was deleted. {fix}")
        os.replace(tmp, dest)  # atomic: dest is either absent or complete
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def check_member(member: tarfile.TarInfo, archive: str) -> None:
    """Refuse absolute paths, '..', links and devices: nothing may land outside the target folder."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or os.path.isabs(member.name) or ".." in parts \
            or not (member.isfile() or member.isdir()):
        raise DataError(f"{archive} contains an unsafe member {member.name!r} (absolute path, '..', "
                        f"link or device); refusing to extract it. Delete {archive} and put the "
                        f"official archive in its place.")


def extract(spec: CifarSpec, archive: str, data_dir: str, log) -> str:
    """Extract spec.folder from the archive into data_dir (via a temp dir, then rename). Returns it."""
    log(f"extracting {archive}")
    tmp = tempfile.mkdtemp(dir=data_dir, prefix=".extract-")
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for m in members:
                    check_member(m, archive)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"could not extract {archive} ({e}); it is corrupt or not a .tar.gz. "
                            f"Delete it and put the official {spec.archive} into {os.path.abspath(data_dir)}.") from None
        if not os.path.isdir(os.path.join(tmp, spec.folder)):
            raise DataError(f"{archive} has no folder {spec.folder}/; it is not the {spec.name} python "
                            f"archive. Delete it and put the official {spec.archive} into {os.path.abspath(data_dir)}.")
        folder = os.path.join(data_dir, spec.folder)
        os.replace(os.path.join(tmp, spec.folder), folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def find_folder(spec: CifarSpec, data_dir: str, download_ok: bool, log) -> str:
    """The extracted folder; else extract the archive in data_dir; else download it (if allowed)."""
    folder = os.path.join(data_dir, spec.folder)
    if os.path.isdir(folder):
        return folder
    archive = os.path.join(data_dir, spec.archive)
    if not os.path.isfile(archive):
        if not download_ok:
            raise DataError(f"{spec.name} not found in {data_dir} and downloading is off. Put "
                            f"{spec.archive} (or the extracted {spec.folder}/) into {os.path.abspath(data_dir)}, "
                            f"or allow the download.")
        archive = download(spec, data_dir, log)
    return extract(spec, archive, data_dir, log)


# ---- CIFAR files: parsing ----
# The batch files are pickles. Unpickling may call any global a file names, so only the few that a
# numpy array needs are allowed: a tampered file cannot run code.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array rebuild (numpy.core -> numpy._core in 2.x)
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # pickle protocol 5 arrays
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # written by Python 2 / numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # re-pickled with numpy 2.x
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes under Python 3, protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return _PICKLE_GLOBALS[(module, name)]


def read_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch file -> (x uint8 (N, 3072), y int64 (N,)); DataError names a bad file.

    The files were pickled by Python 2: load with encoding="bytes" (keys come back as bytes); keys
    may also be str (files re-pickled by Python 3). Any N is accepted.
    """
    def bad(problem):
        return DataError(f"{path}: {problem}. The file is corrupt or not in CIFAR python format: delete "
                         f"{os.path.dirname(path)}/ and run again to re-extract (or re-download) it.")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated/garbled pickles raise many types (EOFError, ValueError, ...)
        raise bad(f"cannot unpickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise bad(f"holds a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise bad(f"missing key {key!r} (keys: {sorted(map(str, batch))})")
    x = batch["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise bad(f"'data' must be a uint8 array of shape (N, 3072), got {what}")
    try:
        y = np.asarray(batch[label_key])
    except (ValueError, TypeError, OverflowError) as e:
        raise bad(f"{label_key!r} is not a list of ints ({e})") from None
    if y.ndim != 1 or len(y) != len(x):
        raise bad(f"{label_key!r} must hold {len(x)} labels (one per row of 'data'), got {y.shape}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise bad(f"{label_key!r} must be ints, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise bad(f"{label_key!r} has labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")
    return x, y.astype(np.int64)


def read_split(folder: str, files: tuple[str, ...], spec: CifarSpec):
    """Concatenate batch files -> (x uint8 (N, 3, 32, 32), y int64 (N,)) on the CPU."""
    xs, ys = [], []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise DataError(f"{folder}/ has no {name}; delete the folder and run again to re-extract "
                            f"(or re-download) {spec.archive}.")
        x, y = read_batch(path, spec.label_key, spec.num_classes)
        xs.append(x)
        ys.append(y)
    # each row is the red plane, then green, then blue, each 32x32 row-major: (N, 3072) -> (N, 3, 32, 32)
    x = np.concatenate(xs).reshape(-1, *IMAGE_SHAPE)
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))


def load_cifar(spec: CifarSpec, data_dir: str, download_ok: bool, log):
    """-> (train_x, train_y, test_x, test_y, num_classes) as CPU tensors."""
    folder = find_folder(spec, data_dir, download_ok, log)
    log(f"loading {spec.name} from {folder}")
    train_x, train_y = read_split(folder, spec.train_files, spec)
    test_x, test_y = read_split(folder, spec.test_files, spec)
    return train_x, train_y, test_x, test_y, spec.num_classes


# ---- synthetic data ----
def synthetic_patterns(g: torch.Generator) -> torch.Tensor:
    """One smooth, seamless colour pattern per class: a sum of low-frequency cosines. -> (K, 3, H, W)"""
    k, (_, h, w) = SYNTH_CLASSES, IMAGE_SHAPE
    freq = torch.randint(-SYNTH_MAX_FREQ, SYNTH_MAX_FREQ + 1, (k, SYNTH_WAVES, 2), generator=g)
    freq[..., 1] += (freq == 0).all(-1)  # no constant wave: class must not be a flat colour
    amp = torch.randn(k, SYNTH_WAVES, 3, generator=g)  # per channel: each wave has its own colour
    phase = torch.rand(k, SYNTH_WAVES, 3, generator=g) * 2 * math.pi
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    angle = 2 * math.pi * (freq[..., 0, None, None] * yy / h + freq[..., 1, None, None] * xx / w)
    angle = angle[:, :, None] + phase[..., None, None]  # (K, waves, 3, H, W)
    waves = amp[..., None, None] * torch.cos(angle)
    pattern = waves.sum(1)
    return pattern / pattern.std(dim=(1, 2, 3), keepdim=True)  # unit std per class


def synthetic_split(patterns: torch.Tensor, n: int, g: torch.Generator):
    """n examples: class pattern, circularly shifted anywhere, contrast/brightness jitter, noise."""
    k, (c, h, w) = len(patterns), IMAGE_SHAPE
    y = torch.randperm(n, generator=g) % k  # balanced classes, shuffled
    dy = torch.randint(0, h, (n, 1, 1, 1), generator=g)
    dx = torch.randint(0, w, (n, 1, 1, 1), generator=g)
    rows = (torch.arange(h).view(1, 1, h, 1) + dy) % h  # (n, 1, H, 1)
    cols = (torch.arange(w).view(1, 1, 1, w) + dx) % w  # (n, 1, 1, W)
    index = (rows * w + cols).reshape(n, 1, h * w).expand(n, c, h * w)
    img = patterns[y].reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)  # (n, 3, H, W)
    contrast = 1 + SYNTH_CONTRAST_JITTER * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    bright = SYNTH_BRIGHTNESS * torch.randn(n, c, 1, 1, generator=g)
    noise = torch.randn(n, c, h, w, generator=g)
    # in place: each (n, 3, H, W) float temporary is 60 MB at n=5000
    img = img.mul_(SYNTH_CONTRAST * contrast).add_(bright + 127.5).add_(noise, alpha=SYNTH_NOISE)
    return img.round_().clamp_(0, 255).to(torch.uint8), y


def load_synthetic(data_dir: str, download_ok: bool, log):
    """Deterministic CIFAR-shaped data (no files): learnable in a few epochs, not at once."""
    log(f"generating synthetic data: {SYNTH_TRAIN} train, {SYNTH_TEST} test, {SYNTH_CLASSES} classes")
    return tuple(t.clone() for t in synthetic_tensors()) + (SYNTH_CLASSES,)


@functools.lru_cache(maxsize=1)
def synthetic_tensors():
    """The synthetic split, generated once per process (tests and benchmarks load it often)."""
    g = torch.Generator().manual_seed(SYNTH_SEED)
    patterns = synthetic_patterns(g)
    train_x, train_y = synthetic_split(patterns, SYNTH_TRAIN, g)
    test_x, test_y = synthetic_split(patterns, SYNTH_TEST, g)
    return train_x, train_y, test_x, test_y


# ---- load_dataset ----
def pixel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) -> per-channel mean, std (3,) float32 in pixel units.

    Exact, from a 256-bin histogram per channel: no (3, N*H*W) float copy (1.2 GB for CIFAR).
    """
    values = torch.arange(256, dtype=torch.float64)
    hist = torch.stack([torch.bincount(x[:, c].flatten(), minlength=256) for c in range(3)]).double()
    n = hist.sum(1)  # (3,) pixels per channel
    mean = (hist * values).sum(1) / n
    var = (hist * (values - mean[:, None]) ** 2).sum(1) / (n - 1)  # unbiased, like Tensor.std
    return mean.float(), var.sqrt().float()


# name -> loader(data_dir, download_ok, log) -> (train_x, train_y, test_x, test_y, num_classes)
DATASETS = {
    "cifar10": functools.partial(load_cifar, CIFAR10),
    "cifar100": functools.partial(load_cifar, CIFAR100),
    "synthetic": load_synthetic,  # only when asked for by name, never a fallback
}


def load_dataset(name: str, data_dir: str, device="cpu", train_subset: int | None = None,
                 seed: int = 0, download: bool = True, log=print) -> Data:
    """Load a dataset (DATASETS key) onto `device`; optionally keep a seeded random training subset.

    mean/std are per channel in pixel units, computed from the full training set (before the
    subset). For the real sets these are the usual numbers times 255: CIFAR-10 mean (0.4914,
    0.4822, 0.4465), std (0.2470, 0.2435, 0.2616); CIFAR-100 about (0.507, 0.487, 0.441), std
    (0.267, 0.256, 0.276).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    train_x, train_y, test_x, test_y, num_classes = DATASETS[name](data_dir, download, log)
    mean, std = pixel_stats(train_x)
    if train_subset is not None:
        if not 1 <= train_subset <= len(train_y):
            raise DataError(f"train_subset={train_subset} is out of range: {name} has {len(train_y)} "
                            f"training examples; pass a number from 1 to {len(train_y)}.")
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))[:train_subset]
        keep = keep.sort().values  # keep the original order; batches are shuffled anyway
        train_x, train_y = train_x[keep], train_y[keep]
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                num_classes, mean.to(device), std.to(device))


# ---- batches: crop, flip, normalize ----
def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              pad: int = CROP_PAD) -> torch.Tensor:
    """Zero-pad by `pad`, crop HxW at per-sample offsets (dy, dx), mirror where `flip`: one gather.

    x (B, C, H, W) any dtype; dy, dx int64 (B,) in [0, 2*pad]; flip bool (B,). Offsets pad/pad,
    no flip, is the identity.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(b, c, -1)  # (B, C, (H+2p)*(W+2p))
    j = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - j, j) + dx[:, None]  # (B, W)
    rows = torch.arange(h, device=x.device) + dy[:, None]  # (B, H)
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(b, 1, h * w)  # (B, 1, H*W)
    return padded.gather(2, index.expand(b, c, h * w)).reshape(b, c, h, w)


def normalize(x: torch.Tensor, data: Data) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, zero mean / unit std per channel."""
    return (x.float() - data.mean.view(1, 3, 1, 1)) / data.std.view(1, 3, 1, 1)


def train_batches(data: Data, batch_size: int, generator: torch.Generator
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: shuffled (last batch may be short), random crop + flip, normalized.

    All randomness comes from `generator` (on the data's device). Yields (x float32 (B, 3, 32, 32),
    y int64 (B,)).
    """
    n, device = len(data.train_y), data.train_x.device
    order = torch.randperm(n, generator=generator, device=device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        b = len(idx)
        dy = torch.randint(0, 2 * CROP_PAD + 1, (b,), generator=generator, device=device)
        dx = torch.randint(0, 2 * CROP_PAD + 1, (b,), generator=generator, device=device)
        flip = torch.rand(b, generator=generator, device=device) < 0.5
        yield normalize(crop_flip(data.train_x[idx], dy, dx, flip), data), data.train_y[idx]


def test_batches(data: Data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in order, normalized, no augmentation."""
    for start in range(0, len(data.test_y), batch_size):
        end = start + batch_size
        yield normalize(data.test_x[start:end], data), data.test_y[start:end]
