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
Without a GPU, test_lth_ref.emulated_grouped_conv2d runs CUDA_SRC itself on the CPU (g++, an
emulation of CUDA threads, barriers and WMMA), also under sanitizers.
bench_layers / bench_model: dense (cuDNN/oneDNN) vs regrouped, per layer and end to end.
This file imports nothing else of its project: copy it alone.
"""

import copy
import math
import statistics
import sys
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
    if "kernel" in paths and (x.dtype not in KERNEL_DTYPES or cuda_extension() is None):
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


def cuda_extension():
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


def _run_kernel(x, info, t, conv_args, out):
    """All blocks of a layer in one launch of CUDA_SRC (CUDA tensors of KERNEL_DTYPES)."""
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"path 'kernel' runs CUDA tensors of {[str(d) for d in KERNEL_DTYPES]}, got a "
                         f"{x.device.type} {x.dtype} input (on the CPU, test_lth_ref.emulated_grouped_conv2d runs its source)")
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("path 'kernel' is forced but the CUDA kernel is not available (see the WARNING above)")
    conv = [v for pair in conv_args for v in pair]
    y = ext.grouped_conv2d_cuda(x.contiguous(), t["packed"].to(x.dtype), t["cuda_meta"], t["cuda_tiles"],
                                t["cuda_rows"], t["cuda_cols"], t["empty_rows"], list(info["weight_shape"]),
                                conv, info["tile_rows"])
    y = y.contiguous(memory_format=memory_format_of(x))  # the kernel reads and writes NCHW
    return out.copy_(y) if out is not None else y


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
