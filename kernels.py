"""
Running regrouped convs fast: a grouped GEMM over the dense blocks of a structural ticket.

Paper: Chen et al., "Coarsening the Granularity: Towards Structurally Sparse Lottery Tickets",
ICML 2022, Sec. 3.3 and A1 (regroup, then one kernel per layer that runs all dense blocks).
A regrouped conv with weight W (O, C, kh, kw) has `blocks`: a list of (rows, cols) int64 tensors,
rows = output channels (disjoint across blocks), cols = flattened (c, ky, kx) positions of
W.view(O, K), K = C*kh*kw. Its mask is the union of the rows x cols rectangles, and
    Y[n, rows_b, oh, ow] = sum_{k in cols_b} W2[rows_b, k] * im2col(X)[n, k, oh, ow]
with output channels in no block equal to 0 (plus the bias, if any).

Paths (PATHS), all giving the output of F.conv2d with the block-masked weight:
- dense: one F.conv2d (oneDNN / cuDNN) with the masked weight, rebuilt from the packed blocks.
- conv: one conv per block over the input channels it uses; grouped: the same as one grouped conv
  (blocks zero-padded to the largest); gather: im2col of the used columns once, one matmul per block.
- kernel (CUDA only): CUDA_SRC, one launch per layer, WMMA tensor cores, implicit im2col.
RegroupedConv2d runs the fastest path for each input it meets: on the first input of each shape,
dtype, memory format and device it times every candidate (CANDIDATES; dense always among them, like
cudnn.benchmark) and keeps the winner. It holds the packed blocks and index tables; a path's own
tensors are built when it is measured or chosen and freed when it is not chosen.
grouped_gemm_reference (unfold + index_select + matmul) is the obviously-correct reference.
Without a GPU, emulated_grouped_conv2d runs CUDA_SRC itself on the CPU: compiled by g++ with
EMULATION_HEADER (CUDA threads as OS threads, real barriers, checked WMMA), also under sanitizers.
bench_layers / bench_model: dense (cuDNN/oneDNN) vs regrouped, per layer and end to end.
This file imports nothing else of its project: copy it alone.
"""

import copy
import ctypes
import hashlib
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

_WARNED = set()  # messages already printed once in this process


def _warn_once(msg):
    """Print one `WARNING:` line per distinct message and process."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(f"WARNING: {msg}", file=sys.stderr)


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def memory_format_of(x):
    """torch.channels_last when the 4-D x is stored channels-last (N, H, W, C in memory) and not
    also plain contiguous (as when C or H*W is 1), else torch.contiguous_format."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def select_channels(x, chans):
    """x[:, chans] (x: N, C, H, W) in x's memory format: copies of whole (H, W) planes for NCHW, a
    column gather of the (N*H*W, C) matrix for channels-last."""
    if memory_format_of(x) != torch.channels_last:
        return x.index_select(1, chans)
    N, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(-1, C).index_select(1, chans).view(N, H, W, -1).permute(0, 3, 1, 2)


def _pair(v):
    """int or pair -> (int, int)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_out_hw(hw, kernel, stride, padding, dilation):
    """Output (OH, OW) of a conv on an input of spatial size hw = (H, W)."""
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


# ---- blocks: validation, packing, masks ----

def check_blocks(weight_shape, blocks, name="conv"):
    """Validate blocks for a conv weight of shape (O, C, kh, kw); return them as sorted int64 CPU
    tensors, empty blocks dropped. Raises ValueError naming the layer when a block does not fit."""
    O, C, kh, kw = weight_shape
    K = C * kh * kw
    out, seen = [], torch.zeros(O, dtype=torch.bool)
    for i, block in enumerate(blocks):
        if len(block) != 2:
            raise ValueError(f"{name}: block {i} must be a pair (rows, cols)")
        rows, cols = (torch.as_tensor(t).reshape(-1).to("cpu", torch.int64) for t in block)
        if rows.numel() == 0 or cols.numel() == 0:
            continue
        for what, idx, size in (("row", rows, O), ("col", cols, K)):
            if idx.min() < 0 or idx.max() >= size:
                bad = idx[(idx < 0) | (idx >= size)][0].item()
                raise ValueError(f"{name}: block {i} has {what} index {bad}, out of range for "
                                 f"weight {tuple(weight_shape)} ({size} {what}s)")
            if torch.unique(idx).numel() != idx.numel():
                raise ValueError(f"{name}: block {i} repeats a {what} index")
        if seen[rows].any():
            raise ValueError(f"{name}: block {i} shares output rows with an earlier block")
        seen[rows] = True
        out.append((rows.sort().values, cols.sort().values))
    return out


def block_mask(shape, blocks):
    """0/1 float32 mask of `shape`: the union of the blocks' rows x cols rectangles.

    shape: (O, K) or a conv weight's (O, C, kh, kw) (any shape whose first dim is O; cols index
    the flattened rest). blocks: (rows, cols) pairs of int index sequences (tensors, arrays, lists).
    Paper: Sec. 3.3, the regrouped mask."""
    mask2d = torch.zeros(shape[0], math.prod(shape[1:]))
    for rows, cols in blocks:
        rows, cols = (torch.as_tensor(i, dtype=torch.int64).reshape(-1) for i in (rows, cols))
        mask2d[rows[:, None], cols[None, :]] = 1.0
    return mask2d.view(tuple(shape))


def flop_ratio(shape, blocks):
    """sum_b |rows_b| * |cols_b| / (O * K): the regrouped layer's share of the dense MACs (the ideal
    speedup is its inverse; it equals the mask's density, rows being disjoint). shape: (O, K) or
    (O, C, kh, kw), as block_mask."""
    return sum(len(r) * len(c) for r, c in blocks) / math.prod(shape)


def pack_blocks(weight, blocks):
    """Concatenate the dense block weights W2[rows_b][:, cols_b], row-major, into one 1-D tensor."""
    w2 = weight.detach().reshape(weight.shape[0], -1)  # (O, K)
    parts = [w2[rows.to(w2.device)][:, cols.to(w2.device)].reshape(-1) for rows, cols in blocks]
    return torch.cat(parts) if parts else w2.new_zeros(0)


# ---- reference: unfold + index_select + matmul per block ----

def grouped_gemm_reference(x, weight, blocks, stride=1, padding=0, dilation=1):
    """Obviously-correct grouped conv. x (N, C, H, W), weight (O, C, kh, kw) -> y (N, O, OH, OW)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    N, O, kernel = x.shape[0], weight.shape[0], tuple(weight.shape[2:])
    OH, OW = conv_out_hw(x.shape[2:], kernel, stride, padding, dilation)
    x_cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, K, L)
    w2 = weight.reshape(O, -1)  # (O, K)
    y = x.new_zeros(N, O, OH * OW)
    for rows, cols in blocks:
        rows, cols = rows.to(x.device), cols.to(x.device)
        y[:, rows] = w2[rows][:, cols] @ x_cols.index_select(1, cols)  # (r, c) @ (N, c, L)
    return y.view(N, O, OH, OW)


