"""lth_ref: structurally sparse lottery tickets, a small reference implementation.

T. Chen, X. Chen, X. Ma, Y. Wang, Z. Wang, "Coarsening the Granularity: Towards Structurally Sparse
Lottery Tickets", ICML 2022, arXiv:2202.04736. Official code: github.com/VITA-Group/Structure-LTH.

Iterative magnitude pruning (IMP) with weight rewinding finds sparse "winning tickets"; after every
pruning round the mask is post-processed into a structure that runs fast: `refill` keeps whole output
channels (channel-wise tickets), `regroup` turns groups of rows into dense blocks (group-wise tickets,
run by the grouped GEMM in kernels.py).

    python lth_ref.py --arch resnet20 --method regroup            # find a ticket on CIFAR-10
    python -m pytest -q test_lth_ref.py                           # the tests

Files: lth_ref.py (this: masks, IMP, refill, regroup, training, pipeline, CLI), models.py (MODELS),
data.py (CIFAR + synthetic, on-device batches), kernels.py (grouped GEMM), test_lth_ref.py.
"""
import argparse
import csv
import dataclasses
import json
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as datasets      # data.py (local variables are called `data`)
import kernels
import models as model_zoo   # models.py

# ---- hyperparameters (the paper's, Table 1 and Sec. 3.1) ----
PAPER = dict(
    epochs=160,           # epochs per IMP level
    lr=0.1,               # SGD learning rate
    momentum=0.9,         # SGD momentum
    weight_decay=1e-4,    # L2 on every parameter
    batch_size=128,       # examples per step
    lr_drops=(0.5, 0.75), # LR x0.1 at these fractions of training (epochs 80 and 120 of 160)
    prune_rate=0.2,       # fraction of the *remaining* prunable weights removed per level
    levels=10,            # pruning levels after the dense level 0
    rewind_fraction=0.05, # rewind point: end of epoch 8 of 160 (5% of training)
)
WEIGHT_DECAY_BY_ARCH = {"vgg16": 2e-4}  # the paper uses 2e-4 for VGG-16 (CIFAR-10)


class UsageError(Exception):
    """A user-facing error: the CLI prints it (with its hint) and exits with code 2, no traceback."""


# ---- masks ----
def prunable_weights(model):
    """Every Conv2d weight except the stem (the first conv): {parameter name: Parameter}."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return {f"{name}.weight": m.weight for name, m in convs[1:]}


def ones_masks(weights):
    """The dense mask: {name: ones like the weight} (float 0/1, on the weight's device)."""
    return {name: torch.ones_like(w, dtype=torch.float32) for name, w in weights.items()}


@torch.no_grad()
def apply_masks(model, masks):
    """Zero the pruned weights in place: weight *= mask for every masked parameter."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def density(masks):
    """Kept fraction over all masked (prunable) weights."""
    kept = sum(int(m.sum()) for m in masks.values())
    return kept / max(1, sum(m.numel() for m in masks.values()))


def check_masks_fit(model, masks, what="mask"):
    """Raise UsageError unless `masks` names exactly the prunable weights of `model`, shape for shape."""
    weights = prunable_weights(model)
    missing, extra = sorted(set(weights) - set(masks)), sorted(set(masks) - set(weights))
    bad = [n for n in set(weights) & set(masks) if tuple(masks[n].shape) != tuple(weights[n].shape)]
    if missing or extra or bad:
        raise UsageError(
            f"the {what} does not fit the model (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {sorted(bad)[:3]}); was it made for another --arch or --dataset?")


# ---- IMP: global magnitude pruning and rewinding ----
def magnitude_prune(weights, masks, rate):
    """Remove `rate` of the remaining weights, smallest |w| first, ranked across all layers together.

    Paper: Sec. 3.1, IMP step (global magnitude pruning, 20% of the remaining weights per round).
    Official: `pruning_model` (torch.nn.utils.prune.global_unstructured, L1); same rule.
    weights, masks: {name: (O, C, kh, kw)}. Returns new masks; exactly round(rate * remaining) weights
    are removed, ties broken by position (stable sort), so the result is deterministic.
    """
    names = list(masks)
    scores = torch.cat([
        torch.where(masks[n].bool(), weights[n].detach().abs().float(), torch.inf).flatten().cpu()
        for n in names])
    remaining = int(sum(int(masks[n].sum()) for n in names))
    n_prune = int(round(rate * remaining))
    keep = torch.ones_like(scores)
    keep[torch.argsort(scores, stable=True)[:n_prune]] = 0.0
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = masks[n] * keep[start:start + size].view_as(masks[n]).to(masks[n].device)
        start += size
    return out


def rewind(model, state, masks):
    """Load the rewind state (weights, BN affine and running stats, FC) and zero the pruned weights.

    Paper: Sec. 3.1, weight rewinding to epoch k (Frankle et al. 2020). Official: loads the epoch-k
    checkpoint the same way.
    """
    model.load_state_dict(state)
    apply_masks(model, masks)


# ---- refill (channel-wise tickets) ----
CHANNEL_SCORES = {
    # score of each output channel, from (O, K) views of the trained weight and the pruned mask, or
    # (FEATURE_SCORES) from the layer's output on a training batch, feats = conv_channel_stats()[layer]
    "l1": lambda weight2d, mask2d, feats: (weight2d * mask2d).abs().sum(1),  # paper's main criterion (A2)
    "remain": lambda weight2d, mask2d, feats: mask2d.sum(1),                 # official default
    "fmap_l1": lambda weight2d, mask2d, feats: feats["fmap_l1"],             # official `l1`
    "fmap_l2": lambda weight2d, mask2d, feats: feats["fmap_l2"],             # official `l2`
    "saliency": lambda weight2d, mask2d, feats: feats["saliency"],           # official `saliency`
}
FEATURE_SCORES = ("fmap_l1", "fmap_l2", "saliency")


def needs_feats(method, score):
    """True when post-processing with --method/--refill-score needs conv_channel_stats."""
    return method in ("refill", "refill+") and score in FEATURE_SCORES


def conv_channel_stats(model, names, images, labels):
    """Per output channel of each conv weight in `names`, from one batch through the model in eval
    mode: fmap_l1 = sum |y|, fmap_l2 = sum y^2, saliency = sum |y * dL/dy| (L = mean cross-entropy),
    sums over (batch, H, W) of the conv's output y. {name: {stat: (O,) float CPU tensor}}.

    Paper: Sec. 3.2 / ablation A2 (feature-map and saliency criteria for refill). Official:
    `prune_model_custom_fillback` criteria l1/l2/saliency on one training batch; it reshapes the
    (N, O, H, W) map with .view(O, -1), which mixes images and channels unless N = 1; we sum each
    channel. The model's weights and train/eval mode are left as they were."""
    modules = {n[:-len(".weight")]: n for n in names}
    outputs, hooks = {}, []
    for module_name, module in model.named_modules():
        if module_name in modules and isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, i, y, key=modules[module_name]: outputs.__setitem__(key, y)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(images), labels)
            missing = sorted(set(names) - set(outputs))
            if missing:
                raise ValueError(f"no conv output seen for {missing[:3]}: names must be conv weights of the model")
            grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: {"fmap_l1": outputs[n].detach().abs().sum((0, 2, 3)).cpu(),
                "fmap_l2": outputs[n].detach().pow(2).sum((0, 2, 3)).cpu(),
                "saliency": (outputs[n].detach() * g).abs().sum((0, 2, 3)).cpu()}
            for n, g in zip(names, grads)}


