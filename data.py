"""Data for lth_ref: CIFAR-10/100 (and a synthetic stand-in) on the device; Tiny-ImageNet and ImageNet
read from image folders by DataLoader workers.

load_dataset() returns a Data (CIFAR, synthetic: the whole set as uint8 tensors on the device; it
finds, extracts or downloads the CIFAR python archive and validates every batch file) or a FolderData
(Tiny-ImageNet, ImageNet: file lists; JPEGs are decoded with Pillow, an optional extra, batch by batch).
Both can hold out a seeded validation split. train_batches() yields one epoch of shuffled, augmented
(CIFAR: 4-pixel padded random crop + flip in one gather on the device), normalized batches;
eval_batches() yields the test or validation split in order, normalized. All training randomness comes
from the caller's torch.Generator and is drawn per global batch, so an epoch is reproducible and does
not depend on the number of processes (rank r of world_size gets its slice) or of workers.
Runtime deps: torch, numpy, stdlib (Pillow for the image folders). Importing this file does nothing.
"""

import codecs
import dataclasses
import errno
import functools
import hashlib
import math
import os
import pickle
import shlex
import shutil
import signal
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# ---- constants ----
IMAGE_SHAPE = (3, 32, 32)  # (C, H, W) of every CIFAR (and synthetic) image
CROP_PAD = 4  # pixels of zero padding on each side before the random crop (CIFAR, Tiny-ImageNet)
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

# Image folders. Mean/std per channel in 0..1 units (Data keeps pixel units: times 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the standard ImageNet train statistics (PyTorch ImageNet
IMAGENET_STD = (0.229, 0.224, 0.225)   # example, torchvision models; official main_imp_imagenet_DDP.py)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)  # Tiny-ImageNet train statistics, as the official
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)   # utils.py normalizes (computing them reads 100k files)
IMAGENET_SIZE = 224  # pixels: training crops and test center crops (He et al. 2016)
IMAGENET_TEST_RESIZE = 256  # pixels: shorter side before the test center crop (224 / 0.875)
TINY_IMAGENET_SIZE = 64  # pixels: Tiny-ImageNet images are 64x64
RESIZED_CROP_SCALE = (0.08, 1.0)  # random-resized crop: area fraction (Szegedy et al. 2015, torchvision)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # random-resized crop: aspect ratio w/h, drawn log-uniformly
RESIZED_CROP_TRIES = 10  # random boxes tried before the central fallback (torchvision)
IMAGE_EXTENSIONS = (".jpeg", ".jpg")  # files read from the folders (case-insensitive)
MAX_WORKERS = 8  # DataLoader workers per process at most: Pillow decodes + crops ~400 ImageNet-sized
#                  JPEGs/s per core (measured, 500x375), so 8 feed ~3k images/s, ResNet-50 on one GPU
SEED_HIGH = 2 ** 62  # per-sample seeds are drawn from [0, SEED_HIGH): int64 on any device


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


class SplitSizes:
    """num_train / num_val / num_test, from split_labels(split) -> int64 labels (N,) of the split."""

    @property
    def num_train(self) -> int:
        return len(self.split_labels("train"))

    @property
    def num_val(self) -> int:
        return len(self.split_labels("val"))

    @property
    def num_test(self) -> int:
        return len(self.split_labels("test"))


