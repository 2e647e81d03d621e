"""lth_ref: structurally sparse lottery tickets, a small reference implementation.

T. Chen, X. Chen, X. Ma, Y. Wang, Z. Wang, "Coarsening the Granularity: Towards Structurally Sparse
Lottery Tickets", ICML 2022, arXiv:2202.04736. Official code: github.com/VITA-Group/Structure-LTH.

Iterative magnitude pruning (IMP) with weight rewinding finds sparse "winning tickets". IMP's chain stays
unstructured (the trunk); every level's mask is then post-processed into a structure that runs fast and
trained on its own (a branch): `refill` keeps whole output channels (channel-wise tickets), `regroup`
turns groups of rows into dense blocks (group-wise tickets, run by the grouped GEMM in kernels.py).

    python lth_ref.py --arch resnet20 --method regroup            # find tickets on CIFAR-10
    python -m pytest -q test_lth_ref.py                           # the tests

Files: lth_ref.py (this: masks, mask sources, refill, regroup, training, the experiment, benchmarks,
CLI), models.py (MODELS), data.py (datasets, on-device batches), kernels.py (grouped GEMM),
test_lth_ref.py.
"""
import argparse
import copy
import csv
import dataclasses
import datetime
import functools
import importlib
import importlib.util
import json
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _sibling(name):
    """Import data.py, models.py or kernels.py from this file's folder, never a module of the same name
    that comes first on sys.path (a user's `data/` package, say): the plain import when it resolves to
    our file, else our file under the private name `lth_ref_<name>`."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    ours = lambda file: file is not None and os.path.exists(file) and os.path.samefile(file, path)
    loaded = sys.modules.get(name)
    spec = importlib.util.find_spec(name) if loaded is None else None
    if (loaded is not None and ours(getattr(loaded, "__file__", None))) or \
            (spec is not None and ours(spec.origin)):
        return importlib.import_module(name)
    private = f"lth_ref_{name}"
    if private not in sys.modules:
        spec = importlib.util.spec_from_file_location(private, path)
        sys.modules[private] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[private])
    return sys.modules[private]


datasets = _sibling("data")      # data.py (local variables are called `data`)
kernels = _sibling("kernels")
model_zoo = _sibling("models")   # models.py

# ---- hyperparameters (the paper's Table 1 and Sec. 3.1) ----
PAPER = dict(
    momentum=0.9,    # SGD momentum, every setting
    prune_rate=0.2,  # fraction of the *remaining* prunable weights removed per level
    levels=10,       # pruning levels after the dense level 0
)
# Table 1 per dataset: epochs per level, SGD learning rate, LR x0.1 at these epochs, examples per step,
# L2 weight decay, rewind point (end of epoch 8 for every dataset, Sec. 3.1). The CIFAR-100 and ImageNet
# batch cells are blank in the table: 128 is the official README's CIFAR batch, 256 the batch of lr 0.1
# under the linear scaling rule (the official ImageNet script: 1024 at lr 0.4, the same ratio).
SCHEDULES = {
    "cifar10": dict(epochs=160, lr=0.1, lr_drops=(80, 120), batch_size=128, weight_decay=1e-4, rewind_epoch=8),
    "cifar100": dict(epochs=160, lr=0.1, lr_drops=(80, 120), batch_size=128, weight_decay=2e-4, rewind_epoch=8),
    "tinyimagenet": dict(epochs=95, lr=0.1, lr_drops=(30, 60), batch_size=32, weight_decay=5e-4, rewind_epoch=8),
    "imagenet": dict(epochs=95, lr=0.1, lr_drops=(30, 60), batch_size=256, weight_decay=1e-4, rewind_epoch=8),
}
SCHEDULES["synthetic"] = SCHEDULES["cifar10"]   # a CIFAR-shaped stand-in for smoke runs
SCHEDULE_BY_ARCH = {  # (arch, dataset) cells of Table 1 that differ from their dataset's row
    ("vgg16", "cifar10"): dict(weight_decay=2e-4),
    ("vgg16", "synthetic"): dict(weight_decay=2e-4),
    ("vgg16", "cifar100"): dict(weight_decay=5e-4),
    ("mobilenet_v1", "cifar100"): dict(batch_size=64),
}


def paper_schedule(arch, dataset):
    """Table 1's settings for --arch on --dataset (the defaults of the flags)."""
    return {**SCHEDULES[dataset], **SCHEDULE_BY_ARCH.get((arch, dataset), {})}


INPUT_SHAPE = (3, 32, 32)   # (C, H, W) of the CIFAR images the benchmarks feed by default
EXPORT_CHECK_BATCH = 8      # random images on which an export is checked against its ticket


class UsageError(Exception):
    """A user-facing error: the CLI prints it (with its hint) and exits with code 2, no traceback."""