def top_k(scores, k):
    """Boolean mask of the k largest scores; ties go to the lower index (deterministic)."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.to(scores.device)


def refill_mask(weight, mask, extra=0.0, score="l1", feats=None):
    """One layer's refill: keep the n best output channels whole, prune every other channel whole.

    Paper: Sec. 3.2 / Alg. 2 (refill), n = nnz / K channels; refill+ keeps n + extra * (O - n).
    Official: `prune_model_custom_fillback` (fillback_rate = extra, criterion `remain` by default).
    weight, mask: (O, C, kh, kw); feats: this layer's conv_channel_stats (FEATURE_SCORES only).
    Returns a mask whose rows (output channels) are all 1 or all 0; channels that come back whole
    take their rewind values when the level rewinds.
    """
    if score in FEATURE_SCORES and feats is None:
        raise ValueError(f"refill score {score!r} scores the layer's output: pass feats from conv_channel_stats")
    out_channels = mask.shape[0]
    mask2d, weight2d = mask.reshape(out_channels, -1), weight.detach().reshape(out_channels, -1)
    n = max(1, int(round(float(mask2d.sum()) / mask2d.shape[1])))
    n = min(out_channels, n + int(round(extra * (out_channels - n))))
    keep = top_k(CHANNEL_SCORES[score](weight2d.float(), mask2d, feats), n)
    return keep[:, None].expand_as(mask2d).to(mask.dtype).reshape(mask.shape).clone()


def refill(weights, masks, extra=0.0, score="l1", feats=None):
    """Refill every layer (refill+ when extra > 0): {name: mask} -> {name: channel-wise mask}.
    feats: conv_channel_stats for FEATURE_SCORES, else None."""
    return {n: refill_mask(weights[n], m, extra, score, None if feats is None else feats[n])
            for n, m in masks.items()}


# ---- regroup (group-wise tickets): hypergraph, greedy partition, dense blocks ----
def row_similarity(units):
    """Tanimoto similarity of the rows: a.b / (|a|^2 + |b|^2 - a.b); Jaccard for 0/1 rows.

    Paper: Sec. 3.2, rows that share nonzero columns (nets of the hypergraph) belong together.
    units: (n, U) float array of per-row counts (the mask, or its counts per input channel).
    """
    units = units.astype(np.float32)
    gram = units @ units.T                                    # (n, n) shared nonzeros
    sq = np.diag(gram)
    return gram / np.maximum(sq[:, None] + sq[None, :] - gram, 1e-12)


def partition_rows(sim, group_size):
    """Greedy hypergraph partition of n rows into groups of `group_size` (the last may be smaller).

    Paper: Alg. 3, "partition the rows into t1 groups" (hMETIS in the official code, 8 parts).
    Ours: seed a group with the unassigned row of most nonzeros, then add, one at a time, the
    unassigned row most similar to the group so far (sum of similarities); deterministic.
    sim: (n, n). Returns a list of sorted index arrays into 0..n-1.
    """
    n = sim.shape[0]
    free = np.ones(n, dtype=bool)
    weight = sim.sum(1)
    groups = []
    while free.any():
        seed = int(np.argmax(np.where(free, weight, -np.inf)))
        members, score = [seed], sim[seed].copy()
        free[seed] = False
        while len(members) < group_size and free.any():
            r = int(np.argmax(np.where(free, score, -np.inf)))
            members.append(r)
            free[r] = False
            score += sim[r]
        groups.append(np.sort(members))
    return groups


def refine_partition(sim, groups, max_rounds=10):
    """Swap rows between groups while a swap raises the total within-group similarity.

    Paper: the refinement phase of a multilevel hypergraph partitioner (hMETIS's FM passes), in the
    simplest balanced form: a swap keeps every group's size, so the kernel's row rule still holds.
    Gain of swapping r (in A) with s (in B): S(r,B) - S(r,A\\r) + S(s,A) - S(s,B\\s) - 2 sim(r,s).
    A round applies the best positive swaps whose group pairs are disjoint (their gains do not
    interact), so a round makes up to t/2 swaps. sim: (n, n); groups: index arrays.
    """
    n, t = sim.shape[0], len(groups)
    if t < 2:
        return groups
    label = np.empty(n, dtype=np.int64)
    for g, rows in enumerate(groups):
        label[rows] = g
    to_group = sim @ np.eye(t, dtype=sim.dtype)[label]      # (n, t) similarity to each group
    self_sim = np.diag(sim).copy()
    for _ in range(max_rounds):
        own = to_group[np.arange(n), label] - self_sim      # (n,) similarity to own group, minus self
        move = to_group[:, label] - own[:, None]            # (n, n) gain of r joining s's group
        gain = move + move.T - 2 * sim
        gain[label[:, None] == label[None, :]] = -np.inf
        flat = gain.ravel()
        top = min(flat.size - 1, 4 * t * t)
        best = np.argpartition(-flat, top)[:top]
        best = best[np.lexsort((best, -flat[best]))]        # by gain, then position: deterministic
        busy, swaps = np.zeros(t, dtype=bool), []
        for r, s in zip(*np.unravel_index(best, gain.shape)):
            a, b = label[r], label[s]
            if gain[r, s] <= 1e-6:
                break
            if not (busy[a] or busy[b]):
                busy[a] = busy[b] = True
                swaps.append((r, s, a, b))
        if not swaps:
            break
        for r, s, a, b in swaps:
            to_group[:, a] += sim[:, s] - sim[:, r]
            to_group[:, b] += sim[:, r] - sim[:, s]
            label[r], label[s] = b, a
    return [np.flatnonzero(label == g) for g in range(t)]


def choose_block_columns(units, groups, unit_cost, area, min_col_nnz, min_block_units):
    """Pick each group's dense columns under one area budget; keep groups wide enough to be blocks.

    Paper: Alg. 3, "select the columns with >= t2 nonzeros in the group; a group with >= b2 such columns
    becomes a dense block". Ours sets the threshold by density: every (group, column) pair is ranked by
    the fraction of the group's rows that use the column (nonzeros gained per refilled element), and the
    best pairs are taken until the blocks' total area reaches `area` (the layer's IMP nonzeros), so the
    regrouped density stays that of IMP. Official: grows a prefix of columns per group until every row's
    uncovered nonzeros fall under prefix/1.5 (`official_width_blocks`); as published (its loop reads
    column i, not the i-th sorted one) that took 1.6x the IMP nonzeros on VGG-16 at 80% sparsity.
    units: (n, U) counts; unit_cost: mask elements per unit and row. Returns [(group rows, unit idx)].
    """
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    counts = np.stack([units[g].sum(0) for g in groups])     # (t, U) nonzeros per group and column
    frac = counts / (sizes[:, None] * unit_cost)
    frac[counts < min_col_nnz] = -1.0                          # never worth a block (paper's t2)
    order = np.argsort(-frac, axis=None, kind="stable")
    cost = np.repeat(sizes, counts.shape[1])[order] * unit_cost
    take = order[(np.cumsum(cost) <= area) & (frac.flat[order] > 0)]
    chosen = np.zeros(counts.shape, dtype=bool)
    chosen.flat[take] = True
    return [(g, np.flatnonzero(chosen[i])) for i, g in enumerate(groups)
            if chosen[i].sum() >= min_block_units]


def regroup_mask(mask2d, groups=8, row_multiple=8, min_col_nnz=1, min_block_cols=8, unit=1,
                 area=None, refine_rounds=10):
    """One layer's regroup: partition rows, turn each group into a dense block, prune the rest.

    Paper: Alg. 3 (t1 = groups, t2 = min_col_nnz, b1 = row_multiple, b2 = min_block_cols), repeated
    on the rows left without a block while new blocks are found. Official: `regroup` in
    Structure-LTH calls hMETIS once (8 parts) and keeps parts of more than 16 rows, which keeps no
    block on layers of 64 rows or fewer; ours sizes groups from the layer (below) and always returns
    a block-structured mask.
    Rules: a group has g = max(row_multiple, ceil(rows / groups) rounded up to row_multiple) rows (a
    pass's last group may be smaller); `unit` = columns per selection unit (1: single (c, ky, kx)
    positions as in the paper; kh*kw: whole input channels, faster on CPU); the blocks' total area
    is at most `area` (default: the layer's nonzeros) unless one minimal block is larger.
    mask2d: (O, K) 0/1. Returns (new mask2d, blocks) with blocks = [(rows, cols)] int64, rows
    disjoint, and new mask2d exactly the union of the blocks' rectangles.
    """
    out_rows, k = mask2d.shape
    m = mask2d.detach().cpu().numpy().astype(np.float32)
    units = m.reshape(out_rows, k // unit, unit).sum(2)         # (O, U) nonzeros per unit
    budget = float(m.sum()) if area is None else float(area)
    nonempty = np.flatnonzero(units.sum(1) > 0)               # vertices of the hypergraph
    sim_all = row_similarity(units[nonempty])                 # (n, n), computed once
    rows_left = nonempty
    blocks = []
    while len(rows_left) > 0:
        per_group = -(-len(rows_left) // groups)                 # ceil(rows / groups)
        size = min(len(rows_left), max(row_multiple, -(-per_group // row_multiple) * row_multiple))
        at = np.searchsorted(nonempty, rows_left)
        sim = sim_all[np.ix_(at, at)]
        parts = partition_rows(sim, size)
        parts = refine_partition(sim, parts, refine_rounds)
        min_units = max(1, min(-(-min_block_cols // unit), int(budget // (size * unit))))
        found = choose_block_columns(units[rows_left], parts, unit, max(budget, size * unit),
                                     min_col_nnz, min_units)
        if not found:
            break
        for rows, cols in found:
            blocks.append((rows_left[rows], (cols[:, None] * unit + np.arange(unit)).ravel()))
            budget -= len(rows) * len(cols) * unit
        used = np.concatenate([rows_left[rows] for rows, _ in found])
        rows_left = np.setdiff1d(rows_left, used)
        if budget < row_multiple * unit:
            break
    blocks = [(torch.from_numpy(np.sort(r)).long(), torch.from_numpy(np.sort(c)).long())
              for r, c in sorted(blocks, key=lambda b: int(b[0].min()))]
    return blocks_to_mask(blocks, out_rows, k).to(mask2d), blocks


def blocks_to_mask(blocks, out_rows, k):
    """The union of the blocks' rows x cols rectangles as a (out_rows, k) 0/1 float mask."""
    mask2d = np.zeros((out_rows, k), dtype=np.float32)
    for rows, cols in blocks:
        mask2d[np.ix_(np.asarray(rows), np.asarray(cols))] = 1.0
    return torch.from_numpy(mask2d)


REGROUP_UNITS = {"position": lambda shape: 1, "channel": lambda shape: shape[2] * shape[3]}


def regroup(masks, unit="position", **knobs):
    """Regroup every layer: {name: mask} -> ({name: block mask}, {name: blocks}); knobs as regroup_mask."""
    new_masks, blocks = {}, {}
    for name, mask in masks.items():
        mask2d, blocks[name] = regroup_mask(mask.reshape(mask.shape[0], -1),
                                            unit=REGROUP_UNITS[unit](mask.shape), **knobs)
        new_masks[name] = mask2d.reshape(mask.shape)
    return new_masks, blocks


def layer_stats(before, after, blocks=None):
    """Per-layer quality of a post-processed mask (SPEC section 3), as a dict of plain numbers.

    coverage = kept original nonzeros / original nonzeros; flop_ratio = sum |rows|*|cols| / (O*K)
    (equals the new density: rows are disjoint); channel_density = fraction of non-empty output rows.
    """
    out_rows = before.shape[0]
    b2, a2 = before.reshape(out_rows, -1), after.reshape(out_rows, -1)
    nnz = float(b2.sum())
    stats = dict(shape="x".join(map(str, before.shape)), density_before=nnz / b2.numel(),
                 density=float(a2.sum()) / a2.numel(),
                 coverage=float((b2 * a2).sum()) / nnz if nnz else 1.0,
                 channel_density=float((a2.sum(1) > 0).float().mean()))
    if blocks is not None:
        stats.update(blocks=len(blocks),
                     flop_ratio=sum(len(r) * len(c) for r, c in blocks) / a2.numel(),
                     block_sizes=" ".join(f"{len(r)}x{len(c)}" for r, c in blocks))
    return stats


def channel_blocks(mask):
    """A channel-wise (refilled) mask as blocks: one block of the kept rows x every column."""
    mask2d = mask.reshape(mask.shape[0], -1)
    rows = torch.nonzero(mask2d.sum(1) > 0).flatten().cpu()
    if not torch.equal(mask2d[rows].cpu(), torch.ones(len(rows), mask2d.shape[1])) or \
            mask2d.sum() != len(rows) * mask2d.shape[1]:
        raise UsageError("this mask is not channel-wise or block-structured: an unstructured (imp) "
                         "ticket has no blocks; benchmark a refill or regroup ticket")
    return [(rows, torch.arange(mask2d.shape[1]))] if len(rows) else []


# ---- the post-processing table: what each --method does after a pruning round ----
POSTPROCESS = {  # (trained weights, pruned masks, config, conv_channel_stats or None) -> (masks, blocks)
    "imp": lambda weights, masks, cfg, feats: (masks, None),
    "refill": lambda weights, masks, cfg, feats: (refill(weights, masks, 0.0, cfg.refill_score, feats), None),
    "refill+": lambda weights, masks, cfg, feats: (
        refill(weights, masks, cfg.refill_extra, cfg.refill_score, feats), None),
    "regroup": lambda weights, masks, cfg, feats: regroup(
        masks, unit=cfg.regroup_unit, groups=cfg.groups, row_multiple=cfg.row_multiple,
        min_col_nnz=cfg.min_col_nnz, min_block_cols=cfg.min_block_cols),
}


# ---- training and evaluation ----
def lr_at(epoch, cfg):
    """Step schedule: cfg.lr, x0.1 at each fraction in PAPER['lr_drops'] of cfg.epochs."""
    drops = sum(epoch >= round(f * cfg.epochs) for f in PAPER["lr_drops"])
    return cfg.lr * 0.1 ** drops


def epoch_generator(cfg, level, epoch, device):
    """The only source of data randomness: seeded by (seed, level, epoch), so resume is exact."""
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed * 1_000_003 + level * 10_007 + epoch)
    return g


