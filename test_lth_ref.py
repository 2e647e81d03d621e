"""Tests for lth_ref: models, data, masks and IMP, refill, regroup, the CLI, and the grouped GEMM.

Run with `python -m pytest -q test_lth_ref.py` (CPU, a few minutes). CUDA tests skip without a GPU.
"""
import copy
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError
from models import MODELS, BasicBlock, PadShortcut, count_params
import data
import kernels
import lth_ref as L
import models


# ---- models ----
# Exact trainable-parameter counts at 10 classes (CIFAR-10).
PARAMS_10 = {
    "resnet20": 269_722,  # He et al. 0.27M (option A: no shortcut parameters)
    "resnet32": 464_154,  # 0.46M
    "resnet44": 658_586,  # 0.66M
    "resnet56": 853_018,  # 0.85M
    "resnet110": 1_727_962,  # 1.7M
    "resnet18": 11_173_962,
    "vgg16": 14_724_042,
    "wrn32_2": 1_860_522,
}


@functools.lru_cache(maxsize=None)
def built(name, num_classes=10):
    """One shared instance per (name, num_classes) for the read-only tests (building is slow)."""
    torch.manual_seed(0)
    return MODELS[name](num_classes)


def convs(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_table_is_complete():
    assert set(MODELS) == set(PARAMS_10)


@pytest.mark.parametrize("name", sorted(PARAMS_10))
def test_param_count_10_classes(name):
    assert count_params(built(name)) == PARAMS_10[name]


def test_param_counts_match_paper():
    # Paper (Chen et al. 2022, Sec. 3.1): ResNet-18 11.22M (the CIFAR-100 count; 11.17M at 10),
    # VGG-16 14.72M (the CIFAR-10 count; 14.77M at 100), WRN-32-2 1.86M (CIFAR-10).
    assert round(count_params(built("resnet18", 100)) / 1e6, 2) == 11.22
    assert round(count_params(built("resnet18")) / 1e6, 2) == 11.17
    assert round(count_params(built("vgg16")) / 1e6, 2) == 14.72
    assert round(count_params(built("wrn32_2")) / 1e6, 2) == 1.86
    # only the classifier depends on num_classes: 90 more rows of (512 weights + 1 bias)
    assert count_params(built("resnet18", 100)) - count_params(built("resnet18")) == 90 * 513


@pytest.fixture
def one_thread():
    """Batch-2 forwards run faster on one thread and do not stall on an oversubscribed CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", sorted(PARAMS_10))
def test_forward_shape(name, one_thread):
    num_classes = 7  # not the default 10, so a constructor that ignores num_classes fails
    torch.manual_seed(0)
    model = MODELS[name](num_classes).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(PARAMS_10))
def test_structure_rules(name):
    model = built(name)
    conv_list = convs(model)
    stem_name, stem = conv_list[0]
    assert stem.in_channels == 3 and stem.kernel_size == (3, 3)
    assert [n for n, m in conv_list if m.in_channels == 3] == [stem_name]
    assert all(m.bias is None for _, m in conv_list)
    last_name, last = list(model.named_modules())[-1]
    assert isinstance(last, nn.Linear)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"])
def test_cifar_resnet_is_all_3x3_with_option_a(name):
    model = built(name)
    depth = int(name[len("resnet"):])
    conv_list = convs(model)
    assert len(conv_list) + 1 == depth  # 6n+1 convs + the Linear = depth 6n+2
    assert all(m.kernel_size == (3, 3) for _, m in conv_list)
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2  # stage 2 and 3 entries
    assert [m.out_channels for _, m in conv_list][-1] == 64


def test_wrn32_2_and_resnet18_use_1x1_shortcuts():
    wrn = built("wrn32_2")
    kernels = [m.kernel_size for _, m in convs(wrn)]
    assert kernels.count((1, 1)) == 2 and len(kernels) == 31 + 2  # 31 3x3 convs + 2 shortcuts
    assert [m.out_channels for _, m in convs(wrn)][0] == 32 and wrn.fc.in_features == 128
    assert [m.kernel_size for _, m in convs(built("resnet18"))].count((1, 1)) == 3


def test_pad_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()


def test_basic_block_identity_shortcut_and_bad_option():
    block = BasicBlock(16, 16, stride=1, shortcut="pad")
    assert isinstance(block.shortcut, nn.Identity)
    with pytest.raises(ValueError):
        BasicBlock(16, 32, stride=2, shortcut="option_c")


def test_init_kaiming_fan_out_and_bn():
    model = built("vgg16")
    for _, conv in convs(model)[1:]:  # big layers: the sample std is close to the target
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        std = conv.weight.std().item()
        assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.05
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn32_2", "vgg16"])
def test_seeded_construction_is_deterministic(name):
    def build(seed):
        torch.manual_seed(seed)
        return MODELS[name](10).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed really drives the init


# ---- data ----


# ---- fixtures: CIFAR files as Python 2 wrote them ----
def py2_pickle(obj) -> bytes:
    """Pickle like Python 2 cPickle, protocol 2. bytes -> a Py2 str (SHORT_BINSTRING/BINSTRING);
    numpy arrays -> numpy.core.multiarray._reconstruct with the raw buffer as a Py2 str."""
    out = bytearray(b"\x80\x02")  # PROTO 2

    def put(o):
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bytes):  # Python 2 str
            head = b"U" + bytes([len(o)]) if len(o) < 256 else b"T" + struct.pack("<i", len(o))
            out.extend(head + o)
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))  # BININT
        elif isinstance(o, tuple):
            out.extend(b"(")  # MARK
            for item in o:
                put(item)
            out.extend(b"t")  # TUPLE
        elif isinstance(o, list):
            out.extend(b"](")  # EMPTY_LIST, MARK
            for item in o:
                put(item)
            out.extend(b"e")  # APPENDS
        elif isinstance(o, dict):
            out.extend(b"}(")  # EMPTY_DICT, MARK
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")  # SETITEMS
        elif isinstance(o, np.ndarray):
            o = np.ascontiguousarray(o)
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")  # GLOBAL x2
            put((0,))
            put(b"b")
            out.extend(b"\x87R")  # TUPLE3, REDUCE: _reconstruct(ndarray, (0,), "b")
            out.extend(b"(")  # MARK: state = (1, shape, dtype, fortran, raw)
            put(1)
            put(tuple(o.shape))
            out.extend(b"cnumpy\ndtype\n")
            put((o.dtype.str[1:].encode(), 0, 1))
            out.extend(b"R")
            put((3, o.dtype.str[:1].encode(), None, None, None, -1, -1, 0))
            out.extend(b"b")  # BUILD the dtype
            out.extend(b"\x89")  # NEWFALSE: C order
            put(o.tobytes())
            out.extend(b"tb")  # TUPLE, BUILD the array
        else:
            raise TypeError(type(o))

    put(obj)
    return bytes(out + b".")


def cifar_batch(spec, x, y, label):
    """A batch dict with the real keys (bytes, like Py2 str)."""
    d = {b"batch_label": label.encode(), spec.label_key.encode(): [int(v) for v in y], b"data": x,
         b"filenames": [f"img_{i}.png".encode() for i in range(len(y))]}
    if spec is data.CIFAR100:
        d[b"coarse_labels"] = [int(v) // 5 for v in y]
    return d


def write_cifar(root, spec, train_rows, test_rows, seed=0):
    """Write spec.folder under root with random pixels/labels; return the raw arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / spec.folder
    folder.mkdir(parents=True)
    raw = {}
    splits = (("train", spec.train_files, train_rows), ("test", spec.test_files, test_rows))
    for split, files, rows in splits:
        xs, ys = [], []
        for name, n in zip(files, rows, strict=True):
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = rng.integers(0, spec.num_classes, n)
            (folder / name).write_bytes(py2_pickle(cifar_batch(spec, x, y, name)))
            xs.append(x)
            ys.append(y)
        raw[split] = (np.concatenate(xs), np.concatenate(ys))
    if spec is data.CIFAR10:
        meta = {b"num_cases_per_batch": 10000, b"num_vis": 3072,
                b"label_names": [f"class{i}".encode() for i in range(10)]}
        (folder / "batches.meta").write_bytes(py2_pickle(meta))
    else:
        meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
        (folder / "meta").write_bytes(py2_pickle(meta))
    return raw


def make_archive(root, spec, archive_dir, **kw):
    """Write the folder under root, pack it as archive_dir/spec.archive; return (raw, archive path)."""
    raw = write_cifar(root, spec, **kw)
    path = archive_dir / spec.archive
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / spec.folder, arcname=spec.folder)
    return raw, path


C10_ROWS = dict(train_rows=(7, 3, 0, 5, 9), test_rows=(11,))  # odd sizes and an empty batch


def quiet(_msg):
    pass


def test_py2_pickle_behaves_like_the_real_files():
    x = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    blob = py2_pickle({b"data": x, b"labels": [3, 4]})
    as_bytes = pickle.loads(blob, encoding="bytes")
    assert set(as_bytes) == {b"data", b"labels"}
    np.testing.assert_array_equal(as_bytes[b"data"], x)
    as_str = pickle.loads(blob, encoding="latin1")
    assert set(as_str) == {"data", "labels"} and as_str["labels"] == [3, 4]
    np.testing.assert_array_equal(as_str["data"], x)
    with pytest.raises(UnicodeDecodeError):  # why encoding="bytes" is needed: pixel bytes are not ASCII
        pickle.loads(blob)


# ---- parsing ----
def expected_images(raw_x):
    """(N, 3072) -> (N, 3, 32, 32) written out per pixel: red plane first, each plane row-major."""
    n = len(raw_x)
    out = np.zeros((n, 3, 32, 32), np.uint8)
    for c in range(3):
        for r in range(32):
            out[:, c, r, :] = raw_x[:, c * 1024 + r * 32: c * 1024 + r * 32 + 32]
    return out


def check_matches(d, raw, num_classes):
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape == (len(raw["train"][0]), 3, 32, 32)
    assert d.train_y.dtype == torch.int64 and d.num_classes == num_classes
    np.testing.assert_array_equal(d.train_x.numpy(), expected_images(raw["train"][0]))
    np.testing.assert_array_equal(d.train_y.numpy(), raw["train"][1])
    np.testing.assert_array_equal(d.test_x.numpy(), expected_images(raw["test"][0]))
    np.testing.assert_array_equal(d.test_y.numpy(), raw["test"][1])
    red = d.train_x[0, 0].flatten().numpy()
    np.testing.assert_array_equal(red, raw["train"][0][0, :1024])  # the first 1024 bytes are red


def test_cifar10_from_folder(tmp_path):
    raw = write_cifar(tmp_path, data.CIFAR10, **C10_ROWS)
    logs = []
    d = data.load_dataset("cifar10", str(tmp_path), download=False, log=logs.append)
    check_matches(d, raw, 10)
    assert len(d.train_y) == 24 and len(d.test_y) == 11
    assert len(logs) == 1 and "loading" in logs[0]