@dataclass
class Data(SplitSizes):
    """A dataset held whole as uint8 tensors on one device (CIFAR, synthetic)."""
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32), on the device
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor  # uint8 (M, 3, 32, 32)
    test_y: torch.Tensor  # int64 (M,)
    num_classes: int
    mean: torch.Tensor  # float32 (3,), pixel units 0..255, from the full training set
    std: torch.Tensor  # float32 (3,), pixel units 0..255
    val_x: torch.Tensor | None = None  # uint8 (V, 3, 32, 32): training images held out (val_split)
    val_y: torch.Tensor | None = None  # int64 (V,)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # (C, H, W) of the batches

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def split_tensors(self, split: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return {"train": (self.train_x, self.train_y), "val": (self.val_x, self.val_y),
                "test": (self.test_x, self.test_y)}[split]

    def split_labels(self, split: str) -> torch.Tensor:
        y = self.split_tensors(split)[1]
        return torch.zeros(0, dtype=torch.int64) if y is None else y

    def split_train(self, keep: torch.Tensor, held: torch.Tensor) -> "Data":
        """Training images `held` (int64 indices) become the validation split, `keep` the training split."""
        if len(held) == 0 and len(keep) == self.num_train:
            return dataclasses.replace(self, val_x=self.train_x[:0], val_y=self.train_y[:0])  # no copy
        return dataclasses.replace(self, train_x=self.train_x[keep], train_y=self.train_y[keep],
                                   val_x=self.train_x[held], val_y=self.train_y[held])

    def to(self, device) -> "Data":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Data(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


# ---- CIFAR files: md5, download, safe extraction ----
def file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(DOWNLOAD_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path: str, expected: str, hint: str) -> None:
    """Raise DataError (with `hint`, the fix) unless the file at `path` has md5 `expected`."""
    try:
        got = file_md5(path)
    except OSError as e:
        raise read_fault(path, e) from None
    if got != expected:
        raise DataError(f"{path} is corrupt (md5 {got}, expected {expected}). {hint}")


def download(spec: CifarSpec, data_dir: str, log) -> str:
    """Download spec.archive into data_dir: temp file -> md5 check -> atomic rename. Returns its path."""
    dest = os.path.join(data_dir, spec.archive)
    fix = (f"Put {spec.archive} (or the extracted {spec.folder}/) into {os.path.abspath(data_dir)} "
           "and run again.")
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


def check_not_the_folder(data_dir: str, folder: str, marker: str | None = None) -> None:
    """DataError when --data-dir is the dataset's folder itself (named `folder`, or holding its file
    `marker`) rather than the folder that holds it: the usual slip, whose fix is its parent."""
    path = os.path.abspath(data_dir)
    if os.path.basename(path) == folder or marker and os.path.isfile(os.path.join(path, marker)):
        raise DataError(f"--data-dir {data_dir} is the dataset's {folder}/ folder itself: pass the folder "
                        f"that holds it, --data-dir {os.path.dirname(path)}")


def read_fault(path: str, e: OSError) -> DataError:
    """The DataError of a data file or folder that cannot be read (its permissions), not "corrupt"."""
    return DataError(f"cannot read {path} ({e.strerror or e}): fix its permissions, or pass another "
                     "--data-dir")


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
    try:
        tmp = tempfile.mkdtemp(dir=data_dir, prefix=".extract-")
    except OSError as e:                       # a read-only --data-dir that holds only the archive
        tar = f"tar xzf {shlex.quote(archive)} -C {shlex.quote(data_dir)}"
        raise DataError(f"cannot extract {archive} into {os.path.abspath(data_dir)} ({e.strerror or e}): "
                        f"extract it there yourself ({tar}), or pass a --data-dir this user may "
                        "write") from None
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for m in members:
                    check_member(m, archive)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:   # not "corrupt": the archive cannot be read,
                raise read_fault(archive, e) if e.filename == archive else e   # or written out (disk full)
            raise DataError(f"could not extract {archive} ({e}); it is corrupt or not a .tar.gz. "
                            f"Delete it and put the official {spec.archive} into "
                            f"{os.path.abspath(data_dir)}.") from None
        if not os.path.isdir(os.path.join(tmp, spec.folder)):
            raise DataError(f"{archive} has no folder {spec.folder}/; it is not the {spec.name} python "
                            f"archive. Delete it and put the official {spec.archive} into "
                            f"{os.path.abspath(data_dir)}.")
        folder = os.path.join(data_dir, spec.folder)
        try:
            os.replace(os.path.join(tmp, spec.folder), folder)
        except OSError as e:                   # another process (torchrun's ranks, a second --method) won
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not os.path.isdir(folder):
                raise
            log(f"{folder} was extracted meanwhile by another process: using it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def find_folder(spec: CifarSpec, data_dir: str, download_ok: bool, log) -> str:
    """The extracted folder; else extract the archive in data_dir (md5 checked); else download it (if
    allowed)."""
    folder = os.path.join(data_dir, spec.folder)
    if os.path.isdir(folder):
        return folder
    check_not_the_folder(data_dir, spec.folder, spec.train_files[0])
    if os.path.lexists(folder):
        raise DataError(f"{folder} is not a folder (a file, or a link to nothing); {spec.archive} is "
                        f"extracted there: move or delete it and run again.")
    archive = os.path.join(data_dir, spec.archive)
    if os.path.isfile(archive):
        check_md5(archive, spec.md5, f"It is not the official {spec.archive} (cut short, or another file): "
                  "delete it and run again to download it, or put the official archive in its place.")
    elif not download_ok:
        raise DataError(f"{spec.name} not found in {data_dir} and downloading is off. Put "
                        f"{spec.archive} (or the extracted {spec.folder}/) into "
                        f"{os.path.abspath(data_dir)}, or allow the download.")
    else:
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
        f = open(path, "rb")
    except OSError as e:
        raise read_fault(path, e) from None
    try:
        with f:
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
            if not os.access(folder, os.R_OK | os.X_OK):    # not missing: hidden by the folder's permissions
                raise read_fault(folder, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
            raise DataError(f"{folder}/ has no {name}; delete the folder and run again to re-extract "
                            f"(or re-download) {spec.archive}.")
        x, y = read_batch(path, spec.label_key, spec.num_classes)
        xs.append(x)
        ys.append(y)
    if not sum(len(y) for y in ys):
        raise DataError(f"{folder}/: {', '.join(files)} hold no images; delete the folder and run again to "
                        f"re-extract (or re-download) {spec.archive}.")
    # each row is the red plane, then green, then blue, each 32x32 row-major: (N, 3072) -> (N, 3, 32, 32)
    x = np.concatenate(xs).reshape(-1, *IMAGE_SHAPE)
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))


def load_cifar(spec: CifarSpec, data_dir: str, download_ok: bool, log) -> Data:
    """-> Data on the CPU (the whole training set, no validation split)."""
    folder = find_folder(spec, data_dir, download_ok, log)
    log(f"loading {spec.name} from {folder}")
    train_x, train_y = read_split(folder, spec.train_files, spec)
    test_x, test_y = read_split(folder, spec.test_files, spec)
    return Data(train_x, train_y, test_x, test_y, spec.num_classes, *pixel_stats(train_x))


# ---- image folders: Tiny-ImageNet and ImageNet ----
@dataclass(frozen=True)
class FolderSpec:
    name: str  # for messages
    folder: str  # under data_dir
    layout: str  # what the folder holds and where to get it (no automatic download), for messages
    image_size: int  # pixels: H = W of every batch
    mean: tuple[float, float, float]  # per channel, 0..1 units
    std: tuple[float, float, float]
    list_files: Callable  # (spec, root) -> (train files, train labels, test files, test labels, classes)
    train_view: Callable  # (PIL RGB image, numpy Generator, size) -> uint8 (3, size, size)
    test_view: Callable  # (PIL RGB image, size) -> uint8 (3, size, size)


@dataclass
class FolderData(SplitSizes):
    """A dataset of image files, decoded batch by batch by DataLoader workers (Tiny-ImageNet, ImageNet)."""
    spec: FolderSpec
    root: str  # the dataset folder; file paths are relative to it
    files: dict  # split -> numpy bytes array (N,) of relative paths: one buffer that workers share
    labels: dict  # split -> int64 (N,) CPU tensor
    num_classes: int
    mean: torch.Tensor  # float32 (3,), pixel units 0..255, on the device
    std: torch.Tensor  # float32 (3,)
    device: torch.device
    num_workers: int  # DataLoader worker processes per rank (default_workers(); 0 = decode in-process)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.spec.image_size, self.spec.image_size)

    def split_labels(self, split: str) -> torch.Tensor:
        return self.labels.get(split, torch.zeros(0, dtype=torch.int64))

    def split_train(self, keep: torch.Tensor, held: torch.Tensor) -> "FolderData":
        """Training files `held` (int64 indices) become the validation split, `keep` the training split."""
        files, labels = self.files["train"], self.labels["train"]
        return dataclasses.replace(
            self, files={**self.files, "train": files[keep.numpy()], "val": files[held.numpy()]},
            labels={**self.labels, "train": labels[keep], "val": labels[held]})

    def to(self, device) -> "FolderData":
        return dataclasses.replace(self, mean=self.mean.to(device), std=self.std.to(device),
                                   device=torch.device(device))


def import_pillow():
    """PIL.Image, imported on first use: Pillow is an optional extra, needed only for image folders."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading Tiny-ImageNet / ImageNet images needs Pillow, an optional extra: "
                        "pip install pillow") from None
    return Image


def default_workers() -> int:
    """DataLoader workers for this process: the CPUs it may use, shared among this node's processes
    (LOCAL_WORLD_SIZE, set by torchrun), one left for the process itself; 1 to MAX_WORKERS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_WORKERS, per_process - 1))