def train_epoch(model, data, optimizer, masks, batch_size, generator):
    """One epoch of SGD; pruned weights are zeroed after every step (they stay exactly 0).

    Returns (mean train loss, train accuracy); sums stay on the device (one sync per epoch).
    """
    model.train()
    params = dict(model.named_parameters())
    pairs = [(params[n], m) for n, m in masks.items()]
    loss_sum = torch.zeros((), device=data.train_x.device)
    correct = torch.zeros((), device=data.train_x.device, dtype=torch.long)
    seen = 0
    for x, y in datasets.train_batches(data, batch_size, generator):
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
        seen += len(y)
    return loss_sum.item() / seen, correct.item() / seen


@torch.no_grad()
def evaluate(model, data, batch_size=500):
    """Test accuracy (fraction correct) of the model in eval mode."""
    model.eval()
    correct = torch.zeros((), device=data.test_x.device, dtype=torch.long)
    for x, y in datasets.test_batches(data, batch_size):
        correct += (model(x).argmax(1) == y).sum()
    return correct.item() / len(data.test_y)


# ---- files: atomic writes, config, tickets ----
def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text, path):
    """Write text to a temporary file, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_file(path, what):
    """torch.load a file we wrote; a missing or corrupt one is a UsageError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, wrong format, pickling errors: all mean "corrupt"
        raise UsageError(f"cannot read the {what} {path} ({type(e).__name__}: {e}); delete it to "
                         f"recompute that step, or point --out-dir elsewhere") from None