def round_like_mma(x):
    """x's values as the CUDA kernel's tensor cores multiply them: float32 rounded to TF32 the way
    cvt.rna does (nearest, ties away from zero, 10 mantissa bits), half and bfloat16 unchanged.
    A reference computed in float64 from these differs from the kernel only by its fp32 sums."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, (bits + 0x1000) & ~0x1FFF, bits).view(torch.float32)  # (ties: magnitude up)


# ---- paths: the candidates, their tensors (built lazily from the packed blocks), runners ----

PATHS = ("dense", "conv", "grouped", "gather", "kernel")
CANDIDATES = {"cpu": ("dense", "conv", "grouped", "gather"),  # measured on the first input of each kind
              "cuda": ("dense", "kernel", "grouped")}         # (cuDNN dense, WMMA kernel, cuDNN grouped)
MEASURE_WARMUP = 1  # untimed runs per candidate first: a first call pays allocation and oneDNN/cuDNN setup
MEASURE_RUNS = 3    # timed runs per candidate, interleaved across candidates (a slow spell on a shared
                    # machine hits all of them alike); the median of these decides
MEASURE_CUTOFF = 3.0  # a candidate this many times slower than the fastest in the first timed round is
                      # not run again: run-to-run noise is far smaller, it could not win the median


def make_plan(weight, blocks, strategy=None):
    """What every path needs, once: (info, tensors).

    weight (O, C, kh, kw); blocks as returned by check_blocks; strategy forces one of PATHS (else
    RegroupedConv2d measures the candidates per input). info: python values (shapes, per-block
    sizes, the forced path, and per input kind the measured times and the choice). tensors, on
    weight's device: the packed block weights (weight's dtype), rows, cols (int64, blocks
    concatenated) and the rows in no block. A path's own tensors come from path_tensors."""
    if strategy not in (None, *PATHS):
        raise ValueError(f"unknown path {strategy!r}, expected one of {PATHS}")
    O = weight.shape[0]
    empty = torch.zeros(0, dtype=torch.int64)
    rows = torch.cat([r for r, _ in blocks]) if blocks else empty
    used = torch.zeros(O, dtype=torch.bool)
    used[rows] = True
    info = {"weight_shape": tuple(weight.shape), "flop_ratio": flop_ratio(weight.shape, blocks),
            "sizes": [(len(r), len(c)) for r, c in blocks], "forced": strategy, "choice": {}, "times": {}}
    t = {"packed": pack_blocks(weight, blocks), "rows": rows.to(weight.device),
         "cols": (torch.cat([c for _, c in blocks]) if blocks else empty).to(weight.device),
         "empty_rows": torch.nonzero(~used).view(-1).to(weight.device)}
    return info, t


def _blocks_of(info, t):
    """[(rows_b, cols_b, w_b (r_b, c_b))] from a plan's concatenated tensors."""
    rows = t["rows"].split([r for r, _ in info["sizes"]])
    cols = t["cols"].split([c for _, c in info["sizes"]])
    weights = t["packed"].split([r * c for r, c in info["sizes"]])
    return [(r, c, w.view(len(r), len(c))) for r, c, w in zip(rows, cols, weights)]