def image_files(folder: str) -> list[str]:
    """Sorted names of the image files (IMAGE_EXTENSIONS, any case) in one folder."""
    return sorted(e.name for e in folder_entries(folder)
                  if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def folder_entries(folder: str) -> list[os.DirEntry]:
    """os.scandir's entries of a data folder; read_fault when it cannot be read (its permissions)."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as e:
        raise read_fault(folder, e) from None


def folder_error(spec: FolderSpec, root: str, problem: str) -> DataError:
    return DataError(f"{spec.name}: {problem}. Expected under {root}: {spec.layout}")


def list_tiny_imagenet(spec: FolderSpec, root: str):
    """tiny-imagenet-200/: classes from wnids.txt (label = rank of the wnid in sorted order, as
    ImageFolder), train/<wnid>/images/*.JPEG; the labelled val/ set (val_annotations.txt: file, wnid)
    is the test split, as usual (test/ has no labels)."""
    try:
        with open(os.path.join(root, "wnids.txt")) as f:
            wnids = sorted({line.strip() for line in f if line.strip()})
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            annotations = [line.split("\t")[:2] for line in f if line.strip()]
    except OSError as e:
        raise folder_error(spec, root, f"cannot read {e.filename}") from None
    except UnicodeDecodeError:
        raise folder_error(spec, root, "wnids.txt or val/val_annotations.txt is not text") from None
    if not wnids:
        raise folder_error(spec, root, "wnids.txt lists no class")
    label = {wnid: i for i, wnid in enumerate(wnids)}
    train_files, train_labels = [], []
    for wnid in wnids:
        folder = os.path.join("train", wnid, "images")
        if not os.path.isdir(os.path.join(root, folder)):
            raise folder_error(spec, root, f"no folder {folder}/ for class {wnid} of wnids.txt")
        names = image_files(os.path.join(root, folder))
        if not names:
            raise folder_error(spec, root, f"{folder}/ holds no images (class {wnid} of wnids.txt)")
        train_files += [os.path.join(folder, n) for n in names]
        train_labels += [label[wnid]] * len(names)
    bad = [a for a in annotations if len(a) != 2 or a[1].strip() not in label]
    if bad:
        raise folder_error(spec, root, f"val/val_annotations.txt has {len(bad)} lines without a known "
                                       f"wnid (first: {bad[0]})")
    test_files = [os.path.join("val", "images", name) for name, _ in annotations]
    missing = [f for f in test_files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise folder_error(spec, root, f"val/val_annotations.txt names {len(missing)} images that are "
                                       f"missing (first: {missing[0]})")
    test_labels = [label[wnid.strip()] for _, wnid in annotations]
    return train_files, train_labels, test_files, test_labels, len(wnids)


def list_imagenet(spec: FolderSpec, root: str):
    """imagenet/: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the validation set, sorted into class
    folders, is the test split); label = rank of the wnid among the sorted train/ folders."""
    splits = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise folder_error(spec, root, f"no folder {split}/")
        splits[split] = sorted(e.name for e in folder_entries(folder) if e.is_dir())
    label = {wnid: i for i, wnid in enumerate(splits["train"])}
    unknown = sorted(set(splits["val"]) - set(label))
    if not label or unknown:
        raise folder_error(spec, root, "no class folders in train/" if not label else
                           f"val/ has class folders missing from train/: {', '.join(unknown[:3])}")
    out = []
    for split in ("train", "val"):
        files, labels = [], []
        for wnid in splits[split]:
            names = image_files(os.path.join(root, split, wnid))
            if split == "train" and not names:
                raise folder_error(spec, root, f"train/{wnid}/ holds no images (an empty class)")
            files += [os.path.join(split, wnid, n) for n in names]
            labels += [label[wnid]] * len(names)
        out += [files, labels]
    return (*out, len(label))


def to_uint8(image) -> torch.Tensor:
    """PIL RGB image (W x H) -> uint8 (3, H, W)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resize_to(image, size: int):
    """size x size, bilinear, unless it already is (Tiny-ImageNet images are 64x64)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), import_pillow().Resampling.BILINEAR)


def pad_crop_flip_view(image, rng: np.random.Generator, size: int) -> torch.Tensor:
    """Training view of a small image (as CIFAR): CROP_PAD zero padding, random size x size crop, flip."""
    dy, dx = rng.integers(0, 2 * CROP_PAD + 1, size=2)
    flip = rng.random() < 0.5
    x = to_uint8(resize_to(image, size))[None]  # (1, 3, S, S)
    return crop_flip(x, torch.tensor([dy]), torch.tensor([dx]), torch.tensor([flip]))[0]


def plain_view(image, size: int) -> torch.Tensor:
    """Test view of a small image: as is (resized to size x size if it is not)."""
    return to_uint8(resize_to(image, size))


def resized_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random-resized-crop box (left, top, w, h): area fraction in RESIZED_CROP_SCALE, aspect w/h
    log-uniform in RESIZED_CROP_RATIO; RESIZED_CROP_TRIES draws, then the central box of the nearest
    allowed aspect. Same rule as torchvision's RandomResizedCrop.get_params."""
    log_ratio = (math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1]))
    for _ in range(RESIZED_CROP_TRIES):
        area = width * height * rng.uniform(*RESIZED_CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = min(max(width / height, RESIZED_CROP_RATIO[0]), RESIZED_CROP_RATIO[1])
    w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop_flip_view(image, rng: np.random.Generator, size: int) -> torch.Tensor:
    """ImageNet training view: random-resized crop to size x size (bilinear), random horizontal flip."""
    Image = import_pillow()
    left, top, w, h = resized_crop_box(*image.size, rng)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_uint8(image)


def resize_center_crop_view(image, size: int) -> torch.Tensor:
    """ImageNet test view: shorter side to IMAGENET_TEST_RESIZE (bilinear), central size x size crop."""
    width, height = image.size
    short = IMAGENET_TEST_RESIZE
    new = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    image = image.resize(new, import_pillow().Resampling.BILINEAR)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return to_uint8(image.crop((left, top, left + size, top + size)))


TINY_IMAGENET = FolderSpec(
    "Tiny-ImageNet", "tiny-imagenet-200",
    "wnids.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt and val/images/*.JPEG. There is no "
    "automatic download: unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip into the data dir.",
    TINY_IMAGENET_SIZE, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, list_tiny_imagenet,
    pad_crop_flip_view, plain_view)
IMAGENET = FolderSpec(
    "ImageNet", "imagenet",
    "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (ILSVRC2012 train and validation images, the validation "
    "images sorted into class folders). There is no automatic download: get them from https://image-net.org.",
    IMAGENET_SIZE, IMAGENET_MEAN, IMAGENET_STD, list_imagenet,
    resized_crop_flip_view, resize_center_crop_view)


def load_folder(spec: FolderSpec, data_dir: str, download_ok: bool, log) -> FolderData:
    """Index an image folder (never downloads; download_ok is ignored) -> FolderData on the CPU."""
    import_pillow()  # fail here, with the install hint, rather than in a worker
    root = os.path.join(data_dir, spec.folder)
    if not os.path.isdir(root):
        check_not_the_folder(data_dir, spec.folder)
        raise DataError(f"{spec.name} not found: no folder {os.path.abspath(root)}. Put the folder "
                        f"{spec.folder}/ into {os.path.abspath(data_dir)} with {spec.layout}")
    log(f"indexing {spec.name} in {root}")
    train_files, train_labels, test_files, test_labels, num_classes = spec.list_files(spec, root)
    if not train_files or not test_files:
        raise folder_error(spec, root, f"found {len(train_files)} training and {len(test_files)} test images")
    encode = lambda paths: np.array([os.fsencode(p) for p in paths])  # bytes array: no per-path objects
    pixels = lambda values: torch.tensor(values, dtype=torch.float32) * 255
    return FolderData(spec, root, {"train": encode(train_files), "test": encode(test_files)},
                      {"train": torch.tensor(train_labels), "test": torch.tensor(test_labels)},
                      num_classes, pixels(spec.mean), pixels(spec.std), torch.device("cpu"),
                      default_workers())


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


def load_synthetic(data_dir: str, download_ok: bool, log) -> Data:
    """Deterministic CIFAR-shaped data (no files): learnable in a few epochs, not at once."""
    log(f"generating synthetic data: {SYNTH_TRAIN} train, {SYNTH_TEST} test, {SYNTH_CLASSES} classes")
    train_x, train_y, test_x, test_y = (t.clone() for t in synthetic_tensors())
    return Data(train_x, train_y, test_x, test_y, SYNTH_CLASSES, *pixel_stats(train_x))


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


# name -> loader(data_dir, download_ok, log) -> Data | FolderData (the whole training set, on the CPU)
DATASETS = {
    "cifar10": functools.partial(load_cifar, CIFAR10),
    "cifar100": functools.partial(load_cifar, CIFAR100),
    "tinyimagenet": functools.partial(load_folder, TINY_IMAGENET),
    "imagenet": functools.partial(load_folder, IMAGENET),
    "synthetic": load_synthetic,  # only when asked for by name, never a fallback
}
IMAGE_SHAPES = {  # (C, H, W) of the batches of each dataset, known without loading it
    **{name: IMAGE_SHAPE for name in ("cifar10", "cifar100", "synthetic")},
    "tinyimagenet": (3, TINY_IMAGENET.image_size, TINY_IMAGENET.image_size),
    "imagenet": (3, IMAGENET.image_size, IMAGENET.image_size),
}
CLASS_COUNTS = {  # classes of each dataset, known without loading it (the folders' wnids give the same)
    "cifar10": CIFAR10.num_classes, "cifar100": CIFAR100.num_classes, "synthetic": SYNTH_CLASSES,
    "tinyimagenet": 200, "imagenet": 1000,
}


def split_indices(n: int, name: str, val_split: int, train_subset: int | None, seed: int):
    """Seeded (train, val) indices, int64 and sorted, into a training set of n examples.

    val: val_split examples held out first (a seeded permutation of all n); train: the rest, or a
    seeded random train_subset of the rest. One generator seeded with `seed` draws both, so the
    validation set depends only on (seed, n, val_split); val_split=0 draws nothing and the subset is
    the one drawn without a validation split.
    """
    if val_split < 0 or val_split >= max(n, 1):
        raise DataError(f"val_split={val_split} (--val-split) is out of range: {name} has {n} training "
                        f"examples; pass a number from 0 (no validation set) to {n - 1}.")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g) if val_split else torch.arange(n)
    held, rest = perm[:val_split].sort().values, perm[val_split:].sort().values
    if train_subset is not None:
        if not 1 <= train_subset <= len(rest):
            after = f" after holding out val_split={val_split}" if val_split else ""
            raise DataError(f"train_subset={train_subset} (--train-subset) is out of range: {name} has "
                            f"{len(rest)} training examples{after}; pass a number from 1 to {len(rest)}.")
        rest = rest[torch.randperm(len(rest), generator=g)[:train_subset].sort().values]
    return rest, held


def load_dataset(name: str, data_dir: str, device="cpu", train_subset: int | None = None, seed: int = 0,
                 download: bool = True, log=print, val_split: int = 0) -> Data | FolderData:
    """Load a dataset (DATASETS key) for `device`, holding out a seeded validation split (val_split
    training examples; 0: none) and optionally keeping a seeded random subset of the rest.

    Returns Data (CIFAR, synthetic: tensors on the device) or FolderData (Tiny-ImageNet, ImageNet:
    file lists; batches are decoded by workers and moved to the device). Both have num_classes,
    image_shape (C, H, W of the batches), num_train / num_val / num_test, mean / std.
    mean/std are per channel in pixel units. CIFAR and synthetic: computed from the full training
    set (before the split and subset, so they do not depend on the seed); for the real sets these
    are the usual numbers times 255: CIFAR-10 mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435,
    0.2616); CIFAR-100 about (0.507, 0.487, 0.441), std (0.267, 0.256, 0.276). Image folders: the
    constants IMAGENET_MEAN/STD and TINY_IMAGENET_MEAN/STD.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    data = DATASETS[name](data_dir, download, log)
    keep, held = split_indices(data.num_train, name, val_split, train_subset, seed)
    if train_subset is not None or val_split:
        held_out = f", {len(held)} held out for validation" if val_split else ""
        log(f"training on {len(keep)} of the {data.num_train} training images (seeded{held_out})")
    return data.split_train(keep, held).to(device)


# ---- batches: crop, flip, normalize ----
def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              pad: int = CROP_PAD) -> torch.Tensor:
    """Zero-pad by `pad`, crop HxW at per-sample offsets (dy, dx), mirror where `flip`: one gather.

    x (B, C, H, W) any dtype; dy, dx int64 (B,) in [0, 2*pad]; flip bool (B,). Offsets pad/pad,
    no flip, is the identity.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(b, c, (h + 2 * pad) * (w + 2 * pad))  # B may be 0
    j = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - j, j) + dx[:, None]  # (B, W)
    rows = torch.arange(h, device=x.device) + dy[:, None]  # (B, H)
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(b, 1, h * w)  # (B, 1, H*W)
    return padded.gather(2, index.expand(b, c, h * w)).reshape(b, c, h, w)


def normalize(x: torch.Tensor, data: Data | FolderData) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, zero mean / unit std per channel."""
    return (x.float() - data.mean.view(1, 3, 1, 1)) / data.std.view(1, 3, 1, 1)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi): rank's contiguous share of n items, in rank order; shares differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def train_batches(data: Data | FolderData, batch_size: int, generator: torch.Generator, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of training batches: shuffled, augmented, normalized, on the data's device.

    Global batches hold batch_size examples (the last may be short); the permutation and every
    random draw (crops, flips, per-image seeds) are made from `generator` for the whole global batch,
    whatever world_size is, and rank r yields its contiguous slice (shard_bounds) of each one: the
    data of a global step does not depend on world_size, and every rank yields one slice per global
    step (empty when the last global batch has fewer than world_size examples). `generator` may
    live on the data's device (CUDA for Data on the GPU). Yields (x float32 (b, C, H, W), y int64 (b,)).
    """
    shard_bounds(0, rank, world_size)  # check rank/world_size now, not at the first batch
    if isinstance(data, FolderData):
        return folder_train_batches(data, batch_size, generator, rank, world_size)
    return memory_train_batches(data, batch_size, generator, rank, world_size)


def memory_train_batches(data: Data, batch_size, generator, rank, world_size):
    """train_batches for Data: crop + flip on the device, in one gather per batch."""
    n, device = data.num_train, data.device
    order = torch.randperm(n, generator=generator, device=device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        b = len(idx)
        dy = torch.randint(0, 2 * CROP_PAD + 1, (b,), generator=generator, device=device)
        dx = torch.randint(0, 2 * CROP_PAD + 1, (b,), generator=generator, device=device)
        flip = torch.rand(b, generator=generator, device=device) < 0.5
        lo, hi = shard_bounds(b, rank, world_size)
        idx, dy, dx, flip = idx[lo:hi], dy[lo:hi], dx[lo:hi], flip[lo:hi]
        yield normalize(crop_flip(data.train_x[idx], dy, dx, flip), data), data.train_y[idx]


def folder_train_batches(data: FolderData, batch_size, generator, rank, world_size):
    """train_batches for FolderData: a permutation and one seed per image, drawn on the generator's
    device; workers make each image's random view from its own seed, so the result does not depend
    on the number of workers."""
    n = data.num_train
    order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    seeds = torch.randint(0, SEED_HIGH, (n,), generator=generator, device=generator.device).cpu()
    return folder_batches(data, "train", ItemBatches(order, seeds, batch_size, rank, world_size))


def eval_batches(data: Data | FolderData, batch_size: int, split: str = "test", rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test (or "val") split in order, normalized, no augmentation.

    Rank r gets its contiguous shard (shard_bounds) of the split in batches of batch_size: over all
    ranks every example comes exactly once. Yields (x float32 (b, C, H, W), y int64 (b,)).
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    n = len(data.split_labels(split))
    if split == "val" and n == 0:
        raise DataError("there is no validation set: hold out N training images with val_split=N "
                        "(--val-split N).")
    lo, hi = shard_bounds(n, rank, world_size)
    if isinstance(data, FolderData):
        return folder_batches(data, split, ItemBatches(torch.arange(lo, hi), None, batch_size))
    x, y = data.split_tensors(split)
    spans = [(start, min(start + batch_size, hi)) for start in range(lo, hi, batch_size)]
    return ((normalize(x[a:b], data), y[a:b]) for a, b in spans)


class ItemBatches:
    """A batch_sampler: this rank's slice of each global batch of `order`, as lists of (index, seed)
    items (seed None: no augmentation). Made lazily: an ImageNet epoch is 1.28M items."""

    def __init__(self, order: torch.Tensor, seeds: torch.Tensor | None, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        self.order, self.seeds, self.batch_size = order, seeds, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return -(-len(self.order) // self.batch_size)  # global batches, the last may be short

    def __iter__(self):
        n = len(self.order)
        for start in range(0, n, self.batch_size):
            lo, hi = shard_bounds(min(self.batch_size, n - start), self.rank, self.world_size)
            index = self.order[start + lo:start + hi].tolist()
            seeds = [None] * len(index) if self.seeds is None else self.seeds[start + lo:start + hi].tolist()
            yield list(zip(index, seeds))


class ImageFiles(Dataset):
    """One split of a FolderData for DataLoader workers: item (index, seed) -> (uint8 (3, S, S), label),
    the training view made from that seed (seed None: the test view), or a str naming the file that
    could not be decoded (the main process raises it as a DataError, not a worker traceback)."""

    def __init__(self, data: FolderData, split: str):
        self.root, self.spec = data.root, data.spec
        self.files, self.labels = data.files[split], data.labels[split].numpy()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item
        path = os.path.join(self.root, os.fsdecode(self.files[index]))
        try:
            with import_pillow().open(path) as image:
                image = image.convert("RGB")  # decodes the whole file: a truncated JPEG fails here
        except PermissionError as e:
            return str(read_fault(path, e))
        except Exception as e:  # truncated, corrupt or missing: all mean "bad file"
            return (f"cannot decode {path} ({type(e).__name__}: {e}); the file is truncated or corrupt: "
                    f"replace it with the original from the {self.spec.name} archive.")
        size = self.spec.image_size
        if seed is None:
            return self.spec.test_view(image, size), int(self.labels[index])
        return self.spec.train_view(image, np.random.default_rng(seed), size), int(self.labels[index])


def collate_images(image_shape, items):
    """[(uint8 (C, H, W), label) or error str] -> (uint8 (B, C, H, W), int64 (B,)), or the first error."""
    errors = [item for item in items if isinstance(item, str)]
    if errors:
        return errors[0]
    x = torch.stack([x for x, _ in items]) if items else torch.zeros((0, *image_shape), dtype=torch.uint8)
    return x, torch.tensor([y for _, y in items], dtype=torch.int64)


def ignore_sigterm(worker_id: int) -> None:
    """A DataLoader worker ignores SIGTERM: a scheduler's stop sent to the whole process group is the main
    process's to act on (it stops the run, exit code 143), not a dead worker's traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def folder_batches(data: FolderData, split: str, batches: ItemBatches):
    """Decode `batches` (lists of (index, seed)) of a split with data.num_workers DataLoader workers,
    in order; move each to the device (pinned on CUDA) and normalize."""
    loader = DataLoader(ImageFiles(data, split), batch_sampler=batches, num_workers=data.num_workers,
                        collate_fn=functools.partial(collate_images, data.image_shape),
                        pin_memory=data.device.type == "cuda", worker_init_fn=ignore_sigterm)
    for batch in loader:
        if isinstance(batch, str):
            raise DataError(batch)
        x, y = batch
        yield normalize(x.to(data.device, non_blocking=True), data), y.to(data.device, non_blocking=True)