@dataclasses.dataclass
class Config:
    """Everything that determines a run; saved as config.json in the out-dir."""
    arch: str = "resnet20"
    method: str = "imp"
    dataset: str = "cifar10"
    data_dir: str = "data"
    out_dir: str = "runs/resnet20_imp"
    levels: int = PAPER["levels"]
    epochs: int = PAPER["epochs"]
    rewind_epoch: int = 8
    prune_rate: float = PAPER["prune_rate"]
    lr: float = PAPER["lr"]
    momentum: float = PAPER["momentum"]
    weight_decay: float = PAPER["weight_decay"]
    batch_size: int = PAPER["batch_size"]
    train_subset: int | None = None
    seed: int = 0
    device: str = "auto"
    refill_score: str = "l1"
    refill_extra: float = 0.1
    regroup_unit: str = "position"
    groups: int = 8
    row_multiple: int = 8
    min_col_nnz: int = 1
    min_block_cols: int = 8
    verbose: bool = False


RUN_ONLY = ("levels", "device", "out_dir", "data_dir", "verbose")  # may change between runs of one out-dir


def check_config(cfg):
    """Write config.json on the first run; refuse a changed config (other than RUN_ONLY) later."""
    path = os.path.join(cfg.out_dir, "config.json")
    new = dataclasses.asdict(cfg)
    if os.path.exists(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError:
                raise UsageError(f"{path} is corrupt; delete the out-dir or fix the file") from None
        changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {new[k]}" for k in new
                   if k not in RUN_ONLY and old.get(k) != new[k]]
        if changed:
            raise UsageError(f"{cfg.out_dir} holds a run with another config ({'; '.join(changed)}); "
                             "use the same flags to resume (only --levels may grow), or a new --out-dir")
    atomic_write_text(json.dumps(new, indent=1), path)


def level_dir(cfg, level):
    return os.path.join(cfg.out_dir, f"level_{level:02d}")


# ---- the pipeline: IMP with rewinding and a post-processor per level (SPEC section 1) ----
def find_ticket(cfg, log=print):
    """Find a (structured) lottery ticket: dense level 0, then cfg.levels pruning levels.

    Paper: Sec. 3.1 / Alg. 1 with the post-processing step of Alg. 2-3. Each level: prune the
    previous level's trained weights (global magnitude), post-process the mask (POSTPROCESS[method]),
    rewind to the end of epoch `rewind_epoch`, retrain to the end of the schedule, record test accuracy
    of the final epoch. Official: restarts the LR schedule at epoch 0 after rewinding; we resume it at
    the rewind epoch (Frankle et al. 2020). Finished levels are skipped; an unfinished level resumes
    from its last epoch checkpoint. Returns the list of per-level result rows.
    """
    os.makedirs(cfg.out_dir, exist_ok=True)
    check_config(cfg)
    device = resolve_device(cfg.device)
    data = datasets.load_dataset(cfg.dataset, cfg.data_dir, device, cfg.train_subset, cfg.seed,
                                   log=log)
    torch.manual_seed(cfg.seed)
    model = model_zoo.MODELS[cfg.arch](data.num_classes).to(device)
    eta = Eta(cfg)
    rows = []
    for level in range(cfg.levels + 1):
        path = os.path.join(level_dir(cfg, level), "ticket.pt")
        if os.path.exists(path):
            rows.append(load_file(path, "ticket")["metrics"])
            log(f"level {level}: finished earlier, skipped ({path})")
            continue
        rows.append(run_level(model, data, cfg, level, device, eta, log))
        write_results(cfg, rows)
        log(summary_line(rows[-1]))
    write_results(cfg, rows)
    log("\n" + markdown_table(rows))
    return rows


