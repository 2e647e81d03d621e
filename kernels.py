"""
Running regrouped convs fast: a grouped GEMM over the dense blocks of a structural ticket.

Paper: Chen et al., "Coarsening the Granularity: Towards Structurally Sparse Lottery Tickets",
ICML 2022, Sec. 3.3 and A1 (regroup, then one kernel per layer that runs all dense blocks).
A regrouped conv with weight W (O, C, kh, kw) has `blocks`: a list of (rows, cols) int64 tensors,
rows = output channels (disjoint across blocks), cols = flattened (c, ky, kx) positions of
W.view(O, K), K = C*kh*kw. Its mask is the union of the rows x cols rectangles, and
    Y[n, rows_b, oh, ow] = sum_{k in cols_b} W2[rows_b, k] * im2col(X)[n, k, oh, ow]
with output channels in no block equal to 0 (plus the bias, if any).

Paths, all giving the output of F.conv2d with the block-masked weight:
- grouped_gemm_reference: unfold + index_select + matmul per block (tiny, obviously correct).
- grouped_conv2d_cpu: exact CPU path; per layer and input shape, a measured cost rule
  (cpu_strategy_costs) picks one dense conv with the masked weight, one conv per block over the
  input channels it uses, the same per-block convs as one grouped conv, or a gather-GEMM (im2col
  of the used columns once, one matmul per block). Channels-last inputs stay channels-last: the
  per-block convs then gather columns of the (N*H*W, C) matrix and oneDNN skips its reorders, which
  on our CPU machine makes them (and the dense conv) faster; see README.
- CUDA: CUDA_SRC, one launch per layer, WMMA tensor cores, implicit im2col (see that section).
- RegroupedConv2d / regrouped_model: inference modules that hold only the packed block weights.
- bench_layers / bench_model: dense (cuDNN/oneDNN) vs regrouped, per layer and end to end.
"""

import copy
import math
import statistics
import sys
import time

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


def block_mask(weight_shape, blocks):
    """0/1 float mask of shape weight_shape = (O, C, kh, kw): the union of rows x cols rectangles."""
    O = weight_shape[0]
    mask2d = torch.zeros(O, math.prod(weight_shape[1:]))
    for rows, cols in blocks:
        mask2d[rows[:, None], cols[None, :]] = 1.0
    return mask2d.view(weight_shape)


def pack_blocks(weight, blocks):
    """Concatenate the dense block weights W2[rows_b][:, cols_b], row-major, into one 1-D tensor."""
    w2 = weight.detach().reshape(weight.shape[0], -1)  # (O, K)
    parts = [w2[rows.to(w2.device)][:, cols.to(w2.device)].reshape(-1) for rows, cols in blocks]
    return torch.cat(parts) if parts else w2.new_zeros(0)


def flop_ratio(weight_shape, blocks):
    """sum_b |rows_b| * |cols_b| / (O * K): the regrouped conv's share of the dense MACs."""
    return sum(len(r) * len(c) for r, c in blocks) / math.prod(weight_shape)


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


