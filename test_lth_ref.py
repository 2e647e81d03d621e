"""Tests for lth_ref: models, data, masks and IMP, refill, regroup, the CLI, and the grouped GEMM.

Run with `python -m pytest -q test_lth_ref.py` (CPU, a few minutes). CUDA tests skip without a GPU.
"""
import argparse
import ast
import copy
import csv
import ctypes
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import shlex
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import types
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from data import DataError
from models import MODELS, BasicBlock, PadShortcut, count_params
import data
import kernels
import lth_ref as L
import lth_tools
import models

# the slow marker (tests that train, start processes or build): the project keeps no pytest config file
warnings.filterwarnings("ignore", message="Unknown pytest.mark.slow",
                        category=pytest.PytestUnknownMarkWarning)


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
    "mobilenet_v1": 3_217_226,
    "resnet50": 23_528_522,
    "resnet50_3x3stem": 23_520_842,
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


def test_param_counts_of_mobilenet_and_resnet50_match_paper():
    # MBNet-v1 3.21M (Table 1, Fig. 4) is the count without the classifier; RN-50 25.56M (Table 1,
    # Fig. 3) is torchvision's 1000-class ResNet-50; RN-50(+) swaps the 7x7 stem for a 3x3 one.
    mobilenet = built("mobilenet_v1")
    assert round((count_params(mobilenet) - count_params(mobilenet.fc)) / 1e6, 2) == 3.21
    assert count_params(built("resnet50", 1000)) == 25_557_032
    assert count_params(built("resnet50", 1000)) - count_params(built("resnet50_3x3stem", 1000)) \
        == 64 * 3 * (7 * 7 - 3 * 3)
    assert count_params(built("resnet50_3x3stem", 200)) == 23_910_152  # Tiny-ImageNet head


def test_depthwise_convs_are_a_small_share_and_refused_by_the_grouped_gemm():
    conv_list = convs(built("mobilenet_v1"))[1:]  # not the stem
    depthwise = [m for _, m in conv_list if m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    share = sum(m.weight.numel() for m in depthwise) / sum(m.weight.numel() for _, m in conv_list)
    assert 0.013 < share < 0.015  # 44,640 of 3,184,224 weights
    with pytest.raises(ValueError, match=r"layers\.0\.conv1: grouped convs \(groups=32\)"):
        kernels.RegroupedConv2d.from_conv(depthwise[0], [], name="layers.0.conv1")


def test_resnet50_stems_and_bottlenecks():
    for name, kernel, stride in (("resnet50", (7, 7), (2, 2)), ("resnet50_3x3stem", (3, 3), (1, 1))):
        conv_list = convs(built(name))
        assert (conv_list[0][1].kernel_size, conv_list[0][1].stride) == (kernel, stride)
        assert len(conv_list) == 1 + 16 * 3 + 4  # stem, 16 bottlenecks of 3 convs, 4 shortcut convs
        assert [m.kernel_size for _, m in conv_list].count((1, 1)) == 16 * 2 + 4
        assert built(name).fc.in_features == 2048
    assert isinstance(built("resnet50").pool, nn.MaxPool2d)
    assert isinstance(built("resnet50_3x3stem").pool, nn.Identity)
    with pytest.raises(ValueError, match="unknown stem"):
        models.BottleneckResNet([1, 1, 1, 1], 10, stem="5x5")


@pytest.mark.parametrize("name, size", [("resnet50", 64), ("resnet50_3x3stem", 16), ("mobilenet_v1", 32)])
def test_new_backbones_train_a_step_on_two_tiny_images(name, size, one_thread):
    torch.manual_seed(0)
    model = MODELS[name](5)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)
    F.cross_entropy(out, torch.tensor([1, 3])).backward()
    stem = convs(model)[0][1]
    for p in (stem.weight, model.fc.weight, convs(model)[-1][1].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


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
    assert stem.in_channels == 3 and stem.kernel_size == ((7, 7) if name == "resnet50" else (3, 3))
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


def as_official(monkeypatch, archive, spec=data.CIFAR10):
    """load_dataset takes this generated archive for the official one (its md5 as the published md5)."""
    name = {data.CIFAR10: "cifar10", data.CIFAR100: "cifar100"}[spec]
    official = dataclasses.replace(spec, md5=data.file_md5(str(archive)))
    monkeypatch.setitem(data.DATASETS, name, functools.partial(data.load_cifar, official))


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


def test_cifar10_from_archive_extracts_it(tmp_path, monkeypatch):
    (tmp_path / "dd").mkdir()
    raw, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path / "dd", **C10_ROWS)
    as_official(monkeypatch, archive)
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


@pytest.mark.parametrize("train_rows, test_rows, empty", [
    ((0,) * 5, (3,), "data_batch_1, data_batch_2"), ((1, 2, 3, 4, 5), (0,), "test_batch hold no images")])
def test_an_empty_split_is_a_data_error(tmp_path, train_rows, test_rows, empty):
    write_cifar(tmp_path, data.CIFAR10, train_rows, test_rows)
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    assert empty in str(e.value) and "re-extract" in str(e.value)


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
def test_unsafe_archive_member_is_refused(tmp_path, monkeypatch, member):
    dd = tmp_path / "a" / "b"
    dd.mkdir(parents=True)
    tar_with(dd / "cifar-10-python.tar.gz", member)
    as_official(monkeypatch, dd / "cifar-10-python.tar.gz")     # an official archive that went bad
    with pytest.raises(DataError, match="unsafe member") as e:
        data.load_dataset("cifar10", str(dd), download=False, log=quiet)
    assert "cifar-10-python.tar.gz" in str(e.value)
    assert sorted(os.listdir(dd)) == ["cifar-10-python.tar.gz"]  # nothing extracted, no temp dir left
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/lth_ref_evil.txt")


def test_corrupt_archive(tmp_path, monkeypatch):
    _, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path, **C10_ROWS)
    archive.write_bytes(archive.read_bytes()[:300])
    as_official(monkeypatch, archive)                           # (the md5 check is tested on its own)
    with pytest.raises(DataError, match="could not extract") as e:
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    assert str(archive) in str(e.value)


def test_a_local_archive_that_is_not_the_official_one_is_refused_before_extracting(tmp_path):
    _, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path, **C10_ROWS)
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    assert f"{archive} is corrupt (md5 {data.file_md5(str(archive))}, expected {data.CIFAR10.md5})" in \
        str(e.value) and "delete it and run again to download it" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-python.tar.gz", "src"]   # nothing extracted


def test_a_file_where_the_extracted_folder_goes_is_named(tmp_path):
    (tmp_path / "cifar-10-batches-py").write_text("not a folder")
    with pytest.raises(DataError, match="cifar-10-batches-py is not a folder .*move or delete it"):
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)


def test_archive_without_the_folder(tmp_path, monkeypatch):
    m = tarfile.TarInfo("something-else/file")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.addfile(m, io.BytesIO(b""))
    as_official(monkeypatch, tmp_path / "cifar-10-python.tar.gz")
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


def test_an_archive_extracted_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    (tmp_path / "dd").mkdir()
    raw, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path / "dd", **C10_ROWS)
    as_official(monkeypatch, archive)
    rename = os.replace

    def another_rank_first(src, dst):                           # torchrun's other rank renames first
        if dst.endswith(data.CIFAR10.folder) and not os.path.exists(dst):
            shutil.copytree(src, dst)
        rename(src, dst)
    monkeypatch.setattr(os, "replace", another_rank_first)
    logs = []
    check_matches(data.load_dataset("cifar10", str(tmp_path / "dd"), download=False, log=logs.append), raw,
                  10)
    assert any("was extracted meanwhile by another process: using it" in m for m in logs)
    assert sorted(os.listdir(tmp_path / "dd")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_a_full_disk_while_extracting_is_a_write_fault_not_a_corrupt_archive(tmp_path, monkeypatch, capsys):
    _, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path, **C10_ROWS)
    as_official(monkeypatch, archive)
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".extract-1" / "test_batch"))
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: (_ for _ in ()).throw(full))
    assert L.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"),
                   "--device", "cpu", "--levels", "0", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {full.filename}: No space left on device")
    assert "corrupt" not in err
    assert archive.exists() and not list(tmp_path.glob(".extract-*"))


def test_an_archive_in_a_read_only_data_dir_says_how_to_extract_it(tmp_path, monkeypatch):
    _, archive = make_archive(tmp_path / "src", data.CIFAR10, tmp_path, **C10_ROWS)
    as_official(monkeypatch, archive)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system", k["dir"])))
    with pytest.raises(DataError) as e:
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    assert str(e.value) == (f"cannot extract {archive} into {tmp_path} (Read-only file system): extract it "
                            f"there yourself (tar xzf {archive} -C {tmp_path}), or pass a --data-dir this "
                            "user may write")


def test_an_unreadable_data_file_or_folder_says_so_not_corrupt(tmp_path, monkeypatch):
    write_cifar(tmp_path, data.CIFAR10, **C10_ROWS)
    denied = lambda path: PermissionError(errno.EACCES, "Permission denied", path)
    opened = open
    monkeypatch.setattr(data, "open", lambda path, *a: (_ for _ in ()).throw(denied(path))
                        if path.endswith("data_batch_2") else opened(path, *a), raising=False)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with pytest.raises(DataError, match=f"^cannot read {batch} \\(Permission denied\\): fix its"):
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    write_tiny_imagenet(tmp_path)
    monkeypatch.setattr(os, "scandir", lambda path: (_ for _ in ()).throw(denied(path)))
    with pytest.raises(DataError, match="^cannot read .*train/.*/images \\(Permission denied\\)"):
        data.load_dataset("tinyimagenet", str(tmp_path), log=quiet)


@pytest.mark.parametrize("name, write", [
    ("cifar10", lambda root: write_cifar(root, data.CIFAR10, **C10_ROWS)),
    ("tinyimagenet", lambda root: write_tiny_imagenet(root))])                    # (defined further down)
def test_a_data_dir_that_is_the_datasets_folder_itself_names_its_parent(tmp_path, name, write):
    write(tmp_path)
    inner = tmp_path / {"cifar10": data.CIFAR10.folder, "tinyimagenet": "tiny-imagenet-200"}[name]
    with pytest.raises(DataError) as e:
        data.load_dataset(name, str(inner), log=quiet)                 # download allowed: none is tried
    assert str(e.value) == (f"--data-dir {inner} is the dataset's {inner.name}/ folder itself: pass the "
                            f"folder that holds it, --data-dir {tmp_path}")


def test_a_stop_while_a_file_loads_is_a_stop_not_a_damaged_file(tmp_path, monkeypatch):
    write_cifar(tmp_path, data.CIFAR10, **C10_ROWS)
    stop = lambda *a, **k: (_ for _ in ()).throw(L.Stopped(signal.SIGTERM))   # SIGTERM's handler raises it
    monkeypatch.setattr(data._ArrayUnpickler, "load", stop)
    with pytest.raises(L.Stopped):
        data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet)
    torch.save({}, tmp_path / "t.pt")
    monkeypatch.setattr(torch, "load", stop)
    with pytest.raises(L.Stopped):
        L.load_file(str(tmp_path / "t.pt"), "ticket")


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
    assert set(data.DATASETS) == {"cifar10", "cifar100", "tinyimagenet", "imagenet", "synthetic"}
    assert set(data.IMAGE_SHAPES) == set(data.DATASETS)
    with pytest.raises(DataError, match="cifar10, cifar100, tinyimagenet, imagenet, synthetic"):
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


def test_eval_batches_in_order_without_augmentation():
    d = tiny_data(50)
    batches = list(data.eval_batches(d, 5, "test"))
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


# ---- data: folder datasets and validation split ----
def rows_in(full_x, part_x):
    """Index in full_x of every image of part_x (images are distinct random pixels)."""
    flat = full_x.reshape(len(full_x), -1)
    return [int((flat == img.flatten()).all(1).nonzero()[0, 0]) for img in part_x]


def test_val_split_is_disjoint_from_training_and_stable_for_a_seed(tmp_path):
    write_cifar(tmp_path, data.CIFAR10, train_rows=(40, 30, 20, 10, 9), test_rows=(3,))
    load = lambda **kw: data.load_dataset("cifar10", str(tmp_path), download=False, log=quiet, **kw)
    full = load()
    assert full.num_val == 0 and full.num_train == 109
    a, b, c = load(val_split=20, seed=1), load(val_split=20, seed=1), load(val_split=20, seed=2)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.val_x, c.val_x)
    assert (a.num_train, a.num_val, a.num_test) == (89, 20, 3) and torch.equal(a.mean, full.mean)
    val_rows, train_rows = rows_in(full.train_x, a.val_x), rows_in(full.train_x, a.train_x)
    assert sorted(val_rows + train_rows) == list(range(109))  # disjoint, together the training set
    assert torch.equal(full.train_y[val_rows], a.val_y)
    # the validation set is drawn first: a training subset of the rest leaves it unchanged
    d = load(val_split=20, seed=1, train_subset=30)
    assert torch.equal(d.val_x, a.val_x) and d.num_train == 30
    assert not set(rows_in(full.train_x, d.train_x)) & set(val_rows)
    # without a validation split the subset is the one drawn before validation splits existed
    keep = torch.randperm(109, generator=torch.Generator().manual_seed(1))[:30].sort().values
    assert torch.equal(load(train_subset=30, seed=1).train_x, full.train_x[keep])
    x = torch.cat([x for x, _ in data.eval_batches(a, 7, "val")])
    assert torch.equal(denormalize(x, a), a.val_x)  # in order, no augmentation
    with pytest.raises(DataError, match="no validation set.*val_split=N"):
        next(data.eval_batches(full, 7, "val"))
    for bad in (-1, 109):
        with pytest.raises(DataError, match=rf"val_split={bad} \(--val-split\) is out of range"):
            load(val_split=bad)
    with pytest.raises(DataError, match="90 training examples after holding out val_split=19"):
        load(val_split=19, train_subset=91)


def test_synthetic_val_split_is_disjoint_and_seeded():
    full = data.load_dataset("synthetic", "unused", log=quiet)
    a = data.load_dataset("synthetic", "unused", log=quiet, val_split=500, seed=3)
    b = data.load_dataset("synthetic", "unused", log=quiet, val_split=500, seed=3)
    assert (a.num_train, a.num_val, a.num_test) == (data.SYNTH_TRAIN - 500, 500, data.SYNTH_TEST)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y)
    flat = lambda x: {bytes(img.flatten().numpy()) for img in x}
    assert not flat(a.val_x) & flat(a.train_x) and flat(a.val_x) | flat(a.train_x) == flat(full.train_x)


def global_batches(d, batch_size, seed, world_size, **kw):
    """Per global step, the concatenation over ranks of their slices: [(x, y), ...]."""
    per_rank = [list(data.train_batches(d, batch_size, torch.Generator().manual_seed(seed), r, world_size))
                for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank takes the same number of steps
    return [(torch.cat([b[step][0] for b in per_rank]), torch.cat([b[step][1] for b in per_rank]))
            for step in range(len(per_rank[0]))]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def eval_union(d, batch_size, world_size, split="test"):
    parts = [list(data.eval_batches(d, batch_size, split, r, world_size)) for r in range(world_size)]
    return torch.cat([x for p in parts for x, _ in p]), torch.cat([y for p in parts for _, y in p])


def test_sharded_batches_of_in_memory_data_do_not_depend_on_world_size():
    d = tiny_data(50)
    one = global_batches(d, 16, seed=5, world_size=1)
    for world_size in (2, 3):
        assert_same_batches(global_batches(d, 16, seed=5, world_size=world_size), one)
    rank1 = data.train_batches(d, 16, torch.Generator().manual_seed(5), rank=1, world_size=3)
    sizes = [len(y) for _, y in rank1]
    assert sizes == [5, 5, 5, 1]  # rank 1 of 3: 16 = 6 + 5 + 5, the last global batch 2 = 1 + 1 + 0
    x, y = eval_union(d, 4, world_size=3)
    assert torch.equal(y, d.test_y) and torch.equal(denormalize(x, d), d.test_x)  # each once, in order
    with pytest.raises(ValueError, match="rank 2"):
        data.train_batches(d, 16, torch.Generator(), rank=2, world_size=2)


# Tiny-ImageNet / ImageNet-style folders of JPEGs, written with Pillow
TINY_WNIDS = ["n0300", "n0100", "n0200"]  # unsorted, as in the real wnids.txt: labels follow sorted order


def write_jpeg(path, seed, size):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)  # 8x8 tiles: survives JPEG
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=95)


def write_tiny_imagenet(root, per_class=3, val=5):
    """tiny-imagenet-200/ with 3 classes; returns {relative path: label} of train and of val (test)."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    label = {w: i for i, w in enumerate(sorted(TINY_WNIDS))}
    train, test, seed = {}, {}, 0
    for wnid in TINY_WNIDS:
        for i in range(per_class):
            rel = f"train/{wnid}/images/{wnid}_{i}.JPEG"
            write_jpeg(folder / rel, seed := seed + 1, (64, 64))
            train[rel] = label[wnid]
    lines = []
    for i in range(val):
        wnid = TINY_WNIDS[i % 3]
        write_jpeg(folder / f"val/images/val_{i}.JPEG", seed := seed + 1, (64, 64))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
        test[f"val/images/val_{i}.JPEG"] = label[wnid]
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder, train, test


def decoded(path):
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def load_folder_data(name, root, workers=0, **kw):
    d = data.load_dataset(name, str(root), log=quiet, **kw)
    d.num_workers = workers
    return d


def test_tiny_imagenet_folder_labels_shapes_and_test_split(tmp_path):
    folder, train, test = write_tiny_imagenet(tmp_path)
    d = load_folder_data("tinyimagenet", tmp_path)
    assert (d.num_classes, d.image_shape, d.num_train, d.num_val, d.num_test) == (3, (3, 64, 64), 9, 0, 5)
    assert {os.fsdecode(f): int(y) for f, y in zip(d.files["train"], d.labels["train"])} == train
    x, y = map(torch.cat, zip(*data.eval_batches(d, 2)))
    assert y.tolist() == list(test.values())  # val_annotations.txt order
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.float32
    expected = torch.stack([decoded(folder / rel) for rel in test])
    assert torch.equal(denormalize(x, d), expected)  # decoded as is, normalized with the constants
    torch.testing.assert_close(d.mean, torch.tensor(data.TINY_IMAGENET_MEAN) * 255)


def test_tiny_imagenet_training_views_are_seeded_pad_crop_flips(tmp_path):
    folder, train, _ = write_tiny_imagenet(tmp_path)
    d = load_folder_data("tinyimagenet", tmp_path)
    run = lambda seed: list(data.train_batches(d, 4, torch.Generator().manual_seed(seed)))
    a, b, c = run(7), run(7), run(8)
    assert_same_batches(a, b)
    assert not torch.equal(a[0][0], c[0][0])
    assert [len(y) for _, y in a] == [4, 4, 1]
    seen = torch.cat([y for _, y in a])
    assert sorted(seen.tolist()) == sorted(train.values())  # every image once
    sources = {rel: decoded(folder / rel) for rel in train}
    flips = 0
    for xb, yb in a:
        for img, label in zip(denormalize(xb, d), yb):
            views = torch.cat([torch.stack([v, v.flip(-1)]) for rel, src in sources.items()
                               if train[rel] == label
                               for v in F.pad(src, (4, 4, 4, 4)).unfold(1, 64, 1).unfold(2, 64, 1)
                               .permute(1, 2, 0, 3, 4).reshape(-1, 3, 64, 64)])
            match = (views == img).flatten(1).all(1).nonzero().flatten()
            assert len(match) > 0  # a padded crop (maybe flipped) of an image of its class
            flips += int(match[0] % 2)
    assert 0 < flips < 9


def test_folder_batches_do_not_depend_on_world_size_or_workers(tmp_path):
    write_tiny_imagenet(tmp_path)
    d = load_folder_data("tinyimagenet", tmp_path, val_split=2, seed=4)
    one = global_batches(d, 4, seed=9, world_size=1)
    assert_same_batches(global_batches(d, 4, seed=9, world_size=2), one)
    d.num_workers = 2
    assert_same_batches(global_batches(d, 4, seed=9, world_size=1), one)
    for split in ("test", "val"):
        x1, y1 = eval_union(d, 2, world_size=1, split=split)
        x3, y3 = eval_union(d, 2, world_size=3, split=split)
        assert torch.equal(x1, x3) and torch.equal(y1, y3) and len(y1) == len(d.split_labels(split))


def test_a_sigterm_to_the_process_group_leaves_the_dataloader_workers_running(tmp_path, monkeypatch):
    write_tiny_imagenet(tmp_path)
    d = load_folder_data("tinyimagenet", tmp_path, workers=1)
    item = data.ImageFiles.__getitem__

    def hit_by_the_groups_sigterm(self, i):                    # as scancel or a time limit sends it
        os.kill(os.getpid(), signal.SIGTERM)
        return item(self, i)
    monkeypatch.setattr(data.ImageFiles, "__getitem__", hit_by_the_groups_sigterm)
    batches = list(data.train_batches(d, 4, torch.Generator().manual_seed(0)))
    assert sum(len(y) for _, y in batches) == d.num_train                # the main process decides


def test_an_empty_wnids_file_is_named(tmp_path):
    write_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("\n")
    with pytest.raises(DataError, match="^Tiny-ImageNet: wnids.txt lists no class. Expected under"):
        data.load_dataset("tinyimagenet", str(tmp_path), log=quiet)


def test_folder_val_split_is_disjoint_and_stable(tmp_path):
    write_tiny_imagenet(tmp_path)
    a = load_folder_data("tinyimagenet", tmp_path, val_split=3, seed=1)
    b = load_folder_data("tinyimagenet", tmp_path, val_split=3, seed=1)
    full = load_folder_data("tinyimagenet", tmp_path)
    assert (a.num_train, a.num_val) == (6, 3) and list(a.files["val"]) == list(b.files["val"])
    assert sorted(list(a.files["val"]) + list(a.files["train"])) == sorted(full.files["train"])
    assert not set(a.files["val"]) & set(a.files["train"])


def write_imagenet(root):
    """imagenet/train/<wnid>/ of odd-sized JPEGs, val/<wnid>/ for two of the three classes."""
    sizes = [(48, 40), (30, 50), (320, 256)]
    for i, wnid in enumerate(["n02", "n01", "n03"]):
        for j, size in enumerate(sizes):
            write_jpeg(root / "imagenet" / "train" / wnid / f"{wnid}_{j}.JPEG", 10 * i + j, size)
    write_jpeg(root / "imagenet" / "val" / "n03" / "v0.JPEG", 100, (320, 256))
    write_jpeg(root / "imagenet" / "val" / "n01" / "v1.jpeg", 101, (256, 300))


def test_imagenet_folder_views_labels_and_seeds(tmp_path):
    write_imagenet(tmp_path)
    d = load_folder_data("imagenet", tmp_path)
    assert (d.num_classes, d.image_shape, d.num_train, d.num_test) == (3, (3, 224, 224), 9, 2)
    assert d.labels["train"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # n01, n02, n03 sorted
    x, y = next(data.eval_batches(d, 8))
    assert y.tolist() == [0, 2] and x.shape == (2, 3, 224, 224)
    # test view of a 320x256 image: shorter side already 256, so the central 224 x 224 of the pixels
    src = decoded(tmp_path / "imagenet" / "val" / "n03" / "v0.JPEG")
    assert torch.equal(denormalize(x[1:], d)[0], src[:, 16:240, 48:272])
    run = lambda seed: list(data.train_batches(d, 5, torch.Generator().manual_seed(seed)))
    a, b = run(1), run(1)
    assert_same_batches(a, b)
    assert [tuple(x.shape) for x, _ in a] == [(5, 3, 224, 224), (4, 3, 224, 224)]
    assert not torch.equal(a[0][0], run(2)[0][0])


def test_resized_crop_box_stays_inside_and_falls_back_to_the_center():
    rng = np.random.default_rng(0)
    for width, height in ((500, 375), (64, 300), (7, 5)):
        for _ in range(50):
            left, top, w, h = data.resized_crop_box(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 < h
    # a 1000 x 10 strip admits no box of area >= 8% with aspect <= 4/3: central box at aspect 4/3
    assert data.resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_raises_data_error_naming_the_file(tmp_path, workers):
    folder, _, _ = write_tiny_imagenet(tmp_path)
    bad = folder / "train" / "n0200" / "images" / "n0200_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    d = load_folder_data("tinyimagenet", tmp_path, workers=workers)
    with pytest.raises(DataError) as e:
        list(data.train_batches(d, 4, torch.Generator().manual_seed(0)))
    msg = str(e.value)
    assert msg.startswith(f"cannot decode {bad}") and "truncated or corrupt" in msg
    assert "Traceback" not in msg and "worker" not in msg  # raised here, not a worker's traceback


@pytest.mark.parametrize("damage, phrase", [
    (lambda f: (f / "wnids.txt").write_bytes(b"n0100\n\xff\xfe\n"), "wnids.txt or val/val_annotations"),
    (lambda f: [p.unlink() for p in (f / "train" / "n0200" / "images").iterdir()],
     "train/n0200/images/ holds no images"),
    (lambda f: (f / "val" / "images" / "val_3.JPEG").unlink(), "names 1 images that are missing"),
])
def test_a_damaged_tiny_imagenet_folder_is_a_data_error_before_training(tmp_path, damage, phrase):
    pytest.importorskip("PIL.Image")
    folder, _, _ = write_tiny_imagenet(tmp_path)
    damage(folder)
    with pytest.raises(DataError) as e:
        data.load_dataset("tinyimagenet", str(tmp_path), log=quiet)
    assert phrase in str(e.value)


def test_an_empty_imagenet_class_folder_is_a_data_error(tmp_path):
    pytest.importorskip("PIL.Image")
    write_imagenet(tmp_path)
    (tmp_path / "imagenet" / "train" / "n04").mkdir()
    with pytest.raises(DataError) as e:
        data.load_dataset("imagenet", str(tmp_path), log=quiet)
    assert "train/n04/ holds no images" in str(e.value)


def test_missing_pillow_gives_a_one_line_install_hint(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    for name in ("tinyimagenet", "imagenet"):
        with pytest.raises(DataError) as e:
            data.load_dataset(name, str(tmp_path), log=quiet)
        assert "pip install pillow" in str(e.value) and "\n" not in str(e.value)


def test_missing_folders_say_where_to_put_what(tmp_path):
    pytest.importorskip("PIL.Image")
    with pytest.raises(DataError) as e:
        data.load_dataset("tinyimagenet", str(tmp_path), log=quiet)
    msg = str(e.value)
    assert (str(tmp_path / "tiny-imagenet-200") in msg and "wnids.txt" in msg
            and "tiny-imagenet-200.zip" in msg)
    with pytest.raises(DataError, match=r"no automatic download.*image-net\.org") as e:
        data.load_dataset("imagenet", str(tmp_path), log=quiet)
    assert str(tmp_path / "imagenet") in str(e.value) and "val/<wnid>/*.JPEG" in str(e.value)
    (tmp_path / "imagenet" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "imagenet" / "val" / "n09").mkdir(parents=True)
    with pytest.raises(DataError, match="val/ has class folders missing from train/: n09"):
        data.load_dataset("imagenet", str(tmp_path), log=quiet)
    folder, _, _ = write_tiny_imagenet(tmp_path / "t")
    shutil.rmtree(folder / "train" / "n0100")
    with pytest.raises(DataError, match=r"no folder train/n0100/images/ for class n0100"):
        data.load_dataset("tinyimagenet", str(tmp_path / "t"), log=quiet)


# ---- masks and IMP's step: global magnitude pruning, rewinding ----


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


def test_magnitude_prune_never_brings_back_a_pruned_weight_however_large():
    weights = {"a": torch.tensor([10.0, 9.0, 1.0, 2.0, 3.0])}      # the two largest were pruned before
    new = L.magnitude_prune(weights, {"a": torch.tensor([0.0, 0, 1, 1, 1])}, 1 / 3)
    assert new["a"].tolist() == [0, 0, 0, 1, 1]                  # of 3 kept, the smallest (1.0) goes


def test_every_run_level_and_stream_draws_its_own_seed():
    seeds = [L.mix_seed(seed, level, stream) for seed in range(4) for level in range(31)
             for stream in [*range(-130, 0), *range(241)]]    # ADMM's, the scores', the epochs' streams
    assert len(set(seeds)) == len(seeds)


def test_magnitude_prune_is_global_not_per_layer():
    weights = {"a": torch.full((4, 1, 1, 1), 0.1), "b": torch.full((4, 1, 1, 1), 5.0)}
    new = L.magnitude_prune(weights, L.ones_masks(weights), 0.5)
    assert new["a"].sum() == 0 and new["b"].sum() == 4


def test_top_k_breaks_ties_by_lower_index():
    assert L.top_k(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [False, True, True, False, False]


def test_keep_top_is_global_exact_and_breaks_ties_by_position():
    scores = {"a": torch.tensor([[1.0, 5.0], [3.0, 3.0]]), "b": torch.tensor([3.0, 0.5, 9.0])}
    keep = L.keep_top(scores, 4)
    assert keep["a"].tolist() == [[0.0, 1.0], [1.0, 1.0]] and keep["b"].tolist() == [0.0, 0.0, 1.0]
    assert L.density(L.prune_to_density(scores, 3 / 7)) == pytest.approx(3 / 7)


def test_prunable_weights_skip_the_stem_unless_asked_and_never_depthwise():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4, 2))
    assert list(L.prunable_weights(model)) == ["2.weight"]
    assert list(L.prunable_weights(model, skip_stem=False)) == ["0.weight", "2.weight"]


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


# ---- mask sources: OMP, random, SNIP, GraSP, SynFlow ----
def source_model(seed=0):
    torch.manual_seed(seed)
    return models.MODELS["resnet20"](10)


def test_snip_scores_equal_an_independent_computation():
    model = source_model()
    d = data.load_dataset("synthetic", "unused", "cpu", train_subset=32, seed=0)
    x, y = next(data.train_batches(d, 16, torch.Generator().manual_seed(1)))
    names = list(L.prunable_weights(model))
    before = copy.deepcopy(model.state_dict())
    scores = L.snip_scores(model, names, x, y)
    reference = copy.deepcopy(model).eval()                   # |w * dL/dw| with BN in eval mode, by hand
    F.cross_entropy(reference(x), y).backward()
    params = dict(reference.named_parameters())
    for n in names:
        assert torch.allclose(scores[n], (params[n] * params[n].grad).abs(), rtol=1e-5, atol=1e-9), n
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # model untouched
    training_mode = copy.deepcopy(model).train()              # the official variant scores otherwise
    F.cross_entropy(training_mode(x), y).backward()
    n = names[0]
    assert not torch.allclose(scores[n], (dict(training_mode.named_parameters())[n].grad * params[n]).abs())


def test_snip_over_several_batches_scores_the_mean_loss_of_all_samples(tmp_path):
    model = source_model()
    d = data.load_dataset("synthetic", "unused", "cpu", train_subset=64, seed=0)
    x, y = next(data.train_batches(d, 40, torch.Generator().manual_seed(1)))
    names = list(L.prunable_weights(model))[:3]
    whole, chunked = L.snip_scores(model, names, x, y), L.snip_scores(model, names, x, y, chunk=16)  # 16+16+8
    assert all(torch.allclose(whole[n], chunked[n], rtol=1e-4, atol=1e-6) for n in names)   # float sums
    cfg = L.resolve(L.Config(dataset="synthetic", batch_size=16, snip_samples=40, out_dir="unused"))
    exp = L.Experiment(cfg, model, model, d, L.Processes(), log=lambda *_: None)
    images, labels = L.score_samples(exp, 40)
    assert images.shape[0] == labels.shape[0] == 40 and torch.equal(images[:16], L.score_batch(exp, 0)[0])
    assert L.score_samples(exp, 1000)[0].shape[0] == 64                 # at most the training set


def test_a_source_scores_theta_0_on_a_copy_and_leaves_the_experiments_model_alone(tmp_path):
    """synflow_source reads theta_0 (init.pt) and scores it on a copy: its masks are synflow_masks of a
    network holding theta_0, and the experiment's model keeps the weights it had."""
    model, init = source_model(seed=1), source_model(seed=2).state_dict()
    torch.save(init, tmp_path / "init.pt")
    cfg = L.resolve(L.Config(dataset="synthetic", out_dir=str(tmp_path), synflow_rounds=3))
    d = data.load_dataset("synthetic", "unused", "cpu", train_subset=32, seed=0)
    exp = L.Experiment(cfg, model, model, d, L.Processes(), log=lambda *_: None)
    before = copy.deepcopy(model.state_dict())
    masks, state = L.synflow_source(exp, 2)
    reference = source_model()
    reference.load_state_dict(init)
    expected = L.synflow_masks(reference, list(masks), 0.8 ** 2, 3, (3, 32, 32))
    assert all(torch.equal(masks[n], expected[n]) for n in masks) and state is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_admm_projection_keeps_the_largest_weights_of_all_layers():
    w = {"a": torch.tensor([[3.0, -1.0], [0.5, -4.0]]), "b": torch.tensor([2.0, -0.1, 0.2])}
    z = L.admm_project(w, 3 / 7)                              # keep 3 of 7: |-4|, |3|, |2|
    assert z["a"].tolist() == [[3.0, 0.0], [0.0, -4.0]] and z["b"].tolist() == [2.0, 0.0, 0.0]


def test_admm_pulls_the_weights_toward_the_projection_and_hits_the_density():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 6, 3, bias=False))
    names, seen = ["1.weight"], []

    def w_step(iteration, penalty):              # no data loss: the W-step minimizes the penalty alone
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(20):
            opt.zero_grad()
            penalty().backward()
            opt.step()
        seen.append(float(penalty().detach()))
    masks = L.admm_prune(model, names, 0.25, w_step, iterations=4, rho=1.0)
    assert int(masks["1.weight"].sum()) == round(0.25 * 216)
    w = model[1].weight.detach()
    assert w[masks["1.weight"] == 0].abs().max() < 0.05 * w.abs().max()   # the pruned ones went to ~0
    assert seen[-1] < seen[0]


def test_grasp_scores_are_w_times_hessian_gradient_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 5, 3, bias=False), nn.Flatten(),
                          nn.Linear(5 * 3 * 3, 3)).double()    # float64: finite differences below
    x, y = torch.randn(6, 3, 7, 7, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    scores = L.grasp_scores(model, ["1.weight"], x, y, temperature=2.0)
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
        grad = sum(torch.autograd.grad(lf(xs, ys), shifted[1].weight)[0]
                   for xs, ys in ((x[:3], y[:3]), (x[3:], y[3:])))
        hg += sign * grad / (2 * eps)
    expected = model[1].weight.detach() * hg
    assert torch.allclose(scores["1.weight"], expected, rtol=1e-5, atol=1e-7 * expected.abs().max())


def test_grasp_over_many_samples_in_passes_scores_like_one_pass_per_half(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 5, 3, bias=False), nn.Flatten(),
                          nn.Linear(5 * 3 * 3, 3)).double()    # no BatchNorm: passes change nothing
    x, y = torch.randn(10, 3, 7, 7, dtype=torch.float64), torch.arange(10) % 3
    whole, passes = (L.grasp_scores(model, ["1.weight"], x, y, chunk=c)["1.weight"] for c in (None, 2))
    assert torch.allclose(whole, passes, rtol=1e-9, atol=1e-12 * whole.abs().max())   # 2+2+1 per half
    cfg = L.resolve(L.Config(dataset="synthetic", batch_size=16, grasp_samples=40, out_dir=str(tmp_path)))
    seen = []
    monkeypatch.setattr(L, "init_state", lambda exp: source_model().state_dict())
    monkeypatch.setattr(L, "grasp_scores", lambda m, names, images, labels, chunk=None: seen.append(
        (len(images), chunk)) or {n: torch.rand(m.get_parameter(n).shape) for n in names})
    d = data.load_dataset("synthetic", "unused", "cpu", train_subset=64, seed=0)
    L.init_scores_source(L.grasp_scores)(L.Experiment(cfg, source_model(), None, d, L.Processes(),
                                                      log=lambda *_: None), 1)
    assert seen == [(40, 16)]                                  # 40 samples, in passes of --batch-size


def test_synflow_prunes_on_the_published_exponential_schedule(monkeypatch):
    seen, prune = [], L.prune_to_density
    monkeypatch.setattr(L, "prune_to_density", lambda scores, target: seen.append(target) or
                        prune(scores, target))
    model = built("resnet20")
    masks = L.synflow_masks(model, list(L.prunable_weights(model)), 0.1, rounds=3)
    assert seen == pytest.approx([0.1 ** (1 / 3), 0.1 ** (2 / 3), 0.1])    # Tanaka et al.: target^(r/R)
    assert L.density(masks) == pytest.approx(0.1, abs=1e-5)


def test_admm_follows_the_published_updates_on_a_hand_traced_quadratic():
    # loss 1/2 ||W - A||^2, rho 1, density 1/2: the exact W-step is W = (A + Z - U) / 2. By hand:
    # Z0 = proj(W0) = [0, 0, 3, 4], U0 = 0; W1 = [2, 1.5, 2.5, 2.5], Z1 = [0, 0, 2.5, 2.5],
    # U1 = [2, 1.5, 0, 0]; W2 = (A + Z1 - U1) / 2 = [1, 0.75, 2.25, 1.75], whose top half is kept
    target = torch.tensor([4.0, 3.0, 2.0, 1.0])
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def w_step(iteration, penalty):
        with torch.no_grad():
            model.w.zero_()
        slope, = torch.autograd.grad(penalty(), [model.w])       # at W = 0: rho (U - Z)
        with torch.no_grad():
            model.w.copy_((target - slope) / 2)
    masks = L.admm_prune(model, ["w"], 0.5, w_step, iterations=2, rho=1.0)
    assert model.w.tolist() == [1.0, 0.75, 2.25, 1.75] and masks["w"].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("target", [0.5, 0.2])
def test_synflow_hits_the_density_is_deterministic_and_scores_like_published(target):
    model = source_model()
    names = list(L.prunable_weights(model))
    a = L.synflow_masks(model, names, target, rounds=3)
    b = L.synflow_masks(model, names, target, rounds=3)
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


# ---- refill / refill+ ----
def channel_counts(mask):
    """Kept weights per output channel of a 4-D or 2-D mask."""
    return mask.reshape(mask.shape[0], -1).sum(1)


def scattered_mask(shape, nnz, seed=0):
    """A 0/1 mask of `shape` with exactly `nnz` ones at seeded random positions."""
    flat = torch.zeros(math.prod(shape))
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:nnz]] = 1.0
    return flat.view(shape)


# One layer of O = 10 output channels of K = 1*3*3 = 9 weights (90 in all); n = nnz / K channels to the
# nearest whole channel, at least one; refill+ adds extra * (O - n), to the nearest; channel_multiple
# rounds up, at most O. Each row worked out by hand.
REFILL_COUNTS = [  # (nnz, extra, channel_multiple, channels kept)
    (27, 0.0, 1, 3),     # density 0.3: 27 / 9 = 3 exactly
    (22, 0.0, 1, 2),     # 2.44: down to 2
    (23, 0.0, 1, 3),     # 2.56: up to 3 (not floor, not ceil)
    (2, 0.0, 1, 1),      # 0.22 rounds to 0, but a layer keeps at least one channel
    (90, 0.0, 1, 10),    # dense stays dense
    (27, 0.3, 1, 5),     # 3 + 0.3 * 7 = 3 + 2.1: 5
    (27, 1.0, 1, 10),    # refill+ with extra 1: every channel
    (27, 0.0, 4, 4),     # 3 rounded up to a multiple of 4
    (81, 0.0, 4, 10),    # 9 rounded up to 12, at most O = 10
    (22, 0.5, 4, 8),     # 2 + 0.5 * 8 = 6, rounded up to 8
]


@pytest.mark.parametrize("nnz, expected", [(5, 2), (7, 4)])
def test_refill_rounds_a_half_channel_to_the_even_count(nnz, expected):
    """K = 2 weights per channel: 5 / 2 = 2.5 keeps 2 channels, 7 / 2 = 3.5 keeps 4 (Python's round)."""
    weight = torch.randn(10, 2, generator=torch.Generator().manual_seed(nnz))
    mask = torch.zeros(20)
    mask[torch.randperm(20, generator=torch.Generator().manual_seed(nnz))[:nnz]] = 1
    out = L.refill_mask(weight, mask.reshape(10, 2))
    assert int((out.sum(1) == 2).sum()) == expected and int((out.sum(1) == 1).sum()) == 0


@pytest.mark.parametrize("nnz, extra, multiple, expected", REFILL_COUNTS)
def test_refill_keeps_whole_channels_and_the_channel_count_worked_out_by_hand(nnz, extra, multiple, expected):
    weight = torch.randn(10, 1, 3, 3, generator=torch.Generator().manual_seed(nnz))
    mask = scattered_mask((10, 1, 3, 3), nnz, seed=nnz)
    out = L.refill({"w": weight}, {"w": mask}, extra=extra, channel_multiple=multiple)["w"]
    rows = channel_counts(out)
    assert torch.all((rows == 0) | (rows == 9)), rows               # every channel all ones or all zeros
    assert int((rows > 0).sum()) == expected


def test_refill_keeps_the_channels_of_largest_l1_norm():
    weights = random_weights(4)
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.6)
    for n, m in L.refill(weights, masks).items():
        l1 = (weights[n] * masks[n]).abs().reshape(m.shape[0], -1).sum(1)   # the paper's score, by hand
        kept = channel_counts(m) > 0
        assert kept.any() and (~kept).any(), n               # 40% density: some channels go, some stay
        assert (channel_counts(masks[n]) > 0).all(), n       # though every channel had kept weights
        assert l1[kept].min() > l1[~kept].max(), n


def test_refill_plus_keeps_a_superset_and_scores_differ():
    w = torch.ones(4, 1, 2, 2)
    w[0] = 10.0                                             # channel 0: few but large weights
    m = torch.ones(4, 1, 2, 2)
    m[0, 0, 0] = 0                                          # channel 0 keeps 2 of 4, others 4 of 4
    m[1:, 0, 1, 1] = 0                                      # others keep 3 of 4; nnz = 2+9 = 11
    l1 = channel_counts(L.refill_mask(w, m, score="l1")) > 0
    remain = channel_counts(L.refill_mask(w, m, score="remain")) > 0
    assert l1.tolist() == [True, True, True, False]         # n = round(11/4) = 3; l1 wants channel 0
    assert remain.tolist() == [False, True, True, True]     # remain ranks channel 0 last
    plus = channel_counts(L.refill_mask(w, m, extra=1.0, score="l1")) > 0
    assert torch.all(plus >= l1) and plus.all()


def test_refill_with_a_feature_score_keeps_the_top_channels_of_that_score():
    g = torch.Generator().manual_seed(0)
    w, m = torch.randn(6, 3, 3, 3, generator=g), scattered_mask((6, 3, 3, 3), 54)
    n = 2                                                  # 54 kept weights / 27 per channel
    for score in L.FEATURE_SCORES:
        order = torch.randperm(6, generator=g).float()
        feats = {s: torch.zeros(6) for s in L.FEATURE_SCORES}
        feats[score] = order                               # only this statistic may decide
        kept = channel_counts(L.refill_mask(w, m, score=score, feats=feats)) > 0
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


# ---- regroup ----
def planted_mask(out_rows=64, k=576, group=8, width=60, seed=0):
    """Row groups of `group` rows, each row using its group's `width` columns; rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    m, perm = torch.zeros(out_rows, k), torch.randperm(out_rows, generator=g)
    for i in range(out_rows // group):
        rows = perm[i * group:(i + 1) * group]
        m[rows[:, None], torch.randperm(k, generator=g)[:width]] = 1
    return m, [perm[i * group:(i + 1) * group] for i in range(out_rows // group)]


def realistic_mask(out_rows, k, dens=0.2, seed=0):
    """A magnitude mask of a weight with latent row clusters (filters that read similar inputs)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, max(2, out_rows // 8), (out_rows,), generator=g)
    pref = torch.rand(max(2, out_rows // 8), k, generator=g) ** 3
    w = (0.7 * pref[label] + 0.3 * torch.rand(out_rows, k, generator=g)) \
        * torch.randn(out_rows, k, generator=g).abs()
    return (w > w.flatten().kthvalue(int((1 - dens) * w.numel())).values).float()


def check_regroup(mask, new, blocks, row_multiple=8, min_block_cols=8, budget=True):
    """The rules a regrouped mask obeys, checked from its blocks and the input mask alone (no
    kernels.block_mask): rows disjoint; each block >= b1 rows (a multiple of b1) and >= b2 columns, dense
    in the new mask; nothing outside the blocks; with the budget rule, area within IMP's nonzeros (or one
    minimal block). Returns the coverage (kept input nonzeros / input nonzeros)."""
    m2, n2 = mask.reshape(mask.shape[0], -1), new.reshape(new.shape[0], -1)
    assert blocks, "regroup kept no block"
    seen, area = set(), 0
    for rows, cols in blocks:
        r = set(rows.tolist())
        assert not r & seen and len(r) == len(rows)                  # rows disjoint
        seen |= r
        assert len(rows) >= row_multiple and len(rows) % row_multiple == 0, len(rows)
        assert len(cols) >= min_block_cols and len(set(cols.tolist())) == len(cols)
        assert bool(n2[rows][:, cols].all())                         # the rectangle is dense
        area += len(rows) * len(cols)
    assert int(n2.sum()) == area                                     # nothing outside the blocks
    assert set(torch.nonzero(n2.sum(1)).flatten().tolist()) == seen
    if budget:
        assert area <= max(int(m2.sum()), row_multiple * min_block_cols)
    return float((m2 * n2).sum() / m2.sum())


def test_regroup_recovers_planted_groups():
    m, planted = planted_mask()
    new, blocks = L.regroup_mask(m)
    coverage = check_regroup(m, new, blocks)
    assert coverage >= 0.95 and len(blocks) == 8
    assert {frozenset(r.tolist()) for r, _ in blocks} == {frozenset(p.tolist()) for p in planted}


def test_regroup_beats_random_and_sorted_partitions():
    for out_rows, k in ((64, 576), (256, 2304)):
        m = realistic_mask(out_rows, k)
        new, blocks = L.regroup_mask(m)
        ours = check_regroup(m, new, blocks)
        size = len(blocks[0][0])
        perm = np.random.default_rng(0).permutation(out_rows)
        by_nnz = np.argsort(-m.sum(1).numpy(), kind="stable")
        for order in (perm, by_nnz):
            parts = [np.sort(order[i:i + size]) for i in range(0, out_rows, size)]
            theirs = lth_tools.partition_coverage(m, parts)
            assert ours > theirs + 0.01, (out_rows, ours, theirs)


def test_row_similarity_is_tanimoto_by_hand():
    sim = L.row_similarity(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [2, 0, 0], [1, 1, 0]]))
    assert sim[0, 1] == pytest.approx(1 / 2) and sim[0, 2] == 0 and sim[1, 2] == 0   # |a&b| / |a|b|
    assert sim[3, 4] == pytest.approx(2 / (4 + 2 - 2)) and sim[0, 4] == pytest.approx(1.0)  # counts
    assert np.allclose(sim, sim.T)


def test_partition_rows_seeds_with_the_largest_mass_and_adds_by_similarity_to_the_whole_group():
    # row 0 has the largest mass; its nearest is row 1; then row 3 (0.5 + 0.9 to the group) beats
    # row 2 (0.6 + 0), which only the seed alone would prefer
    sim = np.array([[1, .9, .6, .5], [.9, 1, 0, .9], [.6, 0, 1, 0], [.5, .9, 0, 1]])
    assert [g.tolist() for g in L.partition_rows(sim, 3)] == [[0, 1, 3], [2]]


def test_refinement_counts_the_pair_it_swaps_and_makes_only_gaining_swaps():
    # groups {0, 1}, {2, 3}: swapping 0 and 2 looks good (sim 0.9) but separates them again (gain
    # 1 - 0.3 + 1 - 0.3 - 2 * 0.9 = -0.4); swapping 0 and 3 puts 0 with 2 (gain +0.3): total 0.6 -> 0.9
    sim = np.array([[1, .3, .9, .1], [.3, 1, .1, 0], [.9, .1, 1, .3], [.1, 0, .3, 1]])
    parts = L.refine_partition(sim, [np.array([0, 1]), np.array([2, 3])])
    assert sorted(p.tolist() for p in parts) == [[0, 2], [1, 3]]   # swapping 1 and 2 makes the same groups


def test_densest_pairs_rank_by_the_fraction_of_the_groups_rows_and_skip_those_under_t2():
    units = np.zeros((6, 2))
    units[[0, 1], 0] = 1                                        # group A (rows 0-1): column 0 in both rows
    units[[2, 3, 4], 1] = 1                                     # group B (rows 2-5): column 1 in 3 of 4
    groups = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    chosen = L.densest_pairs(units, groups, unit_cost=1, area=4, min_col_nnz=1)
    assert chosen.tolist() == [[True, False], [False, False]]   # A's 1.0 first; B's (area 4) no longer fits
    chosen = L.densest_pairs(units, groups, unit_cost=1, area=100, min_col_nnz=3)
    assert chosen.tolist() == [[False, False], [False, True]]   # t2 = 3: A's column has 2 nonzeros


def test_a_layer_under_one_minimal_block_of_nonzeros_gets_its_best_group_as_that_block():
    # 32 nonzeros < b1 x b2 = 64: the first pass may spend one minimal block's area. Rows 0-7 use columns
    # 0-7 (two each, a ring); rows 8-15 all use columns 8-9 only, too narrow for b2 = 8 columns. The block
    # is rows 0-7 x columns 0-7 (16 of 32 nonzeros), not the most used columns and rows of both groups
    mask = torch.zeros(16, 16)
    for i in range(8):
        mask[i, i] = mask[i, (i + 1) % 8] = 1
    mask[8:, 8:10] = 1
    _, blocks = L.regroup_mask(mask, groups=2)
    assert [(r.tolist(), c.tolist()) for r, c in blocks] == [(list(range(8)), list(range(8)))]


def test_rows_a_pass_leaves_without_a_block_get_one_in_the_next_pass():
    # 240 nonzeros: X (rows 0-7) and Y (rows 8-15) fill 8 columns each, Z (rows 16-23) 14 of 16 columns.
    # Pass 1 groups X+Y (16 rows) and Z: Z's block costs 128, the 112 left buy X+Y only 7 of the 8
    # columns a block needs, so X+Y get none. Pass 2 splits them: X's 8 columns cost 64 of the 112,
    # Y's would cost 64 more: X gets a block, Y none
    mask = torch.zeros(24, 32)
    mask[0:8, 0:8], mask[8:16, 8:16], mask[16:24, 16:32] = 1, 1, 1
    for j in range(8):
        mask[16 + j, 16 + 2 * j:18 + 2 * j] = 0
    _, blocks = L.regroup_mask(mask, groups=2)
    assert [(r.tolist(), c.tolist()) for r, c in blocks] == [(list(range(8)), list(range(8))),
                                                             (list(range(16, 24)), list(range(16, 32)))]


def test_the_intended_width_rule_is_strict_at_its_boundary_as_the_official_loop():
    # one row, 5 nonzeros: at width 3 it has 2 outside, and 2 * 1.5 = 3 is not below 3: width 4
    row = np.array([[1, 1, 1, 1, 1, 0]])
    [(_, cols)] = L.intended_block_columns(row, [np.array([0])], 1, 0, 1, 1)
    assert cols.tolist() == [0, 1, 2, 3] and L.official_width(row) == 4


def test_each_regroup_pass_refines_its_greedy_partition(monkeypatch):
    calls, refine = [], L.refine_partition
    monkeypatch.setattr(L, "refine_partition", lambda sim, groups: calls.append(len(groups)) or
                        refine(sim, groups))
    mask = (torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    L.regroup_mask(mask, groups=4)
    assert calls and calls[0] == 4


def test_refinement_repairs_a_planted_bad_partition():
    m, planted = planted_mask(out_rows=32, k=288, group=8, width=40)
    sim = L.row_similarity(m.numpy())
    good = [p.sort().values.numpy() for p in planted]
    # one row swapped
    bad = [np.sort(np.concatenate([g[:7], good[(i + 1) % 4][7:]])) for i, g in enumerate(good)]
    score = lambda ps: sum(sim[np.ix_(p, p)].sum() for p in ps)
    refined = L.refine_partition(sim, bad)
    assert sorted(len(p) for p in refined) == [8, 8, 8, 8]
    assert score(refined) > score(bad) + 1.0                        # it improved, by a swap's worth
    assert {frozenset(p.tolist()) for p in refined} == {frozenset(p.tolist()) for p in good}


def test_regroup_keeps_b1_on_masks_with_empty_rows():
    m = realistic_mask(64, 288, dens=0.3, seed=3)
    m[[5, 17, 40]] = 0                                              # 61 non-empty rows: 7 x 8 + 5
    for groups, rows in ((8, 8), (4, 16), (8, 4)):
        new, blocks = L.regroup_mask(m, groups=groups, row_multiple=rows)
        check_regroup(m, new, blocks, row_multiple=rows)
        assert not {5, 17, 40} & {int(r) for b, _ in blocks for r in b}
    few = torch.zeros(16, 72)
    few[[1, 2, 3]] = 1                                              # 3 non-empty rows < b1: empty rows join
    for rule in ("budget", "paper"):
        new, blocks = L.regroup_mask(few, block_columns=rule)
        coverage = check_regroup(few, new, blocks, budget=rule == "budget")
        assert len(blocks) == 1 and {1, 2, 3} <= set(blocks[0][0].tolist())
    assert coverage == 1.0                                          # paper: every used column joins


def test_regroup_on_resnet20_masks_is_never_a_no_op_and_is_deterministic():
    torch.manual_seed(0)
    weights = L.prunable_weights(models.MODELS["resnet20"](10))
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.8)
    new, blocks = L.regroup(masks)
    new2, blocks2 = L.regroup(masks)
    for n in masks:
        assert not torch.equal(new[n], masks[n])
        check_regroup(masks[n], new[n], blocks[n])
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(blocks[n], blocks2[n]))
        assert 0.67 <= float(new[n].sum()) / float(masks[n].sum()) <= 1.0, n


def test_regroup_channel_unit_selects_whole_input_channels():
    m = realistic_mask(64, 64 * 9).reshape(64, 64, 3, 3)
    new, blocks = L.regroup({"w": m}, unit="channel")
    assert blocks["w"], "no block found"
    check_regroup(m, new["w"], blocks["w"], min_block_cols=9)
    for rows, cols in blocks["w"]:
        assert len(cols) % 9 == 0 and torch.equal(cols.view(-1, 9) % 9,
                                                  torch.arange(9).expand(len(cols) // 9, 9))


def test_regroup_vector_unit_selects_aligned_runs_of_channels_at_one_position():
    m = realistic_mask(64, 64 * 9).reshape(64, 64, 3, 3)
    new, blocks = L.regroup({"w": m}, unit="vector")
    assert blocks["w"], "no block found"
    check_regroup(m, new["w"], blocks["w"], min_block_cols=8)
    for rows, cols in blocks["w"]:  # per (ky, kx): whole runs c0..c0+7 with c0 a multiple of 8
        c, pos = cols // 9, cols % 9
        for j in pos.unique():
            runs = c[pos == j].sort().values.view(-1, 8)
            assert (runs[:, 0] % 8 == 0).all() and torch.equal(runs - runs[:, :1],
                                                               torch.arange(8).expand_as(runs))
    odd = realistic_mask(16, 12 * 9).reshape(16, 12, 3, 3)  # 12 channels: position units (documented rule)
    assert torch.equal(L.regroup_mask(odd, "vector")[0], L.regroup_mask(odd, "position")[0])


def test_regroup_mask_takes_the_conv_mask_with_either_unit_or_its_2d_view():
    m = realistic_mask(32, 32 * 9).reshape(32, 32, 3, 3)
    for unit in L.REGROUP_UNITS:
        new, blocks = L.regroup_mask(m, unit)
        assert new.shape == m.shape
        check_regroup(m, new, blocks, min_block_cols=9 if unit == "channel" else 8)
    flat, _ = L.regroup_mask(m.reshape(32, -1))
    assert torch.equal(flat, L.regroup_mask(m, "position")[0].reshape(32, -1))


def test_paper_columns_take_every_column_with_t2_nonzeros_in_the_group():
    m, planted = planted_mask(out_rows=32, k=200, group=8, width=30, seed=4)
    noise = (torch.rand(32, 200, generator=torch.Generator().manual_seed(5)) < 0.02).float()
    m = ((m + noise) > 0).float()
    for t2 in (1, 2, 5):
        new, blocks = L.regroup_mask(m, min_col_nnz=t2, block_columns="paper")
        check_regroup(m, new, blocks, budget=False)
        for rows, cols in blocks:                                    # Alg. 3's rule, by hand
            counts = m[rows].sum(0)
            assert set(cols.tolist()) == set(torch.nonzero(counts >= t2).flatten().tolist())
    assert L.density({"m": L.regroup_mask(m, block_columns="paper")[0]}) > L.density({"m": m})  # it refills


def test_budget_columns_keep_imps_density():
    m = realistic_mask(64, 576, dens=0.25)
    new, blocks = L.regroup_mask(m, block_columns="budget")
    check_regroup(m, new, blocks)
    assert 0.95 * m.sum() <= new.sum() <= m.sum()


def test_the_budget_goes_to_groups_that_can_be_blocks():
    units = np.zeros((16, 20))
    units[8:, :3] = 1                                               # group B: 3 full columns (fraction 1)
    units[:6, 3:13] = 1                                             # group A: 10 columns at 6 of 8 rows
    groups = [np.arange(8), np.arange(8, 16)]
    # ranked pairs: B's 3 columns (area 24), then A's at 8 each: 24 + 5 * 8 = 64 leaves A 5 and B 3
    # columns, neither 8; B (the narrower) is left out and A gets the area: columns 3..10
    (rows, cols), = L.choose_block_columns(units, groups, 1, 64.0, 1, 8)
    assert rows.tolist() == list(range(8)) and cols.tolist() == list(range(3, 11))


@pytest.mark.parametrize("rule", ["budget", "paper", "intended"])
def test_a_layer_with_nonzeros_always_keeps_a_block(rule):
    g = torch.Generator().manual_seed(0)
    for shape in ((64, 32, 1, 1), (16, 16, 3, 3), (32, 16, 3, 3), (256, 64, 1, 1), (8, 3, 3, 3)):
        for density in (0.005, 0.01, 0.02, 0.04, 0.08):
            mask = (torch.rand(shape, generator=g) < density).float()
            if mask.any():
                new, blocks = L.regroup_mask(mask, block_columns=rule)
                b1 = min(8, shape[0])
                check_regroup(mask, new, blocks, row_multiple=b1, min_block_cols=8, budget=rule == "budget")


def test_t2_is_at_most_the_rows_of_a_layer_narrower_than_b1():
    m = torch.zeros(24, 60)
    m[:, :10] = 1                                                   # 10 columns every row uses
    m[torch.arange(24), 20 + torch.arange(24)] = 1                  # and one column of its own per row
    new, blocks = L.regroup_mask(m, row_multiple=100, min_col_nnz=50, block_columns="paper")
    # b1 = 24 rows here, so t2 = min(50, 24): the block is every row on the 10 full columns
    assert [(r.tolist(), c.tolist()) for r, c in blocks] == [(list(range(24)), list(range(10)))]


def test_the_official_rule_refuses_units_other_than_positions(capsys):
    with pytest.raises(ValueError, match="official .* it needs regroup_unit position, not vector"):
        L.regroup_mask(torch.ones(16, 16, 3, 3), unit="vector", block_columns="official")
    flags = ["--method", "regroup", "--block-columns", "official", "--regroup-unit", "channel"]
    assert L.main(FAST + flags) == 2
    assert "--block-columns official runs the official code's rule" in capsys.readouterr().err


def test_intended_columns_match_a_hand_computation():
    m = torch.zeros(8, 50)
    m[:, 10:30] = 1                                                 # every row: the same 20 columns
    m[0, 40] = 1                                                    # one row has one more
    (rows, cols), = lth_tools.group_blocks(m, [np.arange(8)], 1, "intended")
    # prefix k (most used first: the 20 shared columns, then column 40): the first k with every row's
    # uncovered nonzeros < k / 1.5; row 0 has 21 - min(k, 21), the others 20 - min(k, 20)
    expect = next(k for k in range(1, 51) if 21 - min(k, 21) < k / 1.5)   # k = 13
    assert len(cols) == expect == 13 and set(cols.tolist()) <= set(range(10, 30))
    new, blocks = L.regroup_mask(realistic_mask(32, 288), block_columns="intended")
    check_regroup(realistic_mask(32, 288), new, blocks, budget=False)


def test_official_width_follows_a_hand_trace_of_the_official_loop():
    # ratio 1.5; at width i a row's count drops when it has a nonzero in column i (not the i-th sorted
    # column), and the first row with i <= 1.5 * count ends the visit.
    # Column-index bug: one row, nonzeros in columns 3, 4 (count 2). i = 1, 2: count 2, i <= 3: stop.
    # i = 3: column 3 is set, count 1, 3 > 1.5: width 3 (the corrected rule stops at 2: both columns).
    assert L.official_width([[0, 0, 0, 1, 1, 0]]) == 3
    assert len(L.intended_block_columns(np.array([[0, 0, 0, 1, 1, 0]]), [np.arange(1)],
                                        1, 0, 1, 1)[0][1]) == 2
    # Stop at the first failing row: counts (3, 6). i = 1: row 0 -> 2, 1 <= 3: stop, row 1 keeps 6.
    # i = 2: row 0 -> 1 passes, row 1 -> 5, 2 <= 7.5 stops. i = 3: 0; 4, 3 <= 6 stops. i = 4: 0; 3,
    # 4 <= 4.5 stops. i = 5: 0; 2, 5 > 3: width 5 (with row 1 counted at i = 1 it would be 4).
    assert L.official_width([[0, 1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]]) == 5
    # No width: counts (1, 2). i = 1: row 0 keeps 1, 1 <= 1.5: stop (row 1 misses its column 1).
    # i = 2: row 0 passes, row 1 keeps 2, 2 <= 3. i = 3: row 0 -> 0 passes, row 1: 3 <= 3. End: None.
    assert L.official_width([[0, 0, 0, 1], [1, 1, 0, 0]]) is None
    assert L.official_width([[1, 1]]) is None                      # column 0 is never counted


def test_official_regroup_keeps_its_row_rules_and_its_unstructured_fallback():
    m = torch.zeros(40, 6)
    m[:, 3:5] = 1                                                   # 40 rows as the one-row trace above
    new, blocks = L.regroup_mask(m, groups=1, block_columns="official")
    # one part of 40 rows > 32: a block of 32 rows and one of the other 8, width 3: columns 3, 4 and
    # column 0 (the next most used, by index among the unused ones)
    assert [(b[0].tolist(), b[1].tolist()) for b in blocks] == [(list(range(32)), [0, 3, 4]),
                                                                 (list(range(32, 40)), [0, 3, 4])]
    assert torch.equal(new, torch.zeros(40, 6).index_fill_(1, torch.tensor([0, 3, 4]), 1))
    assert torch.equal(L.regroup_mask(m[:16], groups=1, block_columns="official")[0], m[:16])  # <= 16 rows
    few = realistic_mask(64, 288)                                   # 8 parts of 8 rows: none > 16
    new, blocks = L.regroup_mask(few, block_columns="official")
    assert torch.equal(new, few)                                    # the layer stays unstructured
    assert len(blocks) == 64 and torch.equal(kernels.block_mask((64, 288), blocks), few)


@pytest.mark.parametrize("call, message", [
    (lambda: L.regroup_mask(torch.ones(8, 18), unit="channel"), "expected the conv's mask"),
    (lambda: L.regroup_mask(torch.ones(8, 18), unit=9), "unknown regroup unit 9"),
    (lambda: L.regroup_mask(torch.ones(8, 18), block_columns="wide"), "unknown block column rule 'wide'"),
    (lambda: L.regroup_mask(torch.ones(2, 8, 3, 3, 1)), "got shape"),
    (lambda: L.regroup_mask(torch.ones(8, 18), groups=0), "groups must be an integer >= 1"),
    (lambda: L.regroup_mask(torch.full((8, 18), 0.5)), "only 0 and 1"),
    (lambda: L.regroup_mask(torch.ones(8, 18), min_col_nnz=9), "(paper t2, 9) must be at most row_multiple"),
    (lambda: L.refill_mask(torch.ones(4, 2, 3, 3), torch.ones(4, 18)), "must have the same shape"),
    (lambda: L.refill_mask(torch.ones(4, 18), torch.ones(4, 18), extra=2), "must be in [0, 1]"),
    (lambda: L.postprocess("prune", {}, {}), "unknown method 'prune'"),
    (lambda: L.postprocess("refill", {}, {}, groups=4),
     "refill takes the knobs ['score', 'channel_multiple'], not ['groups']"),
    (lambda: L.magnitude_prune({}, {}, 1.5), "rate must be in [0, 1)"),
    (lambda: L.magnitude_prune({"a": torch.ones(3)}, {"a": torch.ones(4)}, 0.5), "same names and shapes"),
])
def test_public_functions_say_what_they_expected(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


# ---- post-processing ----
def whole_rows(*alive, k=3):
    """A (len(alive), k, 1, 1) mask whose output channel i is all ones if alive[i], else all zeros."""
    return torch.tensor(alive, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, k, 1, 1).clone()


def test_postprocess_is_the_papers_step_on_your_own_masks():
    # One 4x3x1x1 layer (K = 3) keeping 6 of its 12 weights: refill keeps n = 6 / 3 = 2 whole channels.
    # Channel scores: l1 of the kept weights 2, 0, 10, 3 (channel 2's weights are 10); kept weights
    # ("remain") 2, 0, 1, 3.
    weights = {"c": torch.tensor([1.0, 1.0, 10.0, 1.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1).clone()}
    kept = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    masks = {"c": kept.view(4, 3, 1, 1)}
    expected = [("refill", {}, whole_rows(0, 0, 1, 1)),                       # l1: channels 3 and 2
                ("refill", dict(score="remain"), whole_rows(1, 0, 0, 1)),     # remain: channels 3 and 0
                ("refill", dict(channel_multiple=4), whole_rows(1, 1, 1, 1)),  # 2 rounded up to 4
                ("refill+", dict(extra=0.5, score="remain"), whole_rows(1, 0, 1, 1))]  # 2 + 0.5 * 2 = 3
    for method, knobs, mask in expected:
        new, blocks = L.postprocess(method, weights, masks, **knobs)
        assert blocks is None and list(new) == ["c"] and torch.equal(new["c"], mask), (method, knobs)
    assert L.postprocess("imp", weights, masks) == (masks, None)

    # regroup: 16x16x1x1, the even rows use columns 0-7, the odd rows columns 8-15, with two holes (2, 1)
    # and (3, 9) and two strays (0, 12) and (1, 3): 128 nonzeros. Two groups of 8 rows: two dense 8x8
    # blocks (128 weights, IMP's count), the holes refilled and the strays pruned.
    even, odd = torch.arange(0, 16, 2), torch.arange(1, 16, 2)
    planted = torch.zeros(16, 16)
    planted[even[:, None], torch.arange(8)] = 1
    planted[odd[:, None], torch.arange(8, 16)] = 1
    m = planted.clone()
    m[2, 1], m[3, 9], m[0, 12], m[1, 3] = 0, 0, 1, 1
    masks = {"r": m.view(16, 16, 1, 1)}
    weights = {"r": torch.ones(16, 16, 1, 1)}
    new, blocks = L.postprocess("regroup", weights, masks, groups=2)
    assert torch.equal(new["r"], planted.view(16, 16, 1, 1))
    assert [(r.tolist(), c.tolist()) for r, c in blocks["r"]] == [(even.tolist(), list(range(8))),
                                                                  (odd.tolist(), list(range(8, 16)))]
    # groups=1: one group of all 16 rows; its columns by the share of the rows that use them: 3 and 12
    # (9 of 16, a stray each), then the 8-of-16 columns by index (0, 2, 4, ...) until the 8 columns of
    # 16 rows reach the 128 weights
    new, blocks = L.postprocess("regroup", weights, masks, groups=1)
    assert [(r.tolist(), c.tolist()) for r, c in blocks["r"]] == [(list(range(16)),
                                                                  [0, 2, 3, 4, 5, 6, 7, 12])]
    assert torch.equal(new["r"].view(16, 16), torch.zeros(16, 16).index_fill_(1, blocks["r"][0][1], 1))


def test_knob_defaults_of_the_functions_equal_the_clis():
    fields = {f.metadata["knob"]: f for f in dataclasses.fields(L.Config) if f.metadata["knob"]}
    defaults = L.Config()
    for method in L.POSTPROCESS:
        for knob, default in L.method_knobs(method).items():
            assert getattr(defaults, fields[knob].name) == default, (method, knob)
    assert set(L.method_knobs("regroup")) == set(inspect.signature(L.regroup_mask).parameters) - {"mask"}
    assert set(L.method_knobs("refill+")) == {"extra", "score", "channel_multiple"}
    assert set(L.method_knobs("refill")) == {"score", "channel_multiple"}


# ---- training: masks stay applied, the schedule, one ticket retrained ----
def tiny_classifier(seed=0):
    """A small CNN for the 10 synthetic classes: stem, two prunable convs with BN, classifier."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def tiny_setting(batch_size=16, train_subset=64, **settings):
    """(data, cfg): synthetic data and settings for training a tiny model in one process (no files)."""
    cfg = L.resolve(L.Config(dataset="synthetic", batch_size=batch_size, train_subset=train_subset, epochs=2,
                             rewind_epoch=0, lr=0.1, out_dir="unused", **settings))
    return data.load_dataset("synthetic", "unused", "cpu", train_subset=train_subset, seed=0), cfg


def test_retrain_is_sgd_with_momentum_and_weight_decay_on_each_batchs_mean_loss():
    dataset, cfg = tiny_setting(batch_size=24, train_subset=64)   # batches of 24, 24 and 16
    assert (cfg.lr_drops, cfg.momentum, cfg.weight_decay) == ([1, 2], 0.9, 1e-4)
    model, ref = tiny_classifier(), tiny_classifier()
    L.retrain(model, dataset, cfg, {}, copy.deepcopy(ref.state_dict()), 0, level=3)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)   # plain PyTorch
    for epoch, lr in enumerate([0.1, 0.01]):                   # x0.1 after epoch 1 (epoch 2's drop: never)
        sgd.param_groups[0]["lr"] = lr
        ref.train()
        for x, y in data.train_batches(dataset, 24, torch.Generator().manual_seed(L.mix_seed(0, 3, epoch))):
            sgd.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            sgd.step()
    for k, v in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[k].float(), v.float(), atol=1e-5), k


def test_evaluate_reads_the_split_it_is_asked_for():
    dataset = data.load_dataset("synthetic", "unused", "cpu", train_subset=64, seed=0, val_split=40)
    cfg = tiny_setting()[1]

    class Always(nn.Module):                                   # predicts class c for every image
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return F.one_hot(torch.full((len(x),), self.c), 10).float()
    c = next(c for c in range(10) if (dataset.split_labels("val") == c).float().mean()
             != (dataset.split_labels("test") == c).float().mean())
    for split in ("val", "test"):
        assert L.evaluate(Always(c), dataset, cfg, split) == (dataset.split_labels(split) == c).float().mean()


def test_structural_training_masks_zero_the_bn_of_each_pruned_conv_row_and_imp_keeps_bn_free():
    model = built("resnet20")
    masks = L.ones_masks(L.prunable_weights(model))
    masks["layer1.0.conv1.weight"][3] = 0                      # output channel 3 of that conv pruned
    refill, imp = L.training_masks(model, masks, "refill"), L.training_masks(model, masks, "imp")
    assert imp.keys() == masks.keys()
    for key in ("layer1.0.bn1.weight", "layer1.0.bn1.bias"):
        assert refill[key].tolist() == [0.0 if c == 3 else 1.0 for c in range(16)]


def test_help_states_table_1_as_printed():
    """The help's Table 1 text against the paper's Table 1, typed here: the values by dataset, then the
    (arch, dataset) cells that differ from their dataset's row."""
    assert L.table1_values("lr") == "0.1 on every dataset"
    assert L.table1_values("epochs") == "160 on cifar10, cifar100; 95 on tinyimagenet, imagenet"
    assert L.table1_values("weight_decay") == (
        "0.0001 on cifar10, imagenet; 0.0002 on cifar100; 0.0005 on tinyimagenet; vgg16 on cifar10: 0.0002; "
        "vgg16 on cifar100: 0.0005")
    assert "mobilenet_v1 on cifar100: 64" in L.table1_values("batch_size")


def test_plus_schedule_is_app_a2s_and_explicit_flags_override():
    cfg = L.resolve(L.Config(arch="vgg16", dataset="cifar100", schedule="plus"))
    assert (cfg.epochs, cfg.lr_drops, cfg.rewind_epoch, cfg.weight_decay) == (240, [150, 180, 210], 8, 5e-4)
    assert L.resolve(L.Config(schedule="plus", lr_drops=[100])).lr_drops == [100]
    assert L.resolve(L.Config()).epochs == 160
    short = L.resolve(L.Config(epochs=1))                          # 80, 120 of 160 -> 0.5, 0.75: kept at 1
    assert short.lr_drops == [1, 1] and L.lr_at(0, short) == 0.1
    assert L.resolve(L.Config(epochs=4)).lr_drops == [2, 3]


def test_lr_restart_starts_rewound_levels_at_epoch_0_and_allows_a_full_rewind():
    trunk, reinit = L.Run("trunk", "x", "imp", "rewind", False), L.Run("b", "x/b", "refill", "reinit", False)
    resume, restart = L.resolve(L.Config()), L.resolve(L.Config(lr_schedule="restart", rewind_epoch=160))
    assert [L.first_epoch(resume, trunk, 0), L.first_epoch(resume, trunk, 3),
            L.first_epoch(resume, reinit, 3)] == [0, 8, 0]
    assert L.first_epoch(restart, trunk, 3) == 0 and restart.rewind_epoch == restart.epochs
    with pytest.raises(L.UsageError, match="--lr-schedule restart also allows"):
        L.resolve(L.Config(rewind_epoch=160))


def test_lr_schedule_steps_down_at_the_drops():
    cfg = L.Config(lr=0.1, lr_drops=[3, 5])
    assert [round(L.lr_at(e, cfg), 6) for e in range(7)] == [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


@pytest.mark.parametrize("amp, channels_last", [("off", False), ("bf16", True)])
def test_retrain_keeps_pruned_weights_zero_through_sgd_momentum_and_weight_decay(amp, channels_last):
    model = tiny_classifier()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    d, cfg = tiny_setting(amp=amp, channels_last=channels_last, weight_decay=1e-3)
    weights = L.prunable_weights(model)
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.7)
    state = copy.deepcopy(model.state_dict())
    epochs = []
    metrics = L.retrain(model, d, cfg, masks, state, 0, 1,
                        after_epoch=lambda m, o, s: epochs.append(m["epoch"]))
    assert epochs == [1, 2] and math.isfinite(metrics["loss"]) and 0 <= metrics["test"] <= 1
    for n, w in weights.items():
        assert torch.all(w[masks[n] == 0] == 0)                      # the masks were applied
        assert not torch.equal(w[masks[n] == 1], state[n][masks[n] == 1])   # the rest did train


def test_retrain_from_a_later_epoch_trains_only_the_rest_of_the_schedule():
    model = tiny_classifier()
    d, cfg = tiny_setting()
    fields = ("lr", "momentum", "weight_decay", "epochs", "lr_drops", "batch_size", "amp", "channels_last",
              "seed", "val_split")                       # what a copied retrain reads: no Config needed
    cfg = types.SimpleNamespace(**{k: getattr(cfg, k) for k in fields})
    masks = L.ones_masks(L.prunable_weights(model))
    seen = []
    L.retrain(model, d, cfg, masks, copy.deepcopy(model.state_dict()), 1, 1,
              after_epoch=lambda m, o, s: seen.append((m["epoch"], o.param_groups[0]["lr"])))
    assert seen == [(2, pytest.approx(L.lr_at(1, cfg)))]


def test_dead_bn_stays_zero_through_training_and_the_trained_ticket_slims_exactly():
    torch.manual_seed(0)
    model = models.MODELS["resnet20"](10)
    masks = random_channel_masks(model, seed=6)
    train_masks = {**masks, **models.bn_masks(model, masks)}  # conv weights and the BN of dead rows
    bn_before = model.layer1[0].bn1.weight.detach().clone()
    L.retrain(model, *tiny_setting(weight_decay=1e-3), train_masks, copy.deepcopy(model.state_dict()), 1, 1)
    params = dict(model.named_parameters())
    for name, mask in models.bn_masks(model, masks).items():
        assert torch.all(params[name][mask == 0] == 0)
    alive = masks["layer1.0.conv1.weight"][:, 0, 0, 0] == 1
    assert not torch.equal(model.layer1[0].bn1.weight[alive], bn_before[alive])  # the rest did train
    ticket = model.double().eval()
    slim = models.slim_model(ticket, masks)
    assert slim_err(ticket, slim) < SLIM_TOL and slim.layer1[0].conv1.out_channels == int(alive.sum())


# ---- the experiment end to end: trunk and branches ----
FAST = ["--dataset", "synthetic", "--arch", "resnet20", "--train-subset", "128", "--epochs", "2",
        "--batch-size", "64", "--device", "cpu"]


def run_cli(tmp_path, *extra, name="run"):
    """Run the CLI into tmp_path/name; returns (experiment dir, combined result rows)."""
    out = str(tmp_path / name)
    assert L.main(FAST + ["--out-dir", out, *extra]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def parsed_config(argv):
    """The resolved Config of a command line, as main builds it."""
    return L.config_from_args(L.build_parser().parse_args(argv), L.given_flags(argv))


def cli_config(*flags):
    return parsed_config(FAST + list(flags))


@pytest.mark.parametrize("flags, says", [
    (["--method", "refill", "--refill-extra", "0.3"], "--refill-extra is read by --method refill+, not by "
     "this command (--method refill)"),
    (["--channel-multiple", "8"], "--channel-multiple is read by --method refill and refill+, not by this "
     "command (--method imp)"),
    (["--method", "regroup", "--refill-score", "remain"], "--refill-score is read by --method refill and "
     "refill+, not by this command (--method regroup)"),
    (["--method", "refill", "--groups", "2"], "--groups is read by --method regroup, not by this command "
     "(--method refill)"),
    (["--bench", "train", "--block-columns", "official"], "--block-columns is read by --method regroup, not "
     "by this command (--bench train)"),
    (["--bench", "regroup", "--channel-multiple", "8"], "--channel-multiple is read by --method refill and "
     "refill+, not by this command (--bench regroup)"),
    (["--snip-samples", "7"], "--snip-samples is read by --mask-source snip when training, not by this "
     "command (--mask-source imp)"),
    (["--report", "r", "--admm-rho", "3"], "--admm-rho is read by --mask-source admm when training, not by "
     "this command (a tool)")])
def test_a_flag_the_command_does_not_read_is_an_error_before_the_work(flags, says, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the experiment started"))
    assert L.main(FAST + flags) == 2
    assert capsys.readouterr().err == f"error: {says}: drop it\n"


def test_flags_the_command_reads_are_accepted():
    for flags in (["--method", "refill+", "--refill-extra", "0.3", "--channel-multiple", "8"],
                  ["--method", "regroup", "--groups", "4", "--block-columns", "official"],
                  ["--bench", "regroup", "--groups", "4"], ["--mask-source", "snip", "--snip-samples", "7"],
                  ["--export", "s.pt", "--method", "refill", "--channel-multiple", "8"]):
        assert L.unread_given(cli_config(*flags), L.given_flags(FAST + flags)) == []


def ticket(out, level, branch=""):
    return L.load_ticket(os.path.join(out, branch, f"level_{level:02d}", "ticket.pt"))


def rows_of(rows, branch):
    return [r for r in rows if r["branch"] == branch]


def pruned_by_hand(masks, state, rate):
    """IMP's step, worked out by a threshold: of the weights `masks` keeps, drop the round(rate * kept)
    smallest |w| of all layers together. Returns ({name: bool mask}, the masks' |w|)."""
    w = {n: state[n].abs() for n in masks}
    kept = torch.cat([w[n][masks[n].bool()] for n in masks]).sort(descending=True).values
    n_keep = len(kept) - round(rate * len(kept))
    pruned = {n: masks[n].bool() & (w[n] >= kept[n_keep - 1]) for n in masks}
    assert sum(int(p.sum()) for p in pruned.values()) == n_keep     # no tie at the threshold
    return pruned, w


def trunk_mask(out, level):
    """m_L worked out from trunk level L-1's ticket by pruned_by_hand, independently of the pipeline."""
    prev = ticket(out, level - 1)
    return {n: m.float() for n, m in pruned_by_hand(prev["masks"], prev["state_dict"], 0.2)[0].items()}


@pytest.mark.slow
def test_imp_trunk_levels_densities_and_files(tmp_path, monkeypatch):
    read, load = [], L.load_ticket

    def spy(path, model=None, mmap=False):        # tickets read into a model (not for the results table)
        if model is not None:
            read.append(path)
        return load(path, model, mmap)
    monkeypatch.setattr(L, "load_ticket", spy)
    out, rows = run_cli(tmp_path, "--levels", "2")
    assert read == []            # IMP prunes the weights it just trained, in memory: no ticket read back
    assert [r["level"] for r in rows] == [0, 1, 2] and {r["branch"] for r in rows} == {"trunk"}
    assert [round(r["density"], 3) for r in rows] == [1.0, 0.8, 0.64]
    for level in range(3):
        t = ticket(out, level)
        assert set(t["metrics"]) >= {"level", "density", "test_acc", "train_loss", "seconds", "method"}
        assert not os.path.exists(os.path.join(out, f"level_{level:02d}", "checkpoint.pt"))
    assert open(os.path.join(out, "results.csv")).readline().startswith("branch,source,method,init,level")
    assert sorted(os.listdir(out)) == ["config.json", "init.pt", "level_00", "level_01", "level_02",
                                       "results.csv", "results.json", "results.lock", "run.lock",
                                       "setup.lock"]


BRANCH_CASES = [("refill", []), ("refill+", []), ("regroup", []), ("refill", ["--refill-score", "saliency"])]


@pytest.fixture(scope="module")
def branched_run(tmp_path_factory):
    """One experiment: a trunk of 2 levels and the branches of BRANCH_CASES, trained once (the first
    command trains the trunk, the others reuse it). Returns (directory, result rows)."""
    tmp = tmp_path_factory.mktemp("branches")
    for method, flags in BRANCH_CASES:
        out, rows = run_cli(tmp, "--levels", "2", "--method", method, *flags)
    return out, rows


@pytest.mark.slow
@pytest.mark.parametrize("method, flags", BRANCH_CASES)
def test_branches_post_process_the_unstructured_trunk(branched_run, method, flags):
    out, rows = branched_run
    name = L.branch_name(cli_config("--method", method, *flags))
    assert [r["level"] for r in rows_of(rows, "trunk")] == [0, 1, 2]
    assert [r["level"] for r in rows_of(rows, name)] == [1, 2]
    for level in (1, 2):
        trunk, branch, m_level = ticket(out, level), ticket(out, level, name), trunk_mask(out, level)
        # trunk stays unstructured IMP
        assert all(torch.equal(trunk["masks"][n], m_level[n]) for n in m_level)
        assert round(trunk["metrics"]["density"], 3) == round(0.8 ** level, 3)
        scored_by = ticket(out, level - 1)["state_dict"]       # the weights m_L was pruned from
        for n, m in branch["masks"].items():
            if method == "regroup":
                check_regroup(m_level[n], m, branch["blocks"][n])
            else:
                kept, k = channel_counts(m), m[0].numel()
                assert torch.all((kept == 0) | (kept == k))
                alive, nnz = kept > 0, float(m_level[n].sum())
                if method == "refill":                   # as many weights as m_L, to within half a channel
                    assert abs(int(alive.sum()) * k - nnz) <= k / 2, (n, int(alive.sum()), nnz)
                else:                                    # refill+ keeps more, never fewer
                    assert int(alive.sum()) * k >= nnz - k / 2 and (~alive).any(), n
                if not flags:                            # the l1 score: the kept channels rank first
                    l1 = (scored_by[n] * m_level[n]).abs().reshape(len(m), -1).sum(1)
                    assert l1[alive].min() >= l1[~alive].max(), n
            coverage = float((m_level[n] * m).sum() / m_level[n].sum())  # measured against m_L
            assert branch["layer_stats"][n]["coverage"] == pytest.approx(coverage)
            assert torch.all(branch["state_dict"][n][m == 0] == 0)
        assert os.path.exists(os.path.join(out, name, "level_01", "layers.csv"))
    assert json.load(open(os.path.join(out, name, "results.json")))[0]["branch"] == name


@pytest.mark.slow
def test_a_second_method_reuses_the_trunk(tmp_path):
    out, _ = run_cli(tmp_path, "--levels", "1", "--method", "regroup")
    trunk_bytes = [open(os.path.join(out, f"level_0{i}", "ticket.pt"), "rb").read() for i in (0, 1)]
    lines = []
    assert L.main(FAST + ["--out-dir", out, "--levels", "1", "--method", "refill"]) == 0
    L.run_experiment(cli_config("--out-dir", out, "--levels", "1", "--method", "refill+"), log=lines.append)
    assert not any(line.startswith("trunk level") and " epoch " in line for line in lines)
    assert sum("finished earlier, reused" in line for line in lines) == 2
    assert trunk_bytes == [open(os.path.join(out, f"level_0{i}", "ticket.pt"), "rb").read() for i in (0, 1)]
    rows = json.load(open(os.path.join(out, "results.json")))
    assert {(r["branch"], r["method"]) for r in rows} == {
        ("trunk", "imp"), ("regroup", "regroup"), ("refill", "refill"), ("refill+", "refill+")}


@pytest.mark.slow
def test_group_aware_prunes_its_own_previous_level(tmp_path):
    out, rows = run_cli(tmp_path, "--levels", "2", "--method", "refill", "--group-aware")
    assert [(r["branch"], r["level"]) for r in rows] == [("trunk", 0), ("refill_group-aware", 1),
                                                         ("refill_group-aware", 2)]
    for level in (1, 2):                  # Alg. 4: prune the previous refilled ticket by 20%, refill that
        prev = ticket(out, level - 1, "" if level == 1 else "refill_group-aware")
        pruned, w = pruned_by_hand(prev["masks"], prev["state_dict"], 0.2)
        got = ticket(out, level, "refill_group-aware")["masks"]
        assert set(got) == set(pruned)
        for n, m in got.items():
            kept, k = channel_counts(m), m[0].numel()
            assert torch.all((kept == 0) | (kept == k)), n              # whole channels
            alive, was_alive = kept > 0, channel_counts(prev["masks"][n]) > 0
            assert torch.all(was_alive[alive]), n                        # a pruned channel stays pruned
            nnz = int(pruned[n].sum())                                   # the pruned mask's weights, to
            assert abs(int(alive.sum()) * k - nnz) <= k / 2, (n, int(alive.sum()), nnz)   # half a channel
            l1 = (w[n] * pruned[n]).reshape(len(m), -1).sum(1)           # the l1 score of the pruned mask
            assert l1[alive].min() > l1[~alive].max(), n


@pytest.mark.slow
@pytest.mark.parametrize("source", ["omp", "random", "snip", "grasp", "synflow", "admm"])
def test_every_mask_source_hits_its_density_and_its_branch_gets_the_trunks_mask(tmp_path, source):
    own = {"synflow": ["--synflow-rounds", "3"], "admm": ["--admm-iterations", "1"]}.get(source, [])
    flags = ["--levels", "1", "--epochs", "1", "--mask-source", source, "--method", "regroup", *own]
    out, rows = run_cli(tmp_path, *flags)
    assert rows_of(rows, "trunk")[1]["density"] == pytest.approx(0.8, abs=1e-4)
    assert rows_of(rows, "regroup")[0]["coverage"] > 0
    trunk, branch = ticket(out, 1)["masks"], ticket(out, 1, "regroup")
    for n, m in branch["masks"].items():     # the branch draws m_L again: it must be the trunk's m_L
        check_regroup(trunk[n], m, branch["blocks"][n])
        coverage = float((trunk[n] * m).sum() / trunk[n].sum())
        assert branch["layer_stats"][n]["coverage"] == pytest.approx(coverage), n
        assert branch["layer_stats"][n]["density_before"] == pytest.approx(float(trunk[n].mean())), n


def run_record(out):
    """What a finished run wrote, less its timings and its own path: {path in out: contents} of every .pt
    file (tickets without metrics["seconds"] and config["out_dir"]) and of every results.json (rows
    without "seconds")."""
    record = {}
    for root, _, files in os.walk(out):
        for f in files:
            path = os.path.join(root, f)
            if f == "ticket.pt":
                t = L.load_ticket(path)
                t["metrics"] = {k: v for k, v in t["metrics"].items() if k != "seconds"}
                t["config"] = {k: v for k, v in t["config"].items() if k != "out_dir"}
                record[os.path.relpath(path, out)] = t
            elif f.endswith(".pt"):
                record[os.path.relpath(path, out)] = L.load_file(path, f)
            elif f == "results.json":
                with open(path) as fh:
                    record[os.path.relpath(path, out)] = [{k: v for k, v in r.items() if k != "seconds"}
                                                          for r in json.load(fh)]
    return record


def differences(a, b, where=""):
    """Where two records differ: tensors compared byte for byte (dtype and shape too), the rest by ==."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)}, {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        raw = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))
        return [] if same else [where]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.mark.slow
def test_a_run_repeated_from_scratch_is_the_same_bit_for_bit_and_another_seed_is_not(tmp_path, recwarn):
    # the whole pipeline twice in fresh directories: theta_0, training (data order, augmentation), IMP's
    # prune of the trained weights, refill, retraining (again: --deterministic, which changes nothing on
    # the CPU and finds no op without a deterministic version); then once more with another seed
    flags = ["--levels", "1", "--epochs", "1", "--train-subset", "64", "--method", "refill"]
    first, again, other = (run_record(run_cli(tmp_path, *flags, *more, name=name)[0])
                           for name, more in (("first", []), ("again", ["--deterministic"]),
                                              ("other", ["--seed", "1"])))
    assert [str(w.message) for w in recwarn if "deterministic" in str(w.message)] == []
    tickets = ["level_00/ticket.pt", "level_01/ticket.pt", "refill/level_01/ticket.pt"]
    for t in tickets:                        # a ticket records the settings of its command
        assert again[t]["config"].pop("deterministic") and not first[t]["config"].pop("deterministic")
    assert set(first) >= {"init.pt", "results.json", "refill/results.json", *tickets}, sorted(first)
    assert differences(first, again) == []
    for t in tickets:                        # the comparison sees a change: another seed changes them all
        assert differences(first[t]["state_dict"], other[t]["state_dict"]), t
        assert t == tickets[0] or differences(first[t]["masks"], other[t]["masks"]), t
    assert differences(first["init.pt"], other["init.pt"])


@pytest.mark.slow
def test_reinit_starts_from_a_fresh_initialization(tmp_path):
    out, rows = run_cli(tmp_path, "--levels", "1", "--init", "reinit")
    assert [r["branch"] for r in rows] == ["trunk", "trunk", "imp_reinit"]
    exp, trunk, branch = L.open_experiment(cli_config("--out-dir", out, "--init", "reinit"),
                                           log=lambda *_: None)
    fresh, rewound = L.level_start(exp, branch, 1), L.level_start(exp, trunk, 1)
    assert fresh.first_epoch == 0 and all(torch.equal(fresh.masks[n], ticket(out, 1)["masks"][n])
                                          for n in fresh.masks)
    assert not torch.equal(fresh.state["layer1.0.conv1.weight"], rewound.state["layer1.0.conv1.weight"])


@pytest.mark.slow
def test_restart_retrains_every_epoch_after_a_rewind_to_the_last_one(tmp_path):
    lines = []
    out = str(tmp_path / "run")
    L.run_experiment(cli_config("--out-dir", out, "--levels", "1", "--lr-schedule", "restart",
                                "--rewind-epoch", "2"),
                     log=lines.append)
    assert [l.split(" epoch ")[1][:5].strip() for l in lines
            if l.startswith("trunk level  1 epoch")] == ["1/2", "2/2"]
    assert json.load(open(os.path.join(out, "config.json")))["lr_schedule"] == "restart"
    dense = L.load_file(os.path.join(out, "rewind.pt"), "rewind state")
    assert all(torch.equal(dense[k], ticket(out, 0)["state_dict"][k]) for k in dense)  # 100%: the trained net


def planted_nan_at_step(n, monkeypatch):
    """train_step whose n-th call returns a NaN loss (the weights are untouched: only the report lies)."""
    real, calls = L.train_step, []

    def step(*args, **kwargs):
        loss, correct = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == n else loss), correct
    monkeypatch.setattr(L, "train_step", step)


def test_a_checkpoint_of_another_kind_or_network_is_a_damaged_file(tmp_path):
    model = built("resnet20")
    good = dict(masks=L.ones_masks(L.prunable_weights(model)), blocks=None, stats=None,
                model=model.state_dict(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
                scaler={}, metrics=dict(epoch=3), seconds=1.0)
    path = str(tmp_path / "checkpoint.pt")
    torch.save(good, path)
    assert L.load_checkpoint(path, model)["metrics"]["epoch"] == 3
    wider = built("resnet20", num_classes=100).state_dict()              # the same names, other shapes
    without = lambda key: {k: v for k, v in good.items() if k != key}
    for other in ({"x": 1}, [good], without("optimizer"), without("metrics"), {**good, "model": wider}):
        torch.save(other, path)
        with pytest.raises(L.DamagedFile) as e:
            L.load_checkpoint(path, model)
        assert e.value.first_line == (f"the checkpoint {path} is not an epoch checkpoint of this "
                                      "experiment's network")


@pytest.mark.slow
def test_a_diverging_loss_stops_the_run_keeps_the_last_checkpoint_and_writes_nothing_for_the_level(
        tmp_path, capsys, monkeypatch):
    planted_nan_at_step(3, monkeypatch)                          # 2 steps per epoch: epoch 2 diverges
    out = tmp_path / "run"
    assert L.main(FAST + ["--out-dir", str(out), "--levels", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: trunk level 0 diverged in epoch 2/2 at learning rate 0.01: the training loss is nan" in err
    assert "lower --lr" in err and "another --out-dir" in err and "Traceback" not in err
    assert (out / "level_00" / "checkpoint.pt").exists() and not (out / "level_00" / "ticket.pt").exists()
    assert not (out / "results.json").exists()
    assert L.load_checkpoint(str(out / "level_00" / "checkpoint.pt"),
                             models.MODELS["resnet20"](10))["metrics"]["epoch"] == 1
    monkeypatch.undo()
    assert L.main(FAST + ["--out-dir", str(tmp_path / "huge"), "--levels", "0", "--lr", "1e30"]) == 2
    assert "diverged in epoch 1/2 at learning rate 1e+30" in capsys.readouterr().err


@pytest.mark.slow
def test_under_torchrun_a_diverging_loss_stops_every_rank_and_rank_0_reports(tmp_path):
    code, log = torchrun(str(tmp_path / "run"), "--levels", "0", "--lr", "1e30")
    assert code != 0 and log.count("diverged in epoch 1/2 at learning rate 1e+30") == 1, log
    assert not os.path.exists(tmp_path / "run" / "level_00" / "ticket.pt")


def lth_ref_process(out, *extra):
    """lth_ref.py with the fast settings in a subprocess (its own process group), stdout+stderr piped."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lth_ref.py"), *FAST,
           "--out-dir", out, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def epoch_lines(log, run, level):
    return [l for l in log.splitlines() if l.startswith(f"{run} level {level:2d} epoch")]


@pytest.mark.slow
@pytest.mark.parametrize("methods", [("imp", "imp"), ("regroup", "refill")])
def test_two_processes_on_one_experiment_train_each_level_once(tmp_path, methods):
    out = str(tmp_path / "run")
    procs = [lth_ref_process(out, "--levels", "1", "--method", m) for m in methods]
    logs = [p.communicate(timeout=TORCHRUN_TIMEOUT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and not any("Traceback" in log for log in logs), logs
    for level in (0, 1):                                        # exactly one process trained each trunk level
        assert sum(len(epoch_lines(log, "trunk", level)) for log in logs) == 2, logs
    rows = json.load(open(os.path.join(out, "results.json")))
    assert {(r["branch"], r["level"]) for r in rows} >= {("trunk", 0), ("trunk", 1)} | \
        {(m, 1) for m in methods if m != "imp"}
    assert any("being trained by pid" in log or "finished by another process" in log for log in logs)


@pytest.mark.slow
def test_two_commands_with_other_seeds_started_together_on_a_fresh_directory_train_one_experiment(tmp_path):
    out = str(tmp_path / "run")
    procs = [lth_ref_process(out, "--levels", "1", "--seed", seed) for seed in ("0", "1")]
    logs = [p.communicate(timeout=TORCHRUN_TIMEOUT_S)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2] and not any("Traceback" in log for log in logs), logs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "other settings (--seed" in logs[loser]
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == winner
    assert all(ticket(out, level)["config"]["seed"] == winner for level in (0, 1))


@pytest.mark.slow
def test_the_same_branch_from_a_second_process_stops_with_a_message_unless_it_waits(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "regroup").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time, lth_ref; f = lth_ref.try_lock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(600)",
                               str(out / "regroup" / "run.lock")],
                              stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert L.main(FAST + ["--out-dir", str(out), "--levels", "1", "--method", "regroup"]) == 2
        err = capsys.readouterr().err
        assert f"is being trained by pid {holder.pid} on " in err and "--wait" in err
    finally:
        holder.kill()
        holder.wait()
    lock = L.try_lock(str(out / "regroup" / "run.lock"))      # the kernel released the killed holder's lock
    assert lock is not None and (L.lock_holder(str(out / "regroup" / "run.lock"))
                                 == f"pid {os.getpid()} on {socket.gethostname()}")
    L.release(lock)


def test_a_write_removes_the_temporaries_of_its_file_that_killed_writers_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    left = {"dead": f"ticket.tmp{dead.pid}.{host}.pt", "live": f"ticket.tmp{os.getppid()}.{host}.pt",
            "elsewhere": f"ticket.tmp{dead.pid}.other-machine.pt",
            "other file": f"init.tmp{dead.pid}.{host}.pt"}
    for name in left.values():
        (tmp_path / name).write_bytes(b"half a file")
    L.save({"w": torch.ones(1)}, str(tmp_path / "ticket.pt"))
    assert sorted(os.listdir(tmp_path)) == sorted(["ticket.pt"] + [left[k] for k in left if k != "dead"])


def test_on_windows_no_temporary_is_taken_for_a_killed_writers(monkeypatch):
    monkeypatch.setattr(os, "kill", lambda *_: pytest.fail("os.kill(pid, 0) sends Ctrl-C on Windows"))
    monkeypatch.setattr(os, "name", "nt")
    assert L.process_alive(2 ** 22 + 1)


def test_without_posix_file_locks_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fcntl", None)             # `import fcntl` raises ImportError
    monkeypatch.setattr(kernels, "_WARNED", set())
    first, second = L.try_lock(str(tmp_path / "run.lock")), L.try_lock(str(tmp_path / "run.lock"))
    assert first is not None and second is not None            # no lock, but no failure either
    L.release(first), L.release(second)
    assert capsys.readouterr().err.count("WARNING: this OS has no POSIX file locks") == 1


def write_config(out, *flags):
    """config.json of the fast settings with `flags`, as a command that finished its setup writes it."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(L.trunk_config(cli_config(*flags)), f)


def test_a_process_training_the_trunk_keeps_its_settings_even_those_level_0_ignores(tmp_path, monkeypatch,
                                                                                      capsys):
    out = str(tmp_path / "run")
    monkeypatch.setattr(L, "claim_level", lambda *_: pytest.fail("went on to wait for the holder's level"))
    write_config(out)                                          # its setup is done, level 0 not yet created
    holder = L.try_lock(os.path.join(out, "run.lock"))         # (another open file: flock refuses us too)
    try:
        assert L.main(FAST + ["--out-dir", out, "--prune-rate", "0.5"]) == 2
    finally:
        L.release(holder)
    err = capsys.readouterr().err
    assert f"is being trained by pid {os.getpid()} on " in err and "--prune-rate 0.2 -> 0.5" in err
    assert json.load(open(os.path.join(out, "config.json")))["prune_rate"] == 0.2


@pytest.mark.parametrize("source, fix", [("imp", "fewer --levels or a smaller --prune-rate keeps them"),
                                         ("import", "the file b.pt empties them (another network's masks?)")])
def test_an_emptied_layer_warning_names_the_fix_of_its_mask_source(capsys, source, fix):
    exp = types.SimpleNamespace(procs=L.Processes(), cfg=types.SimpleNamespace(
        mask_source=source, import_masks=["a.pt", "b.pt"] if source == "import" else None))
    L.warn_empty_layers(exp, 2, {"a": torch.ones(2, 2), "b": torch.zeros(2, 2)})
    assert capsys.readouterr().err == ("WARNING: trunk level 2 keeps no weight of 1 layer(s) (b): their "
                                       "outputs are 0, so a network without shortcuts around them (VGG) "
                                       f"predicts one class; {fix}\n")
    L.warn_empty_layers(exp, 2, {"a": torch.ones(2, 2)})
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_trunk_level_that_empties_a_layer_says_so(tmp_path, monkeypatch, capsys):
    imp = L.MASK_SOURCES["imp"]
    def emptying(exp, level):                                  # as a global prune does at high levels
        masks, state = imp(exp, level)
        return {**masks, "layer3.0.conv1.weight": torch.zeros_like(masks["layer3.0.conv1.weight"])}, state
    monkeypatch.setitem(L.MASK_SOURCES, "imp", emptying)
    run_cli(tmp_path, "--levels", "1")
    assert "WARNING: trunk level 1 keeps no weight of 1 layer(s) (layer3.0.conv1.weight)" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_a_deleted_middle_trunk_level_is_trained_again_and_the_levels_after_it_are_named(tmp_path, capsys):
    out, _ = run_cli(tmp_path, "--levels", "2", "--method", "refill")
    shutil.rmtree(os.path.join(out, "level_01"))
    capsys.readouterr()
    run_cli(tmp_path, "--levels", "2", "--method", "refill")
    err = capsys.readouterr().err
    assert "WARNING: trunk level 1 is trained again, but refill level 2, trunk level 2 (built from it)" in err
    run_cli(tmp_path, "--levels", "2", "--method", "refill")
    assert "WARNING" not in capsys.readouterr().err            # a plain resume says nothing


@pytest.mark.slow
def test_resuming_with_another_process_count_warns_once(tmp_path, capsys):
    out, _ = run_cli(tmp_path, "--levels", "0")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["processes"] == 1
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config, "processes": 2}, f)                 # as a start under torchrun wrote it
    capsys.readouterr()
    run_cli(tmp_path, "--levels", "0")
    assert capsys.readouterr().err.count("config.json recorded 2 process(es), this run has 1:") == 1
    run_cli(tmp_path, "--levels", "0")
    assert "WARNING" not in capsys.readouterr().err


def test_a_process_training_a_branch_keeps_the_trunk_settings_too(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    write_config(out)
    os.makedirs(os.path.join(out, "refill"))
    open(os.path.join(out, "refill", "branch.json"), "w").write("{}")
    holder = L.try_lock(os.path.join(out, "refill", "run.lock"))   # it trains refill level 1
    monkeypatch.setattr(L, "claim_level", lambda *_: pytest.fail("went on"))
    try:
        assert L.main(FAST + ["--out-dir", out, "--prune-rate", "0.5"]) == 2
    finally:
        L.release(holder)
    assert f"is being trained by pid {os.getpid()} on " in capsys.readouterr().err


def test_the_check_before_a_level_waits_while_another_command_writes_the_settings(tmp_path):
    write_config(str(tmp_path))
    cfg, run, done = cli_config("--out-dir", str(tmp_path)), L.trunk_run(cli_config()), threading.Event()
    thread = threading.Thread(target=lambda: (L.settings_changed(cfg, run, 1), done.set()))
    with L.waiting_lock(str(tmp_path / "setup.lock")):          # another command checks and writes
        thread.start()
        assert not done.wait(0.3)
    assert done.wait(10)
    thread.join()


def test_theta_0_written_by_another_command_makes_the_experiment_started(tmp_path, capsys):
    out = str(tmp_path / "run")
    write_config(out)
    open(os.path.join(out, "init.pt"), "wb").close()          # its level 0 is about to start
    assert L.main(FAST + ["--out-dir", out, "--seed", "7", "--levels", "0"]) == 2
    assert "holds an experiment with other settings (--seed 0 -> 7)" in capsys.readouterr().err


def test_settings_written_during_this_commands_data_loading_are_checked_again(tmp_path, monkeypatch, capsys):
    out, load = str(tmp_path / "run"), data.load_dataset
    def other_command_sets_up(*args, **kwargs):                # it finishes its setup while we load
        write_config(out)
        open(os.path.join(out, "init.pt"), "wb").close()
        return load(*args, **kwargs)
    monkeypatch.setattr(data, "load_dataset", other_command_sets_up)
    assert L.main(FAST + ["--out-dir", out, "--seed", "7", "--levels", "0"]) == 2
    assert "other settings (--seed 0 -> 7)" in capsys.readouterr().err
    assert os.path.getsize(os.path.join(out, "init.pt")) == 0   # its theta_0 is left alone


def test_a_waiting_lock_lets_one_process_at_a_time_in(tmp_path):
    entered, path = threading.Event(), str(tmp_path / "setup.lock")
    def second():
        with L.waiting_lock(path):
            entered.set()
    with L.waiting_lock(path):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3)                            # another open file: flock makes it wait
    assert entered.wait(10)
    thread.join()


@pytest.mark.slow
@pytest.mark.parametrize("method, run", [("imp", "trunk"), ("regroup", "regroup")])
def test_no_level_is_trained_after_another_command_changed_the_settings(tmp_path, monkeypatch, capsys, method,
                                                                       run):
    out, train = str(tmp_path / "run"), L.train_level
    def then_another_command_starts(exp, run, level, eta):
        row = train(exp, run, level, eta)
        write_config(out, "--prune-rate", "0.5")                 # accepted there: no level 1 yet, lock free
        return row
    monkeypatch.setattr(L, "train_level", then_another_command_starts)
    assert L.main(FAST + ["--out-dir", out, "--levels", "1", "--method", method]) == 2
    err = capsys.readouterr().err
    assert "no longer holds this command's settings (--prune-rate 0.2 -> 0.5): another command" in err
    assert f"stops before {run} level 1" in err                 # (a branch level comes before trunk 1)
    assert not os.path.exists(os.path.join(out, "level_01")) and not os.path.exists(os.path.join(out, run,
                                                                                                 "level_01"))


def test_a_branch_writes_layers_csv_before_its_ticket(tmp_path, monkeypatch):
    """A stop between the two files leaves no ticket (the level is trained again, both files written),
    never a ticket without its layers.csv (a finished level is not written again)."""
    written = []
    monkeypatch.setattr(L, "save", lambda obj, path: written.append(os.path.basename(path)))
    monkeypatch.setattr(L, "write_csv", lambda rows, path: written.append(os.path.basename(path)))
    model = MODELS["resnet20"](10)
    exp = types.SimpleNamespace(cfg=cli_config(), model=model, log=print, procs=L.Processes(),
                                data=types.SimpleNamespace(
        num_classes=10, mean=torch.zeros(3), std=torch.ones(3)))
    run = L.Run("regroup", str(tmp_path / "regroup"), "regroup", "rewind", False)
    masks = L.ones_masks(L.prunable_weights(model))
    start = L.Start(masks, None, {n: dict(density=1.0) for n in masks}, model.state_dict(), 0)
    L.write_ticket(exp, run, 1, start, dict(level=1))
    assert written == ["layers.csv", "ticket.pt"]


def test_a_stop_before_a_levels_first_epoch_names_that_level(tmp_path, monkeypatch, capsys):
    def interrupted(*_):                                       # Ctrl-C while waiting for a level's lock
        raise KeyboardInterrupt
    monkeypatch.setattr(L, "claim_level", interrupted)
    assert L.main(FAST + ["--out-dir", str(tmp_path / "run"), "--levels", "0"]) == 130
    assert "stopped by SIGINT at trunk level 0: no epoch of that level was kept" in capsys.readouterr().err
    os.makedirs(tmp_path / "run" / "level_00")
    (tmp_path / "run" / "level_00" / "checkpoint.pt").write_bytes(b"")     # an earlier command's
    assert L.main(FAST + ["--out-dir", str(tmp_path / "run"), "--levels", "0"]) == 130
    assert "its last epoch checkpoint is kept" in capsys.readouterr().err


def test_a_stop_of_a_tool_promises_no_checkpoint(tmp_path, monkeypatch, capsys):
    import lth_tools
    monkeypatch.setattr(lth_tools, "write_report", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    assert L.main(["--report", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "stopped by SIGINT; run the same command again to redo it\n"


def test_a_started_experiment_without_its_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "level_00"))                   # started; config.json deleted
    assert L.main(FAST + ["--out-dir", out, "--lr", "0.05", "--levels", "0"]) == 2
    assert "config.json is missing, but the experiment there has started" in capsys.readouterr().err


def run_printed_command(message, monkeypatch):
    """Run the `python -c "CODE" ARG ...` that ends a message as a POSIX shell would pass it: its quoting
    undone by shlex, CODE executed here with sys.argv set to its arguments."""
    python, flag, code, *args = shlex.split(message[message.index("python -c"):])
    monkeypatch.setattr(sys, "argv", ["-c", *args])
    exec(code, {})


def test_a_damaged_config_names_the_command_that_rebuilds_it_from_the_last_ticket(tmp_path, monkeypatch):
    out = str(tmp_path / "it's a run")                          # a quote and spaces, which the shell sees
    cfg = cli_config("--out-dir", out)
    for level in ("level_00", "level_01"):
        os.makedirs(os.path.join(out, level))
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write('{"arch": "resnet20", "data')                    # cut short
    with pytest.raises(L.UsageError, match="delete the directory to start over"):   # nothing to rebuild from
        L.check_settings_here(cfg, None)
    for level, rate in (("level_00", 0.5), ("level_01", cfg.prune_rate)):   # --prune-rate changed after 0
        L.save(dict(config={**dataclasses.asdict(cfg), "prune_rate": rate, "method": "imp"}),   # as tickets
               os.path.join(out, level, "ticket.pt"))
    with pytest.raises(L.UsageError, match="config.json is damaged") as e:
        L.check_settings_here(cfg, None)
    run_printed_command(str(e.value), monkeypatch)
    L.check_settings_here(cfg, None)                             # rebuilt: the same settings go on
    with pytest.raises(L.UsageError, match="--lr 0.1 -> 0.05"):  # and a changed one is still refused
        L.check_settings_here(cli_config("--out-dir", out, "--lr", "0.05"), None)


@pytest.mark.slow
def test_sigterm_mid_level_stops_with_128_plus_15_and_the_same_command_resumes_exactly(tmp_path):
    flags = ["--levels", "1", "--method", "regroup"]
    results = lambda out: [{k: v for k, v in r.items() if k != "seconds"}
                           for r in json.load(open(os.path.join(out, "results.json")))]
    straight = lth_ref_process(str(tmp_path / "straight"), *flags)   # the same threads as the cut run
    assert straight.wait(timeout=TORCHRUN_TIMEOUT_S) == 0
    out = str(tmp_path / "cut")
    proc, lines = lth_ref_process(out, *flags), []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("trunk level  1 epoch   1/"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    log = "".join(lines) + proc.communicate(timeout=TORCHRUN_TIMEOUT_S)[0]
    assert proc.returncode == 143, log
    ckpt = os.path.join(out, "level_01", "checkpoint.pt")
    assert f"at trunk level 1 in epoch 2/2: its last epoch checkpoint is kept ({ckpt})" in log
    assert "stopped by SIGTERM" in log
    assert "Traceback" not in log and os.path.exists(os.path.join(out, "level_01", "checkpoint.pt"))
    resumed = lth_ref_process(out, *flags)
    assert ("resuming at epoch 1" in resumed.communicate(timeout=TORCHRUN_TIMEOUT_S)[0]
            and resumed.returncode == 0)
    assert results(out) == results(str(tmp_path / "straight"))


def test_an_out_dir_or_data_dir_that_is_a_file_is_an_error_with_a_hint(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert L.main(FAST + ["--out-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert L.main(FAST + ["--out-dir", str(tmp_path / "file" / "sub")]) == 2
    assert f"{tmp_path / 'file'} is a file" in capsys.readouterr().err
    assert L.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "file"),
                   "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "is a file" in err and not (tmp_path / "o").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_an_out_dir_this_user_cannot_write_is_an_error_with_a_hint(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    assert L.main(FAST + ["--out-dir", str(tmp_path / "ro" / "run")]) == 2
    assert "may not write to" in capsys.readouterr().err


def cut_after_first_epoch_of(prefix):
    def log(line):
        if line.startswith(prefix):
            raise KeyboardInterrupt
    return log


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["trunk level  1 epoch   1/", "regroup level  1 epoch   1/"])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, prefix):
    flags = ["--levels", "1", "--method", "regroup"]
    straight_dir, straight = run_cli(tmp_path, *flags, name="straight")
    out = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        L.run_experiment(cli_config("--out-dir", out, *flags), log=cut_after_first_epoch_of(prefix))
    branch = "" if prefix.startswith("trunk") else "regroup"
    assert os.path.exists(os.path.join(out, branch, "level_01", "checkpoint.pt"))
    _, resumed = run_cli(tmp_path, *flags, name="cut")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(straight) == strip(resumed)
    t1, t2 = ticket(straight_dir, 1, branch), ticket(out, 1, branch)
    assert all(torch.equal(t1["masks"][n], t2["masks"][n]) for n in t1["masks"])
    assert all(torch.equal(t1["state_dict"][k], t2["state_dict"][k]) for k in t1["state_dict"])


TORCHRUN_TIMEOUT_S = 300  # a 2-process job of a few tiny levels takes seconds; past this it hangs


def torchrun(out, *extra, stop_at=None):
    """lth_ref under torchrun with 2 CPU processes (gloo); stop_at: interrupt the job (SIGINT to its
    process group) after the first log line starting with it. Returns (exit code, stdout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "lth_ref.py"), *FAST,
           "--out-dir", out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    watchdog = threading.Timer(TORCHRUN_TIMEOUT_S, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()                         # a hung job fails the test instead of hanging it
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_at and line.startswith(stop_at):
            os.killpg(proc.pid, signal.SIGINT)
            break
    proc.stdout.close()
    code = proc.wait()
    watchdog.cancel()
    return code, "".join(lines)


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one_write_once_and_resume(tmp_path):
    flags = ["--levels", "1"]
    one_dir, one = run_cli(tmp_path, *flags, name="one")
    code, log = torchrun(str(tmp_path / "two"), *flags)
    assert code == 0, log
    two = json.load(open(tmp_path / "two" / "results.json"))
    assert [(r["branch"], r["level"]) for r in two] == [(r["branch"], r["level"]) for r in one]
    assert (log.count("== trunk level 1 done") == 1
            and "processes" in open(tmp_path / "two" / "config.json").read())
    assert not [f for f in os.listdir(tmp_path / "two" / "level_01") if f != "ticket.pt"]   # no stray files
    m1, m2 = ticket(one_dir, 1)["masks"], ticket(str(tmp_path / "two"), 1)["masks"]
    agree = sum(int((m1[n] == m2[n]).sum()) for n in m1) / sum(m.numel() for m in m1.values())
    assert agree > 0.99                      # per-process BN statistics: close to one process, not equal
    assert abs(two[1]["train_loss"] - one[1]["train_loss"]) < 0.2
    code, log = torchrun(str(tmp_path / "cut"), *flags, stop_at="trunk level  1 epoch   1/")
    assert os.path.exists(tmp_path / "cut" / "level_01" / "checkpoint.pt"), log
    code, log = torchrun(str(tmp_path / "cut"), *flags)
    assert code == 0 and "resuming at epoch 1" in log, log
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(json.load(open(tmp_path / "cut" / "results.json"))) == strip(two)
    t1, t2 = ticket(str(tmp_path / "two"), 1), ticket(str(tmp_path / "cut"), 1)
    assert all(torch.equal(t1["state_dict"][k], t2["state_dict"][k]) for k in t1["state_dict"])


@pytest.mark.slow
def test_bf16_channels_last_level_keeps_pruned_weights_zero(tmp_path):
    out, rows = run_cli(tmp_path, "--levels", "1", "--epochs", "1", "--amp", "bf16", "--channels-last",
                        "--method", "refill")
    for branch in ("", "refill"):
        t = ticket(out, 1, branch)
        assert all(torch.all(t["state_dict"][n][m == 0] == 0) for n, m in t["masks"].items())
    assert json.load(open(os.path.join(out, "config.json")))["amp"] == "bf16"


@pytest.mark.slow
def test_a_resnet50_level_runs_on_a_tiny_image_folder(tmp_path):
    pytest.importorskip("PIL.Image")
    write_tiny_imagenet(tmp_path / "data")
    out = str(tmp_path / "run")
    assert L.main(["--dataset", "tinyimagenet", "--data-dir", str(tmp_path / "data"), "--arch", "resnet50",
                   "--epochs", "1", "--levels", "1", "--batch-size", "4", "--device", "cpu",
                   "--val-split", "3", "--method", "refill", "--out-dir", out]) == 0
    rows = json.load(open(os.path.join(out, "results.json")))
    assert [(r["branch"], r["level"]) for r in rows] == [("trunk", 0), ("trunk", 1), ("refill", 1)]
    assert all(0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 for r in rows)
    assert json.load(open(os.path.join(out, "config.json")))["lr_drops"] == [1, 1]   # 30, 60 of 95 -> 1 epoch


@pytest.mark.slow
def test_compile_flag_compiles_the_training_network(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net: compiled.append(net) or net)
    run_cli(tmp_path, "--levels", "0", "--epochs", "1", "--compile")
    assert len(compiled) == 1 and isinstance(compiled[0], models.ResNet)


@pytest.mark.slow
def test_raising_levels_continues_like_asking_at_start(tmp_path):
    _, two = run_cli(tmp_path, "--levels", "2", name="a")
    run_cli(tmp_path, "--levels", "1", name="b")
    _, grown = run_cli(tmp_path, "--levels", "2", name="b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(two) == strip(grown)


@pytest.mark.slow
def test_changed_trunk_setting_is_refused_once_training_started(tmp_path, capsys):
    run_cli(tmp_path, "--levels", "0")
    assert L.main(FAST + ["--out-dir", str(tmp_path / "run"), "--levels", "0", "--lr", "0.05"]) == 2
    assert "--lr 0.1 -> 0.05" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_start_leaves_the_experiment_free(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert L.main(FAST[:4] + ["--train-subset", "10000", "--epochs", "1", "--out-dir", out]) == 2
    err = capsys.readouterr().err
    assert "train_subset=10000 (--train-subset) is out of range" in err and not os.path.exists(out)
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:   # an older start that trained nothing, its
        f.write('{"lr": 0.5, "seed": ')                         # file cut short
    run_cli(tmp_path, "--levels", "0")                        # the corrected command is accepted


@pytest.mark.slow
def test_a_branch_whose_post_processing_empties_a_layer_stops_with_an_error(monkeypatch, tmp_path, capsys):
    post = L.postprocess
    def emptying(method, weights, masks, feats, **knobs):       # a post-processor that cuts one layer
        new, blocks = post(method, weights, masks, feats, **knobs)
        return {**new, "layer1.0.conv1.weight": torch.zeros_like(new["layer1.0.conv1.weight"])}, blocks
    monkeypatch.setattr(L, "postprocess", emptying)
    assert L.main(FAST + ["--method", "refill", "--levels", "1", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "refill level 1: refill with" in err and "keeps no weight of 1 layer(s)" in err
    assert "layer1.0.conv1.weight" in err


@pytest.mark.parametrize("flags, message", [
    (["--prune-rate", "1.5"], "--prune-rate must be in (0, 1)"),
    (["--levels", "-1"], "--levels must be >= 0"),
    (["--rewind-epoch", "5"], "--rewind-epoch must be in [0, --epochs)"),
    (["--refill-extra", "2"], "--refill-extra must be in [0, 1]"),
    (["--group-aware"], "--group-aware post-processes every level of its own chain"),
    (["--group-aware", "--method", "regroup", "--mask-source", "omp"], "it needs --mask-source imp"),
    (["--method", "regroup", "--min-col-nnz", "9"], "--min-col-nnz (paper t2, 9) must be at most --row"),
    (["--bench", "regroup", "--min-col-nnz", "9"], "--min-col-nnz (paper t2, 9) must be at most --row"),
    (["--bench", "regroup", "--export", "e.pt"], "--bench and --export are separate commands"),
    (["--report", "r", "--export", "e.pt"], "--report and --export are separate commands"),
    pytest.param(["--mask-source", "admm", "--admm-iterations", "1", "--admm-lr", "1e30", "--levels", "1"],
                 "ADMM for trunk level 1 diverged in W-step 1: the training loss is nan; lower --admm-lr",
                 marks=pytest.mark.slow),                      # trains level 0 first
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    (["--seed", "20000000000000"], "--seed must be in [0, 4294967296)"),
    (["--lr-drops", "0"], "--lr-drops must be epochs >= 1"),
    (["--admm-lr", "inf"], "--admm-lr must be a finite number > 0"),
    (["--amp", "fp16"], "--amp fp16 needs a CUDA GPU"),
    (["--sync-bn"], "--sync-bn synchronizes BatchNorm across processes"),
    (["--val-split", "-1"], "--val-split must be >= 0"),
    (["--mask-source", "imp", "--import-masks", "m.pt"], "--import-masks gives the trunk's masks: drop "
                                                          "--mask-source imp"),
    (["--ticket", "t.pt"], "--ticket t.pt is not read by this command: an experiment trains its own"),
    (["--bench", "train", "--ticket", "t.pt"], "not read by this command: --bench train times training"),
    (["--bench", "--bench-density", "0.5", "--method", "refill", "--ticket", "t.pt"],
     "not read by this command: --bench-density benchmarks a fresh --arch network instead; drop it"),
    (["--report", "r", "--ticket", "t.pt"], "not read by this command: --report reads experiment"),
    (["--bench", "train", "--bench-density", "0.5"], "--bench-density is read by --bench kernels, paper and"),
    (["--export", "e.pt", "--bench-density", "0.5"], "--bench-density is read by --bench kernels, paper and"),
    (["--bench-density", "0.5"], "--bench-density is read by --bench kernels, paper and regroup: drop it"),
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
    assert re.search(r"--seed SEED\s+seed for init[^\n]*\n?[^\n]*\(default: 0\)", text)   # 0 is a default too
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in L.build_parser()._actions:
        helped = L.HelpFormatter("x")._get_help_string(action)
        assert helped.count("default") <= 1, action.option_strings
    assert "(default: resnet20)" in text and "runs/ARCH_DATASET_SOURCE" in text


@pytest.mark.slow
def test_a_damaged_checkpoint_is_set_aside_with_a_warning_and_the_level_starts_over(tmp_path, capsys):
    _, straight = run_cli(tmp_path, "--levels", "0", name="straight")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):                      # a level stopped after its first epoch
        L.run_experiment(cli_config("--out-dir", str(out), "--levels", "0"),
                         log=cut_after_first_epoch_of("trunk level  0 epoch   1/"))
    (out / "level_00" / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")   # then damaged
    _, rows = run_cli(tmp_path, "--levels", "0")
    err = capsys.readouterr().err
    assert err.count("WARNING: cannot read the checkpoint") == 1 and "starts over" in err
    assert (out / "level_00" / "checkpoint.pt.damaged").exists() and "Traceback" not in err
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in straight]


@pytest.mark.parametrize("what, says", [("initialization", "theta_0 cannot be computed again"),
                                        ("rewind state", "Delete it and level_00/ to train level 0 again"),
                                        ("ticket", "Delete it to compute that step again")])
def test_a_damaged_file_says_what_to_do_about_that_file(tmp_path, what, says):
    (tmp_path / "f.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(L.DamagedFile, match=says):
        L.load_file(str(tmp_path / "f.pt"), what)


def test_an_init_of_another_network_is_a_damaged_file_not_a_traceback(tmp_path):
    model = built("resnet20")
    exp = types.SimpleNamespace(model=model, cfg=types.SimpleNamespace(out_dir=str(tmp_path), arch="resnet20",
                                                                       rewind_epoch=0))
    torch.save(model.state_dict(), tmp_path / "init.pt")
    assert L.rewind_state(exp).keys() == model.state_dict().keys()          # its own state is read
    for other in (models.slim_state(model, "resnet20", 10),                  # an export written over it
                  built("resnet20", num_classes=100).state_dict(),            # the same names, other shapes
                  {"fc.weight": torch.zeros(10, 64)}):
        torch.save(other, tmp_path / "init.pt")
        with pytest.raises(L.DamagedFile, match="theta_0 cannot be computed again") as e:
            L.init_state(exp)
        assert e.value.first_line == (f"the initialization {tmp_path / 'init.pt'} is not a state of this "
                                      "experiment's resnet20 network")


def test_a_long_reason_is_cut_with_an_ellipsis(tmp_path, monkeypatch):
    (tmp_path / "f.pt").write_bytes(b"")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("word " * 100)))
    with pytest.raises(L.DamagedFile) as e:
        L.load_file(str(tmp_path / "f.pt"), "ticket")
    assert ("word " * 100)[:L.MESSAGE_CHARS] + "...)" in e.value.first_line


@pytest.mark.slow
def test_a_damaged_later_ticket_stops_the_command_before_any_level_trains(tmp_path, capsys):
    out, _ = run_cli(tmp_path, "--levels", "1")
    path = os.path.join(out, "level_01", "ticket.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)                  # trunk level 1, read after refill level 1
    capsys.readouterr()
    assert L.main(FAST + ["--out-dir", out, "--levels", "1", "--method", "refill"]) == 2
    assert f"cannot read the ticket {path}" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "refill", "level_01"))  # refill level 1 did not train


def test_a_branch_that_lost_its_branch_json_still_counts_and_its_command_asks_for_the_file(tmp_path):
    os.makedirs(tmp_path / "refill" / "level_01")
    torch.save({}, tmp_path / "refill" / "level_01" / "ticket.pt")
    os.makedirs(tmp_path / "regroup")
    (tmp_path / "regroup" / "branch.json").write_text("{}")             # started, nothing finished yet
    os.makedirs(tmp_path / "report")                                     # a folder that is no run
    assert L.branch_dirs(str(tmp_path)) == ["refill", "regroup"]
    path = str(tmp_path / "refill" / "branch.json")
    with pytest.raises(L.UsageError) as e:
        L.check_config(path, {"method": "refill"}, started=True)
    assert str(e.value).startswith(f"{path} is missing, but the branch there has started (its level_01 is "
                                   "there): put the file back, or rebuild it from the settings")


def test_every_finished_ticket_of_every_run_is_read_before_the_work(tmp_path):
    for run in ("", "refill"):
        os.makedirs(tmp_path / run / "level_01", exist_ok=True)
        torch.save({}, tmp_path / run / "level_01" / "ticket.pt")
    (tmp_path / "refill" / "branch.json").write_text("{}")
    (tmp_path / "refill" / "level_01" / "ticket.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(L.UsageError) as e:
        L.check_finished_tickets(str(tmp_path), built("resnet20"))
    assert f"{tmp_path / 'level_01' / 'ticket.pt'} is not a ticket" in str(e.value)   # the trunk's first
    (tmp_path / "level_01" / "ticket.pt").unlink()
    with pytest.raises(L.DamagedFile, match=f"cannot read the ticket {tmp_path / 'refill' / 'level_01'}"):
        L.check_finished_tickets(str(tmp_path), built("resnet20"))


@pytest.mark.slow
def test_a_damaged_ticket_is_an_error_that_names_it_and_says_what_to_do(tmp_path, capsys):
    out, _ = run_cli(tmp_path, "--levels", "0")
    path = os.path.join(out, "level_00", "ticket.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)                  # a copy cut short
    capsys.readouterr()
    assert L.main(FAST + ["--out-dir", out, "--levels", "1"]) == 2
    said = capsys.readouterr()
    assert f"cannot read the ticket {path}" in said.err and "Delete it" in said.err
    assert "Traceback" not in said.err and "reused" not in said.out    # refused when found, not when read
    assert not os.path.exists(os.path.join(out, "level_01"))            # before any work


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_regroup_on_a_ticket_reports_every_layer_and_beats_random(tmp_path, capsys):
    run_cli(tmp_path, "--levels", "0")
    rows = lth_tools.run_bench(cli_config("--bench", "regroup", "--method", "regroup"), str(tmp_path / "run"))
    assert len(rows) == 18 and all(r["blocks"] > 0 for r in rows)     # the trunk's ticket, for any --method
    assert np.mean([r["coverage"] for r in rows]) > np.mean([r["random"] for r in rows])
    branch = L.load_file(str(tmp_path / "run" / "level_00" / "ticket.pt"), "ticket")
    branch["config"].update(branch="regroup", method="regroup")
    torch.save(branch, tmp_path / "branch.pt")
    level0 = tmp_path / "run" / "level_00" / "ticket.pt"
    said = capsys.readouterr().out
    assert f"masks: {level0}'s trained weights pruned once more by --prune-rate 0.2" in said
    lth_tools.run_bench(cli_config("--bench", "regroup", "--method", "regroup", "--ticket",
                                   str(tmp_path / "branch.pt")), "", {"method"})   # --method: not read here
    assert "is a ticket of the branch regroup" in capsys.readouterr().err


def test_bench_regroup_leaves_out_a_layer_that_keeps_no_block():
    masks = {"empty": torch.zeros(16, 8, 3, 3), "full": torch.ones(16, 8, 3, 3)}
    said = []
    rows = lth_tools.bench_regroup(masks, log=said.append)
    assert [r["name"] for r in rows] == ["full"] and rows[0]["coverage"] == 1.0
    assert "empty: regroup keeps no block here" in said[0]
    assert lth_tools.bench_regroup({"empty": masks["empty"]}, log=said.append) == []
    small = {"small": (torch.rand(16, 8, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.3).float()}
    assert lth_tools.bench_regroup(small, block_columns="official", log=said.append) == []
    assert "small: the official rule leaves this layer unstructured" in said[-2]


def test_export_and_bench_take_the_ticket_of_the_experiment_their_flags_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = os.path.join("runs", "resnet20_cifar10_imp")          # what `python lth_ref.py` trains into
    assert L.main(["--export", "slim.pt"]) == 2
    assert capsys.readouterr().err.endswith(f"(these flags' own experiment, {run}, does not exist)\n")
    os.makedirs(os.path.join(run, "level_01"))
    os.replace(saved_fresh_ticket(tmp_path), os.path.join(run, "level_01", "ticket.pt"))
    assert L.main(["--export", "slim.pt"]) == 0 and os.path.isfile("slim.pt")
    benched = []
    monkeypatch.setattr(lth_tools, "bench_kernels", lambda path, *a, **k: benched.append(path))
    assert L.main(["--bench", "kernels", "--device", "cpu"]) == 0
    assert benched == [os.path.join(run, "level_01", "ticket.pt")]


def test_bench_without_a_ticket_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                   # no runs/ here
    assert L.main(["--bench", "kernels"]) == 2
    assert "no ticket to benchmark" in capsys.readouterr().err
    for bench in ("kernels", "regroup"):                        # regroup would bench a fresh network
        assert L.main(["--bench", bench, "--out-dir", str(tmp_path / "none")]) == 2
        assert f"--out-dir {tmp_path / 'none'} does not exist: pass the directory" in capsys.readouterr().err
    for flag in ("--bench", "--export"):
        assert L.main([flag, "kernels" if flag == "--bench" else str(tmp_path / "s.pt"),
                       "--ticket", str(tmp_path / "level_01")]) == 2
        err = capsys.readouterr().err
        assert "level_01 is not a file" in err and "RUN/BRANCH/level_NN/ticket.pt" in err
    (tmp_path / "empty.pt").write_bytes(b"")                    # a file of the user's, not a level's ticket
    assert L.main(["--export", str(tmp_path / "s.pt"), "--ticket", str(tmp_path / "empty.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read the --ticket file {tmp_path / 'empty.pt'}") and \
        "Pass a ticket.pt lth_ref wrote" in err and "trained again" not in err
    (tmp_path / "level_03").mkdir()                             # an experiment's level: its own fix
    (tmp_path / "level_03" / "ticket.pt").write_bytes(b"")
    own = str(tmp_path / "level_03" / "ticket.pt")
    assert L.main(["--export", str(tmp_path / "s.pt"), "--ticket", own]) == 2
    assert "its level is trained again" in capsys.readouterr().err
    (tmp_path / "level_03" / "layers.csv").write_text("name\n")  # another file of a level: not "delete it"
    csv_file = str(tmp_path / "level_03" / "layers.csv")
    assert L.main(["--export", str(tmp_path / "s.pt"), "--ticket", csv_file]) == 2
    assert "Pass a ticket.pt lth_ref wrote" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_names_the_branches_when_the_run_asked_for_has_none(tmp_path, capsys):
    run_cli(tmp_path, "--levels", "1", "--epochs", "1", "--method", "refill")
    assert L.main(["--bench", "--out-dir", str(tmp_path / "run"), "--method", "regroup"] + FAST) == 2
    assert "branches here: refill)" in capsys.readouterr().err


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
    accuracy (a tie, which wins), every refill level is below it (none). A bench.json on each regroup
    level."""
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
    table = [line.strip("|").split("|")
             for line in itertools.takewhile(lambda l: l.startswith("|"), lines[start:])]
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


@pytest.mark.slow
def test_report_has_every_row_and_each_runs_extreme_ticket_by_the_rule(report_exp, capsys):
    out, rows = report_exp
    assert L.main(["--report", out]) == 0
    text = open(os.path.join(out, "report", "report.md")).read()
    table = md_table_after(text, "Dense accuracy")
    assert [(r["branch"], int(r["level"])) for r in table] == \
        [("trunk", 0), ("trunk", 1), ("trunk", 2), ("refill", 1), ("refill", 2),
         ("regroup", 1), ("regroup", 2)]
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
    assert (extremes["regroup"]["extreme winning ticket"] == "level 2"
            and extremes["refill"]["time saving"] == "-")
    assert extremes["regroup"]["time saving"].startswith(
        "50.0% conv layers, 25.0% end to end (batch 64, test device")


def test_a_report_rewritten_into_its_folder_removes_the_files_it_no_longer_writes(tmp_path):
    old = ["report.md", "masks_layer3.2.conv2.png", "extreme_tickets.csv",
           "layer_speedup_e1_regroup_level_03.csv", "notes.txt", "my_masks_plot.png"]
    for name in old:
        (tmp_path / name).write_text("an earlier report's")
    said = []
    csvs = {"accuracy_vs_sparsity.csv": [{"level": 1}], "extreme_tickets.csv": []}   # no extreme rows now
    written = lth_tools.write_report_files(str(tmp_path), ["exp"], [], csvs, [], said.append)
    assert sorted(os.listdir(tmp_path)) == ["accuracy_vs_sparsity.csv", "my_masks_plot.png", "notes.txt",
                                            "report.md"]                  # the user's own files stay
    assert said[0] == (f"removed 3 file(s) of an earlier report in {tmp_path} that this one does not write: "
                       "extreme_tickets.csv, layer_speedup_e1_regroup_level_03.csv, masks_layer3.2.conv2.png")
    assert set(written) == {"accuracy_vs_sparsity.csv", "report.md"}
    (tmp_path / "report.md").unlink()
    (tmp_path / "masks_x.png").write_text("no report.md: not a report folder")
    lth_tools.write_report_files(str(tmp_path), ["exp"], [], csvs, [], said.append)
    assert (tmp_path / "masks_x.png").exists()


def test_report_tags_name_each_experiment_by_its_folder_even_when_given_as_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")
    here = os.path.basename(tmp_path)
    paths = [here, ".", os.path.join(here, "..", "b"), str(tmp_path / "b") + os.sep]
    assert lth_tools.report_tags([{"path": p} for p in paths]) == [
        f"0_{here}", f"1_{os.path.basename(os.getcwd())}", "2_b", "3_b"]     # equal names numbered
    assert lth_tools.report_tags([{"path": "."}]) == [os.path.basename(os.getcwd())]


def test_one_accuracy_figure_holds_the_mask_sources_of_one_setting_imported_files_too():
    base = dict(arch="resnet20", dataset="cifar10", epochs=160, prune_rate=0.2, seed=0, mask_source="imp")
    same = [dict(base, seed=1), dict(base, mask_source="import", import_sha256=["ab12"]),
            dict(base, mask_source="snip", snip_samples=4)]
    other = [dict(base, arch="vgg16"), dict(base, epochs=2)]
    key = lth_tools.figure_key({"config": base})
    assert [lth_tools.figure_key({"config": c}) == key for c in same + other] == [True] * 3 + [False] * 2


@pytest.mark.slow
def test_report_pictures_decode_at_the_stated_sizes(report_exp, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = report_exp
    written = lth_tools.write_report([out], str(tmp_path), log=lambda *_: None)
    text = open(written["report.md"]).read()
    expected = {"accuracy_vs_sparsity.png": (640, 400), "layer_speedup_regroup_level_01.png": (800, 400),
                "layer_speedup_regroup_level_02.png": (800, 400),
                **{f"masks_{n}.png": (3 * 240, 300) for n in LAST_CONVS}}   # trunk, refill, regroup panels
    assert {n for n in written if n.endswith(".png")} == set(expected)
    for name, (w, h) in expected.items():
        assert png_size(written[name]) == (w, h) and f"`{name}` ({w}x{h} px)" in text
        assert os.path.getsize(written[name]) < 60_000
    speed = list(csv.DictReader(open(written["layer_speedup_regroup_level_01.csv"])))
    assert ([float(r["speedup"]) for r in speed] == [2.0, 2.0]
            and [r["path"] for r in speed] == ["cuda-kernel", "dense"])


def no_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)               # `import matplotlib` raises ImportError


@pytest.mark.slow
def test_report_without_matplotlib_says_so_once_and_writes_the_tables(report_exp, tmp_path, monkeypatch,
                                                                      capsys):
    no_matplotlib(monkeypatch)
    out, _ = report_exp
    written = lth_tools.write_report([out], str(tmp_path), log=lambda *_: None)
    err = capsys.readouterr().err
    assert err.count("pip install matplotlib") == 1 and err.startswith("WARNING: matplotlib is not installed")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".png")]
    assert "Extreme winning tickets" in open(written["report.md"]).read()
    assert {"accuracy_vs_sparsity.csv", "extreme_tickets.csv",
            "layer_speedup_regroup_level_02.csv"} <= set(written)


def test_extreme_ticket_rule_on_hand_made_rows():
    row = lambda level, density, acc: dict(level=level, density=density, test_acc=acc)
    rows = [row(0, 1.0, 0.90), row(1, 0.8, 0.91), row(2, 0.64, 0.90), row(3, 0.512, 0.89)]
    assert lth_tools.extreme_ticket(rows, 0.90)["level"] == 2                    # equal to dense counts
    assert lth_tools.extreme_ticket(rows, 0.905)["level"] == 1
    assert lth_tools.extreme_ticket(rows, 0.95) is None                          # no winning level
    assert lth_tools.extreme_ticket([row(0, 1.0, 0.99)], 0.5) is None       # the dense level is no ticket
    assert lth_tools.extreme_ticket(rows, None) is None
    ties = [row(1, 0.5, 0.92), row(2, 0.5, 0.93), row(3, 0.5, 0.93), row(4, 0.6, 0.99)]
    # same density: higher acc, lower level
    assert lth_tools.extreme_ticket(ties, 0.9)["level"] == 2


def write_experiment(path, config, rows):
    os.makedirs(path)
    for name, obj in (("config.json", config), ("results.json", rows)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f)


def test_a_branch_whose_directory_is_missing_keeps_its_rows_but_never_reads_the_trunks_files(tmp_path,
                                                                                              capsys):
    row = lambda branch, method: dict(branch=branch, source="imp", method=method, init="rewind", level=1,
                                      density=0.8, test_acc=0.9)
    write_experiment(tmp_path / "run", dict(arch="resnet20", dataset="synthetic"),
                     [row("trunk", "imp"), row("regroup", "regroup")])
    exp = lth_tools.read_experiment(str(tmp_path / "run"))
    assert exp["runs"] == {"trunk": str(tmp_path / "run")} and len(exp["rows"]) == 2
    missing = tmp_path / "run" / "regroup"
    assert f"lists the branch regroup, but {missing} is missing" in capsys.readouterr().err


def test_a_report_of_finished_levels_without_results_json_says_to_rerun_the_training(tmp_path, capsys):
    out = tmp_path / "run"
    write_experiment(out, dict(arch="resnet20", dataset="synthetic"), [])
    os.remove(out / "results.json")
    os.makedirs(out / "level_00")
    (out / "level_00" / "ticket.pt").write_bytes(b"")           # stopped between ticket and results
    assert L.main(["--report", str(out), "--out-dir", str(tmp_path / "rep")]) == 2
    assert "has finished levels but no results.json" in capsys.readouterr().err


def test_a_results_file_without_rows_is_named_in_an_error(tmp_path, capsys):
    write_experiment(tmp_path / "run", dict(arch="resnet20", dataset="synthetic"), [])
    assert L.main(["--report", str(tmp_path / "run"), "--out-dir", str(tmp_path / "rep")]) == 2
    assert "results.json holds no result rows" in capsys.readouterr().err


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
    groups = lth_tools.group_seeds([lth_tools.read_experiment(d) for d in dirs])
    assert [[e["config"]["seed"] for e in g] for g in groups] == [[0, 1], [0], [0]]
    rows = lth_tools.combine_seeds([e["rows"] for e in groups[0]])
    assert [(r["level"], r["seeds"], r["acc_min"], r["acc_max"]) for r in rows] == \
        [(0, 2, 0.5, 0.56), (1, 2, 0.5, 0.6), (2, 2, 0.7, 0.75)]
    assert rows[2]["test_acc"] == pytest.approx(0.725) and rows[2]["sparsity"] == pytest.approx(36.0)
    assert [r["dense_acc"] for r in rows] == [0.53] * 3                  # both seeds reached every level
    plain = [{k: v for k, v in r.items() if k != "dense_acc"} for r in rows]
    assert lth_tools.extreme_ticket(plain, 0.53)["level"] == 2
    assert lth_tools.extreme_ticket(plain, 0.73) is None
    assert L.main(["--report", *dirs]) == 0
    text = open(tmp_path / "runs" / "report" / "report.md").read()
    seeds = md_table_after(text, "## s0")
    assert [(r["level"], r["test_acc"], r["acc min-max"]) for r in seeds] == \
        [("0", "0.53", "0.5000-0.5600"), ("1", "0.55", "0.5000-0.6000"), ("2", "0.725", "0.7000-0.7500")]
    assert "0.5300 (mean of 2 seeds, range 0.5000-0.5600)" in text
    old = md_table_after(text, "## old")
    assert [(r["branch"], r["method"], r["level"]) for r in old] == [("regroup", "regroup", "0"),
                                                                     ("regroup", "regroup", "1")]
    assert md_table_after(text[text.index("## old"):], "Extreme")[0]["extreme winning ticket"] == "level 1"


def test_with_several_seeds_a_level_is_compared_with_the_dense_accuracy_of_its_own_seeds(tmp_path,
                                                                                          monkeypatch):
    no_matplotlib(monkeypatch)
    cfg = dict(arch="resnet20", dataset="synthetic", epochs=2, mask_source="imp", out_dir="x")
    row = lambda branch, level, acc: dict(branch=branch, source="imp", method="imp" if branch == "trunk" else
                                          "refill", init="rewind", level=level, density=0.8 ** level,
                                          test_acc=acc, flop_ratio="", blocks="", coverage="")
    write_experiment(tmp_path / "s0", {**cfg, "seed": 0, "levels": 1},      # dense 0.50; refill only here
                     [row("trunk", 0, 0.50), row("trunk", 1, 0.40), row("refill", 1, 0.55)])
    write_experiment(tmp_path / "s1", {**cfg, "seed": 1, "levels": 2},      # dense 0.70; level 2 only here
                     [row("trunk", 0, 0.70), row("trunk", 1, 0.60), row("trunk", 2, 0.65)])
    os.makedirs(tmp_path / "s0" / "refill")
    group = [lth_tools.read_experiment(str(tmp_path / d)) for d in ("s0", "s1")]
    rows = lth_tools.combine_seeds([e["rows"] for e in group])
    ext = {e["branch"]: e for e in lth_tools.extreme_rows(group, rows, 0.60)}   # 0.60: both seeds' dense
    assert ext["refill"]["extreme_level"] == 1 and ext["refill"]["dense_acc"] == 0.5   # 0.55 >= seed 0's 0.50
    assert ext["trunk"]["extreme_level"] == "none"                              # 0.65 < seed 1's 0.70
    assert L.main(["--report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out-dir",
                   str(tmp_path / "r")]) == 0
    shown = {r["run"]: r for r in md_table_after(open(tmp_path / "r" / "report.md").read(), "Extreme")}
    assert shown["refill"]["vs dense_acc (its seeds)"] == "0.5000"
    header = next(csv.reader(open(tmp_path / "r" / "accuracy_vs_sparsity.csv")))
    assert header[-1] == "dense_acc"                                              # after the paper's columns


def test_two_runs_of_one_source_with_other_source_settings_draw_two_named_lines(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = dict(arch="resnet20", dataset="synthetic", epochs=2, mask_source="snip", levels=1, out_dir="x")
    rows = lambda acc: [dict(branch="trunk", source="snip", method="imp", init="rewind", level=level,
                             density=density, test_acc=acc, flop_ratio="", blocks="", coverage="")
                        for level, density in ((0, 1.0), (1, 0.8))]
    for name, samples, acc in (("few", 10, 0.5), ("many", 100, 0.7)):
        write_experiment(tmp_path / name, {**cfg, "snip_samples": samples}, rows(acc))
    groups = lth_tools.group_seeds([lth_tools.read_experiment(str(tmp_path / d)) for d in ("few", "many")])
    curves = {"one figure": [(g, lth_tools.combine_seeds([e["rows"] for e in g]), 0.6) for g in groups]}
    [(_, draw)] = lth_tools.accuracy_pictures(curves, {str(tmp_path / d): d for d in ("few", "many")})
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in draw().axes[0].get_lines()
             if not ln.get_label().startswith("_") and "dense" not in ln.get_label()}
    assert {k: [round(a) for a in v] for k, v in lines.items()} == \
        {"snip (unstructured) [few]": [50, 50], "snip (unstructured) [many]": [70, 70]}


def test_a_copied_directory_is_reported_on_its_own_not_averaged_as_another_seed(tmp_path, capsys):
    cfg = dict(arch="resnet20", dataset="synthetic", epochs=2, mask_source="imp", levels=1, out_dir="x")
    rows = lambda acc: [dict(branch="trunk", source="imp", method="imp", init="rewind", level=0, density=1.0,
                             test_acc=acc, flop_ratio="", blocks="", coverage="")]
    for name, seed, acc in (("a", 0, 0.5), ("b", 1, 0.7), ("a_copy", 0, 0.9)):
        write_experiment(tmp_path / name, {**cfg, "seed": seed}, rows(acc))
    experiments = [lth_tools.read_experiment(str(tmp_path / d)) for d in ("a", "b", "a_copy")]
    groups = lth_tools.group_seeds(experiments)
    assert [[os.path.basename(e["path"]) for e in g] for g in groups] == [["a", "b"], ["a_copy"]]
    assert lth_tools.repeated_runs(experiments) == [str(tmp_path / "a_copy")]
    assert L.main(["--report", *(str(tmp_path / d) for d in ("a", "b", "a_copy"))]) == 0
    assert "a_copy repeats the settings and seed of another directory" in capsys.readouterr().err


def test_transcribed_paper_cells():
    assert (lth_tools.paper_cell("resnet18", "cifar10", "regroup", "rewind", 1)
            == ("A4", "table1", 80.00, 94.48))
    assert (lth_tools.paper_cell("resnet18", "cifar10", "refill", "reinit", 5)
            == ("A3", "table1", 32.97, 93.53))
    assert lth_tools.paper_cell("vgg16", "cifar100", "regroup", "rewind", 9) == ("A5", "plus", 25.27, 75.25)
    # Table A6 prints no round 5
    assert lth_tools.paper_cell("wrn32_2", "cifar100", "imp", "rewind", 5) is None
    assert lth_tools.PAPER_DENSE[("resnet50_3x3stem", "tinyimagenet")] == ("A7", 65.33)
    assert lth_tools.PAPER_SAVINGS[("resnet18", "cifar100", "regroup")][0] == 64.93


A4_SETTING = dict(arch="resnet18", dataset="cifar10", seed=0, mask_source="imp", schedule="table1",
                  epochs=160, lr_drops=[80, 120], rewind_epoch=8, train_subset=None, val_split=0, out_dir="x",
                  lr=0.1, batch_size=128, weight_decay=1e-4, momentum=0.9, prune_rate=0.2,
                  lr_schedule="resume")
A4_BRANCH = dict(method="regroup", init="rewind", group_aware=False, block_columns="official",
                 regroup_unit="position", groups=8)   # Table 1's CIFAR-10 row, 20% per round, 8 hMETIS parts


def write_a4_experiment(path, cfg=A4_SETTING, branch=None):
    """A ResNet-18 CIFAR-10 trunk and regroup branch (level 1 of Table A4's rows) with these settings."""
    row = lambda branch, method, level, density, acc: dict(branch=branch, source="imp", method=method,
                                                           init="rewind", level=level, density=density,
                                                           test_acc=acc, flop_ratio="", blocks="",
                                                           coverage="")
    write_experiment(path, cfg, [row("trunk", "imp", 0, 1.0, 0.95), row("trunk", "imp", 1, 0.8, 0.951),
                                 row("regroup", "regroup", 1, 0.8, 0.9400)])
    os.makedirs(path / "regroup")
    with open(path / "regroup" / "branch.json", "w") as f:
        json.dump(branch or A4_BRANCH, f)


def test_report_reads_a_directory_once_however_spelled_and_says_what_a_non_experiment_is(
        tmp_path, monkeypatch, capsys):
    no_matplotlib(monkeypatch)
    write_a4_experiment(tmp_path / "r18")
    (tmp_path / "link").symlink_to(tmp_path / "r18")
    spellings = [str(tmp_path / "r18"), str(tmp_path / "r18") + "/", str(tmp_path / "link")]
    written = lth_tools.write_report(spellings, str(tmp_path / "rep"), log=lambda *_: None)
    assert "report.md" in written and not any(name.startswith(("0_", "1_")) for name in written)  # 1 run
    assert "repeats the settings" not in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    for path, problem in (("none", "it does not exist"), ("file", "it is a file"),
                          ("r18/regroup", f"it is a branch: pass its experiment, {tmp_path / 'r18'}")):
        assert L.main(["--report", str(tmp_path / path)]) == 2
        assert f"{tmp_path / path} is not an experiment directory: {problem} (" in capsys.readouterr().err


def test_report_puts_the_papers_numbers_beside_a_run_of_the_same_setting(tmp_path, monkeypatch):
    no_matplotlib(monkeypatch)
    write_a4_experiment(tmp_path / "r18")
    written = lth_tools.write_report([str(tmp_path / "r18")], str(tmp_path / "rep"), log=lambda *_: None)
    text = open(written["report.md"]).read()
    table = {(r["branch"], r["level"]): r for r in md_table_after(text, "Dense accuracy")}
    assert table[("regroup", "1")]["paper: table, remaining %, acc %"] == "A4: 80.00, 94.48"
    assert table[("regroup", "1")]["acc - paper (points)"] == "-0.48"
    assert table[("trunk", "1")]["paper: table, remaining %, acc %"] == "no paper number"
    assert "paper cell not shown" not in text
    assert next(csv.DictReader(open(written["accuracy_vs_sparsity.csv"])))["paper_table"] == ""


@pytest.mark.parametrize("rule, shown", [("official", True), ("budget", False)])
def test_report_puts_the_papers_time_saving_beside_ours(tmp_path, monkeypatch, rule, shown):
    no_matplotlib(monkeypatch)
    cfg = {**A4_SETTING, "dataset": "cifar100"}                    # the paper's 64.93% at 78% sparsity
    write_a4_experiment(tmp_path / "r18", cfg, {**A4_BRANCH, "block_columns": rule})
    os.makedirs(tmp_path / "r18" / "regroup" / "level_01")
    with open(tmp_path / "r18" / "regroup" / "level_01" / "bench.json", "w") as f:
        json.dump(BENCH, f)
    results = json.load(open(tmp_path / "r18" / "results.json"))
    results[2]["test_acc"] = 0.96                                   # level 1 wins (dense 0.95)
    json.dump(results, open(tmp_path / "r18" / "results.json", "w"))
    written = lth_tools.write_report([str(tmp_path / "r18")], str(tmp_path / "rep"), log=lambda *_: None)
    line = next(x for x in open(written["report.md"]).read().splitlines()
                if x.startswith("- regroup: ") and "time saving" in x)
    if shown:
        assert line.startswith("- regroup: time saving, paper: 64.93% at 78% sparsity (abstract, Sec. 4")
        assert "ours: 50.0% conv layers, 25.0% end to end" in line and BENCH["device"] in line
        assert "at 20.00% sparsity" in line
    else:
        assert line == "- regroup: the paper's time saving not shown: block_columns budget, paper official"


@pytest.mark.parametrize("key, value, says", [
    ("epochs", 1, "epochs 1, paper 160"), ("schedule", "plus", "schedule plus, paper table1"),
    ("mask_source", "omp", "mask_source omp, paper imp"), ("rewind_epoch", 3, "rewind_epoch 3, paper 8"),
    ("lr_drops", [0, 1], "lr_drops [0, 1], paper [80, 120]"),
    ("train_subset", 512, "train_subset 512, paper None"),
    ("val_split", 5000, "val_split 5000, paper 0"), ("schedule", None, "schedule unknown, paper table1"),
    ("block_columns", "budget", "block_columns budget, paper official"),
    ("regroup_unit", "channel", "regroup_unit channel, paper position"),
    ("prune_rate", 0.5, "prune_rate 0.5, paper 0.2"), ("lr", 1.0, "lr 1.0, paper 0.1"),
    ("batch_size", 7, "batch_size 7, paper 128"), ("weight_decay", 0, "weight_decay 0, paper 0.0001"),
    ("groups", 2, "groups 2, paper 8")])
def test_report_shows_no_paper_cell_for_a_run_that_differs_in_one_setting(tmp_path, monkeypatch, key, value,
                                                                         says):
    no_matplotlib(monkeypatch)
    cfg, branch = dict(A4_SETTING), dict(A4_BRANCH)
    target = branch if key in branch else cfg
    if value is None:
        del target[key]                                             # an older config.json: unknown
    else:
        target[key] = value
    write_a4_experiment(tmp_path / "r18", cfg, branch)
    written = lth_tools.write_report([str(tmp_path / "r18")], str(tmp_path / "rep"), log=lambda *_: None)
    text = open(written["report.md"]).read()
    row = {(r["branch"], r["level"]): r for r in md_table_after(text, "Dense accuracy")}[("regroup", "1")]
    assert row["paper: table, remaining %, acc %"] == "not shown: settings differ"
    assert row["acc - paper (points)"] == "" and "94.48" not in text
    assert f"- regroup: paper cell not shown: {says}" in text.splitlines()


@pytest.mark.slow
def test_a_one_epoch_resnet18_cifar_run_shows_no_table_a4_cell_and_says_why(tmp_path, capsys):
    write_cifar(tmp_path / "data", data.CIFAR10, train_rows=[8, 8, 8, 8, 8], test_rows=[10])
    out = str(tmp_path / "run")
    assert L.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--arch", "resnet18",
                   "--levels", "1", "--epochs", "1", "--batch-size", "20", "--device", "cpu",
                   "--method", "regroup", "--block-columns", "paper", "--out-dir", out]) == 0
    assert L.main(["--report", out]) == 0
    text = open(os.path.join(out, "report", "report.md")).read()
    regroup = next(r for r in md_table_after(text, "Dense accuracy")
                   if r["branch"] == "regroup_colrule-paper")
    assert regroup["paper: table, remaining %, acc %"] == "not shown: settings differ"
    note = next(line for line in text.splitlines()
                if line.startswith("- regroup_colrule-paper: paper cell not shown"))
    assert "epochs 1, paper 160" in note and "block_columns paper, paper official" in note
    assert "schedule" not in note and "train_subset" not in note                # config.json records them


def test_block_order_draws_blocks_as_rectangles():
    def contiguous(positions):
        positions = np.sort(positions)
        return positions[-1] - positions[0] == len(positions) - 1
    out_rows, k = 12, 40
    laminar = [([0, 5, 7], [1, 2, 3, 10, 20, 30, 31]), ([1, 2], [2, 20]), ([3, 11], [0, 4, 5, 39]),
               ([4], [30]), ([9, 10], [6, 7, 8, 9, 11])]                # column sets disjoint or nested
    blocks = [(torch.tensor(r), torch.tensor(c)) for r, c in laminar]
    mask2d = kernels.block_mask((out_rows, k, 1, 1), blocks).reshape(out_rows, k)
    rows, cols = lth_tools.block_order(blocks, out_rows, k)
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
    rows, cols = lth_tools.block_order(found, 64, 288)
    where_row, where_col = np.argsort(rows), np.argsort(cols)
    assert all(contiguous(where_row[r.numpy()]) for r, _ in found)
    widest = sorted(found, key=lambda b: -len(b[1]))[:2]
    assert all(contiguous(where_col[c.numpy()]) for _, c in widest)


@pytest.mark.parametrize("damaged", ["config.json", "results.json"])
def test_a_report_names_the_damaged_file_and_its_fix(tmp_path, capsys, damaged):
    write_experiment(tmp_path / "run", dict(arch="resnet20", dataset="synthetic"), [dict(level=0)])
    (tmp_path / "run" / damaged).write_text("{")
    assert L.main(["--report", str(tmp_path / "run"), "--out-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run' / damaged} is damaged (not JSON)" in err
    assert ("delete the directory to start over" if damaged == "config.json" else "rewrites it") in err


@pytest.mark.parametrize("edit, says", [
    (lambda rows: [{**rows[0], "test_acc": "abc"}], "row 1: test_acc 'abc' is not a number"),
    (lambda rows: [rows[0], {**rows[1], "test_acc": None}], "row 2: test_acc None is not a number"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "density"}], "row 1: density None is not a"),
    (lambda rows: [{**rows[0], "level": "x"}], "row 1: level 'x' is not a level number"),
    (lambda rows: [rows[0], {**rows[1], "level": 1.0}], "row 2: level 1.0 is not a level number"),
    (lambda rows: [rows[0], {**rows[1], "branch": 5}], "row 2: branch 5 is not a name"),
    (lambda rows: [rows[0], 7], "row 2: 7 is not an object"),
    (lambda rows: [{**rows[0], "coverage": "high"}], "row 1: coverage 'high' is not a number"),
    (lambda rows: [{**rows[0], "test_acc": float("nan")}], "row 1: test_acc nan is not a number"),
])
def test_a_report_of_hand_damaged_rows_names_the_row_and_the_fix(tmp_path, capsys, edit, says):
    rows = [dict(branch="trunk", level=0, density=1.0, test_acc=0.9, coverage=""),
            dict(branch="trunk", level=1, density=0.8, test_acc=0.91, coverage="")]
    write_experiment(tmp_path / "run", dict(arch="resnet20", dataset="synthetic"), edit(rows))
    assert L.main(["--report", str(tmp_path / "run"), "--out-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'run' / 'results.json'} is damaged ({says}") and \
        "run the training command again, which rewrites it" in err and "Traceback" not in err
    (tmp_path / "run" / "config.json").write_text("[1, 2]")
    assert L.main(["--report", str(tmp_path / "run"), "--out-dir", str(tmp_path / "rep")]) == 2
    assert "config.json is damaged (not a JSON object)" in capsys.readouterr().err


@pytest.mark.parametrize("bench", ["{", '{"runs": "x"}', '{"runs": [5]}', '{"runs": [{"layers": "abc"}]}',
                                   '{"runs": [{"layers": ["abc"]}]}', '{"runs": [{"model": "abc"}]}'])
def test_a_bench_json_without_the_structure_the_report_reads_is_left_out_with_a_warning(tmp_path, capsys,
                                                                                         monkeypatch, bench):
    no_matplotlib(monkeypatch)
    write_a4_experiment(tmp_path / "r18")
    os.makedirs(tmp_path / "r18" / "regroup" / "level_01")
    (tmp_path / "r18" / "regroup" / "level_01" / "bench.json").write_text(bench)
    written = lth_tools.write_report([str(tmp_path / "r18")], str(tmp_path / "rep"), log=lambda *_: None)
    assert "report.md" in written
    assert "level_01/bench.json is not a readable bench.json; left out" in capsys.readouterr().err
    assert lth_tools.read_bench(str(tmp_path / "r18" / "regroup" / "level_01" / "bench.json"), False) is None
    (tmp_path / "ok.json").write_text(json.dumps(BENCH))
    assert lth_tools.read_bench(str(tmp_path / "ok.json")) == BENCH


@pytest.mark.slow
def test_report_refuses_what_it_cannot_read(report_exp, tmp_path, capsys):
    assert L.main(["--report", str(tmp_path)]) == 2
    assert "is not an experiment directory" in capsys.readouterr().err
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")     # level 0 training, nothing finished
    assert L.main(["--report", str(tmp_path / "started")]) == 2
    assert "started has no finished level yet" in capsys.readouterr().err
    out, _ = report_exp
    assert L.main(["--report", out, "--out-dir", str(tmp_path / "r"), "--report-layers", "fc"]) == 2
    err = capsys.readouterr().err
    assert "no prunable conv 'fc.weight'" in err and "layer3.2.conv2" in err


@pytest.mark.slow
def test_report_into_an_unwritable_place_is_an_error(report_exp, tmp_path, monkeypatch, capsys):
    out, _ = report_exp
    (tmp_path / "file").write_text("")
    assert L.main(["--report", out, "--out-dir", str(tmp_path / "file" / "report")]) == 2
    assert "--report's output directory" in capsys.readouterr().err
    monkeypatch.setattr(L.os, "access", lambda path, mode: not mode & os.W_OK)   # as on a read-only mount
    assert L.main(["--report", out, "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report's output directory") and "may not write to" in err


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


def empty_rows(mask2d):
    """The output channels in no block, from the test's own mask."""
    return torch.nonzero(mask2d.sum(1) == 0).view(-1)


# ---- reference and CPU paths ----

def test_centered_error_sees_feature_errors_under_a_large_bias_and_no_error_in_constant_outputs():
    ref = torch.tensor([[10.0, 10.5], [10.5, 10.0]]).double()  # a bias of 10, features of +-0.25
    y = ref + torch.tensor([[0.1, 0.0], [0.0, 0.0]])
    assert kernels.rel_err(y, ref) == pytest.approx(0.1 / 10.5)
    assert kernels.rel_err(y, ref, centered=True) == pytest.approx(0.1 / 0.25)
    same = torch.tensor([[0.07, -0.03]], dtype=torch.float64).repeat(4, 1)   # outputs ignoring the input
    rounded = same.float().double()                            # fp32 rounding: ~1e-9 apart
    assert kernels.rel_err(rounded, same, centered=True) < 1e-5
    assert kernels.rel_err(same + 0.01, same, centered=True) > 1.0   # a real error stays large


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_masked_conv(shape):
    x, weight, blocks, mask2d, masked, conv = make_case(shape, seed=1)
    ref = F.conv2d(x.double(), masked.double(), **conv)
    y = kernels.grouped_gemm_reference(x, weight, blocks, **conv)
    assert y.shape == ref.shape and rel_err(y, ref) < 1e-5
    y64 = kernels.grouped_gemm_reference(x.double(), weight.double(), blocks, **conv)
    assert rel_err(y64, ref) < 1e-12


@pytest.fixture
def poisoned(monkeypatch):
    """Every runner's output and scratch (kernels._new) starts as NaN: a value never written shows."""
    def nan_filled(x, shape, memory_format=torch.contiguous_format):
        return torch.full(shape, float("nan"), dtype=x.dtype,
                          device=x.device).contiguous(memory_format=memory_format)
    monkeypatch.setattr(kernels, "_new", nan_filled)


@pytest.mark.parametrize("memory_format", list(kernels.MEMORY_FORMATS))
@pytest.mark.parametrize("strategy", [None, *kernels.CANDIDATES["cpu"]])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_path_matches_masked_conv(shape, strategy, memory_format, poisoned):
    fmt = kernels.MEMORY_FORMATS[memory_format]
    x, weight, blocks, mask2d, masked, conv = make_case(shape, seed=2)
    x = x.contiguous(memory_format=fmt)
    ref = F.conv2d(x.double(), masked.double(), **conv)
    with torch.no_grad():
        y = kernels.RegroupedConv2d(weight, blocks, strategy=strategy, **conv)(x)
    assert y.shape == ref.shape and not torch.isnan(y).any() and rel_err(y, ref) < 1e-5
    empty = empty_rows(mask2d)
    assert len(empty) >= 1 and (y[:, empty] == 0).all()
    if x.shape[0] > 1:  # (N=1 tensors are contiguous in both formats)
        assert y.is_contiguous(memory_format=fmt) and kernels.memory_format_of(y) == fmt


ONE_WIDE_DILATED = """
import sys, torch, kernels
torch.manual_seed(0)
conv = torch.nn.Conv2d(8, 6, (3, 1), stride=(1, 2), padding=(1, 1), dilation=(1, 2))
blocks = [(torch.tensor(r), torch.tensor(c)) for r, c in [([0, 1, 2], [0, 3, 5, 9]), ([4, 5], [1, 2, 17])]]
x = torch.randn(2, 8, 3, 1)
ref = kernels.grouped_gemm_reference(x, conv.weight, blocks, conv.stride, conv.padding, conv.dilation)
ref += conv.bias[:, None, None]                    # every row has its bias, rows in no block too
for fmt in (torch.contiguous_format, torch.channels_last):
    for strategy in kernels.CANDIDATES["cpu"]:
        layer = kernels.RegroupedConv2d.from_conv(conv, blocks, strategy=strategy)
        with torch.no_grad():
            y = layer(x.contiguous(memory_format=fmt))
        assert kernels.rel_err(y, ref) < 1e-5, (fmt, strategy, kernels.rel_err(y, ref))
print("ok")
"""


@pytest.mark.slow
def test_a_dilated_size_1_kernel_side_on_a_1_pixel_wide_input_runs_on_every_cpu_path():
    # oneDNN crashes the process (SIGSEGV) on it in channels-last: hence a child process
    done = subprocess.run([sys.executable, "-c", ONE_WIDE_DILATED], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=TORCHRUN_TIMEOUT_S)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("strategy", kernels.CANDIDATES["cpu"])
def test_each_cpu_path_runs_with_grad_and_passes_the_dense_gradient_to_its_input(strategy):
    x, weight, blocks, _, masked, conv = make_case(SHAPES[0], seed=3, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = kernels.RegroupedConv2d(weight.double(), blocks, strategy=strategy, **conv)(x_ours)
    ref = F.conv2d(x_ref, masked.double(), **conv)
    (y * ref.detach()).sum().backward()
    (ref * ref.detach()).sum().backward()
    assert rel_err(y.detach(), ref.detach()) < 1e-12 and rel_err(x_ours.grad, x_ref.grad) < 1e-12


@pytest.mark.parametrize("strategy", [None, *kernels.CANDIDATES["cpu"]])
def test_a_layer_loading_the_state_of_other_blocks_of_the_same_buffer_shapes_runs_those_blocks(strategy):
    w, x = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    blocks_a = [(torch.tensor([0, 1]), torch.arange(0, 3)), (torch.tensor([2, 3]), torch.arange(3, 6))]
    blocks_b = [(torch.tensor([0]), torch.arange(0, 3)), (torch.tensor([2, 4, 5]), torch.arange(3, 6))]
    a = kernels.RegroupedConv2d(w, blocks_a, padding=1, strategy=strategy)
    with torch.no_grad():
        a(x)                                                  # a's paths are built for its own blocks
        a.load_state_dict(kernels.RegroupedConv2d(w, blocks_b, padding=1).state_dict())
        mask = torch.zeros(6, 36, dtype=torch.float64)                 # blocks_b by hand
        mask[0, 0:3] = mask[2, 3:6] = mask[4, 3:6] = mask[5, 3:6] = 1
        ref = F.conv2d(x, w * mask.view(w.shape), padding=1)
        assert rel_err(a(x), ref) < 1e-12 and a.info["flop_ratio"] == pytest.approx(4 * 3 / (6 * 36))


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
    for strategy in kernels.CANDIDATES["cpu"]:
        y = kernels.RegroupedConv2d(weight, blocks, strategy=strategy, **conv)(x)
        assert rel_err(y, ref) < 1e-12, strategy


def test_weights_outside_blocks_are_ignored():
    x, weight, blocks, mask2d, masked, conv = make_case(SHAPES[0], seed=4)
    noisy = weight + 100.0 * (1 - mask2d).view(weight.shape)  # only the mask's complement changes
    for strategy in kernels.CANDIDATES["cpu"]:
        y = kernels.RegroupedConv2d(noisy, blocks, strategy=strategy, **conv)(x)
        assert rel_err(y, F.conv2d(x, masked, **conv)) < 1e-5, strategy


@pytest.mark.parametrize("memory_format", list(kernels.MEMORY_FORMATS))
def test_each_builder_returns_all_its_runner_needs(memory_format, poisoned):
    """Each path from a fresh plan: its run gets only the plan's tensors and its build's return
    value, and must give the masked conv; its build changes neither the plan's info nor its tensors.
    (The kernel paths' tables run under the host emulation, below.)"""
    fmt = kernels.MEMORY_FORMATS[memory_format]
    x, weight, blocks, mask2d, masked, conv = make_case(SHAPES[1], seed=12, dtype=torch.float64)
    x, ref = x.contiguous(memory_format=fmt), F.conv2d(x, masked, **conv)
    pairs = tuple((v, v) for v in (conv["stride"], conv["padding"], conv["dilation"]))
    for name, path in kernels.PATHS.items():
        info, t = kernels.make_plan(weight, kernels.check_blocks(tuple(weight.shape), blocks))
        info_before, t_before = copy.deepcopy(info), {k: v.clone() for k, v in t.items()}
        p = path.build(info, t)
        assert info == info_before, f"{name}: its build wrote into info"
        assert t.keys() == t_before.keys() and all(torch.equal(t[k], t_before[k]) for k in t), name
        if "cpu" in path.devices:
            y = path.run(x, info, t, p, pairs)
            assert rel_err(y, ref) < 1e-12 and kernels.memory_format_of(y) == fmt, name
            assert (y[:, empty_rows(mask2d)] == 0).all(), name


def test_every_device_measures_dense_and_the_gpu_both_kernel_tiles(capsys):
    assert all("dense" in paths for paths in kernels.CANDIDATES.values())  # never slower than dense
    assert {f"kernel{r}" for r in kernels.KERNEL_TILE_ROWS} <= set(kernels.CANDIDATES["cuda"])
    x = torch.randn(1, 2, 3, 3)
    assert kernels.candidate_paths(x) == ("dense", "conv", "grouped", "gather")  # no kernel on the CPU
    meta = torch.empty(1, 2, 3, 3, device="meta")
    assert kernels.candidate_paths(meta) == kernels.candidate_paths(meta) == kernels.candidate_paths(x)
    assert capsys.readouterr().err.count("WARNING: no paths are listed for meta tensors") == 1


def fake_clock(monkeypatch, ticks):
    """time.perf_counter in kernels advances by ticks[path] (10 for others) during each run of that path."""
    clock = [0]

    def ticking(name, run):
        def run_and_tick(*args):
            clock[0] += ticks.get(name, 10)
            return run(*args)
        return run_and_tick
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    for name, path in list(kernels.PATHS.items()):
        monkeypatch.setitem(kernels.PATHS, name, dataclasses.replace(path, run=ticking(name, path.run)))


def small_layer(seed=0, **kw):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(seed))
    blocks = [(torch.arange(8), torch.arange(9)), (torch.arange(8, 15), torch.arange(9, 40))]
    masked = w * kernels.block_mask(w.shape, blocks)
    return kernels.RegroupedConv2d(w, blocks, padding=1, **kw), masked


def built_paths(layer):
    """Which paths' tensors a layer holds (its buffers are named <path>_<key>)."""
    return {n.split("_")[0] for n, _ in layer.named_buffers()} & set(kernels.PATHS)


def test_measured_choice_is_the_fastest_candidate_and_the_others_are_freed(monkeypatch):
    fake_clock(monkeypatch, {"dense": 5, "conv": 4, "grouped": 1, "gather": 3})
    layer, masked = small_layer()
    x = torch.randn(2, 8, 6, 6)
    assert layer.path_for(x) is None and built_paths(layer) == set()
    with torch.no_grad():
        y = layer(x)
    key = kernels.choice_key(x)
    assert set(layer.info["times"][key]) == {"dense", "conv", "grouped", "gather"}
    assert layer.info["times"][key]["grouped"] == 1e3 and layer.path_for(x) == "grouped"  # ms
    assert built_paths(layer) == {"grouped"} and "2x8x6x6 contiguous float32 cpu: grouped" in repr(layer)
    assert rel_err(y, F.conv2d(x, masked, padding=1)) < 1e-5


def test_an_input_that_needs_a_gradient_never_gets_the_inference_only_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "cuda_extension", lambda: object())   # as if the extension were built
    x = torch.randn(2, 8, 6, 6, dtype=torch.float16)
    assert kernels._kernel_ready(x) and not kernels._kernel_ready(x.requires_grad_())
    with torch.no_grad():
        assert kernels._kernel_ready(x) and kernels.choice_key(x) == kernels.choice_key(x.detach())
    assert kernels.choice_key(x)[-1] == "grad"                   # measured apart from the no-grad kind
    layer, masked = small_layer(strategy="kernel32")
    with pytest.raises(ValueError, match="inference only"):
        layer(x)


@pytest.mark.parametrize("strategy", [None, "dense", "conv", "grouped", "gather"])
def test_a_layer_first_run_under_inference_mode_still_trains_afterwards(strategy):
    layer, masked = small_layer(**({} if strategy is None else dict(strategy=strategy)))
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():                                 # as the README's evaluation does
        layer(x)
    x.requires_grad_()
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.conv2d(x_ref, masked, padding=1).square().sum().backward()   # the masked dense conv's gradient
    assert rel_err(x.grad, x_ref.grad) < 1e-5


@pytest.mark.parametrize("strategy", [None, "dense", "conv", "grouped", "gather"])
def test_every_path_refuses_an_input_of_other_channels_or_smaller_than_the_kernel(strategy):
    layer, _ = small_layer(**({} if strategy is None else dict(strategy=strategy)))   # C = 8, 3x3, pad 1
    for x, says in ((torch.randn(2, 6, 5, 5), r"an input of shape \(N, 8, H, W\), got \(2, 6, 5, 5\)"),
                    (torch.randn(8, 5, 5), r"got \(8, 5, 5\)"),
                    (torch.randn(2, 8, 0, 5), r"larger than the padded input \(0, 5\)")):
        with pytest.raises(ValueError, match=says):
            layer(x)


def test_blocks_of_bool_or_float_indices_are_refused_not_cast():
    with pytest.raises(ValueError, match="conv: block 0 must hold integer indices, got torch.bool rows"):
        kernels.check_blocks((4, 6, 3, 3), [(torch.tensor([False, True]), [0, 2])])   # a row mask, not rows
    with pytest.raises(ValueError, match="torch.float32 cols"):
        kernels.check_blocks((4, 6, 3, 3), [([1], [0.7, 2.2])])
    [(rows, cols)] = kernels.check_blocks((4, 6, 3, 3), [(np.array([1, 0]), [5, 2]), ([], [])])
    assert rows.tolist() == [0, 1] and cols.tolist() == [2, 5] and rows.dtype == torch.int64


def test_the_kernel_refuses_a_kernel_larger_than_the_padded_input():
    layer, _ = small_layer(strategy="kernel32")                  # 3x3, padding 1
    layer.padding = (0, 0)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(3x3, .* larger than the padded input \(2, 2\)"):
        layer(torch.randn(1, 8, 2, 2, dtype=torch.float16))


def test_choice_is_measured_once_per_shape_format_and_dtype(monkeypatch):
    layer, masked = small_layer()
    calls = []
    real = kernels.measure_paths
    monkeypatch.setattr(kernels, "measure_paths",
                        lambda runs, device: calls.append(list(runs)) or real(runs, device))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for inp in (x, x, x.contiguous(memory_format=torch.channels_last), x.double(), x[:1], x[:1]):
            y = layer.double()(inp) if inp.dtype == torch.float64 else layer.float()(inp)
            assert rel_err(y, F.conv2d(inp.double(), masked.double(), padding=1)) < 1e-5
    assert len(calls) == 4 and len(layer.info["choice"]) == 4
    assert built_paths(layer) == set(layer.info["choice"].values())  # only what some input chose


def test_forced_path_runs_without_measuring(monkeypatch):
    monkeypatch.setattr(kernels, "measure_paths", lambda *a: pytest.fail("a forced path is never measured"))
    layer, masked = small_layer(strategy="conv")
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert rel_err(layer(x), F.conv2d(x, masked, padding=1)) < 1e-5
    assert built_paths(layer) == {"conv"} and "path=conv (forced)" in repr(layer)
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        small_layer(strategy="fast")
    with pytest.raises(ValueError, match="emulated_grouped_conv2d"):
        small_layer(strategy="kernel32")[0](x)


def test_load_state_dict_drops_built_paths_and_runs_the_new_weights():
    layer, _ = small_layer(seed=0)
    other, masked = small_layer(seed=1)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        layer(x)
        assert built_paths(layer) == {layer.path_for(x)}
        layer.load_state_dict(other.state_dict())
        assert built_paths(layer) == set()
        assert rel_err(layer(x), F.conv2d(x, masked, padding=1)) < 1e-5  # not the old weights


def test_a_copy_or_a_cast_of_a_layer_runs_its_own_tensors():
    layer, masked = small_layer(seed=0, strategy="dense")
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = layer(x)                                           # keeps a runner bound to its tensors
        clone = copy.deepcopy(layer)
        clone.load_state_dict(small_layer(seed=1)[0].state_dict())
        assert torch.equal(layer(x), y) and not torch.equal(clone(x), y)
        assert pickle.loads(pickle.dumps(layer))(x).equal(y)
        assert layer.double()(x.double()).dtype == torch.float64 and layer.float()(x).equal(y)


def test_regrouped_conv_holds_less_than_the_dense_conv(monkeypatch):
    """512x512x3x3 at 10% density (8 blocks of 64 rows x 51 input channels): the packed blocks and
    index tables, then those plus the chosen path's tensors; a dense copy only while measuring."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 512, 3, 3, generator=g)
    blocks = [(torch.arange(64 * i, 64 * i + 64),
               (torch.randperm(512, generator=g)[:51].sort().values[:, None] * 9 + torch.arange(9)).view(-1))
              for i in range(8)]
    dense_bytes = w.numel() * w.element_size()                                  # 9.4 MB
    layer = kernels.RegroupedConv2d(w, blocks, padding=1)
    held = lambda: sum(b.numel() * b.element_size() for b in layer.buffers())   # noqa: E731
    assert 0.1 * dense_bytes < held() < 0.11 * dense_bytes                      # 10% packed, tiny tables
    monkeypatch.setattr(kernels, "measure_paths",                               # conv wins, all were built
                        lambda runs, device: {p: 1.0 if p == "conv" else 2.0 for p in runs})
    x = torch.randn(1, 512, 4, 4, generator=g)
    with torch.no_grad():
        y = layer(x)
    assert layer.path_for(x) == "conv" and built_paths(layer) == {"conv"}
    assert held() < 0.21 * dense_bytes                                          # + the per-block conv weights
    masked = w * kernels.block_mask(w.shape, blocks)
    assert rel_err(y, F.conv2d(x, masked, padding=1)) < 1e-5


def test_measure_paths_warms_up_interleaves_takes_the_median_and_drops_the_hopeless(monkeypatch):
    monkeypatch.setattr(kernels, "MEASURE_WARMUP", 1)
    monkeypatch.setattr(kernels, "MEASURE_RUNS", 3)
    monkeypatch.setattr(kernels, "MEASURE_CUTOFF", 3.0)
    clock, calls = [0], []
    seconds = {"a": iter([9, 2, 2, 3]), "b": iter([9, 1, 5, 1]), "c": iter([9, 4])}  # warmup first

    def run(name):
        def fn():
            calls.append(name)
            clock[0] += next(seconds[name])
        return fn
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    times = kernels.measure_paths({name: run(name) for name in seconds}, torch.device("cpu"))
    # c took 4 > 3.0 x 1 s in the first timed round: not run again; b's median is 1 s (its mean is not)
    assert calls == ["a", "b", "c", "a", "b", "c", "a", "b", "a", "b"]
    assert times == {"a": 2e3, "b": 1e3, "c": 4e3}
    clock[0], calls[:] = 0, []                                 # dense: never dropped, one slow spell or not
    seconds = {"dense": iter([9, 40, 5, 5]), "b": iter([9, 1, 1, 1])}
    assert kernels.measure_paths({name: run(name) for name in seconds}, "cpu") == {"dense": 5e3, "b": 1e3}


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


class OpRecorder(TorchDispatchMode):
    """Every ATen op dispatched inside it, with the shape, strides and dtype of its tensor arguments: what a
    device is asked to run (a GPU launches a kernel per op), observed on the CPU."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [(tuple(a.shape), a.stride(), a.dtype) for a in args if torch.is_tensor(a)]
        self.ops.append((str(func), tensors))
        return func(*args, **(kwargs or {}))


def test_a_regrouped_model_whose_layers_run_dense_dispatches_exactly_the_dense_models_ops(monkeypatch):
    """Never slower than dense, op for op: where every layer chose dense, the regrouped model asks the
    device for the same convolutions, on the same shapes, strides (memory format) and dtypes, and nothing
    more, so cuDNN / oneDNN get the same calls as for the masked dense model."""
    fake_clock(monkeypatch, {"dense": 1})                    # every layer measures dense the fastest
    model, blocks, _ = tiny_model_and_blocks()
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in kernels.MEMORY_FORMATS.values():
            dense = kernels.masked_model(model, blocks).to(dtype, memory_format=fmt)
            regrouped = kernels.regrouped_model(model, blocks).to(dtype, memory_format=fmt)
            x = torch.randn(2, 3, 16, 16).to(dtype).contiguous(memory_format=fmt)
            recorders = OpRecorder(), OpRecorder()
            with torch.no_grad():
                regrouped(x)                                     # measures its paths
                for net, recorder in zip((dense, regrouped), recorders):
                    with recorder:
                        net(x)
            layers = [m for m in regrouped.modules() if isinstance(m, kernels.RegroupedConv2d)]
            assert len(layers) == 3 and [list(m.info["choice"].values()) for m in layers] == [["dense"]] * 3
            assert recorders[0].ops == recorders[1].ops
            assert sum("convolution" in op for op, _ in recorders[1].ops) == 3


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


def test_regrouped_conv_stores_packed_blocks_and_adds_the_bias_on_every_path():
    model, blocks, masks = tiny_model_and_blocks()
    conv, mask2d = model.body[4], masks["body.4.weight"]
    sd = kernels.RegroupedConv2d.from_conv(conv, blocks["body.4.weight"], name="body.4.weight").state_dict()
    assert set(sd) == {"bias", "block_sizes", "plan_packed", "plan_rows", "plan_cols"}
    assert sd["plan_packed"].numel() == int(mask2d.sum())
    x = torch.randn(3, 10, 5, 6)
    ref = F.conv2d(x, conv.weight * mask2d.view(conv.weight.shape), conv.bias)
    with torch.no_grad():
        for strategy in (None, *kernels.CANDIDATES["cpu"]):
            layer = kernels.RegroupedConv2d.from_conv(conv, blocks["body.4.weight"], strategy=strategy)
            y1, y2 = layer(x), layer(x)
            # the bias added once, to a new y
            assert rel_err(y1, ref) < 1e-5 and torch.equal(y1, y2), strategy


def test_regrouped_model_rejects_tickets_that_do_not_fit():
    model, blocks, _ = tiny_model_and_blocks()
    with pytest.raises(ValueError, match="body.9.weight"):
        kernels.regrouped_model(model, {**blocks, "body.9.weight": blocks["stem.weight"]})
    with pytest.raises(ValueError, match="fc.weight"):
        kernels.regrouped_model(model, {"fc.weight": [(torch.tensor([0]), torch.tensor([0]))]})
    with pytest.raises(ValueError, match="body.4.weight.*row index 7"):
        kernels.regrouped_model(model, {"body.4.weight": [(torch.tensor([7]), torch.tensor([0]))]})


# The benches under a fake clock (fake_clock) and a planted bug: what they time, check and report,
# against the test's own masks and MAC counts.
TINY_MACS = {"stem.weight": 12 * 3 * 9 * 16 * 16,   # TinyCNN on 16x16 images: out channels x in x k*k x OH*OW
             "body.2.weight": 10 * 12 * 9 * 8 * 8,  # (stride 2)
             "body.4.weight": 7 * 10 * 1 * 8 * 8}


def planted_bug(monkeypatch, name, offset=1.0):
    """Path `name` adds `offset` to every output: wrong on purpose."""
    path = kernels.PATHS[name]
    monkeypatch.setitem(kernels.PATHS, name, dataclasses.replace(path, run=lambda *a: path.run(*a) + offset))


def fake_timing(monkeypatch, ms=(3.0, 1.5), spread=0.0):
    """kernels.time_spread calls every fn once and says they took `ms` (median; min and max `spread`
    either side); returns their outputs per call. (time_interleaved takes its medians.)"""
    outputs = []

    def run_once(fns, device, repeats, warmup):
        outputs.append([fn() for fn in fns])
        return [{"min": m - spread, "median": m, "max": m + spread} for m in ms]
    monkeypatch.setattr(kernels, "time_spread", run_once)
    return outputs


def test_bench_layers_times_the_masked_conv_and_the_fastest_path_on_the_real_activations(monkeypatch):
    model, blocks, masks = tiny_model_and_blocks()
    fake_clock(monkeypatch, {"gather": 1})  # gather is the fastest candidate of every layer...
    planted_bug(monkeypatch, "gather")      # ... and off by one
    timed = fake_timing(monkeypatch)
    rows = kernels.bench_layers(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16))
    assert [r["name"] for r in rows] == list(blocks) and len(timed) == len(rows)
    assert [r["input_hw"] for r in rows] == [(16, 16), (16, 16), (8, 8)]  # body.2 has stride 2
    for r, (dense_y, layer_y), mask2d in zip(rows, timed, masks.values()):
        assert r["path"] == "gather" and (layer_y - dense_y - 1).abs().max() < 1e-5  # dense, then the layer
        # the bug is reported
        assert (r["dense_ms"], r["regrouped_ms"]) == (3.0, 1.5) and r["max_rel_err"] > 0.1
        assert (r["speedup"], r["noisy"], r["dense_range_ms"]) == (2.0, False, "3-3")
        assert r["flop_ratio"] == pytest.approx(mask2d.mean().item())
        assert r["candidates"] == "dense 1e+04, conv 1e+04, grouped 1e+04, gather 1e+03"  # fake_clock's ticks


def test_bench_model_reports_the_chosen_paths_the_conv_macs_and_a_wrong_path(monkeypatch):
    model, blocks, masks = tiny_model_and_blocks()
    fake_clock(monkeypatch, {"gather": 1})
    fake_timing(monkeypatch)
    bench = functools.partial(kernels.bench_model, model, blocks, batch_size=4, repeats=1,
                              input_size=(3, 16, 16))
    total = bench()
    assert (total["paths"] == "gather 3" and total["max_rel_err"] < 1e-5
            and total["memory_format"] == "contiguous")
    ratio = sum(masks[n].mean().item() * macs for n, macs in TINY_MACS.items()) / sum(TINY_MACS.values())
    assert total["conv_flop_ratio"] == pytest.approx(ratio)
    planted_bug(monkeypatch, "gather")
    assert bench()["max_rel_err"] > 0.1


def test_regrouped_model_in_channels_last_equals_masked_dense_model():
    model, blocks, _ = tiny_model_and_blocks()
    cl = torch.channels_last
    x = torch.randn(4, 3, 15, 15)
    with torch.no_grad():
        ref = kernels.masked_model(model, blocks).double()(x.double())
        regrouped = kernels.regrouped_model(model, blocks).to(memory_format=cl)
        for m in regrouped.modules():
            if isinstance(m, kernels.RegroupedConv2d):
                m.info["forced"] = "conv"  # the channels-last per-block path, whatever measurement picks
        inner = []
        regrouped.body[2].register_forward_hook(lambda m, i, o: inner.append(o))
        y = regrouped(x.contiguous(memory_format=cl))
    assert rel_err(y, ref) < 1e-5
    assert kernels.memory_format_of(inner[0]) == cl  # the activations stay channels-last
    rows = kernels.bench_layers(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16),
                                memory_format=cl)
    assert all(r["max_rel_err"] < 1e-5 for r in rows)
    total = kernels.bench_model(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16),
                                memory_format=cl)
    assert total["max_rel_err"] < 1e-5 and total["memory_format"] == "channels_last"


# ---- the dense path costs what F.conv2d costs; never slower than dense; the benches' dtype and spread ----

def spy_conv2d(monkeypatch):
    """F.conv2d records (weight memory format, bias given) of every call in the returned list, then runs."""
    calls, real = [], F.conv2d

    def spy(x, weight, bias=None, *args, **kw):
        calls.append((kernels.memory_format_of(weight), bias is not None))
        return real(x, weight, bias, *args, **kw)
    monkeypatch.setattr(F, "conv2d", spy)
    return calls


@pytest.mark.parametrize("memory_format", list(kernels.MEMORY_FORMATS))
def test_dense_and_grouped_paths_run_the_weight_in_the_input_format_with_the_bias_inside(memory_format,
                                                                                         monkeypatch):
    fmt = kernels.MEMORY_FORMATS[memory_format]
    w, bias = torch.randn(16, 8, 3, 3), torch.randn(16)
    # row 15: no block
    blocks = [(torch.arange(8), torch.arange(9)), (torch.arange(8, 15), torch.arange(9, 40))]
    masked = w * kernels.block_mask(w.shape, blocks)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=fmt)
    ref = F.conv2d(x.double(), masked.double(), bias.double(), padding=1)       # before the spy
    plain = F.conv2d(x, masked.contiguous(memory_format=fmt), bias, padding=1)
    calls = spy_conv2d(monkeypatch)
    dense = kernels.RegroupedConv2d(w, blocks, bias, padding=1, strategy="dense")
    with torch.no_grad():
        y1, y2 = dense(x), dense(x)                                             # the second: the kept runner
    assert calls == [(fmt, True), (fmt, True)]                                  # one conv each, bias inside
    assert rel_err(y1, ref) < 1e-6 and torch.equal(y1, y2) and kernels.memory_format_of(y1) == fmt
    assert torch.equal(y1, plain)                                               # F.conv2d's very values
    grouped = kernels.RegroupedConv2d(w, blocks, bias, padding=1, strategy="grouped")
    with torch.no_grad():
        y = grouped(x)
    # the bias in its grouped conv
    assert calls[2:] == [(torch.channels_last, True)] and rel_err(y, ref) < 1e-6
    assert torch.equal(y[:, 15], bias[15].expand(2, 6, 6))                      # a row in no block: its bias


def test_choice_rule_never_picks_a_path_slower_than_dense(monkeypatch):
    margin = kernels.PATH_MARGIN
    assert kernels.choose_path({"dense": 1.0, "grouped": 0.5, "conv": 0.7}) == "grouped"
    assert kernels.choose_path({"dense": 1.0, "conv": 1.2}) == "dense"
    # a near-tie: dense
    assert kernels.choose_path({"dense": 1.0, "gather": 1.0 / (1 + margin / 2)}) == "dense"
    assert kernels.choose_path({"dense": 1.0, "gather": 1.0 / (1 + 2 * margin)}) == "gather"
    g = torch.Generator().manual_seed(0)
    for _ in range(200):                                       # planted times: the choice's median <= dense's
        times = dict(zip(("dense", "conv", "grouped", "gather"), (0.5 + torch.rand(4, generator=g)).tolist()))
        assert times[kernels.choose_path(times)] <= times["dense"]
    # 2% faster: inside the margin
    fake_clock(monkeypatch, {"dense": 100, "conv": 99, "grouped": 98, "gather": 300})
    layer, masked = small_layer()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = layer(x)
    times = layer.info["times"][kernels.choice_key(x)]
    # all recorded
    assert layer.path_for(x) == "dense" and set(times) == {"dense", "conv", "grouped", "gather"}
    assert times["grouped"] < times["dense"] and rel_err(y, F.conv2d(x, masked, padding=1)) < 1e-5


def test_a_cuda_sample_spans_many_calls_and_the_cpu_times_one(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    fn = lambda: calls.append(1) or clock.__setitem__(0, clock[0] + 0.002)  # noqa: E731 -- 2 ms a call
    assert kernels.calls_per_sample(fn, "cpu") == 1 and calls == []
    assert kernels.time_once_ms(fn, "cpu", calls=5) == pytest.approx(2.0) and len(calls) == 5  # the mean
    monkeypatch.setattr(kernels, "time_once_ms", lambda fn, device, calls=1: 0.004)   # a 4 us kernel on CUDA
    assert kernels.calls_per_sample(fn, "cuda") == math.ceil(kernels.CUDA_SAMPLE_MS / 0.004)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bench_dtype_reaches_the_model_and_the_input(dtype, monkeypatch):
    model, blocks, _ = tiny_model_and_blocks()
    try:
        kernels.check_dtype("cpu", dtype)
    except ValueError as e:                                  # fp16 convs on a CPU without them: a clear error
        assert "float16 convs do not run on this cpu" in str(e)
        return
    timed = fake_timing(monkeypatch)
    monkeypatch.setattr(kernels, "measure_paths", lambda runs, device: {p: 1.0 for p in runs})  # a tie: dense
    rows = kernels.bench_layers(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16), dtype=dtype)
    assert all(r["dtype"] == str(dtype)[6:] for r in rows)
    assert all(y.dtype == dtype for ys in timed for y in ys)  # dense conv and the layer ran in dtype
    total = kernels.bench_model(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16), dtype=dtype)
    # both models
    assert total["dtype"] == str(dtype)[6:] and timed[-1][0].dtype == timed[-1][1].dtype == dtype


def test_bench_dtype_that_does_not_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(F, "conv2d", lambda *a, **kw: (_ for _ in ()).throw(
        RuntimeError('"slow_conv2d" not implemented for \'Half\'')))
    with pytest.raises(ValueError, match="float16 convs do not run on this cpu "
                                         ".*slow_conv2d.*another precision"):
        kernels.check_dtype("cpu", torch.float16)


def test_graphs_are_skipped_cleanly_without_cuda(monkeypatch):
    model, blocks, _ = tiny_model_and_blocks()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA GPU"):
        kernels.cuda_graph(lambda: None)
    fake_timing(monkeypatch)
    total = kernels.bench_model(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16))
    assert total["timing"] == "eager" and not any(k.startswith("graph_") for k in total)
    assert total["device"].startswith("cpu") and total["torch"] == torch.__version__


def test_bench_rows_with_a_spread_larger_than_the_effect_are_noisy_and_same_paths_say_so(monkeypatch):
    tight, wide = {"min": 1.9, "median": 2.0, "max": 2.1}, {"min": 0.5, "median": 1.8, "max": 4.0}
    assert not kernels.is_noisy(tight, {"min": 0.9, "median": 1.0, "max": 1.1})  # 1 ms apart, 0.2 spread
    assert kernels.is_noisy(tight, wide)                                            # 0.2 ms apart, 3.5 spread
    model, blocks, _ = tiny_model_and_blocks()
    fake_clock(monkeypatch, {"gather": 1})                     # gather wins every layer
    fake_timing(monkeypatch, ms=(3.0, 2.5), spread=1.0)        # 0.5 ms effect, 2 ms spread
    rows = kernels.bench_layers(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16))
    assert all(r["noisy"] and r["speedup"] == 1.2 and r["regrouped_range_ms"] == "1.5-3.5" for r in rows)
    fake_clock(monkeypatch, {"dense": 1})                      # now dense wins: both sides run the same conv
    fake_timing(monkeypatch, ms=(3.0, 1.0))
    rows = kernels.bench_layers(model, blocks, batch_size=2, repeats=1, input_size=(3, 16, 16))
    assert all(r["path"] == "dense" and r["speedup"] == kernels.SAME_PATH and not r["noisy"] for r in rows)


def test_bench_saving_counts_a_layer_run_dense_on_both_sides_as_no_saving():
    """Two timings of the same conv differ by noise: a "same path" layer saves nothing, whatever they say."""
    layers = [{"name": "a", "flop_ratio": 0.2, "dense_ms": 4.0, "regrouped_ms": 2.0, "speedup": 2.0,
               "path": "gather"},
              {"name": "b", "flop_ratio": 0.5, "dense_ms": 6.0, "regrouped_ms": 3.0,
               "speedup": kernels.SAME_PATH, "path": "dense"}]
    bench = {"device": "cpu", "date": "d", "runs": [{"batch": 64, "layers": layers}]}
    rows = lth_tools.bench_layers_of(bench["runs"][0])
    assert [(r["speedup"], r["regrouped_ms"]) for r in rows] == [(2.0, 2.0), (1.0, 6.0)]
    assert lth_tools.bench_saving(bench)["conv"] == pytest.approx(1 - (2.0 + 6.0) / (4.0 + 6.0))



def test_a_saving_timed_in_the_papers_profile_names_its_image_size():
    layers = [{"name": "a", "flop_ratio": 0.2, "dense_ms": 4.0, "regrouped_ms": 2.0}]
    bench = lambda setting: {"device": "cpu", "date": "d", "setting": setting,
                             "runs": [{"batch": 64, "layers": layers}]}
    paper = lth_tools.saving_text([lth_tools.bench_saving(bench("paper (batch 64, 127x127, conv only)"))])
    assert paper == "50.0% conv layers (batch 64, 127x127, cpu, d)"      # the paper's Sec. A1 profile
    images = lth_tools.saving_text([lth_tools.bench_saving(bench("dataset images"))])
    assert images == "50.0% conv layers (batch 64, cpu, d)"


def test_a_saving_measured_within_the_noise_says_so():
    layers = [{"name": "a", "flop_ratio": 0.2, "dense_ms": 4.0, "regrouped_ms": 2.0, "noisy": True},
              {"name": "b", "flop_ratio": 0.5, "dense_ms": 6.0, "regrouped_ms": 6.1, "noisy": True,
               "speedup": kernels.SAME_PATH},                   # the same conv twice: its noise is no claim
              {"name": "c", "flop_ratio": 0.5, "dense_ms": 6.0, "regrouped_ms": 3.0, "noisy": False}]
    bench = lambda noisy: {"device": "cpu", "date": "d", "runs": [{"batch": 64, "layers": layers, "model": {
        "dense_ms": 20.0, "regrouped_ms": 15.0, "noisy": noisy}}]}
    text = lth_tools.saving_text([lth_tools.bench_saving(bench(True))])
    assert "% conv layers (1 noisy layer), 25.0% end to end (noisy) (batch 64" in text
    assert "noisy" not in lth_tools.saving_text([lth_tools.bench_saving(
        {**bench(False), "runs": [{**bench(False)["runs"][0], "layers": layers[1:]}]})])


# ---- CUDA: tables (CPU), compile check (nvcc), kernel (GPU only) ----

KERNEL_PATHS = [f"kernel{r}" for r in kernels.KERNEL_TILE_ROWS]


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_cuda_tables_cover_every_block_row_once(path):
    """Run the kernel's tile loop in torch on its path's tables: it must reproduce the masked conv."""
    x, weight, blocks, _, masked, conv = make_case(SHAPES[5], seed=5)
    info, t = kernels.make_plan(weight, kernels.check_blocks(tuple(weight.shape), blocks))
    p = kernels.PATHS[path].build(info, t)
    meta, tiles, rows, tile = p["meta"].tolist(), p["tiles"].tolist(), p["rows"].long(), p["tile_rows"]
    _, _, kh, kw = weight.shape
    c, ky, kx, used = p["cols"].long().unbind(1)  # per padded column: (c, ky, kx, 1), padding (0, 0, 0, 0)
    # (N, K', L)
    x_cols = F.unfold(x, weight.shape[2:], **conv)[:, c * kh * kw + ky * kw + kx] * used[:, None]
    y = torch.zeros(x.shape[0], weight.shape[0], x_cols.shape[2])
    for b, row0 in tiles:
        r_start, n_rows, c_start, n_cols, w_off, _ = meta[b]
        padded_rows = -(-n_rows // tile) * tile
        wb = p["weights"][w_off:w_off + padded_rows * n_cols].view(padded_rows, n_cols)
        r = torch.arange(row0, min(row0 + tile, n_rows))
        y[:, rows[r_start + r]] += wb[r] @ x_cols[:, c_start:c_start + n_cols]
    ref = F.conv2d(x, masked, **conv)
    assert rel_err(y.view(ref.shape), ref) < 1e-5
    assert len(tiles) == sum(-(-len(r) // p["tile_rows"]) for r, _ in blocks)  # ceil(rows / tile) per block


def test_cuda_tables_flag_vector_blocks():
    """A block is flagged for 16-byte copies exactly when its columns are whole aligned runs of 8 channels
    at one (ky, kx); the columns of a flagged block come (ky, kx, c) ascending."""
    kh = kw = 3
    def cols(chans, positions):  # flattened (c, ky, kx) indices
        return torch.tensor([c * kh * kw + p for c in chans for p in positions])
    blocks = [(torch.arange(0, 4), cols(range(8, 16), range(9))),      # aligned runs: vector
              (torch.arange(4, 8), cols(range(4, 12), [0, 5])),        # 8 channels, not from a multiple of 8
              (torch.arange(8, 12), cols(range(0, 8), [0, 1, 2])[:-1]),  # one column short of whole runs
              (torch.arange(12, 16), cols(range(16), [4]))]             # two runs at one position: vector
    weight = torch.randn(16, 16, kh, kw)
    info, t = kernels.make_plan(weight, kernels.check_blocks(tuple(weight.shape), blocks))
    p = kernels.PATHS["kernel32"].build(info, t)
    assert p["meta"][:, 5].tolist() == [1, 0, 0, 1]
    first = p["cols"][p["meta"][0, 2]:p["meta"][0, 2] + 8].tolist()
    assert first == [[c, 0, 0, 1] for c in range(8, 16)]  # position (0, 0) first, channels ascending


# load_inline's flags for nvcc that change what CUDA_SRC means (torch's half/bf16 operators off)
NVCC_TORCH_FLAGS = ["-std=c++20", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_source_compiles_without_spills(tmp_path):
    src = tmp_path / "grouped_gemm.cu"
    src.write_text(kernels.CUDA_SRC)
    res = subprocess.run(["nvcc", "-arch=sm_90", "-c", "-Xptxas", "-v", *NVCC_TORCH_FLAGS, str(src),
                          "-o", str(tmp_path / "grouped_gemm.o")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    assert len(spills) == 6  # {float, half, bf16} x {32x128, 64x64} tiles
    assert all(s == ("0", "0") for s in spills), res.stderr


def cuda_include_dir():
    """The CUDA toolkit's include folder, as nvcc reports it (nvcc may be a wrapper script)."""
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "e.cu"), "w").close()
        res = subprocess.run(["nvcc", "--dryrun", "-c", os.path.join(tmp, "e.cu")],
                             capture_output=True, text=True)
    found = re.search(r'INCLUDES="-I([^"]+?)"', res.stdout + res.stderr)
    return found.group(1).strip() if found else None


@pytest.mark.slow
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("nvcc", "g++", "nm")),
                    reason="nvcc, g++ or nm not found")
def test_cuda_binding_compiles_and_links_to_the_kernel(tmp_path):
    """CPP_SRC (with the pybind module load_inline appends) compiles with g++ against torch's headers,
    and the launcher it calls is the very symbol nvcc's object of CUDA_SRC defines: a signature change
    on one side only fails here, not on a GPU machine's first build. The CPU wheel lacks one generated
    header of c10/cuda; an empty stand-in takes its place."""
    from torch.utils.cpp_extension import include_paths
    include, cuda_include = include_paths(), cuda_include_dir()
    assert cuda_include and os.path.exists(os.path.join(cuda_include, "cuda_runtime.h"))
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    (tmp_path / "b.cpp").write_text(kernels.CPP_SRC + "\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
                                    'm.def("grouped_conv2d_cuda", '
                                    'torch::wrap_pybind_function(grouped_conv2d_cuda));\n}\n')
    (tmp_path / "k.cu").write_text(kernels.CUDA_SRC)
    flags = [f"-I{p}"
             for p in (tmp_path / "stub", *include, sysconfig.get_paths()["include"], cuda_include)]
    builds = [["g++", "-std=c++20", "-c", "-fPIC", *flags, "-DTORCH_EXTENSION_NAME=lth_check",
               str(tmp_path / "b.cpp"), "-o", str(tmp_path / "b.o")],
              ["nvcc", "-arch=sm_90", "-c", *NVCC_TORCH_FLAGS, str(tmp_path / "k.cu"),
               "-o", str(tmp_path / "k.o")]]
    for cmd in builds:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    symbols = {o: subprocess.run(["nm", str(tmp_path / o)], capture_output=True, text=True).stdout
               for o in ("b.o", "k.o")}
    needed = re.findall(r" U (\S*grouped_conv2d_launch\S*)", symbols["b.o"])
    defined = re.findall(r" T (\S*grouped_conv2d_launch\S*)", symbols["k.o"])
    assert len(needed) == 1 and needed == defined



cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


GPU_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # TF32 / half inputs, max |ref|


@cuda
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype", list(GPU_TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_matches_reference(shape, dtype, path):
    x, weight, blocks, mask2d, masked, conv = make_case(shape, seed=6)
    assert kernels.cuda_extension() is not None
    ref = F.conv2d(x.double(), masked.double(), **conv)
    layer = kernels.RegroupedConv2d(weight, blocks, None, name="t", strategy=path, **conv).cuda().to(dtype)
    y = layer(x.cuda().to(dtype))
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y.cpu(), ref) < GPU_TOL[dtype]
    assert (y[:, empty_rows(mask2d).cuda()] == 0).all()
    y_cl = layer(x.cuda().to(dtype).contiguous(memory_format=torch.channels_last))
    assert torch.equal(y_cl, y) and kernels.memory_format_of(y_cl) == kernels.memory_format_of(
        x.contiguous(memory_format=torch.channels_last))  # same values, the input's layout


@cuda
@pytest.mark.parametrize("dtype", list(GPU_TOL))
def test_cuda_paths_match_reference_and_all_are_measured(dtype):
    x, weight, blocks, _, masked, conv = make_case(SHAPES[5], seed=9)
    ref = F.conv2d(x.double(), masked.double(), **conv)
    xc = x.cuda().to(dtype)
    with torch.no_grad():
        for path in kernels.CANDIDATES["cuda"]:
            layer = kernels.RegroupedConv2d(weight, blocks, strategy=path, **conv).cuda().to(dtype)
            assert rel_err(layer(xc).cpu(), ref) < GPU_TOL[dtype], path
        layer = kernels.RegroupedConv2d(weight, blocks, **conv).cuda().to(dtype)
        assert rel_err(layer(xc).cpu(), ref) < GPU_TOL[dtype]
    assert set(layer.info["times"][kernels.choice_key(xc)]) == set(kernels.CANDIDATES["cuda"])
    assert built_paths(layer) == {layer.path_for(xc)}


@cuda
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_cuda_thick_blocks_and_model(path):
    model, blocks, _ = tiny_model_and_blocks()
    x = torch.randn(5, 3, 33, 31)
    with torch.no_grad():
        ref = kernels.masked_model(model, blocks)(x)
        regrouped = kernels.regrouped_model(model, blocks).cuda()
        for m in regrouped.modules():
            if isinstance(m, kernels.RegroupedConv2d):
                m.info["forced"] = path
        y = regrouped(x.cuda())
    assert rel_err(y.cpu(), ref) < 1e-3
    g = torch.Generator().manual_seed(7)
    w, xs = torch.randn(150, 40, 3, 3, generator=g), torch.randn(3, 40, 17, 17, generator=g)
    thick = [(torch.arange(0, 70), torch.randperm(360, generator=g)[:77].sort().values),
             (torch.arange(80, 150), torch.randperm(360, generator=g)[:300].sort().values)]
    ref = kernels.grouped_gemm_reference(xs.double(), w.double(), thick, padding=1)
    layer = kernels.RegroupedConv2d(w, thick, padding=1, strategy=path).cuda()
    assert rel_err(layer(xs.cuda()).cpu(), ref) < 1e-3


@cuda
@pytest.mark.slow
def test_cuda_deterministic_runs_repeat_bit_for_bit(tmp_path):
    # two fresh runs on the GPU with --deterministic: every ticket and result the same, every bit
    flags = ["--levels", "1", "--epochs", "1", "--method", "regroup", "--deterministic", "--device", "cuda"]
    first, again = (run_record(run_cli(tmp_path, *flags, name=name)[0]) for name in ("first", "again"))
    assert "regroup/level_01/ticket.pt" in first and differences(first, again) == []


@cuda
def test_cuda_graph_replays_the_models_and_bench_model_times_both(monkeypatch):
    model, blocks, _ = tiny_model_and_blocks()
    x = torch.randn(4, 3, 16, 16, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        regrouped = kernels.regrouped_model(model, blocks).cuda().half()
        eager = regrouped(x).clone()                           # measures the paths, outside the capture
        out = []
        replay = kernels.cuda_graph(lambda: out.append(regrouped(x)))
        replay()
        torch.cuda.synchronize()
    assert torch.equal(out[-1], eager)
    total = kernels.bench_model(model, blocks, batch_size=4, repeats=2, input_size=(3, 16, 16), device="cuda",
                                dtype=torch.float16)
    assert total["timing"] == "eager + CUDA graphs" and total["graph_regrouped_ms"] > 0 and total["cudnn"]


# ---- host emulation of the CUDA kernel ----
# kernels.CUDA_SRC compiled by g++ and run on the CPU, with or without sanitizers, so a change to the
# kernel can be checked without a GPU:
#     import test_lth_ref as T
#     y = T.emulated_grouped_conv2d(x, weight, blocks, stride, padding, dilation, tile_rows=32,
#                                   source=new_src)
# The kernel's own text, unchanged (only its CUDA includes and its <<<...>>> launch sit behind
# #ifndef LTH_REF_HOST_EMULATION), compiled with EMULATION_HEADER: CUDA threads are OS threads,
# __syncthreads() a real barrier, __shared__ memory NaN-poisoned before each CTA, WMMA computed on
# the host with its preconditions checked on every call. emulated_grouped_conv2d loads the build
# with ctypes; with sanitizer="address" (AddressSanitizer + UBSan) or "thread" (ThreadSanitizer)
# it builds a program (EMULATION_DRIVER with LTH_EMU_MAIN) that runs the case in a subprocess:
# every array in its own exact-size heap buffer, so ASan sees a read past any of them.
# Builds are cached in emulation_cache_dir(), named by a hash of every text and flag that goes in
# (a few seconds for the library, ~10 s per sanitizer program on first use). Tests skip without g++.

EMULATION_HEADER = r"""
// Host emulation of the CUDA features CUDA_SRC uses, for g++ (C++17, pthreads).
// A launch runs its CTAs one after another (x fastest); a CTA runs on one OS thread per CUDA thread,
// and __syncthreads() is a real barrier across them. __shared__ variables become function statics:
// one copy per kernel instantiation, which is per CTA since CTAs never overlap. The linker script
// (EMULATION_LINKER_SCRIPT) gathers them between lth_emu_shared_begin and _end, and every byte there
// is set to 0xFF (NaN in float, half and bf16; -1 in ints) before each CTA. A broken rule (a WMMA
// precondition, a barrier or warp-collective not reached by all) stops the launch: cudaGetLastError()
// returns cudaErrorLaunchFailure and lth_emu::last_failure says what and where.
#pragma once
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// ---- launch geometry and runtime stand-ins ----
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

struct int4 { int x, y, z, w; };
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719
};

// ---- host __half / __nv_bfloat16: IEEE bits, round-to-nearest-even conversions as cuda_fp16/bf16 ----
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

inline uint32_t lth_emu_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float lth_emu_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline __half __float2half(float f) {
  const uint32_t u = lth_emu_bits(f), mag = u & 0x7fffffffu;
  const uint16_t sign = (u >> 16) & 0x8000u;
  if (mag > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};            // NaN
  if (mag >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};           // >= 65520 rounds to inf
  if (mag >= 0x38800000u)                                              // normal: 2^-14 <= |f|
    return {uint16_t(sign | ((mag + 0xfffu + ((mag >> 13) & 1u) - 0x38000000u) >> 13))};
  // subnormal: m * 2^-24
  return {uint16_t(sign | (uint16_t)std::nearbyint(lth_emu_float(mag) * 16777216.0f))};
}
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  if (e == 0x1f) return lth_emu_float(sign | 0x7f800000u | (m << 13));          // inf, NaN
  if (e == 0) return (sign ? -1.0f : 1.0f) * float(m) * (1.0f / 16777216.0f);   // zero, subnormal
  return lth_emu_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t u = lth_emu_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};    // NaN stays NaN
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return lth_emu_float(uint32_t(b.bits) << 16); }

// ---- the runtime: launch state, failures, barriers ----
namespace lth_emu {
struct Abort {};  // unwinds a CUDA thread out of the kernel once the launch has failed

struct Launch {
  std::mutex m;
  std::condition_variable cv;
  int threads = 0, arrived = 0, kind = 0, first = 0;
  unsigned long generation = 0;
  bool failed = false;
  std::string message;
  std::vector<uint64_t> calls;  // per thread: hash of its warp-collective calls in this CTA
};
inline Launch* running = nullptr;          // the launch in progress (launches never overlap)
inline std::mutex launch_lock;
inline cudaError_t last_error = cudaSuccess;
inline std::string last_failure;
inline thread_local int tid = 0;           // linear thread index in the CTA
inline thread_local uint64_t calls = 0;    // this thread's hash of warp-collective calls

inline std::string cta() {
  char s[64];
  std::snprintf(s, sizeof s, " (CTA (%u,%u,%u))", blockIdx.x, blockIdx.y, blockIdx.z);
  return s;
}

// Record a failure (the first one wins), wake every waiting thread, unwind this one.
[[noreturn]] inline void fail(const std::string& what) {
  Launch& L = *running;
  {
    std::lock_guard<std::mutex> lk(L.m);
    if (!L.failed) L.message = what + ", thread " + std::to_string(tid) + cta();
    L.failed = true;
  }
  L.cv.notify_all();
  throw Abort{};
}

// One CTA-wide barrier episode. kind: 1 __syncthreads, 2 kernel exit. Every thread of the CTA must
// arrive with the same kind; the last to arrive runs done() (under the lock) before anyone leaves.
template <typename Done>
inline void arrive(int kind, Done done) {
  Launch& L = *running;
  std::unique_lock<std::mutex> lk(L.m);
  if (L.failed) throw Abort{};
  L.calls[tid] = calls;
  if (L.arrived == 0) {
    L.kind = kind;
    L.first = tid;
  } else if (L.kind != kind) {
    static const char* name[] = {"", "__syncthreads()", "the end of the kernel"};
    L.message = std::string("barrier divergence: thread ") + std::to_string(tid) + " reached " + name[kind] +
                " while thread " + std::to_string(L.first) + " waits at " + name[L.kind] +
                " (every thread of a CTA must reach each __syncthreads())" + cta();
    L.failed = true;
    L.cv.notify_all();
    throw Abort{};
  }
  if (++L.arrived < L.threads) {
    const unsigned long g = L.generation;
    L.cv.wait(lk, [&] { return L.generation != g || L.failed; });
    if (L.failed) throw Abort{};
    return;
  }
  L.arrived = 0;
  for (int t = 0; t < L.threads; t++)  // warp-collectives: every lane of a warp made the same calls
    if (L.calls[t] != L.calls[t - t % 32]) {
      L.message = "warp " + std::to_string(t / 32) + ": lane " + std::to_string(t % 32) +
                  " made other wmma *_sync calls than lane 0 since the CTA began (they are warp-collective: "
                  "every lane calls them, with the same arguments)" + cta();
      L.failed = true;
      break;
    }
  if (!L.failed) done();
  L.generation++;
  L.cv.notify_all();
  if (L.failed) throw Abort{};
}

inline void mix(uint64_t v) { calls = (calls ^ v) * 0x100000001b3ull; }  // FNV-1a step

extern "C" char lth_emu_shared_begin[] __attribute__((visibility("hidden")));
extern "C" char lth_emu_shared_end[] __attribute__((visibility("hidden")));

// 0xFF in every byte of every __shared__ variable: NaN in float/half/bf16, -1 in ints.
__attribute__((no_sanitize_address)) inline void poison_shared() {
  for (volatile char* p = lth_emu_shared_begin; p < lth_emu_shared_end; p++) *p = char(0xff);
}
inline bool in_shared(const void* p) {
  return (const char*)p >= lth_emu_shared_begin && (const char*)p < lth_emu_shared_end;
}

// cp.async state of this thread: copies of the group not yet committed, and the committed groups
// not yet waited for (oldest first)
struct AsyncCopy { void* dst; const void* src; int bytes; };
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::vector<std::vector<AsyncCopy>> groups;

template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, void (*kernel)(P...), A... args) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> serial(launch_lock);
  Launch L;
  L.threads = (int)threads;
  L.calls.assign(threads, 0);
  running = &L;
  poison_shared();
  auto body = [&](int t) {
    tid = t;
    threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
    blockDim = block;
    gridDim = grid;
    try {
      for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
          for (unsigned x = 0; x < grid.x; x++) {
            blockIdx = {x, y, z};
            calls = 0;
            open_group.clear();
            groups.clear();
            kernel(P(args)...);
            arrive(2, poison_shared);  // the next CTA starts on poisoned shared memory
          }
    } catch (const Abort&) {
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < (int)threads; t++) pool.emplace_back(body, t);
  for (auto& th : pool) th.join();
  running = nullptr;
  if (L.failed) {
    last_error = cudaErrorLaunchFailure;
    last_failure = L.message;
  }
}
}  // namespace lth_emu

inline void __syncthreads() { lth_emu::arrive(1, [] {}); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = lth_emu::last_error;
  lth_emu::last_error = cudaSuccess;
  return e;
}

// ---- cp.async (16-byte cp.async.cg with a source size, commit_group, wait_group) ----
// A copy lands when the issuing thread waits for its group: until then its 16 destination bytes hold
// 0xFF (NaN), so a stage read before its wait_group (and the barrier after it) shows in the output.
__forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const size_t room = __builtin_dynamic_object_size(dst, 1);
  if (!lth_emu::in_shared(dst) || reinterpret_cast<uintptr_t>(dst) % 16 ||
      reinterpret_cast<uintptr_t>(src) % 16)
    lth_emu::fail("cp.async: the destination must be 16-byte aligned __shared__ memory, "
                  "the source 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16 || (room != (size_t)-1 && room < 16))
    lth_emu::fail("cp.async: 16 bytes past the end of the __shared__ variable, "
                  "or a source size outside 0..16");
  std::memset(dst, 0xff, 16);
  lth_emu::open_group.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
  lth_emu::groups.push_back(std::move(lth_emu::open_group));
  lth_emu::open_group.clear();
}
template <int N> inline void cp_async_wait() {  // all but the newest N committed groups have landed
  while ((int)lth_emu::groups.size() > N) {
    for (const lth_emu::AsyncCopy& c : lth_emu::groups.front()) {
      std::memset(c.dst, 0, 16);  // bytes past the source size are zero-filled
      if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
    }
    lth_emu::groups.erase(lth_emu::groups.begin());
  }
}

// ---- nvcuda::wmma: the subset CUDA_SRC uses, preconditions checked on every call ----
// Which lane holds which element is unspecified by the API; here a matrix_a / matrix_b fragment holds
// the whole tile in every lane (num_elements = rows * cols, row-major whatever the memory layout), and
// an accumulator element e of lane l is tile element l + 32 e, row-major (num_elements = 8).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision { struct tf32 {}; }

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (low 13 bits zero).
inline float __float_to_tf32(float f) {
  const uint32_t u = lth_emu_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;  // inf and NaN unchanged
  return lth_emu_float((u + 0x1000u) & 0xffffe000u);
}

template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename E> E from(float v);
template <> inline float from<float>(float v) { return v; }
template <> inline __half from<__half>(float v) { return __float2half(v); }
template <> inline __nv_bfloat16 from<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static constexpr bool acc = std::is_same<Use, accumulator>::value;
  static constexpr bool tf32 = std::is_same<T, precision::tf32>::value;
  static constexpr bool half = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
  static_assert(M == 16 && N == 16 && ((K == 8 && (acc || tf32)) || (K == 16 && (acc || half))),
                "emulated shapes: m16n16k8 (precision::tf32) and m16n16k16 (__half, __nv_bfloat16)");
  static_assert(acc ? std::is_same<T, float>::value && std::is_void<Layout>::value
                    : std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "an accumulator is float with layout void; matrix_a/b need row_major or col_major");

 public:
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = acc ? rows * cols / 32 : rows * cols;
  using element_type = typename storage<T>::type;
  element_type x[num_elements];
};

inline int lane() { return lth_emu::tid % 32; }
// Tile element (i, j) of accumulator element e of this lane: index lane + 32 e, row-major.
inline int acc_row(int e, int cols) { return (lane() + 32 * e) / cols; }
inline int acc_col(int e, int cols) { return (lane() + 32 * e) % cols; }

// The documented preconditions of load/store_matrix_sync, and the tile inside its __shared__ variable.
template <typename E>
__forceinline__ void check_tile(const char* op, const E* p, unsigned ldm, int rows, int cols,
                                bool row_major_) {
  char s[200];
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    std::snprintf(s, sizeof s, "wmma::%s: pointer %p is not 256-bit aligned", op, (const void*)p);
    lth_emu::fail(s);
  }
  if (ldm * sizeof(E) % 16 != 0) {
    std::snprintf(s, sizeof s, "wmma::%s: ldm=%u elements (%zu bytes) is not a multiple of 16 bytes", op, ldm,
                  ldm * sizeof(E));
    lth_emu::fail(s);
  }
  const unsigned inner = row_major_ ? cols : rows, outer = row_major_ ? rows : cols;
  if (ldm < inner) {
    std::snprintf(s, sizeof s, "wmma::%s: ldm=%u is smaller than the tile's %u %s", op, ldm, inner,
                  row_major_ ? "columns" : "rows");
    lth_emu::fail(s);
  }
  const size_t need = ((outer - 1) * (size_t)ldm + inner) * sizeof(E),
               room = __builtin_dynamic_object_size(p, 1);
  if (lth_emu::in_shared(p) && room == (size_t)-1)  // global memory is ASan's job
    lth_emu::fail(std::string("wmma::") + op + ": cannot bound a __shared__ tile: build with -O1 or more");
  if (lth_emu::in_shared(p) && need > room) {
    std::snprintf(s, sizeof s, "wmma::%s: the %dx%d tile (ldm=%u) needs %zu bytes from %p, its __shared__ "
                  "variable has %zu left", op, rows, cols, ldm, need, (const void*)p, room);
    lth_emu::fail(s);
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
__forceinline__ void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& a,
                                      const typename fragment<Use, M, N, K, T, Layout>::element_type* p,
                                      unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool row = std::is_same<Layout, row_major>::value;
  static_assert(!std::is_same<Use, accumulator>::value, "emulated: loads of matrix_a / matrix_b only");
  check_tile("load_matrix_sync", p, ldm, F::rows, F::cols, row);
  lth_emu::mix(1);
  lth_emu::mix(reinterpret_cast<uintptr_t>(p));
  lth_emu::mix(ldm);
  for (int i = 0; i < F::rows; i++)
    for (int j = 0; j < F::cols; j++) a.x[i * F::cols + j] = p[row ? i * ldm + j : j * ldm + i];
}

template <int M, int N, int K>
__forceinline__ void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& a, unsigned ldm,
                                       layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  check_tile("store_matrix_sync", p, ldm, F::rows, F::cols, layout == mem_row_major);
  lth_emu::mix(2);
  lth_emu::mix(reinterpret_cast<uintptr_t>(p));
  lth_emu::mix(ldm * 2 + layout);
  for (int e = 0; e < F::num_elements; e++) {
    const int i = acc_row(e, F::cols), j = acc_col(e, F::cols);
    p[layout == mem_row_major ? i * ldm + j : j * ldm + i] = a.x[e];
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& a, const V& v) {
  using E = typename fragment<Use, M, N, K, T, Layout>::element_type;
  for (int e = 0; e < a.num_elements; e++) a.x[e] = from<E>(float(v));
}

inline float operand(float v, bool tf32) { return tf32 ? lth_emu_float(lth_emu_bits(v) & 0xffffe000u) : v; }
template <typename E> inline float operand(E v, bool) { return to_float(v); }

// D = A B + C. Each lane computes its own accumulator elements from its whole copies of A and B (the
// lanes need not meet); the calls are checked to be warp-collective at the next barrier. fp32 FMAs in
// k order (products of TF32/half/bf16 values are exact in fp32; the hardware's summation order is
// unspecified). A TF32 operand contributes only its TF32 bits.
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  constexpr bool tf32 = std::is_same<T, precision::tf32>::value;
  float out[fragment<accumulator, M, N, K, float>::num_elements];
  for (int e = 0; e < c.num_elements; e++) {
    const int i = acc_row(e, N), j = acc_col(e, N);
    float s = c.x[e];
    for (int k = 0; k < K; k++) s = std::fma(operand(a.x[i * K + k], tf32), operand(b.x[k * N + j], tf32), s);
    out[e] = s;
  }
  for (int e = 0; e < d.num_elements; e++) d.x[e] = out[e];
  lth_emu::mix(3);
  lth_emu::mix(M * 10000 + N * 100 + K);
}
}  // namespace wmma
}  // namespace nvcuda
"""

EMULATION_DRIVER = r"""
// The emulated kernel as a C library (ctypes) or, with -DLTH_EMU_MAIN, a program that runs one case
// file (for the sanitizer builds). CUDA_SRC is included inside an anonymous namespace: its __shared__
// statics then get the names EMULATION_LINKER_SCRIPT collects.
#include "lth_emu.h"
namespace {
#include "grouped_gemm.cu"
}

static void copy_message(char* message, int len) {
  std::snprintf(message, len, "%s", lth_emu::last_failure.c_str());
  lth_emu::last_failure.clear();
}

extern "C" int lth_emu_grouped_conv2d(int dtype, int tile_rows, const void* x, const void* w, void* y,
                                      const int* meta, const int* tiles, int num_tiles, const int* rows,
                                      const int* cols, const int* dims, char* message, int len) {
  const int err = grouped_conv2d_launch(dtype, tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, dims,
                                        nullptr);
  copy_message(message, len);
  return err;
}

extern "C" float lth_emu_float_to_tf32(float v) { return nvcuda::wmma::__float_to_tf32(v); }
extern "C" uint16_t lth_emu_float2half(float v) { return __float2half(v).bits; }
extern "C" uint16_t lth_emu_float2bfloat16(float v) { return __float2bfloat16(v).bits; }

// ---- small kernels that break one rule each: the harness must stop them with a clear message ----
namespace {
using namespace nvcuda;
__global__ void broken_kernel(int which) {
  __shared__ __align__(128) float s[16 * 8 * 2];
  for (int i = threadIdx.x; i < 16 * 8 * 2; i += blockDim.x) s[i] = 1.0f;
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  if (which == 1) wmma::load_matrix_sync(a, s + 1, 8);                     // misaligned pointer
  if (which == 2) wmma::load_matrix_sync(a, s, 10);                        // ldm of 40 bytes
  if (which == 3) wmma::load_matrix_sync(a, s + 16 * 8 + 8, 8);            // tile past the array's end
  if (which == 4 && threadIdx.x < 32) __syncthreads();                     // divergent barrier
  if (which == 5) wmma::load_matrix_sync(a, s + 8 * (threadIdx.x % 2), 8);  // lanes disagree
  __syncthreads();
}
}  // namespace

extern "C" int lth_emu_broken(int which, char* message, int len) {
  lth_emu::launch(dim3(1), dim3(64), broken_kernel, which);
  const int err = cudaGetLastError();
  copy_message(message, len);
  return err;
}

#ifdef LTH_EMU_MAIN
// lth_emu CASE OUT: CASE holds int64 dtype, tile_rows, num_tiles, dims[15], the byte sizes of x, w, y,
// meta, tiles, rows, cols, then those arrays; each gets its own exact-size heap buffer (so ASan
// guards its ends); y as the kernel leaves it is written to OUT.
#include <cstdlib>
int main(int argc, char** argv) {
  if (argc != 3) return std::fprintf(stderr, "usage: %s CASE OUT\n", argv[0]), 2;
  FILE* f = std::fopen(argv[1], "rb");
  int64_t head[3 + 15 + 7];
  if (!f || std::fread(head, sizeof head, 1, f) != 1)
    return std::fprintf(stderr, "cannot read %s\n", argv[1]), 2;
  int dims[15];
  for (int i = 0; i < 15; i++) dims[i] = (int)head[3 + i];
  void* a[7];
  for (int i = 0; i < 7; i++) {
    a[i] = std::malloc(head[18 + i] ? head[18 + i] : 1);
    if (head[18 + i] && std::fread(a[i], head[18 + i], 1, f) != 1)
      return std::fprintf(stderr, "short %s\n", argv[1]), 2;
  }
  std::fclose(f);
  char message[1024];
  const int err = lth_emu_grouped_conv2d((int)head[0], (int)head[1], a[0], a[1], a[2], (const int*)a[3],
                                         (const int*)a[4], (int)head[2], (const int*)a[5], (const int*)a[6],
                                         dims, message, sizeof message);
  if (err) return std::fprintf(stderr, "kernel failed (cudaError %d): %s\n", err, message), 3;
  FILE* o = std::fopen(argv[2], "wb");
  if (!o || (head[20] && std::fwrite(a[2], head[20], 1, o) != 1))
    return std::fprintf(stderr, "cannot write %s\n", argv[2]), 2;
  std::fclose(o);
  for (void* p : a) std::free(p);
  return 0;
}
#endif
"""

# Collects the kernel's __shared__ statics (functions in the anonymous namespace of EMULATION_DRIVER,
# with -fdata-sections one .bss section each) into one range the emulator poisons before each CTA.
EMULATION_LINKER_SCRIPT = ("SECTIONS { lth_emu_shared : { HIDDEN(lth_emu_shared_begin = .); "
                           "*(.bss._ZZN12_GLOBAL__N_1*) HIDDEN(lth_emu_shared_end = .); } } "
                           "INSERT BEFORE .bss;\n")
EMULATION_FLAGS = ["-std=c++17", "-pthread", "-fdata-sections", "-DLTH_REF_HOST_EMULATION",
                   "-Wno-unknown-pragmas"]
# Optimization at least -O1 everywhere: the WMMA bounds check on __shared__ tiles needs the compiler
# to see which array a pointer points into (__builtin_dynamic_object_size).
SANITIZERS = {None: ["-O2", "-fPIC", "-shared"],
              "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                          "-fno-sanitize-recover=all", "-DLTH_EMU_MAIN"],
              "thread": ["-O1", "-g", "-fsanitize=thread", "-DLTH_EMU_MAIN"]}
SANITIZER_ENV = {"address": {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
                 "thread": {"TSAN_OPTIONS": "halt_on_error=1"}}  # stop at the first race
EMULATION_TIMEOUT_S = 600  # per build or run; a sanitizer build of the six instantiations takes ~10 s
_EMU = {}  # built library path -> ctypes.CDLL; "version": the compiler's --version line


class EmulationUnavailable(RuntimeError):
    """No C++ compiler, or no runtime for the asked sanitizer, to build the emulated kernel with."""


def emulation_compiler():
    """The C++ compiler for the emulation: $CXX, else g++; EmulationUnavailable if missing."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise EmulationUnavailable(f"no C++ compiler {cxx!r} found: install g++ (or set CXX) to run "
                                   "the CUDA kernel's host emulation")
    return path


def emulation_cache_dir():
    """$XDG_CACHE_HOME/lth_ref/emulation (default ~/.cache), or a per-user temp dir if not writable."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "lth_ref", "emulation")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = os.path.join(tempfile.gettempdir(),
                        f"lth_ref_emulation_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def build_emulation(source=None, sanitizer=None):
    """Path of the emulated kernel built from `source` (default CUDA_SRC): a shared library for
    ctypes (sanitizer None) or a program for one case file (sanitizer "address" or "thread").
    Cached by a hash of the source, EMULATION_HEADER, EMULATION_DRIVER, the linker script, the
    compiler and the flags. RuntimeError with the compiler's output when the build fails."""
    if sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer={sanitizer!r}: expected one of {list(SANITIZERS)}")
    source, cxx = kernels.CUDA_SRC if source is None else source, emulation_compiler()
    if "version" not in _EMU:
        _EMU["version"] = subprocess.run([cxx, "--version"], capture_output=True,
                                         text=True).stdout.split("\n")[0]
    flags = [*EMULATION_FLAGS, *SANITIZERS[sanitizer]]
    parts = [source, EMULATION_HEADER, EMULATION_DRIVER, EMULATION_LINKER_SCRIPT, cxx, _EMU["version"],
             *flags]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    cache = emulation_cache_dir()
    out = os.path.join(cache, f"grouped_gemm_{sanitizer or 'lib'}_{digest}{'' if sanitizer else '.so'}")
    if os.path.exists(out):
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for name, text in (("lth_emu.h", EMULATION_HEADER), ("driver.cpp", EMULATION_DRIVER),
                           ("grouped_gemm.cu", source), ("shared.ld", EMULATION_LINKER_SCRIPT)):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        cmd = [cxx, *flags, os.path.join(tmp, "driver.cpp"), f"-Wl,-T,{os.path.join(tmp, 'shared.ld')}",
               "-o", os.path.join(tmp, "out")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=EMULATION_TIMEOUT_S)
        if res.returncode != 0 and sanitizer and "cannot find" in res.stderr:
            raise EmulationUnavailable(f"{cxx} cannot link -fsanitize for {sanitizer!r} (is its runtime "
                                       f"library installed?): {res.stderr.strip().splitlines()[-1]}")
        if res.returncode != 0:
            raise RuntimeError(f"building the emulated kernel failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(os.path.join(tmp, "out"), out)  # atomic: a concurrent build of the same key is harmless
    return out


def emulation_library(source=None):
    """The emulated kernel built from `source` (default CUDA_SRC), loaded with ctypes (cached)."""
    path = build_emulation(source)
    if path not in _EMU:
        lib = ctypes.CDLL(path)
        lib.lth_emu_grouped_conv2d.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 5,
                                               ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
        lib.lth_emu_broken.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.lth_emu_float_to_tf32.argtypes = lib.lth_emu_float2half.argtypes = [ctypes.c_float]
        lib.lth_emu_float2bfloat16.argtypes = [ctypes.c_float]
        lib.lth_emu_float_to_tf32.restype = ctypes.c_float
        lib.lth_emu_float2half.restype = lib.lth_emu_float2bfloat16.restype = ctypes.c_uint16
        _EMU[path] = lib
    return _EMU[path]


def emulation_call(fn, *args):
    """Call an emulated launch fn(*args, message, len); RuntimeError with its message if it failed."""
    message = ctypes.create_string_buffer(2048)
    err = fn(*args, message, len(message))
    if err:
        raise RuntimeError(f"emulated CUDA kernel failed (cudaError {err}): "
                           f"{message.value.decode() or 'invalid launch configuration or arguments'}")


def _kernel_case(x, weight, blocks, stride, padding, dilation, tile_rows):
    """The launcher's arguments for x (N, C, H, W) on the CPU, from the tables the GPU's path
    kernel<tile_rows> builds: (dtype code, [x, padded weights, y, meta, tiles, rows, cols], dims), x
    and y channels-last as (N, H, W, C) and (N, OH, OW, O) arrays. y is NaN except the rows in no
    block, which are 0 as the launcher's caller sets them (CPP_SRC): rows the kernel misses show."""
    if (x.device.type != "cpu" or x.dtype not in kernels.KERNEL_DTYPES or x.dim() != 4
            or x.shape[1] != weight.shape[1]):
        raise ValueError(f"emulated_grouped_conv2d: x must be a CPU (N, {weight.shape[1]}, H, W) tensor of "
                         f"{[str(d) for d in kernels.KERNEL_DTYPES]}, "
                         f"got {x.device.type} {x.dtype} {tuple(x.shape)}")
    if tile_rows not in kernels.KERNEL_TILE_ROWS:
        raise ValueError(f"emulated_grouped_conv2d: tile_rows={tile_rows}, "
                         f"expected one of {kernels.KERNEL_TILE_ROWS}")
    info, t = kernels.make_plan(weight.detach().cpu(), kernels.check_blocks(tuple(weight.shape), blocks))
    p = kernels.PATHS[f"kernel{tile_rows}"].build(info, t)
    stride, padding, dilation = kernels._pair(stride), kernels._pair(padding), kernels._pair(dilation)
    (N, C, H, W), (O, _, kh, kw) = x.shape, weight.shape
    OH, OW = kernels.conv_out_hw((H, W), (kh, kw), stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"emulated_grouped_conv2d: empty output {OH}x{OW} for input {H}x{W}")
    y = torch.full((N, OH, OW, O), float("nan"), dtype=x.dtype)
    y.index_fill_(3, t["empty_rows"], 0.0)
    arrays = [x.permute(0, 2, 3, 1).contiguous(), p["weights"].to(x.dtype).contiguous(), y,
              *(p[k].contiguous() for k in ("meta", "tiles", "rows", "cols"))]
    return (kernels.KERNEL_DTYPES[x.dtype], arrays,
            [N, C, H, W, O, OH, OW, kh, kw, *stride, *padding, *dilation])


def emulated_grouped_conv2d(x, weight, blocks, stride=1, padding=0, dilation=1, *, tile_rows,
                            source=None, sanitizer=None):
    """The CUDA kernel (kernels.CUDA_SRC, or `source`) run on the CPU under the host emulation:
    x (N, C, H, W) float32/float16/bfloat16, weight (O, C, kh, kw) (values outside the blocks
    ignored) -> y (N, O, OH, OW) in x's dtype, channels-last, bit for bit what the emulated hardware
    computes (fp32: TF32 products, fp32 sums). tile_rows: one of kernels.KERNEL_TILE_ROWS (the paths
    kernel32 and kernel64). sanitizer: None runs in this process (ctypes); "address" or "thread" run a
    sanitizer build in a subprocess. RuntimeError with the message when a rule breaks or a
    sanitizer reports; EmulationUnavailable without a compiler."""
    code, arrays, dims = _kernel_case(x, weight, blocks, stride, padding, dilation, tile_rows)
    if sanitizer is not None:
        y = _run_emulation_program(build_emulation(source, sanitizer), sanitizer, code, tile_rows, arrays,
                                   dims)
        return y.permute(0, 3, 1, 2)
    lib, ptr = emulation_library(source), (lambda a: ctypes.c_void_p(a.data_ptr()))
    x, w, y, meta, tiles, rows, cols = arrays
    emulation_call(lib.lth_emu_grouped_conv2d, code, tile_rows, ptr(x), ptr(w), ptr(y), ptr(meta), ptr(tiles),
                   len(tiles), ptr(rows), ptr(cols), (ctypes.c_int * 15)(*dims))
    return y.permute(0, 3, 1, 2)


def _run_emulation_program(program, sanitizer, code, tile_rows, arrays, dims):
    """Run a sanitizer build on one case file (format: EMULATION_DRIVER's main); y, or RuntimeError
    with the start of the sanitizer's report."""
    raw = [a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"" for a in arrays]
    with tempfile.TemporaryDirectory() as tmp:
        case, out = os.path.join(tmp, "case.bin"), os.path.join(tmp, "y.bin")
        with open(case, "wb") as f:
            f.write(struct.pack("<25q", code, tile_rows, len(arrays[4]), *dims, *map(len, raw)))
            f.write(b"".join(raw))
        res = subprocess.run([program, case, out], capture_output=True, text=True,
                             timeout=EMULATION_TIMEOUT_S, env={**os.environ, **SANITIZER_ENV[sanitizer]})
        if res.returncode != 0 or "Sanitizer" in res.stderr or "runtime error" in res.stderr:
            lines = res.stderr.strip().splitlines()
            report = "\n".join(lines[:25] + [l for l in lines[25:] if l.startswith("SUMMARY")])
            raise RuntimeError(f"emulated CUDA kernel under the {sanitizer} sanitizer failed "
                               f"(exit {res.returncode}):\n{report}")
        with open(out, "rb") as f:
            data = bytearray(f.read())
    y = arrays[2]
    return torch.frombuffer(data, dtype=torch.uint8).view(y.dtype).view(y.shape) if data else y


def round_like_mma(x):
    """x's values as the CUDA kernel's tensor cores multiply them: float32 rounded to TF32 the way
    cvt.rna does (nearest, ties away from zero, 10 mantissa bits), half and bfloat16 unchanged.
    A reference computed in float64 from these differs from the kernel only by its fp32 sums."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, (bits + 0x1000) & ~0x1FFF, bits).view(torch.float32)  # (ties: magnitude up)


def emulation_or_skip(source=None, sanitizer=None):
    """Build (or find cached) the emulated kernel; skip the test where it cannot be built."""
    try:
        return build_emulation(source, sanitizer)
    except EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def emulation():
    emulation_or_skip()
    return emulation_library()


# Against a float64 reference on the values the tensor cores multiply (round_like_mma): the fp32
# sums (well under 1e-5 of max |y| at these sizes), plus, for half and bf16, rounding the output to
# the dtype: at most half an ulp, 2^-11 resp. 2^-8 of |y|.
EMU_TOL = {torch.float32: 1e-5, torch.float16: 2 ** -11 + 1e-5, torch.bfloat16: 2 ** -8 + 1e-5}


def emulation_cases():
    """(id, shape, blocks or None for random_blocks): SHAPES (1-row, 1-column blocks, an empty
    row, several pixel tiles, stride 2, dilation 2, odd channel counts) plus dilation 2 at stride 1, no
    blocks, one-row / one-column / 1x1 blocks, a 70-row x 100-column block (several row tiles, 4 k
    tiles), and blocks of whole vectors (the kernel's 16-byte copies): 3x3 with padding (one block
    of one vector), stride 2 with dilation 2, 1x1."""
    g = torch.Generator().manual_seed(11)
    cases = [(f"shape{i}", shape, None) for i, shape in enumerate(SHAPES)]
    cases += [("dilation2", (2, 6, 9, 10, 12, 3, 1, 2, 2), None),
              ("no_blocks", (2, 5, 6, 6, 8, 3, 1, 1, 1), []),
              ("thin", (2, 5, 6, 7, 9, 3, 1, 1, 1), [(torch.tensor([4]), torch.arange(45)),
                                                     (torch.arange(4), torch.tensor([44])),
                                                     (torch.tensor([6]), torch.tensor([0]))]),
              ("big", (1, 12, 9, 8, 80, 3, 1, 1, 1),
               [(torch.arange(70), torch.randperm(108, generator=g)[:100]),
                (torch.arange(72, 80), torch.randperm(108, generator=g)[:33])])]
    vec = lambda c0s, poss, k: torch.cat([(c0 + torch.arange(8)) * k * k + j  # noqa: E731
                                          for c0 in c0s for j in poss])
    cases += [("vector", (2, 24, 7, 6, 40, 3, 1, 1, 1),
               [(torch.arange(33), vec([0, 16], range(9), 3)),
                (torch.arange(34, 40), vec([8], [0, 4, 8], 3)),
                (torch.tensor([33]), vec([16], [5], 3))]),  # one vector
              ("vector_s2_d2", (2, 16, 11, 9, 12, 3, 2, 2, 2),
               [(torch.arange(10), vec([0, 8], [1, 2, 6, 7], 3))]),
              ("vector_1x1", (2, 32, 5, 6, 20, 1, 1, 0, 1),
               [(torch.arange(0, 20, 2), vec([8, 24], [0], 1)),
                (torch.tensor([1, 3]), vec([0, 8, 16, 24], [0], 1))])]
    return cases


EMULATION_CASES = emulation_cases()


def emulation_inputs(case, dtype):
    """x, weight in dtype; blocks; the plain float64 reference; the float64 reference on the values
    the kernel multiplies; the rows in no block; conv kwargs."""
    name, shape, blocks = case
    x, weight, random, _, _, conv = make_case(shape, seed=8)
    blocks = random if blocks is None else [(r.sort().values, c.sort().values) for r, c in blocks]
    x, weight = x.to(dtype), weight.to(dtype)
    ref = kernels.grouped_gemm_reference(x.double(), weight.double(), blocks, **conv)
    seen = kernels.grouped_gemm_reference(round_like_mma(x).double(), round_like_mma(weight).double(),
                                          blocks, **conv)
    empty = torch.nonzero(kernels.block_mask(weight.shape, blocks).view(weight.shape[0], -1).sum(1)
                          == 0).view(-1)
    return x, weight, blocks, ref, seen, empty, conv


@pytest.mark.slow
@pytest.mark.parametrize("tile_rows", kernels.KERNEL_TILE_ROWS)
@pytest.mark.parametrize("dtype", list(EMU_TOL))
@pytest.mark.parametrize("case", EMULATION_CASES, ids=[c[0] for c in EMULATION_CASES])
def test_emulated_kernel_matches_reference(emulation, case, dtype, tile_rows):
    x, weight, blocks, ref, seen, empty, conv = emulation_inputs(case, dtype)
    y = emulated_grouped_conv2d(x, weight, blocks, tile_rows=tile_rows, **conv)  # y starts as NaN
    assert y.dtype == dtype and y.shape == ref.shape and not torch.isnan(y).any()  # every output written
    assert (y[:, empty] == 0).all()
    if blocks:
        assert rel_err(y, seen) <= EMU_TOL[dtype]
        assert rel_err(y, ref) < GPU_TOL[dtype]  # the GPU test's tolerance against the exact conv
    if dtype != torch.float32:  # bit for bit the reference rounded once to the dtype, but where the fp32
        assert (y == seen.to(dtype)).double().mean() > 0.99  # sum falls within 1e-6 of a rounding tie


@pytest.mark.slow
def test_emulated_conversions_round_like_the_hardware(emulation):
    bits = lambda v: struct.unpack("<I", struct.pack("<f", v))[0]  # noqa: E731
    # cvt.rna keeps 10 mantissa bits, ties away from zero: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10
    ties = {1 + 2 ** -11: 1 + 2 ** -10, -(1 + 2 ** -11): -(1 + 2 ** -10), 1 + 3 * 2 ** -11: 1 + 2 ** -9,
            1 + 2 ** -11 - 2 ** -23: 1.0, float("inf"): float("inf"), -0.0: -0.0}
    for v, expect in ties.items():
        assert bits(emulation.lth_emu_float_to_tf32(v)) == bits(expect)
    # normal and subnormal half
    values = torch.cat([torch.randn(2000) * 10.0 ** torch.randint(-9, 6, (2000,)),
                        torch.tensor([65504.0, 65519.0, 65520.0, 1e-8, 2.0 ** -25, -3e38])])
    tf32 = round_like_mma(values)
    for i, v in enumerate(values.tolist()):
        assert bits(emulation.lth_emu_float_to_tf32(v)) == bits(tf32[i].item())
        assert emulation.lth_emu_float2half(v) == values[i:i + 1].half().view(torch.int16).item() & 0xFFFF
        assert (emulation.lth_emu_float2bfloat16(v)
                == values[i:i + 1].bfloat16().view(torch.int16).item() & 0xFFFF)


@pytest.mark.slow
@pytest.mark.parametrize("which,message", [
    (1, "load_matrix_sync: pointer .* is not 256-bit aligned"),
    (2, "ldm=10 elements \\(40 bytes\\) is not a multiple of 16 bytes"),
    (3, "16x8 tile .* needs 512 bytes .* __shared__ variable has 480 left"),
    (4, "barrier divergence: thread \\d+ reached"),
    (5, "lane 1 made other wmma \\*_sync calls than lane 0")])
def test_emulation_stops_a_kernel_that_breaks_a_rule(emulation, which, message):
    """Small kernels in EMULATION_DRIVER that each break one rule of CUDA or WMMA."""
    with pytest.raises(RuntimeError, match=message):
        emulation_call(emulation.lth_emu_broken, which)
    x, weight, blocks, _, seen, _, conv = emulation_inputs(EMULATION_CASES[0], torch.float32)
    assert (rel_err(emulated_grouped_conv2d(x, weight, blocks, tile_rows=32, **conv), seen)
            <= EMU_TOL[torch.float32])


# Padding 1 and blocks over every kernel row: the bottom kernel row reaches one row past the last
# image when ih may equal H. "position": columns not in whole vectors (one load per element);
# "vector": every column in aligned runs of 8 channels (16-byte cp.async copies).
SANITIZER_CASES = {
    "position": ("sanitized", (2, 6, 7, 5, 20, 3, 1, 1, 1),
                 [(torch.arange(5), torch.arange(54)), (torch.arange(6, 20), torch.arange(0, 54, 2))]),
    "vector": ("sanitized_vector", (2, 16, 7, 5, 20, 3, 1, 1, 1),
               [(torch.arange(5), torch.arange(144)), (torch.arange(6, 20), torch.arange(72, 144))])}


def sanitized(dtype, tile_rows, sanitizer, unit="position", source=None):
    """The emulated kernel on SANITIZER_CASES[unit] under a sanitizer program (None: in process);
    (y, reference)."""
    emulation_or_skip(source, sanitizer)
    x, weight, blocks, _, seen, _, conv = emulation_inputs(SANITIZER_CASES[unit], dtype)
    try:
        y = emulated_grouped_conv2d(x, weight, blocks, tile_rows=tile_rows, source=source,
                                    sanitizer=sanitizer, **conv)
    except RuntimeError as e:
        if "unexpected memory mapping" in str(e):  # old TSan runtimes and high-entropy ASLR
            pytest.skip(f"ThreadSanitizer cannot run on this kernel: {e}")
        raise
    return y, seen


def test_sanitizer_cases_take_both_copy_kinds():
    for unit, vec in (("position", 0), ("vector", 1)):
        _, shape, blocks = SANITIZER_CASES[unit]
        weight = torch.zeros(shape[4], shape[1], shape[5], shape[5])
        info, t = kernels.make_plan(weight, kernels.check_blocks(tuple(weight.shape), blocks))
        assert set(kernels.PATHS["kernel32"].build(info, t)["meta"][:, 5].tolist()) == {vec}


@pytest.mark.slow
def test_emulated_kernel_is_clean_under_address_and_undefined_behaviour_sanitizers():
    for dtype in EMU_TOL:
        for tile_rows in kernels.KERNEL_TILE_ROWS:
            for unit in SANITIZER_CASES:
                y, seen = sanitized(dtype, tile_rows, "address", unit)
                assert rel_err(y, seen) <= EMU_TOL[dtype]


@pytest.mark.slow
def test_emulated_kernel_is_clean_under_thread_sanitizer():
    for dtype, tile_rows, unit in ((torch.float32, 32, "position"), (torch.bfloat16, 64, "vector")):
        y, seen = sanitized(dtype, tile_rows, "thread", unit)
        assert rel_err(y, seen) <= EMU_TOL[dtype]


def planted(old, new, nth=0):
    """CUDA_SRC with the nth occurrence of `old` (which must occur) replaced by `new`."""
    src = kernels.CUDA_SRC
    at = [i for i in range(len(src)) if src.startswith(old, i)]
    assert len(at) > nth, f"{old!r} is not in CUDA_SRC {nth + 1} times"
    return src[:at[nth]] + new + src[at[nth] + len(old):]


BOUNDS = "ih >= 0 && ih < d.H"
RING_WAIT = "cp_async_wait<STAGES - 2>();"
RING_BARRIER = RING_WAIT + "  // tile kt has landed (this thread's copies) ...\n    __syncthreads();"
RESULT_BARRIER = "cp_async_wait<0>();\n  __syncthreads();"
TSAN_TRIES = 3  # runs of a planted race: TSan's shadow memory holds 4 accesses per word and may miss one


@pytest.mark.slow
@pytest.mark.parametrize("bug,sanitizer,unit,report", [
    ((BOUNDS, "ih >= 0 && ih <= d.H", 0), "address", "vector", "AddressSanitizer: heap-buffer-overflow"),
    ((BOUNDS, "ih >= 0 && ih <= d.H", 1), "address", "position", "AddressSanitizer: heap-buffer-overflow"),
    ((RING_BARRIER, RING_WAIT), "thread", "vector", "ThreadSanitizer: data race"),
    ((RESULT_BARRIER, "cp_async_wait<0>();"), "thread", "position", "ThreadSanitizer: data race"),
    (("cb[kt * BK + q * VE]", "cb[kt * BK + q * VE + VE]"), "address", "vector",
     "AddressSanitizer: heap-buffer-overflow"),
    (("if (gr < nrows && p < NL)", "if (gr <= nrows && p < NL)"), "address", "position",
     "AddressSanitizer: heap-buffer-overflow")],
    ids=["vector_bounds", "element_bounds", "ring_barrier", "result_barrier", "column_table", "scatter_rows"])
def test_sanitizers_catch_planted_bugs(bug, sanitizer, unit, report):
    """The harness is not vacuous: a read one row past the input on either copy kind, a missing
    barrier between the ring's copies landing and the MMAs reading them, one between the last MMAs
    and the result tile that reuses the ring, a column table read one vector off, and a scatter one
    row past its block: each caught. ThreadSanitizer keeps a few recent accesses per word, so it may
    miss one race in a run: up to TSAN_TRIES runs, the race must show in one."""
    for _ in range(TSAN_TRIES if sanitizer == "thread" else 1):
        try:
            sanitized(torch.float32, 32, sanitizer, unit, planted(*bug))
        except RuntimeError as e:
            assert re.search(report, str(e)), str(e)
            return
    pytest.fail(f"{sanitizer} sanitizer did not report the planted bug")


@pytest.mark.slow
def test_emulation_catches_a_ring_read_before_its_copies_land():
    """Waiting for one group too few reads a stage whose copies have not landed: NaN in the output."""
    y, _ = sanitized(torch.float16, 64, None, "vector", planted(RING_WAIT, "cp_async_wait<STAGES - 1>();"))
    assert torch.isnan(y).any()


def test_emulation_without_a_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-lth")
    with pytest.raises(EmulationUnavailable, match="install g\\+\\+"):
        build_emulation()


# ---- kernels on pipeline tickets and the CLI's --bench ----

@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_density_runs_the_grouped_gemm_on_a_fresh_regrouped_model(tmp_path, capsys):
    cfg = cli_config("--bench", "--method", "regroup", "--bench-density", "0.2", "--bench-repeats", "1",
                     "--bench-batch", "16")
    report = lth_tools.run_bench(cfg, str(tmp_path))            # (each layer times its paths)
    run = report["runs"][0]
    assert len(run["layers"]) == 18 and run["model"]["max_rel_err"] < 1e-4
    out = capsys.readouterr().out
    assert "batch 16: layer 1/18 layer1.0.conv1.weight timed (" in out and "batch 16: layer 18/18 " in out
    assert "batch 16: timing the whole network" in out
    assert report["memory_format"] == run["model"]["memory_format"] in kernels.MEMORY_FORMATS  # measured
    assert run["slim"]["max_rel_err"] < 1e-4 and run["slim"]["params_slim"] <= run["slim"]["params"]
    written = json.load(open(tmp_path / "bench.json"))
    assert written["arch"] == "resnet20" and written["ticket"] is None          # no ticket file was written
    _, ticket = lth_tools.fresh_ticket("resnet20", "synthetic", 0.2, "regroup", {}, out_dir=str(tmp_path))
    model = models.MODELS["resnet20"](10)
    model.load_state_dict(ticket["state_dict"])
    with torch.no_grad():                    # BN calibrated: the output depends on the input
        assert model.eval()(torch.randn(8, 3, 32, 32)).std(0).max() > 1e-3


@pytest.mark.parametrize("fastest", ["contiguous", "channels_last"])
def test_auto_memory_format_is_the_faster_one_for_the_dense_model(fastest, monkeypatch):
    """Each format made the faster one in turn (the probe times them in MEMORY_FORMATS' order, each
    forward run in its format): a probe that always answers one format fails one of the two."""
    formats = []

    def fake_timing(fns, device, repeats, warmup):
        for fn in fns:                                         # which format each timed forward runs in
            seen = []
            hook = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
            try:
                fn()
            finally:
                hook.remove()
            formats.append("channels_last" if seen[0] else "contiguous")
        return [1.0 if f == fastest else 2.0 for f in formats]
    monkeypatch.setattr(kernels, "time_interleaved", fake_timing)
    model = models.MODELS["resnet20"](10)
    assert lth_tools.faster_memory_format(model, (3, 32, 32), 2, "cpu", log=lambda *_: None) == fastest
    assert sorted(formats) == sorted(kernels.MEMORY_FORMATS)


def test_foreach_masking_equals_masking_each_weight():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in ((8, 4, 3, 3), (5, 7), (3,))]
    masks = [(torch.rand(p.shape, generator=g) < 0.3).float() for p in params]
    expected = [p * m for p, m in zip(params, masks)]          # the per-tensor rule, by hand
    L.remask(list(zip(params, masks)))
    assert all(torch.equal(p, e) for p, e in zip(params, expected))
    L.remask([])                                               # no masks (a dense run): nothing to do


@pytest.mark.parametrize("flag, dtype", [("bf16", torch.bfloat16), ("auto", torch.float32)])
def test_bench_dtype_flag_reaches_the_benches(flag, dtype, tmp_path, monkeypatch):
    got = {}
    monkeypatch.setattr(lth_tools, "fresh_ticket", lambda *a, **kw: ("ticket.pt", None))
    monkeypatch.setattr(lth_tools, "bench_kernels", lambda *a, **kw: got.update(kw))
    assert L.main(["--bench", "--bench-density", "0.2", "--method", "regroup", "--device", "cpu",
                   "--bench-dtype", flag, "--out-dir", str(tmp_path)]) == 0
    assert got["dtype"] == dtype                               # auto on the CPU: fp32


def test_bench_layer_progress_lines_count_the_layers_and_give_the_eta(monkeypatch):
    clock = iter([0.0, 2.0, 5.0, 6.0, 10.0])                   # layers of 2 s, 3 s, 1 s and 4 s
    monkeypatch.setattr(lth_tools.time, "perf_counter", lambda: next(clock))
    said = []
    line = lth_tools.layer_progress(2, 2, said.append)         # two layers at two batch sizes
    for batch, name, path in ((8, "a.weight", "dense"), (8, "b.weight", "gather"), (64, "a.weight", "dense"),
                              (64, "b.weight", "conv")):
        line(batch, {"name": name, "path": path})
    assert said == ["batch 8: layer 1/2 a.weight timed (dense) in 2.0s, ETA 0h00m06s",      # 3 left x 2 s
                    "batch 8: layer 2/2 b.weight timed (gather) in 3.0s, ETA 0h00m05s",     # 2 x 2.5 s
                    "batch 64: layer 1/2 a.weight timed (dense) in 1.0s, ETA 0h00m02s",     # 1 x 2 s
                    "batch 64: layer 2/2 b.weight timed (conv) in 4.0s, ETA 0h00m00s"]


def test_bench_train_times_ours_plain_and_the_masking(monkeypatch):
    """Under a fake clock (each step runs once; ours 20 ms, without masks 10, plain 40, masking 2),
    the row says what those times mean for a batch of 4, computed here by hand."""
    steps = fake_timing(monkeypatch, ms=(20.0, 10.0, 40.0, 2.0))
    said = []
    row = lth_tools.bench_train("resnet20", "cifar10", batch_size=4, repeats=2, device="cpu", log=said.append)
    assert said[0].startswith(f"timing {kernels.BENCH_WARMUP} + 2 rounds of three training steps")   # first
    assert len(steps[0]) == 4  # ours, ours without masks, plain, the masking: each ran
    assert (row["img_s_ours"], row["img_s_unmasked"], row["img_s_plain"]) == (200.0, 400.0, 100.0)
    assert (row["ours_vs_plain"], row["masked_vs_unmasked"]) == (2.0, 0.5)
    assert (row["ms_masking"], row["masking_pct_of_step"]) == (2.0, 10.0)


def test_bench_density_refuses_an_unstructured_method(tmp_path, capsys):
    assert L.main(["--bench", "--bench-density", "0.2", "--method", "imp",
                   "--out-dir", str(tmp_path)]) == 2
    assert "--bench-density needs" in capsys.readouterr().err
    assert L.main(["--bench", "--bench-density", "1.5", "--method", "regroup",
                   "--out-dir", str(tmp_path)]) == 2
    assert "--bench-density must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_cli_without_network_stops_with_a_hint_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    code = L.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"),
                   "--epochs", "2", "--levels", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Put cifar-10-python.tar.gz" in err and "Traceback" not in err


def test_device_auto_without_cuda_warns_once_and_uses_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert L.resolve_device("auto") == "cpu"
    assert capsys.readouterr().err.count("WARNING: no CUDA GPU found") == 1
    with pytest.raises(L.UsageError, match="--device cuda"):
        L.resolve_device("cuda")


def determinism_settings():
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


@pytest.mark.parametrize("flag", [[], ["--deterministic"]])
@pytest.mark.parametrize("before", [(False, False, False, None), (True, False, True, ":16:8")])
def test_deterministic_holds_while_the_experiment_trains_and_is_undone_after(monkeypatch, tmp_path, flag,
                                                                             before):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", before[2])
    if before[3]:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", before[3])
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    seen = []
    monkeypatch.setattr(L, "run_experiment", lambda cfg: seen.append(determinism_settings()))
    try:
        assert L.main(FAST + ["--out-dir", str(tmp_path / "run"), *flag]) == 0
        assert seen == [(True, True, False, before[3] or ":4096:8") if flag else before]
        assert determinism_settings() == before
    finally:
        torch.use_deterministic_algorithms(False)


def test_kernel_fallback_warning_is_one_stderr_line_per_message(capsys):
    kernels._warn_once("test fallback message")
    kernels._warn_once("test fallback message")
    captured = capsys.readouterr()
    assert captured.err == "WARNING: test fallback message\n" and captured.out == ""


# ---- slim: channel-wise tickets as smaller dense networks ----
# Exactness is checked in float64: fp32 summation-order noise (a slim conv adds fewer zeros, in another
# order) is amplified by deep untrained networks to ~1e-5 on VGG-16, while a wrong removal gives O(1).
SLIM_TOL = 1e-9


def channel_mask(weight, alive):
    """A refill-style mask: whole output rows, alive (O,) bool."""
    return alive.float()[:, None, None, None].expand_as(weight).clone()


def random_channel_masks(model, seed, one_alive=None):
    """Random whole-row masks for the prunable convs: about half the rows dead, every row with index
    % 4 == 1 dead in every conv (so every branch of a residual add drops it), row 0 always alive;
    in conv `one_alive` only row 0 survives."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, w in L.prunable_weights(model).items():
        rows = torch.arange(w.shape[0])
        alive = (torch.rand(w.shape[0], generator=g) > 0.5) & (rows % 4 != 1) | (rows == 0)
        if name == one_alive:
            alive = rows == 0
        masks[name] = channel_mask(w, alive)
    return masks


@torch.no_grad()
def masked_ticket(model, masks, seed=0):
    """The ticket as training leaves it: random BN (so a kept channel is not trivially zero), then
    conv weights * masks and the BN scale and shift of dead rows * bn_masks; float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0, 0.3, generator=g)
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    L.apply_masks(model, masks)
    L.apply_masks(model, models.bn_masks(model, masks))
    return model


def slim_err(model, slim, batch=2, seed=0):
    """Largest |slim - ticket| over the spread of the ticket's logits (the classifier bias alone is
    not evidence: it is the same in both)."""
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        ref, y = model(x), slim.eval()(x)
    return ((y - ref).abs().max() / (ref - ref.mean(0)).abs().max()).item()


@pytest.mark.parametrize("name, one_alive, stream", [
    ("vgg16", "features.24.weight", None),
    ("resnet20", "layer2.1.conv1.weight", "whole"),
    ("resnet18", "layer3.0.conv1.weight", "layer2.0.shortcut.0"),
    ("wrn32_2", "layer1.2.conv1.weight", "layer3.0.shortcut.0"),
    ("resnet50", "layer2.1.conv2.weight", "layer4.0.shortcut.0"),
])
def test_slim_model_equals_the_masked_ticket(name, one_alive, stream, one_thread):
    masks = random_channel_masks(built(name), seed=1, one_alive=one_alive)
    ticket = masked_ticket(built(name), masks)
    slim = models.slim_model(ticket, masks)
    assert slim_err(ticket, slim) < SLIM_TOL
    widths = {n: m.out_channels for n, m in slim.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths[one_alive[:-len(".weight")]] == 1
    assert count_params(slim) < count_params(ticket) and models.count_macs(slim) < models.count_macs(ticket)
    if stream == "whole":  # option-A pad shortcuts: the streams (every conv2's output) keep every channel
        assert all(widths[n] == m.out_channels for n, m in ticket.named_modules() if n.endswith("conv2"))
    elif stream:  # every branch into this stream drops rows % 4 == 1: the stream shrinks by at least 1/4
        assert widths[stream] <= 3 * ticket.get_submodule(stream).out_channels // 4
    assert all(torch.equal(p, q)
               for p, q in zip(ticket.parameters(), masked_ticket(built(name), masks).parameters()))


def test_mobilenet_v1_slims_pointwise_and_depthwise_channels(one_thread):
    model = built("mobilenet_v1")
    masks = {n: channel_mask(w, torch.arange(w.shape[0]) % 4 != 1)
             for n, w in L.prunable_weights(model).items()}
    ticket = masked_ticket(model, masks)
    slim = models.slim_model(ticket, masks).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():                     # random BN drowns the input's signal in 13 blocks: compare
        feats = [net.layers[:3](F.relu(net.bn1(net.conv1(x)))) for net in (ticket, slim)]   # early features
        logits = ticket(x), slim(x)
    kept = torch.arange(128) % 4 != 1
    assert torch.all(feats[0][:, ~kept] == 0) and (feats[0][:, kept] - feats[1]).abs().max() < 1e-12
    assert feats[1].std(0).max() > 1e-3 and (logits[0] - logits[1]).abs().max() < 1e-12
    dw = slim.layers[1].conv1                 # depthwise: follows the 64 -> 48 channels it reads
    assert (dw.in_channels, dw.groups, dw.out_channels, slim.layers[1].conv2.in_channels) == (48, 48, 48, 48)


def test_a_dead_row_with_a_live_bn_shift_is_kept(one_thread):
    masks = random_channel_masks(built("resnet20"), seed=2)
    ticket = masked_ticket(built("resnet20"), masks)
    dead_row = int(torch.nonzero(masks["layer1.0.conv1.weight"][:, 0, 0, 0] == 0)[0])
    ticket.layer1[0].bn1.bias.data[dead_row] = 0.5  # relu(bn(0)) = 0.5: conv2 reads it
    slim = models.slim_model(ticket, masks)
    kept = int(masks["layer1.0.conv1.weight"][:, 0, 0, 0].sum())
    assert slim.layer1[0].conv1.out_channels == kept + 1 == slim.layer1[0].conv2.in_channels
    assert slim_err(ticket, slim) < SLIM_TOL


def test_slim_param_and_mac_counts_match_a_hand_count():
    torch.manual_seed(0)
    model = models.VGG([4, 8, "M", 6], num_classes=3)  # convs features.0 (stem), .3, .7; fc
    alive3, alive7 = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1]), torch.tensor([0, 0, 1, 0, 0, 1])
    masks = {"features.3.weight": channel_mask(model.features[3].weight, alive3.bool()),
             "features.7.weight": channel_mask(model.features[7].weight, alive7.bool())}
    L.apply_masks(model, models.bn_masks(model, masks))
    slim = models.slim_model(model, masks)
    # stem 3->4: 3*9*4 = 108 + BN 8; conv 4->5: 4*9*5 = 180 + BN 10; conv 5->2: 5*9*2 = 90 + BN 4;
    # fc 2->3: 6 + 3 bias
    assert count_params(slim) == 108 + 8 + 180 + 10 + 90 + 4 + 6 + 3 == 409
    # 32x32: stem 1024*4*27; conv 1024*5*36; max-pool -> 16x16: conv 256*2*45; fc 2*3
    assert models.count_macs(slim) == 1024 * 4 * 27 + 1024 * 5 * 36 + 256 * 2 * 45 + 6 == 317_958
    assert models.count_macs(model) == 1024 * 4 * 27 + 1024 * 8 * 36 + 256 * 6 * 72 + 18


def test_bn_masks_are_zero_exactly_on_dead_rows():
    model = built("wrn32_2")
    masks = random_channel_masks(model, seed=3)
    masks["layer2.0.conv1.weight"][5, 0, 0, 0] = 1  # one weight left: the row is alive
    pairs, bms = models.conv_bn_pairs(model), models.bn_masks(model, masks)
    assert set(pairs) == set(L.prunable_weights(model))
    assert set(bms) == {f"{bn}.{p}" for bn in pairs.values() for p in ("weight", "bias")}
    for conv, bn in pairs.items():
        alive = masks[conv].flatten(1).sum(1) > 0
        for p in ("weight", "bias"):
            assert torch.equal(bms[f"{bn}.{p}"], alive.float())
    assert bms["layer2.0.bn1.weight"][5] == 1


def test_a_conv_bias_keeps_a_masked_row_alive():
    model = copy.deepcopy(built("wrn32_2"))   # a bias is added below
    masks = random_channel_masks(model, seed=3)
    conv = model.layer2[0].conv1
    dead = int(torch.nonzero(masks["layer2.0.conv1.weight"].flatten(1).sum(1) == 0)[0])
    conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    conv.bias.data[dead] = 0.5  # the row's output is the bias, not 0
    assert models.bn_masks(model, masks)["layer2.0.bn1.weight"][dead] == 1
    conv.bias.data[dead] = 0.0
    assert models.bn_masks(model, masks)["layer2.0.bn1.weight"][dead] == 0


def test_slim_export_loads_with_weights_only_into_a_fresh_module(one_thread):
    masks = random_channel_masks(built("wrn32_2"), seed=4, one_alive="layer3.4.conv1.weight")
    ticket = masked_ticket(built("wrn32_2"), masks).float()
    slim = models.slim_model(ticket, masks)
    buf = io.BytesIO()
    torch.save(models.slim_state(slim, "wrn32_2", 10), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["channels"]["layer3.4.conv1"] == 1 and state["arch"] == "wrn32_2"
    loaded = models.load_slim(state).eval()
    assert type(loaded) is type(slim) and count_params(loaded) == count_params(slim)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), slim.eval()(x), rtol=0, atol=1e-6)
    state["channels"]["layer3.0.shortcut.0"] -= 1  # no longer the width of the stream it shares
    with pytest.raises(ValueError, match="share their output channels"):
        models.load_slim(state)


def test_regroup_style_mask_slims_rows_in_no_block(one_thread):
    model, g = built("resnet20"), torch.Generator().manual_seed(5)
    masks = {}
    for name, w in L.prunable_weights(model).items():  # two blocks on 3/4 of the rows, the rest in none
        out_rows, k = w.shape[0], w[0].numel()
        rows = torch.randperm(out_rows, generator=g)[:3 * out_rows // 4]
        blocks = [(r.sort().values, torch.randperm(k, generator=g)[:k // 3].sort().values)
                  for r in rows.chunk(2)]
        masks[name] = kernels.block_mask(tuple(w.shape), blocks)
    ticket = masked_ticket(model, masks)
    slim = models.slim_model(ticket, masks)
    assert slim_err(ticket, slim) < SLIM_TOL
    assert slim.layer3[2].conv1.out_channels == 3 * 64 // 4 == slim.layer3[2].conv2.in_channels


class DepthwiseNet(nn.Module):
    """A stem, two depthwise-separable steps (depthwise 3x3 + BN, pointwise 1x1 + BN), a classifier."""

    def __init__(self):
        super().__init__()
        conv_bn = lambda c_in, c_out, k, groups: (
            nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))
        self.conv1, self.bn1 = conv_bn(3, 8, 3, 1)
        self.dw1, self.bn_dw1 = conv_bn(8, 8, 3, 8)
        self.pw1, self.bn_pw1 = conv_bn(8, 12, 1, 1)
        self.dw2, self.bn_dw2 = conv_bn(12, 12, 3, 12)
        self.pw2, self.bn_pw2 = conv_bn(12, 6, 1, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        for conv, bn in [("conv1", "bn1"), ("dw1", "bn_dw1"), ("pw1", "bn_pw1"), ("dw2", "bn_dw2"),
                         ("pw2", "bn_pw2")]:
            x = F.relu(getattr(self, bn)(getattr(self, conv)(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def depthwise_links(model, links):
    """A depthwise conv produces the channels it reads: listed as producer and reader of one link."""
    links += [models.ChannelLink([("conv1", "bn1"), ("dw1", "bn_dw1")], ["dw1", "pw1"]),
              models.ChannelLink([("pw1", "bn_pw1"), ("dw2", "bn_dw2")], ["dw2", "pw2"]),
              models.ChannelLink([("pw2", "bn_pw2")], ["fc"])]


def test_a_new_block_type_is_one_link_rule(monkeypatch, one_thread):
    monkeypatch.setitem(models.LINK_RULES, DepthwiseNet, depthwise_links)
    torch.manual_seed(0)
    model = DepthwiseNet()
    masks = {"pw1.weight": channel_mask(model.pw1.weight, torch.arange(12) % 3 == 0),
             "pw2.weight": channel_mask(model.pw2.weight, torch.arange(6) < 4)}
    assert set(models.conv_bn_pairs(model)) == set(masks)  # depthwise convs are not prunable
    assert torch.equal(models.bn_masks(model, masks)["bn_dw2.bias"], (torch.arange(12) % 3 == 0).float())
    ticket = masked_ticket(model, masks)
    slim = models.slim_model(ticket, masks)
    assert slim_err(ticket, slim) < SLIM_TOL
    assert (slim.dw2.in_channels, slim.dw2.groups, slim.dw2.out_channels, slim.fc.in_features) == (4, 4, 4, 4)
    assert models.count_macs(slim) == 1024 * (8 * 27 + 8 * 9 + 4 * 8 + 4 * 9 + 4 * 4) + 4 * 3


def test_channel_links_of_an_unknown_model_say_how_to_add_a_rule():
    with pytest.raises(ValueError, match="add one to models.LINK_RULES"):
        models.channel_links(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


@pytest.mark.slow
def test_a_refill_branch_trains_exactly_dead_channels_and_exports_a_slim_network(tmp_path, capsys):
    out, _ = run_cli(tmp_path, "--levels", "1", "--method", "refill")
    t = ticket(out, 1, "refill")
    model = models.MODELS["resnet20"](10)
    model.load_state_dict(t["state_dict"])
    for name, bn in models.conv_bn_pairs(model).items():   # the BN of every pruned row was masked too
        dead = t["masks"][name].reshape(t["masks"][name].shape[0], -1).sum(1) == 0
        assert dead.any() or name.endswith("conv2.weight")
        assert (torch.all(t["state_dict"][bn + ".weight"][dead] == 0)
                and torch.all(t["state_dict"][bn + ".bias"][dead] == 0))
    assert all(torch.any(t["state_dict"][models.conv_bn_pairs(model)[n] + ".bias"] != 0) for n in t["masks"])
    path = tmp_path / "slim.pt"
    assert L.main(FAST + ["--out-dir", out, "--method", "refill", "--export", str(path)]) == 0
    assert "WARNING" not in capsys.readouterr().err
    slim = models.load_slim(torch.load(path, weights_only=True)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(slim(x), model.eval()(x)) < 1e-5
    assert models.count_params(slim) < models.count_params(model)


@pytest.mark.slow
def test_exporting_an_unstructured_trunk_ticket_warns_that_dead_rows_stay(tmp_path, capsys):
    out, _ = run_cli(tmp_path, "--levels", "0")
    path = os.path.join(out, "level_00", "ticket.pt")
    t = L.load_ticket(path)
    name = "layer1.0.conv1.weight"
    t["masks"][name][0] = 0                                   # a pruned row whose BN stays free
    torch.save(t, path)
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path]) == 0
    assert "WARNING: 1 pruned output channels keep a BN scale or shift" in capsys.readouterr().err


# ---- bringing masks in, taking networks out ----
def torch_pruned_resnet20(amount=0.2, seed=0):
    """A resnet20 pruned by torch.nn.utils.prune.global_unstructured over lth_ref's prunable convs: its
    state_dict has `<conv>.weight_orig` and `<conv>.weight_mask` instead of `<conv>.weight`."""
    import torch.nn.utils.prune as prune
    torch.manual_seed(seed)
    model = models.MODELS["resnet20"](10)
    convs = [(model.get_submodule(n[:-len(".weight")]), "weight") for n in L.prunable_weights(model)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=amount)
    return model


def test_import_reads_a_torch_prune_state_dict_with_its_weights(tmp_path):
    pruned = torch_pruned_resnet20()
    sd = pruned.state_dict()
    assert "layer1.0.conv1.weight_mask" in sd and "layer1.0.conv1.weight" not in sd
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
               tmp_path / "ckpt.pth.tar")
    masks, weights = lth_tools.read_imported_masks(str(tmp_path / "ckpt.pth.tar"),
                                                   models.MODELS["resnet20"](10), "resnet20")
    assert set(masks) == set(L.prunable_weights(pruned)) == set(weights)
    assert all(torch.equal(masks[n], sd[n + "_mask"]) and torch.equal(weights[n], sd[n + "_orig"])
               for n in masks)


def test_import_reads_open_lth_masks_and_plain_dicts_and_ignores_the_stem_and_classifier(tmp_path, capsys):
    model = models.MODELS["resnet20"](10)
    masks = L.magnitude_prune(L.prunable_weights(model), L.ones_masks(L.prunable_weights(model)), 0.5)
    olth = {"conv.weight": torch.ones(16, 3, 3, 3, dtype=torch.int32),
            "fc.weight": torch.ones(10, 64, dtype=torch.int32)}
    for name, m in masks.items():  # layer{s}.{j}.convK -> open_lth's flat blocks.{3(s-1)+j}.convK
        stage, block, conv = re.match(r"layer(\d)\.(\d)\.(conv\d)\.weight", name).groups()
        olth[f"blocks.{3 * (int(stage) - 1) + int(block)}.{conv}.weight"] = m.int()
    torch.save(olth, tmp_path / "mask.pth")
    torch.save({n: m.bool() for n, m in masks.items()}, tmp_path / "plain.pt")
    for f in ("mask.pth", "plain.pt", "mask.pth"):              # a file is read at setup and at its level
        got, weights = lth_tools.read_imported_masks(str(tmp_path / f), model, "resnet20")
        assert weights == {} and set(got) == set(masks) and all(torch.equal(got[n], masks[n]) for n in masks)
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "conv1.weight, fc.weight" in err    # open_lth's stem and classifier


def test_import_maps_the_official_codes_names():
    ours = dict(models.MODELS["wrn32_2"](10).named_parameters())
    official = ["bn.weight", "layer2.0.downsample.0.weight", "layer2.0.bn3.bias", "linear.weight",
                "layer1.0.conv1.weight"]
    rules = lth_tools.best_name_map(official, ours, "wrn32_2")
    assert [lth_tools.rename(n, rules) for n in official] == ["bn1.weight", "layer2.0.shortcut.0.weight",
                                                              "layer2.0.shortcut.1.bias", "fc.weight",
                                                              "layer1.0.conv1.weight"]
    vgg = dict(models.MODELS["vgg16"](10).named_parameters())
    rules = lth_tools.best_name_map(["layers.16.conv.weight", "layers.3.bn.weight"], vgg, "vgg16")
    assert lth_tools.rename("layers.16.conv.weight", rules) == "features.40.weight" and \
        lth_tools.rename("layers.3.bn.weight", rules) == "features.8.weight"


@pytest.mark.parametrize("content, message", [
    (lambda sd: {k.replace("layer1", "stage1"): v for k, v in sd.items()},
     "no weight of that name ['stage1.0.conv1.weight"),
    (lambda sd: {k: v for k, v in sd.items() if "layer3" not in k}, "no mask for ['layer3.0.conv1.weight"),
    (lambda sd: {k: v * 0.5 if "layer2.1" in k else v for k, v in sd.items()},
     "other values in layer2.1.conv1.weight"),
    (lambda sd: {k: v * 0.5 for k, v in sd.items()}, "layer1.0.conv1.weight holds [0.5]"),
    (lambda sd: {k: (v * 255).to(torch.uint8) for k, v in sd.items()}, "a mask must hold only 0 and 1"),
    (lambda sd: {k: torch.randn(v.shape) for k, v in sd.items()}, "a state_dict with no masks"),
    (lambda sd: {"config": {"lr": 0.1}, "epoch": 3}, "no tensors at its top level (its dicts: ['config'])"),
    (lambda sd: {"layers": RunsCode("unused")}, "refuses to unpickle"),
])
def test_import_refuses_what_does_not_fit_with_a_message(tmp_path, content, message):
    model = models.MODELS["resnet20"](10)
    torch.save(content(L.ones_masks(L.prunable_weights(model))), tmp_path / "m.pt")
    with pytest.raises(L.UsageError) as e:
        lth_tools.read_imported_masks(str(tmp_path / "m.pt"), model, "resnet20")
    assert message in str(e.value)


def test_an_npz_of_masks_is_named_and_the_printed_conversion_imports(tmp_path, monkeypatch):
    model = models.MODELS["resnet20"](10)
    masks = L.magnitude_prune(L.prunable_weights(model), L.ones_masks(L.prunable_weights(model)), 0.5)
    path = str(tmp_path / "it's masks.npz")
    np.savez(path, **{k: v.numpy() for k, v in masks.items()})
    with pytest.raises(L.UsageError, match=r"is not a torch file \(a NumPy \.npz archive\): convert") as e:
        lth_tools.read_imported_masks(path, model, "resnet20")
    run_printed_command(str(e.value), monkeypatch)
    read, _ = lth_tools.read_imported_masks(path + ".pt", model, "resnet20")
    assert read.keys() == masks.keys() and all(torch.equal(read[n], masks[n]) for n in masks)


def test_a_pickle_or_zip_torch_did_not_write_is_not_a_torch_file_and_old_torch_files_import(tmp_path):
    model = models.MODELS["resnet20"](10)
    masks = L.magnitude_prune(L.prunable_weights(model), L.ones_masks(L.prunable_weights(model)), 0.5)
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump({k: v.numpy() for k, v in masks.items()}, f)
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as z:
        z.writestr("masks.json", "{}")
    for name, what in (("m.pkl", "a pickle, not torch.save's"), ("m.zip", "a zip archive without torch's")):
        with pytest.raises(L.UsageError, match=f"is not a torch file \\({what}"):
            lth_tools.read_imported_masks(str(tmp_path / name), model, "resnet20")
    torch.save(masks, tmp_path / "old.pt", _use_new_zipfile_serialization=False)   # torch < 1.6's format
    torch.save({k: v.to_sparse() for k, v in masks.items()}, tmp_path / "sparse.pt")
    for name in ("old.pt", "sparse.pt"):
        read, _ = lth_tools.read_imported_masks(str(tmp_path / name), model, "resnet20")
        assert read.keys() == masks.keys() and all(torch.equal(read[n], masks[n]) for n in masks)


def test_every_import_file_is_checked_at_setup_also_those_beyond_levels(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", lambda *_, **__: pytest.fail("the experiment started"))
    good = L.ones_masks(L.prunable_weights(built("resnet20")))
    torch.save(good, tmp_path / "a.pt")
    torch.save({**good, "layer1.0.conv1.weight": torch.ones(8, 16, 3, 3)}, tmp_path / "b.pt")   # 8 rows of 16
    assert L.main(FAST + ["--import-masks", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--levels", "1",
                          "--out-dir", str(tmp_path / "run")]) == 2
    assert str(tmp_path / "b.pt") in capsys.readouterr().err


@pytest.mark.parametrize("key, numpy_arrays", [("masks", False), ("state_dict", False), ("masks", True)])
def test_the_resave_command_for_a_trusted_file_with_python_objects_gives_a_file_that_imports(
        tmp_path, key, numpy_arrays, monkeypatch):
    model = models.MODELS["resnet20"](10)
    masks = L.magnitude_prune(L.prunable_weights(model), L.ones_masks(L.prunable_weights(model)), 0.5)
    path = str(tmp_path / "it's a checkpoint.pt")
    saved = {k: v.numpy() for k, v in masks.items()} if numpy_arrays else masks
    torch.save({key: saved, "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)   # as training scripts do
    with pytest.raises(L.UsageError, match="refuses to unpickle") as e:
        lth_tools.read_imported_masks(path, model, "resnet20")
    run_printed_command(str(e.value), monkeypatch)
    read, _ = lth_tools.read_imported_masks(path + ".tensors.pt", model, "resnet20")
    assert read.keys() == masks.keys() and all(torch.equal(read[n], masks[n]) for n in masks)


@pytest.mark.parametrize("wrap", [lambda m: {"masks": m, "epoch": 3},
                                  lambda m: {"model": m, "optimizer": {"lr": 0.1}},
                                  lambda m: {"model_state_dict": {f"module.{k}": v for k, v in m.items()}}])
def test_import_finds_masks_inside_a_checkpoints_usual_keys(tmp_path, wrap):
    model = models.MODELS["resnet20"](10)
    masks = L.magnitude_prune(L.prunable_weights(model), L.ones_masks(L.prunable_weights(model)), 0.5)
    torch.save(wrap(masks), tmp_path / "m.pt")
    read, _ = lth_tools.read_imported_masks(str(tmp_path / "m.pt"), model, "resnet20")
    assert read.keys() == masks.keys() and all(torch.equal(read[n], masks[n]) for n in masks)


def test_a_changed_trunk_setting_names_the_flag_and_what_level_0_does_not_read_may_change(tmp_path):
    cfg = cli_config("--out-dir", str(tmp_path), "--levels", "2")
    path = str(tmp_path / "config.json")
    L.write_text(json.dumps(L.trunk_config(cfg)), path)
    os.makedirs(tmp_path / "level_00")
    with pytest.raises(L.UsageError) as e:
        L.check_config(path, L.trunk_config(dataclasses.replace(cfg, lr=0.2)), True, reuse=cfg)
    assert all(w in str(e.value) for w in ("--lr 0.1 -> 0.2", "another --out-dir", "delete"))
    other_rate = dataclasses.replace(cfg, prune_rate=0.5)
    L.check_config(path, L.trunk_config(other_rate), True, reuse=other_rate)   # only level 0 exists: reused
    os.makedirs(tmp_path / "level_02")
    with pytest.raises(L.UsageError) as e:
        L.check_config(path, L.trunk_config(other_rate), True, reuse=other_rate)
    assert "--prune-rate 0.2 -> 0.5" in str(e.value) and str(tmp_path / "level_02") in str(e.value)
    assert str(tmp_path / "level_00") not in str(e.value)


def test_levels_past_the_last_weight_of_a_layer_stop_at_start(tmp_path, capsys):
    # resnet20's 267,264 prunable weights in 18 convs: 267264 * 0.8^43 = 18.2 weights, 0.8^44: 14.6 < 18
    weights = L.prunable_weights(built("resnet20"))
    assert sum(w.numel() for w in weights.values()) == 267_264 and len(weights) == 18
    for source in ("imp", "omp"):
        L.check_levels(cli_config("--levels", "43", "--mask-source", source), weights)
    out = tmp_path / "run"
    assert L.main(FAST + ["--levels", "1000", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "at level 44 only 14 of the 267264 prunable weights" in err and "--levels 43 or fewer" in err
    assert not out.exists()


def test_the_settings_line_says_the_subset_and_one_level_and_no_prune_rate_for_imported_masks(tmp_path,
                                                                                              capsys):
    procs = L.Processes()
    line = L.settings_line(cli_config("--levels", "1"), procs)
    assert "a seeded subset of 128 training images" in line and "1 level of 2 epochs" in line
    for flags, drops in ((["--epochs", "1"], "1 epoch, lr 0.1 (no drop)"),    # Table 1: x0.1 at 80, 120
                         (["--epochs", "3"], "3 epochs, lr 0.1 (x0.01 at 2)"),  # scaled: 1.5, 2.25 -> 2, 2
                         ([], "160 epochs, lr 0.1 (x0.1 at 80, x0.1 at 120)")):
        assert drops in L.settings_line(parsed_config(["--dataset", "synthetic", *flags]), procs)
    capsys.readouterr()
    assert cli_config("--lr-drops", "1", "5").lr_drops == [1, 5]   # kept as given (recorded)
    assert capsys.readouterr().err == ("WARNING: --lr-drops 5: at or after --epochs 2 a drop never applies "
                                       "(a drop at epoch E lowers the LR of the epochs after the first E)\n")
    assert "prune 20% per level" in L.settings_line(cli_config("--levels", "2"), procs)
    torch.save(L.ones_masks(L.prunable_weights(built("resnet20"))), tmp_path / "m.pt")
    line = L.settings_line(cli_config("--import-masks", str(tmp_path / "m.pt")), procs)
    assert "prune" not in line and "masks from 1 --import-masks file," in line
    explicit = cli_config("--mask-source", "import", "--import-masks", str(tmp_path / "m.pt"))
    assert explicit.mask_source == "import"
    said = []
    data.load_dataset("synthetic", "", train_subset=100, log=said.append)
    assert said[-1] == f"training on 100 of the {data.SYNTH_TRAIN} training images (seeded)"


def test_help_ends_with_examples_and_names_the_export_formats():
    text = L.build_parser().format_help()
    assert "examples:\n  python lth_ref.py " in text and "--report runs/" in text
    export_help = next(a.help for a in L.build_parser()._actions if "--export" in a.option_strings)
    assert all(suffix in export_help for suffix in lth_tools.EXPORT_FORMATS)


def bad_import_files(tmp_path):
    """{file: the words its error must say}: what users of other pruning tools hand over by mistake."""
    (tmp_path / "masks.txt").write_text("layer1.0.conv1.weight: 1 0 1 1\n")
    pruned = torch_pruned_resnet20()
    for module, _ in [(pruned.get_submodule(n[:-len(".weight")]), "w") for n in L.prunable_weights(pruned)]:
        torch.nn.utils.prune.remove(module, "weight")          # the masks are gone, the zeros stay
    torch.save(pruned.state_dict(), tmp_path / "weights.pt")
    masks = L.ones_masks(L.prunable_weights(models.MODELS["resnet20"](10)))
    torch.save({**masks, "layer2.0.conv1.weight": torch.ones(16, 32, 3, 3)}, tmp_path / "transposed.pt")
    olth = {f"blocks.{3 * (int(n[5]) - 1) + int(n[7])}.{n[9:]}": m for n, m in masks.items()}
    olth.update({"blocks.3.shortcut.0.weight": torch.ones(32, 16, 1, 1), "blocks.6.shortcut.0.weight":
                 torch.ones(64, 32, 1, 1)})                   # open_lth's ResNet-20: 1x1 projection shortcuts
    torch.save(olth, tmp_path / "open_lth.pth")
    (tmp_path / "masks_dir").mkdir()
    return {"masks.txt": ["not a torch file"], "masks_dir": ["masks_dir: a directory: give the mask files"],
            "weights.pt": ["a state_dict with no masks", "save the `*_mask` buffers or a {name: mask} dict"],
            "transposed.pt": ["layer2.0.conv1.weight: expected (32, 16, 3, 3), found (16, 32, 3, 3)"],
            "open_lth.pth": ["1x1 projection shortcuts", "'blocks.3.shortcut.0.weight', "
                             "'blocks.6.shortcut.0.weight'", "option-A", "d.pop(k)"]}


@pytest.mark.slow                                               # a python process per form
@pytest.mark.parametrize("form", [lambda m: m, lambda m: {f"module.{k}_mask": v for k, v in m.items()},
                                  lambda m: {"mask_" + k.replace(".", "___"): v for k, v in m.items()},
                                  lambda m: {"state_dict": {f"{k}_mask": v for k, v in m.items()}}])
def test_the_command_that_drops_projection_shortcut_masks_works_on_each_form_of_file(tmp_path, form):
    masks = L.ones_masks(L.prunable_weights(models.MODELS["resnet20"](10)))
    olth = {f"blocks.{3 * (int(n[5]) - 1) + int(n[7])}.{n[9:]}": m for n, m in masks.items()}
    olth.update({"blocks.3.shortcut.0.weight": torch.ones(32, 16, 1, 1), "blocks.13.conv1.weight":
                 torch.ones(1)})                            # a name the command must leave alone
    path = str(tmp_path / "m.pth")
    torch.save(form(olth), path)
    with pytest.raises(L.UsageError) as e:
        lth_tools.read_imported_masks(path, models.MODELS["resnet20"](10), "resnet20")
    command = re.search(r'python -c "(.*)"$', str(e.value)).group(1)
    subprocess.run([sys.executable, "-c", command], check=True)
    kept = L.load_file(path + ".option_a.pt", "fixed file")
    kept = kept.get("state_dict", kept)
    assert len(kept) == len(olth) - 1 and not any("shortcut" in k for k in kept)


def test_each_bad_import_file_stops_the_run_before_anything_trains_with_what_the_file_is(tmp_path, capsys):
    for name, words in bad_import_files(tmp_path).items():
        out = tmp_path / f"run_{name}"
        assert L.main(FAST + ["--out-dir", str(out), "--import-masks", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and all(w in err for w in words), (name, err)
        assert "another --arch?" not in err or name == "transposed.pt"
        assert not out.exists()                               # no init.pt, no level 0, no checkpoint


def test_an_import_files_hash_is_read_once_and_again_after_a_change(tmp_path):
    path = tmp_path / "masks.pt"
    path.write_bytes(b"first")
    reads = L._sha256_of.cache_info().misses
    assert L.file_sha256(str(path)) == L.file_sha256(str(path)) == hashlib.sha256(b"first").hexdigest()
    assert L._sha256_of.cache_info().misses == reads + 1          # the trunk's checks before every level
    path.write_bytes(b"second!")
    os.utime(path, ns=(1, 1))                                    # a new size and time: read again
    assert L.file_sha256(str(path)) == hashlib.sha256(b"second!").hexdigest()


def test_the_dropped_open_lth_shortcut_entries_leave_a_file_that_imports(tmp_path):
    bad_import_files(tmp_path)
    olth = torch.load(tmp_path / "open_lth.pth")
    [olth.pop(k) for k in ("blocks.3.shortcut.0.weight", "blocks.6.shortcut.0.weight")]
    torch.save(olth, tmp_path / "fixed.pth")
    with torch.device("meta"):
        model = models.MODELS["resnet20"](10)
    masks, _ = lth_tools.read_imported_masks(str(tmp_path / "fixed.pth"), model, "resnet20")
    assert set(masks) == set(L.prunable_weights(model))


@pytest.mark.slow
def test_a_fixed_import_file_reuses_level_0_and_a_changed_one_names_the_levels_to_delete(tmp_path, capsys):
    masks = {n: L.magnitude_prune({n: w.detach()}, {n: torch.ones_like(w)}, rate)[n] for rate in (0.5,)
             for n, w in L.prunable_weights(models.MODELS["resnet20"](10)).items()}
    torch.save(masks, tmp_path / "a.pt")
    torch.save({n: 1 - m if "layer1" in n else m for n, m in masks.items()}, tmp_path / "b.pt")
    out = str(tmp_path / "run")
    assert L.main(FAST + ["--out-dir", out, "--epochs", "1", "--import-masks", str(tmp_path / "a.pt"),
                          "--levels", "0"]) == 0            # the dense level 0 only (the file was wrong)
    init = L.load_file(os.path.join(out, "level_00", "ticket.pt"), "t")["state_dict"]
    assert L.main(FAST + ["--out-dir", out, "--epochs", "1", "--import-masks", str(tmp_path / "b.pt")]) == 0
    said = capsys.readouterr().out
    assert "trunk level 0: finished earlier, reused" in said and f"results are in {out}: results.csv" in said
    assert all(torch.equal(v, ticket(out, 0)["state_dict"][k]) for k, v in init.items())
    got = ticket(out, 1)["masks"]
    assert all(torch.equal(m, masks[n] if "layer1" not in n else 1 - masks[n]) for n, m in got.items())
    assert L.main(FAST + ["--out-dir", out, "--epochs", "1", "--import-masks", str(tmp_path / "a.pt")]) == 2
    err = capsys.readouterr().err
    assert "--import-masks file 1 (other content" in err and os.path.join(out, "level_01") in err
    assert "import-sha256" not in err


def test_a_level_trained_from_an_imported_file_that_is_left_out_or_replaced_is_stale(tmp_path):
    for level in ("level_00", "level_01", "level_02"):
        os.makedirs(tmp_path / level)
    cfg = types.SimpleNamespace(out_dir=str(tmp_path), levels=1)
    for old, new, text in ((["a", "b"], ["a"], "--import-masks 2 -> 1 files"),
                           (["a", "b"], ["a", "c"], "--import-masks file 2 (other content than before)")):
        changed = {"import_sha256": (old, new)}
        assert L.stale_levels(cfg, changed) == [str(tmp_path / "level_02")]
        assert L.changes_text(changed) == text


@pytest.mark.slow
def test_an_imported_torch_prune_trunk_trains_and_a_regroup_branch_post_processes_it(tmp_path):
    pruned = torch_pruned_resnet20()
    torch.save(pruned.state_dict(), tmp_path / "level1.pt")
    out, rows = run_cli(tmp_path, "--import-masks", str(tmp_path / "level1.pt"), "--method", "regroup")
    assert [(r["branch"], r["source"], r["level"]) for r in rows] == [
        ("trunk", "import", 0), ("trunk", "import", 1), ("regroup", "import", 1)]
    sd = pruned.state_dict()
    assert all(torch.equal(m, sd[n + "_mask"]) for n, m in ticket(out, 1)["masks"].items())
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["mask_source"] == "import"
            and config["import_sha256"] == [L.file_sha256(str(tmp_path / "level1.pt"))])
    assert ticket(out, 1, "regroup")["blocks"]
    # the same trunk again
    run_cli(tmp_path, "--import-masks", str(tmp_path / "level1.pt"), "--method", "refill")
    torch.save(torch_pruned_resnet20(seed=1).state_dict(), tmp_path / "other.pt")
    assert L.main(FAST + ["--out-dir", out, "--import-masks", str(tmp_path / "other.pt")]) == 2  # other masks


@pytest.mark.slow
def test_a_ticket_found_on_10_classes_transfers_to_a_100_class_run(tmp_path):
    out10, _ = run_cli(tmp_path, "--levels", "1", "--method", "refill", name="ten")
    write_cifar(tmp_path / "data", data.CIFAR100, train_rows=[40], test_rows=[10])
    found = os.path.join(out10, "level_01", "ticket.pt")
    out = str(tmp_path / "hundred")
    assert L.main(["--dataset", "cifar100", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                   "--batch-size", "20", "--device", "cpu", "--import-masks", found, "--out-dir", out]) == 0
    moved = ticket(out, 1)
    assert moved["num_classes"] == 100 and moved["state_dict"]["fc.weight"].shape == (100, 64)
    assert all(torch.equal(moved["masks"][n], m) for n, m in ticket(out10, 1)["masks"].items())


def test_channel_multiple_rounds_every_layers_kept_channels_up():
    weights = random_weights(5, shapes=((37, 8, 3, 3), (20, 37, 3, 3), (64, 20, 1, 1)))
    masks = L.magnitude_prune(weights, L.ones_masks(weights), 0.7)
    for method in ("refill", "refill+"):
        plain, _ = L.postprocess(method, weights, masks)
        rounded, _ = L.postprocess(method, weights, masks, channel_multiple=8)
        for n in masks:
            kept, before = (int((channel_counts(rounded[n]) > 0).sum()),
                            int((channel_counts(plain[n]) > 0).sum()))
            assert kept == min(masks[n].shape[0], -(-before // 8) * 8), (method, n, kept, before)
            assert torch.all(rounded[n] >= plain[n])                   # the same channels and a few more


def test_whole_model_counts_match_a_hand_count():
    torch.manual_seed(0)
    model = models.MODELS["vgg16"](10)
    masks = L.ones_masks(L.prunable_weights(model))
    masks["features.3.weight"][32:] = 0                             # conv 2 of 13: 32 of its 64 rows dead
    masks["features.7.weight"][:, :, 0, 0] = 0                       # conv 3: one tap of 9 pruned
    with torch.no_grad():
        model.features[4].weight[32:] = 0
        model.features[4].bias[32:] = 0                              # their BN, as training leaves it
    counts = L.whole_model_counts(model, masks, (3, 32, 32))
    assert counts["params"] == 14_724_042 and counts["macs"] == models.count_macs(model)
    # removed: conv 2's dead rows (32 x 64 x 9) and their BN affine (2 x 32); conv 3's columns that read
    # them (128 x 32 x 9); conv 3's pruned tap on the 32 inputs that are left (128 x 32)
    assert counts["params"] - counts["params_ticket"] == 32 * 64 * 9 + 2 * 32 + 128 * 32 * 9 + 128 * 32
    # the same weights' MACs: conv 2 at 32 x 32 pixels, conv 3 at 16 x 16 (after a max-pool)
    assert counts["macs"] - counts["macs_ticket"] == 1024 * 32 * 64 * 9 + 256 * (128 * 32 * 9 + 128 * 32)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_a_slim_network_exports_to_torch_export_and_onnx_and_matches_the_ticket(tmp_path, capsys, suffix):
    if suffix == ".onnx":
        for extra in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(extra, reason=f"the ONNX extra ({lth_tools.ONNX_EXTRA}) is not installed")
    out, _ = run_cli(tmp_path, "--levels", "1", "--method", "refill")
    path = str(tmp_path / f"slim{suffix}")
    assert L.main(FAST + ["--out-dir", out, "--method", "refill", "--export", path]) == 0
    model = lth_tools.ticket_model(ticket(out, 1, "refill"))
    x = torch.randn(5, 3, 32, 32)
    if suffix == ".pt2":
        y = torch.export.load(path).module()(x)
    else:
        import onnxruntime
        runtime = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = torch.from_numpy(runtime.run(None, {runtime.get_inputs()[0].name: x.numpy()})[0])
        meta = runtime.get_modelmeta().custom_metadata_map      # what a deployer must do to the images
        synth = data.load_dataset("synthetic", "", log=lambda *_: None)
        assert json.loads(meta["lth_ref.mean"]) == pytest.approx(synth.mean.tolist())
        assert json.loads(meta["lth_ref.std"]) == pytest.approx(synth.std.tolist())
        assert "0..255" in meta["lth_ref.input"]
    with torch.no_grad():
        assert kernels.rel_err(y, model(x), centered=True) < 1e-5
    assert "max_rel_err" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_of_a_refill_ticket_times_slim_networks_with_both_channel_multiples_and_in_onnx_runtime(
        tmp_path):
    for extra in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(extra, reason=f"the ONNX extra ({lth_tools.ONNX_EXTRA}) is not installed")
    report = lth_tools.run_bench(cli_config("--bench", "--method", "refill", "--bench-density", "0.5",
                                            "--bench-repeats", "1", "--bench-batch", "4"), str(tmp_path))
    run = report["runs"][0]
    assert run["slim"]["max_rel_err"] < 1e-5 and run["slim_multiple"]["max_rel_err"] < 1e-5
    assert run["slim_multiple"]["params_slim"] > run["slim"]["params_slim"]      # rounded up: more channels
    assert (run["onnx"]["max_rel_err"] < 1e-5
            and {"dense_ms", "slim_ms", "slim_multiple_8_ms"} <= set(run["onnx"]))


def saved_fresh_ticket(tmp_path):
    """An untrained, unpruned resnet20 saved as a ticket.pt (no training, no pruning: cheap)."""
    model = built("resnet20")
    torch.save(dict(config=dict(arch="resnet20", dataset="cifar10"), level=1, num_classes=10, metrics={},
                    masks=L.ones_masks(L.prunable_weights(model)), blocks=None,
                    state_dict=model.state_dict()),
               tmp_path / "t.pt")
    return str(tmp_path / "t.pt")


def test_an_arch_dataset_or_method_given_with_a_ticket_must_be_the_tickets(tmp_path, monkeypatch, capsys):
    path = saved_fresh_ticket(tmp_path)                           # resnet20 on cifar10
    monkeypatch.setattr(lth_tools, "ticket_model", lambda *_: pytest.fail("the export started"))
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path, "--arch", "vgg16"]) == 2
    assert capsys.readouterr().err == (f"error: {path} holds a resnet20 on cifar10 ticket, which runs as it "
                                       "is: drop --arch vgg16\n")
    cfg = cli_config("--arch", "resnet20", "--dataset", "cifar100")
    with pytest.raises(L.UsageError, match="drop --dataset cifar100$"):
        lth_tools.find_ticket(path, None, cfg, given={"arch", "dataset"})
    assert lth_tools.find_ticket(path, None, cfg, given={"arch"})[0] == path   # the same arch, given
    assert lth_tools.find_ticket(path, None, cli_config("--arch", "vgg16"))[0] == path   # a default
    ticket = torch.load(path)
    ticket["config"]["method"] = "refill"
    torch.save(ticket, path)
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path, "--method", "regroup"]) == 2
    assert "ticket (refill), which runs as it is: drop --method regroup\n" in capsys.readouterr().err
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--ticket {path} and --out-dir {tmp_path} both say which ticket: give one" in err


def test_bench_density_into_a_directory_with_a_ticket_is_refused(tmp_path, capsys):
    saved_fresh_ticket(tmp_path)                                  # tmp_path/t.pt
    os.replace(tmp_path / "t.pt", tmp_path / "ticket.pt")       # as in a level directory
    assert L.main(["--bench", "--bench-density", "0.5", "--method", "refill", "--out-dir",
                   str(tmp_path)]) == 2
    assert f"--out-dir {tmp_path} holds a ticket, whose bench.json" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_bench_regroup_prunes_a_fresh_network_to_bench_density(capsys):
    for density in (0.1, 0.3):
        rows = lth_tools.run_bench(cli_config("--bench", "regroup", "--bench-density", str(density),
                                              "--arch", "resnet20"), None)
        assert f"masks: a fresh seeded resnet20 pruned to density {density} " in capsys.readouterr().out
        sizes = [math.prod(int(d) for d in r["shape"].split("x")) for r in rows]
        kept = sum(r["density"] * n for r, n in zip(rows, sizes)) / sum(sizes)
        assert abs(kept - density) < 0.02                            # the convs' share of the weights


def test_export_goes_by_the_file_names_ending_in_either_case(tmp_path, capsys):
    path = saved_fresh_ticket(tmp_path)
    assert L.main(["--export", str(tmp_path / "slim.npz"), "--ticket", path]) == 2
    assert capsys.readouterr().err == (f"error: --export {tmp_path / 'slim.npz'}: the file name must end in "
                                       "one of .pt, .pt2, .onnx (its format)\n")
    assert L.main(["--export", str(tmp_path / "slim.PT"), "--ticket", path]) == 0
    slim = models.load_slim(torch.load(tmp_path / "slim.PT", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(slim.eval()(x), lth_tools.ticket_model(torch.load(path))(x), atol=1e-5)


def test_export_prints_the_written_networks_size_beside_the_tickets(tmp_path):
    path = saved_fresh_ticket(tmp_path)
    ticket = L.load_ticket(path)
    ticket["masks"]["layer1.0.conv2.weight"][3] = 0          # a row of a residual channel other blocks use
    rows = []
    row = lth_tools.export_slim(path, ticket, str(tmp_path / "slim.pt"), log=rows.append)
    slim = models.load_slim(torch.load(tmp_path / "slim.pt", weights_only=True))
    assert row["params_written"] == sum(p.numel() for p in slim.parameters())
    assert row["params_written"] - row["params_ticket"] == 16 * 3 * 3     # the zero row stays in the file
    assert "params_written" in rows[-1]


@pytest.mark.parametrize("name", ["t.pt", "init.pt", "checkpoint.pt"])
def test_export_never_writes_over_the_ticket_or_an_experiments_file(tmp_path, monkeypatch, capsys, name):
    path = saved_fresh_ticket(tmp_path)                       # tmp_path/t.pt
    (tmp_path / "init.pt").write_bytes(b"theta_0")
    (tmp_path / "checkpoint.pt").write_bytes(b"epoch 3")
    before = {f: (tmp_path / f).read_bytes() for f in ("t.pt", "init.pt", "checkpoint.pt")}
    monkeypatch.setattr(lth_tools, "ticket_model", lambda *_: pytest.fail("the export started"))
    assert L.main(["--export", str(tmp_path / name), "--ticket", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --export {tmp_path / name} would write over the experiment's own file")
    assert {f: (tmp_path / f).read_bytes() for f in before} == before


def test_export_writes_over_an_earlier_export(tmp_path):
    path = saved_fresh_ticket(tmp_path)
    (tmp_path / "slim.pt").write_bytes(b"an earlier export")
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path]) == 0
    assert "state_dict" in torch.load(tmp_path / "slim.pt", weights_only=True)


def test_export_onto_a_directory_is_an_error_before_the_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lth_tools, "ticket_model", lambda *_: pytest.fail("the export started"))
    (tmp_path / "slim.pt").mkdir()
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", saved_fresh_ticket(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: --export {tmp_path / 'slim.pt'} is a directory: give the "
                                       "path of the file to write\n")


def test_bench_density_into_a_file_is_an_error_before_the_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("notes")
    monkeypatch.setattr(lth_tools, "pruned_network", lambda *a: pytest.fail("pruned first"))
    assert L.main(["--bench", "--bench-density", "0.2", "--method", "regroup", "--device", "cpu",
                   "--out-dir", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out-dir {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file")
    assert (tmp_path / "afile").read_text() == "notes"


@pytest.mark.parametrize("bench, says", [
    (["train"], "--bench train times training steps"),
    (["regroup", "--bench-density", "0.2"], "--bench-density benchmarks")])
def test_bench_that_reads_no_out_dir_refuses_one(tmp_path, monkeypatch, capsys, bench, says):
    monkeypatch.setattr(lth_tools, "bench_train", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(lth_tools, "bench_regroup", lambda *a, **k: pytest.fail("measured"))
    assert L.main(["--bench", *bench, "--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out-dir {tmp_path} is not read by this command ({says}")
    assert err.endswith(", and it writes no file): drop it\n")


def test_a_bench_that_replaces_one_of_another_setting_or_method_says_so(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "bench.json")
    with open(out, "w") as f:
        json.dump({"method": "regroup", "setting": "dataset images", "runs": []}, f)
    lth_tools.warn_replaced_bench(out, "dataset images", "regroup")          # the same bench again: quiet
    assert capsys.readouterr().err == ""
    lth_tools.warn_replaced_bench(out, "paper (batch 64, 127x127, conv only)", "regroup")
    assert capsys.readouterr().err == (
        f"WARNING: {out} holds a bench of a regroup ticket, dataset images: this one (regroup, paper "
        "(batch 64, 127x127, conv only)) replaces it\n")
    lth_tools.warn_replaced_bench(out, "dataset images", "refill")
    assert "holds a bench of a regroup ticket" in capsys.readouterr().err
    path = saved_fresh_ticket(tmp_path)                                     # tmp_path/t.pt, beside it
    t = torch.load(path)
    t["config"]["method"] = "refill"
    torch.save(t, path)
    monkeypatch.setattr(lth_tools, "ticket_model", lambda *_: pytest.fail("timed"))
    with pytest.raises(pytest.fail.Exception):
        L.main(["--bench", "paper", "--ticket", path, "--device", "cpu"])
    assert "this one (refill, paper (batch 64, 127x127, conv only)) replaces it" in capsys.readouterr().err


def test_bench_into_an_unwritable_place_stops_before_it_measures(tmp_path, monkeypatch, capsys):
    path = saved_fresh_ticket(tmp_path)
    monkeypatch.setattr(kernels, "bench_layers", lambda *a, **k: pytest.fail("measured first"))
    monkeypatch.setattr(L.os, "access", lambda p, mode: not mode & os.W_OK)   # as on a read-only mount
    assert L.main(["--bench", "--ticket", path, "--device", "cpu", "--bench-memory-format",
                   "contiguous"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --bench writes bench.json into {tmp_path}: this user "
                                              "may not write to")


@pytest.mark.slow
def test_a_checkpoint_left_beside_a_finished_ticket_is_removed_when_the_level_is_reused(tmp_path):
    out, _ = run_cli(tmp_path, "--levels", "0")
    level = os.path.join(out, "level_00")
    shutil.copy(os.path.join(level, "ticket.pt"), os.path.join(level, "checkpoint.pt"))   # stopped there
    run_cli(tmp_path, "--levels", "0")
    assert sorted(os.listdir(level)) == ["ticket.pt"]


def test_a_dangling_link_as_out_dir_is_an_error_before_the_work(tmp_path, capsys):
    (tmp_path / "run").symlink_to(tmp_path / "unmounted")
    assert L.main(FAST + ["--levels", "0", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "is a link to" in err and "does not exist" in err and not (tmp_path / "unmounted").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self") or os.geteuid() != 0,
                    reason="needs Linux's /proc, as root (whose mode bits say it may write there)")
def test_a_place_where_nothing_can_be_created_is_an_error_before_the_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", lambda *_, **__: pytest.fail("the experiment started"))
    monkeypatch.setattr(lth_tools, "ticket_model", lambda *_: pytest.fail("the export started"))
    assert L.main(FAST + ["--levels", "0", "--out-dir", "/proc/run"]) == 2   # root's mode bits say writable
    assert capsys.readouterr().err.startswith("error: --out-dir /proc/run: ")
    assert L.main(["--export", "/proc/slim.pt", "--ticket", saved_fresh_ticket(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --export /proc: ")


def test_export_into_an_unwritable_place_is_an_error_before_the_work_and_a_write_fault_is_one_too(
        tmp_path, monkeypatch, capsys):
    path = saved_fresh_ticket(tmp_path)
    (tmp_path / "file").write_text("")
    with monkeypatch.context() as m:
        m.setattr(lth_tools, "ticket_model", lambda *a: pytest.fail("the export's work started"))
        assert L.main(["--export", str(tmp_path / "file" / "slim.pt"), "--ticket", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --export") and "is a file, not a directory" in err

    def read_only(obj, where):                    # a read-only file system: root's mode bits do not stop it
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), where)
    monkeypatch.setattr(lth_tools, "save", read_only)
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write" in err and "Read-only file system" in err and "slim.pt" in err
    assert not any(p.name.startswith("slim.") for p in tmp_path.iterdir())


def test_atomic_write_hands_a_path_writer_a_temporary_name_with_the_extension_then_renames_it(tmp_path):
    seen = []
    L.atomic_write(str(tmp_path / "net.pt2"), lambda p: (seen.append(p), open(p, "w").write("x")), mode=None)
    assert seen[0].endswith(".pt2") and seen[0] != str(tmp_path / "net.pt2")
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt2"]


def test_an_export_whose_network_differs_from_the_ticket_is_refused_and_not_written(tmp_path, monkeypatch,
                                                                                   capsys):
    path = saved_fresh_ticket(tmp_path)

    def wrong_writer(slim, ticket, x, x_check, out):      # writes a file whose network lost one channel
        slim.get_submodule("conv1").weight.data[0] = 0
        open(out, "wb").close()
        return slim(x_check)
    monkeypatch.setitem(lth_tools.EXPORT_FORMATS, ".pt", wrong_writer)
    assert L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path]) == 2
    err = capsys.readouterr().err
    assert "outputs differ from the ticket's" in err and not (tmp_path / "slim.pt").exists()


def test_a_non_write_os_error_still_shows_its_traceback(tmp_path, monkeypatch):
    path = saved_fresh_ticket(tmp_path)
    monkeypatch.setattr(lth_tools, "ticket_model",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        L.main(["--export", str(tmp_path / "slim.pt"), "--ticket", path])


def test_onnx_export_without_the_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(L.UsageError, match="pip install onnx onnxscript onnxruntime"):
        lth_tools.import_onnx("--export .onnx")


# ---- README ----
def test_every_command_of_the_gpu_check_parses():
    """.ci/gpu-check runs on a lent GPU only, never in CI: each of its lth_ref.py commands must parse and
    pass the settings' checks here, so that a renamed flag fails now and not on the GPU."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = open(os.path.join(here, ".ci", "gpu-check")).read().replace("\\\n", "")
    bench = re.search(r'^B="python3 lth_ref.py (.*)"$', script, re.M).group(1)
    commands = [line.replace("$B", "lth_ref.py " + bench) for line in script.splitlines()
                if line.startswith("step ") and ("lth_ref.py" in line or "$B" in line)]
    assert len(commands) >= 9
    for line in commands:
        argv = shlex.split(line.split("lth_ref.py", 1)[1].replace("$t", "/tmp/unused"))
        assert parsed_config(argv).out_dir, line
    assert "kernels.cuda_extension()" in script and callable(kernels.cuda_extension)
    assert {"device", "dtype"} <= set(inspect.signature(kernels.bench_dense_cost).parameters)


@functools.lru_cache(maxsize=2)
def module_source(path):
    """(its import statements, {top-level name: (line, source text with decorators, names it reads)})."""
    src = open(path).read()
    tree, lines, segments = ast.parse(src), src.splitlines(), {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
        reads = {x.id for x in ast.walk(node) if isinstance(x, ast.Name)}
        segments.update({n: (node.lineno, "\n".join(lines[first - 1:node.end_lineno]), reads) for n in names})
    imports = [ast.get_source_segment(src, n) for n in tree.body
               if isinstance(n, (ast.Import, ast.ImportFrom))]
    return imports, segments


def copied_pieces(row_names, module=L):
    """A fresh namespace holding only the module's imports (lth_ref.py's, or lth_tools.py's, which import
    lth_ref), the definitions `row_names` lists and the UPPER_CASE constants they read (transitively), each
    from its source text, as a user copies them."""
    imports, segments = module_source(module.__file__)
    todo = {n for n in row_names if n in segments}
    while more := {r for n in todo for r in segments[n][2] if r in segments and r.isupper()} - todo:
        todo |= more
    ns = {"kernels": kernels, "model_zoo": models, "datasets": data}   # the modules rows name as needs
    for statement in imports:
        exec(statement, ns)
    for n in sorted(todo, key=lambda n: segments[n][0]):
        exec(segments[n][1], ns)
    return ns


@pytest.mark.parametrize("rows, call", [
    (["global magnitude pruning"], lambda ns, w, m: ns["magnitude_prune"](w, m, 0.2)),
    (["one-shot masks"], lambda ns, w, m: (
        ns["prune_to_density"](w, 0.5), ns["random_masks"](m, torch.Generator().manual_seed(0)),
        ns["snip_scores"](MODELS["resnet20"](10), ["layer1.0.conv1.weight"], torch.randn(2, 3, 8, 8),
                          torch.arange(2)),
        ns["grasp_scores"](MODELS["resnet20"](10), ["layer1.0.conv1.weight"], torch.randn(2, 3, 8, 8),
                           torch.arange(2)),
        ns["synflow_masks"](MODELS["resnet20"](10), ["layer1.0.conv1.weight"], 0.5, 2, (3, 8, 8)),
        ns["admm_project"](w, 0.5))),
    (["masks on a model"], lambda ns, w, m: ns["density"](ns["ones_masks"](ns["prunable_weights"](
        MODELS["resnet20"](10))))),
    (["refill / refill+"], lambda ns, w, m: (ns["refill"](w, m), ns["refill_plus"](w, m))),
    (["regroup"], lambda ns, w, m: [ns["regroup"](m, block_columns=r) for r in L.BLOCK_COLUMNS] + [
        ns["regroup_mask"](m["a"], unit=u) for u in L.REGROUP_UNITS] + [
        ns["regroup_mask"](torch.eye(16, 72), block_columns="paper", min_col_nnz=8)]),   # no block found
    (["structural tickets", "refill / refill+", "regroup"],
     lambda ns, w, m: [ns["postprocess"](method, w, m) for method in ("refill", "refill+", "regroup")]),
    (["quality numbers"], lambda ns, w, m: (ns["layer_stats"](m["a"], m["a"]), ns["whole_model_counts"](
        MODELS["resnet20"](10), L.ones_masks(L.prunable_weights(MODELS["resnet20"](10))), (3, 8, 8)))),
    (["masks from torch.nn.utils.prune"], lambda ns, w, m: imported_masks(ns)),
    (["the paper's figures"], lambda ns, w, m: the_papers_figures(ns)),
])
def test_each_piece_of_the_copy_table_runs_on_its_own(rows, call):
    """README's "Copying a piece" rows name every definition their functions need: copied alone (with
    the constants they read and the imports), they run."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    table = readme[readme.index("| you want | copy | needs |"):].split("\n\n")[0].splitlines()[2:]
    cells = [r.split(" | ")[1] for r in table if any(r.startswith(f"| {row}") for row in rows)]
    assert len(cells) == len(rows)
    module = lth_tools if all("(lth_tools.py)" in c for c in cells) else L
    ns = copied_pieces([n for c in cells for n in re.findall(r"`([A-Za-z_]\w*)(?![\w.])", c)], module)
    torch.manual_seed(0)
    w = {"a": torch.randn(16, 8, 3, 3), "b": torch.randn(24, 16, 1, 1)}
    call(ns, w, {n: (v.abs() > 0.7).float() for n, v in w.items()})


def imported_masks(ns):
    """ns's read_imported_masks on a torch file of ResNet-20's all-ones masks, in a temporary folder."""
    model = MODELS["resnet20"](10)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(L.ones_masks(L.prunable_weights(model)), os.path.join(folder, "m.pt"))
        return ns["read_imported_masks"](os.path.join(folder, "m.pt"), model, "resnet20")


def the_papers_figures(ns):
    """The report's pieces on two hand-made seeds of one experiment: rows, the extreme ticket, figures."""
    cfg = dict(arch="resnet20", dataset="cifar10")
    levels = ((0, 1.0, 0.9), (1, 0.8, 0.91))                     # (level, density, test_acc)
    rows = [dict(branch=b, source="imp", method=m, init="rewind", level=lv, density=d, test_acc=a)
            for b, m in (("trunk", "imp"), ("regroup", "regroup")) for lv, d, a in levels
            if not (b == "regroup" and lv == 0)]
    combined = ns["with_paper"](ns["combine_seeds"]([rows, rows]), cfg, {})
    ns["extreme_ticket"]([r for r in combined if r["branch"] == "regroup"], 0.9)
    if importlib.util.find_spec("matplotlib"):
        mask = (torch.rand(16, 72, generator=torch.Generator().manual_seed(0)) < 0.3).float()
        blocks = [(torch.arange(8), torch.arange(20))]
        ns["accuracy_figure"](combined, 0.9, "t", "resnet20", "cifar10")
        ns["mask_figure"]([("trunk", mask), ("regroup", kernels.block_mask(mask.shape, blocks))], "layer")
        ns["layer_speedup_figure"]({"runs": [{"batch": 64, "layers": [
            dict(name="a", flop_ratio=0.5, dense_ms=2.0, regrouped_ms=1.0)]}]})
    ns["block_order"]([(np.arange(8), np.arange(20))], 16, 72)


def test_readme_quotes_only_names_the_code_has():
    """Every snake_case name README quotes in `...` (not a path or file name) occurs in our code (its
    definitions, or the official code's names its docstrings cite), but for a placeholder: a renamed
    function leaves no stale name behind."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = " ".join(open(os.path.join(here, f)).read()
                    for f in ("lth_ref.py", "lth_tools.py", "kernels.py", "models.py", "data.py", __file__))
    quoted = set()
    for span in re.findall(r"`([^`\n]+)`", open(os.path.join(here, "README.md")).read()):
        quoted.update(re.findall(r"(?<![/\w])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b(?![/.\w-])", span))
    stale = sorted(n for n in quoted - {"your_source"} if not re.search(rf"\b{n}\b", code))
    assert len(quoted) > 100 and stale == []


def test_readme_cli_table_lists_every_flag_with_its_default_and_help():
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    table = readme[readme.index("## CLI reference"):]
    rows = {m.group(1): m.group(2)
            for m in re.finditer(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]*) \|", table, re.M)}
    helps = {m.group(1): m.group(2).replace("\\|", "|")
             for m in re.finditer(r"^\| `(--[a-z-]+)[^`]*` \| [^|]* \| ((?:[^|\\]|\\\|)*) \|", table, re.M)}
    for field in dataclasses.fields(L.Config):
        flag = "--" + field.name.replace("_", "-")
        assert helps.get(flag) == field.metadata["help"].replace("%%", "%"), f"README's help of {flag}"
    for action in L.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            flag, default = action.option_strings[0], action.default
            assert flag in rows, f"README's CLI table lacks {flag}"
            expected = "-" if default is None or default is False else " ".join(map(str, default)) \
                if isinstance(default, list) else str(default)
            assert rows[flag].strip() == expected, flag


# ---- small hand-checked cases of the helpers ----
def test_out_dir_without_ticket_picks_the_runs_last_finished_level(tmp_path):
    fresh = saved_fresh_ticket(tmp_path)
    run = tmp_path / "exp"
    for level in (1, 2):                                  # two finished trunk levels
        os.makedirs(run / f"level_{level:02d}")
        shutil.copy(fresh, run / f"level_{level:02d}" / "ticket.pt")
    path, _ = lth_tools.find_ticket(None, str(run), cli_config("--arch", "resnet20"))
    assert path == str(run / "level_02" / "ticket.pt")   # the last, not the first


def test_result_row_counts_channels_over_all_rows_and_weights_ratios_and_coverage_by_layer():
    # a: 4 rows x 1 weight, 1 row kept; b: 2 rows x 8 weights, both kept (20 weights, 6 rows)
    masks = {"a": torch.zeros(4, 1, 1, 1), "b": torch.ones(2, 8, 1, 1)}
    masks["a"][0] = 1
    blocks = {"a": [([0], [0])], "b": [([0, 1], list(range(8)))]}   # FLOP ratios 0.25 and 1.0
    stats = {"a": dict(coverage=1.0, density_before=0.5), "b": dict(coverage=0.5, density_before=0.25)}
    run = L.Run("refill", "x", "refill", "rewind", False)
    row = L.result_row(cli_config(), run, 1, masks, blocks, stats, dict(test=0.5, loss=1.0), 1.0, {})
    assert row["channel_density"] == 0.5                 # 3 of 6 rows (per-layer mean: 0.625)
    assert row["flop_ratio"] == 0.85                     # (0.25 * 4 + 1.0 * 16) / 20 (mean: 0.625)
    assert row["density_before"] == 0.3                  # (0.5 * 4 + 0.25 * 16) / 20 (mean: 0.375)
    assert row["coverage"] == 0.666667                   # IMP's 2 + 4 nonzeros, 2 + 2 kept (mean: 0.75)


def test_layer_stats_channel_density_is_that_of_the_post_processed_mask():
    before, after = torch.ones(4, 3), torch.zeros(4, 3)
    after[:2] = 1                                        # 2 of 4 rows kept after; all 4 before
    assert L.layer_stats(before, after)["channel_density"] == 0.5


def test_partition_rows_seeds_each_group_with_the_largest_mass_not_the_first_free_row():
    # masses 1, 1.9, 1.9: the seed is row 1 (first maximum), which takes row 2; row 0 is left alone
    sim = np.array([[1, 0, 0], [0, 1, .9], [0, .9, 1]])
    assert [g.tolist() for g in L.partition_rows(sim, 2)] == [[1, 2], [0]]


def test_minimal_block_keeps_the_rows_densest_in_the_most_used_units():
    units = np.array([[0, 0], [0, 1], [1, 1], [1, 1]])
    # unit 1 is used by 3 rows (unit 0 by 2); rows 1-3 hold 1 each there: the first two of them (stable)
    [(rows, cols)] = L.minimal_block(units, 2, 1)
    assert rows.tolist() == [1, 2] and cols.tolist() == [1]


def test_a_regroup_pass_rounds_its_group_size_up_to_a_multiple_of_b1():
    # 100 rows, t1 = 8, b1 = 8: ceil(100 / 8) = 13 rounds up to 16: six groups of 16 and one of 4,
    # which (under b1) waits for the next pass
    n = 100
    sizes = L.regroup_pass(np.ones((n, 4)), np.ones((n, n)), 1, 1e9, 8, 8, 1, 1,
                           lambda units, parts, *_: [len(p) for p in parts])
    assert sizes == [16] * 6


def test_a_setting_absent_from_an_older_config_compares_as_its_default(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"arch": "resnet20"}))    # written before --lr-schedule existed
    assert L.config_changes(str(path), {"arch": "resnet20", "lr_schedule": "resume"}) == {}  # the default
    assert L.config_changes(str(path), {"lr_schedule": "restart"}) == {"lr_schedule": ("resume", "restart")}


@pytest.mark.parametrize("content", ["[]", "null", "3"])
def test_a_config_that_is_json_but_not_an_object_is_damaged_with_its_fix(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(L.UsageError) as e:
        L.config_changes(str(tmp_path / "config.json"), {"arch": "resnet20"})
    assert str(e.value) == (f"{tmp_path / 'config.json'} is damaged (JSON, but not an object of settings): "
                            "use another --out-dir, or delete the directory to start over")


def test_a_level_finished_while_taking_its_lock_is_reused_not_trained(tmp_path, monkeypatch):
    run = L.Run("trunk", str(tmp_path), "imp", "rewind", False)
    closed = []
    lock = types.SimpleNamespace(close=lambda: closed.append(True))

    def lock_as_the_other_finishes(path):               # the other process wrote its ticket meanwhile
        os.makedirs(tmp_path / "level_01")
        (tmp_path / "level_01" / "ticket.pt").write_bytes(b"")
        return lock
    monkeypatch.setattr(L, "try_lock", lock_as_the_other_finishes)
    monkeypatch.setattr(L, "settings_changed", lambda *_: None)
    exp = types.SimpleNamespace(procs=L.Processes(), cfg=cli_config(), log=print)
    assert L.claim_level(exp, run, 1) is None and closed == [True]   # done; the lock released


def test_split_import_of_an_lth_ref_ticket_returns_the_trained_weights_of_its_masked_layers():
    w, bias, m = torch.randn(3, 2), torch.randn(3), torch.ones(3, 2)
    masks, weights = lth_tools.split_import(dict(masks={"fc.weight": m},
                                                 state_dict={"fc.weight": w, "fc.bias": bias}), "t.pt")
    assert list(masks) == ["fc.weight"] and list(weights) == ["fc.weight"]   # bias: not masked
    assert weights["fc.weight"] is w


def test_a_pruned_row_is_kept_when_its_bn_scale_or_its_shift_is_nonzero():
    model = copy.deepcopy(built("resnet20"))
    bn = model.layer1[0].bn2                             # conv_bn_pairs: layer1.0.conv2's BN
    mask = torch.ones_like(model.layer1[0].conv2.weight)
    mask[:3] = 0                                         # rows 0-2 pruned
    with torch.no_grad():
        bn.weight[:3] = torch.tensor([0.0, 1.0, 0.0])
        bn.bias[:3] = torch.tensor([1.0, 0.0, 0.0])      # row 0: shift only; row 1: scale only; row 2: none
    assert lth_tools.kept_dead_rows(model, {"layer1.0.conv2.weight": mask}) == 2


def test_channel_blocks_refuses_a_mask_whose_kept_rows_are_not_whole_channels():
    with pytest.raises(L.UsageError, match="not channel-wise"):
        lth_tools.channel_blocks(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    [(rows, cols)] = lth_tools.channel_blocks(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert rows.tolist() == [1] and cols.tolist() == [0, 1]


def test_combined_seed_rows_come_trunk_first_then_by_branch_and_level():
    row = lambda branch, level: dict(source="imp", branch=branch, method="m", init="rewind", level=level,
                                     density=0.5, test_acc=0.9)
    seed = [row("refill", 1), row("trunk", 2), row("imp_reinit", 1), row("trunk", 1)]   # out of order
    rows = lth_tools.combine_seeds([seed])
    assert [(r["branch"], r["level"]) for r in rows] == [("trunk", 1), ("trunk", 2), ("imp_reinit", 1),
                                                         ("refill", 1)]


def test_a_dict_with_bn_statistics_is_weights_only_even_beside_a_mask_like_tensor():
    tensors = {"bn1.running_mean": torch.zeros(4), "conv.weight": torch.ones(4, 3)}   # 0/1: looks like a mask
    assert lth_tools.is_weights_only(tensors)
    assert not lth_tools.is_weights_only({"conv.weight": torch.ones(4, 3)})