def start_level(model, data, cfg, level, device):
    """The state a level starts from: (masks, blocks, per-layer stats).

    Level 0 is the dense run from the seeded initialization. Level L > 0 prunes level L-1's trained
    weights, post-processes the mask, and rewinds (SPEC section 1, the loop body).
    """
    weights = prunable_weights(model)
    if level == 0:
        masks = ones_masks(weights)
        if cfg.rewind_epoch == 0:
            atomic_save(model.state_dict(), os.path.join(cfg.out_dir, "rewind.pt"))
        return masks, None, None
    prev = load_file(os.path.join(level_dir(cfg, level - 1), "ticket.pt"), "ticket")
    check_masks_fit(model, prev["masks"], "previous level's ticket")
    trained = {n: prev["state_dict"][n] for n in weights}
    pruned = magnitude_prune(trained, prev["masks"], cfg.prune_rate)
    feats = None
    if needs_feats(cfg.method, cfg.refill_score):
        model.load_state_dict(prev["state_dict"])          # level L-1's trained network (rewound below)
        batch_rng = epoch_generator(cfg, level, -1, device)  # "epoch -1": a seeded draw no epoch uses
        images, labels = next(datasets.train_batches(data, cfg.batch_size, batch_rng))
        feats = conv_channel_stats(model, list(weights), images, labels)
    masks, blocks = POSTPROCESS[cfg.method](trained, pruned, cfg, feats)
    stats = {n: layer_stats(pruned[n], masks[n], None if blocks is None else blocks[n])
             for n in masks}
    masks = {n: m.to(device) for n, m in masks.items()}
    rewind(model, load_file(os.path.join(cfg.out_dir, "rewind.pt"), "rewind state"), masks)
    return masks, blocks, stats


def run_level(model, data, cfg, level, device, eta, log):
    """Train one level to the end of the schedule, with epoch checkpoints; write its ticket."""
    os.makedirs(level_dir(cfg, level), exist_ok=True)
    ckpt_path = os.path.join(level_dir(cfg, level), "checkpoint.pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    if os.path.exists(ckpt_path):
        ckpt = load_file(ckpt_path, "checkpoint")
        check_masks_fit(model, ckpt["masks"], "checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        masks = {n: m.to(device) for n, m in ckpt["masks"].items()}
        blocks, stats, epoch, seconds = ckpt["blocks"], ckpt["stats"], ckpt["epoch"], ckpt["seconds"]
        loss, test_acc = ckpt["loss"], ckpt["test_acc"]
        log(f"level {level}: resuming at epoch {epoch} from {ckpt_path}")
    else:
        masks, blocks, stats = start_level(model, data, cfg, level, device)
        epoch, seconds = (0 if level == 0 else cfg.rewind_epoch), 0.0
    dens = density(masks)
    while epoch < cfg.epochs:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        loss, train_acc = train_epoch(model, data, optimizer, masks, cfg.batch_size,
                                      epoch_generator(cfg, level, epoch, device))
        test_acc = evaluate(model, data)
        epoch += 1
        if level == 0 and epoch == cfg.rewind_epoch:
            atomic_save(model.state_dict(), os.path.join(cfg.out_dir, "rewind.pt"))
        dt = time.perf_counter() - t0
        seconds += dt
        atomic_save(dict(level=level, epoch=epoch, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), masks=masks, blocks=blocks, stats=stats,
                         seconds=seconds, loss=loss, test_acc=test_acc), ckpt_path)
        log(f"level {level:2d} epoch {epoch:3d}/{cfg.epochs} loss {loss:.4f} train {train_acc:.4f} "
            f"test {test_acc:.4f} density {dens:.4f} {dt:6.1f}s ETA {eta.update(level, epoch, dt)}")
    metrics = level_metrics(level, masks, blocks, stats, test_acc, loss, seconds)
    ticket = dict(level=level, masks={n: m.cpu() for n, m in masks.items()}, blocks=blocks,
                  state_dict={k: v.cpu() for k, v in model.state_dict().items()}, metrics=metrics,
                  layer_stats=stats, config=dataclasses.asdict(cfg), num_classes=data.num_classes)
    atomic_save(ticket, os.path.join(level_dir(cfg, level), "ticket.pt"))
    if stats:
        write_layer_csv(stats, os.path.join(level_dir(cfg, level), "layers.csv"))
        if cfg.verbose:
            log(markdown_table([dict(name=n, **s) for n, s in stats.items()]))
    os.remove(ckpt_path)
    return metrics


# ---- reporting ----
class Eta:
    """Remaining time of the whole run from the mean epoch time seen in this process."""

    def __init__(self, cfg):
        self.cfg, self.seconds, self.epochs = cfg, 0.0, 0

    def update(self, level, epoch, dt):
        self.seconds, self.epochs = self.seconds + dt, self.epochs + 1
        left = (self.cfg.epochs - epoch) + (self.cfg.levels - level) * (
            self.cfg.epochs - self.cfg.rewind_epoch)
        s = int(left * self.seconds / self.epochs)
        return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def level_metrics(level, masks, blocks, stats, test_acc, loss, seconds):
    """One result row: the README's keys plus the structure of the level's mask."""
    rows = sum(m.shape[0] for m in masks.values())
    kept_rows = sum(int((m.reshape(m.shape[0], -1).sum(1) > 0).sum()) for m in masks.values())
    row = dict(level=level, density=round(density(masks), 6), test_acc=round(test_acc, 6),
               train_loss=round(loss, 6), seconds=round(seconds, 1),
               channel_density=round(kept_rows / rows, 6), blocks="", coverage="", flop_ratio="")
    if stats:
        row["coverage"] = round(float(np.mean([s["coverage"] for s in stats.values()])), 6)
    if blocks is not None:
        area = sum(len(r) * len(c) for b in blocks.values() for r, c in b)
        row.update(blocks=sum(len(b) for b in blocks.values()),
                   flop_ratio=round(area / sum(m.numel() for m in masks.values()), 6))
    return row


def summary_line(row):
    extra = "".join(f" {k} {row[k]}" for k in ("channel_density", "blocks", "coverage", "flop_ratio")
                    if row[k] != "")
    return (f"== level {row['level']} done: density {row['density']:.4f} test_acc "
            f"{row['test_acc']:.4f} train_loss {row['train_loss']:.4f} {row['seconds']:.0f}s{extra}")


def markdown_table(rows):
    """A list of dicts with the same keys as a markdown table (floats to 4 decimals)."""
    keys = list(rows[0])
    fmt = lambda v: (f"{v:.1e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}") if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows, path):
    """Rows (dicts) to CSV, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_results(cfg, rows):
    """results.json and results.csv in the out-dir: one row per finished level."""
    atomic_write_text(json.dumps(rows, indent=1), os.path.join(cfg.out_dir, "results.json"))
    write_csv(rows, os.path.join(cfg.out_dir, "results.csv"))


def write_layer_csv(stats, path):
    write_csv([dict(name=n, **s) for n, s in stats.items()], path)


def resolve_device(name):
    """'auto' -> cuda if available, else cpu with one WARNING line; cuda without one: UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        print("WARNING: no CUDA GPU found (--device auto): running on the CPU", file=sys.stderr)
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU (CPU build of torch, or no "
                         "driver); use --device cpu or auto")
    return name