def test_cifar10_from_archive_extracts_it(tmp_path):
    (tmp_path / "dd").mkdir()
    raw, _ = make_archive(tmp_path / "src", data.CIFAR10, tmp_path / "dd", **C10_ROWS)
    logs = []
    d = data.load_dataset("cifar10", str(tmp_path / "dd"), download=False, log=logs.append)
    check_matches(d, raw, 10)
    assert (tmp_path / "dd" / "cifar-10-batches-py" / "batches.meta").is_file()
    assert sorted(os.listdir(tmp_path / "dd")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert any("extracting" in m for m in logs)


def test_cifar100_uses_fine_labels_and_100_classes(tmp_path):
    raw = write_cifar(tmp_path, data.CIFAR100, train_rows=(13,), test_rows=(5,))
    d = data.load_dataset("cifar100", str(tmp_path), download=False, log=quiet)
    check_matches(d, raw, 100)
    assert d.train_y.max() >= 10  # fine labels, not the 20 coarse ones and not checked against 10


def test_mean_std_are_per_channel_pixel_stats(tmp_path):
    raw = write_cifar(tmp_path, data.CIFAR10, **C10_ROWS)
    d = data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    planes = raw["train"][0].reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1).astype(np.float64)
    assert d.mean.dtype == torch.float32 and d.mean.shape == (3,)
    np.testing.assert_allclose(d.mean.numpy(), planes.mean(1), rtol=1e-5)
    np.testing.assert_allclose(d.std.numpy(), planes.std(1, ddof=1), rtol=1e-5)


def test_python3_pickled_batch_with_str_keys(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    path = tmp_path / "b"
    for protocol in (2, 4, 5):
        path.write_bytes(pickle.dumps({"data": x, "labels": np.array([0, 1, 2, 9])}, protocol=protocol))
        got_x, got_y = data.read_batch(str(path), "labels", 10)
        np.testing.assert_array_equal(got_x, x)
        assert got_y.tolist() == [0, 1, 2, 9] and got_y.dtype == np.int64


# ---- corrupt files ----
def corrupt_batch(kind):
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 256, (5, 3072), dtype=np.uint8), [1, 2, 3, 4, 5]
    good = {b"batch_label": b"b", b"labels": y, b"data": x}
    if kind == "truncated":
        return py2_pickle(good)[:-400]
    if kind == "not a dict":
        return py2_pickle([x, y])
    if kind == "missing key":
        return py2_pickle({b"data": x, b"fine_labels": y})
    if kind == "wrong shape":
        return py2_pickle({**good, b"data": x[:, :3071]})
    if kind == "not uint8":
        return py2_pickle({**good, b"data": x.astype(np.int32)})
    if kind == "label count":
        return py2_pickle({**good, b"labels": y[:4]})
    if kind == "label range":
        return py2_pickle({**good, b"labels": [1, 2, 10, 4, 5]})
    if kind == "negative label":
        return py2_pickle({**good, b"labels": [1, 2, -1, 4, 5]})
    raise ValueError(kind)


@pytest.mark.parametrize("kind, phrase", [
    ("truncated", "cannot unpickle"), ("not a dict", "not a dict"),
    ("missing key", "missing key 'labels'"),
    ("wrong shape", "(N, 3072)"), ("not uint8", "int32"), ("label count", "must hold 5 labels"),
    ("label range", "outside [0, 10)"), ("negative label", "outside [0, 10)")])
def test_corrupt_batch_names_the_file(tmp_path, kind, phrase):
    write_cifar(tmp_path, data.CIFAR10, **C10_ROWS)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(corrupt_batch(kind))
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    assert str(bad) in str(e.value) and phrase in str(e.value)


def test_missing_batch_file(tmp_path):
    write_cifar(tmp_path, data.CIFAR10, **C10_ROWS)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError, match="has no test_batch"):
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)


def test_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}".encode()
    evil = b"\x80\x02cposix\nsystem\nU" + bytes([len(cmd)]) + cmd + b"\x85R."  # os.system(cmd)
    path = tmp_path / "data_batch_1"
    path.write_bytes(evil)
    with pytest.raises(DataError, match="not allowed") as e:
        data.read_batch(str(path), "labels", 10)
    assert str(path) in str(e.value) and not marker.exists()


# ---- archives ----
def tar_with(path, member, payload=b"x"):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)


def symlink(name, target, kind=tarfile.SYMTYPE):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, target
    return m


def char_device(name):
    m = tarfile.TarInfo(name)
    m.type = tarfile.CHRTYPE
    return m


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("cifar-10-batches-py/../../evil.txt"), tarfile.TarInfo("/tmp/lth_ref_evil.txt"),
    symlink("cifar-10-batches-py/data_batch_1", "/etc/passwd"),
    symlink("cifar-10-batches-py/data_batch_2", "/etc/passwd", tarfile.LNKTYPE),
    char_device("cifar-10-batches-py/dev")], ids=["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_archive_member_is_refused(tmp_path, member):
    dd = tmp_path / "a" / "b"
    dd.mkdir(parents=True)
    tar_with(dd / "cifar-10-python.tar.gz", member)
    with pytest.raises(DataError, match="unsafe member") as e:
        data.load_dataset("cifar10", str(dd), download=False, log=quiet)
    assert "cifar-10-python.tar.gz" in str(e.value)
    assert sorted(os.listdir(dd)) == ["cifar-10-python.tar.gz"]  # nothing extracted, no temp dir left
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/lth_ref_evil.txt")


def test_corrupt_archive(tmp_path):
    _, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path, **C10_ROWS)
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match="could not extract") as e:
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    assert str(archive) in str(e.value)


def test_archive_without_the_folder(tmp_path):
    m = tarfile.TarInfo("something-else/file")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.addfile(m, io.BytesIO(b""))
    with pytest.raises(DataError, match="no folder cifar-10-batches-py"):
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)


# ---- md5 and download (never touches the network) ----
def test_check_md5(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    data.check_md5(str(path), "5d41402abc4b2a76b9719d911017c592", "hint")  # md5("hello")
    with pytest.raises(DataError, match="corrupt") as e:
        data.check_md5(str(path), "0" * 32, "Put a good one into /somewhere.")
    assert str(path) in str(e.value) and "/somewhere" in str(e.value)


def test_official_md5s_look_like_md5s():
    for spec in (data.CIFAR10, data.CIFAR100):
        assert len(spec.md5) == 32 and int(spec.md5, 16) >= 0


def no_network(*args, **kwargs):
    raise urllib.error.URLError("no network (test)")


def test_failed_download_says_where_to_put_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    dd = tmp_path / "new_dir"
    for name, spec in (("cifar10", data.CIFAR10), ("cifar100", data.CIFAR100)):
        logs = []
        with pytest.raises(DataError) as e:
            data.load_dataset(name, str(dd), log=logs.append)
        msg = str(e.value)
        assert str(dd) in msg and spec.archive in msg and spec.folder in msg and spec.url in msg
        assert "no network (test)" in msg and any("downloading" in m for m in logs)
    assert os.listdir(dd) == []  # no partial files left behind


def test_download_off_never_calls_urlopen(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("urlopen called"))
    with pytest.raises(DataError, match="downloading is off") as e:
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    assert str(tmp_path) in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)


def fake_urlopen(payload, calls):
    def urlopen(url, timeout=None):
        calls.append((url, timeout))
        return io.BytesIO(payload)
    return urlopen


def test_download_with_wrong_md5_is_refused_and_deleted(tmp_path, monkeypatch):
    _, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path, **C10_ROWS)
    payload = archive.read_bytes()
    dd = tmp_path / "dd"
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payload, calls))
    with pytest.raises(DataError, match="corrupt") as e:
        data.load_dataset("cifar10", str(dd), log=quiet)
    assert str(dd) in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)
    assert calls == [(data.CIFAR10.url, data.DOWNLOAD_TIMEOUT_S)]
    assert os.listdir(dd) == []


def test_download_with_right_md5_then_extract(tmp_path, monkeypatch):
    raw, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path, **C10_ROWS)
    payload = archive.read_bytes()
    spec = dataclasses.replace(data.CIFAR10, md5=data.file_md5(str(archive)))
    dd = tmp_path / "dd"
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payload, []))
    path = data.download(spec, str(dd), quiet)
    assert path == str(dd / "cifar-10-python.tar.gz") and os.listdir(dd) == ["cifar-10-python.tar.gz"]
    assert (dd / "cifar-10-python.tar.gz").read_bytes() == payload
    folder = data.find_folder(spec, str(dd), download_ok=False, log=quiet)
    x, y = data.read_split(folder, spec.train_files, spec)
    np.testing.assert_array_equal(x.numpy(), expected_images(raw["train"][0]))


