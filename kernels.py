"""
Running regrouped convs fast: a grouped GEMM over the dense blocks of a structural ticket.

Paper: Chen et al., "Coarsening the Granularity: Towards Structurally Sparse Lottery Tickets",
ICML 2022, Sec. 3.3 and A1 (regroup, then one kernel per layer that runs all dense blocks).

The op. A regrouped conv with weight W (O, C, kh, kw) has `blocks`: a list of (rows, cols) int64
tensors, rows = output channels (disjoint across blocks), cols = flattened (c, ky, kx) positions of
W.view(O, K), K = C*kh*kw. Its mask is the union of the rows x cols rectangles, and
    Y[n, rows_b, oh, ow] = sum_{k in cols_b} W2[rows_b, k] * im2col(X)[n, k, oh, ow]
with output channels in no block equal to 0 (plus the bias, if any). grouped_gemm_reference
(unfold + index_select + matmul) computes exactly this; every path equals it up to float rounding.

The paths: one table, PATHS, name -> Path(build, run, devices, ready).
    name      build: once per layer, from the packed blocks      run: per input               candidate on
    dense     the block-masked dense weight                      one F.conv2d (oneDNN/cuDNN)   cpu, cuda
    conv      per block: the input channels it reads, a weight   one conv per block            cpu
    grouped   the blocks zero-padded to the largest              one grouped conv              cpu, cuda
    gather    the union U of the blocks' columns                 im2col of U, a GEMM per block cpu
    kernel16  int32 tables for 16-row CTA tiles                  CUDA_SRC: one launch, WMMA    cuda
    kernel64  int32 tables for 64-row CTA tiles                  CUDA_SRC: one launch, WMMA    cuda
Every path has the same two halves:
    p = build(info, t)              everything run needs besides the plan: tensors and python values
    y = run(x, info, t, p, conv)    x (N, C, H, W) -> y (N, O, OH, OW), a new tensor in x's memory
                                    format, rows in no block 0, no bias
info and t come from make_plan: info describes the layer (shapes, block sizes, the forced path, the
measured times and choice per input kind); t holds its tensors (packed block weights, rows, cols,
rows in no block). conv = (stride, padding, dilation) as pairs.

RegroupedConv2d runs the fastest path for each input it meets: on the first input of each
choice_key (shape, dtype, memory format, device) it times every candidate of that device
(CANDIDATES, from the table; dense always among them, like cudnn.benchmark; the CUDA kernel's tile
height is measured as two paths) and keeps the winner. bench_layers / bench_model: dense vs
regrouped, per layer and end to end. The CUDA source (CUDA_SRC, CPP_SRC) closes the file;
test_lth_ref.py runs it on the CPU under an emulation of CUDA (emulated_grouped_conv2d).
This file imports nothing else of its project: copy it alone.
"""

import copy
import dataclasses
import functools
import math
import statistics
import sys
import time
from collections import Counter
from typing import Callable

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


# ---- the plan: what every path needs, once per layer ----

def make_plan(weight, blocks, strategy=None):
    """(info, t) of a layer. weight (O, C, kh, kw); blocks as returned by check_blocks; strategy
    forces one of PATHS (else RegroupedConv2d measures the candidates per input).

    info, python values that describe the layer: weight_shape, flop_ratio, sizes (per block (rows,
    cols)), forced, and per input kind (choice_key) the measured times and the choice. t, tensors
    on weight's device: packed (the block weights, weight's dtype), rows and cols (int64, blocks
    concatenated), empty_rows (the rows in no block)."""
    if strategy not in (None, *PATHS):
        raise ValueError(f"unknown path {strategy!r}, expected one of {tuple(PATHS)}")
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


def _output_shape(x, info, conv):
    """(N, O, OH, OW) of the layer's output on x."""
    return (x.shape[0], info["weight_shape"][0], *conv_out_hw(x.shape[2:], info["weight_shape"][2:], *conv))