# ---- benchmarks (python lth_ref.py --bench [kernels|paper|mask]) ----
def bench_mask(args, log=print):
    """Cost of keeping pruned weights at 0: median train step with and without the masks.

    Same model, same random batch, steps interleaved (with, without, with, ...) so drift hits both;
    the masking itself (weight *= mask after the step) is also timed alone, which a loaded machine
    disturbs far less than the step ratio.
    """
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = model_zoo.MODELS[args.arch](10).to(device)
    weights = prunable_weights(model)
    masks = magnitude_prune(weights, ones_masks(weights), 0.8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    params = dict(model.named_parameters())
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def mask_only():
        for n, m in masks.items():
            params[n].mul_(m)

    def step(use_masks):
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t1 = time.perf_counter()
        if use_masks:
            mask_only()
        sync()
        return time.perf_counter() - t0, time.perf_counter() - t1

    for _ in range(3):
        step(True), step(False)
    times = {True: [], False: []}
    for _ in range(args.bench_repeats):
        for use in (True, False):
            times[use].append(step(use))
    with_m = float(np.median([t for t, _ in times[True]]))
    without = float(np.median([t for t, _ in times[False]]))
    mask_s = float(np.median([m for _, m in times[True]]))
    row = dict(arch=args.arch, device=device, batch=args.batch_size, steps=args.bench_repeats,
               ms_step_with_masks=round(1e3 * with_m, 2), ms_step_without=round(1e3 * without, 2),
               ms_masking=round(1e3 * mask_s, 3), masking_pct_of_step=round(100 * mask_s / without, 2),
               step_ratio=round(with_m / without, 3))
    log(markdown_table([row]))
    return row


def partition_coverage(mask2d, parts, unit=1):
    """Coverage of the blocks that `parts` (row index arrays) get under regroup's column rule."""
    units = mask2d.cpu().numpy().reshape(mask2d.shape[0], -1, unit).sum(2)
    found = choose_block_columns(units, parts, unit, float(mask2d.sum()), 1, 1)
    blocks = [(torch.from_numpy(r), torch.from_numpy((c[:, None] * unit + np.arange(unit)).ravel()))
              for r, c in found]
    return layer_stats(mask2d, blocks_to_mask(blocks, *mask2d.shape), blocks)["coverage"]


def official_width_blocks(mask2d, parts, ratio=1.5):
    """The official code's column rule, for comparison: per group, the shortest prefix of its columns
    (most used first) that leaves every row fewer than prefix/ratio nonzeros outside the block.

    Official: `regroup` in Structure-LTH (t1 = 1.5); ported by intent (its loop indexes column i where
    it means the i-th sorted column). Returns blocks [(rows, cols)] as numpy arrays.
    """
    m = mask2d.cpu().numpy()
    blocks = []
    for rows in parts:
        sub = m[rows]                                                # (g, K)
        order = np.argsort(-sub.sum(0), kind="stable")
        uncovered = sub.sum(1)[:, None] - np.cumsum(sub[:, order], axis=1)   # (g, K)
        ok = uncovered.max(0) < np.arange(1, m.shape[1] + 1) / ratio
        width = int(np.argmax(ok)) + 1 if ok.any() else m.shape[1]
        blocks.append((rows, np.sort(order[:width])))
    return blocks


def bench_regroup(args, log=print):
    """Partitioner quality and speed per layer: ours vs a random partition vs rows sorted by nnz.

    Masks: the next level's IMP mask of a ticket (--ticket / --out-dir: its trained weights pruned by
    --prune-rate), else a freshly initialized --arch pruned to 20% density. All three partitions use
    the same group size and the same column rule, so coverage compares the partitions alone. The
    official width rule is also applied to our groups, to compare the column rules (area, coverage).
    """
    path, ticket = find_bench_ticket(args, required=False)
    if ticket:
        weights = {n: ticket["state_dict"][n] for n in ticket["masks"]}
        masks = magnitude_prune(weights, ticket["masks"], args.prune_rate)
    else:
        torch.manual_seed(args.seed)
        weights = prunable_weights(model_zoo.MODELS[args.arch](10))
        masks = magnitude_prune(weights, ones_masks(weights), 0.8)
    rng, rows = np.random.default_rng(args.seed), []
    for name, mask in masks.items():
        m2, unit = mask.reshape(mask.shape[0], -1).cpu(), REGROUP_UNITS[args.regroup_unit](mask.shape)
        t0 = time.perf_counter()
        new, blocks = regroup_mask(m2, groups=args.groups, row_multiple=args.row_multiple,
                                   min_col_nnz=args.min_col_nnz, min_block_cols=args.min_block_cols,
                                   unit=unit)
        seconds = time.perf_counter() - t0
        size = max(len(r) for r, _ in blocks)
        nonempty = np.flatnonzero(m2.sum(1).numpy() > 0)
        chunks = lambda order: [np.sort(order[i:i + size]) for i in range(0, len(order), size)]
        by_nnz = nonempty[np.argsort(-m2[nonempty].sum(1).numpy(), kind="stable")]
        official = [(torch.from_numpy(r), torch.from_numpy(c))
                    for r, c in official_width_blocks(m2, [b[0].numpy() for b in blocks])]
        official_stats = layer_stats(m2, blocks_to_mask(official, *m2.shape), official)
        rows.append(dict(name=name, shape="x".join(map(str, m2.shape)),
                         density=round(float(m2.mean()), 4), group_rows=size, blocks=len(blocks),
                         coverage=round(layer_stats(m2, new, blocks)["coverage"], 4),
                         random=round(partition_coverage(m2, chunks(rng.permutation(nonempty)), unit), 4),
                         sorted_nnz=round(partition_coverage(m2, chunks(by_nnz), unit), 4),
                         area_vs_nnz=round(float(new.sum() / m2.sum()), 3),
                         official_area_vs_nnz=round(official_stats["density"] / float(m2.mean()), 3),
                         official_coverage=round(official_stats["coverage"], 4),
                         ms=round(1e3 * seconds, 1)))
    log(markdown_table(rows))
    mean = lambda k: round(float(np.mean([r[k] for r in rows])), 4)
    log(f"mean coverage: ours {mean('coverage')}, random {mean('random')}, sorted by nnz "
        f"{mean('sorted_nnz')}; official width rule on our groups: coverage "
        f"{mean('official_coverage')} at {mean('official_area_vs_nnz')}x the IMP nonzeros (ours "
        f"{mean('area_vs_nnz')}x); slowest layer {max(r['ms'] for r in rows)} ms, total "
        f"{round(sum(r['ms'] for r in rows), 1)} ms")
    return rows


def find_bench_ticket(args, required=True):
    """(path, ticket) to benchmark: --ticket, else the last finished level in --out-dir."""
    path = args.ticket
    if path is None and args.out_dir and os.path.isdir(args.out_dir):
        levels = sorted(d for d in os.listdir(args.out_dir)
                        if d.startswith("level_") and
                        os.path.exists(os.path.join(args.out_dir, d, "ticket.pt")))
        path = os.path.join(args.out_dir, levels[-1], "ticket.pt") if levels else None
    if path is None:
        if required:
            raise UsageError("no ticket to benchmark: pass --ticket PATH, or --out-dir of a run "
                             "with at least one finished level")
        return None, None
    if not os.path.exists(path):
        raise UsageError(f"ticket {path} does not exist")
    return path, load_file(path, "ticket")


def bench_kernels(args, log=print):
    """Dense conv vs the grouped GEMM on a saved ticket: per conv layer and end to end.

    --bench kernels: each layer at its real activation shape (CIFAR 32x32 input), then the whole
    model (dense masked vs regrouped_model), for every --bench-batch. --bench paper: the paper's
    profiling setting (Sec. A1, Fig. 7): every conv fed a batch-64 127x127 input, conv only.
    Refill tickets run as one block of kept channels per layer. Results also go to bench.json.
    """
    path, ticket = fresh_ticket(args) if args.bench_density else find_bench_ticket(args)
    model = model_zoo.MODELS[ticket["config"]["arch"]](ticket["num_classes"])
    check_masks_fit(model, ticket["masks"], "ticket")
    model.load_state_dict(ticket["state_dict"])
    blocks = ticket["blocks"] or {n: channel_blocks(m) for n, m in ticket["masks"].items()}
    device = resolve_device(args.device)
    paper = args.bench == "paper"
    fmt = args.bench_memory_format
    fmt = fmt if fmt != "auto" else "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    memory_format = kernels.MEMORY_FORMATS[fmt]
    report = dict(ticket=path, arch=ticket["config"]["arch"], method=ticket["config"]["method"],
                  level=ticket["level"], device=device_name(device), memory_format=fmt, torch=torch.__version__,
                  threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
                  setting="paper (batch 64, 127x127, conv only)" if paper else "cifar", runs=[])
    for batch in ([64] if paper else args.bench_batch):
        layers = kernels.bench_layers(model, blocks, batch, device, paper_setting=paper,
                                      repeats=args.bench_repeats, memory_format=memory_format)
        log(f"\nper layer, batch {batch}, {report['device']}, {fmt}, median of {args.bench_repeats}:")
        log(markdown_table([{k: fmt_cell(v) for k, v in row.items()} for row in layers]))
        run = dict(batch=batch, layers=layers)
        if not paper:
            run["model"] = kernels.bench_model(model, blocks, batch, device, args.bench_repeats,
                                               memory_format=memory_format)
            log(markdown_table([{k: fmt_cell(v) for k, v in run["model"].items()}]))
        report["runs"].append(run)
    out = os.path.join(os.path.dirname(path), "bench.json")
    atomic_write_text(json.dumps(report, indent=1, default=str), out)
    log(f"wrote {out}")
    return report


def fresh_ticket(args):
    """(bench.json path, ticket) for --bench-density: a seeded, untrained --arch pruned by global
    magnitude to that density in one step and post-processed by --method with the CLI's knobs."""
    need = 0.0 < args.bench_density <= 1.0 and args.method != "imp"
    if not need:
        raise UsageError("--bench-density needs a density in (0, 1] and --method refill, refill+ "
                         "or regroup (an unstructured imp mask has no blocks)")
    torch.manual_seed(args.seed)
    model = model_zoo.MODELS[args.arch](10)
    weights = prunable_weights(model)
    masks = magnitude_prune(weights, ones_masks(weights), 1.0 - args.bench_density)
    feats = None
    if needs_feats(args.method, args.refill_score):        # an untrained model: a random batch will do
        calibrate_batchnorm(model)
        feats = conv_channel_stats(model, list(weights), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    masks, blocks = POSTPROCESS[args.method](weights, masks, args, feats)
    apply_masks(model, masks)
    calibrate_batchnorm(model)
    out_dir = args.out_dir or os.path.join("runs", f"bench_{args.arch}_{args.method}")
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, "ticket.pt"), dict(
        config=dict(arch=args.arch, method=args.method), level=None, num_classes=10, masks=masks,
        blocks=blocks, state_dict=model.state_dict())


@torch.no_grad()
def calibrate_batchnorm(model, batches=4, batch_size=64):
    """Set BN running stats from random CIFAR-sized batches, so an untrained sparse network passes a
    signal of normal scale (without it, the logits of a 10%-dense VGG-16 at init are just the FC
    bias, and the end-to-end output check compares constants)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                                    # cumulative average over the batches
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, 3, 32, 32))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def fmt_cell(v):
    """Table cell: shapes (tuples) as AxB; the rest as markdown_table formats it."""
    return "x".join(map(str, v)) if isinstance(v, tuple) else v


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


BENCHES = {"kernels": bench_kernels, "paper": bench_kernels, "regroup": bench_regroup,
           "mask": bench_mask}


# ---- CLI ----
def build_parser():
    p = argparse.ArgumentParser(
        description="Find structurally sparse lottery tickets (Chen et al., ICML 2022).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--arch", default="resnet20", choices=sorted(model_zoo.MODELS), help="network")
    a("--method", default="imp", choices=list(POSTPROCESS),
      help="mask post-processing after each pruning level: imp (none), refill (channel-wise), "
           "refill+ (channel-wise, extra channels), regroup (group-wise dense blocks)")
    a("--dataset", default="cifar10", choices=list(datasets.DATASETS),
      help="synthetic = small deterministic CIFAR-shaped data for smoke runs")
    a("--data-dir", default="data", help="where CIFAR archives / extracted folders live")
    a("--out-dir", default=None, help="run directory (default runs/ARCH_METHOD_DATASET)")
    a("--levels", type=int, default=PAPER["levels"], help="pruning levels after the dense level 0")
    a("--epochs", type=int, default=PAPER["epochs"], help="epochs per level")
    a("--rewind-epoch", type=int, default=None,
      help="rewind to the end of this epoch (0 = initialization); default 5%% of --epochs (8 of 160)")
    a("--prune-rate", type=float, default=PAPER["prune_rate"],
      help="fraction of the remaining prunable weights removed per level")
    a("--lr", type=float, default=PAPER["lr"], help="SGD learning rate (x0.1 at 50%% and 75%%)")
    a("--momentum", type=float, default=PAPER["momentum"], help="SGD momentum")
    a("--weight-decay", type=float, default=None,
      help=f"L2 weight decay; default {PAPER['weight_decay']}, per arch {WEIGHT_DECAY_BY_ARCH}")
    a("--batch-size", type=int, default=PAPER["batch_size"], help="examples per SGD step")
    a("--train-subset", type=int, default=None, help="train on a seeded random subset of N examples")
    a("--seed", type=int, default=0, help="seed for init, data order and augmentation")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    a("--refill-score", default="l1", choices=list(CHANNEL_SCORES),
      help="channel score for refill: l1 = L1 norm of the kept weights (paper), remain = number of "
           "kept weights (official default); fmap_l1, fmap_l2, saliency = the channel's output on one "
           "training batch: sum |y|, sum y^2, sum |y dL/dy| (official l1, l2, saliency)")
    a("--refill-extra", type=float, default=0.1,
      help="refill+: extra fraction of the pruned channels kept (official fillback_rate)")
    a("--regroup-unit", default="position", choices=list(REGROUP_UNITS),
      help="regroup column unit: position = one (c,ky,kx) (paper), channel = whole input channel")
    a("--groups", type=int, default=8, help="regroup: groups per layer (paper t1; official 8 parts)")
    a("--row-multiple", type=int, default=8,
      help="regroup: group rows are a multiple of this, at least this (paper b1, min rows)")
    a("--min-col-nnz", type=int, default=1,
      help="regroup: nonzeros a column needs inside a group to be selected (paper t2)")
    a("--min-block-cols", type=int, default=8,
      help="regroup: columns a group needs to become a block (paper b2)")
    a("--verbose", action="store_true", help="print the per-layer table of every level")
    a("--bench", nargs="?", const="kernels", default=None, choices=list(BENCHES),
      help="benchmark instead of training: kernels = dense vs grouped GEMM on a ticket, paper = "
           "the same in the paper's per-layer setting (batch 64, 127x127), regroup = partitioner "
           "coverage and speed vs baselines, mask = mask cost per train step")
    a("--ticket", default=None, help="ticket.pt to benchmark (default: last level in --out-dir)")
    a("--bench-density", type=float, default=None,
      help="bench a fresh --arch pruned to this density and post-processed by --method (with the "
           "regroup/refill flags) instead of a saved ticket")
    a("--bench-batch", type=int, nargs="+", default=[64], help="batch sizes for --bench kernels")
    a("--bench-repeats", type=int, default=30, help="timed runs per measurement (median)")
    a("--bench-memory-format", default="auto", choices=["auto", *kernels.MEMORY_FORMATS],
      help="memory format of the activations, dense and regrouped alike; auto = channels_last on "
           "the CPU (faster for both there), contiguous (NCHW, the CUDA kernel's layout) on a GPU")
    return p


def config_from_args(args):
    """Validate the parsed flags and resolve the per-arch / per-schedule defaults into a Config."""
    def need(ok, msg):
        if not ok:
            raise UsageError(msg)
    need(0.0 < args.prune_rate < 1.0, f"--prune-rate must be in (0, 1), got {args.prune_rate}")
    need(args.levels >= 0, f"--levels must be >= 0, got {args.levels}")
    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    rewind_epoch = round(PAPER["rewind_fraction"] * args.epochs) if args.rewind_epoch is None \
        else args.rewind_epoch
    need(0 <= rewind_epoch < args.epochs,
         f"--rewind-epoch must be in [0, --epochs), got {rewind_epoch} with --epochs {args.epochs}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.train_subset is None or args.train_subset >= 1, "--train-subset must be >= 1")
    need(0.0 <= args.refill_extra <= 1.0, f"--refill-extra must be in [0, 1], got {args.refill_extra}")
    for flag in ("groups", "row_multiple", "min_col_nnz", "min_block_cols"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1")
    wd = args.weight_decay if args.weight_decay is not None else \
        WEIGHT_DECAY_BY_ARCH.get(args.arch, PAPER["weight_decay"])
    out_dir = args.out_dir or os.path.join("runs", f"{args.arch}_{args.method}_{args.dataset}")
    return Config(
        arch=args.arch, method=args.method, dataset=args.dataset, data_dir=args.data_dir,
        out_dir=out_dir, levels=args.levels, epochs=args.epochs, rewind_epoch=rewind_epoch,
        prune_rate=args.prune_rate, lr=args.lr, momentum=args.momentum, weight_decay=wd,
        batch_size=args.batch_size, train_subset=args.train_subset, seed=args.seed,
        device=args.device, refill_score=args.refill_score, refill_extra=args.refill_extra,
        regroup_unit=args.regroup_unit, groups=args.groups, row_multiple=args.row_multiple,
        min_col_nnz=args.min_col_nnz, min_block_cols=args.min_block_cols, verbose=args.verbose)


def main(argv=None):
    """The single entry point: find a ticket (default) or run a benchmark (--bench)."""
    args = build_parser().parse_args(argv)
    try:
        if args.bench:
            BENCHES[args.bench](args)
        else:
            find_ticket(config_from_args(args))
    except (UsageError, datasets.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):                 # `... | head` ends quietly, like other Unix tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