# ---- CPU path: dense conv | per-block convs | one grouped conv | gather-GEMM, per layer and shape ----
# Cost rule, in dense-MAC equivalents (1 unit = one MAC of a large oneDNN conv). Constants fitted
# (non-negative least squares on relative error) to 91 timings of CIFAR-size layers x block
# structures: torch 2.13 (oneDNN 3.12, MKL) fp32, 2 threads of a 2-core AVX-512 EPYC, batch 64.
# P = output pixels N*OH*OW, P_in = input pixels N*H*W, r_b = |rows_b|, c_b = input channels block
# b uses, U = union of the blocks' columns, ceil16(r) = r rounded up to 16:
#   dense   = O*K*P + 35*O*P + 75*C*P_in
#   conv    = sum_b [1.3*ceil16(r_b)*c_b*kh*kw*P + 90*c_b*P_in + 60*r_b*P + 1.1e7]
#   grouped = n_blocks * [1.3*ceil16(r_max)*c_max*kh*kw*P + 220*c_max*P_in + 110*r_max*P] + 3e6
#   gather  = 21*|U|*P + sum_b [(3.2*r_b + 73)*|cols_b|*P + 1e6] + 90*O*P + 75*C*P_in
# ceil16: oneDNN vectorizes 16 output channels at a time, so an 8-row block costs a 16-row one.
# conv: per block, gather x's channels, one conv call (fixed cost), scatter to rows_b. grouped: the
# same convs as one grouped conv in channels-last, blocks zero-padded to r_max x c_max (no cost per
# call and block, but pays for the padding). gather: im2col of U once, then per block a column copy
# and one GEMM (thin GEMMs are memory bound: 3.2 per MAC); its input transpose is charged like dense's
# input reorder (75*C*P_in), which matters for stride-2 layers (fitted on stride 1 only).
# The cheapest runs if it beats dense by SPARSE_MARGIN, chosen on the first call for each input
# shape and cached. On the fitting set the chosen strategies' total time is 1.04x the per-layer
# best, and no chosen layer is more than 6% slower than dense (the timings are +-20% noisy).
CPU_STRATEGIES = ("dense", "conv", "grouped", "gather")
SPARSE_MARGIN = 1.2  # a sparse strategy must be predicted this many times cheaper than dense


def cpu_strategy_costs(info, in_pixels, out_pixels):
    """Cost rule above: dict strategy -> dense-MAC equivalents, for a plan's info (make_plan),
    P_in = N*H*W and P = N*OH*OW."""
    O, C, kh, kw = info["weight_shape"]
    P, P_in, khkw = out_pixels, in_pixels, kh * kw
    rows, cols, chans = [r for r, _ in info["sizes"]], [c for _, c in info["sizes"]], info["chan_counts"]
    r_max, c_max = max(rows, default=0), max(chans, default=0)
    return {
        "dense": O * C * khkw * P + 35 * O * P + 75 * C * P_in,
        "conv": sum(1.3 * _ceil16(r) * c * khkw * P + 90 * c * P_in + 60 * r * P + 1.1e7
                    for r, c in zip(rows, chans)),
        "grouped": (len(rows) * (1.3 * _ceil16(r_max) * c_max * khkw * P + 220 * c_max * P_in + 110 * r_max * P)
                    + 3e6),
        "gather": (21 * info["union_size"] * P + sum((3.2 * r + 73) * c * P + 1e6 for r, c in zip(rows, cols))
                   + 90 * O * P + 75 * C * P_in),
    }