def _new(x, shape, memory_format=torch.contiguous_format):
    """An uninitialized tensor in x's dtype and on x's device. Every runner allocates its output and
    scratch here, so a test can fill them with NaN and see that every value read was written."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)


# ---- path dense: one conv with the block-masked weight ----

def _build_dense(info, t):
    """{"weight": the block-masked dense weight (O, C, kh, kw)}, rebuilt from the packed blocks."""
    O, C, kh, kw = info["weight_shape"]
    w2 = t["packed"].new_zeros(O, C * kh * kw)
    for rows, cols, w in _blocks_of(info, t):
        w2[rows[:, None], cols[None, :]] = w
    return {"weight": w2.view(O, C, kh, kw)}


def _run_dense(x, info, t, p, conv):
    """One F.conv2d (oneDNN / cuDNN); its output keeps x's memory format."""
    return F.conv2d(x, p["weight"], None, *conv)


# ---- path conv: one conv per block over the input channels it reads ----

def _build_conv(info, t):
    """Per block the input channels it reads and its conv weight over them (r_b, c_b, kh, kw), zero
    at the (c, ky, kx) it does not use: "chans" and "weight" concatenated, "chan_counts" to split
    them; "position": per output channel its place among the blocks' rows side by side (len(rows)
    for rows in no block: a zero column)."""
    O = info["weight_shape"][0]
    per_block, rows = _block_channels(info, t), t["rows"]
    position = torch.full((O,), len(rows), dtype=torch.int64, device=rows.device)
    position[rows] = torch.arange(len(rows), device=rows.device)
    return {"chans": torch.cat([c for _, c, _ in per_block]) if per_block else rows.new_zeros(0),
            "weight": torch.cat([w.reshape(-1) for _, _, w in per_block]) if per_block else t["packed"].new_zeros(0),
            "chan_counts": [len(c) for _, c, _ in per_block], "position": position}


def _conv_blocks(info, t, p):
    """(rows, input channels, conv weight (r_b, c_b, kh, kw)) of each block."""
    kh, kw = info["weight_shape"][2:]
    rows = t["rows"].split([r for r, _ in info["sizes"]])
    chans = p["chans"].split(p["chan_counts"])
    weights = p["weight"].split([len(r) * len(c) * kh * kw for r, c in zip(rows, chans)])
    return [(r, c, w.view(len(r), len(c), kh, kw)) for r, c, w in zip(rows, chans, weights)]


def _run_conv(x, info, t, p, conv):
    """NCHW: each block's conv output is copied into its rows of y; channels-last: _run_conv_nhwc."""
    if memory_format_of(x) == torch.channels_last:
        return _run_conv_nhwc(x, info, t, p, conv)
    y = _new(x, _output_shape(x, info, conv))
    y.index_fill_(1, t["empty_rows"], 0.0)
    for rows_b, chans_b, w_b in _conv_blocks(info, t, p):
        y.index_copy_(1, rows_b, F.conv2d(x.index_select(1, chans_b), w_b, None, *conv))  # (N, r_b, OH, OW)
    return y


def _run_conv_nhwc(x, info, t, p, conv):
    """Channels-last x (memory N, H, W, C): a block's input is a column gather of the (N*H*W, C)
    matrix, oneDNN runs natively on it (no reorder of each block's input and output, which NCHW
    needs), and one index_select over the block outputs side by side (plus a zero column for rows
    in no block) puts every output channel in place."""
    N, _, OH, OW = _output_shape(x, info, conv)
    rows_total = len(t["rows"])
    y = _new(x, (N, OH, OW, rows_total + 1))  # block outputs side by side, then a zero column
    y[..., rows_total] = 0
    r0 = 0
    for rows_b, chans_b, w_b in _conv_blocks(info, t, p):
        y_b = F.conv2d(select_channels(x, chans_b), w_b, None, *conv)  # (N, r_b, OH, OW)
        y[..., r0:r0 + len(rows_b)] = y_b.permute(0, 2, 3, 1)
        r0 += len(rows_b)
    y = y.view(-1, rows_total + 1).index_select(1, p["position"])  # (N*OH*OW, O)
    return y.view(N, OH, OW, -1).permute(0, 3, 1, 2)  # (N, O, OH, OW), channels-last


# ---- path grouped: the per-block convs as one grouped conv ----