def _block_channels(info, t):
    """Per block: (rows, the input channels its columns use (sorted), its weight over them as
    (r_b, c_b * kh * kw), zero at the (c, ky, kx) it does not use)."""
    khkw = info["weight_shape"][2] * info["weight_shape"][3]
    out = []
    for rows, cols, w in _blocks_of(info, t):
        chans = torch.unique(cols // khkw)
        local = torch.searchsorted(chans, cols // khkw) * khkw + cols % khkw  # col -> (c_local, ky, kx)
        w_local = w.new_zeros(len(rows), len(chans) * khkw)
        w_local[:, local] = w
        out.append((rows, chans, w_local))
    return out


def _dense_tensors(info, t):
    """The block-masked dense weight (O, C, kh, kw), rebuilt from the packed blocks."""
    O, C, kh, kw = info["weight_shape"]
    w2 = t["packed"].new_zeros(O, C * kh * kw)
    for rows, cols, w in _blocks_of(info, t):
        w2[rows[:, None], cols[None, :]] = w
    return {"dense_weight": w2.view(O, C, kh, kw)}


def _conv_tensors(info, t):
    """Per block its input channels and conv weight (r_b, c_b, kh, kw), concatenated; per output
    channel its position among the blocks' rows side by side (the row count for rows in no block)."""
    O, _, kh, kw = info["weight_shape"]
    per_block = _block_channels(info, t)
    info["chan_counts"] = [len(chans) for _, chans, _ in per_block]
    position = torch.full((O,), len(t["rows"]), dtype=torch.int64, device=t["rows"].device)
    position[t["rows"]] = torch.arange(len(t["rows"]), device=t["rows"].device)
    return {"conv_chans": torch.cat([c for _, c, _ in per_block]) if per_block else t["rows"].new_zeros(0),
            "conv_weight": torch.cat([w.reshape(-1) for _, _, w in per_block]) if per_block else t["packed"],
            "conv_position": position}


def _grouped_tensors(info, t):
    """The per-block convs as one grouped conv: every block zero-padded to (r_max, c_max), padding
    channels reading channel 0; the real rows' positions among the padded ones."""
    _, _, kh, kw = info["weight_shape"]
    per_block = _block_channels(info, t)
    B, r_max = len(per_block), max((len(r) for r, _, _ in per_block), default=0)
    c_max = max((len(c) for _, c, _ in per_block), default=0)
    weight = t["packed"].new_zeros(B, r_max, c_max * kh * kw)
    chans = torch.zeros(B, c_max, dtype=torch.int64, device=t["rows"].device)
    for b, (rows, ch, w) in enumerate(per_block):
        weight[b, :len(rows), :w.shape[1]] = w
        chans[b, :len(ch)] = ch
    real = [b * r_max + torch.arange(len(r), device=t["rows"].device) for b, (r, _, _) in enumerate(per_block)]
    return {"group_weight": weight.view(B * r_max, c_max, kh, kw).contiguous(memory_format=torch.channels_last),
            "group_chans": chans.view(-1), "group_rows": torch.cat(real) if real else t["rows"].new_zeros(0)}


def _gather_tensors(info, t):
    """im2col rows = the union U of the blocks' columns, ordered by kernel position j = ky*kw + kx,
    then channel; per block, where its columns sit in U."""
    _, C, kh, kw = info["weight_shape"]
    khkw, cols = kh * kw, t["cols"].cpu()
    union = torch.unique(cols)
    union = union[torch.argsort((union % khkw) * C + union // khkw)]
    pos_of_col = torch.full((C * khkw,), -1, dtype=torch.int64)
    pos_of_col[union] = torch.arange(union.numel())
    info["union_size"] = union.numel()
    info["pos_counts"] = torch.bincount(union % khkw, minlength=khkw).tolist()
    device = t["cols"].device
    return {"union_chans": (union // khkw).to(device), "block_union_idx": pos_of_col[cols].to(device)}


THIN_BLOCK_ROWS = 24  # mean rows per block up to which the kernel uses 16-row tiles (less padding), else 64


def kernel_tables(info, t, tile_rows=None):
    """The CUDA kernel's int32 tables: per block (row start, rows, col start, cols, weight offset);
    per CTA row tile (block, first row). tile_rows 16 or 64; None: 16 when blocks are thin."""
    sizes = info["sizes"]
    if tile_rows is None:
        tile_rows = 16 if sizes and statistics.mean(r for r, _ in sizes) <= THIN_BLOCK_ROWS else 64
    if tile_rows not in (16, 64):
        raise ValueError(f"tile_rows={tile_rows}: the kernel is built for 16- and 64-row tiles")
    info["tile_rows"] = tile_rows
    meta, tiles, r0, c0, w0 = [], [], 0, 0, 0
    for b, (r, c) in enumerate(sizes):
        meta.append([r0, r, c0, c, w0])
        tiles += [[b, i] for i in range(0, r, tile_rows)]
        r0, c0, w0 = r0 + r, c0 + c, w0 + r * c
    if w0 >= 2 ** 31:
        raise ValueError(f"{w0} packed block weights: too many for the kernel's int32 offsets")
    device = t["rows"].device
    return {"cuda_meta": torch.tensor(meta, dtype=torch.int32).view(-1, 5).to(device),
            "cuda_tiles": torch.tensor(tiles, dtype=torch.int32).view(-1, 2).to(device),
            "cuda_rows": t["rows"].int(), "cuda_cols": t["cols"].int()}


_BUILDERS = {"dense": _dense_tensors, "conv": _conv_tensors, "grouped": _grouped_tensors,
             "gather": _gather_tensors, "kernel": kernel_tables}


def path_tensors(info, t, path):
    """The tensors `path` needs besides the plan's (make_plan), built from its packed blocks on
    their device and dtype: dense_weight | conv_* | group_* | union_chans, block_union_idx | cuda_*."""
    return _BUILDERS[path](info, t)


def _run_dense(x, info, t, conv_args, out):
    """One dense conv with the block-masked weight."""
    y = F.conv2d(x, t["dense_weight"], None, *conv_args)
    return out.copy_(y) if out is not None else y


def _conv_blocks(info, t):
    """(rows, input channels, conv weight (r_b, c_b, kh, kw)) of each block, from the conv tensors."""
    kernel = info["weight_shape"][2:]
    rows = t["rows"].split([r for r, _ in info["sizes"]])
    chans = t["conv_chans"].split(info["chan_counts"])
    weights = t["conv_weight"].split([r * c * kernel[0] * kernel[1]
                                      for (r, _), c in zip(info["sizes"], info["chan_counts"])])
    return [(r, c, w.view(len(r), len(c), *kernel)) for r, c, w in zip(rows, chans, weights)]


def _run_conv_nhwc(x, info, t, conv_args, out):
    """The "conv" path on a channels-last input (memory N, H, W, C): the per-block input is a
    column gather of the (N*H*W, C) matrix, oneDNN runs natively on it (no reorder of each block's
    input and output, which NCHW needs), and one index_select over the concatenated block outputs
    (plus a zero column for rows in no block) puts every output channel in place."""
    N, (OH, OW) = x.shape[0], conv_out_hw(x.shape[2:], info["weight_shape"][2:], *conv_args)
    rows_total = len(t["rows"])
    y = x.new_empty(N, OH, OW, rows_total + 1)  # block outputs side by side, then a zero column
    y[..., rows_total] = 0
    r0 = 0
    for rows_b, chans_b, w_b in _conv_blocks(info, t):
        y_b = F.conv2d(select_channels(x, chans_b), w_b, None, *conv_args)  # (N, r_b, OH, OW)
        y[..., r0:r0 + len(rows_b)] = y_b.permute(0, 2, 3, 1)
        r0 += len(rows_b)
    y = y.view(-1, rows_total + 1).index_select(1, t["conv_position"])  # (N*OH*OW, O)
    y = y.view(N, OH, OW, -1).permute(0, 3, 1, 2)  # (N, O, OH, OW), channels-last
    return out.copy_(y) if out is not None else y


def _run_conv(x, info, t, conv_args, out):
    """One dense conv per block over the input channels it uses, written into its rows of out."""
    for rows_b, chans_b, w_b in _conv_blocks(info, t):
        out.index_copy_(1, rows_b, F.conv2d(x.index_select(1, chans_b), w_b, None, *conv_args))  # (N, r_b, OH, OW)
    return out


def _run_grouped(x, info, t, conv_args, out):
    """All per-block convs as one grouped conv (channels-last, blocks padded), scattered to rows."""
    x_groups = select_channels(x, t["group_chans"])  # (N, B*c_max, H, W)
    x_groups = x_groups.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x_groups, t["group_weight"], None, *conv_args, len(info["sizes"]))  # (N, B*r_max, OH, OW)
    return out.index_copy_(1, t["rows"], select_channels(y, t["group_rows"]))


def _run_gather(x, info, t, conv_args, out):
    """im2col of the union of the blocks' columns once, then one GEMM per block."""
    stride, padding, dilation = conv_args
    N, O, (kh, kw) = x.shape[0], info["weight_shape"][0], info["weight_shape"][2:]
    OH, OW = conv_out_hw(x.shape[2:], (kh, kw), stride, padding, dilation)
    xp = F.pad(x.transpose(0, 1).contiguous(), (padding[1], padding[1], padding[0], padding[0]))  # (C, N, Hp, Wp)
    x_cols = x.new_empty(info["union_size"], N, OH, OW)  # (|U|, N, OH, OW)
    start = 0
    for j, (count, chans) in enumerate(zip(info["pos_counts"], t["union_chans"].split(info["pos_counts"]))):
        if count:
            y0, x0 = (j // kw) * dilation[0], (j % kw) * dilation[1]
            y1, x1 = y0 + stride[0] * (OH - 1) + 1, x0 + stride[1] * (OW - 1) + 1
            window = xp[:, :, y0:y1:stride[0], x0:x1:stride[1]]  # (C, N, OH, OW)
            torch.index_select(window, 0, chans, out=x_cols[start:start + count])
            start += count
    x_cols = x_cols.view(info["union_size"], -1)  # (|U|, N*OH*OW)
    y2 = x.new_empty(O, N * OH * OW)  # (O, N*OH*OW)
    y2.index_fill_(0, t["empty_rows"], 0.0)
    idx = t["block_union_idx"].split([c for _, c in info["sizes"]])
    for (rows_b, _, w_b), idx_b in zip(_blocks_of(info, t), idx):
        y2.index_copy_(0, rows_b, w_b @ x_cols.index_select(0, idx_b))
    y = y2.view(O, N, OH, OW).transpose(0, 1)  # (N, O, OH, OW), channel-major in memory
    return out.copy_(y) if out is not None else y.contiguous(memory_format=memory_format_of(x))


def run_path(x, info, t, conv_args, path, out=None):
    """One path on x (N, C, H, W) -> (N, O, OH, OW), into out if given, else into a new tensor in
    x's memory format; rows in no block come out 0. t: the plan's tensors plus the path's.
    conv_args: (stride, padding, dilation) as pairs."""
    if path in ("dense", "gather", "kernel"):
        return {"dense": _run_dense, "gather": _run_gather, "kernel": _run_kernel}[path](x, info, t, conv_args, out)
    if path == "conv" and info["sizes"] and memory_format_of(x) == torch.channels_last:
        return _run_conv_nhwc(x, info, t, conv_args, out)
    N, O = x.shape[0], info["weight_shape"][0]
    OH, OW = conv_out_hw(x.shape[2:], info["weight_shape"][2:], *conv_args)
    out = out if out is not None else torch.empty(N, O, OH, OW, dtype=x.dtype, device=x.device,
                                                      memory_format=memory_format_of(x))
    out.index_fill_(1, t["empty_rows"], 0.0)
    if not info["sizes"]:
        return out
    return (_run_conv if path == "conv" else _run_grouped)(x, info, t, conv_args, out)


def choice_key(x):
    """What a layer's choice of path depends on besides the layer: input shape, memory format,
    dtype and device type."""
    fmt = "channels_last" if memory_format_of(x) == torch.channels_last else "contiguous"
    return tuple(x.shape), fmt, str(x.dtype).replace("torch.", ""), x.device.type


def candidate_paths(x):
    """The paths measured for input x: CANDIDATES of its device (the CPU's for other devices),
    the CUDA kernel only where it is built and supports x's dtype."""
    paths = CANDIDATES.get(x.device.type, CANDIDATES["cpu"])
    if "kernel" in paths and (x.dtype not in KERNEL_DTYPES or _load_extension() is None):
        paths = tuple(p for p in paths if p != "kernel")
    return paths


def measure_paths(x, info, t, conv_args, candidates):
    """{path: median ms} of each candidate on x, like cudnn.benchmark: MEASURE_WARMUP untimed runs
    each, then MEASURE_RUNS interleaved timed rounds, candidates over MEASURE_CUTOFF x the fastest
    after the first round dropped (their one time is kept). t holds every candidate's tensors."""
    runs = {p: (lambda p=p: run_path(x, info, t, conv_args, p)) for p in candidates}
    with torch.no_grad():
        for _ in range(MEASURE_WARMUP):
            for fn in runs.values():
                fn()
        times = {p: [time_once_ms(fn, x.device)] for p, fn in runs.items()}
        fastest = min(ts[0] for ts in times.values())
        contenders = [p for p in candidates if times[p][0] <= MEASURE_CUTOFF * fastest]
        for _ in range(MEASURE_RUNS - 1):
            for p in contenders:
                times[p].append(time_once_ms(runs[p], x.device))
    return {p: statistics.median(ts) for p, ts in times.items()}


def time_once_ms(fn, device):
    """Wall time of one fn() in ms: CUDA events on GPU (waits for the kernels), perf_counter on the CPU."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns, device, repeats, warmup):
    """Median ms of each fn() over `repeats` rounds that call every fn once (fair on a shared
    machine), after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    rounds = [[time_once_ms(fn, device) for fn in fns] for _ in range(repeats)]
    return [statistics.median(ts) for ts in zip(*rounds)]


def grouped_conv2d_cpu(x, weight, blocks, stride, padding, dilation=1, out=None, strategy=None):
    """Exact CPU grouped conv. x (N, C, H, W), weight (O, C, kh, kw) (values outside the blocks are
    ignored) -> (N, O, OH, OW), written into out if given. strategy: None measures the candidate
    paths on x (as RegroupedConv2d; plan a layer once with it instead when calling repeatedly); a
    name of PATHS forces it (tests, benches)."""
    layer = RegroupedConv2d(weight, blocks, None, stride, padding, dilation, strategy=strategy)
    return layer(x, out=out)


# ---- CUDA path: all blocks of a layer in one launch, WMMA tensor cores, implicit im2col ----
# Each CTA (128 threads, 4 warps) computes a (BM rows of one block) x (BN output pixels) tile:
# it loops over the block's columns BK at a time, staging the packed weights (BM, BK) and the
# im2col values (BK, BN), gathered straight from the NCHW input with zeros outside the image, in
# shared memory (ragged edges zero-padded), multiplies with WMMA (fp32 inputs: TF32 m16n16k8;
# half/bf16: m16n16k16; fp32 accumulate), and scatters rows to output channels rows_b.
# BM x BN = 16 x 128 for thin blocks (mean rows <= 24), else 64 x 64. Needs sm_80+.

CUDA_SRC = r"""
#ifndef LTH_REF_HOST_EMULATION  // the host emulation (EMULATION_HEADER) provides all of this
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#endif
#include <type_traits>

namespace lth_ref {
using namespace nvcuda;

constexpr int BK = 32;        // columns (reduction) per shared-memory tile
constexpr int THREADS = 128;  // 4 warps per CTA

// WMMA k and fragment element type per input type (accumulate in fp32 for all)
template <typename T> struct Mma;
template <> struct Mma<float> { static constexpr int K = 8; using Frag = wmma::precision::tf32; };
template <> struct Mma<__half> { static constexpr int K = 16; using Frag = __half; };
template <> struct Mma<__nv_bfloat16> { static constexpr int K = 16; using Frag = __nv_bfloat16; };

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

struct ConvDims {  // same order as the `dims` array of the launcher
  int N, C, H, W, O, OH, OW, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// x (N, C, H, W); w: packed blocks, block b is (rows_b, cols_b) row-major at meta[5b+4];
// y (N, O, OH, OW); meta[5b..5b+4] = row start in rows[], rows, col start in cols[], cols, w offset;
// tiles[2t..2t+1] = block, first row of CTA row tile t (gridDim.y); gridDim.x = pixel tiles.
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(THREADS)
grouped_conv2d_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                      const int* __restrict__ meta, const int* __restrict__ tiles,
                      const int* __restrict__ rows, const int* __restrict__ cols, const ConvDims d) {
  using Frag = typename Mma<T>::Frag;
  constexpr int MK = Mma<T>::K;
  constexpr int WARPS_M = BM >= 32 ? 2 : 1, WARPS_N = THREADS / 32 / WARPS_M;
  constexpr int FM = BM / WARPS_M / 16, FN = BN / WARPS_N / 16;  // 16x16 fragments per warp
  constexpr int PAD = 16 / sizeof(T);                             // 16 bytes: fewer bank conflicts
  constexpr int LDA = BK + PAD, LDB = BN + PAD, LDC = BN + 4;
  constexpr int ROW_STEP = THREADS / BN;                          // threads per pixel column
  static_assert(THREADS % BN == 0 && BK % MK == 0 && FM >= 1 && FN >= 1, "tile shape");

  __shared__ __align__(128) T a_s[BM * LDA];      // weights (BM, BK)
  __shared__ __align__(128) T b_s[BK * LDB];      // im2col (BK, BN)
  __shared__ __align__(128) float c_s[BM * LDC];  // result (BM, BN)
  __shared__ int col_off[BK], col_dy[BK], col_dx[BK];  // decoded column: c*H*W, ky*dil_h, kx*dil_w

  const int b = tiles[2 * blockIdx.y], row0 = tiles[2 * blockIdx.y + 1];
  const int row_start = meta[5 * b], nrows = meta[5 * b + 1];
  const int col_start = meta[5 * b + 2], ncols = meta[5 * b + 3];
  const T* wb = w + meta[5 * b + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;

  // this thread gathers and writes pixel column pp of the tile, rows kk0, kk0 + ROW_STEP, ...
  const int pp = tid % BN, kk0 = tid / BN;
  const int L = d.OH * d.OW;
  const long long p = (long long)blockIdx.x * BN + pp;
  const bool p_ok = p < (long long)d.N * L;
  const int n = p_ok ? (int)(p / L) : 0;
  const int l = p_ok ? (int)(p - (long long)n * L) : 0;
  const int oh = l / d.OW, ow = l - oh * d.OW;
  const int ih0 = oh * d.stride_h - d.pad_h, iw0 = ow * d.stride_w - d.pad_w;
  const T* xn = x + (long long)n * d.C * d.H * d.W;
  const T zero = from_float<T>(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, MK, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; i++)
#pragma unroll
    for (int j = 0; j < FN; j++) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int k0 = 0; k0 < ncols; k0 += BK) {
    if (tid < BK) {  // decode this tile's columns k -> (c, ky, kx); -1 past the block's last column
      const int k = k0 + tid;
      int off = -1, dy = 0, dx = 0;
      if (k < ncols) {
        const int col = cols[col_start + k], khkw = d.kh * d.kw;
        const int c = col / khkw, j = col - c * khkw, ky = j / d.kw, kx = j - ky * d.kw;
        off = c * d.H * d.W;
        dy = ky * d.dil_h;
        dx = kx * d.dil_w;
      }
      col_off[tid] = off;
      col_dy[tid] = dy;
      col_dx[tid] = dx;
    }
    for (int i = tid; i < BM * BK; i += THREADS) {  // weights, zero outside the block
      const int r = i / BK, kk = i - r * BK, gr = row0 + r, gk = k0 + kk;
      a_s[r * LDA + kk] = (gr < nrows && gk < ncols) ? wb[(long long)gr * ncols + gk] : zero;
    }
    __syncthreads();
    for (int kk = kk0; kk < BK; kk += ROW_STEP) {  // implicit im2col, zero in the padding
      const int off = col_off[kk], ih = ih0 + col_dy[kk], iw = iw0 + col_dx[kk];
      const bool ok = p_ok && off >= 0 && ih >= 0 && ih < d.H && iw >= 0 && iw < d.W;
      b_s[kk * LDB + pp] = ok ? xn[off + ih * d.W + iw] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += MK) {
      wmma::fragment<wmma::matrix_a, 16, 16, MK, Frag, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, MK, Frag, wmma::row_major> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; i++) {
        wmma::load_matrix_sync(fa[i], a_s + (warp_m * FM + i) * 16 * LDA + ks, LDA);
        if constexpr (std::is_same<T, float>::value)
          for (int e = 0; e < fa[i].num_elements; e++) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
      }
#pragma unroll
      for (int j = 0; j < FN; j++) {
        wmma::load_matrix_sync(fb[j], b_s + ks * LDB + (warp_n * FN + j) * 16, LDB);
        if constexpr (std::is_same<T, float>::value)
          for (int e = 0; e < fb[j].num_elements; e++) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
      }
#pragma unroll
      for (int i = 0; i < FM; i++)
#pragma unroll
        for (int j = 0; j < FN; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < FM; i++)
#pragma unroll
    for (int j = 0; j < FN; j++)
      wmma::store_matrix_sync(c_s + (warp_m * FM + i) * 16 * LDC + (warp_n * FN + j) * 16, acc[i][j],
                              LDC, wmma::mem_row_major);
  __syncthreads();
  if (p_ok) {  // scatter: row r of the tile -> output channel rows[row_start + row0 + r]
    T* yp = y + (long long)n * d.O * L + l;
    for (int r = kk0; r < BM; r += ROW_STEP) {
      const int gr = row0 + r;
      if (gr < nrows) yp[(long long)rows[row_start + gr] * L] = from_float<T>(c_s[r * LDC + pp]);
    }
  }
}

template <typename T, int BM, int BN>
cudaError_t launch(const void* x, const void* w, void* y, const int* meta, const int* tiles, int num_tiles,
                   const int* rows, const int* cols, const ConvDims& d, cudaStream_t stream) {
  const long long grid_x = ((long long)d.N * d.OH * d.OW + BN - 1) / BN;
  if (num_tiles == 0 || grid_x == 0) return cudaSuccess;
  if (num_tiles > 65535 || grid_x > 2147483647LL) return cudaErrorInvalidConfiguration;
#ifndef LTH_REF_HOST_EMULATION
  grouped_conv2d_kernel<T, BM, BN><<<dim3((unsigned)grid_x, (unsigned)num_tiles), THREADS, 0, stream>>>(
#else
  lth_emu::launch(dim3((unsigned)grid_x, (unsigned)num_tiles), dim3(THREADS), grouped_conv2d_kernel<T, BM, BN>,
#endif
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), meta, tiles, rows, cols, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tiles(int tile_rows, const void* x, const void* w, void* y, const int* meta, const int* tiles,
                         int num_tiles, const int* rows, const int* cols, const ConvDims& d, cudaStream_t stream) {
  if (tile_rows == 16) return launch<T, 16, 128>(x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  if (tile_rows == 64) return launch<T, 64, 64>(x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  return cudaErrorInvalidValue;
}
}  // namespace lth_ref

// dtype: 0 float (TF32 tensor cores), 1 half, 2 bfloat16; tile_rows: 16 or 64 (rows per CTA tile);
// dims: N, C, H, W, O, OH, OW, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w.
// y must be preallocated; rows in no block are not written. Returns a cudaError_t as int.
int grouped_conv2d_launch(int dtype, int tile_rows, const void* x, const void* w, void* y, const int* meta,
                          const int* tiles, int num_tiles, const int* rows, const int* cols, const int* dims,
                          cudaStream_t stream) {
  const lth_ref::ConvDims d = {dims[0], dims[1], dims[2],  dims[3],  dims[4],  dims[5],  dims[6], dims[7],
                               dims[8], dims[9], dims[10], dims[11], dims[12], dims[13], dims[14]};
  using lth_ref::launch_tiles;
  cudaError_t err = cudaErrorInvalidValue;
  if (dtype == 0) err = launch_tiles<float>(tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  if (dtype == 1) err = launch_tiles<__half>(tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  if (dtype == 2) err = launch_tiles<__nv_bfloat16>(tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  return static_cast<int>(err);
}
"""

CPP_SRC = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <climits>

int grouped_conv2d_launch(int dtype, int tile_rows, const void* x, const void* w, void* y, const int* meta,
                          const int* tiles, int num_tiles, const int* rows, const int* cols, const int* dims,
                          cudaStream_t stream);

// x (N, C, H, W); packed block weights; int32 tables from make_plan; empty_rows int64;
// weight_shape (O, C, kh, kw); conv (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w) -> y (N, O, OH, OW)
torch::Tensor grouped_conv2d_cuda(torch::Tensor x, torch::Tensor packed, torch::Tensor meta, torch::Tensor tiles,
                                  torch::Tensor rows, torch::Tensor cols, torch::Tensor empty_rows,
                                  std::vector<int64_t> weight_shape, std::vector<int64_t> conv,
                                  int64_t tile_rows) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous(), "grouped_conv2d_cuda: x: contiguous 4-D CUDA tensor");
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == x.scalar_type() && packed.is_contiguous(),
              "grouped_conv2d_cuda: packed weights must be contiguous, on x's device, in x's dtype");
  for (const auto& t : {meta, tiles, rows, cols})
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "grouped_conv2d_cuda: index tables must be contiguous int32 on x's device");
  TORCH_CHECK(empty_rows.device() == x.device() && empty_rows.scalar_type() == torch::kInt64,
              "grouped_conv2d_cuda: empty_rows: int64 on x's device");
  TORCH_CHECK(weight_shape.size() == 4 && conv.size() == 6 && weight_shape[1] == x.size(1),
              "grouped_conv2d_cuda: bad shapes");
  const auto st = x.scalar_type();
  const int dtype = st == torch::kFloat ? 0 : st == torch::kHalf ? 1 : st == torch::kBFloat16 ? 2 : -1;
  TORCH_CHECK(dtype >= 0, "grouped_conv2d_cuda: float32, float16 or bfloat16 expected");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = weight_shape[0], kh = weight_shape[2], kw = weight_shape[3];
  const int64_t OH = (H + 2 * conv[2] - conv[4] * (kh - 1) - 1) / conv[0] + 1;
  const int64_t OW = (W + 2 * conv[3] - conv[5] * (kw - 1) - 1) / conv[1] + 1;
  TORCH_CHECK(OH > 0 && OW > 0 && C * H * W < INT_MAX && OH * OW < INT_MAX, "grouped_conv2d_cuda: bad sizes");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({N, O, OH, OW}, x.options());
  if (empty_rows.numel() > 0) y.index_fill_(1, empty_rows, 0);
  const int dims[15] = {(int)N, (int)C, (int)H, (int)W, (int)O, (int)OH, (int)OW, (int)kh, (int)kw,
                        (int)conv[0], (int)conv[1], (int)conv[2], (int)conv[3], (int)conv[4], (int)conv[5]};
  const int err = grouped_conv2d_launch(dtype, (int)tile_rows, x.data_ptr(), packed.data_ptr(), y.data_ptr(),
                                        meta.data_ptr<int>(), tiles.data_ptr<int>(), (int)tiles.size(0),
                                        rows.data_ptr<int>(), cols.data_ptr<int>(), dims,
                                        c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "grouped_conv2d_launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return y;
}
"""

KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the launcher's dtype codes
_EXT = {}  # "module": the built extension, or None once a build failed / CUDA is absent


def write_cuda_source(path):
    """Write CUDA_SRC to `path` (for `nvcc -arch=sm_90 -c -Xptxas -v path`); returns path."""
    with open(path, "w") as f:
        f.write(CUDA_SRC)
    return path


def _load_extension():
    """Build the CUDA extension on first use (load_inline, cached); None with one WARNING if not."""
    if "module" not in _EXT:
        _EXT["module"] = None
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            _warn_once(f"grouped-GEMM kernel needs sm_80+ (have sm_{major}{minor}): measuring the other paths only")
            return None
        try:
            from torch.utils.cpp_extension import load_inline
            _EXT["module"] = load_inline(
                name=f"lth_ref_grouped_gemm_sm{major}{minor}", cpp_sources=[CPP_SRC], cuda_sources=[CUDA_SRC],
                functions=["grouped_conv2d_cuda"], with_cuda=True,
                extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
        except Exception as e:  # noqa: BLE001 -- any build failure means: measure the other paths, loudly
            first = (str(e).strip().splitlines() or [""])[0][:200]
            _warn_once(f"building the grouped-GEMM CUDA kernel failed ({type(e).__name__}: {first}): "
                       "measuring the other paths only")
    return _EXT["module"]


def cuda_available_kernel():
    """True when the grouped-GEMM CUDA kernel is built and usable (builds it on first call)."""
    return _load_extension() is not None


def _run_kernel(x, info, t, conv_args, out):
    """All blocks of a layer in one launch of CUDA_SRC (CUDA tensors of KERNEL_DTYPES)."""
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"path 'kernel' runs CUDA tensors of {[str(d) for d in KERNEL_DTYPES]}, got a "
                         f"{x.device.type} {x.dtype} input (on the CPU, emulated_grouped_conv2d runs its source)")
    ext = _load_extension()
    if ext is None:
        raise RuntimeError("path 'kernel' is forced but the CUDA kernel is not available (see the WARNING above)")
    conv = [v for pair in conv_args for v in pair]
    y = ext.grouped_conv2d_cuda(x.contiguous(), t["packed"].to(x.dtype), t["cuda_meta"], t["cuda_tiles"],
                                t["cuda_rows"], t["cuda_cols"], t["empty_rows"], list(info["weight_shape"]),
                                conv, info["tile_rows"])
    y = y.contiguous(memory_format=memory_format_of(x))  # the kernel reads and writes NCHW
    return out.copy_(y) if out is not None else y


# ---- host emulation: CUDA_SRC compiled by g++ and run on the CPU, with or without sanitizers ----
# The kernel's own text, unchanged (only its CUDA includes and its <<<...>>> launch sit behind
# #ifndef LTH_REF_HOST_EMULATION), compiled with EMULATION_HEADER: CUDA threads are OS threads,
# __syncthreads() a real barrier, __shared__ memory NaN-poisoned before each CTA, WMMA computed on
# the host with its preconditions checked on every call. emulated_grouped_conv2d loads the build
# with ctypes; with sanitizer="address" (AddressSanitizer + UBSan) or "thread" (ThreadSanitizer)
# it builds a program (EMULATION_DRIVER with LTH_EMU_MAIN) that runs the case in a subprocess:
# every array in its own exact-size heap buffer, so ASan sees a read past any of them.
# Builds are cached in emulation_cache_dir(), named by a hash of every text and flag that goes in.

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
  return {uint16_t(sign | (uint16_t)std::nearbyint(lth_emu_float(mag) * 16777216.0f))};  // subnormal: m * 2^-24
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
__forceinline__ void check_tile(const char* op, const E* p, unsigned ldm, int rows, int cols, bool row_major_) {
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
  const size_t need = ((outer - 1) * (size_t)ldm + inner) * sizeof(E), room = __builtin_dynamic_object_size(p, 1);
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
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
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
  const int err = grouped_conv2d_launch(dtype, tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, dims, nullptr);
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
  if (!f || std::fread(head, sizeof head, 1, f) != 1) return std::fprintf(stderr, "cannot read %s\n", argv[1]), 2;
  int dims[15];
  for (int i = 0; i < 15; i++) dims[i] = (int)head[3 + i];
  void* a[7];
  for (int i = 0; i < 7; i++) {
    a[i] = std::malloc(head[18 + i] ? head[18 + i] : 1);
    if (head[18 + i] && std::fread(a[i], head[18 + i], 1, f) != 1) return std::fprintf(stderr, "short %s\n", argv[1]), 2;
  }
  std::fclose(f);
  char message[1024];
  const int err = lth_emu_grouped_conv2d((int)head[0], (int)head[1], a[0], a[1], a[2], (const int*)a[3],
                                         (const int*)a[4], (int)head[2], (const int*)a[5], (const int*)a[6], dims,
                                         message, sizeof message);
  if (err) return std::fprintf(stderr, "kernel failed (cudaError %d): %s\n", err, message), 3;
  FILE* o = std::fopen(argv[2], "wb");
  if (!o || (head[20] && std::fwrite(a[2], head[20], 1, o) != 1)) return std::fprintf(stderr, "cannot write %s\n", argv[2]), 2;
  std::fclose(o);
  for (void* p : a) std::free(p);
  return 0;
}
#endif
"""

# Collects the kernel's __shared__ statics (functions in the anonymous namespace of EMULATION_DRIVER,
# with -fdata-sections one .bss section each) into one range the emulator poisons before each CTA.
EMULATION_LINKER_SCRIPT = ("SECTIONS { lth_emu_shared : { HIDDEN(lth_emu_shared_begin = .); "
                           "*(.bss._ZZN12_GLOBAL__N_1*) HIDDEN(lth_emu_shared_end = .); } } INSERT BEFORE .bss;\n")
EMULATION_FLAGS = ["-std=c++17", "-pthread", "-fdata-sections", "-DLTH_REF_HOST_EMULATION", "-Wno-unknown-pragmas"]
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
    path = os.path.join(tempfile.gettempdir(), f"lth_ref_emulation_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def build_emulation(source=None, sanitizer=None):
    """Path of the emulated kernel built from `source` (default CUDA_SRC): a shared library for
    ctypes (sanitizer None) or a program for one case file (sanitizer "address" or "thread").
    Cached by a hash of the source, EMULATION_HEADER, EMULATION_DRIVER, the linker script, the
    compiler and the flags. RuntimeError with the compiler's output when the build fails."""
    if sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer={sanitizer!r}: expected one of {list(SANITIZERS)}")
    source, cxx = CUDA_SRC if source is None else source, emulation_compiler()
    if "version" not in _EMU:
        _EMU["version"] = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = [*EMULATION_FLAGS, *SANITIZERS[sanitizer]]
    parts = [source, EMULATION_HEADER, EMULATION_DRIVER, EMULATION_LINKER_SCRIPT, cxx, _EMU["version"], *flags]
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
        lib.lth_emu_grouped_conv2d.argtypes = [ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 5, ctypes.c_int,
                                               ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                               ctypes.c_char_p, ctypes.c_int]
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
    """The launcher's arguments for x (N, C, H, W) on the CPU: (dtype code, tile_rows, [x, packed
    weights, y, meta, tiles, rows, cols], dims). y (N, O, OH, OW) is NaN except the rows in no
    block, which are 0 as the launcher's caller sets them (CPP_SRC): rows the kernel misses show."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"emulated_grouped_conv2d: x must be a CPU (N, {weight.shape[1]}, H, W) tensor of "
                         f"{[str(d) for d in KERNEL_DTYPES]}, got {x.device.type} {x.dtype} {tuple(x.shape)}")
    blocks = check_blocks(tuple(weight.shape), blocks)
    info, t = make_plan(weight.detach().cpu(), blocks)
    tables = kernel_tables(info, t, tile_rows)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    (N, C, H, W), (O, _, kh, kw) = x.shape, weight.shape
    OH, OW = conv_out_hw((H, W), (kh, kw), stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"emulated_grouped_conv2d: empty output {OH}x{OW} for input {H}x{W}")
    y = torch.full((N, O, OH, OW), float("nan"), dtype=x.dtype)
    y.index_fill_(1, t["empty_rows"], 0.0)
    arrays = [x.contiguous(), t["packed"].to(x.dtype).contiguous(), y,
              *(tables[k].contiguous() for k in ("cuda_meta", "cuda_tiles", "cuda_rows", "cuda_cols"))]
    return KERNEL_DTYPES[x.dtype], info["tile_rows"], arrays, [N, C, H, W, O, OH, OW, kh, kw, *stride, *padding, *dilation]


def emulated_grouped_conv2d(x, weight, blocks, stride=1, padding=0, dilation=1, tile_rows=None, *,
                            source=None, sanitizer=None):
    """The CUDA kernel (CUDA_SRC, or `source`) run on the CPU under the host emulation: x (N, C, H, W)
    float32/float16/bfloat16, weight (O, C, kh, kw) (values outside the blocks ignored) ->
    y (N, O, OH, OW) in x's dtype, NCHW, bit for bit what the emulated hardware computes (fp32: TF32
    products, fp32 sums). tile_rows: 16 or 64 (None: the rule RegroupedConv2d uses). sanitizer:
    None runs in this process (ctypes); "address" or "thread" run a sanitizer build in a
    subprocess. RuntimeError with the message when a rule breaks or a sanitizer reports;
    EmulationUnavailable without a compiler."""
    code, tile_rows, arrays, dims = _kernel_case(x, weight, blocks, stride, padding, dilation, tile_rows)
    if sanitizer is not None:
        return _run_emulation_program(build_emulation(source, sanitizer), sanitizer, code, tile_rows, arrays, dims)
    lib, ptr = emulation_library(source), (lambda a: ctypes.c_void_p(a.data_ptr()))
    x, w, y, meta, tiles, rows, cols = arrays
    emulation_call(lib.lth_emu_grouped_conv2d, code, tile_rows, ptr(x), ptr(w), ptr(y), ptr(meta), ptr(tiles),
                   len(tiles), ptr(rows), ptr(cols), (ctypes.c_int * 15)(*dims))
    return y


def _run_emulation_program(program, sanitizer, code, tile_rows, arrays, dims):
    """Run a sanitizer build on one case file (format: EMULATION_DRIVER's main); y, or RuntimeError
    with the start of the sanitizer's report."""
    raw = [a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"" for a in arrays]
    with tempfile.TemporaryDirectory() as tmp:
        case, out = os.path.join(tmp, "case.bin"), os.path.join(tmp, "y.bin")
        with open(case, "wb") as f:
            f.write(struct.pack("<25q", code, tile_rows, len(arrays[4]), *dims, *map(len, raw)))
            f.write(b"".join(raw))
        res = subprocess.run([program, case, out], capture_output=True, text=True, timeout=EMULATION_TIMEOUT_S,
                             env={**os.environ, **SANITIZER_ENV[sanitizer]})
        if res.returncode != 0 or "Sanitizer" in res.stderr or "runtime error" in res.stderr:
            lines = res.stderr.strip().splitlines()
            report = "\n".join(lines[:25] + [l for l in lines[25:] if l.startswith("SUMMARY")])
            raise RuntimeError(f"emulated CUDA kernel under the {sanitizer} sanitizer failed "
                               f"(exit {res.returncode}):\n{report}")
        with open(out, "rb") as f:
            data = bytearray(f.read())
    y = arrays[2]
    return torch.frombuffer(data, dtype=torch.uint8).view(y.dtype).view(y.shape) if data else y

# ---- modules: a regrouped conv that measures its paths and holds only what it runs ----

class RegroupedConv2d(nn.Module):
    """Inference conv that runs only its dense blocks; output = the block-masked conv.

    Holds the packed block weights, the index tables (rows, cols, rows in no block, block sizes)
    and the bias; state_dict keeps exactly those. On the first input of each kind (choice_key) it
    times the candidate paths (candidate_paths, measure_paths) and keeps the fastest in
    info["choice"] (times in info["times"]); strategy= forces a path instead. A path's tensors
    (path_tensors) are non-persistent buffers, built when measured or chosen and dropped when no
    input chose it, so .to() moves them and .half() casts them. x (N, C, H, W) -> (N, O, OH, OW)."""

    def __init__(self, weight, blocks, bias=None, stride=1, padding=0, dilation=1, name="conv", strategy=None):
        super().__init__()
        blocks = check_blocks(tuple(weight.shape), blocks, name)
        self.name, self.weight_shape = name, tuple(weight.shape)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.info, tensors = make_plan(weight, blocks, strategy)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("block_sizes", torch.tensor(self.info["sizes"], dtype=torch.int64).view(-1, 2))
        for key, value in tensors.items():  # state_dict: packed, rows, cols, block_sizes, bias
            self.register_buffer("plan_" + key, value, persistent=key != "empty_rows")
        self._plan_keys, self._built = list(tensors), {}  # _built: path -> keys of its buffers
        self.register_load_state_dict_post_hook(_drop_built_paths)  # new weights: rebuild on next use

    @classmethod
    def from_conv(cls, conv, blocks, name="conv", strategy=None):
        """Build from an nn.Conv2d (groups 1, zero padding given as numbers) and its blocks."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name}: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{name}: grouped convs (groups={conv.groups}) are not supported")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{name}: only numeric zero padding is supported, got "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        return cls(conv.weight, blocks, conv.bias, conv.stride, conv.padding, conv.dilation, name, strategy)

    def extra_repr(self):
        chosen = ", ".join(f"{'x'.join(map(str, k[0]))} {' '.join(k[1:])}: {p}" for k, p in self.info["choice"].items())
        path = f"{self.info['forced']} (forced)" if self.info["forced"] else f"measured {{{chosen}}}"
        return (f"{self.name}: weight={self.weight_shape}, blocks={len(self.info['sizes'])}, "
                f"flop_ratio={self.info['flop_ratio']:.3f}, stride={self.stride}, padding={self.padding}, path={path}")

    def path_for(self, x):
        """The path this layer runs (or ran) on inputs like x; None before it met one."""
        return self.info["forced"] or self.info["choice"].get(choice_key(x))

    def _tensors(self, paths):
        """The plan's tensors plus those of `paths`, built (as non-persistent buffers) if missing."""
        t = {k: self._buffers["plan_" + k] for k in self._plan_keys}  # (getattr is 7x slower per call)
        for path in paths:
            if path not in self._built:
                built = path_tensors(self.info, t, path)
                for key, value in built.items():
                    self.register_buffer("plan_" + key, value, persistent=False)
                self._built[path] = list(built)
            t.update({k: self._buffers["plan_" + k] for k in self._built[path]})
        return t

    def _drop_paths(self, keep):
        """Free the tensors of every built path not in keep."""
        for path in [p for p in self._built if p not in keep]:
            for key in self._built.pop(path):
                del self._buffers["plan_" + key]

    def _measure(self, x, conv_args):
        """Time the candidates on x, record and return the fastest; free the tensors of the others."""
        candidates = candidate_paths(x)
        times = measure_paths(x, self.info, self._tensors(candidates), conv_args, candidates)
        key = choice_key(x)
        self.info["times"][key], self.info["choice"][key] = times, min(times, key=times.get)
        self._drop_paths(keep={*self.info["choice"].values()})
        return self.info["choice"][key]

    def forward(self, x, out=None):
        conv_args = (self.stride, self.padding, self.dilation)
        path = self.path_for(x) or self._measure(x, conv_args)
        y = run_path(x, self.info, self._tensors((path,)), conv_args, path, out)
        if self.bias is None:
            return y
        return y.add_(self.bias.view(1, -1, 1, 1)) if out is not None else y + self.bias.view(1, -1, 1, 1)


def _drop_built_paths(module, incompatible_keys):
    """load_state_dict hook of RegroupedConv2d: its path tensors came from the old blocks."""
    module._drop_paths(keep=())


def grouped_conv2d(x, weight_or_packed, blocks=None, stride=1, padding=0, dilation=1):
    """Grouped conv, dispatched like RegroupedConv2d (the fastest measured path for x's device).

    weight_or_packed: the (O, C, kh, kw) weight (values outside the blocks are ignored; packs and
    measures on every call) or a RegroupedConv2d (blocks/stride/padding come from it).
    x (N, C, H, W) -> (N, O, OH, OW)."""
    if isinstance(weight_or_packed, RegroupedConv2d):
        return weight_or_packed(x)
    return RegroupedConv2d(weight_or_packed, blocks, None, stride, padding, dilation)(x)


def _conv_modules(model, blocks):
    """[(param name, module name, nn.Conv2d)] for every key of blocks; ValueError if one is unknown."""
    found = []
    for key in blocks:
        module_name = key[:-len(".weight")] if key.endswith(".weight") else None
        try:
            conv = model.get_submodule(module_name) if module_name else None
        except AttributeError:
            conv = None
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{key}: no nn.Conv2d weight of that name in {type(model).__name__} "
                             "(the ticket does not fit the model)")
        found.append((key, module_name, conv))
    return found


def masked_model(model, blocks):
    """Deep-copied eval model whose conv weights named in blocks are multiplied by the block mask."""
    model = copy.deepcopy(model).eval()
    for key, _, conv in _conv_modules(model, blocks):
        mask = block_mask(tuple(conv.weight.shape), check_blocks(tuple(conv.weight.shape), blocks[key], key))
        with torch.no_grad():
            conv.weight.mul_(mask.to(conv.weight))
    return model


def regrouped_model(model, blocks):
    """Deep-copied eval inference model with every conv named in blocks (keys: parameter names,
    e.g. "layer1.0.conv1.weight") swapped for a RegroupedConv2d. Output = masked_model's output.
    ValueError (naming the layer) for an unknown name or a block out of range for its conv."""
    model = copy.deepcopy(model).eval()
    for key, module_name, conv in _conv_modules(model, blocks):
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RegroupedConv2d.from_conv(conv, blocks[key], name=key))
    return model


# ---- benchmarks: dense masked conv (cuDNN / oneDNN) vs regrouped ----

def rel_err(y, ref, centered=False):
    """max |y - ref| / max |ref|; centered: / max |ref - batch mean of ref| (logits of an untrained
    model are mostly the classifier bias, which would hide errors in the features)."""
    y, ref = y.double(), ref.double()
    scale = (ref - ref.mean(0, keepdim=True)) if centered else ref
    return ((y - ref).abs().max() / scale.abs().max().clamp_min(1e-30)).item()


def _conv_input_shapes(model, batch_size, device, input_size):
    """{module name: input shape} of every Conv2d for one random batch (forward hooks)."""
    shapes, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(record(name)))
    with torch.no_grad():
        model(torch.randn(batch_size, *input_size, device=device))
    for h in hooks:
        h.remove()
    return shapes


def bench_layers(model, blocks, batch_size=64, device="cpu", paper_setting=False, repeats=10,
                 input_size=(3, 32, 32), log=None, memory_format=torch.contiguous_format):
    """Per regrouped conv: dense F.conv2d with the masked weight vs RegroupedConv2d, conv only.

    Inputs: the layer's real activation shape for a batch of `input_size` images (default), or with
    paper_setting every conv fed a (batch_size, C, 127, 127) input (paper Sec. A1 / Fig. 7 used
    batch 64). Same precision and memory_format (of the inputs) on both sides (on GPU, cuDNN convs
    and our kernel both use TF32 for fp32 by default). Outputs are checked against dense before
    timing (that first call also measures the layer's paths). Returns one dict per conv; `path` is
    the path the layer chose, `ideal_speedup` (1 / flop_ratio) is "-" where that is dense."""
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    shapes = None if paper_setting else _conv_input_shapes(model, batch_size, device, input_size)
    results = []
    for key, module_name, conv in _conv_modules(model, blocks):
        shape = (batch_size, conv.in_channels, 127, 127) if paper_setting else shapes[module_name]
        x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
        layer = RegroupedConv2d.from_conv(conv, blocks[key], name=key)
        mask = block_mask(layer.weight_shape, check_blocks(layer.weight_shape, blocks[key], key))
        weight, bias = conv.weight.detach() * mask.to(conv.weight), conv.bias

        def dense():
            return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)

        with torch.no_grad():
            err = rel_err(layer(x), dense())
            dense_ms, regrouped_ms = time_interleaved([dense, lambda: layer(x)], device, repeats, warmup=2)
        ratio, path = layer.info["flop_ratio"], layer.path_for(x)
        row = {"name": key, "shape": layer.weight_shape, "input_hw": tuple(shape[2:]),
               "blocks": len(layer.info["sizes"]), "flop_ratio": ratio, "path": path,
               "ideal_speedup": "-" if path == "dense" else 1 / ratio if ratio else float("inf"),
               "dense_ms": dense_ms, "regrouped_ms": regrouped_ms, "speedup": dense_ms / regrouped_ms,
               "max_rel_err": err}
        results.append(row)
        if log:
            log(row)
    return results