def _ceil16(n):
    """n rounded up to a multiple of 16."""
    return -(-n // 16) * 16


def choose_cpu_strategy(info, in_pixels, out_pixels):
    """The cheapest CPU strategy by cpu_strategy_costs; dense unless another is predicted at least
    SPARSE_MARGIN times cheaper (the rule is +-30% on single layers: never risk a slowdown)."""
    costs = cpu_strategy_costs(info, in_pixels, out_pixels)
    best = min(CPU_STRATEGIES, key=lambda s: costs[s])
    return best if costs[best] * SPARSE_MARGIN <= costs["dense"] else "dense"


def make_plan(weight, blocks, strategy=None):
    """Precompute everything a layer's forward needs, once: (info, tensors).

    weight (O, C, kh, kw); blocks as returned by check_blocks; strategy forces one of
    CPU_STRATEGIES (else it is chosen per input shape on first use and cached in info["choice"]).
    info: python values (shapes, per-block sizes). tensors, on weight's device: the packed block
    weights, rows, cols, the rows in no block, and what each strategy and the CUDA kernel need."""
    if strategy not in (None, *CPU_STRATEGIES):
        raise ValueError(f"unknown CPU strategy {strategy!r}, expected one of {CPU_STRATEGIES}")
    O, C, kh, kw = weight.shape
    w2 = weight.detach().reshape(O, -1).cpu()  # (O, K)
    empty = torch.zeros(0, dtype=torch.int64)
    rows_all = torch.cat([r for r, _ in blocks]) if blocks else empty
    used = torch.zeros(O, dtype=torch.bool)
    used[rows_all] = True
    info = {"weight_shape": (O, C, kh, kw), "flop_ratio": flop_ratio(weight.shape, blocks),
            "sizes": [(len(r), len(c)) for r, c in blocks], "forced": strategy, "choice": {}}
    t = {"packed": pack_blocks(w2, blocks), "rows": rows_all,
         "cols": torch.cat([c for _, c in blocks]) if blocks else empty,
         "empty_rows": torch.nonzero(~used).view(-1),
         "dense_weight": (w2 * block_mask(w2.shape, blocks)).view(weight.shape)}
    for part in (_conv_plan, _gather_plan, _cuda_plan):
        t.update(part(w2, blocks, info))
    return info, {k: v.to(weight.device, weight.dtype if v.is_floating_point() else None) for k, v in t.items()}


def _conv_plan(w2, blocks, info):
    """Per block: the input channels it uses and its conv weight (r_b, c_b, kh, kw) over them,
    zeros at unselected (ky, kx); the same as one grouped conv with every block zero-padded to
    (r_max, c_max), padding channels reading channel 0; per output channel, its position among
    the blocks' rows laid side by side (the number of block rows for rows in no block)."""
    _, _, kh, kw = info["weight_shape"]
    khkw, B = kh * kw, len(blocks)
    chans = [torch.unique(cols // khkw) for _, cols in blocks]
    info["chan_counts"] = [ch.numel() for ch in chans]
    r_max, c_max = max((r for r, _ in info["sizes"]), default=0), max(info["chan_counts"], default=0)
    conv_weights, group_weight = [], w2.new_zeros(B, r_max, c_max * khkw)
    group_chans = torch.zeros(B, c_max, dtype=torch.int64)
    for b, ((rows, cols), ch) in enumerate(zip(blocks, chans)):
        local = torch.searchsorted(ch, cols // khkw) * khkw + cols % khkw  # col -> (c_local, ky, kx)
        group_weight[b, :len(rows), local] = w2[rows][:, cols]
        conv_weights.append(group_weight[b, :len(rows), :ch.numel() * khkw].reshape(-1))
        group_chans[b, :ch.numel()] = ch
    group_rows = [b * r_max + torch.arange(r) for b, (r, _) in enumerate(info["sizes"])]  # real rows among padding
    empty = torch.zeros(0, dtype=torch.int64)
    rows_all = torch.cat([r for r, _ in blocks]) if blocks else empty
    position = torch.full((w2.shape[0],), len(rows_all), dtype=torch.int64)  # rows in no block: the zero column
    position[rows_all] = torch.arange(len(rows_all))
    return {"conv_chans": torch.cat(chans) if blocks else empty,
            "conv_weight": torch.cat(conv_weights) if blocks else w2.new_zeros(0),
            "group_weight": group_weight.view(B * r_max, c_max, kh, kw).contiguous(memory_format=torch.channels_last),
            "group_chans": group_chans.view(-1),
            "group_rows": torch.cat(group_rows) if blocks else empty,
            "conv_position": position}


def _gather_plan(w2, blocks, info):
    """im2col rows = the union U of the blocks' columns, ordered by kernel position j = ky*kw + kx,
    then channel; per block, where its columns sit in U."""
    _, C, kh, kw = info["weight_shape"]
    khkw = kh * kw
    cols_all = torch.cat([c for _, c in blocks]) if blocks else torch.zeros(0, dtype=torch.int64)
    union = torch.unique(cols_all)
    union = union[torch.argsort((union % khkw) * C + union // khkw)]
    pos_of_col = torch.full((C * khkw,), -1, dtype=torch.int64)
    pos_of_col[union] = torch.arange(union.numel())
    info["union_size"] = union.numel()
    info["pos_counts"] = torch.bincount(union % khkw, minlength=khkw).tolist()
    return {"union_chans": union // khkw, "block_union_idx": pos_of_col[cols_all]}


def _cuda_plan(w2, blocks, info):
    """The kernel's int32 tables: per block (row start, rows, col start, cols, weight offset); per
    CTA row tile (block, first row). Tiles of 16 rows when blocks are thin (mean <= 24), else 64."""
    info["tile_rows"] = 16 if blocks and statistics.mean(r for r, _ in info["sizes"]) <= 24 else 64
    meta, tiles, r0, c0, w0 = [], [], 0, 0, 0
    for b, (r, c) in enumerate(info["sizes"]):
        meta.append([r0, r, c0, c, w0])
        tiles += [[b, i] for i in range(0, r, info["tile_rows"])]
        r0, c0, w0 = r0 + r, c0 + c, w0 + r * c
    if w0 >= 2 ** 31:
        raise ValueError(f"{w0} packed block weights: too many for the kernel's int32 offsets")
    rows = torch.cat([r for r, _ in blocks]) if blocks else torch.zeros(0, dtype=torch.int64)
    cols = torch.cat([c for _, c in blocks]) if blocks else torch.zeros(0, dtype=torch.int64)
    return {"cuda_meta": torch.tensor(meta, dtype=torch.int32).view(-1, 5),
            "cuda_tiles": torch.tensor(tiles, dtype=torch.int32).view(-1, 2),
            "cuda_rows": rows.int(), "cuda_cols": cols.int()}


def _run_conv_nhwc(x, info, t, conv_args, out):
    """The "conv" strategy on a channels-last input (memory N, H, W, C): the per-block input is a
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


def _conv_blocks(info, t):
    """(rows, input channels, conv weight (r_b, c_b, kh, kw)) of each block, from the plan."""
    kernel = info["weight_shape"][2:]
    rows = t["rows"].split([r for r, _ in info["sizes"]])
    chans = t["conv_chans"].split(info["chan_counts"])
    weights = t["conv_weight"].split([r * c * kernel[0] * kernel[1]
                                      for (r, _), c in zip(info["sizes"], info["chan_counts"])])
    return [(r, c, w.view(len(r), len(c), *kernel)) for r, c, w in zip(rows, chans, weights)]


def _run_conv(x, info, t, conv_args, out):
    """One dense conv per block over the input channels it uses, written into its rows of out."""
    for rows_b, chans_b, w_b in _conv_blocks(info, t):
        out.index_copy_(1, rows_b, F.conv2d(x.index_select(1, chans_b), w_b, None, *conv_args))  # (N, r_b, OH, OW)
    return out


def _run_grouped(x, info, t, conv_args, out):
    """All per-block convs as one grouped conv (channels-last, blocks padded), scattered to rows."""
    n_groups = len(info["sizes"])
    x_groups = select_channels(x, t["group_chans"])  # (N, B*c_max, H, W)
    x_groups = x_groups.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x_groups, t["group_weight"], None, *conv_args, n_groups)  # (N, B*r_max, OH, OW)
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
    rows = t["rows"].split([r for r, _ in info["sizes"]])
    idx = t["block_union_idx"].split([c for _, c in info["sizes"]])
    weights = t["packed"].split([r * c for r, c in info["sizes"]])
    for rows_b, idx_b, w_b in zip(rows, idx, weights):
        y2.index_copy_(0, rows_b, w_b.view(len(rows_b), len(idx_b)) @ x_cols.index_select(0, idx_b))
    y = y2.view(O, N, OH, OW).transpose(0, 1)  # (N, O, OH, OW), channel-major in memory
    return out.copy_(y) if out is not None else y.contiguous(memory_format=memory_format_of(x))


def run_plan(x, info, t, stride, padding, dilation=1, out=None, strategy=None):
    """Run a plan (make_plan) on the CPU, or its gather-GEMM on any device. x (N, C, H, W) ->
    (N, O, OH, OW), written into out if given (rows in no block come out 0). The strategy is
    strategy, else the plan's forced one, else the choice for x's shape (made on first use, cached):
    the cost rule's pick, timed against dense (and any sparse strategy predicted within
    AUTOTUNE_SPREAD of the pick) on this input when CPU_AUTOTUNE is set."""
    conv_args = (_pair(stride), _pair(padding), _pair(dilation))
    strategy = strategy or info["forced"]
    if strategy is None:
        key = choice_key(x)
        if key not in info["choice"]:
            N, (OH, OW) = x.shape[0], conv_out_hw(x.shape[2:], info["weight_shape"][2:], *conv_args)
            pixels = (N * x.shape[2] * x.shape[3], N * OH * OW)
            costs, pick = cpu_strategy_costs(info, *pixels), choose_cpu_strategy(info, *pixels)
            if pick != "dense" and CPU_AUTOTUNE and not x.is_cuda:
                close = [s for s in CPU_STRATEGIES[1:] if costs[s] <= AUTOTUNE_SPREAD * costs[pick]]
                pick = _faster(x, info, t, conv_args, ("dense", *close))
            info["choice"][key] = pick
        strategy = info["choice"][key]
    return _run_strategy(x, info, t, conv_args, strategy, out)


def choice_key(x):
    """What a layer's strategy choice depends on besides the layer: input shape and memory format."""
    return tuple(x.shape), str(memory_format_of(x))


CPU_AUTOTUNE = True    # time the cost rule's sparse pick against dense once per input shape and format
AUTOTUNE_RUNS = 3      # timed runs per candidate (median), after one warm-up run each
AUTOTUNE_SPREAD = 1.5  # other sparse strategies predicted within this factor of the pick are timed too


def _faster(x, info, t, conv_args, candidates):
    """The candidate strategy with the lowest median time on x (like cudnn.benchmark): the cost rule
    is +-30% on single layers, a measurement on the real input is not. Every strategy is exact."""
    times = {s: [] for s in candidates}
    with torch.no_grad():
        for s in candidates:
            _run_strategy(x, info, t, conv_args, s, None)
        for _ in range(AUTOTUNE_RUNS):
            for s in candidates:
                t0 = time.perf_counter()
                _run_strategy(x, info, t, conv_args, s, None)
                times[s].append(time.perf_counter() - t0)
    return min(candidates, key=lambda s: statistics.median(times[s]))


def _run_strategy(x, info, t, conv_args, strategy, out):
    """One CPU strategy on x, into out if given, else into a new tensor in x's memory format."""
    N, O = x.shape[0], info["weight_shape"][0]
    OH, OW = conv_out_hw(x.shape[2:], info["weight_shape"][2:], *conv_args)
    if strategy == "gather":
        return _run_gather(x, info, t, conv_args, out)
    if strategy == "dense":
        y = F.conv2d(x, t["dense_weight"], None, *conv_args)
        return out.copy_(y) if out is not None else y
    if strategy == "conv" and info["sizes"] and memory_format_of(x) == torch.channels_last:
        return _run_conv_nhwc(x, info, t, conv_args, out)
    out = out if out is not None else torch.empty(N, O, OH, OW, dtype=x.dtype, device=x.device,
                                                      memory_format=memory_format_of(x))
    out.index_fill_(1, t["empty_rows"], 0.0)
    if not info["sizes"]:
        return out
    return (_run_conv if strategy == "conv" else _run_grouped)(x, info, t, conv_args, out)


def grouped_conv2d_cpu(x, weight, blocks, stride, padding, dilation=1, out=None, strategy=None):
    """Exact CPU grouped conv. x (N, C, H, W), weight (O, C, kh, kw) (values outside the blocks are
    ignored) -> (N, O, OH, OW), written into out if given. strategy: None picks the cheapest of
    CPU_STRATEGIES by the cost rule (cpu_strategy_costs); a name forces it (tests, benches)."""
    info, t = make_plan(weight, check_blocks(tuple(weight.shape), blocks), strategy)
    return run_plan(x, info, t, stride, padding, dilation, out)


# ---- CUDA path: all blocks of a layer in one launch, WMMA tensor cores, implicit im2col ----
# Each CTA (128 threads, 4 warps) computes a (BM rows of one block) x (BN output pixels) tile:
# it loops over the block's columns BK at a time, staging the packed weights (BM, BK) and the
# im2col values (BK, BN), gathered straight from the NCHW input with zeros outside the image, in
# shared memory (ragged edges zero-padded), multiplies with WMMA (fp32 inputs: TF32 m16n16k8;
# half/bf16: m16n16k16; fp32 accumulate), and scatters rows to output channels rows_b.
# BM x BN = 16 x 128 for thin blocks (mean rows <= 24), else 64 x 64. Needs sm_80+.

CUDA_SRC = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
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
  grouped_conv2d_kernel<T, BM, BN><<<dim3((unsigned)grid_x, (unsigned)num_tiles), THREADS, 0, stream>>>(
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
            _warn_once("CUDA is not available: grouped GEMM runs the CPU / torch path")
            return None
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            _warn_once(f"grouped-GEMM kernel needs sm_80+ (have sm_{major}{minor}): using the torch gather-GEMM")
            return None
        try:
            from torch.utils.cpp_extension import load_inline
            _EXT["module"] = load_inline(
                name=f"lth_ref_grouped_gemm_sm{major}{minor}", cpp_sources=[CPP_SRC], cuda_sources=[CUDA_SRC],
                functions=["grouped_conv2d_cuda"], with_cuda=True,
                extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
        except Exception as e:  # noqa: BLE001 -- any build failure means: fall back, loudly
            first = (str(e).strip().splitlines() or [""])[0][:200]
            _warn_once(f"building the grouped-GEMM CUDA kernel failed ({type(e).__name__}: {first}): "
                       "using the torch gather-GEMM")
    return _EXT["module"]


def cuda_available_kernel():
    """True when the grouped-GEMM CUDA kernel is built and usable (builds it on first call)."""
    return _load_extension() is not None


def _run_cuda(x, info, t, stride, padding, dilation):
    """All blocks of a layer in one kernel launch; the torch gather-GEMM if the kernel is missing."""
    ext = _load_extension()
    conv = (*_pair(stride), *_pair(padding), *_pair(dilation))
    if ext is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return run_plan(x, info, t, stride, padding, dilation, strategy="gather")
    y = ext.grouped_conv2d_cuda(x.contiguous(), t["packed"].to(x.dtype), t["cuda_meta"], t["cuda_tiles"],
                                t["cuda_rows"], t["cuda_cols"], t["empty_rows"], list(info["weight_shape"]),
                                list(conv), info["tile_rows"])
    return y.contiguous(memory_format=memory_format_of(x))  # the kernel reads and writes NCHW


# ---- dispatch and modules ----

class RegroupedConv2d(nn.Module):
    """Inference conv that runs only its dense blocks (grouped GEMM); output = the block-masked conv.

    Holds the packed block weights, index buffers, bias and the precomputed plan (make_plan):
    state_dict keeps packed weights + indices; plan tensors are non-persistent buffers, so .to()
    moves them and .half() casts them. x (N, C, H, W) -> (N, O, OH, OW)."""

    def __init__(self, weight, blocks, bias=None, stride=1, padding=0, dilation=1, name="conv", strategy=None):
        super().__init__()
        blocks = check_blocks(tuple(weight.shape), blocks, name)
        self.name, self.weight_shape = name, tuple(weight.shape)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.info, tensors = make_plan(weight, blocks, strategy)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("block_sizes", torch.tensor(self.info["sizes"], dtype=torch.int64).view(-1, 2))
        for key, value in tensors.items():  # state_dict: the blocks (packed, rows, cols, block_sizes), bias
            self.register_buffer("plan_" + key, value, persistent=key in ("packed", "rows", "cols"))
        self._plan_keys = list(tensors)

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
        return (f"{self.name}: weight={self.weight_shape}, blocks={len(self.info['sizes'])}, "
                f"flop_ratio={self.info['flop_ratio']:.3f}, "
                f"stride={self.stride}, padding={self.padding}, cpu_strategy={self.info['forced'] or 'auto'}")

    def forward(self, x):
        t = {k: self._buffers["plan_" + k] for k in self._plan_keys}  # (getattr is 7x slower per call)
        if x.is_cuda:
            y = _run_cuda(x, self.info, t, self.stride, self.padding, self.dilation)
        else:
            y = run_plan(x, self.info, t, self.stride, self.padding, self.dilation)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def grouped_conv2d(x, weight_or_packed, blocks=None, stride=1, padding=0, dilation=1):
    """Grouped conv, dispatched: the CUDA kernel on CUDA tensors, the CPU path otherwise.

    weight_or_packed: the (O, C, kh, kw) weight (values outside the blocks are ignored; packs and
    plans on every call) or a RegroupedConv2d (packed once; blocks/stride/padding come from it).
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

def _time_pair_ms(fn_a, fn_b, device, repeats, warmup=2):
    """Median ms of fn_a() and fn_b(), runs interleaved (fair on a shared machine): CUDA events on
    GPU, time.perf_counter on CPU."""
    for _ in range(warmup):
        fn_a(), fn_b()
    times = ([], [])
    for _ in range(repeats):
        for fn, ts in zip((fn_a, fn_b), times):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def _rel_err(y, ref, centered=False):
    """max |y - ref| / max |ref|; centered: / max |ref - batch mean of ref| (logits of an untrained
    model are mostly the classifier bias, which would hide errors in the features)."""
    y, ref = y.double(), ref.double()
    scale = (ref - ref.mean(0, keepdim=True)) if centered else ref
    return ((y - ref).abs().max() / scale.abs().max().clamp_min(1e-30)).item()


def _path_name(layer, x):
    """Which code a RegroupedConv2d ran on input x (after one forward)."""
    if x.is_cuda:
        return "cuda-kernel" if cuda_available_kernel() else "torch-gather"
    return layer.info["forced"] or layer.info["choice"][choice_key(x)]


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
    timing. Returns one dict per conv."""
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
            err = _rel_err(layer(x), dense())
            dense_ms, regrouped_ms = _time_pair_ms(dense, lambda: layer(x), device, repeats)
        ratio = layer.info["flop_ratio"]
        row = {"name": key, "shape": layer.weight_shape, "input_hw": tuple(shape[2:]),
               "blocks": len(layer.info["sizes"]), "flop_ratio": ratio,
               "ideal_speedup": 1 / ratio if ratio else float("inf"),
               "dense_ms": dense_ms, "regrouped_ms": regrouped_ms, "speedup": dense_ms / regrouped_ms,
               "max_rel_err": err, "path": _path_name(layer, x)}
        results.append(row)
        if log:
            log(row)
    return results


def bench_model(model, blocks, batch_size=64, device="cpu", repeats=10, input_size=(3, 32, 32), log=None,
                memory_format=torch.contiguous_format):
    """End to end (eval, no_grad): the masked dense model vs regrouped_model, same input, precision
    and memory_format (both models and the input converted to it); outputs checked first
    (max_rel_err against the batch spread of the dense logits). conv_flop_ratio counts every conv's
    MACs, the unpruned stem's too. Returns one dict."""
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
        err = _rel_err(regrouped(x), dense(x), centered=True)
        dense_ms, regrouped_ms = _time_pair_ms(lambda: dense(x), lambda: regrouped(x), device, repeats)
    result = {"batch_size": batch_size, "device": str(device),
              "memory_format": {v: k for k, v in MEMORY_FORMATS.items()}[memory_format], "dense_ms": dense_ms,
              "regrouped_ms": regrouped_ms, "speedup": dense_ms / regrouped_ms, "max_rel_err": err,
              "conv_flop_ratio": macs_regrouped / macs_dense,
              "ideal_conv_speedup": macs_dense / max(macs_regrouped, 1e-30)}
    if log:
        log(result)
    return result