def ceil_div(a, b):
    """ceil(a / b) for non-negative integers."""
    return -(-a // b)


# ---- masks ----
def prunable_weights(model, skip_stem=True):
    """The weights IMP prunes: {parameter name: Parameter} of every nn.Conv2d with groups == 1.

    The stem (the first conv, which reads the image) is skipped unless skip_stem=False: the paper keeps
    it dense. Depthwise/grouped convs are never included (refill and regroup work on the (O, C*kh*kw)
    rows of full convs); Linear layers, BN and biases are never pruned.
    """
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return {f"{name}.weight": m.weight for name, m in convs[1 if skip_stem else 0:] if m.groups == 1}


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


def check_pairs(weights, masks, what):
    """ValueError unless weights and masks are dicts with the same names and shapes (public functions)."""
    if not isinstance(weights, dict) or not isinstance(masks, dict):
        raise ValueError(f"{what}: weights and masks must be dicts {{parameter name: tensor}}")
    bad = [n for n in masks if n not in weights or tuple(weights[n].shape) != tuple(masks[n].shape)]
    if bad:
        raise ValueError(f"{what}: no weight of the mask's shape for {bad[:3]} (masks and weights must "
                         "have the same names and shapes)")


# ---- mask sources: IMP's global magnitude prune, OMP, random, SNIP, GraSP, SynFlow ----
def top_k(scores, k):
    """Boolean mask of the k largest scores (any shape); ties go to the lower index (deterministic)."""
    order = torch.sort(scores.detach().float().flatten().cpu(), descending=True, stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(scores.shape).to(scores.device)


def keep_top(scores, n_keep):
    """Global top-k across layers: {name: 0/1 float mask} keeping the n_keep highest scores of all
    layers together (ranked as one vector; ties to the earlier layer and position). scores: {name: tensor}."""
    names = list(scores)
    keep = top_k(torch.cat([scores[n].detach().float().flatten().cpu() for n in names]), n_keep)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view(scores[n].shape).float().to(scores[n].device)
        start += size
    return out


def magnitude_prune(weights, masks, rate):
    """Remove `rate` of the remaining weights, smallest |w| first, ranked across all layers together.

    Paper: Sec. 3.1, IMP step (global magnitude pruning, 20% of the remaining weights per round).
    Official: `pruning_model` (torch.nn.utils.prune.global_unstructured, L1); same rule.
    weights, masks: {name: (O, C, kh, kw)}. Returns new masks; exactly round(rate * remaining) weights
    are removed (ties: the later position goes first), so the result is deterministic and only shrinks.
    """
    check_pairs(weights, masks, "magnitude_prune")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"magnitude_prune: rate must be in [0, 1), got {rate}")
    remaining = int(sum(int(m.sum()) for m in masks.values()))
    scores = {n: torch.where(masks[n].bool(), weights[n].detach().abs().float(), -torch.inf)
              for n in masks}
    return keep_top(scores, remaining - int(round(rate * remaining)))


def prune_to_density(scores, target):
    """One-shot global pruning: keep the round(target * total) highest scores of all layers together.

    Paper: Sec. 3.1 / Fig. 6 left, the one-shot mask sources (OMP and the pruning-at-initialization
    criteria are all a score per weight and one global top-k). scores: {name: tensor}; target in (0, 1].
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"prune_to_density: target density must be in (0, 1], got {target}")
    return keep_top(scores, int(round(target * sum(s.numel() for s in scores.values()))))


def random_masks(masks, generator):
    """Uniformly random masks with the same number of kept weights per layer as `masks`.

    Paper: Sec. 3.1 / Fig. 6 left, random pruning (RP) at the layerwise densities of OMP.
    generator: a seeded torch.Generator (CPU); each layer keeps exactly masks[n].sum() positions.
    """
    out = {}
    for n, m in masks.items():
        keep = torch.zeros(m.numel())
        keep[torch.randperm(m.numel(), generator=generator)[:int(m.sum())]] = 1.0
        out[n] = keep.view(m.shape).to(m.device)
    return out


def snip_scores(model, names, images, labels):
    """SNIP connection sensitivity |w * dL/dw| at the given weights, on one batch (higher = keep).

    Paper: Fig. 6 left (SNIP, Lee et al. 2019). Published: one batch of training data, the model in
    training mode, scores of every layer; ours ranks the prunable weights only. The model is left as it
    was (scores come from a copy). names: parameter names; images (B, C, H, W), labels (B,).
    """
    model = _scoring_copy(model, train=True)
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: (params[n] * g).detach().abs() for n, g in zip(names, grads)}


GRASP_TEMPERATURE = 200.0  # logits / T before the loss, as published (GraSP's default T = 200)


def grasp_scores(model, names, images, labels, temperature=GRASP_TEMPERATURE):
    """GraSP gradient-signal preservation: w * (H g) at the given weights (higher = keep).

    Paper: Fig. 6 left (GraSP, Wang et al. 2020). Published: g = dL/dw on the batch in two halves
    (logits / T), then H g = d(g_stop . dL/dw)/dw, score -w * Hg, and the highest scores are removed;
    keeping the highest w * Hg is the same rule. g and z run over every conv and linear weight as
    published; the caller ranks the prunable ones. images (B, C, H, W), labels (B,).
    """
    model = _scoring_copy(model, train=True)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    halves = [(x, y) for x, y in zip(images.chunk(2), labels.chunk(2)) if len(y)]
    loss_of = lambda x, y: F.cross_entropy(model(x) / temperature, y)
    g = [sum(parts) for parts in zip(*(torch.autograd.grad(loss_of(x, y), weights) for x, y in halves))]
    for x, y in halves:
        grad_f = torch.autograd.grad(loss_of(x, y), weights, create_graph=True)
        sum((gw.detach() * gf).sum() for gw, gf in zip(g, grad_f)).backward()
    params = dict(model.named_parameters())
    return {n: (params[n] * params[n].grad).detach() for n in names}


SYNFLOW_ROUNDS = 100  # published default number of pruning rounds (Tanaka et al. 2020)


def synflow_masks(model, names, target, rounds=SYNFLOW_ROUNDS, input_shape=(3, 32, 32)):
    """SynFlow, data-free and iterative: masks at density `target` after `rounds` rounds.

    Paper: Fig. 6 left (SynFlow, Tanaka et al. 2020). Published: every parameter and buffer replaced by
    its absolute value, the model in eval mode and float64, R = sum(model(ones)) and score |w * dR/dw|;
    round r keeps the top target^(r/rounds) of the weights, masked weights scored again. Ours ranks the
    prunable weights only. The model is left as it was.
    """
    model = _scoring_copy(model, train=False).double()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.abs_()
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in names}
    masks = ones_masks({n: params[n] for n in names})
    ones = torch.ones(1, *input_shape, dtype=torch.float64, device=originals[names[0]].device)
    for r in range(1, rounds + 1):
        with torch.no_grad():
            for n in names:
                params[n].copy_(originals[n] * masks[n])
        grads = torch.autograd.grad(model(ones).sum(), [params[n] for n in names])
        scores = {n: torch.where(masks[n].bool(), (params[n] * g).detach().abs(), -torch.inf)
                  for n, g in zip(names, grads)}
        masks = prune_to_density(scores, target ** (r / rounds))
    return masks


def _scoring_copy(model, train):
    """A deep copy to compute scores on (BN statistics and gradients of the original stay untouched)."""
    model = copy.deepcopy(model)
    model.train(train)
    for p in model.parameters():
        p.grad = None
    return model


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


def refill_mask(weight, mask, extra=0.0, score="l1", feats=None):
    """One layer's refill: keep the n best output channels whole, prune every other channel whole.

    Paper: Sec. 3.2 / Alg. 2 (refill), n = nnz / K channels; refill+ keeps n + extra * (O - n).
    Official: `prune_model_custom_fillback` (fillback_rate = extra, criterion `remain` by default).
    weight, mask: (O, C, kh, kw) or (O, K); feats: this layer's conv_channel_stats (FEATURE_SCORES only).
    Returns a mask whose rows (output channels) are all 1 or all 0; channels that come back whole
    take their rewind values when the level rewinds.
    """
    if score not in CHANNEL_SCORES:
        raise ValueError(f"unknown refill score {score!r}; expected one of {list(CHANNEL_SCORES)}")
    if tuple(weight.shape) != tuple(mask.shape) or mask.dim() < 2:
        raise ValueError(f"refill_mask: weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must "
                         "have the same shape (O, C, kh, kw) or (O, K)")
    if not 0.0 <= extra <= 1.0:
        raise ValueError(f"refill_mask: extra (refill+'s fraction of the pruned channels) must be in [0, 1], got {extra}")
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
    check_pairs(weights, masks, "refill")
    return {n: refill_mask(weights[n], m, extra, score, None if feats is None else feats[n])
            for n, m in masks.items()}


# ---- regroup (group-wise tickets): hypergraph, greedy partition, dense blocks ----
SIMILARITY_EPS = 1e-12  # guards 0/0 for pairs of empty rows (their similarity is 0)


def row_similarity(units):
    """Tanimoto similarity of the rows: a.b / (|a|^2 + |b|^2 - a.b); Jaccard for 0/1 rows.

    Paper: Sec. 3.2, rows that share nonzero columns (nets of the hypergraph) belong together.
    units: (n, U) float array of per-row counts (the mask, or its counts per input channel).
    """
    units = units.astype(np.float32)
    gram = units @ units.T                                    # (n, n) shared nonzeros
    sq = np.diag(gram)
    return gram / np.maximum(sq[:, None] + sq[None, :] - gram, SIMILARITY_EPS)


def partition_rows(sim, group_size):
    """Greedy hypergraph partition of n rows into groups of `group_size` (the last may be smaller).

    Paper: Alg. 3, "partition the rows into t1 groups" (hMETIS in the official code, 8 parts).
    Ours: seed a group with the unassigned row of largest similarity mass (sum of its similarities to
    all rows: a row in the middle of a cluster), then add, one at a time, the unassigned row most
    similar to the group so far (sum of similarities); deterministic.
    sim: (n, n). Returns a list of sorted index arrays into 0..n-1.
    """
    n = sim.shape[0]
    free = np.ones(n, dtype=bool)
    mass = sim.sum(1)
    groups = []
    while free.any():
        seed = int(np.argmax(np.where(free, mass, -np.inf)))
        members, score = [seed], sim[seed].copy()
        free[seed] = False
        while len(members) < group_size and free.any():
            r = int(np.argmax(np.where(free, score, -np.inf)))
            members.append(r)
            free[r] = False
            score += sim[r]
        groups.append(np.sort(members))
    return groups


SWAPS_EXAMINED_PER_PAIR = 4  # best candidate swaps examined per round, per ordered pair of groups
MIN_SWAP_GAIN = 1e-6         # similarity units: a smaller gain is float noise, not an improvement


def refine_partition(sim, groups, max_rounds=10):
    """Swap rows between groups while a swap raises the total within-group similarity.

    Paper: the refinement phase of a multilevel hypergraph partitioner (hMETIS's FM passes), in the
    simplest balanced form: a swap keeps every group's size, so the kernel's row rule still holds.
    Gain of swapping r (in A) with s (in B): S(r,B) - S(r,A\\r) + S(s,A) - S(s,B\\s) - 2 sim(r,s).
    A round applies the best positive swaps whose group pairs are disjoint (their gains do not
    interact), so a round makes up to t/2 swaps; examining SWAPS_EXAMINED_PER_PAIR * t^2 candidates
    finds them. sim: (n, n); groups: index arrays.
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
        top = min(flat.size - 1, SWAPS_EXAMINED_PER_PAIR * t * t)
        best = np.argpartition(-flat, top)[:top]
        best = best[np.lexsort((best, -flat[best]))]        # by gain, then position: deterministic
        busy, swaps = np.zeros(t, dtype=bool), []
        for r, s in zip(*np.unravel_index(best, gain.shape)):
            a, b = label[r], label[s]
            if gain[r, s] <= MIN_SWAP_GAIN:
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


# regroup's column unit -> columns per unit, from the 4-D conv mask shape (O, C, kh, kw)
REGROUP_UNITS = {"position": lambda shape: 1, "channel": lambda shape: shape[2] * shape[3]}


def regroup_mask(mask, unit="position", groups=8, row_multiple=8, min_col_nnz=1, min_block_cols=8,
                 area=None, refine_rounds=10):
    """One layer's regroup: partition rows, turn each group into a dense block, prune the rest.

    Paper: Alg. 3 (t1 = groups, t2 = min_col_nnz, b1 = row_multiple, b2 = min_block_cols), repeated
    on the rows left without a block while new blocks are found. Official: `regroup` in
    Structure-LTH calls hMETIS once (8 parts) and keeps parts of more than 16 rows, which keeps no
    block on layers of 64 rows or fewer; ours sizes groups from the layer (below) and always returns
    a block-structured mask.
    Rules: a group has g = max(row_multiple, ceil(rows / groups) rounded up to row_multiple) rows (a
    pass's last group may be smaller); `unit` (REGROUP_UNITS): "position" selects single (c, ky, kx)
    columns as in the paper, "channel" whole input channels (faster on CPU); the blocks' total area
    is at most `area` (default: the layer's nonzeros) unless one minimal block is larger.
    mask: the conv's 0/1 mask (O, C, kh, kw), or its (O, K) view for unit "position". Returns (new mask
    of mask's shape, blocks) with blocks = [(rows, cols)] int64, rows disjoint, cols indexing the
    flattened (c, ky, kx) axis, and the new mask exactly the union of the blocks' rectangles.
    """
    if unit not in REGROUP_UNITS:
        raise ValueError(f"unknown regroup unit {unit!r}; expected one of {list(REGROUP_UNITS)}")
    if mask.dim() not in (2, 4) or (unit == "channel" and mask.dim() != 4):
        raise ValueError(f"regroup_mask: expected the conv's mask (O, C, kh, kw)"
                         f"{'' if unit == 'channel' else ' or its (O, K) view'}, got shape {tuple(mask.shape)}")
    for knob, value in dict(groups=groups, row_multiple=row_multiple, min_col_nnz=min_col_nnz,
                            min_block_cols=min_block_cols).items():
        if int(value) != value or value < 1:
            raise ValueError(f"regroup_mask: {knob} must be an integer >= 1, got {value!r}")
    cols_per_unit = REGROUP_UNITS[unit](mask.shape) if mask.dim() == 4 else 1
    out_rows = mask.shape[0]
    m = mask.detach().reshape(out_rows, -1).cpu().numpy().astype(np.float32)
    if not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("regroup_mask: the mask must hold only 0 and 1")
    k = m.shape[1]
    units = m.reshape(out_rows, k // cols_per_unit, cols_per_unit).sum(2)   # (O, U) nonzeros per unit
    budget = float(m.sum()) if area is None else float(area)
    nonempty = np.flatnonzero(units.sum(1) > 0)               # vertices of the hypergraph
    sim_all = row_similarity(units[nonempty])                 # (n, n), computed once
    rows_left = nonempty
    blocks = []
    while len(rows_left) > 0:
        size = min(len(rows_left),
                   max(row_multiple, ceil_div(ceil_div(len(rows_left), groups), row_multiple) * row_multiple))
        at = np.searchsorted(nonempty, rows_left)
        sim = sim_all[np.ix_(at, at)]
        parts = refine_partition(sim, partition_rows(sim, size), refine_rounds)
        min_units = max(1, min(ceil_div(min_block_cols, cols_per_unit), int(budget // (size * cols_per_unit))))
        found = choose_block_columns(units[rows_left], parts, cols_per_unit,
                                     max(budget, size * cols_per_unit), min_col_nnz, min_units)
        if not found:
            break
        for rows, cols in found:
            blocks.append((rows_left[rows], (cols[:, None] * cols_per_unit + np.arange(cols_per_unit)).ravel()))
            budget -= len(rows) * len(cols) * cols_per_unit
        used = np.concatenate([rows_left[rows] for rows, _ in found])
        rows_left = np.setdiff1d(rows_left, used)
        if budget < row_multiple * cols_per_unit:
            break
    blocks = [(torch.from_numpy(np.sort(r)).long(), torch.from_numpy(np.sort(c)).long())
              for r, c in sorted(blocks, key=lambda b: int(b[0].min()))]
    return kernels.block_mask(tuple(mask.shape), blocks).to(mask), blocks


def regroup(masks, unit="position", **knobs):
    """Regroup every layer: {name: (O, C, kh, kw) mask} -> ({name: block mask}, {name: blocks});
    knobs (groups, row_multiple, min_col_nnz, min_block_cols, area, refine_rounds) as regroup_mask."""
    new_masks, blocks = {}, {}
    for name, mask in masks.items():
        new_masks[name], blocks[name] = regroup_mask(mask, unit, **knobs)
    return new_masks, blocks


def layer_stats(before, after, blocks=None):
    """Per-layer quality of a post-processed mask, as a dict of plain numbers.

    coverage = kept original nonzeros / original nonzeros; density of the new mask; channel_density =
    fraction of non-empty output rows; with blocks: their count, sizes and the FLOP ratio
    sum |rows|*|cols| / (O*K) (equal to the new density: rows are disjoint).
    """
    out_rows = before.shape[0]
    b2, a2 = before.reshape(out_rows, -1), after.reshape(out_rows, -1)
    nnz = float(b2.sum())
    stats = dict(shape="x".join(map(str, before.shape)), density_before=nnz / b2.numel(),
                 density=float(a2.sum()) / a2.numel(),
                 coverage=float((b2 * a2).sum()) / nnz if nnz else 1.0,
                 channel_density=float((a2.sum(1) > 0).float().mean()))
    if blocks is not None:
        stats.update(blocks=len(blocks), flop_ratio=kernels.flop_ratio(tuple(a2.shape), blocks),
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


# ---- post-processing: what a branch does to the trunk's mask of a level ----
POSTPROCESS = {  # method -> fn(weights, masks, feats, knobs) -> (masks, blocks or None)
    "imp": lambda weights, masks, feats, k: (masks, None),
    "refill": lambda weights, masks, feats, k: (refill(weights, masks, 0.0, k["refill_score"], feats), None),
    "refill+": lambda weights, masks, feats, k: (
        refill(weights, masks, k["refill_extra"], k["refill_score"], feats), None),
    "regroup": lambda weights, masks, feats, k: regroup(
        masks, k["regroup_unit"], groups=k["groups"], row_multiple=k["row_multiple"],
        min_col_nnz=k["min_col_nnz"], min_block_cols=k["min_block_cols"]),
}
# the knobs that shape each method's masks (Config fields) and their short label in a branch's name
BRANCH_KNOBS = {"imp": (), "refill": ("refill_score",), "refill+": ("refill_score", "refill_extra"),
                "regroup": ("regroup_unit", "groups", "row_multiple", "min_col_nnz", "min_block_cols")}
KNOB_LABELS = {"refill_score": "score", "refill_extra": "extra", "regroup_unit": "unit", "groups": "groups",
               "row_multiple": "rows", "min_col_nnz": "colnnz", "min_block_cols": "cols"}


def postprocess(method, weights, masks, feats=None, **knobs):
    """Turn unstructured masks into a structural ticket's masks: (masks, blocks or None).

    Paper: Alg. 2 (refill, refill+) and Alg. 3 (regroup), applied to "the unstructured mask from
    Alg. 1"; bring your own masks from any pruning loop. method: a POSTPROCESS key; weights, masks:
    {name: (O, C, kh, kw)} (weights: the trained weights the masks were pruned from, for refill's
    scores); feats: conv_channel_stats for the feature-map refill scores; knobs: BRANCH_KNOBS[method]
    by name (defaults: the CLI's). blocks: {name: [(rows, cols)]} for regroup, None otherwise.
    """
    if method not in POSTPROCESS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(POSTPROCESS)}")
    unknown = sorted(set(knobs) - set(BRANCH_KNOBS[method]))
    if unknown:
        raise ValueError(f"{method} takes the knobs {list(BRANCH_KNOBS[method])}, not {unknown}")
    check_pairs(weights, masks, "postprocess")
    defaults = Config()
    return POSTPROCESS[method](weights, masks, feats,
                              {k: knobs.get(k, getattr(defaults, k)) for k in BRANCH_KNOBS[method]})


STRUCTURAL = ("refill", "refill+", "regroup")  # methods whose dead output channels are made exactly dead


def training_masks(model, masks, method):
    """What is multiplied into the parameters after every step: the conv masks and, for structural
    methods, the BN scale and shift of every output channel whose conv row is pruned (models.bn_masks).
    Such a channel then outputs relu(0) = 0 exactly, and models.slim_model can remove it. The trunk and
    imp branches stay the paper's IMP (BN free)."""
    return {**masks, **model_zoo.bn_masks(model, masks)} if method in STRUCTURAL else masks


# ---- training and evaluation: one process, or one per device under torchrun ----
def lr_at(epoch, cfg):
    """Step schedule: cfg.lr, x0.1 at each epoch of cfg.lr_drops."""
    return cfg.lr * 0.1 ** sum(epoch >= drop for drop in cfg.lr_drops)


# seeded draws outside the training epochs use "epochs" that no training epoch uses
SCORE_BATCH, REINIT, RANDOM_MASK = -1, -2, -3
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # --amp: autocast dtype
DIST_TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long at a collective (rank 0 writes
                                               # tickets meanwhile) before the job fails


def epoch_generator(cfg, level, epoch, device):
    """The only source of data randomness: seeded by (seed, level, epoch), so resume is exact. The
    trunk and the branches of a level see the same batches (paired comparisons)."""
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed * 1_000_003 + level * 10_007 + epoch)
    return g


def process_group():
    """(rank, world size) of this process: (0, 1) unless torchrun started it (init_distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device):
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU.
    Returns this process's device (cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or torch.distributed.is_initialized():
        return device
    cuda = device == "cuda"
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def all_sum(values, device):
    """Sum a list of numbers over every process (one collective); unchanged in one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if process_group()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def barrier():
    """Wait for every process (after rank 0 wrote a file the others read)."""
    if process_group()[1] > 1:
        torch.distributed.barrier()


def check_same_on_every_rank(masks, device):
    """Masks are computed by every process from the same files and seeds: check that they agree."""
    if process_group()[1] == 1:
        return
    digest = torch.tensor([float((m.flatten().double() * torch.arange(1, m.numel() + 1, device=m.device)).sum())
                           for m in masks.values()], dtype=torch.float64, device=device)
    low, high = digest.clone(), digest.clone()
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the processes computed different masks: every rank must read the same "
                           "experiment directory (a shared file system) with the same torch version")


def autocast(cfg, device):
    """--amp's autocast context (a no-op for off)."""
    dtype = AMP_DTYPES[cfg.amp]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def train_step(net, optimizer, pairs, x, y, global_size, cfg, scaler):
    """One SGD step on this process's slice (x, y) of a global batch of global_size examples, then
    every (parameter, mask) pair multiplied: pruned weights stay exactly 0. The loss is scaled so that
    the gradient, averaged over processes, is the global batch's mean. Returns (loss sum, correct)."""
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(cfg, x.device):
        out = net(x)
        loss = F.cross_entropy(out.float(), y, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * (process_group()[1] / global_size)).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        for p, m in pairs:
            p.mul_(m)
    return loss.detach(), (out.argmax(1) == y).sum()


def mask_pairs(model, masks):
    """[(parameter, mask)] of the unwrapped model (DDP and torch.compile share its parameters)."""
    params = dict(model.named_parameters())
    return [(params[n], m) for n, m in masks.items()]


def train_epoch(net, data, optimizer, pairs, cfg, generator, scaler):
    """One epoch of SGD over the global batches of cfg.batch_size (this process: its slice of each).

    pairs: mask_pairs, applied after every step. A last global batch smaller than the number of
    processes is skipped (some would get no example). Returns (mean train loss, train accuracy) over
    all processes; sums stay on the device until the end (one sync per epoch).
    """
    net.train()
    rank, world = process_group()
    sums = torch.zeros(2, device=data.device)
    seen, n = 0, data.num_train
    for i, (x, y) in enumerate(datasets.train_batches(data, cfg.batch_size, generator, rank, world)):
        global_size = min(cfg.batch_size, n - i * cfg.batch_size)
        if global_size < world:
            break
        loss_sum, correct = train_step(net, optimizer, pairs, x, y, global_size, cfg, scaler)
        sums += torch.stack([loss_sum, correct.float()])
        seen += global_size
    loss_sum, correct = all_sum(sums.tolist(), data.device)
    return loss_sum / seen, correct / seen


@torch.no_grad()
def evaluate(model, data, cfg, split="test", batch_size=500):
    """Accuracy (fraction correct) on the test (or val) split, in eval mode; each process evaluates
    its shard and the counts are summed."""
    model.eval()
    rank, world = process_group()
    correct = torch.zeros((), device=data.device)
    for x, y in datasets.eval_batches(data, batch_size, split, rank, world):
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg, data.device):
            correct += (model(x).argmax(1) == y).sum()
    return all_sum([correct.item()], data.device)[0] / len(data.split_labels(split))


def training_net(model, cfg, device):
    """What the training steps call: the model, wrapped in DistributedDataParallel under torchrun
    (SyncBatchNorm with --sync-bn) and compiled with --compile."""
    net = model
    if process_group()[1] > 1:
        if cfg.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        cuda = torch.device(device).type == "cuda"
        net = nn.parallel.DistributedDataParallel(net, device_ids=[torch.device(device).index] if cuda else None)
    return torch.compile(net) if cfg.compile else net


# ---- files: atomic writes, safe loading, configs ----
def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file. Under
    torchrun only rank 0 writes files (every rank computes the same thing)."""
    if process_group()[0] != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text, path):
    """Write text to a temporary file, then rename (rank 0 only, as atomic_save)."""
    if process_group()[0] != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_file(path, what, mmap=False):
    """torch.load a file we wrote, tensors and plain data only (weights_only: a file that would run
    code when unpickled is refused, not run). A missing, corrupt or unsafe file is a UsageError naming it.
    mmap: map the tensors instead of reading them (cheap when only a small entry is needed)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, wrong format, disallowed globals: all mean "not ours"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"cannot read the {what} {path} ({type(e).__name__}: {first}); lth_ref writes "
                         f"only tensors and plain data, so the file is corrupt or was not written by "
                         f"lth_ref. Delete it to recompute that step, or point --out-dir elsewhere") from None


TICKET_KEYS = {"level": (int, type(None)), "masks": dict, "blocks": (dict, type(None)), "state_dict": dict,
               "metrics": dict, "config": dict, "num_classes": int}


def load_ticket(path, model=None, mmap=False):
    """Load a ticket.pt and check its structure (and, given a model, that its masks fit it)."""
    if not os.path.exists(path):
        raise UsageError(f"ticket {path} does not exist")
    ticket = load_file(path, "ticket", mmap=mmap)
    problems = [k for k, types in TICKET_KEYS.items()
                if not isinstance(ticket, dict) or not isinstance(ticket.get(k), types)]
    if not problems and "arch" not in ticket["config"]:
        problems = ["config['arch']"]
    if problems:
        raise UsageError(f"{path} is not a ticket: it lacks {problems} (a ticket is the level_NN/ticket.pt "
                         f"of an lth_ref run: a dict with {sorted(TICKET_KEYS)})")
    if model is not None:
        check_masks_fit(model, ticket["masks"], f"ticket {path}")
    return ticket


@dataclasses.dataclass
class Config:
    """Everything that determines an experiment (trunk) and the branch a command trains. The defaults
    are Table 1's for ResNet-20 on CIFAR-10; config_from_args fills in the row of --arch/--dataset."""
    arch: str = "resnet20"
    dataset: str = "cifar10"
    data_dir: str = "data"
    out_dir: str = "runs/resnet20_cifar10_imp"
    levels: int = PAPER["levels"]
    epochs: int = SCHEDULES["cifar10"]["epochs"]
    lr_drops: list = dataclasses.field(default_factory=lambda: list(SCHEDULES["cifar10"]["lr_drops"]))
    rewind_epoch: int = SCHEDULES["cifar10"]["rewind_epoch"]
    prune_rate: float = PAPER["prune_rate"]
    lr: float = SCHEDULES["cifar10"]["lr"]
    momentum: float = PAPER["momentum"]
    weight_decay: float = SCHEDULES["cifar10"]["weight_decay"]
    batch_size: int = SCHEDULES["cifar10"]["batch_size"]
    train_subset: int | None = None
    val_split: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "off"
    sync_bn: bool = False
    channels_last: bool = False
    compile: bool = False
    mask_source: str = "imp"
    synflow_rounds: int = SYNFLOW_ROUNDS
    method: str = "imp"
    init: str = "rewind"
    group_aware: bool = False
    refill_score: str = "l1"
    refill_extra: float = 0.1
    regroup_unit: str = "position"
    groups: int = 8
    row_multiple: int = 8
    min_col_nnz: int = 1
    min_block_cols: int = 8
    verbose: bool = False


TRUNK_KEYS = ("arch", "dataset", "seed", "epochs", "lr_drops", "rewind_epoch", "prune_rate", "lr", "momentum",
              "weight_decay", "batch_size", "train_subset", "val_split", "amp", "sync_bn", "mask_source")
SOURCE_KEYS = {"synflow": ("synflow_rounds",)}   # settings only one mask source has
RUN_ONLY = ("levels", "device", "out_dir", "data_dir", "verbose", "channels_last", "compile")  # may change


def trunk_config(cfg):
    """The settings that define the experiment's trunk (a changed one is a new experiment)."""
    keys = TRUNK_KEYS + SOURCE_KEYS.get(cfg.mask_source, ())
    return {k: getattr(cfg, k) for k in keys}


def branch_config(cfg):
    """The settings that define a branch: method, init, group-aware and the method's knobs."""
    return {"method": cfg.method, "init": cfg.init, "group_aware": cfg.group_aware,
            **{k: getattr(cfg, k) for k in BRANCH_KNOBS[cfg.method]}}


def check_config(path, settings, started):
    """Refuse settings that differ from the config.json at `path` once training has started there
    (before that, a corrected command simply replaces it)."""
    if not (started and os.path.exists(path)):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is corrupt; delete its folder or fix the file") from None
    changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
    if changed:
        raise UsageError(f"{os.path.dirname(path) or '.'} holds an experiment with other settings "
                         f"({'; '.join(changed)}); use the same flags to go on (only --levels may grow), "
                         "or another --out-dir")


# ---- the experiment: an unstructured trunk and structural branches ----
@dataclasses.dataclass(frozen=True)
class Run:
    """A chain of tickets in an experiment directory: the trunk (the mask source's unstructured
    tickets) or a branch (a post-processor and an initialization applied to each trunk level's mask)."""
    name: str           # "trunk", or the branch's directory name
    path: str           # the directory holding its level_NN/
    method: str         # POSTPROCESS key; "imp" (none) for the trunk
    init: str           # INITS key
    group_aware: bool   # prune the branch's own previous level instead of the trunk's (Alg. 4)


INITS = ("rewind", "reinit")  # a ticket's weights: theta_k * mask, or a fresh seeded init * mask


def trunk_run(cfg):
    return Run("trunk", cfg.out_dir, "imp", "rewind", False)


def branch_name(cfg):
    """Readable and unique: the method, each knob that differs from its default, the init, group-aware."""
    default = Config()
    parts = [cfg.method] + [f"{KNOB_LABELS[k]}-{getattr(cfg, k)}" for k in BRANCH_KNOBS[cfg.method]
                            if getattr(cfg, k) != getattr(default, k)]
    return "_".join(parts + ["reinit"] * (cfg.init == "reinit") + ["group-aware"] * cfg.group_aware)


def branch_run(cfg):
    """The branch a command trains; None for --method imp --init rewind (the trunk is that ticket)."""
    if cfg.method == "imp" and cfg.init == "rewind":
        return None
    name = branch_name(cfg)
    return Run(name, os.path.join(cfg.out_dir, name), cfg.method, cfg.init, cfg.group_aware)


def schedule(cfg, trunk, branch):
    """(run, level) in training order: branch level L right after trunk level L-1, so structural
    tickets come early; a group-aware branch is its own chain from the dense level 0."""
    order = [(trunk, 0)]
    for level in range(1, cfg.levels + 1):
        if branch is not None:
            order.append((branch, level))
        if branch is None or not branch.group_aware:
            order.append((trunk, level))
    return order


def ticket_path(run, level):
    return os.path.join(run.path, f"level_{level:02d}", "ticket.pt")


@dataclasses.dataclass
class Experiment:
    """What every step of an experiment reads: settings, the (reused) model and what trains it (net:
    DDP / compiled, sharing the model's parameters), data, device, log."""
    cfg: Config
    model: nn.Module
    net: nn.Module
    data: object
    device: str
    log: object = print


def init_path(cfg):
    return os.path.join(cfg.out_dir, "init.pt")


def rewind_state(exp):
    """theta_k: the full state at the end of epoch k of the dense level 0 (k = 0: the initialization)."""
    name = "init.pt" if exp.cfg.rewind_epoch == 0 else "rewind.pt"
    return load_file(os.path.join(exp.cfg.out_dir, name), "rewind state")


def fresh_init(exp, level):
    """A new seeded initialization of the same network: the paper's random tickets (Tables A3, A4)."""
    torch.manual_seed(exp.cfg.seed * 1_000_003 + level * 10_007 + REINIT)
    return model_zoo.MODELS[exp.cfg.arch](exp.data.num_classes).state_dict()


def score_batch(exp, level, stream):
    """One seeded training batch (the first of a draw no training epoch uses)."""
    g = epoch_generator(exp.cfg, level, stream, exp.device)
    return next(datasets.train_batches(exp.data, exp.cfg.batch_size, g))


def loaded(exp, state):
    """The experiment's model holding `state` (a scratch use: every level loads its own state)."""
    exp.model.load_state_dict(state)
    return exp.model


def level_density(cfg, level):
    """Target density of one-shot sources at a level: (1 - prune_rate)^level, IMP's compounding."""
    return (1.0 - cfg.prune_rate) ** level


# mask sources: (experiment, level) -> (trunk mask m_L, the state its weights come from)
def pruned_level(exp, run, level):
    """IMP's step on a finished ticket: run's level L-1 with prune_rate of its remaining weights removed
    by global magnitude. Returns (mask m_L, the state its weights come from)."""
    prev = load_ticket(ticket_path(run, level - 1), exp.model)
    weights = {n: prev["state_dict"][n] for n in prev["masks"]}
    return magnitude_prune(weights, prev["masks"], exp.cfg.prune_rate), prev["state_dict"]


def imp_source(exp, level):
    """IMP (Alg. 1): trunk level L-1, pruned."""
    return pruned_level(exp, trunk_run(exp.cfg), level)


def omp_source(exp, level):
    """OMP: one-shot global magnitude pruning of the trained dense network (level 0) to density 0.8^L."""
    dense = load_ticket(ticket_path(trunk_run(exp.cfg), 0), exp.model)
    scores = {n: dense["state_dict"][n].abs() for n in dense["masks"]}
    return prune_to_density(scores, level_density(exp.cfg, level)), dense["state_dict"]


def random_source(exp, level):
    """RP: uniformly random masks with OMP's layerwise densities at this level."""
    masks, state = omp_source(exp, level)
    g = torch.Generator().manual_seed(exp.cfg.seed * 1_000_003 + level * 10_007 + RANDOM_MASK)
    return random_masks(masks, g), state


def init_scores_source(criterion):
    """A pruning-at-initialization source: `criterion` scores theta_0 on one seeded training batch."""
    def source(exp, level):
        state = load_file(init_path(exp.cfg), "initialization")
        names = list(prunable_weights(exp.model))
        images, labels = score_batch(exp, 0, SCORE_BATCH)
        scores = criterion(loaded(exp, state), names, images, labels)
        return prune_to_density(scores, level_density(exp.cfg, level)), state
    return source


def synflow_source(exp, level):
    """SynFlow: data-free, iterative (--synflow-rounds) at theta_0, to density 0.8^L."""
    state = load_file(init_path(exp.cfg), "initialization")
    names = list(prunable_weights(exp.model))
    masks = synflow_masks(loaded(exp, state), names, level_density(exp.cfg, level), exp.cfg.synflow_rounds,
                          exp.data.image_shape)
    return masks, state


MASK_SOURCES = {
    "imp": imp_source,                            # iterative magnitude pruning (the paper's default)
    "omp": omp_source,                            # one-shot magnitude pruning
    "random": random_source,                      # random pruning at OMP's layer densities
    "snip": init_scores_source(snip_scores),      # Lee et al. 2019
    "grasp": init_scores_source(grasp_scores),    # Wang et al. 2020
    "synflow": synflow_source,                    # Tanaka et al. 2020
}


def group_aware_source(exp, run, level):
    """Group-aware IMP (App. A1, Alg. 4): prune the branch's own post-processed ticket of level L-1
    (level 0: the dense trunk) instead of the unstructured trunk's."""
    return pruned_level(exp, run if level > 1 else trunk_run(exp.cfg), level)


def branch_masks(exp, run, level):
    """A branch level's (masks, blocks, per-layer stats): the trunk's m_L (or, group-aware, the branch's
    own previous level pruned), post-processed; refill scores use the weights m_L was pruned from."""
    cfg = exp.cfg
    source = group_aware_source(exp, run, level) if run.group_aware else \
        MASK_SOURCES[cfg.mask_source](exp, level)
    masks, state = source
    weights = {n: state[n] for n in masks}
    feats = None
    if needs_feats(run.method, cfg.refill_score):
        images, labels = score_batch(exp, level, SCORE_BATCH)
        feats = conv_channel_stats(loaded(exp, state), list(masks), images, labels)
    knobs = {k: getattr(cfg, k) for k in BRANCH_KNOBS[run.method]}
    new, blocks = postprocess(run.method, weights, masks, feats, **knobs)
    stats = {n: layer_stats(masks[n], new[n], None if blocks is None else blocks[n]) for n in new}
    return new, blocks, stats


def start_level(exp, run, level):
    """The state a level starts from: (masks, blocks, per-layer stats, model state, first epoch).

    Level 0: the dense network at theta_0. Trunk level L: the mask source's m_L. Branch level L:
    branch_masks. Then rewind to theta_k and resume the schedule at epoch k, or (--init reinit) a fresh
    seeded initialization, an epoch-0 network that trains the whole schedule.
    """
    names = list(prunable_weights(exp.model))
    if level == 0:
        state = load_file(init_path(exp.cfg), "initialization")
        return ones_masks({n: state[n] for n in names}), None, None, state, 0
    if run.name == "trunk":
        masks, blocks, stats = MASK_SOURCES[exp.cfg.mask_source](exp, level)[0], None, None
    else:
        masks, blocks, stats = branch_masks(exp, run, level)
    if run.init == "rewind":
        return masks, blocks, stats, rewind_state(exp), exp.cfg.rewind_epoch
    return masks, blocks, stats, fresh_init(exp, level), 0


def train_level(exp, run, level, eta):
    """Train one level to the end of the schedule, with epoch checkpoints; write its ticket.

    Paper: Sec. 3.1, rewind and retrain; the final epoch's test accuracy is recorded (nothing is chosen
    on the test set). Official: restarts the LR schedule at epoch 0 after rewinding; we resume it at the
    rewind epoch (Frankle et al. 2020). An unfinished level resumes from its last epoch checkpoint.
    """
    cfg, model, device, log = exp.cfg, exp.model, exp.device, exp.log
    where = os.path.dirname(ticket_path(run, level))
    os.makedirs(where, exist_ok=True)
    ckpt_path = os.path.join(where, "checkpoint.pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=cfg.amp == "fp16")
    resume = os.path.exists(ckpt_path)
    if resume:
        ckpt = load_file(ckpt_path, "checkpoint")
        check_masks_fit(model, ckpt["masks"], "checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        masks, blocks, stats, epoch, seconds = (ckpt[k] for k in ("masks", "blocks", "stats", "epoch", "seconds"))
        loss, accs = ckpt["loss"], ckpt["accs"]
        log(f"{run.name} level {level}: resuming at epoch {epoch} from {ckpt_path}")
    else:
        masks, blocks, stats, state, epoch = start_level(exp, run, level)
        seconds = 0.0
    masks = {n: m.to(device) for n, m in masks.items()}
    check_same_on_every_rank(masks, device)
    dens, step_masks = density(masks), training_masks(model, masks, run.method)
    if not resume:
        rewind(model, state, step_masks)
    splits = ("test", "val") if cfg.val_split else ("test",)
    while epoch < cfg.epochs:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        loss, train_acc = train_epoch(exp.net, exp.data, optimizer, mask_pairs(model, step_masks), cfg,
                                      epoch_generator(cfg, level, epoch, device), scaler)
        accs = {split: evaluate(model, exp.data, cfg, split) for split in splits}
        epoch += 1
        if level == 0 and epoch == cfg.rewind_epoch:
            atomic_save(model.state_dict(), os.path.join(cfg.out_dir, "rewind.pt"))
        dt = time.perf_counter() - t0
        seconds += dt
        atomic_save(dict(level=level, epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scaler=scaler.state_dict(), masks=masks, blocks=blocks, stats=stats, seconds=seconds,
                         loss=loss, accs=accs), ckpt_path)
        val = f" val {accs['val']:.4f}" if cfg.val_split else ""
        log(f"{run.name} level {level:2d} epoch {epoch:3d}/{cfg.epochs} loss {loss:.4f} train "
            f"{train_acc:.4f} test {accs['test']:.4f}{val} density {dens:.4f} {dt:6.1f}s ETA {eta.update(dt)}")
    metrics = level_metrics(exp, run, level, masks, blocks, stats, accs, loss, seconds)
    ticket = dict(level=level, masks={n: m.cpu() for n, m in masks.items()}, blocks=blocks,
                  state_dict={k: v.cpu() for k, v in model.state_dict().items()}, metrics=metrics,
                  layer_stats=stats, config={**dataclasses.asdict(cfg), "method": run.method, "init": run.init,
                                             "group_aware": run.group_aware, "branch": run.name},
                  num_classes=exp.data.num_classes)
    atomic_save(ticket, ticket_path(run, level))
    if stats:
        write_csv([dict(name=n, **s) for n, s in stats.items()], os.path.join(where, "layers.csv"))
        if cfg.verbose:
            log(markdown_table([dict(name=n, **s) for n, s in stats.items()]))
    if process_group()[0] == 0:
        os.remove(ckpt_path)
    barrier()                                  # the next level reads this ticket on every rank
    return metrics


def open_experiment(cfg, log=print):
    """Check the settings against the experiment directory, load the data, build the model, then (only
    now: a failed start leaves nothing behind) write the configs and theta_0. Returns (experiment,
    trunk, branch or None). Under torchrun every process opens it; rank 0 writes."""
    device = init_distributed(resolve_device(cfg.device))
    log = log if process_group()[0] == 0 else (lambda *_: None)   # one copy of every line
    check_training_flags(cfg, device)
    trunk, branch = trunk_run(cfg), branch_run(cfg)
    started = os.path.isdir(os.path.join(cfg.out_dir, "level_00"))
    check_config(os.path.join(cfg.out_dir, "config.json"), trunk_config(cfg), started)
    if branch is not None:
        check_config(os.path.join(branch.path, "branch.json"), branch_config(cfg),
                     os.path.exists(os.path.join(branch.path, "level_01")))
    data = datasets.load_dataset(cfg.dataset, cfg.data_dir, device, cfg.train_subset, cfg.seed, log=log,
                                 val_split=cfg.val_split)
    torch.manual_seed(cfg.seed)
    model = model_zoo.MODELS[cfg.arch](data.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    os.makedirs(cfg.out_dir, exist_ok=True)
    record = {**trunk_config(cfg), **{k: getattr(cfg, k) for k in RUN_ONLY}, "processes": process_group()[1]}
    atomic_write_text(json.dumps(record, indent=1), os.path.join(cfg.out_dir, "config.json"))
    if not started:                            # theta_0 of these settings (arch, seed, classes)
        atomic_save(model.state_dict(), init_path(cfg))
    if branch is not None:
        os.makedirs(branch.path, exist_ok=True)
        atomic_write_text(json.dumps(branch_config(cfg), indent=1), os.path.join(branch.path, "branch.json"))
    barrier()                                  # every rank reads theta_0 from init.pt
    net = training_net(model, cfg, device)
    return Experiment(cfg, model, net, data, device, log), trunk, branch


def check_training_flags(cfg, device):
    """Refuse combinations that cannot run here, with the fix."""
    cuda = torch.device(device).type == "cuda"
    if cfg.amp == "fp16" and not cuda:
        raise UsageError("--amp fp16 needs a CUDA GPU (its loss scaling is for GPUs); use --amp bf16 on the CPU")
    if cfg.sync_bn and process_group()[1] == 1:
        raise UsageError("--sync-bn synchronizes BatchNorm across processes: launch with torchrun "
                         "--nproc_per_node N (N > 1), or drop it")
    if cfg.sync_bn and not cuda:
        raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); drop it on the CPU")


def run_experiment(cfg, log=print):
    """One trunk and (per --method/--init) one branch: train whatever is missing, reuse the rest.

    Paper: Sec. 3.1-3.2 with Alg. 1-3: trunk level 0 is the dense network, trunk level L the mask
    source's unstructured ticket (IMP: level L-1 pruned by 20%), branch level L that mask refilled or
    regrouped, rewound (or re-initialized) and retrained. Writes each run's results, the experiment's
    combined results.csv, and returns the combined rows.
    """
    exp, trunk, branch = open_experiment(cfg, log)
    log = exp.log
    log(settings_line(cfg))
    order = schedule(cfg, trunk, branch)
    todo = [(run, level) for run, level in order if not os.path.exists(ticket_path(run, level))]
    eta = Eta(sum(cfg.epochs - (0 if level == 0 or run.init == "reinit" else cfg.rewind_epoch)
                  for run, level in todo))
    for run, level in order:
        if (run, level) not in todo:
            log(f"{run.name} level {level}: finished earlier, reused ({ticket_path(run, level)})")
            continue
        log(summary_line(train_level(exp, run, level, eta)))
        write_results(cfg.out_dir)
    rows = write_results(cfg.out_dir)
    log("\n" + markdown_table(rows))
    return rows


def settings_line(cfg):
    """The schedule in one line, so a log says what ran (defaults: Table 1's row for arch/dataset)."""
    return (f"settings: {cfg.arch} on {cfg.dataset}, {cfg.levels} levels of {cfg.epochs} epochs, lr {cfg.lr} "
            f"(x0.1 at {', '.join(map(str, cfg.lr_drops)) or 'never'}), batch {cfg.batch_size}"
            f"{f' over {process_group()[1]} processes' if process_group()[1] > 1 else ''}, weight decay "
            f"{cfg.weight_decay}, rewind to epoch {cfg.rewind_epoch}, prune {cfg.prune_rate:.0%} per level, "
            f"mask source {cfg.mask_source}, amp {cfg.amp}")


# ---- results: one row per ticket, per run and for the whole experiment ----
class Eta:
    """Remaining time of this command from the mean epoch time seen so far."""

    def __init__(self, epochs_left):
        self.left, self.seconds, self.epochs = epochs_left, 0.0, 0

    def update(self, dt):
        self.seconds, self.epochs, self.left = self.seconds + dt, self.epochs + 1, self.left - 1
        s = int(max(0, self.left) * self.seconds / self.epochs)
        return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def level_metrics(exp, run, level, masks, blocks, stats, accs, loss, seconds):
    """One result row: which ticket (run, source, method, init, level), its accuracy and the structure
    of its mask (density over the prunable weights, kept channels, blocks, coverage, FLOP ratio)."""
    rows = sum(m.shape[0] for m in masks.values())
    kept_rows = sum(int((m.reshape(m.shape[0], -1).sum(1) > 0).sum()) for m in masks.values())
    row = dict(branch=run.name, source=exp.cfg.mask_source,
               method=exp.cfg.mask_source if run.name == "trunk" else run.method, init=run.init,
               level=level, density=round(density(masks), 6), test_acc=round(accs["test"], 6),
               val_acc=round(accs["val"], 6) if "val" in accs else "", train_loss=round(loss, 6),
               seconds=round(seconds, 1),
               channel_density=round(kept_rows / rows, 6), blocks="", coverage="", flop_ratio="")
    if stats:
        row["coverage"] = round(float(np.mean([s["coverage"] for s in stats.values()])), 6)
    if blocks is not None:                     # the layers' FLOP ratios, weighted by their weights
        ratio = sum(kernels.flop_ratio(tuple(m.shape), blocks[n]) * m.numel() for n, m in masks.items())
        row.update(blocks=sum(len(b) for b in blocks.values()),
                   flop_ratio=round(ratio / sum(m.numel() for m in masks.values()), 6))
    return row


def finished_tickets(path):
    """The ticket.pt of every finished level of the run in `path`, by level."""
    levels = sorted(d for d in os.listdir(path) if d.startswith("level_")) if os.path.isdir(path) else []
    return [t for t in (os.path.join(path, d, "ticket.pt") for d in levels) if os.path.exists(t)]


def branch_dirs(exp_dir):
    """Names of the experiment's branch directories (those holding a branch.json), sorted."""
    return sorted(d for d in os.listdir(exp_dir) if os.path.exists(os.path.join(exp_dir, d, "branch.json")))


def run_rows(path):
    """The result rows of the finished levels of the run in `path` (tickets mapped, not read)."""
    return [load_ticket(t, mmap=True)["metrics"] for t in finished_tickets(path)]


def write_results(exp_dir):
    """results.json/csv per branch and, combined with the trunk's rows, for the experiment. Returns
    the combined rows (trunk first, then branches by name; by level within a run)."""
    branches = branch_dirs(exp_dir)
    rows = run_rows(exp_dir)
    for name in branches:
        branch_rows = run_rows(os.path.join(exp_dir, name))
        if branch_rows:
            write_table(branch_rows, os.path.join(exp_dir, name, "results"))
        rows += branch_rows
    if rows:
        write_table(rows, os.path.join(exp_dir, "results"))
    return rows


def summary_line(row):
    extra = "".join(f" {k} {row[k]}" for k in ("channel_density", "blocks", "coverage", "flop_ratio")
                    if row[k] != "")
    return (f"== {row['branch']} level {row['level']} done: density {row['density']:.4f} test_acc "
            f"{row['test_acc']:.4f} train_loss {row['train_loss']:.4f} {row['seconds']:.0f}s{extra}")


def markdown_table(rows):
    """A list of dicts with the same keys as a markdown table (floats to 4 decimals)."""
    keys = list(rows[0])
    fmt = lambda v: str(v) if not isinstance(v, float) else f"{v:.1e}" if 0 < abs(v) < 1e-3 else \
        f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}".rstrip("0").rstrip(".")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows, path):
    """Rows (dicts) to CSV, atomically (rank 0 only, as atomic_save)."""
    if process_group()[0] != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_table(rows, stem):
    """stem.json and stem.csv, atomically."""
    atomic_write_text(json.dumps(rows, indent=1), f"{stem}.json")
    write_csv(rows, f"{stem}.csv")


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


# ---- slim export: a channel-wise ticket as a smaller dense network ----
def kept_dead_rows(model, masks):
    """Output channels whose conv row is pruned but whose BN scale or shift is not 0: they still feed
    relu(BN shift) to the next layer, so slim_model keeps them (tickets trained without BN masks)."""
    modules, pairs, kept = dict(model.named_modules()), model_zoo.conv_bn_pairs(model), 0
    for name, mask in masks.items():
        bn = modules[pairs[name]]
        dead = mask.reshape(mask.shape[0], -1).sum(1) == 0
        kept += int((dead & ((bn.weight != 0) | (bn.bias != 0))).sum())
    return kept


def export_slim(args, log=print):
    """--export PATH: the ticket (--ticket, or --out-dir with --method) without its dead channels, saved as
    models.slim_state (arch, widths, state_dict: loads with models.load_slim, no masks needed).

    Paper: A2, refill's FLOPs count the trimmed input and output channels. The slim network's outputs
    are checked against the masked ticket's on a random batch before saving."""
    path, ticket = find_bench_ticket(args)
    arch, num_classes = ticket["config"]["arch"], ticket["num_classes"]
    model = model_zoo.MODELS[arch](num_classes)
    check_masks_fit(model, ticket["masks"], "ticket")
    model.load_state_dict(ticket["state_dict"])
    model.eval()
    slim = model_zoo.slim_model(model, ticket["masks"]).eval()
    kept = kept_dead_rows(model, ticket["masks"])
    if kept:
        print(f"WARNING: {kept} pruned output channels keep a BN scale or shift (ticket trained without BN "
              "masks): they stay in the slim network", file=sys.stderr)
    shape = datasets.IMAGE_SHAPES[ticket["config"].get("dataset", "cifar10")]
    x = torch.randn(EXPORT_CHECK_BATCH, *shape)
    with torch.no_grad():
        err = kernels.rel_err(slim(x), model(x), centered=True)
    atomic_save(model_zoo.slim_state(slim, arch, num_classes), args.export)
    row = dict(ticket=path, params=model_zoo.count_params(model), params_slim=model_zoo.count_params(slim),
               macs=model_zoo.count_macs(model, shape), macs_slim=model_zoo.count_macs(slim, shape),
               max_rel_err=err, wrote=args.export)
    log(markdown_table([row]))
    return row


# ---- benchmarks (python lth_ref.py --bench [kernels|paper|regroup|train]) ----
BENCH_TRAIN_DENSITY = 0.2   # the benchmarked ticket keeps 20% of the prunable weights (7 IMP levels)
BENCH_TRAIN_WARMUP = 3      # untimed rounds first: allocator, oneDNN/cuDNN setup (and compilation)


def bench_train(args, log=print):
    """Training throughput (images/s) of lth_ref's step next to a plain PyTorch step, same run.

    Three steps interleaved on the same random batch (drift hits all alike), each with its own copy of
    the --arch model and optimizer and the same --amp / --channels-last / --compile / --batch-size:
    ours = train_step with the masks of a BENCH_TRAIN_DENSITY ticket, ours without masks, and a plain
    loop (forward, mean cross-entropy, backward, step). The masking alone (weight *= mask) is timed too.
    The classifier has 10 outputs whatever the dataset (its width barely changes a step).
    """
    cfg = config_from_args(args)
    device = resolve_device(cfg.device)
    check_training_flags(cfg, device)
    shape = datasets.IMAGE_SHAPES[cfg.dataset]
    torch.manual_seed(cfg.seed)
    model = model_zoo.MODELS[cfg.arch](10).to(device)
    masks = prune_to_density({n: w.detach().abs() for n, w in prunable_weights(model).items()},
                             BENCH_TRAIN_DENSITY)
    apply_masks(model, masks)
    x = torch.randn(cfg.batch_size, *shape, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    steps, pairs = {}, None
    for name in ("ours", "ours_unmasked", "plain"):
        m = copy.deepcopy(model).to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        net, opt = torch.compile(m) if cfg.compile else m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(torch.device(device).type, enabled=cfg.amp == "fp16")
        if name == "plain":
            steps[name] = functools.partial(plain_train_step, net, opt, x, y, cfg, scaler)
        else:
            step_pairs = mask_pairs(m, masks) if name == "ours" else []
            pairs = step_pairs or pairs
            steps[name] = functools.partial(train_step, net, opt, step_pairs, x, y, len(y), cfg, scaler)

    @torch.no_grad()
    def masking():
        for p, mask in pairs:
            p.mul_(mask)
    steps["masking"] = masking
    ms = dict(zip(steps, kernels.time_interleaved(list(steps.values()), torch.device(device), args.bench_repeats,
                                                  warmup=BENCH_TRAIN_WARMUP)))
    ips = {k: cfg.batch_size / (ms[k] / 1e3) for k in ("ours", "ours_unmasked", "plain")}
    row = dict(arch=cfg.arch, device=device_name(device), batch=cfg.batch_size, amp=cfg.amp,
               channels_last=cfg.channels_last, compile=cfg.compile, steps=args.bench_repeats,
               img_s_ours=round(ips["ours"], 1), img_s_unmasked=round(ips["ours_unmasked"], 1),
               img_s_plain=round(ips["plain"], 1), ours_vs_plain=round(ips["ours"] / ips["plain"], 3),
               masked_vs_unmasked=round(ips["ours"] / ips["ours_unmasked"], 3),
               ms_masking=round(ms["masking"], 3), masking_pct_of_step=round(100 * ms["masking"] / ms["ours"], 2))
    log(markdown_table([row]))
    return row


def plain_train_step(net, optimizer, x, y, cfg, scaler):
    """The step of a plain PyTorch loop, for comparison: same settings, no masks, mean loss."""
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(cfg, x.device):
        loss = F.cross_entropy(net(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def partition_coverage(mask2d, parts, unit=1):
    """Coverage of the blocks that `parts` (row index arrays) get under regroup's column rule."""
    units = mask2d.cpu().numpy().reshape(mask2d.shape[0], -1, unit).sum(2)
    found = choose_block_columns(units, parts, unit, float(mask2d.sum()), 1, 1)
    blocks = [(torch.from_numpy(r), torch.from_numpy((c[:, None] * unit + np.arange(unit)).ravel()))
              for r, c in found]
    return layer_stats(mask2d, kernels.block_mask(tuple(mask2d.shape), blocks), blocks)["coverage"]


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
        new, blocks = regroup_mask(mask.cpu(), args.regroup_unit, groups=args.groups, row_multiple=args.row_multiple,
                                   min_col_nnz=args.min_col_nnz, min_block_cols=args.min_block_cols)
        seconds = time.perf_counter() - t0
        new = new.reshape(m2.shape)
        size = max(len(r) for r, _ in blocks)
        nonempty = np.flatnonzero(m2.sum(1).numpy() > 0)
        chunks = lambda order: [np.sort(order[i:i + size]) for i in range(0, len(order), size)]
        by_nnz = nonempty[np.argsort(-m2[nonempty].sum(1).numpy(), kind="stable")]
        official = [(torch.from_numpy(r), torch.from_numpy(c))
                    for r, c in official_width_blocks(m2, [b[0].numpy() for b in blocks])]
        official_stats = layer_stats(m2, kernels.block_mask(tuple(m2.shape), official), official)
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
    """(path, ticket) to benchmark: --ticket, else the last finished level, in the experiment
    --out-dir, of the run that --method/--init and the knobs name (the trunk for imp)."""
    path = args.ticket
    if path is None and args.out_dir and os.path.isdir(args.out_dir):
        cfg = config_from_args(args)
        run = branch_run(cfg) or trunk_run(cfg)
        tickets = finished_tickets(run.path)
        if not tickets:
            branches = branch_dirs(cfg.out_dir)
            raise UsageError(f"{args.out_dir} has no finished level of the {run.name} (branches here: "
                             f"{branches or 'none'}); name one with --method and its knobs, or pass --ticket")
        path = tickets[-1]
    if path is None:
        if required:
            raise UsageError("no ticket to benchmark or export: pass --ticket PATH, or --out-dir of an experiment "
                             "with at least one finished level (and --method for a branch)")
        return None, None
    return path, load_ticket(path)


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
    shape = datasets.IMAGE_SHAPES[ticket["config"].get("dataset", "cifar10")]
    fmt = args.bench_memory_format
    if fmt == "auto":
        fmt = faster_memory_format(kernels.masked_model(model, blocks), shape, args.bench_batch[0], device, log)
    memory_format = kernels.MEMORY_FORMATS[fmt]
    report = dict(ticket=path, arch=ticket["config"]["arch"], method=ticket["config"]["method"],
                  level=ticket["level"], device=device_name(device), memory_format=fmt, torch=torch.__version__,
                  threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
                  setting="paper (batch 64, 127x127, conv only)" if paper else "cifar", runs=[])
    for batch in ([64] if paper else args.bench_batch):
        layers = kernels.bench_layers(model, blocks, batch, device, paper_setting=paper, repeats=args.bench_repeats,
                                      input_size=shape, memory_format=memory_format)
        log(f"\nper layer, batch {batch}, {report['device']}, {fmt}, median of {args.bench_repeats}:")
        log(markdown_table([{k: fmt_cell(v) for k, v in row.items()} for row in layers]))
        run = dict(batch=batch, layers=layers)
        if not paper:
            run["model"] = kernels.bench_model(model, blocks, batch, device, args.bench_repeats, input_size=shape,
                                               memory_format=memory_format)
            run["slim"] = bench_slim(model, ticket["masks"], batch, device, args.bench_repeats, shape, memory_format)
            log(markdown_table([{k: fmt_cell(v) for k, v in run["model"].items()}]))
            log("the ticket without its dead channels (slim_model), end to end:")
            log(markdown_table([run["slim"]]))
        report["runs"].append(run)
    out = os.path.join(os.path.dirname(path), "bench.json")
    atomic_write_text(json.dumps(report, indent=1, default=str), out)
    log(f"wrote {out}")
    return report


def bench_slim(model, masks, batch_size, device, repeats, input_size=INPUT_SHAPE,
               memory_format=torch.contiguous_format):
    """End to end (eval, no_grad): the masked dense ticket vs the same ticket without its dead channels
    (models.slim_model, stock convs), interleaved on one input; outputs checked first. Dead rows' BN
    scale and shift are zeroed as training leaves them (a fresh --bench-density ticket has not trained)."""
    device = torch.device(device)
    ticket = copy.deepcopy(model).eval()
    apply_masks(ticket, {**masks, **model_zoo.bn_masks(ticket, masks)})
    slim = model_zoo.slim_model(ticket, masks).eval()
    macs = model_zoo.count_macs(ticket, input_size), model_zoo.count_macs(slim, input_size)
    ticket, slim = (m.to(device, memory_format=memory_format) for m in (ticket, slim))
    x = torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=memory_format)
    with torch.no_grad():
        err = kernels.rel_err(slim(x), ticket(x), centered=True)
        dense_ms, slim_ms = kernels.time_interleaved([lambda: ticket(x), lambda: slim(x)], device, repeats,
                                                     warmup=BENCH_TRAIN_WARMUP)
    return dict(params=model_zoo.count_params(ticket), params_slim=model_zoo.count_params(slim),
                mac_ratio=round(macs[1] / macs[0], 4), ideal_speedup=round(macs[0] / macs[1], 3),
                dense_ms=round(dense_ms, 2), slim_ms=round(slim_ms, 2), speedup=round(dense_ms / slim_ms, 3),
                max_rel_err=err)


FORMAT_PROBE_RUNS = 5  # timed forwards per memory format when --bench-memory-format auto measures them


def faster_memory_format(model, shape, batch_size, device, log=print):
    """The memory format (kernels.MEMORY_FORMATS key) in which the dense model runs a batch faster on this
    machine, measured (which one wins depends on the CPU or GPU and its oneDNN / cuDNN kernels), so the
    grouped GEMM is compared with the faster dense network."""
    x = torch.randn(batch_size, *shape, device=device)
    runs = {}
    for name, memory_format in kernels.MEMORY_FORMATS.items():
        m = copy.deepcopy(model).to(device, memory_format=memory_format).eval()
        xf = x.contiguous(memory_format=memory_format)
        runs[name] = lambda m=m, xf=xf: m(xf)
    with torch.no_grad():
        ms = dict(zip(runs, kernels.time_interleaved(list(runs.values()), torch.device(device), FORMAT_PROBE_RUNS,
                                                     warmup=1)))
    best = min(ms, key=ms.get)
    log(f"memory format: {best} (dense forward {', '.join(f'{k} {v:.1f} ms' for k, v in ms.items())})")
    return best


def fresh_ticket(args):
    """(bench.json path, ticket) for --bench-density: a seeded, untrained --arch pruned by global
    magnitude to that density in one step and post-processed by --method with the CLI's knobs."""
    need = 0.0 < args.bench_density <= 1.0 and args.method != "imp"
    if not need:
        raise UsageError("--bench-density needs a density in (0, 1] and --method refill, refill+ "
                         "or regroup (an unstructured imp mask has no blocks)")
    torch.manual_seed(args.seed)
    model, shape = model_zoo.MODELS[args.arch](10), datasets.IMAGE_SHAPES[args.dataset]
    weights = prunable_weights(model)
    masks = prune_to_density({n: w.detach().abs() for n, w in weights.items()}, args.bench_density)
    feats = None
    if needs_feats(args.method, args.refill_score):        # an untrained model: a random batch will do
        calibrate_batchnorm(model, shape)
        feats = conv_channel_stats(model, list(weights), torch.randn(64, *shape), torch.randint(0, 10, (64,)))
    knobs = {k: getattr(args, k) for k in BRANCH_KNOBS[args.method]}
    masks, blocks = postprocess(args.method, {n: w.detach() for n, w in weights.items()}, masks, feats, **knobs)
    apply_masks(model, masks)
    calibrate_batchnorm(model, shape)
    out_dir = args.out_dir or os.path.join("runs", f"bench_{args.arch}_{args.method}")
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, "ticket.pt"), dict(
        config=dict(arch=args.arch, dataset=args.dataset, method=args.method), level=None, num_classes=10, masks=masks,
        blocks=blocks, state_dict=model.state_dict())


@torch.no_grad()
def calibrate_batchnorm(model, shape=INPUT_SHAPE, batches=4, batch_size=64):
    """Set BN running stats from random batches of `shape` images, so an untrained sparse network passes a
    signal of normal scale (without it, the logits of a 10%-dense VGG-16 at init are just the FC
    bias, and the end-to-end output check compares constants)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                                    # cumulative average over the batches
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, *shape))
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
           "train": bench_train}


# ---- report: the paper's tables and figures from experiment directories ----
FIG_DPI = 100                   # dots per inch of every PNG: readable labels, files of tens of KB
ACCURACY_FIGSIZE = (6.4, 4.0)   # inches: 640x400 px
SPEEDUP_FIGSIZE = (8.0, 4.0)    # inches: 800x400 px, one bar group per conv layer
MASK_PANEL_INCHES = 2.4         # width and height of one mask panel (240 px)
MASK_TITLE_INCHES = 0.6         # room above the panels for the titles
MASK_MAX_CELLS = int(MASK_PANEL_INCHES * FIG_DPI)  # displayed cells per mask axis: about one per pixel
REPORT_LAYERS = 3               # default mask pictures: the last three convs, as the paper's Fig. A9
NO_MATPLOTLIB = ("WARNING: matplotlib is not installed: writing report.md and the CSVs without pictures "
                 "(pip install matplotlib to get the PNGs)")
REPORT_NUMBERS = ("density", "test_acc", "flop_ratio", "blocks", "coverage")  # averaged over seeds


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_experiment(path):
    """An experiment directory as data: {path, config, rows, runs {branch: its directory}}.

    Rows come from results.json. A directory of the single-run layout (rows without `branch`, config.json
    with a `method`) reads as one run named by its method.
    """
    files = [os.path.join(path, f) for f in ("config.json", "results.json")]
    if not all(os.path.exists(f) for f in files):
        raise UsageError(f"{path} is not an experiment directory: it lacks config.json or results.json "
                         "(--report reads the --out-dir of a training run; results.json appears when its "
                         "first level has finished)")
    try:
        config, rows = [read_json(f) for f in files]
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path}: config.json or results.json is corrupt; run the training command "
                         "again to rewrite results.json") from None
    method = config.get("method", "imp")
    defaults = dict(branch=method, source=config.get("mask_source", "imp"), method=method,
                    init=config.get("init", "rewind"))
    rows = [{**defaults, **r} for r in rows]
    runs = {}
    for branch in dict.fromkeys(r["branch"] for r in rows):
        sub = os.path.join(path, branch)
        runs[branch] = sub if branch != "trunk" and os.path.isdir(sub) else path
    return dict(path=path, config=config, rows=rows, runs=runs)


def group_seeds(experiments):
    """Experiments whose config.json differ only in `seed` (or in settings a later command may change,
    like --levels) as groups, in first-seen order; within a group by seed."""
    groups = {}
    for e in experiments:
        key = json.dumps({k: v for k, v in e["config"].items() if k not in ("seed", *RUN_ONLY)}, sort_keys=True)
        groups.setdefault(key, []).append(e)
    return [sorted(g, key=lambda e: e["config"].get("seed", 0)) for g in groups.values()]


def combine_seeds(row_lists):
    """One row per (branch, level) over several seeds' result rows: the mean of each number, the test
    accuracy's min and max, the sparsity (% of the prunable weights) and how many seeds reached it."""
    cells = {}
    for rows in row_lists:
        for r in rows:
            cells.setdefault((r["branch"], r["level"]), []).append(r)
    out = []
    for (branch, level), rs in cells.items():
        mean = {k: round(float(np.mean(v)), 6) if (v := [r[k] for r in rs if r.get(k, "") != ""]) else ""
                for k in REPORT_NUMBERS}
        if mean["blocks"] != "" and float(mean["blocks"]).is_integer():
            mean["blocks"] = int(mean["blocks"])              # a count, unless seeds differ
        accs = [r["test_acc"] for r in rs]
        out.append(dict(source=rs[0]["source"], branch=branch, method=rs[0]["method"], init=rs[0]["init"],
                        level=level, seeds=len(rs), **mean, sparsity=round(100 * (1 - mean["density"]), 4),
                        acc_min=min(accs), acc_max=max(accs)))
    return sorted(out, key=lambda r: (r["branch"] != "trunk", r["branch"], r["level"]))


def dense_accuracy(rows):
    """The dense network's test accuracy: the level-0 row's (None while level 0 is unfinished)."""
    return next((r["test_acc"] for r in rows if r["level"] == 0), None)


def extreme_ticket(rows, dense_acc):
    """The extreme winning ticket of one run: its sparsest pruned level (level >= 1) whose test accuracy
    is at least the dense accuracy; None when no level qualifies (or dense_acc is None).

    Paper: Sec. 4, the extreme sparsity of a method's winning tickets (the highest sparsity at which
    its ticket still reaches the dense network's accuracy); Official: no counterpart (read off the
    curves). Accuracies compare as recorded, with no tolerance (equal counts as a match). Ties at the
    same density: the higher accuracy, then the lower level. With several seeds pass combine_seeds'
    rows (mean accuracy) and the mean dense accuracy. rows: dicts with level, density, test_acc.
    """
    if dense_acc is None:
        return None
    wins = [r for r in rows if r["level"] >= 1 and r["test_acc"] >= dense_acc]
    return min(wins, key=lambda r: (r["density"], -r["test_acc"], r["level"]), default=None)


def _number(d, key):
    """d[key] as a float, NaN when absent or not a number (bench.json is read defensively)."""
    v = d.get(key) if isinstance(d, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def bench_layers_of(run):
    """A bench.json run's layers as plain numbers: name, flop_ratio, ideal 1/flop_ratio, dense_ms,
    regrouped_ms, speedup (dense_ms / regrouped_ms where the file leaves it out), path."""
    out = []
    for layer in run.get("layers") or []:
        ratio, dense_ms, sparse_ms = (_number(layer, k) for k in ("flop_ratio", "dense_ms", "regrouped_ms"))
        speedup = _number(layer, "speedup")
        if speedup != speedup and sparse_ms > 0:                 # NaN: not in the file
            speedup = dense_ms / sparse_ms
        out.append(dict(name=str(layer.get("name", "?")), flop_ratio=ratio,
                        ideal=1 / ratio if ratio > 0 else float("nan"), dense_ms=dense_ms,
                        regrouped_ms=sparse_ms, speedup=speedup, path=str(layer.get("path", ""))))
    return out


def bench_saving(bench):
    """Running-time saving 1 - t_sparse / t_dense of a bench.json's first batch: over its conv layers
    (the paper's profiling, conv only) and end to end where measured (NaN where absent).
    Returns dict(conv, end_to_end, batch, device, date)."""
    run = next(iter(bench.get("runs") or []), {}) if isinstance(bench, dict) else {}
    layers = bench_layers_of(run)
    dense, sparse = sum(l["dense_ms"] for l in layers), sum(l["regrouped_ms"] for l in layers)
    model = run.get("model") or {}
    saving = lambda d, s: 1 - s / d if d > 0 else float("nan")
    return dict(conv=saving(dense, sparse) if layers else float("nan"),
                end_to_end=saving(_number(model, "dense_ms"), _number(model, "regrouped_ms")),
                batch=run.get("batch"), device=bench.get("device", "?"), date=bench.get("date", "?"))


def block_order(blocks, out_rows, k):
    """Row and column orders that draw a regroup mask's blocks as rectangles: mask2d[rows][:, cols].

    Rows: each block's rows together (widest block first), then the rows in no block. Columns: sorted
    by the set of blocks that use them, in reflected Gray-code order (widest block the most significant),
    which makes every block's columns contiguous when the blocks' column sets are disjoint or nested,
    and always the two widest blocks'. Blocks that share only some of their columns (regroup's usual
    case) cannot all be contiguous in any one column order; those come out in a few pieces each.
    blocks: [(rows, cols)] index tensors or arrays of an (out_rows, k) mask. Returns two int64 arrays.
    """
    order = sorted(range(len(blocks)), key=lambda b: -len(blocks[b][1]))
    member = np.zeros((len(blocks), k), dtype=np.int64)          # (B, K): block b uses column j
    for i, b in enumerate(order):
        member[i, np.asarray(blocks[b][1], dtype=np.int64)] = 1
    binary = np.cumsum(member, axis=0) % 2                        # Gray code -> binary: prefix XOR
    cols = np.lexsort(1 - binary[::-1]) if len(blocks) else np.arange(k)  # descending, stable
    rows = [np.sort(np.asarray(blocks[b][0], dtype=np.int64)) for b in order]
    in_block = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return np.concatenate([in_block, np.setdiff1d(np.arange(out_rows), in_block)]), cols.astype(np.int64)


def display_mask(mask2d, max_cells=MASK_MAX_CELLS):
    """An (O, K) 0/1 mask as at most max_cells x max_cells kept fractions: each displayed cell is the mean
    of a ceil(O / max_cells) x ceil(K / max_cells) tile (a 512x4608 mask shows as 171x231), so a large
    layer stays a small picture and no kept weight vanishes, as it would by subsampling."""
    m = np.asarray(mask2d, dtype=np.float32)
    starts = [np.arange(0, n, ceil_div(n, max_cells)) for n in m.shape]
    sums = np.add.reduceat(np.add.reduceat(m, starts[0], axis=0), starts[1], axis=1)
    counts = [np.diff(np.append(s, n)) for s, n in zip(starts, m.shape)]
    return sums / np.outer(*counts)


def _figure(figsize):
    """A matplotlib Figure on the headless Agg canvas (no pyplot state); ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    return fig


def line_label(row):
    """A curve's name: the mask source, and the branch that post-processes it."""
    return f"{row['source']} (unstructured)" if row["branch"] == "trunk" else f"{row['source']} + {row['branch']}"


def accuracy_figure(rows, dense_acc, title=""):
    """Test accuracy against sparsity (the paper's Figs. 3-6): one line per (mask source, branch) of
    combine_seeds' rows, a min-max band where several seeds ran, the dense accuracy as a dashed line."""
    fig = _figure(ACCURACY_FIGSIZE)
    ax = fig.add_subplot()
    for label in dict.fromkeys(map(line_label, rows)):
        line = sorted((r for r in rows if line_label(r) == label), key=lambda r: r["level"])
        x = [r["sparsity"] for r in line]
        drawn = ax.plot(x, [100 * r["test_acc"] for r in line], marker="o", markersize=3, label=label)
        if any(r["seeds"] > 1 for r in line):
            ax.fill_between(x, [100 * r["acc_min"] for r in line], [100 * r["acc_max"] for r in line],
                            color=drawn[0].get_color(), alpha=0.2, linewidth=0)
    if dense_acc is not None:
        ax.axhline(100 * dense_acc, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set(xlabel="sparsity of the prunable weights (%)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def layer_speedup_figure(bench, title=""):
    """Measured speedup over dense per conv layer next to the ideal 1 / FLOP ratio (the paper's Fig. 7):
    one bar per layer and batch of a bench.json, dense = 1; device and date in the title."""
    runs = [(run.get("batch"), bench_layers_of(run)) for run in bench.get("runs") or [] if run.get("layers")]
    names = [l["name"] for l in runs[0][1]] if runs else []
    fig = _figure(SPEEDUP_FIGSIZE)
    ax = fig.add_subplot()
    x, width = np.arange(len(names)), 0.8 / max(1, len(runs))
    for i, (batch, layers) in enumerate(runs):
        speed = {l["name"]: l["speedup"] for l in layers}
        ax.bar(x - 0.4 + (i + 0.5) * width, [speed.get(n, np.nan) for n in names], width,
               label=f"measured, batch {batch}")
    if runs:
        ax.plot(x, [l["ideal"] for l in runs[0][1]], linestyle="none", marker="_", markersize=12,
                markeredgewidth=2, color="black", label="ideal: 1 / FLOP ratio")
    ax.axhline(1.0, color="gray", linewidth=1, label="dense = 1")
    ax.set_xticks(x, [n.removesuffix(".weight") for n in names], rotation=90, fontsize="x-small")
    ax.set(ylabel="speedup over dense", title=f"{title}\n{bench.get('device', '?')}, {bench.get('date', '?')}")
    tallest = np.nanmax([1.0] + [l[k] for _, layers in runs for l in layers for k in ("speedup", "ideal")
                                 if np.isfinite(l[k])])
    ax.set_ylim(0, 1.3 * tallest)                                  # room for the legend above the bars
    ax.legend(fontsize="small", ncol=3, loc="upper center")
    fig.tight_layout()
    return fig


def mask_figure(panels, title=""):
    """Masks side by side (the paper's Fig. A9): panels = [(label, (O, K) 0/1 mask)], drawn black where
    kept; each block-averaged by display_mask to at most MASK_MAX_CELLS cells per axis."""
    fig = _figure((MASK_PANEL_INCHES * len(panels), MASK_PANEL_INCHES + MASK_TITLE_INCHES))
    for i, (label, mask2d) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(display_mask(mask2d), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(label, fontsize="small")
        ax.set(xticks=[], yticks=[], xlabel=f"K = {mask2d.shape[1]}", ylabel=f"O = {mask2d.shape[0]}")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    return fig


def mask_panel(run_name, ticket, layer):
    """(label, (O, K) mask) of one ticket's layer; a regroup mask with its rows and columns in
    block_order, so its blocks show as rectangles."""
    mask = ticket["masks"][layer]
    mask2d = mask.reshape(mask.shape[0], -1).numpy()
    label = f"{run_name}: {100 * mask2d.mean():.1f}% kept"
    blocks = (ticket["blocks"] or {}).get(layer)
    if blocks:
        rows, cols = block_order(blocks, *mask2d.shape)
        mask2d, label = mask2d[rows][:, cols], label + "\n(rows, cols by block)"
    return label, mask2d


def save_figure(fig, path):
    """PNG at FIG_DPI (the figure's own size, no tight crop), atomically; returns (width, height) px."""
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=FIG_DPI)
    os.replace(tmp, path)
    return tuple(int(round(v)) for v in fig.get_size_inches() * FIG_DPI)


def report_tags(experiments):
    """A short unique name per experiment: its directory's name (numbered where two are equal)."""
    names = [os.path.basename(os.path.normpath(e["path"])) for e in experiments]
    return names if len(set(names)) == len(names) else [f"{i}_{n}" for i, n in enumerate(names)]


def level_file(exp, branch, level, name):
    """A file of one ticket's level directory, e.g. level_file(exp, "regroup", 2, "bench.json")."""
    return os.path.join(exp["runs"][branch], f"level_{level:02d}", name)


def mask_level(exp):
    """The highest level at which every run of the experiment has its ticket.pt (None if none)."""
    levels = [{r["level"] for r in exp["rows"] if r["branch"] == b and
               os.path.exists(level_file(exp, b, r["level"], "ticket.pt"))} for b in exp["runs"]]
    return max(set.intersection(*levels), default=None) if levels else None


def read_bench(path, warn=True):
    """A bench.json as a dict; None (with one WARNING line unless warn=False) when it cannot be read."""
    try:
        bench = read_json(path)
        if isinstance(bench, dict):
            return bench
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        pass
    if warn:
        print(f"WARNING: {path} is not a readable bench.json; left out of the report", file=sys.stderr)
    return None


def finite_mean(values):
    """Mean of the values that are not NaN (NaN when none is)."""
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def saving_text(savings):
    """A time-saving cell: conv layers and end to end, batch, device, date (mean over several files)."""
    if not savings:
        return "-"
    conv, e2e = (finite_mean(s[k] for s in savings) for k in ("conv", "end_to_end"))
    parts = [f"{100 * v:.1f}% {what}" for v, what in ((conv, "conv layers"), (e2e, "end to end")) if v == v]
    first = savings[0]
    where = f"batch {first['batch']}, {first['device']}, {first['date']}" + \
        (f", mean of {len(savings)} bench.json" if len(savings) > 1 else "")
    return f"{', '.join(parts) or 'no timings'} ({where})"


def extreme_rows(group, rows, dense):
    """Per run of a seed group: its extreme winning ticket (on the mean accuracies) and the time saving
    measured on that ticket (the mean over the seeds that have a bench.json next to it)."""
    out = []
    for branch in dict.fromkeys(r["branch"] for r in rows):
        run = [r for r in rows if r["branch"] == branch]
        best = extreme_ticket(run, dense)
        paths = [] if best is None else [level_file(e, branch, best["level"], "bench.json") for e in group
                                         if branch in e["runs"]]
        savings = [bench_saving(b) for p in paths                 # (speedup_pictures warns of a bad one)
                   if os.path.exists(p) and (b := read_bench(p, warn=False)) is not None]
        pick = lambda k: "" if best is None else best[k]
        out.append(dict(source=run[0]["source"], branch=branch, method=run[0]["method"], init=run[0]["init"],
                        dense_acc="" if dense is None else dense,
                        extreme_level="none" if best is None else best["level"], density=pick("density"),
                        sparsity=pick("sparsity"), test_acc=pick("test_acc"),
                        saving_conv=finite_mean(s["conv"] for s in savings) if savings else "",
                        saving_end_to_end=finite_mean(s["end_to_end"] for s in savings) if savings else "",
                        saving=saving_text(savings)))
    return out


def markdown_rows(rows, extremes, several):
    """report.md's two tables of a seed group: method x level, and the extreme winning tickets."""
    spread = lambda r: {"acc min-max": f"{r['acc_min']:.4f}-{r['acc_max']:.4f}", "seeds": r["seeds"]}
    table = [dict(branch=r["branch"], method=r["method"], init=r["init"], level=r["level"],
                  density=r["density"], **{"sparsity %": f"{r['sparsity']:.2f}"}, test_acc=r["test_acc"],
                  **(spread(r) if several else {}), flop_ratio=r["flop_ratio"], blocks=r["blocks"],
                  coverage=r["coverage"]) for r in rows]
    ext = [{"run": e["branch"],
            "extreme winning ticket": "none" if e["extreme_level"] == "none" else f"level {e['extreme_level']}",
            "sparsity %": "-" if e["sparsity"] == "" else f"{e['sparsity']:.2f}",
            "test_acc": "-" if e["test_acc"] == "" else f"{e['test_acc']:.4f}", "time saving": e["saving"]}
           for e in extremes]
    return markdown_table(table), markdown_table(ext)


def group_markdown(tag, group, rows, dense, extremes):
    """One experiment's (seed group's) section of report.md: settings, dense accuracy, the method x level
    table, the extreme winning tickets."""
    cfg, seeds = group[0]["config"], [e["config"].get("seed", 0) for e in group]
    several = len(group) > 1
    shown = ("arch", "dataset", "seed", "mask_source", *RUN_ONLY)                  # in the heading, or per command
    settings = ", ".join(f"{k} {v}" for k, v in cfg.items() if k not in shown)
    dense_text = "not finished (no level 0)" if dense is None else f"{dense:.4f}"
    if several and dense is not None:
        accs = [a for e in group if (a := dense_accuracy(e["rows"])) is not None]
        dense_text += f" (mean of {len(accs)} seeds, range {min(accs):.4f}-{max(accs):.4f})"
    table, ext = markdown_rows(rows, extremes, several)
    return "\n".join([
        f"## {tag}: {cfg.get('arch')} on {cfg.get('dataset')}, mask source {cfg.get('mask_source', 'imp')}, "
        f"seed{'s' * several} {', '.join(map(str, seeds))}", "",
        f"Directories: {', '.join('`' + e['path'] + '`' for e in group)}. Settings: {settings}.", "",
        f"Dense accuracy (level 0): {dense_text}.", "", table, "",
        "Extreme winning tickets: per run, the sparsest level whose test accuracy is at least the dense "
        "accuracy (the paper's definition; ties: the higher accuracy, then the lower level"
        + ("; with several seeds the mean accuracy against the mean dense accuracy" if several else "") +
        "). Time saving = 1 - t_ticket / t_dense from the bench.json next to the ticket "
        "(`python lth_ref.py --bench --ticket RUN/level_NN/ticket.pt` writes one).", "", ext, ""])


def figure_key(exp):
    """Experiments drawn in one accuracy figure: the same settings but for the seed and the mask source."""
    return json.dumps({k: v for k, v in exp["config"].items()
                       if k not in ("seed", "mask_source", *RUN_ONLY, *SOURCE_KEYS.get("synflow", ()))},
                      sort_keys=True)


def accuracy_pictures(curves, tags):
    """[(file name, make figure)]: one accuracy_vs_sparsity figure per figure_key, holding each seed
    group's lines; the dense line is the mean of the groups' dense accuracies."""
    out = []
    for figure in curves.values():
        first = figure[0][0][0]
        rows = [r for _, group_rows, _ in figure for r in group_rows]
        dense = finite_mean(d for _, _, d in figure if d is not None)
        seeds = max(len(group) for group, _, _ in figure)
        title = f"{first['config'].get('arch')} on {first['config'].get('dataset')}" + \
            (f" ({seeds} seeds: mean, band = min-max)" if seeds > 1 else "")
        name = "accuracy_vs_sparsity.png" if len(curves) == 1 else f"accuracy_vs_sparsity_{tags[first['path']]}.png"
        out.append((name, lambda r=rows, d=None if dense != dense else dense, t=title: accuracy_figure(r, d, t)))
    return out


def mask_pictures(exp, prefix, layers):
    """[(file name, make figure)] of the masks of every run at mask_level, one figure per layer (default:
    the last REPORT_LAYERS convs). UsageError for a layer the tickets do not have."""
    level = mask_level(exp)
    if level is None:
        return []
    tickets = {b: load_ticket(level_file(exp, b, level, "ticket.pt"), mmap=True) for b in exp["runs"]}
    names = list(next(iter(tickets.values()))["masks"])
    chosen = [n if n in names else f"{n}.weight" for n in layers] if layers else names[-REPORT_LAYERS:]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise UsageError(f"--report-layers: no prunable conv {unknown[0]!r} in {exp['path']}; its convs: "
                         f"{', '.join(n.removesuffix('.weight') for n in names)}")
    title = f"{os.path.basename(os.path.normpath(exp['path']))} level {level}:"
    label = lambda b: f"trunk ({exp['config'].get('mask_source', 'imp')})" if b == "trunk" else b
    return [(f"masks_{prefix}{n.removesuffix('.weight')}.png",
             lambda n=n: mask_figure([mask_panel(label(b), t, n) for b, t in tickets.items()], f"{title} {n}"))
            for n in chosen]


def speedup_pictures(exp, prefix, tag, csvs):
    """[(file name, make figure)] of layer_speedup for every ticket of the experiment with a bench.json;
    adds each one's numbers to csvs {file name: rows}."""
    out = []
    for branch in exp["runs"]:
        for level in sorted({r["level"] for r in exp["rows"] if r["branch"] == branch}):
            path = level_file(exp, branch, level, "bench.json")
            bench = read_bench(path) if os.path.exists(path) else None
            if bench is None:
                continue
            stem = f"layer_speedup_{prefix}{branch}_level_{level:02d}"
            csvs[f"{stem}.csv"] = [dict(batch=run.get("batch"), **layer) for run in bench.get("runs") or []
                                   for layer in bench_layers_of(run)]
            title = f"{tag} {branch} level {level}"
            out.append((f"{stem}.png", lambda b=bench, t=title: layer_speedup_figure(b, t)))
    return out


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401 (only whether it imports)
        from matplotlib.figure import Figure  # noqa: F401
        return True
    except ImportError:
        return False


def write_report(dirs, out_dir=None, layers=None, log=print):
    """Read experiment directories; write report.md (per experiment: the method x level table, the dense
    accuracy, each run's extreme winning ticket and its measured time saving), the CSVs, and, where
    matplotlib is installed, accuracy_vs_sparsity.png, layer_speedup_*.png (every ticket with a
    bench.json) and masks_<layer>.png. DIRs that differ only in the seed are grouped (mean, min-max).

    out_dir default: DIR/report for one directory, report/ in the directories' common parent for several;
    files of one experiment are then prefixed with its directory's name. Returns {file name: path}.
    """
    dirs = list(dict.fromkeys(os.path.normpath(d) for d in dirs))
    experiments = [read_experiment(d) for d in dirs]
    out_dir = out_dir or os.path.join(dirs[0] if len(dirs) == 1 else
                                      os.path.commonpath([os.path.abspath(d) for d in dirs]), "report")
    tags = dict(zip(dirs, report_tags(experiments)))
    prefix = lambda e: f"{tags[e['path']]}_" if len(experiments) > 1 else ""
    sections, pictures, curves = [], [], {}
    csvs = {"accuracy_vs_sparsity.csv": [], "extreme_tickets.csv": []}
    for group in group_seeds(experiments):
        tag, rows = tags[group[0]["path"]], combine_seeds([e["rows"] for e in group])
        dense = finite_mean(a for e in group if (a := dense_accuracy(e["rows"])) is not None)
        dense = None if dense != dense else round(dense, 6)
        ext = extreme_rows(group, rows, dense)
        sections.append(group_markdown(tag, group, rows, dense, ext))
        csvs["accuracy_vs_sparsity.csv"] += [dict(experiment=tag, **r) for r in rows]
        csvs["extreme_tickets.csv"] += [dict(experiment=tag, **{k: v for k, v in e.items() if k != "saving"})
                                        for e in ext]
        curves.setdefault(figure_key(group[0]), []).append((group, rows, dense))
        pictures += mask_pictures(group[0], prefix(group[0]), layers)
    for e in experiments:
        pictures += speedup_pictures(e, prefix(e), tags[e["path"]], csvs)
    return write_report_files(out_dir, dirs, sections, csvs, accuracy_pictures(curves, tags) + pictures, log)


def write_report_files(out_dir, dirs, sections, csvs, pictures, log):
    """Write the CSVs, the pictures (when matplotlib imports; else one WARNING line) and report.md."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, rows in csvs.items():
        if rows:
            write_csv(rows, written.setdefault(name, os.path.join(out_dir, name)))
    drawn = have_matplotlib()
    if not drawn:
        print(NO_MATPLOTLIB, file=sys.stderr)
    sizes = {name: save_figure(make(), written.setdefault(name, os.path.join(out_dir, name)))
             for name, make in (pictures if drawn else [])}
    figures = [f"- `{name}` ({w}x{h} px)\n\n  ![{name}]({name})" for name, (w, h) in sizes.items()]
    if not drawn:
        figures = [f"Not drawn: matplotlib is not installed (`pip install matplotlib`, then run the same "
                   f"command again). The numbers behind them are in the CSVs."]
    text = "\n".join([
        "# lth_ref report", "",
        f"Built by `--report` on {time.strftime('%Y-%m-%d')} from {', '.join(dirs)}. Sparsity = % "
        "of the prunable weights (every conv but the stem) removed; test_acc = the final epoch's test "
        "accuracy; flop_ratio = the blocks' share of the dense conv's multiply-adds.", "",
        *sections, "## Figures", "",
        "Masks: black = kept, rows = output channels (O), columns = (c, ky, kx) positions (K); a mask larger "
        f"than {MASK_MAX_CELLS} cells per axis is block-averaged for display (grey = partly kept). Regroup "
        "masks have their rows and columns reordered by block (`block_order`).", "", *figures, ""])
    atomic_write_text(text, written.setdefault("report.md", os.path.join(out_dir, "report.md")))
    log(f"wrote {written['report.md']} ({len(sizes)} figures, {len(written) - len(sizes) - 1} CSVs)")
    return written


# ---- CLI ----
class HelpFormatter(argparse.HelpFormatter):
    """--help shows a flag's default once: '(default: X)' unless the help already names it or it is
    derived (None: the help says how)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, False) and "default" not in text \
                and action.option_strings:
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default: {default})"
        return text


def build_parser():
    p = argparse.ArgumentParser(
        description="Find structurally sparse lottery tickets (Chen et al., ICML 2022): an unstructured "
                    "trunk (--mask-source) and a structural branch (--method, --init) per level.",
        formatter_class=HelpFormatter)
    a = p.add_argument
    a("--arch", default="resnet20", choices=sorted(model_zoo.MODELS), help="network")
    a("--method", default="imp", choices=list(POSTPROCESS),
      help="the branch: how each trunk level's mask is post-processed: imp (not at all: with --init "
           "rewind the trunk is the ticket), refill (channel-wise), refill+ (channel-wise, extra "
           "channels), regroup (group-wise dense blocks)")
    a("--mask-source", default="imp", choices=list(MASK_SOURCES),
      help="the trunk's unstructured masks: imp (iterative magnitude pruning), omp (one-shot magnitude "
           "of the trained dense net), random (random at omp's layer densities), snip, grasp, synflow "
           "(scores at initialization); one-shot sources reach density (1 - prune rate)^level")
    a("--init", default="rewind", choices=INITS,
      help="the branch's weights: rewind (theta_k, the paper's tickets) or reinit (a fresh seeded "
           "initialization trained from epoch 0: random tickets)")
    a("--group-aware", action="store_true",
      help="group-aware IMP (paper App. A1, Alg. 4): the branch prunes its own previous level instead "
           "of the trunk's (official main_imp_regroup.py); needs --mask-source imp and a --method other than imp")
    a("--dataset", default="cifar10", choices=list(datasets.DATASETS),
      help="synthetic = small deterministic CIFAR-shaped data for smoke runs")
    a("--data-dir", default="data",
      help="where the datasets live: CIFAR archives or folders, tiny-imagenet-200/, imagenet/")
    a("--out-dir", default=None,
      help="experiment directory (default: runs/ARCH_DATASET_SOURCE, plus _seedN for --seed N != 0)")
    a("--levels", type=int, default=PAPER["levels"], help="pruning levels after the dense level 0")
    table = "Table 1's value for --arch on --dataset (CIFAR: "
    a("--epochs", type=int, default=None, help=f"epochs per level; default: {table}160, (Tiny-)ImageNet: 95)")
    a("--lr-drops", type=int, nargs="*", default=None, metavar="EPOCH",
      help=f"epochs at which the LR drops x0.1; default: {table}80 120 of 160), scaled to --epochs")
    a("--rewind-epoch", type=int, default=None,
      help="rewind to the end of this epoch (0 = initialization); default: epoch 8 of Table 1's schedule, "
           "scaled to --epochs (8 of 160, 5%%)")
    a("--prune-rate", type=float, default=PAPER["prune_rate"],
      help="fraction of the remaining prunable weights removed per level")
    a("--synflow-rounds", type=int, default=SYNFLOW_ROUNDS, help="pruning rounds of --mask-source synflow")
    a("--lr", type=float, default=None, help=f"SGD learning rate; default: {table}0.1)")
    a("--momentum", type=float, default=PAPER["momentum"], help="SGD momentum")
    a("--weight-decay", type=float, default=None,
      help=f"L2 weight decay; default: {table}1e-4, VGG-16 2e-4; CIFAR-100 2e-4, VGG-16 5e-4)")
    a("--batch-size", type=int, default=None,
      help=f"examples per SGD step, over all processes under torchrun; default: {table}128)")
    a("--train-subset", type=int, default=None, help="train on a seeded random subset of N examples (default: all)")
    a("--val-split", type=int, default=0,
      help="hold out N training images (seeded, before --train-subset) as a validation set; its accuracy "
           "is reported next to test accuracy (0 = none)")
    a("--seed", type=int, default=0, help="seed for init, data order and augmentation")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    a("--amp", default="off", choices=list(AMP_DTYPES),
      help="mixed precision: autocast to bf16, or fp16 with loss scaling (CUDA only)")
    a("--channels-last", action="store_true", help="train with channels-last model and batches")
    a("--compile", action="store_true", help="torch.compile the training network")
    a("--sync-bn", action="store_true",
      help="under torchrun on GPUs: BatchNorm statistics over all processes (default: per process)")
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
      help="benchmark instead of training: kernels (the default when given alone) = dense vs grouped "
           "GEMM on a ticket, paper = the same in the paper's per-layer setting (batch 64, 127x127), "
           "regroup = partitioner coverage and speed vs baselines, train = training images/s vs a "
           "plain PyTorch loop with the same settings, and the cost of the masks")
    a("--export", default=None, metavar="PATH",
      help="instead of training: save the ticket (--ticket, or the last level in --out-dir of the run "
           "--method names) without its dead channels, as a smaller dense network (models.load_slim)")
    a("--ticket", default=None,
      help="ticket.pt to benchmark (default: the last level, in --out-dir, of the run --method names)")
    a("--bench-density", type=float, default=None,
      help="bench a fresh --arch pruned to this density and post-processed by --method (with the "
           "regroup/refill flags) instead of a saved ticket")
    a("--bench-batch", type=int, nargs="+", default=[64], help="batch sizes for --bench kernels")
    a("--bench-repeats", type=int, default=30, help="timed runs per measurement (median)")
    a("--bench-memory-format", default="auto", choices=["auto", *kernels.MEMORY_FORMATS],
      help="memory format of the activations, dense and regrouped alike; auto = the one in which the "
           "dense model runs faster on this machine (measured first)")
    a("--report", nargs="+", default=None, metavar="DIR",
      help="instead of training: report.md, CSVs and figures (matplotlib) of experiment directories, "
           "into --out-dir if given, else DIR/report (one DIR) or report/ in the DIRs' common parent")
    a("--report-layers", nargs="+", default=None, metavar="NAME",
      help="convs drawn by --report's mask pictures, e.g. layer3.2.conv2 (default: the last three)")
    return p


def config_from_args(args):
    """Validate the parsed flags and fill in Table 1's row for --arch/--dataset into a Config."""
    def need(ok, msg):
        if not ok:
            raise UsageError(msg)
    table = paper_schedule(args.arch, args.dataset)
    epochs = args.epochs if args.epochs is not None else table["epochs"]
    need(epochs >= 1, f"--epochs must be >= 1, got {epochs}")
    scaled = lambda e: round(e * epochs / table["epochs"])   # the table's epochs at this schedule's length
    lr_drops = args.lr_drops if args.lr_drops is not None else [scaled(e) for e in table["lr_drops"]]
    rewind_epoch = args.rewind_epoch if args.rewind_epoch is not None else scaled(table["rewind_epoch"])
    pick = lambda flag, key: getattr(args, flag) if getattr(args, flag) is not None else table[key]
    need(0.0 < args.prune_rate < 1.0, f"--prune-rate must be in (0, 1), got {args.prune_rate}")
    need(args.levels >= 0, f"--levels must be >= 0, got {args.levels}")
    need(0 <= rewind_epoch < epochs,
         f"--rewind-epoch must be in [0, --epochs), got {rewind_epoch} with --epochs {epochs}")
    need(pick("batch_size", "batch_size") >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.train_subset is None or args.train_subset >= 1, "--train-subset must be >= 1")
    need(args.val_split >= 0, f"--val-split must be >= 0, got {args.val_split}")
    need(args.synflow_rounds >= 1, f"--synflow-rounds must be >= 1, got {args.synflow_rounds}")
    need(0.0 <= args.refill_extra <= 1.0, f"--refill-extra must be in [0, 1], got {args.refill_extra}")
    for flag in ("groups", "row_multiple", "min_col_nnz", "min_block_cols"):
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1")
    need(not args.group_aware or args.method != "imp",
         "--group-aware post-processes every level of its own chain: give it a --method (refill, "
         "refill+ or regroup)")
    need(not args.group_aware or args.mask_source == "imp",
         f"--group-aware prunes its own previous level iteratively: it needs --mask-source imp, not "
         f"{args.mask_source} (one-shot sources have no chain)")
    out_dir = args.out_dir or os.path.join(
        "runs", f"{args.arch}_{args.dataset}_{args.mask_source}" + (f"_seed{args.seed}" if args.seed else ""))
    return Config(
        arch=args.arch, dataset=args.dataset, data_dir=args.data_dir, out_dir=out_dir, levels=args.levels,
        epochs=epochs, lr_drops=sorted(lr_drops), rewind_epoch=rewind_epoch, prune_rate=args.prune_rate,
        lr=pick("lr", "lr"), momentum=args.momentum, weight_decay=pick("weight_decay", "weight_decay"),
        batch_size=pick("batch_size", "batch_size"), train_subset=args.train_subset, val_split=args.val_split,
        seed=args.seed, device=args.device, amp=args.amp, sync_bn=args.sync_bn,
        channels_last=args.channels_last, compile=args.compile, mask_source=args.mask_source,
        synflow_rounds=args.synflow_rounds, method=args.method, init=args.init, group_aware=args.group_aware,
        refill_score=args.refill_score, refill_extra=args.refill_extra, regroup_unit=args.regroup_unit,
        groups=args.groups, row_multiple=args.row_multiple, min_col_nnz=args.min_col_nnz,
        min_block_cols=args.min_block_cols, verbose=args.verbose)


def main(argv=None):
    """The single entry point: run an experiment (default), or a benchmark (--bench), an export (--export)
    or a report (--report)."""
    args = build_parser().parse_args(argv)
    try:
        if args.report:
            write_report(args.report, args.out_dir, args.report_layers)
        elif args.bench:
            BENCHES[args.bench](args)
        elif args.export:
            export_slim(args)
        else:
            run_experiment(config_from_args(args))
    except (UsageError, datasets.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):                 # `... | head` ends quietly, like other Unix tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