def _build_grouped(info, t):
    """Every block zero-padded to (r_max, c_max) side by side: "weight" (B*r_max, c_max, kh, kw)
    channels-last, "chans" (B*c_max,) the input channel of each group input (padding reads channel
    0), "real_rows" the real rows' positions among the padded ones."""
    _, _, kh, kw = info["weight_shape"]
    per_block, device = _block_channels(info, t), t["rows"].device
    B, r_max = len(per_block), max((len(r) for r, _, _ in per_block), default=0)
    c_max = max((len(c) for _, c, _ in per_block), default=0)
    weight = t["packed"].new_zeros(B, r_max, c_max * kh * kw)
    chans = torch.zeros(B, c_max, dtype=torch.int64, device=device)
    for b, (rows, ch, w) in enumerate(per_block):
        weight[b, :len(rows), :w.shape[1]] = w
        chans[b, :len(ch)] = ch
    real = [b * r_max + torch.arange(len(r), device=device) for b, (r, _, _) in enumerate(per_block)]
    return {"weight": weight.view(B * r_max, c_max, kh, kw).contiguous(memory_format=torch.channels_last),
            "chans": chans.view(-1), "real_rows": torch.cat(real) if real else t["rows"].new_zeros(0)}


def _run_grouped(x, info, t, p, conv):
    """One grouped conv (channels-last, B groups) over the gathered channels, scattered to rows."""
    y = _new(x, _output_shape(x, info, conv), memory_format_of(x))
    y.index_fill_(1, t["empty_rows"], 0.0)
    if not info["sizes"]:
        return y
    x_groups = select_channels(x, p["chans"]).contiguous(memory_format=torch.channels_last)  # (N, B*c_max, H, W)
    y_groups = F.conv2d(x_groups, p["weight"], None, *conv, len(info["sizes"]))  # (N, B*r_max, OH, OW)
    return y.index_copy_(1, t["rows"], select_channels(y_groups, p["real_rows"]))


# ---- path gather: im2col of the used columns once, one GEMM per block ----