# ---- load_dataset options ----
def test_train_subset_is_seeded_and_deterministic(tmp_path):
    write_cifar(tmp_path, data.CIFAR10, train_rows=(40, 30, 20, 10, 9), test_rows=(3,))
    load = lambda **kw: data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet, **kw)
    full = load()
    a, b, c = load(train_subset=25, seed=1), load(train_subset=25, seed=1), load(train_subset=25, seed=2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert len(a.train_y) == 25 and torch.equal(a.test_x, full.test_x)
    assert torch.equal(a.mean, full.mean)  # statistics of the full training set
    # every kept example is a distinct real training example with its own label
    flat = full.train_x.reshape(len(full.train_x), -1)
    rows = [int((flat == img.flatten()).all(1).nonzero()[0, 0]) for img in a.train_x]
    assert len(set(rows)) == 25 and torch.equal(full.train_y[rows], a.train_y)
    assert torch.equal(load(train_subset=109).train_x, full.train_x)  # all 109 = the full set
    for bad in (0, 110):
        with pytest.raises(DataError, match="train_subset"):
            load(train_subset=bad)


def test_unknown_dataset():
    assert set(data.DATASETS) == {"cifar10", "cifar100", "synthetic"}
    with pytest.raises(DataError, match="cifar10, cifar100, synthetic"):
        data.load_dataset("mnist", ".", log=quiet)


# ---- batches ----
def tiny_data(n=50, seed=0):
    """Data with label == index, so batches tell which example they came from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)  # no zeros: padding shows
    y = torch.arange(n)
    return data.Data(x, y, x[:17].clone(), y[:17].clone(), n, torch.tensor([100.0, 110.0, 120.0]),
                     torch.tensor([50.0, 60.0, 70.0]))


def denormalize(x, d):
    return (x * d.std.view(1, 3, 1, 1) + d.mean.view(1, 3, 1, 1)).round().to(torch.uint8)


def test_crop_flip_identity_flip_and_shift():
    x = tiny_data(6).train_x
    z = torch.zeros(6, dtype=torch.int64)
    no, yes = torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    assert torch.equal(data.crop_flip(x, z + 4, z + 4, no), x)
    assert torch.equal(data.crop_flip(x, z + 4, z + 4, yes), x.flip(-1))
    out = data.crop_flip(x, z, z + 8, no)  # window at the top-right of the padded image
    assert torch.equal(out[:, :, 4:, :28], x[:, :, :28, 4:])
    assert (out[:, :, :4] == 0).all() and (out[:, :, :, 28:] == 0).all()


def test_crop_flip_per_sample_matches_slicing():
    x = tiny_data(9).train_x
    dy, dx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([8, 0, 7, 1, 4, 2, 5, 3, 6])
    flip = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    out = data.crop_flip(x, dy, dx, flip)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(9):
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


def all_views(img):
    """All 81 crops x 2 flips of one image, by slicing: (162, 3, 32, 32)."""
    p = F.pad(img, (4, 4, 4, 4))
    crops = [p[:, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_train_batches_epoch():
    d = tiny_data(50)
    batches = list(data.train_batches(d, 16, torch.Generator().manual_seed(3)))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(seen.sort().values, torch.arange(50))  # each example exactly once
    assert not torch.equal(seen, torch.arange(50))  # shuffled
    flips = 0
    for xb, yb in batches:
        for img, i in zip(denormalize(xb, d), yb):
            views = all_views(d.train_x[i])
            match = (views == img).flatten(1).all(1).nonzero().flatten()
            assert len(match) > 0  # a crop (+ flip) of its own source image
            flips += int(match[0] >= 81)
    assert 5 < flips < 45  # about half flipped


def test_train_batches_deterministic_for_seeded_generator():
    d = tiny_data(40)
    run = lambda seed: list(data.train_batches(d, 16, torch.Generator().manual_seed(seed)))
    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


def test_test_batches_in_order_without_augmentation():
    d = tiny_data(50)
    batches = list(data.test_batches(d, 5))
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), d.test_y) and x.dtype == torch.float32
    assert torch.equal(denormalize(x, d), d.test_x)
    expected = (d.test_x.float() - d.mean.view(1, 3, 1, 1)) / d.std.view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)


# ---- synthetic ----
def test_synthetic_deterministic_balanced_and_learnable():
    a = data.load_dataset("synthetic", "unused", log=quiet)
    b = data.load_dataset("synthetic", "unused", log=quiet)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (data.SYNTH_TRAIN, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (data.SYNTH_TEST, 3, 32, 32) and a.num_classes == 10
    assert torch.equal(torch.bincount(a.train_y), torch.full((10,), data.SYNTH_TRAIN // 10))
    assert torch.equal(torch.bincount(a.test_y), torch.full((10,), data.SYNTH_TEST // 10))
    assert not torch.equal(a.train_x[:100], a.test_x[:100])
    # learnable: a shift-invariant feature (|FFT| of the image) with nearest class mean beats chance
    feats = lambda x: torch.fft.fft2(x.float()).abs()[:, :, :5, :5].flatten(1).log1p()
    ftr, fte = feats(a.train_x), feats(a.test_x)
    centers = torch.stack([ftr[a.train_y == k].mean(0) for k in range(10)])
    acc = (torch.cdist(fte, centers).argmin(1) == a.test_y).float().mean().item()
    assert acc > 0.5
    # not trivial: a raw-pixel nearest class mean (no shift invariance) is near chance
    ptr = a.train_x.flatten(1).float()
    centers = torch.stack([ptr[a.train_y == k].mean(0) for k in range(10)])
    acc_pixels = (torch.cdist(a.test_x.flatten(1).float(), centers).argmin(1) == a.test_y).float().mean()
    assert acc_pixels < 0.5


# ---- IMP: global magnitude pruning, masking, rewinding ----


def random_weights(seed=0, shapes=((16, 8, 3, 3), (32, 16, 3, 3), (10, 32, 1, 1))):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def test_magnitude_prune_removes_exact_count_smallest_first_and_only_shrinks():
    weights = random_weights()
    masks = L.ones_masks(weights)
    for level in range(4):
        remaining = sum(int(m.sum()) for m in masks.values())
        new = L.magnitude_prune(weights, masks, 0.2)
        assert sum(int(m.sum()) for m in new.values()) == remaining - round(0.2 * remaining)
        for n in masks:                                     # masks only shrink
            assert torch.all(new[n] <= masks[n])
        newly = torch.cat([weights[n].abs()[(masks[n] - new[n]).bool()] for n in masks])
        kept = torch.cat([weights[n].abs()[new[n].bool()] for n in masks])
        assert kept.min() >= newly.max()                    # global ranking across layers
        masks = new
    assert abs(L.density(masks) - 0.8 ** 4) < 1e-3


def test_magnitude_prune_is_global_not_per_layer():
    weights = {"a": torch.full((4, 1, 1, 1), 0.1), "b": torch.full((4, 1, 1, 1), 5.0)}
    new = L.magnitude_prune(weights, L.ones_masks(weights), 0.5)
    assert new["a"].sum() == 0 and new["b"].sum() == 4


def test_pruned_weights_stay_zero_through_sgd_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = models.MODELS["resnet20"](10)
    weights = L.prunable_weights(model)
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.7)
    L.apply_masks(model, masks)
    d = data.load_dataset("synthetic", "unused", "cpu", train_subset=64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    before = {n: w.detach().clone() for n, w in weights.items()}
    L.train_epoch(model, d, opt, masks, 16, torch.Generator().manual_seed(0))
    for n, w in weights.items():
        assert torch.all(w[masks[n] == 0] == 0)
        assert not torch.equal(w[masks[n] == 1], before[n][masks[n] == 1])  # the rest did train


def test_prunable_weights_skip_stem_and_linear():
    model = models.MODELS["resnet18"](10)
    names = list(L.prunable_weights(model))
    assert "conv1.weight" not in names and all("fc" not in n for n in names)
    assert len(names) == 19                                 # 16 3x3 convs + 3 shortcut 1x1 convs


def test_rewind_restores_saved_state_and_applies_mask():
    torch.manual_seed(0)
    model = models.MODELS["resnet20"](10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.data.add_(1.0)
    model.bn1.running_mean.add_(3.0)
    masks = L.magnitude_prune(L.prunable_weights(model), L.ones_masks(L.prunable_weights(model)), 0.5)
    L.rewind(model, state, masks)
    for k, v in model.state_dict().items():
        expect = state[k] * masks[k] if k in masks else state[k]
        assert torch.equal(v, expect), k


def test_check_masks_fit_names_the_problem():
    model = models.MODELS["resnet20"](10)
    masks = L.ones_masks(L.prunable_weights(models.MODELS["resnet32"](10)))
    with pytest.raises(L.UsageError, match="does not fit the model"):
        L.check_masks_fit(model, masks)


# ---- refill / refill+ ----
def test_refill_keeps_whole_channels_with_the_right_count():
    weights = random_weights(1)
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.75)
    for extra in (0.0, 0.3):
        out = L.refill(weights, masks, extra=extra)
        for n, m in out.items():
            m2, o = m.reshape(m.shape[0], -1), m.shape[0]
            rows = m2.sum(1)
            assert torch.all((rows == 0) | (rows == m2.shape[1]))   # all ones or all zeros
            base = max(1, round(float(masks[n].sum()) / m2.shape[1]))
            assert int((rows > 0).sum()) == min(o, base + round(extra * (o - base)))


def test_refill_plus_keeps_a_superset_and_scores_differ():
    w = torch.ones(4, 1, 2, 2)
    w[0] = 10.0                                             # channel 0: few but large weights
    m = torch.ones(4, 1, 2, 2)
    m[0, 0, 0] = 0                                          # channel 0 keeps 2 of 4, others 4 of 4
    m[1:, 0, 1, 1] = 0                                      # others keep 3 of 4; nnz = 2+9 = 11
    l1 = L.refill_mask(w, m, score="l1").reshape(4, -1).sum(1) > 0
    remain = L.refill_mask(w, m, score="remain").reshape(4, -1).sum(1) > 0
    assert l1.tolist() == [True, True, True, False]         # n = round(11/4) = 3; l1 wants channel 0
    assert remain.tolist() == [False, True, True, True]     # remain ranks channel 0 last
    plus = L.refill_mask(w, m, extra=1.0, score="l1").reshape(4, -1).sum(1) > 0
    assert torch.all(plus >= l1) and plus.all()


def test_refill_with_a_feature_score_keeps_the_top_channels_of_that_score():
    g = torch.Generator().manual_seed(0)
    w, m = torch.randn(6, 3, 3, 3, generator=g), (torch.rand(6, 3, 3, 3, generator=g) < 0.5).float()
    n = round(float(m.sum()) / 27)
    for score in L.FEATURE_SCORES:
        order = torch.randperm(6, generator=g).float()
        feats = {s: torch.zeros(6) for s in L.FEATURE_SCORES}
        feats[score] = order                               # only this statistic may decide
        kept = L.refill_mask(w, m, score=score, feats=feats).reshape(6, -1).sum(1) > 0
        assert kept.tolist() == (order >= 6 - n).tolist()
    with pytest.raises(ValueError, match="conv_channel_stats"):
        L.refill_mask(w, m, score="saliency")


def test_conv_channel_stats_match_a_manual_forward_and_backward():
    model, _, _ = tiny_model_and_blocks()
    x, labels = torch.randn(4, 3, 9, 9), torch.tensor([0, 3, 1, 4])
    before = copy.deepcopy(model.state_dict())
    stats = L.conv_channel_stats(model, ["body.2.weight", "body.4.weight"], x, labels)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()                                           # the manual pass, in the same mode
    y2 = model.body[2](model.body[1](model.body[0](model.stem(x))))
    y4 = model.body[4](model.body[3](y2))
    y2.retain_grad(), y4.retain_grad()
    F.cross_entropy(model.fc(model.body[5](y4).mean((2, 3))), labels).backward()
    for name, y in (("body.2.weight", y2), ("body.4.weight", y4)):
        expected = {"fmap_l1": y.abs().sum((0, 2, 3)), "fmap_l2": y.pow(2).sum((0, 2, 3)),
                    "saliency": (y * y.grad).abs().sum((0, 2, 3))}
        for key, value in expected.items():
            assert torch.allclose(stats[name][key], value.detach(), rtol=1e-5, atol=1e-7), (name, key)
        assert stats[name]["saliency"].abs().sum() > 0
    with pytest.raises(ValueError, match="no conv output"):
        L.conv_channel_stats(model, ["fc.weight"], x, labels)


def test_top_k_breaks_ties_by_lower_index():
    assert L.top_k(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [False, True, True, False, False]


# ---- regroup ----
def planted_mask(out_rows=64, k=576, group=8, width=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, perm = torch.zeros(out_rows, k), torch.randperm(out_rows, generator=g)
    for i in range(out_rows // group):
        rows = perm[i * group:(i + 1) * group]
        m[rows[:, None], torch.randperm(k, generator=g)[:width]] = 1
    return m


def realistic_mask(out_rows, k, dens=0.2, seed=0):
    """A magnitude mask of a weight with latent row clusters (filters that read similar inputs)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, max(2, out_rows // 8), (out_rows,), generator=g)
    pref = torch.rand(max(2, out_rows // 8), k, generator=g) ** 3
    w = (0.7 * pref[label] + 0.3 * torch.rand(out_rows, k, generator=g)) \
        * torch.randn(out_rows, k, generator=g).abs()
    return (w > w.flatten().kthvalue(int((1 - dens) * w.numel())).values).float()


def check_blocks(mask2d, blocks, row_multiple=8):
    rows = torch.cat([r for r, _ in blocks])
    assert len(rows) == len(set(rows.tolist()))             # rows disjoint
    assert torch.equal(kernels.block_mask(tuple(mask2d.shape), blocks), mask2d)   # union of rectangles
    sizes = sorted(len(r) for r, _ in blocks)
    assert sum(s % row_multiple != 0 for s in sizes) <= 2   # only a pass's last group may be ragged


def test_regroup_recovers_planted_groups():
    m = planted_mask()
    new, blocks = L.regroup_mask(m)
    check_blocks(new, blocks)
    stats = L.layer_stats(m, new, blocks)
    assert stats["coverage"] >= 0.95 and len(blocks) == 8
    assert 0.67 <= stats["density"] / stats["density_before"] <= 1.5


def test_regroup_beats_random_and_sorted_partitions():
    for out_rows, k in ((64, 576), (256, 2304)):
        m = realistic_mask(out_rows, k)
        new, blocks = L.regroup_mask(m)
        ours = L.layer_stats(m, new, blocks)["coverage"]
        size = len(blocks[0][0])
        perm = np.random.default_rng(0).permutation(out_rows)
        by_nnz = np.argsort(-m.sum(1).numpy(), kind="stable")
        for order in (perm, by_nnz):
            parts = [np.sort(order[i:i + size]) for i in range(0, out_rows, size)]
            theirs = L.partition_coverage(m, parts)
            assert ours > theirs + 0.01, (out_rows, ours, theirs)


def test_regroup_on_resnet20_masks_is_never_a_no_op_and_is_deterministic():
    torch.manual_seed(0)
    weights = L.prunable_weights(models.MODELS["resnet20"](10))
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.8)
    new, blocks = L.regroup(masks)
    new2, blocks2 = L.regroup(masks)
    for n in masks:
        m2 = new[n].reshape(new[n].shape[0], -1)
        assert blocks[n] and not torch.equal(new[n], masks[n])
        check_blocks(m2, blocks[n])
        assert all(torch.equal(a, c) and torch.equal(b, d)
                   for (a, b), (c, d) in zip(blocks[n], blocks2[n]))
        ratio = float(new[n].sum()) / float(masks[n].sum())
        assert 0.67 <= ratio <= 1.5, (n, ratio)


def test_regroup_channel_unit_selects_whole_input_channels():
    m = realistic_mask(64, 64 * 9).reshape(64, 64, 3, 3)
    new, blocks = L.regroup({"w": m}, unit="channel")
    for rows, cols in blocks["w"]:
        assert len(cols) % 9 == 0 and torch.equal(cols.view(-1, 9) % 9, torch.arange(9).expand(len(cols) // 9, 9))


def test_regroup_mask_takes_the_conv_mask_with_either_unit_or_its_2d_view():
    m = realistic_mask(32, 32 * 9).reshape(32, 32, 3, 3)
    for unit in L.REGROUP_UNITS:
        new, blocks = L.regroup_mask(m, unit)
        assert new.shape == m.shape and torch.equal(kernels.block_mask(tuple(m.shape), blocks), new)
    flat, flat_blocks = L.regroup_mask(m.reshape(32, -1))
    assert torch.equal(flat, L.regroup_mask(m, "position")[0].reshape(32, -1))


@pytest.mark.parametrize("call, message", [
    (lambda: L.regroup_mask(torch.ones(8, 18), unit="channel"), "expected the conv's mask"),
    (lambda: L.regroup_mask(torch.ones(8, 18), unit=9), "unknown regroup unit 9"),
    (lambda: L.regroup_mask(torch.ones(2, 8, 3, 3, 1)), "got shape"),
    (lambda: L.regroup_mask(torch.ones(8, 18), groups=0), "groups must be an integer >= 1"),
    (lambda: L.regroup_mask(torch.full((8, 18), 0.5)), "only 0 and 1"),
    (lambda: L.refill_mask(torch.ones(4, 2, 3, 3), torch.ones(4, 18)), "must have the same shape"),
    (lambda: L.refill_mask(torch.ones(4, 18), torch.ones(4, 18), extra=2), "must be in [0, 1]"),
    (lambda: L.postprocess("prune", {}, {}), "unknown method 'prune'"),
    (lambda: L.postprocess("refill", {}, {}, groups=4), "refill takes the knobs ['refill_score']"),
    (lambda: L.magnitude_prune({}, {}, 1.5), "rate must be in [0, 1)"),
    (lambda: L.magnitude_prune({"a": torch.ones(3)}, {"a": torch.ones(4)}, 0.5), "same names and shapes"),
])
def test_public_functions_say_what_they_expected(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


def test_prunable_weights_skip_the_stem_unless_asked_and_never_depthwise():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    assert list(L.prunable_weights(model)) == ["2.weight"]
    assert list(L.prunable_weights(model, skip_stem=False)) == ["0.weight", "2.weight"]


def test_postprocess_is_the_pipelines_step_on_your_own_masks():
    weights = random_weights(3)
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.7)
    new, blocks = L.postprocess("refill+", weights, masks, refill_extra=0.5, refill_score="remain")
    assert blocks is None and all(torch.equal(new[n], L.refill(weights, masks, 0.5, "remain")[n]) for n in masks)
    new, blocks = L.postprocess("regroup", weights, masks, groups=2)
    assert set(blocks) == set(masks) and all(torch.equal(new[n], L.regroup(masks, groups=2)[0][n]) for n in masks)


def test_refine_partition_does_not_lower_within_group_similarity():
    m = realistic_mask(128, 1152).numpy()
    sim = L.row_similarity(m)
    parts = L.partition_rows(sim, 16)
    refined = L.refine_partition(sim, parts, 10)
    score = lambda ps: sum(sim[np.ix_(p, p)].sum() for p in ps)
    assert sorted(len(p) for p in refined) == sorted(len(p) for p in parts)
    assert score(refined) >= score(parts) - 1e-6


# ---- mask sources ----
def source_model(seed=0):
    torch.manual_seed(seed)
    return models.MODELS["resnet20"](10)


def test_keep_top_is_global_exact_and_breaks_ties_by_position():
    scores = {"a": torch.tensor([[1.0, 5.0], [3.0, 3.0]]), "b": torch.tensor([3.0, 0.5, 9.0])}
    keep = L.keep_top(scores, 4)
    assert keep["a"].tolist() == [[0.0, 1.0], [1.0, 1.0]] and keep["b"].tolist() == [0.0, 0.0, 1.0]
    assert L.density(L.prune_to_density(scores, 3 / 7)) == pytest.approx(3 / 7)


def test_snip_scores_equal_an_independent_computation():
    model = source_model()
    d = data.load_dataset("synthetic", "unused", "cpu", train_subset=32, seed=0)
    x, y = next(data.train_batches(d, 16, torch.Generator().manual_seed(1)))
    names = list(L.prunable_weights(model))
    before = copy.deepcopy(model.state_dict())
    scores = L.snip_scores(model, names, x, y)
    reference = copy.deepcopy(model).train()                  # |w * dL/dw|, computed by hand
    F.cross_entropy(reference(x), y).backward()
    params = dict(reference.named_parameters())
    for n in names:
        assert torch.allclose(scores[n], (params[n] * params[n].grad).abs(), rtol=1e-5, atol=1e-9), n
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # model untouched


def test_grasp_scores_are_w_times_hessian_gradient_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 5, 3, bias=False), nn.Flatten(),
                          nn.Linear(5 * 3 * 3, 3)).double()    # float64: finite differences below
    x, y = torch.randn(6, 3, 7, 7, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    names = ["1.weight"]
    scores = L.grasp_scores(model, names, x, y, temperature=2.0)
    weights = [model[0].weight, model[1].weight, model[3].weight]
    loss = lambda xs, ys: F.cross_entropy(model(xs) / 2.0, ys)
    g = [a + b for a, b in zip(torch.autograd.grad(loss(x[:3], y[:3]), weights),
                               torch.autograd.grad(loss(x[3:], y[3:]), weights))]
    hg = torch.zeros_like(model[1].weight)                    # H g by finite differences of the gradient
    eps = 1e-5
    for sign in (1, -1):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, gi in zip([shifted[0].weight, shifted[1].weight, shifted[3].weight], g):
                p.add_(sign * eps * gi)
        lf = lambda xs, ys: F.cross_entropy(shifted(xs) / 2.0, ys)
        grad = sum(torch.autograd.grad(lf(xs, ys), shifted[1].weight)[0] for xs, ys in ((x[:3], y[:3]), (x[3:], y[3:])))
        hg += sign * grad / (2 * eps)
    expected = model[1].weight.detach() * hg
    assert torch.allclose(scores["1.weight"], expected, rtol=1e-5, atol=1e-7 * expected.abs().max())


@pytest.mark.parametrize("target", [0.5, 0.2])
def test_synflow_hits_the_density_is_deterministic_and_scores_like_published(target):
    model = source_model()
    names = list(L.prunable_weights(model))
    a = L.synflow_masks(model, names, target, rounds=5)
    b = L.synflow_masks(model, names, target, rounds=5)
    total = sum(m.numel() for m in a.values())
    assert sum(int(m.sum()) for m in a.values()) == round(target * total)
    assert all(torch.equal(a[n], b[n]) for n in names)
    one = L.synflow_masks(model, names, target, rounds=1)     # one round = |w dR/dw| of |theta|, top-k
    lin = copy.deepcopy(model).eval().double()
    with torch.no_grad():
        for t in lin.state_dict().values():
            t.abs_()
    lin(torch.ones(1, 3, 32, 32, dtype=torch.float64)).sum().backward()
    params = dict(lin.named_parameters())
    ref = L.prune_to_density({n: (params[n] * params[n].grad).abs() for n in names}, target)
    assert all(torch.equal(one[n], ref[n]) for n in names)


def test_random_masks_keep_each_layers_count_and_follow_the_seed():
    model = source_model()
    weights = L.prunable_weights(model)
    omp = L.prune_to_density({n: w.detach().abs() for n, w in weights.items()}, 0.3)
    r1 = L.random_masks(omp, torch.Generator().manual_seed(5))
    r2 = L.random_masks(omp, torch.Generator().manual_seed(5))
    r3 = L.random_masks(omp, torch.Generator().manual_seed(6))
    assert all(int(r1[n].sum()) == int(omp[n].sum()) for n in omp)
    assert all(torch.equal(r1[n], r2[n]) for n in omp) and not all(torch.equal(r1[n], r3[n]) for n in omp)


# ---- the experiment end to end: trunk and branches ----
FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--train-subset", "128", "--epochs", "2",
        "--batch-size", "64", "--device", "cpu"]


def run_cli(tmp_path, *extra, name="run"):
    """Run the CLI into tmp_path/name; returns (experiment dir, combined result rows)."""
    out = str(tmp_path / name)
    assert L.main(FAST + ["--out-dir", out, *extra]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def ticket(out, level, branch=""):
    return L.load_ticket(os.path.join(out, branch, f"level_{level:02d}", "ticket.pt"))


def rows_of(rows, branch):
    return [r for r in rows if r["branch"] == branch]


def trunk_mask(out, level):
    """m_L recomputed from trunk level L-1, independently of the pipeline."""
    prev = ticket(out, level - 1)
    return L.magnitude_prune({n: prev["state_dict"][n] for n in prev["masks"]}, prev["masks"], 0.2)


def test_imp_trunk_levels_densities_and_files(tmp_path):
    out, rows = run_cli(tmp_path, "--levels", "2")
    assert [r["level"] for r in rows] == [0, 1, 2] and {r["branch"] for r in rows} == {"trunk"}
    assert [round(r["density"], 3) for r in rows] == [1.0, 0.8, 0.64]
    for level in range(3):
        t = ticket(out, level)
        assert set(t["metrics"]) >= {"level", "density", "test_acc", "train_loss", "seconds", "method"}
        assert not os.path.exists(os.path.join(out, f"level_{level:02d}", "checkpoint.pt"))
    assert open(os.path.join(out, "results.csv")).readline().startswith("branch,source,method,init,level")
    assert sorted(os.listdir(out)) == ["config.json", "init.pt", "level_00", "level_01", "level_02",
                                       "results.csv", "results.json"]


@pytest.mark.parametrize("method, flags", [("refill", []), ("refill+", []), ("regroup", []),
                                           ("refill", ["--refill-score", "saliency"])])
def test_branches_post_process_the_unstructured_trunk(tmp_path, method, flags):
    out, rows = run_cli(tmp_path, "--levels", "2", "--method", method, *flags)
    name = L.branch_name(L.config_from_args(L.build_parser().parse_args(FAST + ["--method", method, *flags])))
    assert [r["level"] for r in rows_of(rows, "trunk")] == [0, 1, 2]
    assert [r["level"] for r in rows_of(rows, name)] == [1, 2]
    for level in (1, 2):
        trunk, branch, m_level = ticket(out, level), ticket(out, level, name), trunk_mask(out, level)
        assert all(torch.equal(trunk["masks"][n], m_level[n]) for n in m_level)   # trunk stays unstructured IMP
        assert round(trunk["metrics"]["density"], 3) == round(0.8 ** level, 3)
        for n, m in branch["masks"].items():
            m2, before = m.reshape(m.shape[0], -1), m_level[n].reshape(m.shape[0], -1)
            if method == "regroup":
                assert torch.equal(kernels.block_mask(tuple(m2.shape), branch["blocks"][n]), m2)
            else:
                kept = m2.sum(1)
                assert torch.all((kept == 0) | (kept == m2.shape[1]))
                if method == "refill":                   # n = nnz(m_L) / K channels of the trunk's mask
                    assert int((kept > 0).sum()) == max(1, round(float(before.sum()) / m2.shape[1]))
            stats = L.layer_stats(m_level[n], m)         # coverage is measured against m_L
            assert branch["layer_stats"][n]["coverage"] == pytest.approx(stats["coverage"])
            assert torch.all(branch["state_dict"][n][m == 0] == 0)
        assert os.path.exists(os.path.join(out, name, "level_01", "layers.csv"))
    assert json.load(open(os.path.join(out, name, "results.json")))[0]["branch"] == name


def test_a_second_method_reuses_the_trunk(tmp_path):
    out, _ = run_cli(tmp_path, "--levels", "1", "--method", "regroup")
    trunk_bytes = [open(os.path.join(out, f"level_0{i}", "ticket.pt"), "rb").read() for i in (0, 1)]
    lines = []
    assert L.main(FAST + ["--out-dir", out, "--levels", "1", "--method", "refill"]) == 0
    L.run_experiment(L.config_from_args(L.build_parser().parse_args(
        FAST + ["--out-dir", out, "--levels", "1", "--method", "refill+"])), log=lines.append)
    assert not any(line.startswith("trunk level") and " epoch " in line for line in lines)
    assert sum("finished earlier, reused" in line for line in lines) == 2
    assert trunk_bytes == [open(os.path.join(out, f"level_0{i}", "ticket.pt"), "rb").read() for i in (0, 1)]
    rows = json.load(open(os.path.join(out, "results.json")))
    assert {(r["branch"], r["method"]) for r in rows} == {
        ("trunk", "imp"), ("regroup", "regroup"), ("refill", "refill"), ("refill+", "refill+")}


def test_group_aware_prunes_its_own_previous_level(tmp_path):
    out, rows = run_cli(tmp_path, "--levels", "2", "--method", "refill", "--group-aware")
    assert [(r["branch"], r["level"]) for r in rows] == [("trunk", 0), ("refill_group-aware", 1),
                                                         ("refill_group-aware", 2)]
    for level in (1, 2):                  # the old loop: prune the previous post-processed ticket, refill it
        prev = ticket(out, level - 1, "" if level == 1 else "refill_group-aware")
        weights = {n: prev["state_dict"][n] for n in prev["masks"]}
        expected, _ = L.postprocess("refill", weights, L.magnitude_prune(weights, prev["masks"], 0.2))
        got = ticket(out, level, "refill_group-aware")["masks"]
        assert all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("source", ["omp", "random", "snip", "grasp", "synflow"])
def test_every_mask_source_runs_hits_its_density_and_is_deterministic(tmp_path, source):
    flags = ["--levels", "1", "--epochs", "1", "--mask-source", source, "--method", "regroup",
             "--synflow-rounds", "3"]
    out, rows = run_cli(tmp_path, *flags)
    assert rows_of(rows, "trunk")[1]["density"] == pytest.approx(0.8, abs=1e-4)
    assert rows_of(rows, "regroup")[0]["coverage"] > 0
    cfg = L.config_from_args(L.build_parser().parse_args(FAST + ["--out-dir", out, *flags]))
    exp, _, _ = L.open_experiment(cfg, log=lambda *_: None)
    again, _ = L.MASK_SOURCES[source](exp, 1)
    assert all(torch.equal(again[n].cpu(), ticket(out, 1)["masks"][n]) for n in again)


def test_reinit_starts_from_a_fresh_initialization(tmp_path):
    out, rows = run_cli(tmp_path, "--levels", "1", "--init", "reinit")
    assert [r["branch"] for r in rows] == ["trunk", "trunk", "imp_reinit"]
    cfg = L.config_from_args(L.build_parser().parse_args(FAST + ["--out-dir", out, "--init", "reinit"]))
    exp, trunk, branch = L.open_experiment(cfg, log=lambda *_: None)
    masks, _, _, state, epoch = L.start_level(exp, branch, 1)
    _, _, _, rewound, k = L.start_level(exp, trunk, 1)
    assert epoch == 0 and all(torch.equal(masks[n], ticket(out, 1)["masks"][n]) for n in masks)
    assert not torch.equal(state["layer1.0.conv1.weight"], rewound["layer1.0.conv1.weight"])


def cut_after_first_epoch_of(prefix):
    def log(line):
        if line.startswith(prefix):
            raise KeyboardInterrupt
    return log


@pytest.mark.parametrize("prefix", ["trunk level  1 epoch   1/", "regroup level  1 epoch   1/"])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, prefix):
    flags = ["--levels", "1", "--method", "regroup"]
    straight_dir, straight = run_cli(tmp_path, *flags, name="straight")
    out = str(tmp_path / "cut")
    args = L.config_from_args(L.build_parser().parse_args(FAST + ["--out-dir", out, *flags]))
    with pytest.raises(KeyboardInterrupt):
        L.run_experiment(args, log=cut_after_first_epoch_of(prefix))
    branch = "" if prefix.startswith("trunk") else "regroup"
    assert os.path.exists(os.path.join(out, branch, "level_01", "checkpoint.pt"))
    _, resumed = run_cli(tmp_path, *flags, name="cut")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(straight) == strip(resumed)
    t1, t2 = ticket(straight_dir, 1, branch), ticket(out, 1, branch)
    assert all(torch.equal(t1["masks"][n], t2["masks"][n]) for n in t1["masks"])
    assert all(torch.equal(t1["state_dict"][k], t2["state_dict"][k]) for k in t1["state_dict"])


def test_raising_levels_continues_like_asking_at_start(tmp_path):
    _, two = run_cli(tmp_path, "--levels", "2", name="a")
    run_cli(tmp_path, "--levels", "1", name="b")
    _, grown = run_cli(tmp_path, "--levels", "2", name="b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(two) == strip(grown)


def test_changed_trunk_setting_is_refused_once_training_started(tmp_path, capsys):
    run_cli(tmp_path, "--levels", "0")
    assert L.main(FAST + ["--out-dir", str(tmp_path / "run"), "--levels", "0", "--lr", "0.05"]) == 2
    assert "--lr 0.1 -> 0.05" in capsys.readouterr().err


def test_a_failed_start_leaves_the_experiment_free(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert L.main(FAST[:4] + ["--train-subset", "10000", "--epochs", "1", "--out-dir", out]) == 2
    assert "train_subset=10000 is out of range" in capsys.readouterr().err and not os.path.exists(out)
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:   # an older start that trained nothing
        json.dump({"lr": 0.5}, f)
    run_cli(tmp_path, "--levels", "0")                        # the corrected command is accepted


@pytest.mark.parametrize("flags, message", [
    (["--prune-rate", "1.5"], "--prune-rate must be in (0, 1)"),
    (["--levels", "-1"], "--levels must be >= 0"),
    (["--rewind-epoch", "5"], "--rewind-epoch must be in [0, --epochs)"),
    (["--refill-extra", "2"], "--refill-extra must be in [0, 1]"),
    (["--group-aware"], "--group-aware post-processes every level of its own chain"),
    (["--group-aware", "--method", "regroup", "--mask-source", "omp"], "it needs --mask-source imp"),
])
def test_bad_values_exit_2_with_a_clear_message(tmp_path, capsys, flags, message):
    assert L.main(FAST + ["--out-dir", str(tmp_path / "x")] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flags, phrase", [(["--arch", "resnet9000"], "invalid choice: 'resnet9000'"),
                                           (["--mask-source", "magic"], "invalid choice: 'magic'")])
def test_unknown_choices_are_argparse_errors(capsys, flags, phrase):
    with pytest.raises(SystemExit) as e:
        L.main(flags)
    assert e.value.code == 2 and phrase in capsys.readouterr().err


def test_help_states_each_default_once():
    text = L.build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in L.build_parser()._actions:
        helped = L.HelpFormatter("x")._get_help_string(action)
        assert helped.count("default") <= 1, action.option_strings
    assert "(default: resnet20)" in text and "runs/ARCH_DATASET_SOURCE" in text


def test_corrupt_checkpoint_is_named_in_the_error(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "level_00").mkdir(parents=True)
    (out / "level_00" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert L.main(FAST + ["--out-dir", str(out), "--levels", "0"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Delete it" in err


def test_ticket_of_another_arch_is_refused(tmp_path, capsys):
    run_cli(tmp_path, "--levels", "0")
    path = tmp_path / "run" / "level_00" / "ticket.pt"
    t = L.load_ticket(str(path))
    t["masks"] = L.ones_masks(L.prunable_weights(models.MODELS["resnet32"](10)))
    torch.save(t, path)
    assert L.main(FAST + ["--out-dir", str(tmp_path / "run"), "--levels", "1"]) == 2
    assert "does not fit the model" in capsys.readouterr().err


class RunsCode:
    """Unpickling this runs os.system: what a malicious 'ticket' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_ticket_that_would_run_code_is_refused_not_run(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "ticket.pt"
    torch.save({"config": {"arch": "resnet20"}, "masks": RunsCode(marker)}, evil)
    assert L.main(["--bench", "--ticket", str(evil)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and "not written by lth_ref" in err and "Traceback" not in err


def test_a_ticket_missing_a_key_says_what_a_ticket_is(tmp_path, capsys):
    path = tmp_path / "ticket.pt"
    torch.save({"masks": {}, "level": 1}, path)
    assert L.main(["--bench", "--ticket", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not a ticket" in err and "state_dict" in err and "level_NN/ticket.pt" in err


def test_lth_ref_imports_next_to_a_foreign_data_package(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("USER_DATA = True\n")
    (tmp_path / "models.py").write_text("USER_MODELS = True\n")
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import data, models, lth_ref; assert data.USER_DATA and models.USER_MODELS; "
            "assert 'synthetic' in lth_ref.datasets.DATASETS and 'resnet20' in lth_ref.model_zoo.MODELS; "
            "print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), here])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_bench_regroup_on_a_ticket_reports_every_layer_and_beats_random(tmp_path, capsys):
    run_cli(tmp_path, "--levels", "0")
    args = L.build_parser().parse_args(["--bench", "regroup", "--out-dir", str(tmp_path / "run")] + FAST)
    rows = L.bench_regroup(args, log=lambda *_: None)
    assert len(rows) == 18 and all(r["blocks"] > 0 for r in rows)
    assert np.mean([r["coverage"] for r in rows]) > np.mean([r["random"] for r in rows])


def test_bench_without_a_ticket_says_how_to_get_one(tmp_path, capsys):
    assert L.main(["--bench", "kernels", "--out-dir", str(tmp_path / "none")]) == 2
    assert "no ticket to benchmark" in capsys.readouterr().err


def test_bench_names_the_branches_when_the_run_asked_for_has_none(tmp_path, capsys):
    run_cli(tmp_path, "--levels", "1", "--epochs", "1", "--method", "refill")
    assert L.main(["--bench", "--out-dir", str(tmp_path / "run"), "--method", "regroup"] + FAST) == 2
    assert "branches here: ['refill']" in capsys.readouterr().err


# ---- report ----
LAST_CONVS = ["layer3.1.conv2", "layer3.2.conv1", "layer3.2.conv2"]   # resnet20's last three convs
BENCH = dict(device="test device", date="2026-01-02", torch="x", runs=[dict(
    batch=64, layers=[dict(name="layer3.2.conv2.weight", flop_ratio=0.25, dense_ms=2.0, regrouped_ms=1.0,
                           speedup=2.0, path="cuda-kernel"),
                      dict(name="layer3.2.conv1.weight", flop_ratio=0.5, dense_ms=2.0, regrouped_ms=1.0,
                           path="dense")],                       # no speedup: computed from the times
    model=dict(dense_ms=4.0, regrouped_ms=3.0))])                # savings: conv 50%, end to end 25%


@pytest.fixture(scope="module")
def report_exp(tmp_path_factory):
    """Two methods, two levels. Accuracies set by hand in results.json: regroup's level 2 equals the dense
    accuracy (a tie, which wins), every refill level is below it (none). A bench.json on each regroup level."""
    tmp = tmp_path_factory.mktemp("report")
    tiny = ["--levels", "2", "--epochs", "1", "--train-subset", "64"]         # one SGD step per level
    run_cli(tmp, *tiny, "--method", "regroup")
    out, rows = run_cli(tmp, *tiny, "--method", "refill")
    dense = next(r["test_acc"] for r in rows if r["level"] == 0)
    for r in rows:
        if r["branch"] == "regroup":
            r["test_acc"] = dense if r["level"] == 2 else round(dense + 0.01, 6)
        if r["branch"] == "refill":
            r["test_acc"] = round(dense - 0.01 * r["level"], 6)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f)
    for level in (1, 2):
        with open(os.path.join(out, "regroup", f"level_0{level}", "bench.json"), "w") as f:
            json.dump(BENCH, f)
    return out, rows


def md_table_after(text, marker):
    """The first markdown table after `marker` as dicts of strings."""
    lines = text[text.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = [line.strip("|").split("|") for line in itertools.takewhile(lambda l: l.startswith("|"), lines[start:])]
    keys = [k.strip() for k in table[0]]
    return [dict(zip(keys, (v.strip() for v in row))) for row in table[2:]]


def extreme_by_rule(rows, dense):
    """The sparsest level >= 1 with accuracy >= dense, written out independently of lth_ref."""
    wins = sorted((r for r in rows if r["level"] >= 1 and r["test_acc"] >= dense),
                  key=lambda r: (-(1 - r["density"]), -r["test_acc"], r["level"]))
    return wins[0]["level"] if wins else None


def png_size(path):
    """(width, height) of a PNG, after checking its chunks' CRCs and inflating its pixel data."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        header = struct.unpack(">IIBB", body[:10]) if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    assert depth == 8 and len(zlib.decompress(idat)) == height * (1 + width * channels)
    return width, height


def test_report_has_every_row_and_each_runs_extreme_ticket_by_the_rule(report_exp, capsys):
    out, rows = report_exp
    assert L.main(["--report", out]) == 0
    text = open(os.path.join(out, "report", "report.md")).read()
    table = md_table_after(text, "Dense accuracy")
    assert [(r["branch"], int(r["level"])) for r in table] == \
        [("trunk", 0), ("trunk", 1), ("trunk", 2), ("refill", 1), ("refill", 2), ("regroup", 1), ("regroup", 2)]
    by_key = {(r["branch"], r["level"]): r for r in rows}
    for r in table:
        want = by_key[(r["branch"], int(r["level"]))]
        assert float(r["test_acc"]) == pytest.approx(want["test_acc"], abs=5e-5)
        assert float(r["density"]) == pytest.approx(want["density"], abs=5e-5)
        assert r["flop_ratio"] == ("" if want["flop_ratio"] == "" else f"{want['flop_ratio']:.4f}")
    dense = next(r["test_acc"] for r in rows if r["level"] == 0)
    assert f"Dense accuracy (level 0): {dense:.4f}." in text
    extremes = {e["run"]: e for e in md_table_after(text, "Extreme winning tickets")}
    for branch in ("trunk", "refill", "regroup"):
        level = extreme_by_rule(rows_of(rows, branch), dense)
        assert extremes[branch]["extreme winning ticket"] == ("none" if level is None else f"level {level}")
    assert extremes["regroup"]["extreme winning ticket"] == "level 2" and extremes["refill"]["time saving"] == "-"
    assert extremes["regroup"]["time saving"].startswith("50.0% conv layers, 25.0% end to end (batch 64, test device")


def test_report_pictures_decode_at_the_stated_sizes(report_exp, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = report_exp
    written = L.write_report([out], str(tmp_path), log=lambda *_: None)
    text = open(written["report.md"]).read()
    expected = {"accuracy_vs_sparsity.png": (640, 400), "layer_speedup_regroup_level_01.png": (800, 400),
                "layer_speedup_regroup_level_02.png": (800, 400),
                **{f"masks_{n}.png": (3 * 240, 300) for n in LAST_CONVS}}   # trunk, refill, regroup panels
    assert {n for n in written if n.endswith(".png")} == set(expected)
    for name, (w, h) in expected.items():
        assert png_size(written[name]) == (w, h) and f"`{name}` ({w}x{h} px)" in text
        assert os.path.getsize(written[name]) < 60_000
    speed = list(csv.DictReader(open(written["layer_speedup_regroup_level_01.csv"])))
    assert [float(r["speedup"]) for r in speed] == [2.0, 2.0] and [r["path"] for r in speed] == ["cuda-kernel", "dense"]


def no_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)               # `import matplotlib` raises ImportError


def test_report_without_matplotlib_says_so_once_and_writes_the_tables(report_exp, tmp_path, monkeypatch, capsys):
    no_matplotlib(monkeypatch)
    out, _ = report_exp
    written = L.write_report([out], str(tmp_path), log=lambda *_: None)
    err = capsys.readouterr().err
    assert err.count("pip install matplotlib") == 1 and err.startswith("WARNING: matplotlib is not installed")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".png")]
    assert "Extreme winning tickets" in open(written["report.md"]).read()
    assert {"accuracy_vs_sparsity.csv", "extreme_tickets.csv", "layer_speedup_regroup_level_02.csv"} <= set(written)


def test_extreme_ticket_rule_on_hand_made_rows():
    row = lambda level, density, acc: dict(level=level, density=density, test_acc=acc)
    rows = [row(0, 1.0, 0.90), row(1, 0.8, 0.91), row(2, 0.64, 0.90), row(3, 0.512, 0.89)]
    assert L.extreme_ticket(rows, 0.90)["level"] == 2                    # equal to dense counts
    assert L.extreme_ticket(rows, 0.905)["level"] == 1
    assert L.extreme_ticket(rows, 0.95) is None                          # no winning level
    assert L.extreme_ticket([row(0, 1.0, 0.99)], 0.5) is None            # the dense level is no ticket
    assert L.extreme_ticket(rows, None) is None
    ties = [row(1, 0.5, 0.92), row(2, 0.5, 0.93), row(3, 0.5, 0.93), row(4, 0.6, 0.99)]
    assert L.extreme_ticket(ties, 0.9)["level"] == 2                    # same density: higher acc, lower level


def write_experiment(path, config, rows):
    os.makedirs(path)
    for name, obj in (("config.json", config), ("results.json", rows)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f)


def test_report_groups_seeds_and_reads_the_single_run_layout(tmp_path, monkeypatch, capsys):
    no_matplotlib(monkeypatch)
    cfg = dict(arch="resnet20", dataset="synthetic", epochs=2, mask_source="imp", levels=2, out_dir="x")
    row = lambda branch, level, density, acc: dict(branch=branch, source="imp", method="imp", init="rewind",
                                                   level=level, density=density, test_acc=acc, flop_ratio="",
                                                   blocks="", coverage="")
    accs = {0: [0.50, 0.60, 0.70], 1: [0.56, 0.50, 0.75]}               # seed: level 0, 1, 2
    for seed, (a0, a1, a2) in accs.items():                             # seed 0 alone: level 2 wins
        write_experiment(tmp_path / "runs" / f"s{seed}", {**cfg, "seed": seed, "levels": 2 + seed},
                         [row("trunk", 0, 1.0, a0), row("trunk", 1, 0.8, a1), row("trunk", 2, 0.64, a2)])
    write_experiment(tmp_path / "runs" / "lr", {**cfg, "seed": 0, "lr": 0.05}, [row("trunk", 0, 1.0, 0.4)])
    write_experiment(tmp_path / "runs" / "old", {**cfg, "seed": 0, "method": "regroup"},   # no branch column
                     [dict(level=0, density=1.0, test_acc=0.3), dict(level=1, density=0.8, test_acc=0.31)])
    dirs = [str(tmp_path / "runs" / d) for d in ("s0", "s1", "lr", "old")]
    groups = L.group_seeds([L.read_experiment(d) for d in dirs])
    assert [[e["config"]["seed"] for e in g] for g in groups] == [[0, 1], [0], [0]]
    rows = L.combine_seeds([e["rows"] for e in groups[0]])
    assert [(r["level"], r["seeds"], r["acc_min"], r["acc_max"]) for r in rows] == \
        [(0, 2, 0.5, 0.56), (1, 2, 0.5, 0.6), (2, 2, 0.7, 0.75)]
    assert rows[2]["test_acc"] == pytest.approx(0.725) and rows[2]["sparsity"] == pytest.approx(36.0)
    assert L.extreme_ticket(rows, 0.53)["level"] == 2 and L.extreme_ticket(rows, 0.73) is None
    assert L.main(["--report", *dirs]) == 0
    text = open(tmp_path / "runs" / "report" / "report.md").read()
    seeds = md_table_after(text, "## s0")
    assert [(r["level"], r["test_acc"], r["acc min-max"]) for r in seeds] == \
        [("0", "0.5300", "0.5000-0.5600"), ("1", "0.5500", "0.5000-0.6000"), ("2", "0.7250", "0.7000-0.7500")]
    assert "0.5300 (mean of 2 seeds, range 0.5000-0.5600)" in text
    old = md_table_after(text, "## old")
    assert [(r["branch"], r["method"], r["level"]) for r in old] == [("regroup", "regroup", "0"), ("regroup", "regroup", "1")]
    assert md_table_after(text[text.index("## old"):], "Extreme")[0]["extreme winning ticket"] == "level 1"


def test_block_order_draws_blocks_as_rectangles():
    def contiguous(positions):
        positions = np.sort(positions)
        return positions[-1] - positions[0] == len(positions) - 1
    out_rows, k = 12, 40
    laminar = [([0, 5, 7], [1, 2, 3, 10, 20, 30, 31]), ([1, 2], [2, 20]), ([3, 11], [0, 4, 5, 39]),
               ([4], [30]), ([9, 10], [6, 7, 8, 9, 11])]                # column sets disjoint or nested
    blocks = [(torch.tensor(r), torch.tensor(c)) for r, c in laminar]
    mask2d = kernels.block_mask((out_rows, k, 1, 1), blocks).reshape(out_rows, k)
    rows, cols = L.block_order(blocks, out_rows, k)
    assert sorted(rows) == list(range(out_rows)) and sorted(cols) == list(range(k))
    where_row, where_col = np.argsort(rows), np.argsort(cols)           # position of each row / column
    drawn = mask2d.numpy()[rows][:, cols]
    for r, c in laminar:
        assert contiguous(where_row[r]) and contiguous(where_col[c])
        assert drawn[np.ix_(np.sort(where_row[r]), np.sort(where_col[c]))].all()
    assert drawn.sum() == mask2d.sum()
    torch.manual_seed(0)                                                # regroup's own, overlapping blocks
    mask = (torch.rand(64, 32, 3, 3) < 0.2).float()
    new, found = L.regroup_mask(mask)
    rows, cols = L.block_order(found, 64, 288)
    where_row, where_col = np.argsort(rows), np.argsort(cols)
    assert all(contiguous(where_row[r.numpy()]) for r, _ in found)
    widest = sorted(found, key=lambda b: -len(b[1]))[:2]
    assert all(contiguous(where_col[c.numpy()]) for _, c in widest)


def test_report_refuses_what_it_cannot_read(report_exp, tmp_path, capsys):
    assert L.main(["--report", str(tmp_path)]) == 2
    assert "is not an experiment directory" in capsys.readouterr().err
    out, _ = report_exp
    assert L.main(["--report", out, "--out-dir", str(tmp_path / "r"), "--report-layers", "fc"]) == 2
    err = capsys.readouterr().err
    assert "no prunable conv 'fc.weight'" in err and "layer3.2.conv2" in err


# ---- kernels (grouped GEMM) ----


# (N, C, H, W, O, k, stride, padding, dilation): odd sizes, stride 2, padding, 1x1 and 3x3
SHAPES = [
    (2, 5, 9, 7, 13, 3, 1, 1, 1),
    (3, 7, 11, 11, 19, 3, 2, 1, 1),
    (2, 6, 10, 9, 10, 1, 1, 0, 1),
    (2, 9, 8, 13, 21, 1, 2, 0, 1),
    (1, 4, 12, 12, 9, 3, 2, 2, 2),
    (2, 33, 7, 5, 40, 3, 1, 1, 1),
]


def random_blocks(O, K, seed, n_blocks=4):
    """Random disjoint row sets (one of 1 row, one left-over empty row) with random column sets
    (one of 1 column). Returns (blocks, 2-D 0/1 mask built independently of kernels.py)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(O, generator=g)[:O - 1]  # the last row stays empty
    cuts = sorted(torch.randperm(O - 2, generator=g)[:n_blocks - 1].add(1).tolist())
    row_sets = [s for s in np.split(perm.numpy(), cuts) if len(s)]
    row_sets[0] = row_sets[0][:1]  # a 1-row block
    blocks, mask2d = [], torch.zeros(O, K)
    for i, rows in enumerate(row_sets):
        n_cols = 1 if i == 1 else int(torch.randint(1, K + 1, (1,), generator=g))
        cols = torch.randperm(K, generator=g)[:n_cols]
        rows = torch.as_tensor(rows, dtype=torch.int64)
        blocks.append((rows.sort().values, cols.sort().values))
        mask2d[rows[:, None], cols[None, :]] = 1
    return blocks, mask2d


def make_case(shape, seed, dtype=torch.float32):
    N, C, H, W, O, k, stride, padding, dilation = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    weight = torch.randn(O, C, k, k, generator=g, dtype=dtype)
    blocks, mask2d = random_blocks(O, C * k * k, seed)
    masked = weight * mask2d.view(weight.shape).to(dtype)
    return x, weight, blocks, mask2d, masked, dict(stride=stride, padding=padding, dilation=dilation)


def rel_err(y, ref):
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- reference and CPU path ----

@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_masked_conv(shape):
    x, weight, blocks, mask2d, masked, conv = make_case(shape, seed=1)
    ref = F.conv2d(x.double(), masked.double(), **conv)
    y = kernels.grouped_gemm_reference(x, weight, blocks, **conv)
    assert y.shape == ref.shape and rel_err(y, ref) < 1e-5
    y64 = kernels.grouped_gemm_reference(x.double(), weight.double(), blocks, **conv)
    assert rel_err(y64, ref) < 1e-12


@pytest.mark.parametrize("memory_format", list(kernels.MEMORY_FORMATS))
@pytest.mark.parametrize("strategy", [None, *kernels.CPU_STRATEGIES])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_path_matches_masked_conv(shape, strategy, memory_format):
    fmt = kernels.MEMORY_FORMATS[memory_format]
    x, weight, blocks, mask2d, masked, conv = make_case(shape, seed=2)
    x = x.contiguous(memory_format=fmt)
    ref = F.conv2d(x.double(), masked.double(), **conv)
    out = torch.full(ref.shape, float("nan")).contiguous(memory_format=fmt)
    y = kernels.grouped_conv2d_cpu(x, weight, blocks, out=out, strategy=strategy, **conv)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-5
    empty = torch.nonzero(mask2d.sum(1) == 0).view(-1)
    assert len(empty) >= 1 and (out[:, empty] == 0).all()
    y_new = kernels.grouped_conv2d_cpu(x, weight, blocks, strategy=strategy, **conv)  # no out=
    assert torch.allclose(y_new, out, rtol=0, atol=1e-6 * ref.abs().max().item())
    if x.shape[0] > 1:  # (N=1 tensors are contiguous in both formats)
        assert y_new.is_contiguous(memory_format=fmt) and kernels.memory_format_of(y_new) == fmt


def test_select_channels_keeps_the_memory_format():
    x = torch.randn(3, 6, 4, 5)
    chans = torch.tensor([4, 0, 5])
    for fmt in kernels.MEMORY_FORMATS.values():
        y = kernels.select_channels(x.contiguous(memory_format=fmt), chans)
        assert torch.equal(y, x[:, [4, 0, 5]]) and kernels.memory_format_of(y) == fmt
    assert kernels.memory_format_of(torch.randn(1, 6, 1, 1).contiguous(memory_format=torch.channels_last)) \
        == torch.contiguous_format  # both layouts at once: counted as plain


def test_cpu_path_float64_is_exact():
    x, weight, blocks, _, masked, conv = make_case(SHAPES[1], seed=3, dtype=torch.float64)
    ref = F.conv2d(x, masked, **conv)
    for strategy in kernels.CPU_STRATEGIES:
        assert rel_err(kernels.grouped_conv2d_cpu(x, weight, blocks, strategy=strategy, **conv), ref) < 1e-12


def test_weights_outside_blocks_are_ignored():
    x, weight, blocks, mask2d, masked, conv = make_case(SHAPES[0], seed=4)
    noisy = weight + 100.0 * (1 - mask2d).view(weight.shape)  # only the mask's complement changes
    for strategy in kernels.CPU_STRATEGIES:
        y = kernels.grouped_conv2d_cpu(x, noisy, blocks, strategy=strategy, **conv)
        assert rel_err(y, F.conv2d(x, masked, **conv)) < 1e-5


def test_cost_rule_picks_each_strategy():
    """Channel-local blocks -> per-block convs (grouped conv on tiny maps); thick random-column
    blocks -> gather-GEMM; one full block or 8-row random-column blocks -> dense."""
    g = torch.Generator().manual_seed(0)
    O, C, k = 128, 128, 3
    w = torch.randn(O, C, k, k, generator=g)
    chan_local = [(torch.arange(16 * i, 16 * i + 16),
                   (torch.randperm(C, generator=g)[:26].sort().values[:, None] * 9 + torch.arange(9)).view(-1))
                  for i in range(8)]
    thick_random = [(torch.arange(64 * i, 64 * i + 64), torch.randperm(C * 9, generator=g)[:115].sort().values)
                    for i in range(2)]
    thin_random = [(torch.arange(8 * i, 8 * i + 8), torch.randperm(C * 9, generator=g)[:230].sort().values)
                   for i in range(16)]
    full = [(torch.arange(O), torch.arange(C * k * k))]
    P = 64 * 16 * 16  # batch 64 of 16x16 maps, stride 1
    for blocks, expected in [(chan_local, "conv"), (thick_random, "gather"), (thin_random, "dense"), (full, "dense")]:
        info, _ = kernels.make_plan(w, kernels.check_blocks(w.shape, blocks))
        assert kernels.choose_cpu_strategy(info, P, P) == expected
    info, _ = kernels.make_plan(w, kernels.check_blocks(w.shape, chan_local))
    assert kernels.choose_cpu_strategy(info, 4, 4) == "dense"  # fixed per-call costs dominate 4 pixels
    assert kernels.choose_cpu_strategy(info, 64 * 4, 64 * 4) == "grouped"  # 2x2 maps: one call, not 8
    costs = kernels.cpu_strategy_costs(info, P, P)
    assert costs["conv"] < 0.5 * costs["dense"]
    # the cached choice, per input shape and memory format, is what a forward runs: the rule's pick,
    # or dense or a sparse strategy predicted within AUTOTUNE_SPREAD of the pick, if timing says so
    for shape in ((2, C, 5, 5), (64, C, 16, 16)):
        layer = kernels.RegroupedConv2d(w, chan_local, padding=1)
        x = torch.randn(shape)
        layer(x)
        layer(x.contiguous(memory_format=torch.channels_last))
        pixels = shape[0] * shape[2] * shape[3]
        costs, pick = kernels.cpu_strategy_costs(info, pixels, pixels), kernels.choose_cpu_strategy(info, pixels, pixels)
        allowed = {"dense", pick} | {s for s in costs if costs[s] <= kernels.AUTOTUNE_SPREAD * costs[pick]}
        assert len(layer.info["choice"]) == 2
        for fmt in kernels.MEMORY_FORMATS.values():
            assert layer.info["choice"][(shape, str(fmt))] in allowed


def test_autotune_keeps_the_faster_strategy(monkeypatch):
    w = torch.randn(16, 8, 3, 3)
    blocks = [(torch.arange(8), torch.arange(9)), (torch.arange(8, 16), torch.arange(9, 18))]
    layer = kernels.RegroupedConv2d(w, blocks, padding=1)
    clock = iter(range(10_000))                   # a fake clock: every run of "dense" takes 5 ticks
    real_run = kernels._run_strategy

    def run(x, info, t, conv_args, strategy, out):
        for _ in range(5 if strategy == "dense" else 1):
            next(clock)
        return real_run(x, info, t, conv_args, strategy, out)
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(kernels, "_run_strategy", run)
    x = torch.randn(2, 8, 6, 6)
    assert kernels._faster(x, layer.info, {k: getattr(layer, "plan_" + k) for k in layer._plan_keys},
                           ((1, 1), (1, 1), (1, 1)), ("dense", "conv")) == "conv"


# ---- validation ----

def test_bad_blocks_raise_value_error_naming_the_layer():
    w_shape = (6, 2, 3, 3)
    good = (torch.tensor([0, 1]), torch.tensor([0, 17]))
    with pytest.raises(ValueError, match="layer1.0.conv1.weight.*row index 6"):
        kernels.check_blocks(w_shape, [good, (torch.tensor([6]), torch.tensor([0]))], "layer1.0.conv1.weight")
    with pytest.raises(ValueError, match="convX.*col index 18"):
        kernels.check_blocks(w_shape, [(torch.tensor([2]), torch.tensor([18]))], "convX")
    with pytest.raises(ValueError, match="shares output rows"):
        kernels.check_blocks(w_shape, [good, (torch.tensor([1, 2]), torch.tensor([3]))], "c")
    with pytest.raises(ValueError, match="repeats"):
        kernels.check_blocks(w_shape, [(torch.tensor([2, 2]), torch.tensor([3]))], "c")
    with pytest.raises(ValueError, match="groups"):
        kernels.RegroupedConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), [good])


# ---- modules ----

class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=True)
        self.body = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.Conv2d(12, 10, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                                  nn.Conv2d(10, 7, 1, bias=True), nn.ReLU())
        self.fc = nn.Linear(7, 5)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def tiny_model_and_blocks():
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial BN statistics
        model.body[0].running_mean.uniform_(-0.5, 0.5)
        model.body[0].running_var.uniform_(0.5, 2.0)
    blocks, masks = {}, {}
    for i, name in enumerate(["stem.weight", "body.2.weight", "body.4.weight"]):
        O, C, kh, kw = model.get_parameter(name).shape
        blocks[name], masks[name] = random_blocks(O, C * kh * kw, seed=10 + i, n_blocks=3)
    return model, blocks, masks


def test_regrouped_model_equals_masked_dense_model():
    model, blocks, masks = tiny_model_and_blocks()
    reference = TinyCNN()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    with torch.no_grad():
        for name, mask2d in masks.items():
            p = reference.get_parameter(name)
            p.mul_(mask2d.view(p.shape))
    regrouped = kernels.regrouped_model(model, blocks)
    assert model.training and not regrouped.training  # the original is untouched
    assert isinstance(regrouped.body[2], kernels.RegroupedConv2d) and isinstance(model.body[2], nn.Conv2d)
    x = torch.randn(4, 3, 15, 15)
    with torch.no_grad():
        ref, y = reference(x), regrouped(x)
        assert rel_err(y, ref) < 1e-5
        assert rel_err(kernels.masked_model(model, blocks)(x), ref) < 1e-6
        unmasked = TinyCNN()
        unmasked.load_state_dict(model.state_dict())
        assert rel_err(unmasked.eval()(x), ref) > 1e-2  # the masks matter: the check above is sensitive
    # the inner conv (no bias) has an empty output channel -> exactly 0
    layer = regrouped.body[2]
    with torch.no_grad():
        inner = layer(torch.randn(2, 12, 9, 9))
    empty = torch.nonzero(masks["body.2.weight"].sum(1) == 0).view(-1)
    assert (inner[:, empty] == 0).all()


def test_regrouped_conv_stores_packed_blocks_and_keeps_bias():
    model, blocks, masks = tiny_model_and_blocks()
    layer = kernels.RegroupedConv2d.from_conv(model.body[4], blocks["body.4.weight"], name="body.4.weight")
    sd = layer.state_dict()
    assert set(sd) == {"bias", "block_sizes", "plan_packed", "plan_rows", "plan_cols"}
    assert sd["plan_packed"].numel() == int(masks["body.4.weight"].sum())
    x = torch.randn(3, 10, 5, 6)
    masked = model.body[4].weight * masks["body.4.weight"].view(model.body[4].weight.shape)
    with torch.no_grad():
        assert rel_err(layer(x), F.conv2d(x, masked, model.body[4].bias)) < 1e-5
        assert rel_err(kernels.grouped_conv2d(x, layer), layer(x)) == 0
        y = kernels.grouped_conv2d(x, model.body[4].weight, blocks["body.4.weight"])
        assert rel_err(y, F.conv2d(x, masked)) < 1e-5


def test_regrouped_model_rejects_tickets_that_do_not_fit():
    model, blocks, _ = tiny_model_and_blocks()
    with pytest.raises(ValueError, match="body.9.weight"):
        kernels.regrouped_model(model, {**blocks, "body.9.weight": blocks["stem.weight"]})
    with pytest.raises(ValueError, match="fc.weight"):
        kernels.regrouped_model(model, {"fc.weight": [(torch.tensor([0]), torch.tensor([0]))]})
    with pytest.raises(ValueError, match="body.4.weight.*row index 7"):
        kernels.regrouped_model(model, {"body.4.weight": [(torch.tensor([7]), torch.tensor([0]))]})


def test_bench_helpers_return_checked_rows():
    model, blocks, _ = tiny_model_and_blocks()
    rows = kernels.bench_layers(model, blocks, batch_size=2, device="cpu", repeats=1, input_size=(3, 16, 16))
    assert [r["name"] for r in rows] == list(blocks)
    assert rows[1]["input_hw"] == (16, 16) and rows[2]["input_hw"] == (8, 8)
    for r in rows:
        assert r["max_rel_err"] < 1e-5 and r["dense_ms"] > 0 and r["regrouped_ms"] > 0
        assert r["path"] in kernels.CPU_STRATEGIES and abs(r["ideal_speedup"] * r["flop_ratio"] - 1) < 1e-9
    total = kernels.bench_model(model, blocks, batch_size=2, device="cpu", repeats=1, input_size=(3, 16, 16))
    assert total["max_rel_err"] < 1e-5 and 0 < total["conv_flop_ratio"] < 1
    assert total["memory_format"] == "contiguous"


def test_regrouped_model_in_channels_last_equals_masked_dense_model():
    model, blocks, _ = tiny_model_and_blocks()
    cl = torch.channels_last
    x = torch.randn(4, 3, 15, 15)
    with torch.no_grad():
        ref = kernels.masked_model(model, blocks).double()(x.double())
        regrouped = kernels.regrouped_model(model, blocks).to(memory_format=cl)
        for m in regrouped.modules():
            if isinstance(m, kernels.RegroupedConv2d):
                m.info["forced"] = "conv"  # the channels-last per-block path, not the cost rule's pick
        inner = []
        regrouped.body[2].register_forward_hook(lambda m, i, o: inner.append(o))
        y = regrouped(x.contiguous(memory_format=cl))
    assert rel_err(y, ref) < 1e-5
    assert kernels.memory_format_of(inner[0]) == cl  # the activations stay channels-last
    rows = kernels.bench_layers(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16), memory_format=cl)
    assert all(r["max_rel_err"] < 1e-5 for r in rows)
    total = kernels.bench_model(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16), memory_format=cl)
    assert total["max_rel_err"] < 1e-5 and total["memory_format"] == "channels_last"


# ---- CUDA: tables (CPU), compile check (nvcc), kernel (GPU only) ----

def test_cuda_tables_cover_every_block_row_once():
    """Emulate the kernel's tile loop with the int32 tables: it must reproduce the reference."""
    x, weight, blocks, _, masked, conv = make_case(SHAPES[5], seed=5)
    info, t = kernels.make_plan(weight, kernels.check_blocks(tuple(weight.shape), blocks))
    meta, tiles = t["cuda_meta"].tolist(), t["cuda_tiles"].tolist()
    rows, cols, packed = t["cuda_rows"].long(), t["cuda_cols"].long(), t["packed"]
    x_cols = F.unfold(x, weight.shape[2:], **conv)  # (N, K, L)
    y = torch.zeros(x.shape[0], weight.shape[0], x_cols.shape[2])
    for b, row0 in tiles:
        r_start, n_rows, c_start, n_cols, w_off = meta[b]
        wb = packed[w_off:w_off + n_rows * n_cols].view(n_rows, n_cols)
        r = torch.arange(row0, min(row0 + info["tile_rows"], n_rows))
        y[:, rows[r_start + r]] += wb[r] @ x_cols[:, cols[c_start:c_start + n_cols]]
    ref = F.conv2d(x, masked, **conv)
    assert rel_err(y.view(ref.shape), ref) < 1e-5


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_source_compiles_without_spills(tmp_path):
    src = kernels.write_cuda_source(str(tmp_path / "grouped_gemm.cu"))
    torch_flags = ["-std=c++20", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",  # as load_inline
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    res = subprocess.run(["nvcc", "-arch=sm_90", "-c", "-Xptxas", "-v", *torch_flags, src,
                          "-o", str(tmp_path / "grouped_gemm.o")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    assert len(spills) == 6  # {float, half, bf16} x {16x128, 64x64} tiles
    assert all(s == ("0", "0") for s in spills), res.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_matches_reference(shape, dtype, tol):
    x, weight, blocks, mask2d, masked, conv = make_case(shape, seed=6)
    assert kernels.cuda_available_kernel()
    ref = F.conv2d(x.double(), masked.double(), **conv)
    layer = kernels.RegroupedConv2d(weight, blocks, None, name="t", **conv).cuda().to(dtype)
    y = layer(x.cuda().to(dtype))
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y.cpu(), ref) < tol
    empty = torch.nonzero(mask2d.sum(1) == 0).view(-1).cuda()
    assert (y[:, empty] == 0).all()
    y_cl = layer(x.cuda().to(dtype).contiguous(memory_format=torch.channels_last))
    assert torch.equal(y_cl, y) and kernels.memory_format_of(y_cl) == kernels.memory_format_of(
        x.contiguous(memory_format=torch.channels_last))  # same values, the input's layout


@cuda
def test_cuda_thick_blocks_and_model():
    model, blocks, _ = tiny_model_and_blocks()
    x = torch.randn(5, 3, 33, 31)
    with torch.no_grad():
        ref = kernels.masked_model(model, blocks)(x)
        y = kernels.regrouped_model(model, blocks).cuda()(x.cuda())
    assert rel_err(y.cpu(), ref) < 1e-3
    g = torch.Generator().manual_seed(7)
    w, xs = torch.randn(150, 40, 3, 3, generator=g), torch.randn(3, 40, 17, 17, generator=g)
    thick = [(torch.arange(0, 70), torch.randperm(360, generator=g)[:77].sort().values),
             (torch.arange(80, 150), torch.randperm(360, generator=g)[:300].sort().values)]
    ref = kernels.grouped_gemm_reference(xs.double(), w.double(), thick, padding=1)
    y = kernels.grouped_conv2d(xs.cuda(), w.cuda(), thick, padding=1)
    assert kernels.RegroupedConv2d(w, thick).info["tile_rows"] == 64 and rel_err(y.cpu(), ref) < 1e-3


def test_regrouped_model_of_a_pipeline_ticket_equals_the_masked_dense_model(tmp_path):
    out, _ = run_cli(tmp_path, "--levels", "1", "--method", "regroup")
    t = ticket(out, 1, "regroup")
    model = models.MODELS["resnet20"](10)
    model.load_state_dict(t["state_dict"])
    model.eval()
    fast = kernels.regrouped_model(model, t["blocks"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, y = model(x), fast(x)          # the ticket's weights are already zero outside the blocks
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert sum(isinstance(m, kernels.RegroupedConv2d) for m in fast.modules()) == 18


def test_bench_density_runs_the_grouped_gemm_on_a_fresh_regrouped_model(tmp_path):
    args = L.build_parser().parse_args(
        ["--bench", "--arch", "resnet20", "--method", "regroup", "--bench-density", "0.2",
         "--bench-repeats", "1", "--out-dir", str(tmp_path)])
    report = L.bench_kernels(args, log=lambda *_: None)
    run = report["runs"][0]
    assert len(run["layers"]) == 18 and run["model"]["max_rel_err"] < 1e-4
    assert report["memory_format"] == run["model"]["memory_format"] == "channels_last"  # auto on the CPU
    assert json.load(open(tmp_path / "bench.json"))["arch"] == "resnet20"
    _, ticket = L.fresh_ticket(args)
    model = models.MODELS["resnet20"](10)
    model.load_state_dict(ticket["state_dict"])
    with torch.no_grad():                    # BN calibrated: the output depends on the input
        assert model.eval()(torch.randn(8, 3, 32, 32)).std(0).max() > 1e-3


def test_bench_density_refuses_an_unstructured_method(tmp_path, capsys):
    assert L.main(["--bench", "--bench-density", "0.2", "--method", "imp",
                   "--out-dir", str(tmp_path)]) == 2
    assert "--bench-density needs" in capsys.readouterr().err


def test_cli_without_network_stops_with_a_hint_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    code = L.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"),
                   "--epochs", "2", "--levels", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Put cifar-10-python.tar.gz" in err and "Traceback" not in err


def test_official_width_rule_stops_at_the_first_prefix_that_leaves_rows_under_prefix_over_ratio():
    m = torch.zeros(8, 50)
    m[:, 10:30] = 1                           # every row: the same 20 columns
    (rows, cols), = L.official_width_blocks(m, [np.arange(8)])
    expect = next(k for k in range(1, 51) if 20 - min(k, 20) < k / 1.5)     # k = 13
    assert len(cols) == expect == 13 and set(cols.tolist()) <= set(range(10, 30))


def test_device_auto_without_cuda_warns_once_and_uses_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert L.resolve_device("auto") == "cpu"
    assert capsys.readouterr().err.count("WARNING: no CUDA GPU found") == 1
    with pytest.raises(L.UsageError, match="--device cuda"):
        L.resolve_device("cuda")


def test_kernel_fallback_warning_is_one_stderr_line_per_message(capsys):
    kernels._warn_once("test fallback message")
    kernels._warn_once("test fallback message")
    captured = capsys.readouterr()
    assert captured.err == "WARNING: test fallback message\n" and captured.out == ""