def bench_model(model, blocks, batch_size=64, device="cpu", repeats=10, input_size=(3, 32, 32), log=None,
                memory_format=torch.contiguous_format):
    """End to end (eval, no_grad): the masked dense model vs regrouped_model, same input, precision
    and memory_format (both models and the input converted to it); outputs checked first
    (max_rel_err against the batch spread of the dense logits; this also measures every layer's
    paths). conv_flop_ratio counts every conv's MACs, the unpruned stem's too; paths counts the
    regrouped convs per chosen path. Returns one dict."""
    device = torch.device(device)
    dense = masked_model(model, blocks).to(device, memory_format=memory_format)
    regrouped = regrouped_model(model, blocks).to(device, memory_format=memory_format)
    x = torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=memory_format)
    shapes = _conv_input_shapes(dense, 1, device, input_size)
    macs_dense = macs_regrouped = 0
    for name, m in dense.named_modules():
        if isinstance(m, nn.Conv2d):
            oh, ow = conv_out_hw(shapes[name][2:], m.kernel_size, m.stride, m.padding, m.dilation)
            macs, swapped = m.weight.numel() * oh * ow, regrouped.get_submodule(name)
            ratio = swapped.info["flop_ratio"] if isinstance(swapped, RegroupedConv2d) else 1.0
            macs_dense, macs_regrouped = macs_dense + macs, macs_regrouped + ratio * macs
    with torch.no_grad():
        err = rel_err(regrouped(x), dense(x), centered=True)
        dense_ms, regrouped_ms = time_interleaved([lambda: dense(x), lambda: regrouped(x)], device, repeats, warmup=2)
    paths = Counter(p for m in regrouped.modules() if isinstance(m, RegroupedConv2d)
                    for p in ([m.info["forced"]] if m.info["forced"] else m.info["choice"].values()))
    result = {"batch_size": batch_size, "device": str(device),
              "memory_format": {v: k for k, v in MEMORY_FORMATS.items()}[memory_format], "dense_ms": dense_ms,
              "regrouped_ms": regrouped_ms, "speedup": dense_ms / regrouped_ms, "max_rel_err": err,
              "conv_flop_ratio": macs_regrouped / macs_dense,
              "ideal_conv_speedup": macs_dense / max(macs_regrouped, 1e-30),
              "paths": ", ".join(f"{p} {n}" for p, n in paths.most_common())}
    if log:
        log(result)
    return result