def _build_gather(info, t):
    """im2col rows = the union U of the blocks' columns, ordered by kernel position j = ky*kw + kx,
    then channel: "union_chans" (|U|,) their channels, "pos_counts" how many per j, "union_idx"
    where each block's columns sit in U (blocks concatenated)."""
    _, C, kh, kw = info["weight_shape"]
    khkw, cols = kh * kw, t["cols"].cpu()
    union = torch.unique(cols)
    union = union[torch.argsort((union % khkw) * C + union // khkw)]
    pos_of_col = torch.full((C * khkw,), -1, dtype=torch.int64)
    pos_of_col[union] = torch.arange(union.numel())
    device = t["cols"].device
    return {"union_chans": (union // khkw).to(device), "union_idx": pos_of_col[cols].to(device),
            "pos_counts": torch.bincount(union % khkw, minlength=khkw).tolist()}


def _im2col_union(x, info, p, conv):
    """The im2col rows U of x, (|U|, N*OH*OW): per kernel position j, one strided window of the
    padded input and one index_select of its channels."""
    stride, padding, dilation = conv
    N, _, OH, OW = _output_shape(x, info, conv)
    kw = info["weight_shape"][3]
    xp = F.pad(x.transpose(0, 1).contiguous(), (padding[1], padding[1], padding[0], padding[0]))  # (C, N, Hp, Wp)
    x_cols = _new(x, (len(p["union_chans"]), N, OH, OW))
    start = 0
    for j, chans in enumerate(p["union_chans"].split(p["pos_counts"])):
        if len(chans):
            y0, x0 = (j // kw) * dilation[0], (j % kw) * dilation[1]
            y1, x1 = y0 + stride[0] * (OH - 1) + 1, x0 + stride[1] * (OW - 1) + 1
            window = xp[:, :, y0:y1:stride[0], x0:x1:stride[1]]  # (C, N, OH, OW)
            torch.index_select(window, 0, chans, out=x_cols[start:start + len(chans)])
            start += len(chans)
    return x_cols.view(len(p["union_chans"]), N * OH * OW)


def _run_gather(x, info, t, p, conv):
    """One GEMM per block on its rows of the shared im2col, into its output rows."""
    N, O, OH, OW = _output_shape(x, info, conv)
    x_cols = _im2col_union(x, info, p, conv)  # (|U|, N*OH*OW)
    y2 = _new(x, (O, N * OH * OW))
    y2.index_fill_(0, t["empty_rows"], 0.0)
    idx = p["union_idx"].split([c for _, c in info["sizes"]])
    for (rows_b, _, w_b), idx_b in zip(_blocks_of(info, t), idx):
        y2.index_copy_(0, rows_b, w_b @ x_cols.index_select(0, idx_b))
    y = y2.view(O, N, OH, OW).transpose(0, 1)  # (N, O, OH, OW), channel-major in memory
    return y.contiguous(memory_format=memory_format_of(x))


# ---- paths kernel16, kernel64: all blocks of a layer in one launch of CUDA_SRC ----

KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the launcher's dtype codes
KERNEL_TILE_ROWS = (16, 64)  # rows of a CTA tile, as CUDA_SRC instantiates them (16x128 and 64x64
                             # pixels): 16 pads thin blocks less, 64 reuses each im2col tile more;
                             # which is faster depends on the layer and the GPU, so both are measured
INT32_MAX = 2 ** 31 - 1      # the kernel's tables and weight offsets are int32
_EXT = {}  # "module": the built extension, or None once a build failed / CUDA is absent
BUILD_ERROR_CHARS = 200  # a failed build's first error line is cut to this many characters in its WARNING


def kernel_tables(info, t, tile_rows):
    """The kernel's int32 tables for tile_rows-row CTA tiles (one of KERNEL_TILE_ROWS): "meta" (B, 5)
    per block (row start, rows, col start, cols, weight offset); "tiles" (T, 2) per CTA row tile
    (block, first row); "rows", "cols" the plan's as int32; "tile_rows"."""
    if tile_rows not in KERNEL_TILE_ROWS:
        raise ValueError(f"tile_rows={tile_rows}: CUDA_SRC instantiates row tiles of {KERNEL_TILE_ROWS} only")
    meta, tiles, r0, c0, w0 = [], [], 0, 0, 0
    for b, (r, c) in enumerate(info["sizes"]):
        meta.append([r0, r, c0, c, w0])
        tiles += [[b, i] for i in range(0, r, tile_rows)]
        r0, c0, w0 = r0 + r, c0 + c, w0 + r * c
    if w0 > INT32_MAX:
        raise ValueError(f"{w0} packed block weights: too many for the kernel's int32 offsets")
    device = t["rows"].device
    return {"meta": torch.tensor(meta, dtype=torch.int32).view(-1, 5).to(device),
            "tiles": torch.tensor(tiles, dtype=torch.int32).view(-1, 2).to(device),
            "rows": t["rows"].int(), "cols": t["cols"].int(), "tile_rows": tile_rows}


def cuda_extension():
    """The CUDA kernel as a torch extension, built on first use (load_inline, cached). None where it
    cannot be: without a GPU silently (the kernel is no candidate there), else (a GPU before sm_80, a
    failed build) with one WARNING."""
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
            first = (str(e).strip().splitlines() or [""])[0][:BUILD_ERROR_CHARS]
            _warn_once(f"building the grouped-GEMM CUDA kernel failed ({type(e).__name__}: {first}): "
                       "measuring the other paths only")
    return _EXT["module"]


def _kernel_ready(x):
    """The kernel can run x: a dtype it is built for, and the extension built."""
    return x.dtype in KERNEL_DTYPES and cuda_extension() is not None


def _run_kernel(x, info, t, p, conv):
    """One launch of CUDA_SRC for all blocks (CUDA tensors of KERNEL_DTYPES); it reads and writes NCHW."""
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the CUDA kernel runs CUDA tensors of {[str(d) for d in KERNEL_DTYPES]}, got a "
                         f"{x.device.type} {x.dtype} input (without a GPU, test_lth_ref.emulated_grouped_conv2d "
                         "runs its source on the CPU)")
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("a kernel path is forced but the CUDA kernel is not available (see the WARNING above)")
    y = ext.grouped_conv2d_cuda(x.contiguous(), t["packed"].to(x.dtype), p["meta"], p["tiles"], p["rows"],
                                p["cols"], t["empty_rows"], list(info["weight_shape"]),
                                [v for pair in conv for v in pair], p["tile_rows"])
    return y.contiguous(memory_format=memory_format_of(x))


# ---- the path table, and measuring which path is fastest ----

@dataclasses.dataclass(frozen=True)
class Path:
    """One way to run a regrouped conv (the contract: module docstring). build(info, t) -> p, the
    tensors (RegroupedConv2d holds them as non-persistent buffers) and python values run needs;
    run(x, info, t, p, conv) -> y; devices: the device types where it is a candidate; ready(x):
    whether it can run x here (measured only then)."""
    build: Callable
    run: Callable
    devices: tuple
    ready: Callable = lambda x: True


PATHS = {
    "dense": Path(_build_dense, _run_dense, ("cpu", "cuda")),
    "conv": Path(_build_conv, _run_conv, ("cpu",)),
    "grouped": Path(_build_grouped, _run_grouped, ("cpu", "cuda")),
    "gather": Path(_build_gather, _run_gather, ("cpu",)),
    **{f"kernel{rows}": Path(functools.partial(kernel_tables, tile_rows=rows), _run_kernel, ("cuda",), _kernel_ready)
       for rows in KERNEL_TILE_ROWS},  # kernel16, kernel64
}
CANDIDATES = {device: tuple(name for name, path in PATHS.items() if device in path.devices)
              for device in ("cpu", "cuda")}  # the paths measured per device type
BENCH_WARMUP = 3    # untimed rounds before a benchmark's timing (bench_layers, bench_model and lth_ref's benches):
                    # allocator, oneDNN/cuDNN setup, compilation; each regrouped layer measures its paths first
MEASURE_WARMUP = 1  # untimed runs per candidate first: a first call pays allocation and oneDNN/cuDNN setup
MEASURE_RUNS = 3    # timed runs per candidate, interleaved across candidates (a slow spell on a shared
                    # machine hits all of them alike); the median of these decides
MEASURE_CUTOFF = 3.0  # a candidate this many times slower than the fastest in the first timed round is
                      # not run again: run-to-run noise is far smaller, it could not win the median


def choice_key(x):
    """What a layer's choice of path depends on besides the layer: input shape, memory format,
    dtype and device type."""
    fmt = "channels_last" if memory_format_of(x) == torch.channels_last else "contiguous"
    return tuple(x.shape), fmt, str(x.dtype).replace("torch.", ""), x.device.type


def candidate_paths(x):
    """The paths measured for input x: CANDIDATES of its device type that are ready for x. A device
    type without candidates gets the CPU's, with one WARNING."""
    device = x.device.type
    if device not in CANDIDATES:
        _warn_once(f"no paths are listed for {device} tensors: measuring the CPU's candidates on them")
        device = "cpu"
    return tuple(name for name in CANDIDATES[device] if PATHS[name].ready(x))


def measure_paths(runs, device):
    """{name: median ms} of each zero-argument fn in runs = {name: fn}, like cudnn.benchmark:
    MEASURE_WARMUP untimed runs each, then MEASURE_RUNS interleaved timed rounds; a candidate over
    MEASURE_CUTOFF x the fastest after the first round is dropped (its one time is kept)."""
    with torch.no_grad():
        for _ in range(MEASURE_WARMUP):
            for fn in runs.values():
                fn()
        times = {name: [time_once_ms(fn, device)] for name, fn in runs.items()}
        fastest = min(ts[0] for ts in times.values())
        contenders = [name for name in runs if times[name][0] <= MEASURE_CUTOFF * fastest]
        for _ in range(MEASURE_RUNS - 1):
            for name in contenders:
                times[name].append(time_once_ms(runs[name], device))
    return {name: statistics.median(ts) for name, ts in times.items()}


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


# ---- modules: a regrouped conv that measures its paths and holds only what it runs ----

class RegroupedConv2d(nn.Module):
    """Inference conv that runs only its dense blocks; output = the block-masked conv.

    Holds the packed block weights, the index tables (rows, cols, rows in no block, block sizes)
    and the bias; state_dict keeps exactly those. On the first input of each kind (choice_key) it
    times the candidate paths (candidate_paths, measure_paths) and keeps the fastest in
    info["choice"] (times in info["times"]); strategy= forces a path instead. A path's tensors
    (its build's, as buffers "<path>_<key>") are non-persistent, built when measured or chosen and
    dropped when no input chose it, so .to() moves them and .half() casts them.
    x (N, C, H, W) -> (N, O, OH, OW) in x's memory format."""

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
        self._plan_keys = list(tensors)
        self._built = {}  # path -> (its build's python values, the keys of its tensors)
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

    def _plan(self):
        """The plan's tensors (make_plan's t) as this module holds them."""
        return {k: self._buffers["plan_" + k] for k in self._plan_keys}  # (getattr is 7x slower per call)

    def _path(self, name, t):
        """Path `name`'s build output p, built from t on first use (its tensors as buffers)."""
        if name not in self._built:
            built = PATHS[name].build(self.info, t)
            keys = [k for k, v in built.items() if torch.is_tensor(v)]
            for key in keys:
                self.register_buffer(f"{name}_{key}", built[key], persistent=False)
            self._built[name] = ({k: v for k, v in built.items() if k not in keys}, keys)
        values, keys = self._built[name]
        return {**values, **{k: self._buffers[f"{name}_{k}"] for k in keys}}

    def _drop_paths(self, keep):
        """Free the tensors of every built path not in keep."""
        for name in [p for p in self._built if p not in keep]:
            for key in self._built.pop(name)[1]:
                del self._buffers[f"{name}_{key}"]

    def _measure(self, x, conv):
        """Time the candidates on x, record and return the fastest; free the tensors of the others."""
        t = self._plan()
        runs = {name: functools.partial(PATHS[name].run, x, self.info, t, self._path(name, t), conv)
                for name in candidate_paths(x)}
        times, key = measure_paths(runs, x.device), choice_key(x)
        self.info["times"][key], self.info["choice"][key] = times, min(times, key=times.get)
        self._drop_paths(keep={*self.info["choice"].values()})
        return self.info["choice"][key]

    def forward(self, x):
        conv = (self.stride, self.padding, self.dilation)
        path = self.path_for(x) or self._measure(x, conv)
        t = self._plan()
        y = PATHS[path].run(x, self.info, t, self._path(path, t), conv)  # a new tensor: add the bias in place
        return y if self.bias is None else y.add_(self.bias.view(1, -1, 1, 1))


def _drop_built_paths(module, incompatible_keys):
    """load_state_dict hook of RegroupedConv2d: its path tensors came from the old blocks."""
    module._drop_paths(keep=())


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
            dense_ms, regrouped_ms = time_interleaved([dense, lambda: layer(x)], device, repeats, warmup=BENCH_WARMUP)
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
        dense_ms, regrouped_ms = time_interleaved([lambda: dense(x), lambda: regrouped(x)], device, repeats,
                                                    warmup=BENCH_WARMUP)
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


# ---- the CUDA kernel's source: all blocks of a layer in one launch, WMMA tensor cores, implicit im2col ----
# Each CTA (128 threads, 4 warps) computes a (BM rows of one block) x (BN output pixels) tile:
# it loops over the block's columns BK at a time, staging the packed weights (BM, BK) and the
# im2col values (BK, BN), gathered straight from the NCHW input with zeros outside the image, in
# shared memory (ragged edges zero-padded), multiplies with WMMA (fp32 inputs: TF32 m16n16k8;
# half/bf16: m16n16k16; fp32 accumulate), and scatters rows to output channels rows_b.
# BM x BN = 16 x 128 (path kernel16) or 64 x 64 (kernel64), both measured. Needs sm_80+.
# LTH_REF_HOST_EMULATION: the host emulation in test_lth_ref.py compiles this text with g++.

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

// x (N, C, H, W); packed block weights; int32 tables from kernel_tables; empty_rows int64;
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
