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
    kernel32  padded weights, int32 tables, 32-row CTA tiles     CUDA_SRC: one launch, cp.async cuda
    kernel64  padded weights, int32 tables, 64-row CTA tiles     ring, WMMA; channels-last     cuda
Every path has the same two halves:
    p = build(info, t)              everything run needs besides the plan: tensors and python values
    y = run(x, info, t, p, conv)    x (N, C, H, W) -> y (N, O, OH, OW), a new tensor in x's memory
                                    format, rows in no block 0 (+ bias where the path adds it)
info and t come from make_plan: info describes the layer (shapes, block sizes, the forced path, the
measured times and choice per input kind); t holds its tensors (packed block weights, rows, cols,
rows in no block, and "bias" (O,) where the layer has one: RegroupedConv2d adds it to make_plan's).
A path with adds_bias adds t["bias"] inside its own call (dense: the conv's bias argument); for the
others the caller adds it. p may hold "<key>_channels_last" next to "<key>": the same tensor in
channels-last memory: for_format(p, x) puts it in place of "<key>" for channels-last x (once per
input kind in RegroupedConv2d); every run is correct with either.
conv = (stride, padding, dilation) as pairs.

RegroupedConv2d runs the fastest path for each input it meets: on the first input of each
choice_key (shape, dtype, memory format, device, whether a gradient flows back) it times every
candidate of that device (CANDIDATES, from the table; dense always among them, like cudnn.benchmark;
the CUDA kernel's tile height is measured as two paths; it is inference only, so never a candidate
for an input that needs a gradient) and keeps the winner if it beats dense by PATH_MARGIN, else
dense. bench_layers / bench_model: dense vs regrouped, per layer and end to end, in a chosen dtype,
each figure with its spread; on CUDA end to end also in CUDA graphs. bench_dense_cost: the dense
path against a plain F.conv2d. The CUDA source (CUDA_SRC, CPP_SRC) closes the file;
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
        rows, cols = (torch.as_tensor(t).reshape(-1) for t in block)
        if any(t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
               for t in (rows, cols)):               # a 0/1 mask or 2.0 is no index: never cast silently
            raise ValueError(f"{name}: block {i} must hold integer indices, got {rows.dtype} rows and "
                             f"{cols.dtype} cols")
        rows, cols = rows.to("cpu", torch.int64), cols.to("cpu", torch.int64)
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
    (O, C, kh, kw), as block_mask; blocks: [(rows, cols)], or [(row count, column count)]."""
    size = lambda v: v if isinstance(v, int) else len(v)
    return sum(size(r) * size(c) for r, c in blocks) / math.prod(shape)


def rows_in_no_block(out_rows, rows):
    """The output rows (int64, on rows' device) that no block covers: rows = the blocks' rows, joined."""
    used = torch.zeros(out_rows, dtype=torch.bool)
    used[rows.cpu()] = True
    return torch.nonzero(~used).view(-1).to(rows.device)


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
    empty = torch.zeros(0, dtype=torch.int64)
    rows = torch.cat([r for r, _ in blocks]) if blocks else empty
    info = {"weight_shape": tuple(weight.shape), "flop_ratio": flop_ratio(weight.shape, blocks),
            "sizes": [(len(r), len(c)) for r, c in blocks], "forced": strategy, "choice": {}, "times": {}}
    t = {"packed": pack_blocks(weight, blocks), "rows": rows.to(weight.device),
         "cols": (torch.cat([c for _, c in blocks]) if blocks else empty).to(weight.device),
         "empty_rows": rows_in_no_block(weight.shape[0], rows).to(weight.device)}
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


def check_input(x, info, conv):
    """ValueError unless x is an (N, C, H, W) input of the layer's C that the kernel fits in (padded), as
    F.conv2d says for the dense path: the other paths index their blocks' channels and would not notice."""
    channels = info["weight_shape"][1]
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"expected an input of shape (N, {channels}, H, W), got {tuple(x.shape)}")
    if min(_output_shape(x, info, conv)[2:]) < 1:
        raise ValueError(f"the kernel ({'x'.join(map(str, info['weight_shape'][2:]))}, dilation "
                         f"{conv[2]}) is larger than the padded input {tuple(x.shape[2:])}")


def _new(x, shape, memory_format=torch.contiguous_format):
    """An uninitialized tensor in x's dtype and on x's device. Every runner allocates its output and
    scratch here, so a test can fill them with NaN and see that every value read was written."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)


# ---- path dense: one conv with the block-masked weight ----

def _build_dense(info, t):
    """{"weight": the block-masked dense weight (O, C, kh, kw), rebuilt from the packed blocks, and
    "weight_channels_last": the same in channels-last memory}: a weight in the input's memory format
    spares oneDNN / cuDNN a reorder of the weight on every call. .to, not .contiguous: a 1x1 weight is
    in both formats at once and .contiguous keeps its strides, while .to gives those of an nn.Conv2d's
    weight after model.to(memory_format=torch.channels_last): the dense model's call, stride for stride."""
    O, C, kh, kw = info["weight_shape"]
    w2 = t["packed"].new_zeros(O, C * kh * kw)
    for rows, cols, w in _blocks_of(info, t):
        w2[rows[:, None], cols[None, :]] = w
    weight = w2.view(O, C, kh, kw)
    return {"weight": weight, "weight_channels_last": weight.to(memory_format=torch.channels_last)}


def _run_dense(x, info, t, p, conv):
    """One F.conv2d (oneDNN / cuDNN) with the bias inside, as nn.Conv2d runs; output in x's memory
    format. p["weight"] as given: for_format(p, x) makes it x's (else oneDNN / cuDNN reorder it per call)."""
    return F.conv2d(x, p["weight"], t.get("bias"), *conv)


def for_format(p, x):
    """p for inputs like x: each "<key>_channels_last" tensor replaces "<key>" when x is channels-last."""
    if memory_format_of(x) != torch.channels_last:
        return p
    suffix = "_channels_last"
    return {**p, **{k[:-len(suffix)]: v for k, v in p.items() if k.endswith(suffix)}}


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
            "weight": (torch.cat([w.reshape(-1) for _, _, w in per_block]) if per_block
                       else t["packed"].new_zeros(0)),
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
    0), "real_rows" the real rows' positions among the padded ones; with t["bias"]: "bias" (B*r_max,)
    for the grouped conv (0 on padding rows) and "empty_bias" (1, E, 1, 1) for the rows in no block."""
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
    p = {"weight": weight.view(B * r_max, c_max, kh, kw).contiguous(memory_format=torch.channels_last),
         "chans": chans.view(-1), "real_rows": torch.cat(real) if real else t["rows"].new_zeros(0)}
    if t.get("bias") is not None:
        p["bias"] = t["bias"].new_zeros(B * r_max)
        p["bias"][p["real_rows"]] = t["bias"][t["rows"]]
        p["empty_bias"] = t["bias"][t["empty_rows"]].view(1, -1, 1, 1)
    return p


def _run_grouped(x, info, t, p, conv):
    """One grouped conv (channels-last, B groups, the bias inside) over the gathered channels,
    scattered to rows; rows in no block get 0 (+ their bias)."""
    y = _new(x, _output_shape(x, info, conv), memory_format_of(x))
    if "empty_bias" in p:
        y[:, t["empty_rows"]] = p["empty_bias"]
    else:
        y.index_fill_(1, t["empty_rows"], 0.0)
    if not info["sizes"]:
        return y
    # x_groups: (N, B*c_max, H, W)
    x_groups = select_channels(x, p["chans"]).contiguous(memory_format=torch.channels_last)
    # y_groups: (N, B*r_max, OH, OW)
    y_groups = F.conv2d(x_groups, p["weight"], p.get("bias"), *conv, len(info["sizes"]))
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
    # xp: (C, N, Hp, Wp)
    xp = F.pad(x.transpose(0, 1).contiguous(), (padding[1], padding[1], padding[0], padding[0]))
    x_cols = _new(x, (len(p["union_chans"]), N, OH, OW))
    start, grad = 0, torch.is_grad_enabled() and x.requires_grad
    for j, chans in enumerate(p["union_chans"].split(p["pos_counts"])):
        if len(chans):
            y0, x0 = (j // kw) * dilation[0], (j % kw) * dilation[1]
            y1, x1 = y0 + stride[0] * (OH - 1) + 1, x0 + stride[1] * (OW - 1) + 1
            window = xp[:, :, y0:y1:stride[0], x0:x1:stride[1]]  # (C, N, OH, OW)
            if grad:                                            # out= has no autograd
                x_cols[start:start + len(chans)] = window.index_select(0, chans)
            else:
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


# ---- paths kernel32, kernel64: all blocks of a layer in one launch of CUDA_SRC ----

KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the launcher's dtype codes
KERNEL_TILE_ROWS = (32, 64)  # rows of a CTA tile, as CUDA_SRC instantiates them (32x128 and 64x64
                             # pixels): 32 pads thin blocks less, 64 reuses each im2col tile more;
                             # which is faster depends on the layer and the GPU, so both are measured
KERNEL_K_PAD = 32   # a block's columns are padded to this (CUDA_SRC's k tile: 64 bytes of fp16 or fp32
                    # columns)
KERNEL_ALIGN = 16   # bytes: the kernel's cp.async copies need 16-byte aligned input and weights
KERNEL_VECTOR = 8   # channels of one aligned vector: 16 bytes of fp16/bf16 (two 16-byte copies of fp32)
INT32_MAX = 2 ** 31 - 1      # the kernel's tables and weight offsets are int32
_EXT = {}  # "module": the built extension, or None once a build failed / CUDA is absent
BUILD_ERROR_CHARS = 200  # a failed build's first error line is cut to this many characters in its WARNING


def _kernel_block_columns(cols, C, kh, kw):
    """A block's columns in the kernel's order, (ky, kx, c) ascending, and whether they come in aligned
    vectors: runs of KERNEL_VECTOR consecutive channels from a multiple of KERNEL_VECTOR, at one (ky, kx)."""
    c, pos = cols // (kh * kw), cols % (kh * kw)
    order = torch.argsort(pos * C + c)
    c, pos = c[order], pos[order]
    runs = len(cols) % KERNEL_VECTOR == 0 and C % KERNEL_VECTOR == 0
    if runs and len(cols):
        cv, pv = c.view(-1, KERNEL_VECTOR), pos.view(-1, KERNEL_VECTOR)
        runs = bool((cv[:, 0] % KERNEL_VECTOR == 0).all()
                    and (cv - cv[:, :1] == torch.arange(KERNEL_VECTOR)).all()
                    and (pv == pv[:, :1]).all())
    return order, runs


def kernel_tables(info, t, tile_rows):
    """The kernel's tables for tile_rows-row CTA tiles (one of KERNEL_TILE_ROWS), on the plan's device:
    "meta" int32 (B, 6) per block (row start, rows, column start, padded columns, weight offset, 1 if
    its columns come in aligned vectors); "tiles" int32 (T, 2) per CTA row tile (block, first row);
    "rows" int32; "cols" int32 (K', 4) per padded column (c, ky, kx, 1), padding columns (0, 0, 0, 0);
    "weights": per block its weights, columns in the kernel's order, zero-padded to tile_rows rows
    and KERNEL_K_PAD columns; "tile_rows". Each block's columns are ordered (ky, kx, c)."""
    if tile_rows not in KERNEL_TILE_ROWS:
        raise ValueError(f"tile_rows={tile_rows}: CUDA_SRC instantiates row tiles of {KERNEL_TILE_ROWS} only")
    _, C, kh, kw = info["weight_shape"]
    meta, tiles, cols, weights, r0, c0, w0 = [], [], [], [], 0, 0, 0
    for b, (rows_b, cols_b, w_b) in enumerate(_blocks_of(info, t)):
        order, vec = _kernel_block_columns(cols_b.cpu(), C, kh, kw)
        r, k = len(rows_b), -(-len(cols_b) // KERNEL_K_PAD) * KERNEL_K_PAD
        rp = -(-r // tile_rows) * tile_rows
        wp = w_b.new_zeros(rp, k)
        wp[:r, :len(cols_b)] = w_b[:, order.to(w_b.device)]
        weights.append(wp.view(-1))
        col = cols_b.cpu()[order]
        tab = torch.zeros(k, 4, dtype=torch.int64)
        pos = col % (kh * kw)
        tab[:len(col)] = torch.stack([col // (kh * kw), pos // kw, pos % kw, torch.ones_like(col)], 1)
        cols.append(tab)
        meta.append([r0, r, c0, k, w0, int(vec)])
        tiles += [[b, i] for i in range(0, r, tile_rows)]
        r0, c0, w0 = r0 + r, c0 + k, w0 + rp * k
    if w0 > INT32_MAX:
        raise ValueError(f"{w0} padded block weights: too many for the kernel's int32 offsets")
    device = t["rows"].device
    return {"meta": torch.tensor(meta, dtype=torch.int32).view(-1, 6).to(device),
            "tiles": torch.tensor(tiles, dtype=torch.int32).view(-1, 2).to(device), "rows": t["rows"].int(),
            "cols": (torch.cat(cols) if cols else torch.zeros(0, 4, dtype=torch.int64)).int().to(device),
            "weights": torch.cat(weights) if weights else t["packed"].new_zeros(0), "tile_rows": tile_rows}


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
            _warn_once(f"grouped-GEMM kernel needs sm_80+ (have sm_{major}{minor}): "
                       "measuring the other paths only")
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
    """The kernel can run x: a dtype it is built for, no gradient to pass back (it is inference only: its
    output has no autograd history), and the extension built."""
    return x.dtype in KERNEL_DTYPES and not needs_grad(x) and cuda_extension() is not None


def needs_grad(x):
    """Whether a gradient must flow back to x through this call (autograd on and x requires one)."""
    return x.requires_grad and torch.is_grad_enabled()


def _run_kernel(x, info, t, p, conv):
    """One launch of CUDA_SRC for all blocks (CUDA tensors of KERNEL_DTYPES); it reads and writes
    channels-last (an NCHW input is converted, and its output converted back)."""
    if needs_grad(x):
        raise ValueError("the CUDA kernel is inference only: run it under torch.no_grad() or "
                         "torch.inference_mode(), or on an input that does not require grad")
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the CUDA kernel runs CUDA tensors of {[str(d) for d in KERNEL_DTYPES]}, got a "
                         f"{x.device.type} {x.dtype} input (without a GPU, "
                         "test_lth_ref.emulated_grouped_conv2d runs its source on the CPU)")
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("a kernel path is forced but the CUDA kernel is not available "
                           "(see the WARNING above)")
    xc = x.contiguous(memory_format=torch.channels_last)
    if xc.data_ptr() % KERNEL_ALIGN:  # a view at an odd offset: the 16-byte copies need an aligned base
        xc = xc.clone(memory_format=torch.channels_last)
    y = ext.grouped_conv2d_cuda(xc, p["weights"].to(x.dtype), p["meta"], p["tiles"], p["rows"],
                                p["cols"], t["empty_rows"], list(info["weight_shape"]),
                                [v for pair in conv for v in pair], p["tile_rows"])
    return y.contiguous(memory_format=memory_format_of(x))


# ---- the path table, and measuring which path is fastest ----

@dataclasses.dataclass(frozen=True)
class Path:
    """One way to run a regrouped conv (the contract: module docstring). build(info, t) -> p, the
    tensors (RegroupedConv2d holds them as non-persistent buffers) and python values run needs;
    run(x, info, t, p, conv) -> y; devices: the device types where it is a candidate; ready(x):
    whether it can run x here (measured only then); adds_bias: run adds t["bias"] itself."""
    build: Callable
    run: Callable
    devices: tuple
    ready: Callable = lambda x: True
    adds_bias: bool = False


PATHS = {
    "dense": Path(_build_dense, _run_dense, ("cpu", "cuda"), adds_bias=True),
    "conv": Path(_build_conv, _run_conv, ("cpu",)),
    "grouped": Path(_build_grouped, _run_grouped, ("cpu", "cuda"), adds_bias=True),
    "gather": Path(_build_gather, _run_gather, ("cpu",)),
    **{f"kernel{rows}": Path(functools.partial(kernel_tables, tile_rows=rows), _run_kernel, ("cuda",),
                             _kernel_ready)
       for rows in KERNEL_TILE_ROWS},  # kernel32, kernel64
}
CANDIDATES = {device: tuple(name for name, path in PATHS.items() if device in path.devices)
              for device in ("cpu", "cuda")}  # the paths measured per device type
BENCH_WARMUP = 3    # untimed rounds before a benchmark's timing (bench_layers, bench_model and lth_ref's
                    # benches): allocator, oneDNN/cuDNN setup, compilation; each regrouped layer measures
                    # its paths first
MEASURE_WARMUP = 1  # untimed runs per candidate first: a first call pays allocation and oneDNN/cuDNN setup
MEASURE_RUNS = 3    # timed samples per candidate on the CPU, interleaved across candidates (a slow spell on a
                    # shared machine hits all of them alike); the median of these decides
MEASURE_RUNS_CUDA = 5  # the same on CUDA, where a sample costs about CUDA_SAMPLE_MS: more samples, a median
                       # that clock boosts and other processes' kernels move less
MEASURE_CUTOFF = 3.0  # a candidate this many times slower than the fastest in the first timed round is
                      # not run again: run-to-run noise is far smaller, it could not win the median
PATH_MARGIN = 0.05  # a path other than dense is chosen only when its median beats dense's by this fraction:
                    # closer wins are within the run-to-run spread of medians, and dense is what F.conv2d
                    # users get, so a near-tie goes to dense ("never slower than dense")
CUDA_SAMPLE_MS = 1.0  # on CUDA a timed sample runs back-to-back calls for at least this long, synchronized:
                      # one call of a microsecond kernel measures launch overhead and timer jitter
CUDA_MAX_CALLS = 1000  # ... but at most this many calls per sample (kernels of under a microsecond)


def choice_key(x):
    """What a layer's choice of path depends on besides the layer: input shape, memory format,
    dtype, device type, and "grad" when a gradient flows back (the CUDA kernel is inference only)."""
    fmt = "channels_last" if memory_format_of(x) == torch.channels_last else "contiguous"
    key = tuple(x.shape), fmt, str(x.dtype).replace("torch.", ""), x.device.type
    return key + ("grad",) * needs_grad(x)


def candidate_paths(x):
    """The paths measured for input x: CANDIDATES of its device type that are ready for x. A device
    type without candidates gets the CPU's, with one WARNING."""
    device = x.device.type
    if device not in CANDIDATES:
        _warn_once(f"no paths are listed for {device} tensors: measuring the CPU's candidates on them")
        device = "cpu"
    return tuple(name for name in CANDIDATES[device] if PATHS[name].ready(x))


def choose_path(times):
    """The path to run from {name: median ms}: the fastest, but dense unless the fastest beats dense's
    median by PATH_MARGIN (a near-tie is noise, and dense is never slower than dense)."""
    best = min(times, key=times.get)
    if best != "dense" and "dense" in times and times[best] * (1 + PATH_MARGIN) > times["dense"]:
        return "dense"
    return best


def measure_paths(runs, device):
    """{name: median ms} of each zero-argument fn in runs = {name: fn}, like cudnn.benchmark:
    MEASURE_WARMUP untimed runs each, then MEASURE_RUNS (CUDA: MEASURE_RUNS_CUDA) interleaved timed
    samples of calls_per_sample calls; a candidate over MEASURE_CUTOFF x the fastest after the first
    round is dropped (its one time is kept), but never dense: the choice rule compares with its median."""
    cuda = torch.device(device).type == "cuda"
    with torch.no_grad():
        for _ in range(MEASURE_WARMUP):
            for fn in runs.values():
                fn()
        calls = {name: calls_per_sample(fn, device) for name, fn in runs.items()}
        times = {name: [time_once_ms(fn, device, calls[name])] for name, fn in runs.items()}
        fastest = min(ts[0] for ts in times.values())
        contenders = [name for name in runs if name == "dense" or times[name][0] <= MEASURE_CUTOFF * fastest]
        for _ in range((MEASURE_RUNS_CUDA if cuda else MEASURE_RUNS) - 1):
            for name in contenders:
                times[name].append(time_once_ms(runs[name], device, calls[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def calls_per_sample(fn, device):
    """Calls of fn per timed sample: 1 on the CPU; on CUDA enough to take CUDA_SAMPLE_MS (from one
    timed call, at most CUDA_MAX_CALLS)."""
    if torch.device(device).type != "cuda":
        return 1
    one_ms = time_once_ms(fn, device)
    return max(1, min(CUDA_MAX_CALLS, math.ceil(CUDA_SAMPLE_MS / max(one_ms, 1e-6))))


def time_once_ms(fn, device, calls=1):
    """Wall time of one fn() in ms, the mean of `calls` back-to-back calls: CUDA events on GPU
    (synchronized: waits for the kernels), perf_counter on the CPU."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def time_spread(fns, device, repeats, warmup):
    """{"min", "median", "max"} ms of each fn() over `repeats` rounds that time every fn once (fair
    on a shared machine), after `warmup` untimed rounds; on CUDA each timing is calls_per_sample
    back-to-back calls."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    calls = [calls_per_sample(fn, device) for fn in fns]
    rounds = [[time_once_ms(fn, device, n) for fn, n in zip(fns, calls)] for _ in range(repeats)]
    return [{"min": min(ts), "median": statistics.median(ts), "max": max(ts)} for ts in zip(*rounds)]


def time_interleaved(fns, device, repeats, warmup):
    """Median ms of each fn() (time_spread's medians)."""
    return [s["median"] for s in time_spread(fns, device, repeats, warmup)]


# ---- modules: a regrouped conv that measures its paths and holds only what it runs ----

class RegroupedConv2d(nn.Module):
    """Inference conv that runs only its dense blocks; output = the block-masked conv.

    Holds the packed block weights, the index tables (rows, cols, rows in no block, block sizes)
    and the bias; state_dict keeps exactly those. On the first input of each kind (choice_key) it
    times the candidate paths (candidate_paths, measure_paths) and keeps the fastest in
    info["choice"] (times in info["times"]); strategy= forces a path instead. A path's tensors
    (its build's, as buffers "<path>_<key>") are non-persistent, built when measured or chosen and
    dropped when no input chose it, so .to() moves them and .half() casts them. forward keeps the
    last input's kind (shape, strides, dtype, device) and its ready-bound runner: an input like the
    last one costs one tuple comparison more than the path itself; .to(), .half(), load_state_dict
    and copies drop that runner. x (N, C, H, W) -> (N, O, OH, OW) in x's memory format."""

    def __init__(self, weight, blocks, bias=None, stride=1, padding=0, dilation=1, name="conv",
                 strategy=None):
        super().__init__()
        blocks = check_blocks(tuple(weight.shape), blocks, name)
        self.name, self.weight_shape = name, tuple(weight.shape)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.dilation = tuple(d if k > 1 else 1 for d, k in zip(_pair(dilation), self.weight_shape[2:]))
        # a size-1 kernel side reads the same pixels at any dilation; F.conv2d (oneDNN, torch 2.13)
        # segfaults with such a dilation on channels-last inputs 1 pixel wide with stride and padding
        self.info, tensors = make_plan(weight, blocks, strategy)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("block_sizes", torch.tensor(self.info["sizes"], dtype=torch.int64).view(-1, 2))
        for key, value in tensors.items():  # state_dict: packed, rows, cols, block_sizes, bias
            self.register_buffer("plan_" + key, value, persistent=key != "empty_rows")
        self._plan_keys = list(tensors)
        self._built = {}  # path -> (its build's python values, the keys of its tensors)
        self._last = (None, None)  # (the last input's kind, the runner of its path)
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
        chosen = ", ".join(f"{'x'.join(map(str, k[0]))} {' '.join(k[1:])}: {p}"
                           for k, p in self.info["choice"].items())
        path = f"{self.info['forced']} (forced)" if self.info["forced"] else f"measured {{{chosen}}}"
        return (f"{self.name}: weight={self.weight_shape}, blocks={len(self.info['sizes'])}, "
                f"flop_ratio={self.info['flop_ratio']:.3f}, stride={self.stride}, padding={self.padding}, "
                f"path={path}")

    def path_for(self, x):
        """The path this layer runs (or ran) on inputs like x; None before it met one."""
        return self.info["forced"] or self.info["choice"].get(choice_key(x))

    def _plan(self):
        """The plan's tensors (make_plan's t, with "bias" where the layer has one) as this module
        holds them."""
        t = {k: self._buffers["plan_" + k] for k in self._plan_keys}  # (getattr is 7x slower per call)
        return t if self.bias is None else {**t, "bias": self.bias}

    def _path(self, name, t):
        """Path `name`'s build output p, built from t on first use (its tensors as buffers)."""
        if name not in self._built:
            with torch.inference_mode(False):  # kept, so normal tensors: autograd refuses inference ones
                built = PATHS[name].build(self.info, t)
            keys = [k for k, v in built.items() if torch.is_tensor(v)]
            for key in keys:
                self.register_buffer(f"{name}_{key}", built[key], persistent=False)
            self._built[name] = ({k: v for k, v in built.items() if k not in keys}, keys)
        values, keys = self._built[name]
        return {**values, **{k: self._buffers[f"{name}_{k}"] for k in keys}}

    def _drop_paths(self, keep):
        """Free the tensors of every built path not in keep."""
        self._last = (None, None)
        for name in [p for p in self._built if p not in keep]:
            for key in self._built.pop(name)[1]:
                del self._buffers[f"{name}_{key}"]

    def _measure(self, x, conv):
        """Time the candidates on x, record and return the fastest; free the tensors of the others."""
        t = self._plan()
        runs = {name: functools.partial(PATHS[name].run, x, self.info, t, for_format(self._path(name, t), x),
                                        conv)
                for name in candidate_paths(x)}
        times, key = measure_paths(runs, x.device), choice_key(x)
        self.info["times"][key], self.info["choice"][key] = times, choose_path(times)
        self._drop_paths(keep={*self.info["choice"].values()})
        return self.info["choice"][key]

    def _runner(self, x):
        """fn(x) -> this layer's output for inputs like x: its path's run with the plan, the path's
        tensors in x's memory format and conv bound, the bias added after it where the path does not."""
        conv = (self.stride, self.padding, self.dilation)
        check_input(x, self.info, conv)
        name = self.path_for(x) or self._measure(x, conv)
        t = self._plan()
        path, p, info = PATHS[name], for_format(self._path(name, t), x), self.info
        if self.bias is None or path.adds_bias:
            return lambda x: path.run(x, info, t, p, conv)
        bias = self.bias.view(1, -1, 1, 1)
        return lambda x: path.run(x, info, t, p, conv).add_(bias)  # run's y is a new tensor: add in place

    def forward(self, x):
        kind = (x.shape, x.stride(), x.dtype, x.device, needs_grad(x))
        last_kind, run = self._last
        if kind != last_kind:
            run = self._runner(x)
            self._last = (kind, run)
        return run(x)

    def _apply(self, fn, *args, **kwargs):
        """.to(), .half(), .cuda() ...: new tensors, so the last runner (bound to the old ones) goes."""
        self._last = (None, None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        """Copies and pickles leave the runner behind (it holds this module's tensors)."""
        return {**self.__dict__, "_last": (None, None)}


def _drop_built_paths(module, incompatible_keys):
    """load_state_dict hook of RegroupedConv2d: the loaded blocks may have other rows and sizes than the
    old ones (same buffer shapes), so the rows in no block, the sizes and the FLOP ratio are read again
    from the loaded buffers; every built path is dropped, and the measured choices too if sizes changed."""
    sizes = [tuple(s) for s in module.block_sizes.tolist()]
    module.plan_empty_rows = rows_in_no_block(module.weight_shape[0], module.plan_rows)
    if sizes != module.info["sizes"]:
        module.info.update(sizes=sizes, choice={}, times={},
                           flop_ratio=flop_ratio(module.weight_shape, sizes))
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

SPREAD_FLOOR = 1e-2  # rel_err(centered): the batch spread counts down to this share of max |ref|; below it
                    # the outputs hardly depend on the input, and dividing by the spread scores rounding


def rel_err(y, ref, centered=False):
    """max |y - ref| / max |ref|; centered: / max |ref - batch mean of ref|, at least SPREAD_FLOOR max |ref|
    (logits of an untrained model are mostly the classifier bias, which would hide errors in the
    features)."""
    y, ref = y.double(), ref.double()
    scale = ref.abs().max()
    if centered:
        scale = torch.maximum((ref - ref.mean(0, keepdim=True)).abs().max(), SPREAD_FLOOR * scale)
    return ((y - ref).abs().max() / scale.clamp_min(1e-30)).item()


# the benches' precisions
BENCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_WARMUP = 3  # eager calls on a side stream before a CUDA graph is captured: cuDNN/cuBLAS setup and first
                  # allocations stay out of the graph (torch.cuda.graphs' rule)
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"  # Linux: the driver's version line


def check_dtype(device, dtype):
    """ValueError, with the reason, when convs in dtype do not run on device (as fp16 on some CPUs)."""
    x = torch.zeros(1, 1, 3, 3, device=device, dtype=dtype)
    try:
        F.conv2d(x, torch.zeros(1, 1, 3, 3, device=device, dtype=dtype),
                 torch.zeros(1, device=device, dtype=dtype))
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:BUILD_ERROR_CHARS]
        raise ValueError(f"{str(dtype).replace('torch.', '')} convs do not run on this "
                         f"{torch.device(device).type} ({first}): bench in another precision") from None


def runtime_info(device, dtype):
    """What a timing depends on besides the code: device, dtype, torch and, on CUDA, the GPU's
    compute capability, the CUDA, cuDNN and driver versions."""
    device = torch.device(device)
    info = {"device": f"cpu ({torch.get_num_threads()} threads)", "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"sm_{major}{minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver())
    return info


def _nvidia_driver():
    """The NVIDIA driver's version line (Linux), or None."""
    try:
        with open(NVIDIA_DRIVER_FILE) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def cuda_graph(fn):
    """fn() captured once in a CUDA graph; returns its replay, a zero-argument fn that reruns the same
    kernels on the same tensors with one launch. Call it under torch.no_grad() for inference, after
    an eager call (a RegroupedConv2d measures its paths then, which a capture cannot). ValueError
    without CUDA."""
    if not torch.cuda.is_available():
        raise ValueError("CUDA graphs need a CUDA GPU")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


PAPER_PROFILE_BATCH, PAPER_PROFILE_SIZE = 64, 127  # Sec. A1, Fig. 7: the paper profiles each conv on a batch
                                                   # of 64 images of 127x127 (conv only)
PAPER_PROFILE = f"batch {PAPER_PROFILE_BATCH}, {PAPER_PROFILE_SIZE}x{PAPER_PROFILE_SIZE}"
SAME_PATH = "same path"  # a bench row's speedup where both sides run the same conv (the layer chose dense)


def is_noisy(a, b):
    """True when the spread (max - min) of either side's repeats is larger than the effect, the gap
    between the medians (a, b: time_spread dicts): the ratio of the medians says nothing then."""
    return max(a["max"] - a["min"], b["max"] - b["min"]) > abs(a["median"] - b["median"])


def spread_fields(dense, other, name, same_path=False, prefix=""):
    """A bench row's timing cells from two time_spread dicts: both medians, both ranges ("min-max"
    ms), speedup = dense / other median (SAME_PATH where both sides run the same conv), noisy."""
    cells = {"dense_ms": dense["median"], f"{name}_ms": other["median"],
             "dense_range_ms": _range(dense), f"{name}_range_ms": _range(other),
             "speedup": SAME_PATH if same_path else dense["median"] / other["median"],
             "noisy": is_noisy(dense, other)}
    return {prefix + k: v for k, v in cells.items()}


def _range(s):
    """A time_spread dict's range as "min-max" (ms, 3 significant digits)."""
    return f"{s['min']:.3g}-{s['max']:.3g}"


def _conv_input_shapes(model, batch_size, device, input_size, dtype=torch.float32):
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
        model(torch.randn(batch_size, *input_size, device=device, dtype=dtype))
    for h in hooks:
        h.remove()
    return shapes


def bench_layers(model, blocks, batch_size=64, device="cpu", paper_setting=False, repeats=10,
                 input_size=(3, 32, 32), log=None, memory_format=torch.contiguous_format,
                 dtype=torch.float32):
    """Per regrouped conv: dense F.conv2d with the masked weight vs RegroupedConv2d, conv only.

    Inputs: the layer's real activation shape for a batch of `input_size` images (default), or with
    paper_setting every conv fed a (batch_size, C, PAPER_PROFILE_SIZE, PAPER_PROFILE_SIZE) input
    (the paper's profile: PAPER_PROFILE_BATCH). Same dtype and memory_format (of the inputs and the dense
    weight) on both sides (on GPU, fp32 convs and our kernel both use TF32 by default). Outputs are
    checked against dense before timing (that first call also measures the layer's paths). Returns one
    dict per conv: `path` the chosen path, `candidates` every measured path's median ms, spread_fields
    (speedup SAME_PATH where the layer runs dense), `ideal_speedup` (1 / flop_ratio, "-" for dense)."""
    device = torch.device(device)
    check_dtype(device, dtype)
    model = copy.deepcopy(model).to(device, dtype).eval()
    shapes = None if paper_setting else _conv_input_shapes(model, batch_size, device, input_size, dtype)
    results = []
    for key, module_name, conv in _conv_modules(model, blocks):
        shape = (batch_size, conv.in_channels, PAPER_PROFILE_SIZE, PAPER_PROFILE_SIZE) if paper_setting \
            else shapes[module_name]
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        layer = RegroupedConv2d.from_conv(conv, blocks[key], name=key)
        mask = block_mask(layer.weight_shape, check_blocks(layer.weight_shape, blocks[key], key))
        weight = (conv.weight.detach() * mask.to(conv.weight)).contiguous(memory_format=memory_format)
        dense = functools.partial(F.conv2d, x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        with torch.no_grad():
            err = rel_err(layer(x), dense())
            dense_t, layer_t = time_spread([dense, lambda: layer(x)], device, repeats, warmup=BENCH_WARMUP)
        ratio, path = layer.info["flop_ratio"], layer.path_for(x)
        measured = layer.info["times"].get(choice_key(x), {})
        row = {"name": key, "shape": layer.weight_shape, "input_hw": tuple(shape[2:]),
               "blocks": len(layer.info["sizes"]), "flop_ratio": ratio, "path": path,
               "candidates": ", ".join(f"{p} {ms:.3g}" for p, ms in measured.items()),
               "ideal_speedup": "-" if path == "dense" else 1 / ratio if ratio else float("inf"),
               **spread_fields(dense_t, layer_t, "regrouped", same_path=path == "dense"),
               "max_rel_err": err, "dtype": str(dtype).replace("torch.", "")}
        results.append(row)
        if log:
            log(row)
    return results


def bench_model(model, blocks, batch_size=64, device="cpu", repeats=10, input_size=(3, 32, 32), log=None,
                memory_format=torch.contiguous_format, dtype=torch.float32, graphs=True):
    """End to end (eval, no_grad): the masked dense model vs regrouped_model, same input, dtype and
    memory_format (both models and the input converted to it); outputs checked first (max_rel_err
    against the batch spread of the dense logits; this also measures every layer's paths). Eager,
    and on CUDA with graphs=True also each model captured in a CUDA graph (graph_* cells; launches
    no longer hide the compute); without CUDA the graphs are skipped ("timing": "eager").
    conv_flop_ratio counts every conv's MACs, the unpruned stem's too; paths counts the regrouped
    convs per chosen path. Returns one dict, with runtime_info."""
    device = torch.device(device)
    check_dtype(device, dtype)
    dense = masked_model(model, blocks).to(device, dtype, memory_format=memory_format)
    regrouped = regrouped_model(model, blocks).to(device, dtype, memory_format=memory_format)
    x = (torch.randn(batch_size, *input_size, device=device, dtype=dtype)
         .contiguous(memory_format=memory_format))
    conv_ratio = _conv_flop_ratio(dense, regrouped, _conv_input_shapes(dense, 1, device, input_size, dtype))
    fns = [lambda: dense(x), lambda: regrouped(x)]
    with torch.no_grad():
        err = rel_err(regrouped(x), dense(x), centered=True)
        result = {"batch_size": batch_size, **runtime_info(device, dtype),
                  "memory_format": {v: k for k, v in MEMORY_FORMATS.items()}[memory_format],
                  **spread_fields(*time_spread(fns, device, repeats, warmup=BENCH_WARMUP), "regrouped")}
        graphed = device.type == "cuda" and graphs
        if graphed:
            replays = [cuda_graph(fn) for fn in fns]
            result.update(spread_fields(*time_spread(replays, device, repeats, warmup=BENCH_WARMUP),
                                        "regrouped", prefix="graph_"))
    paths = Counter(p for m in regrouped.modules() if isinstance(m, RegroupedConv2d)
                    for p in ([m.info["forced"]] if m.info["forced"] else m.info["choice"].values()))
    result.update(timing="eager + CUDA graphs" if graphed else "eager", max_rel_err=err,
                  conv_flop_ratio=conv_ratio, ideal_conv_speedup=1 / max(conv_ratio, 1e-30),
                  paths=", ".join(f"{p} {n}" for p, n in paths.most_common()))
    if log:
        log(result)
    return result


def _conv_flop_ratio(dense, regrouped, shapes):
    """The regrouped model's share of the dense model's conv MACs (shapes: _conv_input_shapes of dense)."""
    macs_dense = macs_regrouped = 0
    for name, m in dense.named_modules():
        if isinstance(m, nn.Conv2d):
            oh, ow = conv_out_hw(shapes[name][2:], m.kernel_size, m.stride, m.padding, m.dilation)
            macs, swapped = m.weight.numel() * oh * ow, regrouped.get_submodule(name)
            ratio = swapped.info["flop_ratio"] if isinstance(swapped, RegroupedConv2d) else 1.0
            macs_dense, macs_regrouped = macs_dense + macs, macs_regrouped + ratio * macs
    return macs_regrouped / macs_dense


# CIFAR convs (VGG-16, ResNet-18): (channels, H = W)
DENSE_COST_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))
DENSE_COST_DENSITY = 0.1  # the blocks' share of the weight (irrelevant to dense, which runs every weight)


def bench_dense_cost(batches=(1, 64, 256), device="cpu", dtype=torch.float32, repeats=100, log=print):
    """What the dense path of RegroupedConv2d costs over a plain F.conv2d (3x3, bias) with the same
    block-masked weight, per call, on the CIFAR shapes DENSE_COST_SHAPES, both memory formats, next
    to an nn.Conv2d (which pays the same module call): one dict per (batch, shape, format) with the
    medians, ratio = conv2d / dense and module_ratio = nn.Conv2d / dense (1.0 = no cost), noisy.
    A benchmark, not a test: `python -c "import kernels; kernels.bench_dense_cost()"`."""
    rows, g = [], torch.Generator().manual_seed(0)
    for batch in batches:
        for channels, hw in DENSE_COST_SHAPES:
            w, b = torch.randn(channels, channels, 3, 3, generator=g), torch.randn(channels, generator=g)
            k = channels * 9
            blocks = [(torch.arange(channels), torch.randperm(k, generator=g)[:int(DENSE_COST_DENSITY * k)])]
            layer = RegroupedConv2d(w, blocks, b, padding=1, strategy="dense").to(device, dtype)
            weight = (w * block_mask(w.shape, blocks)).to(device, dtype)
            module = nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype)
            for fmt_name, fmt in MEMORY_FORMATS.items():
                x = (torch.randn(batch, channels, hw, hw, generator=g).to(device, dtype)
                     .contiguous(memory_format=fmt))
                wf, bias = weight.contiguous(memory_format=fmt), b.to(device, dtype)
                with torch.no_grad():
                    module.weight.copy_(wf)
                    module.bias.copy_(bias)
                    module.to(memory_format=fmt)
                    fns = [lambda: F.conv2d(x, wf, bias, 1, 1), lambda: layer(x), lambda: module(x)]
                    conv, dense, nn_conv = time_spread(fns, device, repeats, warmup=BENCH_WARMUP)
                row = {"batch": batch, "channels": channels, "hw": hw, "memory_format": fmt_name,
                       "conv2d_ms": conv["median"], "dense_ms": dense["median"],
                       "module_ms": nn_conv["median"], "ratio": conv["median"] / dense["median"],
                       "module_ratio": nn_conv["median"] / dense["median"],
                       "noisy": is_noisy(conv, dense)}
                rows.append(row)
                log(row)
    return rows


# ---- the CUDA kernel's source: all blocks of a layer in one launch, cp.async ring, WMMA tensor cores ----
# Each CTA (256 threads, 8 warps) computes a (BM rows of one block) x (BN output pixels) tile, an
# implicit GEMM over the block's columns, ordered (ky, kx, c) and padded to the k tile (64 bytes per
# row): a STAGES-deep shared-memory ring, filled with 16-byte cp.async copies (commit_group /
# wait_group), holds the padded weights (BM, BK) and the im2col tile (BN pixels, BK columns) read
# straight from the channels-last input: per CTA each pixel's base offset once, per 16-byte copy one
# table entry (c, ky, kx) and one bounds test for its (pixel, ky, kx); outside the image the copy
# zero-fills. A block whose columns are not aligned vectors (the paper's position unit) takes the
# same ring with one plain load per element instead. WMMA multiplies (fp32 inputs: TF32 m16n16k8;
# half/bf16: m16n16k16; fp32 accumulate); the result tile reuses the ring and is scattered to output
# channels rows_b of the channels-last output. BM x BN = 32 x 128 (path kernel32) or 64 x 64
# (kernel64), both measured. The column table holds (c, ky, kx), not the offset delta, so it does
# not depend on the input's size: the delta costs two multiply-adds per copy. Needs sm_80+.
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

constexpr int THREADS = 256;     // 8 warps per CTA
constexpr int STAGES = 3;        // shared-memory ring: loads of tile k+2 overlap the MMAs of tile k
constexpr int KT_BYTES = 64;     // bytes of each row per k tile (32 half/bf16 or 16 float columns)
constexpr int OUTSIDE = -(1 << 29);  // ih0 of a pixel past the batch: never inside the image

#ifndef LTH_REF_HOST_EMULATION
// cp.async: 16 bytes global -> shared, bypassing L1 (.cg); src_bytes 0 writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

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

// x (N, H, W, C) and y (N, OH, OW, O): channels-last. w: per block its weights, rows padded to BM and
// columns to the k tile, row-major at meta[6b+4]. meta[6b..6b+5] = row start in rows[], rows, column
// start in cols[], padded columns, weight offset, 1 if the block's columns come in aligned vectors
// (runs of 16 bytes of consecutive channels at one (ky, kx)). cols: per padded column (c, ky, kx, 1);
// padding columns (0, 0, 0, 0) read as zeros. tiles[2t..2t+1] = block, first row of row tile t.
// CTA i runs row tile i % num_tiles on pixel tile i / num_tiles: the CTAs of all blocks that read one
// pixel tile run side by side, so its input is fetched from DRAM about once and then served by L2.
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(THREADS)
grouped_conv2d_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                      const int* __restrict__ meta, const int* __restrict__ tiles, const int num_tiles,
                      const int* __restrict__ rows, const int4* __restrict__ cols, const ConvDims d) {
  using Frag = typename Mma<T>::Frag;
  constexpr int MK = Mma<T>::K, BK = KT_BYTES / sizeof(T), VE = 16 / sizeof(T);  // VE: elements per copy
  constexpr int LDS = BK + VE;                                 // stage row pitch: 16 bytes of padding
  constexpr int WARPS_M = BM / 16 >= 4 ? 4 : BM / 16, WARPS_N = THREADS / 32 / WARPS_M;
  constexpr int FM = BM / WARPS_M / 16, FN = BN / WARPS_N / 16;  // 16x16 fragments per warp
  constexpr int STAGE = (BM + BN) * LDS, LDC = BM + 4;         // elements per stage; c_s pixel pitch
  constexpr int RING = STAGES * STAGE * (int)sizeof(T), CBYTES = BN * LDC * (int)sizeof(float);
  static_assert(FM >= 1 && FN >= 1 && BK % MK == 0 && WARPS_M * WARPS_N * 32 == THREADS, "tile shape");
  // one buffer: the ring while the k loop runs, then the fp32 result tile (BN pixels x BM rows)
  __shared__ __align__(128) T ring[(RING > CBYTES ? RING : CBYTES) / sizeof(T)];
  __shared__ long long pix_base[BN];     // element offset of (n, ih0, iw0, 0) in x
  __shared__ int pix_ih[BN], pix_iw[BN];  // ih0, iw0 of each pixel of the tile (OUTSIDE past the batch)
  float* c_s = reinterpret_cast<float*>(ring);

  const int tile = blockIdx.x % num_tiles;
  const long long pix0 = (long long)(blockIdx.x / num_tiles) * BN, NL = (long long)d.N * d.OH * d.OW;
  const int b = tiles[2 * tile], row0 = tiles[2 * tile + 1];
  const int row_start = meta[6 * b], nrows = meta[6 * b + 1], col_start = meta[6 * b + 2];
  const int nk = meta[6 * b + 3] / BK, kpad = meta[6 * b + 3];
  const bool vec = meta[6 * b + 5] != 0;
  const T* wb = w + meta[6 * b + 4] + (long long)row0 * kpad;
  const int4* cb = cols + col_start;
  const int tid = threadIdx.x, warp = tid / 32, warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const T zero = from_float<T>(0.0f);

  for (int pp = tid; pp < BN; pp += THREADS) {  // pixel bases, once per CTA
    const long long p = pix0 + pp;
    int ih0 = OUTSIDE, iw0 = 0;
    long long base = 0;
    if (p < NL) {
      const int L = d.OH * d.OW, n = (int)(p / L), l = (int)(p - (long long)n * L), oh = l / d.OW;
      ih0 = oh * d.stride_h - d.pad_h;
      iw0 = (l - oh * d.OW) * d.stride_w - d.pad_w;
      base = (((long long)n * d.H + ih0) * d.W + iw0) * d.C;
    }
    pix_base[pp] = base;
    pix_ih[pp] = ih0;
    pix_iw[pp] = iw0;
  }
  __syncthreads();

  // k tile kt -> ring stage s: weights (BM, BK) and im2col (BN pixels, BK columns), both k-contiguous
  auto load = [&](int kt, int s) {
    T* a_s = ring + s * STAGE;
    T* b_s = a_s + BM * LDS;
    for (int i = tid; i < BM * (BK / VE); i += THREADS) {
      const int r = i / (BK / VE), q = i % (BK / VE);
      cp_async16(a_s + r * LDS + q * VE, wb + (long long)r * kpad + kt * BK + q * VE, 16);
    }
    if (vec) {  // one 16-byte copy per (pixel, vector); bounds once per copy
      for (int i = tid; i < BN * (BK / VE); i += THREADS) {
        const int pp = i / (BK / VE), q = i % (BK / VE);
        const int4 e = cb[kt * BK + q * VE];
        const int dy = e.y * d.dil_h, dx = e.z * d.dil_w, ih = pix_ih[pp] + dy, iw = pix_iw[pp] + dx;
        const bool ok = e.w != 0 && ih >= 0 && ih < d.H && iw >= 0 && iw < d.W;
        const T* src = ok ? x + pix_base[pp] + ((long long)dy * d.W + dx) * d.C + e.x : x;
        cp_async16(b_s + pp * LDS + q * VE, src, ok ? 16 : 0);
      }
    } else {  // columns not in whole vectors: one element per thread and column, plain loads
      for (int i = tid; i < BN * BK; i += THREADS) {
        const int pp = i / BK, kk = i % BK;
        const int4 e = cb[kt * BK + kk];
        const int dy = e.y * d.dil_h, dx = e.z * d.dil_w, ih = pix_ih[pp] + dy, iw = pix_iw[pp] + dx;
        const bool ok = e.w != 0 && ih >= 0 && ih < d.H && iw >= 0 && iw < d.W;
        b_s[pp * LDS + kk] = ok ? x[pix_base[pp] + ((long long)dy * d.W + dx) * d.C + e.x] : zero;
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, MK, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; i++)
#pragma unroll
    for (int j = 0; j < FN; j++) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int s = 0; s < STAGES - 1; s++) {  // prologue: the first STAGES - 1 tiles in flight
    if (s < nk) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; kt++) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies) ...
    __syncthreads();              // ... everyone's; and every warp is done with tile kt - 1
    if (kt + STAGES - 1 < nk) load(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);  // into tile kt - 1's stage
    cp_async_commit();
    const T* a_s = ring + (kt % STAGES) * STAGE;
    const T* b_s = a_s + BM * LDS;
#pragma unroll
    for (int ks = 0; ks < BK; ks += MK) {
      wmma::fragment<wmma::matrix_a, 16, 16, MK, Frag, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, MK, Frag, wmma::col_major> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; i++) {
        wmma::load_matrix_sync(fa[i], a_s + (warp_m * FM + i) * 16 * LDS + ks, LDS);
        if constexpr (std::is_same<T, float>::value)
          for (int e = 0; e < fa[i].num_elements; e++) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
      }
#pragma unroll
      for (int j = 0; j < FN; j++) {
        wmma::load_matrix_sync(fb[j], b_s + (warp_n * FN + j) * 16 * LDS + ks, LDS);
        if constexpr (std::is_same<T, float>::value)
          for (int e = 0; e < fb[j].num_elements; e++) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
      }
#pragma unroll
      for (int i = 0; i < FM; i++)
#pragma unroll
        for (int j = 0; j < FN; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: the result tile takes its place
#pragma unroll
  for (int i = 0; i < FM; i++)
#pragma unroll
    for (int j = 0; j < FN; j++)
      wmma::store_matrix_sync(c_s + (warp_n * FN + j) * 16 * LDC + (warp_m * FM + i) * 16, acc[i][j], LDC,
                              wmma::mem_col_major);
  __syncthreads();
  for (int i = tid; i < BM * BN; i += THREADS) {  // row r of pixel pp -> y[pixel, rows[row_start + row0 + r]]
    const int r = i % BM, pp = i / BM, gr = row0 + r;
    const long long p = pix0 + pp;
    if (gr < nrows && p < NL) y[p * d.O + rows[row_start + gr]] = from_float<T>(c_s[pp * LDC + r]);
  }
}

template <typename T, int BM, int BN>
cudaError_t launch(const void* x, const void* w, void* y, const int* meta, const int* tiles, int num_tiles,
                   const int* rows, const int* cols, const ConvDims& d, cudaStream_t stream) {
  const long long pixel_tiles = ((long long)d.N * d.OH * d.OW + BN - 1) / BN, grid = pixel_tiles * num_tiles;
  if (num_tiles == 0 || grid == 0) return cudaSuccess;
  if (grid > 2147483647LL) return cudaErrorInvalidConfiguration;
#ifndef LTH_REF_HOST_EMULATION
  grouped_conv2d_kernel<T, BM, BN><<<dim3((unsigned)grid), THREADS, 0, stream>>>(
#else
  lth_emu::launch(dim3((unsigned)grid), dim3(THREADS), grouped_conv2d_kernel<T, BM, BN>,
#endif
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), meta, tiles, num_tiles, rows,
      reinterpret_cast<const int4*>(cols), d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tiles(int tile_rows, const void* x, const void* w, void* y, const int* meta,
                         const int* tiles, int num_tiles, const int* rows, const int* cols, const ConvDims& d,
                         cudaStream_t stream) {
  if (tile_rows == 32) return launch<T, 32, 128>(x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  if (tile_rows == 64) return launch<T, 64, 64>(x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  return cudaErrorInvalidValue;
}
}  // namespace lth_ref

// dtype: 0 float (TF32 tensor cores), 1 half, 2 bfloat16; tile_rows: 32 or 64 (rows per CTA tile);
// dims: N, C, H, W, O, OH, OW, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w. x, y channels-last,
// x 16-byte aligned; cols: 4 ints per padded column. y must be preallocated; rows in no block are not
// written. Returns a cudaError_t as int.
int grouped_conv2d_launch(int dtype, int tile_rows, const void* x, const void* w, void* y, const int* meta,
                          const int* tiles, int num_tiles, const int* rows, const int* cols, const int* dims,
                          cudaStream_t stream) {
  const lth_ref::ConvDims d = {dims[0], dims[1], dims[2],  dims[3],  dims[4],  dims[5],  dims[6], dims[7],
                               dims[8], dims[9], dims[10], dims[11], dims[12], dims[13], dims[14]};
  using lth_ref::launch_tiles;
  cudaError_t err = cudaErrorInvalidValue;
  if (dtype == 0)
    err = launch_tiles<float>(tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  if (dtype == 1)
    err = launch_tiles<__half>(tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
  if (dtype == 2)
    err = launch_tiles<__nv_bfloat16>(tile_rows, x, w, y, meta, tiles, num_tiles, rows, cols, d, stream);
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

// x (N, C, H, W) channels-last, 16-byte aligned; the padded block weights and int32 tables from
// kernel_tables; empty_rows int64; weight_shape (O, C, kh, kw); conv (stride_h, stride_w, pad_h, pad_w,
// dil_h, dil_w) -> y (N, O, OH, OW) channels-last
torch::Tensor grouped_conv2d_cuda(torch::Tensor x, torch::Tensor packed, torch::Tensor meta,
                                  torch::Tensor tiles, torch::Tensor rows, torch::Tensor cols,
                                  torch::Tensor empty_rows,
                                  std::vector<int64_t> weight_shape, std::vector<int64_t> conv,
                                  int64_t tile_rows) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
              reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "grouped_conv2d_cuda: x: channels-last 4-D CUDA tensor, 16-byte aligned");
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == x.scalar_type() &&
              packed.is_contiguous() && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
              "grouped_conv2d_cuda: padded weights must be contiguous, 16-byte aligned, on x's device, "
              "in x's dtype");
  TORCH_CHECK(cols.dim() == 2 && cols.size(1) == 4 && meta.dim() == 2 && meta.size(1) == 6,
              "grouped_conv2d_cuda: cols (K', 4) and meta (B, 6) expected");
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
  const int64_t span_h = H + 2 * conv[2] - conv[4] * (kh - 1) - 1;  // OH = span_h / stride + 1
  const int64_t span_w = W + 2 * conv[3] - conv[5] * (kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, "grouped_conv2d_cuda: the kernel is larger than the padded input");
  const int64_t OH = span_h / conv[0] + 1, OW = span_w / conv[1] + 1;  // span >= 0: C++ / rounds down here
  TORCH_CHECK(OH > 0 && OW > 0 && H * W < INT_MAX / 4 && OH * OW < INT_MAX, "grouped_conv2d_cuda: bad sizes");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({N, O, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
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
