"""lth_ref: structurally sparse lottery tickets, a small reference implementation.

T. Chen, X. Chen, X. Ma, Y. Wang, Z. Wang, "Coarsening the Granularity: Towards Structurally Sparse
Lottery Tickets", ICML 2022, arXiv:2202.04736. Official code: github.com/VITA-Group/Structure-LTH.

Iterative magnitude pruning (IMP) with weight rewinding finds sparse "winning tickets". IMP's chain stays
unstructured (the trunk); every level's mask is then post-processed into a structure that runs fast and
trained on its own (a branch): `refill` keeps whole output channels (channel-wise tickets), `regroup`
turns groups of rows into dense blocks (group-wise tickets, run by the grouped GEMM in kernels.py).

    python lth_ref.py --arch resnet20 --method regroup            # find tickets on CIFAR-10
    python -m pytest -q test_lth_ref.py                           # the tests (-m "not slow": the fast lane)

lth_ref.py holds the method, the experiment loop that trains and resumes it, and below the `tooling`
banner what the loop needs: settings (Config), torchrun, files, file locks, results and the one entry
point, main. The tools run on finished tickets (--report, --bench, --export, the reader of
--import-masks) are in lth_tools.py, which is imported only when one of them runs.

One ticket, trunk level L-1 -> the regroup branch of level L, step by step, top to bottom (its section):
    IMP's prune             magnitude_prune, keep_top                                 (mask sources)
    post-processing         postprocess                                               (post-processing)
    regroup                 regroup -> regroup_mask: hypergraph_rows, row_similarity, partition_rows,
                            refine_partition, choose_block_columns                    (regroup)
    rewind                  rewind, to theta_k                                        (training)
    retrain                 retrain: lr_at, train_epoch, train_step                   (training)
    evaluate                evaluate                                                  (training)
    the experiment          imp_source (trunk level L-1, held in memory) -> branch_masks -> level_start
                            -> train_level -> run_experiment                          (the experiment)
    result                  result_row, then write_results                            (results)

Files: lth_ref.py (this), lth_tools.py (report, benchmarks, slim export, mask import), models.py (MODELS,
slim networks), data.py (datasets, on-device batches), kernels.py (grouped GEMM), test_lth_ref.py.
"""
import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import errno
import functools
import importlib
import importlib.util
import inspect
import hashlib
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import time
import typing

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

# ---- the paper's settings (Table 1 and Sec. 3.1) ----
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
    "cifar10": dict(epochs=160, lr=0.1, lr_drops=(80, 120), batch_size=128, weight_decay=1e-4,
                    rewind_epoch=8),
    "cifar100": dict(epochs=160, lr=0.1, lr_drops=(80, 120), batch_size=128, weight_decay=2e-4,
                     rewind_epoch=8),
    "tinyimagenet": dict(epochs=95, lr=0.1, lr_drops=(30, 60), batch_size=32, weight_decay=5e-4,
                         rewind_epoch=8),
    "imagenet": dict(epochs=95, lr=0.1, lr_drops=(30, 60), batch_size=256, weight_decay=1e-4,
                     rewind_epoch=8),
}
SCHEDULES["synthetic"] = SCHEDULES["cifar10"]   # a CIFAR-shaped stand-in for smoke runs
SCHEDULE_BY_ARCH = {  # (arch, dataset) cells of Table 1 that differ from their dataset's row
    ("vgg16", "cifar10"): dict(weight_decay=2e-4),
    ("vgg16", "synthetic"): dict(weight_decay=2e-4),
    ("vgg16", "cifar100"): dict(weight_decay=5e-4),
    ("mobilenet_v1", "cifar100"): dict(batch_size=64),
}


SCHEDULE_PRESETS = {  # --schedule: Table 1, or App. A2's (+) setting of VGG-16(+) and WRN-32-2(+)
    "table1": {},
    "plus": dict(epochs=240, lr_drops=(150, 180, 210), rewind_epoch=8),   # LR x0.1 at 150, 180, 210 of 240
}


def paper_schedule(arch, dataset, preset="table1"):
    """Table 1's settings for --arch on --dataset, or its (+) variant (the defaults of the flags)."""
    return {**SCHEDULES[dataset], **SCHEDULE_BY_ARCH.get((arch, dataset), {}), **SCHEDULE_PRESETS[preset]}


def ceil_div(a, b):
    """ceil(a / b) for non-negative integers."""
    return -(-a // b)


def mix_seed(seed, level, stream):
    """One integer seed per (run seed, level, stream): epochs are streams 0, 1, ...; draws outside the
    training epochs use the negative streams below. The only seed mixer: resume and torchrun are exact."""
    return seed * 1_000_003 + level * 10_007 + stream


SCORE_BATCH, REINIT, RANDOM_MASK = -1, -2, -3   # streams of mix_seed that no training epoch uses
ADMM_EPOCHS = -100                              # ADMM's W-step epochs: streams -100, -101, ...


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


def check_pairs(weights, masks, what):
    """ValueError unless weights and masks are dicts with the same names and shapes (public functions)."""
    if not isinstance(weights, dict) or not isinstance(masks, dict):
        raise ValueError(f"{what}: weights and masks must be dicts {{parameter name: tensor}}")
    bad = [n for n in masks if n not in weights or tuple(weights[n].shape) != tuple(masks[n].shape)]
    if bad:
        raise ValueError(f"{what}: no weight of the mask's shape for {bad[:3]} (masks and weights must "
                         "have the same names and shapes)")


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


# ---- mask sources: IMP's global magnitude prune, OMP, random, SNIP, GraSP, SynFlow ----
def magnitude_prune(weights, masks, rate):
    """Remove `rate` of the remaining weights, smallest |w| first, ranked across all layers together.

    Paper: Sec. 3.1, IMP step (global magnitude pruning, 20% of the remaining weights per round).
    Official: `pruning_model` (torch.nn.utils.prune.global_unstructured, L1); same rule.
    weights, masks: {name: (O, C, kh, kw)}: the trained weights of level L-1 and its mask. Returns new
    masks; exactly round(rate * remaining) weights are removed (ties: the later position goes first), so
    the result is deterministic and only shrinks.
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


def level_density(prune_rate, level):
    """Density of IMP's level L, (1 - prune_rate)^L: the target of the one-shot sources at that level."""
    return (1.0 - prune_rate) ** level


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


def snip_scores(model, names, images, labels, chunk=None):
    """SNIP connection sensitivity |w * dL/dw| at the given weights, L the mean loss over the given
    samples (higher = keep).

    Paper: Fig. 6 left (SNIP, Lee et al. 2019). Published: snip-public scores one batch; Synaptic-Flow
    scores 10 x (number of classes) samples (--snip-samples); BatchNorm in eval mode, scores of every
    layer; ours ranks the prunable weights only. Official: `prune_snip` scores in training mode over the
    whole loader. The model is left as it was (scores come from a copy). names: parameter names;
    images (N, C, H, W), labels (N,); chunk: samples per forward pass (default: all at once).
    """
    model = _scoring_copy(model, train=False)
    params = dict(model.named_parameters())
    chunk, grads = chunk or len(images), None
    for i in range(0, len(images), chunk):                # the sum of per-sample losses / N: the mean loss
        loss = F.cross_entropy(model(images[i:i + chunk]), labels[i:i + chunk], reduction="sum") / len(images)
        g = torch.autograd.grad(loss, [params[n] for n in names])
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return {n: (params[n] * g).detach().abs() for n, g in zip(names, grads)}


GRASP_TEMPERATURE = 200.0  # logits / T before the loss, as published (GraSP's default T = 200)


def grasp_scores(model, names, images, labels, temperature=GRASP_TEMPERATURE, chunk=None):
    """GraSP gradient-signal preservation: w * (H g) at the given weights (higher = keep).

    Paper: Fig. 6 left (GraSP, Wang et al. 2020). Published: g = dL/dw on the samples in two halves
    (logits / T; 10 x the classes samples), then H g = d(g_stop . dL/dw)/dw, score -w * Hg, and the highest
    scores are removed; keeping the highest w * Hg is the same rule. Official: `prune_grasp` ranks
    |w * Hg| (ours: the sign kept, as published). g and z run over every conv and linear weight as
    published; the caller ranks the prunable ones. images (B, C, H, W), labels (B,); chunk: samples per
    forward pass (default: a half at once; BatchNorm, in training mode as published, then normalizes per
    pass).
    """
    model = _scoring_copy(model, train=True)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    halves = [(x, y) for x, y in zip(images.chunk(2), labels.chunk(2)) if len(y)]
    step = chunk or len(images)                               # at least a half: one pass per half
    passes = [(x[i:i + step], y[i:i + step], len(y)) for x, y in halves
              for i in range(0, len(y), step)]                 # a half's mean loss: its passes' sums / n
    loss_of = lambda x, y, n: F.cross_entropy(model(x) / temperature, y, reduction="sum") / n
    g = [sum(parts) for parts in zip(*(torch.autograd.grad(loss_of(*p), weights) for p in passes))]
    for p in passes:
        grad_f = torch.autograd.grad(loss_of(*p), weights, create_graph=True)
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


ADMM_RHO = 1e-2         # penalty weight rho of ADMM's augmented Lagrangian (official `prune_admm` default)
ADMM_ITERATIONS = 20    # W-step epochs, each followed by a Z- and U-step (official: 20 epochs)
ADMM_LR = 0.01          # SGD learning rate of the W-steps (ours: the official code leaves it to its caller)


def admm_prune(model, names, target, w_step, iterations=ADMM_ITERATIONS, rho=ADMM_RHO):
    """ADMM pruning (Zhang et al. 2018): train toward a sparse copy of the weights, then prune hard.

    Paper: Fig. 6 left (ADMM, one of the seven mask sources). Minimizes loss(W) s.t. W has density
    `target`, with Z = W and scaled duals U: W-step: w_step(iteration, penalty) trains one epoch on the
    loss + penalty(), penalty = rho/2 sum ||W - Z + U||^2; Z-step: Z = the projection of W + U onto
    density `target` (admm_project); U-step: U += W - Z. After `iterations`, keep the top `target` of |W|.
    Published: per-layer budgets; ours one global budget, as every mask source here. Official:
    `prune_admm` (never called in its code) takes an L1 soft-threshold for Z and the unsquared norm.
    model: trained in place; names: its prunable weights. Returns the masks.
    """
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in names}
    z = admm_project({n: w.detach() for n, w in weights.items()}, target)
    u = {n: torch.zeros_like(w) for n, w in weights.items()}
    for iteration in range(iterations):
        w_step(iteration, lambda: rho / 2 * sum(((weights[n] - z[n] + u[n]) ** 2).sum() for n in names))
        with torch.no_grad():
            z = admm_project({n: weights[n] + u[n] for n in names}, target)
            u = {n: u[n] + weights[n] - z[n] for n in names}
    return prune_to_density({n: w.detach().abs() for n, w in weights.items()}, target)


def admm_project(weights, target):
    """ADMM's Z-step: the Euclidean projection of {name: tensor} onto the set of density `target` (all
    layers together): keep the round(target * total) largest |w|, zero the rest."""
    keep = prune_to_density({n: w.abs() for n, w in weights.items()}, target)
    return {n: w * keep[n] for n, w in weights.items()}


def _scoring_copy(model, train):
    """A deep copy to compute scores on (BN statistics and gradients of the original stay untouched)."""
    model = copy.deepcopy(model)
    model.train(train)
    for p in model.parameters():
        p.grad = None
    return model


# ---- post-processing: what a branch does to the trunk's mask of a level ----
def postprocess(method, weights, masks, feats=None, **knobs):
    """Turn unstructured masks into a structural ticket's masks: (masks, blocks or None).

    Paper: Alg. 2 (refill, refill+) and Alg. 3 (regroup), applied to "the unstructured mask from
    Alg. 1"; bring your own masks from any pruning loop. method: a POSTPROCESS key (the table after
    refill and regroup, below); weights, masks: {name: (O, C, kh, kw)} (weights: the trained weights the
    masks were pruned from, for refill's scores); feats: conv_channel_stats for the feature-map refill
    scores; knobs: method_knobs(method), the per-layer function's keyword arguments, with its defaults.
    blocks: {name: [(rows, cols)]} for regroup, None otherwise.
    """
    if method not in POSTPROCESS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(POSTPROCESS)}")
    unknown = sorted(set(knobs) - set(method_knobs(method)))
    if unknown:
        raise ValueError(f"{method} takes the knobs {list(method_knobs(method))}, not {unknown}")
    check_pairs(weights, masks, "postprocess")
    fn, fixed = POSTPROCESS[method]
    if fn is None:
        return masks, None
    if fn is regroup:
        return regroup(masks, **fixed, **knobs)
    return fn(weights, masks, feats=feats, **fixed, **knobs), None


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


def refill(weights, masks, feats=None, **knobs):
    """Refill every layer (refill+ when extra > 0): {name: mask} -> {name: channel-wise mask}.

    Paper: Alg. 2. weights: the trained weights the masks were pruned from; feats: conv_channel_stats
    for the FEATURE_SCORES, else None; knobs: refill_mask's (extra, score, channel_multiple), with its
    defaults. Layers are independent: see refill_mask.
    """
    check_pairs(weights, masks, "refill")
    return {n: refill_mask(weights[n], m, feats=None if feats is None else feats[n], **knobs)
            for n, m in masks.items()}


REFILL_PLUS_EXTRA = 0.1  # refill+'s default share of the pruned channels kept (ours: the paper gives none)


def refill_plus(weights, masks, feats=None, extra=REFILL_PLUS_EXTRA, **knobs):
    """Refill+ (Alg. 2 with extra channels): refill keeping n + extra * (O - n) channels per layer.
    Official: `prune_model_custom_fillback` with fillback_rate = extra."""
    return refill(weights, masks, feats, extra=extra, **knobs)


def refill_mask(weight, mask, extra=0.0, score="l1", feats=None, channel_multiple=1):
    """One layer's refill: keep the n best output channels whole, prune every other channel whole.

    Paper: Sec. 3.2 / Alg. 2 (refill), n = nnz / K channels, rounded to the nearest count (Python's round:
    a half to the even count) and at least 1; refill+ keeps n + extra * (O - n), rounded alike.
    Official: `prune_model_custom_fillback` (fillback_rate = extra, criterion `remain` by default).
    channel_multiple: n rounded up to a multiple of it, at most O (ours: channel counts that GPUs and
    vector units run fast, Torch-Pruning's round_to).
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
        raise ValueError(f"refill_mask: extra (refill+'s fraction of the pruned channels) must be in [0, 1], "
                         f"got {extra}")
    if int(channel_multiple) != channel_multiple or channel_multiple < 1:
        raise ValueError(f"refill_mask: channel_multiple must be an integer >= 1, got {channel_multiple!r}")
    if score in FEATURE_SCORES and feats is None:
        raise ValueError(f"refill score {score!r} scores the layer's output: "
                         "pass feats from conv_channel_stats")
    out_channels = mask.shape[0]
    mask2d, weight2d = mask.reshape(out_channels, -1), weight.detach().reshape(out_channels, -1)
    n = max(1, int(round(float(mask2d.sum()) / mask2d.shape[1])))
    n = min(out_channels, n + int(round(extra * (out_channels - n))))
    n = min(out_channels, ceil_div(n, channel_multiple) * channel_multiple)
    keep = top_k(CHANNEL_SCORES[score](weight2d.float(), mask2d, feats), n)
    return keep[:, None].expand_as(mask2d).to(mask.dtype).reshape(mask.shape).clone()


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
                raise ValueError(f"no conv output seen for {missing[:3]}: "
                                 "names must be conv weights of the model")
            grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: {"fmap_l1": outputs[n].detach().abs().sum((0, 2, 3)).cpu(),
                "fmap_l2": outputs[n].detach().pow(2).sum((0, 2, 3)).cpu(),
                "saliency": (outputs[n].detach() * g).abs().sum((0, 2, 3)).cpu()}
            for n, g in zip(names, grads)}


# ---- regroup (group-wise tickets): hypergraph, greedy partition, dense blocks ----
# regroup's column unit -> columns per unit, from the 4-D conv mask shape (O, C, kh, kw). A unit's
# columns are consecutive in REGROUP_UNIT_ORDER's column order. "vector": VECTOR_WIDTH consecutive input
# channels at one (ky, kx), one 16-byte load of fp16/bf16 channels-last input; a layer whose input
# channels are not a multiple of VECTOR_WIDTH keeps position units (documented rule, no warning).
VECTOR_WIDTH = 8  # channels per vector unit: 16 bytes of fp16/bf16, the GPU kernel's copy size
REGROUP_UNITS = {"position": lambda shape: 1, "channel": lambda shape: shape[2] * shape[3],
                 "vector": lambda shape: VECTOR_WIDTH if shape[1] % VECTOR_WIDTH == 0 else 1}
# regroup's column unit -> the flattened (c, ky, kx) columns in the order that makes its units consecutive
def _vector_order(shape):
    """Columns ordered (ky, kx, c) where vector units apply (C a multiple of VECTOR_WIDTH), else as
    they are."""
    cols = np.arange(int(np.prod(shape[1:])))
    return cols.reshape(shape[1], -1).T.ravel() if REGROUP_UNITS["vector"](shape) > 1 else cols


REGROUP_UNIT_ORDER = {"position": lambda shape: np.arange(int(np.prod(shape[1:]))),
                      "channel": lambda shape: np.arange(int(np.prod(shape[1:]))), "vector": _vector_order}


def regroup(masks, **knobs):
    """Regroup every layer: {name: (O, C, kh, kw) mask} -> ({name: block mask}, {name: blocks}).

    Paper: Alg. 3, layer by layer. knobs: regroup_mask's, with its defaults (t1 = groups, t2 =
    min_col_nnz, b1 = row_multiple, b2 = min_block_cols, the column unit and the column rule).
    """
    new_masks, blocks = {}, {}
    for name, mask in masks.items():
        new_masks[name], blocks[name] = regroup_mask(mask, **knobs)
    return new_masks, blocks


def regroup_mask(mask, unit="position", groups=8, row_multiple=8, min_col_nnz=1, min_block_cols=8,
                 block_columns="budget"):
    """One layer's regroup: partition rows, turn each group into a dense block, prune the rest.

    Paper: Alg. 3 (t1 = groups, t2 = min_col_nnz, b1 = row_multiple, b2 = min_block_cols), repeated
    on the rows left without a block while new blocks are found; rows in no block are pruned. Official:
    `regroup` in Structure-LTH calls hMETIS once (8 parts) and keeps parts of more than 16 rows, which
    keeps no block on layers of 64 rows or fewer; ours sizes groups from the layer (regroup_pass).
    `unit` (REGROUP_UNITS): "position" selects single (c, ky, kx) columns as in the paper, "channel"
    whole input channels (faster on CPU), "vector" VECTOR_WIDTH consecutive channels at one (ky, kx)
    (the GPU kernel's 16-byte loads; position units where C is not a multiple of VECTOR_WIDTH).
    `block_columns` (BLOCK_COLUMNS): budget (ours: the blocks' area is the layer's IMP nonzeros, or
    one minimal b1 x b2 block if that is larger), paper (Alg. 3 as written: every column with >= t2
    nonzeros in the group; denser than IMP), intended (the official width rule, corrected) or official
    (the official code as it runs, its row rules and its unstructured fallback included:
    official_regroup_mask; b1, b2 and t2 do not apply to it).
    Otherwise every block has at least b1 rows (a multiple of b1) and b2 columns, and a layer with
    nonzeros keeps a block (minimal_block when the first pass finds none; in a layer of fewer than b1
    rows, b1 and t2 are at most its rows: lth_ref's additions). mask: the conv's 0/1 mask (O, C, kh, kw),
    or its (O, K) view for unit "position". Returns (new mask of mask's shape, blocks) with blocks =
    [(rows, cols)] int64, rows disjoint, cols indexing the flattened (c, ky, kx) axis, and the new mask
    exactly the union of the blocks' rectangles.
    """
    check_regroup_args(mask, unit, block_columns, groups=groups, row_multiple=row_multiple,
                       min_col_nnz=min_col_nnz, min_block_cols=min_block_cols)
    units, order, cols_per_unit = mask_units(mask, unit)
    if block_columns == "official":
        return official_regroup_mask(mask, units, cols_per_unit, groups)
    b1, min_units = min(row_multiple, len(units)), min(ceil_div(min_block_cols, cols_per_unit), len(units.T))
    t2, minimal = min(min_col_nnz, b1), b1 * min_units * cols_per_unit   # t2 <= b1 in layers under b1 rows
    vertices = hypergraph_rows(units, b1)
    sim = row_similarity(units[vertices])                         # (n, n), computed once
    budget, rows_left, blocks = float(units.sum()), vertices, []
    while len(rows_left) >= b1 and (not blocks or block_columns != "budget" or budget >= minimal):
        at = np.searchsorted(vertices, rows_left)
        area = budget if blocks else max(budget, minimal)   # one minimal block
        found = regroup_pass(units[rows_left], sim[np.ix_(at, at)], cols_per_unit, area, groups, b1, t2,
                             min_units, BLOCK_COLUMNS[block_columns])
        if not found and not blocks and units.any():
            found = minimal_block(units[rows_left], b1, min_units)
        if not found:
            break
        for rows, unit_idx in found:
            cols = order[(unit_idx[:, None] * cols_per_unit + np.arange(cols_per_unit)).ravel()]
            blocks.append((rows_left[rows], cols))
            budget -= len(rows) * len(cols)
        rows_left = np.setdiff1d(rows_left, np.concatenate([rows_left[rows] for rows, _ in found]))
    blocks = [(torch.from_numpy(np.sort(r)).long(), torch.from_numpy(np.sort(c)).long())
              for r, c in sorted(blocks, key=lambda b: int(b[0].min()))]
    return kernels.block_mask(tuple(mask.shape), blocks).to(mask), blocks


def mask_units(mask, unit):
    """A layer's mask counted per regroup unit: ((O, U) nonzeros per unit, the column order that makes
    each unit's columns consecutive, columns per unit)."""
    cols_per_unit = REGROUP_UNITS[unit](mask.shape) if mask.dim() == 4 else 1
    order = REGROUP_UNIT_ORDER[unit](mask.shape) if mask.dim() == 4 else np.arange(mask.shape[1])
    m = mask.detach().reshape(mask.shape[0], -1).cpu().numpy().astype(np.float32)[:, order]
    return m.reshape(m.shape[0], -1, cols_per_unit).sum(2), order, cols_per_unit


def minimal_block(units, b1, min_units):
    """lth_ref's last resort when a layer's first pass finds no block (its groups too narrow under the
    rule, or too large for the area): one b1 x b2 block, the b2 most used units and the b1 rows with the
    most nonzeros in them, so that a layer with nonzeros keeps a block. Returns [(row idx, unit idx)]."""
    cols = np.sort(np.argsort(-units.sum(0), kind="stable")[:min_units])
    rows = np.sort(np.argsort(-units[:, cols].sum(1), kind="stable")[:b1])
    return [(rows, cols)]


def check_regroup_args(mask, unit, block_columns, **knobs):
    """ValueError unless regroup_mask's arguments make sense (public function: say what was expected)."""
    if unit not in REGROUP_UNITS:
        raise ValueError(f"unknown regroup unit {unit!r}; expected one of {list(REGROUP_UNITS)}")
    if block_columns not in BLOCK_COLUMNS:
        raise ValueError(f"unknown block column rule {block_columns!r}; "
                         f"expected one of {list(BLOCK_COLUMNS)}")
    if mask.dim() not in (2, 4) or (unit != "position" and mask.dim() != 4):
        raise ValueError(f"regroup_mask: expected the conv's mask (O, C, kh, kw)"
                         f"{' or its (O, K) view' if unit == 'position' else ''}, "
                         f"got shape {tuple(mask.shape)}")
    check_regroup_knobs(block_columns, unit, **knobs)
    if not torch.isin(mask.detach().cpu(), torch.tensor([0.0, 1.0], dtype=mask.dtype)).all():
        raise ValueError("regroup_mask: the mask must hold only 0 and 1")


def check_regroup_knobs(block_columns, unit, name=str, **knobs):
    """ValueError unless each knob is an integer >= 1 and t2 <= b1: a pass's smallest group has b1 rows,
    and no column of it holds more than b1 nonzeros (layers of few rows would keep no block); and the
    official rule on position units, the single (c, ky, kx) columns its code counts. name: how a message
    calls a knob (the CLI passes its flag)."""
    for knob, value in knobs.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name(knob)} must be an integer >= 1, got {value!r}")
    if block_columns == "official" and unit != "position":
        raise ValueError(f"{name('block_columns')} official runs the official code's rule, which counts "
                         f"single (c, ky, kx) columns: it needs {name('regroup_unit')} position, not {unit}")
    t2, b1 = knobs.get("min_col_nnz", 1), knobs.get("row_multiple", 1)
    if block_columns != "official" and t2 > b1:
        raise ValueError(f"{name('min_col_nnz')} (paper t2, {t2}) must be at most {name('row_multiple')} "
                         f"(paper b1, {b1}): a group of b1 rows has no column with more than b1 nonzeros, "
                         "so small layers would keep no block")


def hypergraph_rows(units, b1):
    """The vertices of the hypergraph: the non-empty rows. A layer with fewer than b1 of them takes empty
    rows (lowest index first) up to b1, so that it can keep one block instead of none (lth_ref's addition:
    the paper and the official code partition the non-empty rows only)."""
    rows = np.flatnonzero(units.sum(1) > 0)
    if 0 < len(rows) < b1:
        rows = np.union1d(rows, np.setdiff1d(np.arange(len(units)), rows)[:b1 - len(rows)])
    return rows


def regroup_pass(units, sim, cols_per_unit, area, groups, b1, min_col_nnz, min_units, column_rule):
    """One pass of Alg. 3 over the rows still without a block: partition them, then choose the blocks.

    Groups have g = max(b1, ceil(rows / t1) rounded up to b1) rows; the pass's last group keeps its rows
    most similar to each other, a multiple of b1 of them (none if it has fewer than b1: they wait for the
    next pass; this b1-multiple cut is lth_ref's addition, for the kernel's row tiles). units: (n, U)
    counts of these rows; sim: their (n, n) similarity; column_rule: a BLOCK_COLUMNS function.
    Returns [(row idx, unit idx)].
    """
    n = len(units)
    size = min(n, max(b1, ceil_div(ceil_div(n, groups), b1) * b1))
    parts = refine_partition(sim, partition_rows(sim, size))
    parts = [p[np.sort(np.argsort(-sim[np.ix_(p, p)].sum(1), kind="stable")[:len(p) // b1 * b1])]
             for p in parts]

    return column_rule(units, [p for p in parts if len(p)], cols_per_unit, area, min_col_nnz, min_units)


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


REFINE_ROUNDS = 10           # swap rounds at most; refinement usually converges in 2-5
SWAPS_EXAMINED_PER_PAIR = 4  # best candidate swaps examined per round, per ordered pair of groups
MIN_SWAP_GAIN = 1e-6         # similarity units: a smaller gain is float noise, not an improvement


def refine_partition(sim, groups, max_rounds=REFINE_ROUNDS):
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
        swaps = best_disjoint_swaps(gain, label, t)
        if not swaps:
            break
        for r, s, a, b in swaps:
            to_group[:, a] += sim[:, s] - sim[:, r]
            to_group[:, b] += sim[:, r] - sim[:, s]
            label[r], label[s] = b, a
    return [np.flatnonzero(label == g) for g in range(t)]


def best_disjoint_swaps(gain, label, t):
    """The best positive swaps (r, s, group of r, group of s) of one round, no group in two of them."""
    flat = gain.ravel()
    top = min(flat.size - 1, SWAPS_EXAMINED_PER_PAIR * t * t)
    best = np.argpartition(-flat, top)[:top]
    best = best[np.lexsort((best, -flat[best]))]            # by gain, then position: deterministic
    busy, swaps = np.zeros(t, dtype=bool), []
    for r, s in zip(*np.unravel_index(best, gain.shape)):
        a, b = label[r], label[s]
        if gain[r, s] <= MIN_SWAP_GAIN:
            break
        if not (busy[a] or busy[b]):
            busy[a] = busy[b] = True
            swaps.append((r, s, a, b))
    return swaps


def choose_block_columns(units, groups, unit_cost, area, min_col_nnz, min_block_units):
    """Ours ("budget"): pick each group's dense columns under one area budget; keep groups wide enough.

    Paper: Alg. 3, "select the columns with >= t2 nonzeros in the group; a group with >= b2 such columns
    becomes a dense block" (paper_block_columns). Ours sets the threshold by density: every (group,
    column) pair with >= t2 nonzeros is ranked by the fraction of the group's rows that use the column
    (nonzeros gained per refilled element), and the best pairs are taken until the blocks' total area
    reaches `area` (the layer's IMP nonzeros), so the regrouped density stays that of IMP.
    A group left with fewer than b2 columns is no block: the narrowest such group is left out and the
    area shared again among the others, until every group left is wide enough (none of the area goes to
    a group that cannot use it). units: (n, U) counts; groups: row index arrays; unit_cost: mask elements
    per unit and row; min_block_units: b2 in units. Returns [(group rows, unit idx)].
    """
    live = list(groups)
    while live:
        chosen = densest_pairs(units, live, unit_cost, area, min_col_nnz)
        width = chosen.sum(1)
        if (width >= min_block_units).all():
            return [(g, np.flatnonzero(chosen[i])) for i, g in enumerate(live)]
        live.pop(int(np.argmin(width)))
    return []


def densest_pairs(units, groups, unit_cost, area, min_col_nnz):
    """choose_block_columns' ranking: (t, U) bool, the (group, column) pairs with >= t2 nonzeros taken by
    the fraction of the group's rows that use the column, best first, while their area fits `area`."""
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    counts = np.stack([units[g].sum(0) for g in groups])     # (t, U) nonzeros per group and column
    frac = counts / (sizes[:, None] * unit_cost)
    frac[counts < min_col_nnz] = -1.0                          # never worth a block (paper's t2)
    order = np.argsort(-frac, axis=None, kind="stable")
    cost = np.repeat(sizes, counts.shape[1])[order] * unit_cost
    take = order[(np.cumsum(cost) <= area) & (frac.flat[order] > 0)]
    chosen = np.zeros(counts.shape, dtype=bool)
    chosen.flat[take] = True
    return chosen


def paper_block_columns(units, groups, unit_cost, area, min_col_nnz, min_block_units):
    """Alg. 3 as written ("paper"): a group's block takes every column with >= t2 nonzeros in the group,
    and the group is a block if that makes >= b2 columns. No budget (`area` is ignored): the zeros inside
    the blocks are refilled, so the ticket is denser than IMP's (the paper's Tables A4, A5, A7)."""
    found = [(g, np.flatnonzero(units[g].sum(0) >= min_col_nnz)) for g in groups]
    return [(g, cols) for g, cols in found if len(cols) >= min_block_units]


OFFICIAL_WIDTH_RATIO = 1.5  # the official column rule's ratio (its variable `t1`, not the paper's t1)
OFFICIAL_BLOCK_ROWS = 32    # official `nn`: a part of more than 32 rows is cut at a multiple of 32
OFFICIAL_MIN_ROWS = 16      # official `B2`: a part needs more than 16 rows to become a block (a row count)


def intended_block_columns(units, groups, unit_cost, area, min_col_nnz, min_block_units,
                           ratio=OFFICIAL_WIDTH_RATIO):
    """The official width rule as it was meant ("intended"): per group, the shortest prefix of its columns
    (most used first) that leaves every row fewer than (prefix width) / ratio nonzeros outside the block.

    Official: `regroup` in Structure-LTH's pruning_utils.py with its loop corrected (it tests the unsorted
    column i, stops at the first failing row before later rows are counted; official_width runs it as
    written). lth_ref's additions: b2 holds as in the other rules, and a group no width satisfies gets
    every column (the official code gives it no block). `area` and t2 are ignored.
    """
    found = []
    for g in groups:
        sub = units[g]                                             # (g, U)
        order = np.argsort(-sub.sum(0), kind="stable")
        uncovered = sub.sum(1)[:, None] - np.cumsum(sub[:, order], axis=1)   # (g, U) nonzeros outside
        ok = uncovered.max(0) < np.arange(1, sub.shape[1] + 1) * unit_cost / ratio
        width = max(int(np.argmax(ok)) + 1 if ok.any() else sub.shape[1], min_block_units)
        found.append((g, np.sort(order[:width])))
    return found


def official_width(part, ratio=OFFICIAL_WIDTH_RATIO):
    """The official width loop on one part, exactly as it runs: the width i (the block takes the i most
    used columns), or None when no width passes.

    Official: pruning_utils.py `regroup`, lines 459-482. For i = 1, 2, ..., K-1 the rows are visited in
    order; a row's count of nonzeros drops by one when it has a nonzero in column i (the unsorted column:
    the sorted column was meant), and the first row whose count * ratio >= i ends the visit, so later rows
    miss this i's decrement (counts carry over to the next i). The first i no row stops is the width.
    part: (g, K) 0/1 array, the part's rows over every column of the layer.
    """
    part = np.asarray(part) != 0
    left, rows = part.sum(1).tolist(), part.tolist()
    for i in range(1, part.shape[1]):
        for j, row in enumerate(rows):
            left[j] -= row[i]
            if i <= ratio * left[j]:
                break
        else:
            return i
    return None


def official_block_columns(units, groups, unit_cost, area, min_col_nnz, min_block_units):
    """The official column and row rules as they run ("official"): per part, official_width's count of
    its most used columns (ties: lower index first); no block for a part where no width passes or of at
    most 16 rows (official B2); a part of more than 32 rows becomes two blocks with the same columns, the
    first multiple of 32 rows and the rest (pruning_utils.py:472-482). t2, b2, `area` are not part of it.
    units: (n, U) counts; with unit "position" the columns are the official code's (its exact loop)."""
    found = []
    for g in groups:
        width = official_width(units[g])
        if width is None or len(g) <= OFFICIAL_MIN_ROWS:
            continue
        cols = np.sort(np.argsort(-(units[g] > 0).sum(0), kind="stable")[:width])
        cut = len(g) // OFFICIAL_BLOCK_ROWS * OFFICIAL_BLOCK_ROWS if len(g) > OFFICIAL_BLOCK_ROWS else len(g)
        found += [(rows, cols) for rows in (g[:cut], g[cut:]) if len(rows)]
    return found


def official_regroup(units, groups):
    """The official layer rule ("official"): one partition of the non-empty rows into `groups` parts,
    official_block_columns on each, and when no part gets a block, None: the layer keeps its unstructured
    mask (pruning_utils.py:484-492). Official: hMETIS (shmetis, 8 parts, UBfactor 10: parts may differ in
    size); ours: partition_rows + refine_partition into parts of ceil(rows / groups) rows. No b1 padding,
    no b1-multiple cut, no second pass. units: (O, U) counts. Returns [(row idx, unit idx)] or None."""
    rows = np.flatnonzero(units.sum(1) > 0)
    if len(rows) == 0:
        return None
    sim = row_similarity(units[rows])
    parts = refine_partition(sim, partition_rows(sim, ceil_div(len(rows), groups)))
    found = official_block_columns(units[rows], parts, 1, 0.0, 1, 1)
    return [(rows[r], c) for r, c in found] or None


def official_regroup_mask(mask, units, cols_per_unit, groups):
    """regroup_mask under --block-columns official: (new mask, blocks). A layer the official rule leaves
    unstructured is returned as it is, as one block per non-empty row (its nonzero columns), so that the
    new mask is still exactly the union of the blocks."""
    m = mask.detach().reshape(mask.shape[0], -1).cpu().numpy()
    found = official_regroup(units, groups)
    if found is None:
        blocks = [(torch.tensor([r]), torch.from_numpy(np.flatnonzero(m[r])).long())
                  for r in np.flatnonzero(m.sum(1) > 0)]
        return mask.clone(), blocks
    blocks = [(torch.from_numpy(np.sort(r)).long(),
               torch.from_numpy((c[:, None] * cols_per_unit + np.arange(cols_per_unit)).ravel()).long())
              for r, c in sorted(found, key=lambda b: int(b[0].min()))]
    return kernels.block_mask(tuple(mask.shape), blocks).to(mask), blocks


# regroup's rule for a group's dense columns: (units, groups, unit_cost, area, t2, b2 units)
BLOCK_COLUMNS = {
    "budget": choose_block_columns,        # ours: IMP's density, the densest (group, column) pairs first
    "paper": paper_block_columns,          # Alg. 3: every column with >= t2 nonzeros in the group
    "intended": intended_block_columns,    # the official prefix/1.5 width rule, its loop corrected
    "official": official_block_columns,    # the official code as it runs (regroup_mask: its layer rule too)
}


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


# ---- the post-processing methods: their functions, knobs, and the masks training keeps ----
POSTPROCESS = {  # method -> (its function, arguments the method fixes); the rest are its knobs
    "imp": (None, {}),                   # unstructured: the trunk's mask as it is
    "refill": (refill, dict(extra=0.0)),  # Alg. 2: channel-wise tickets
    "refill+": (refill_plus, {}),        # Alg. 2 with extra channels
    "regroup": (regroup, {}),            # Alg. 3: group-wise tickets
}
STRUCTURAL = ("refill", "refill+", "regroup")  # methods whose dead output channels are made exactly dead


def method_knobs(method):
    """{knob: its default} of a method: the keyword arguments of its per-layer function (refill_mask,
    regroup_mask), with the defaults its own function sets (refill+'s extra), less those it fixes."""
    fn, fixed = POSTPROCESS[method]
    if fn is None:
        return {}
    defaults = lambda f: {p.name: p.default for p in inspect.signature(f).parameters.values()
                          if p.default is not inspect.Parameter.empty}
    knobs = {**defaults(regroup_mask if fn is regroup else refill_mask), **defaults(fn)}
    return {k: v for k, v in knobs.items() if k not in fixed and k != "feats"}


def needs_feats(method, score):
    """True when post-processing with this method and refill score needs conv_channel_stats."""
    return method in ("refill", "refill+") and score in FEATURE_SCORES


def training_masks(model, masks, method):
    """What is multiplied into the parameters after every step: the conv masks and, for structural
    methods, the BN scale and shift of every output channel whose conv row is pruned (models.bn_masks).
    Such a channel then outputs relu(0) = 0 exactly, and models.slim_model can remove it. The trunk and
    imp branches stay the paper's IMP (BN free)."""
    return {**masks, **model_zoo.bn_masks(model, masks)} if method in STRUCTURAL else masks


# ---- training: rewind, retrain with the step schedule, evaluate ----
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # --amp: autocast dtype
# after rewinding to epoch k: go on from k (paper), or run from 0 (official)
LR_SCHEDULES = ("resume", "restart")
EVAL_BATCH = 500  # images per evaluation forward: evaluation needs no gradients, so large batches


def rewind(model, state, masks):
    """Load the rewind state (weights, BN affine and running stats, FC) and zero the pruned weights.

    Paper: Sec. 3.1, weight rewinding to epoch k (Frankle et al. 2020). Official: loads the epoch-k
    checkpoint the same way.
    """
    model.load_state_dict(state)
    apply_masks(model, masks)


def retrain(model, data, cfg, masks, state, first_epoch, level, net=None, procs=None, resume=None,
            after_epoch=None):
    """Rewind to `state`, keep `masks` applied, train from first_epoch to the end of the schedule.

    Paper: Alg. 1 / Sec. 3.1: weights <- theta_k * m, then SGD with Table 1's step schedule from epoch k
    (the schedule resumes, as Frankle et al. 2020; first_epoch 0 with --lr-schedule restart, as the
    official main_imp.py); the final epoch's test accuracy is recorded, nothing is chosen on the test set.
    model: trained in place; data: a data.py dataset on the model's device; cfg: the Config (Table 1's
    settings, amp, channels_last, seed, val_split); masks: what is multiplied in after every step
    (training_masks). net: what the steps call (default: the model; its DDP / compiled wrapper);
    procs: this process under torchrun (default: one process). resume: an epoch checkpoint's optimizer,
    scaler and metrics (`state` is then its model). after_epoch(metrics, optimizer, scaler): checkpointing
    and logging. Returns the last epoch's metrics (epoch, loss, train_acc, test and, with a validation
    split, val accuracy). Diverged (with the epoch and learning rate) when the loss is not finite."""
    net, procs = model if net is None else net, procs or Processes()
    rewind(model, state, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scaler = grad_scaler(data.device, cfg.amp)
    metrics = None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        metrics = resume["metrics"]
    pairs = mask_pairs(model, masks)
    for epoch in range(first_epoch, cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        generator = torch.Generator(device=data.device).manual_seed(mix_seed(cfg.seed, level, epoch))
        try:
            loss, train_acc = train_epoch(net, data, cfg, optimizer, scaler, pairs, generator, procs)
        except Diverged as e:
            raise Diverged(e.loss, epoch + 1, lr_at(epoch, cfg)) from None
        splits = ("test", "val") if cfg.val_split else ("test",)
        metrics = dict(epoch=epoch + 1, loss=loss, train_acc=train_acc,
                       **{s: evaluate(model, data, cfg, s, procs) for s in splits})
        if after_epoch is not None:
            after_epoch(metrics, optimizer, scaler)
    return metrics


DIVERGENCE_CHECK_STEPS = 100  # steps between checks that the loss is finite (one sync and, under torchrun,
                              # one small collective: every process stops at the same step)


class Diverged(Exception):
    """The training loss is not a finite number any more: the weights are lost, training stops."""

    def __init__(self, loss, epoch=None, lr=None):
        super().__init__(f"training loss {loss}")
        self.loss, self.epoch, self.lr = loss, epoch, lr


def lr_at(epoch, cfg):
    """Step schedule: cfg.lr, x0.1 at each epoch of cfg.lr_drops."""
    return cfg.lr * 0.1 ** sum(epoch >= drop for drop in cfg.lr_drops)


def mask_pairs(model, masks):
    """[(parameter, mask)] of the unwrapped model (DDP and torch.compile share its parameters)."""
    params = dict(model.named_parameters())
    return [(params[n], m) for n, m in masks.items()]


@torch.no_grad()
def remask(pairs):
    """weight *= mask for every (parameter, mask) pair, as one foreach multiply (one launch per dtype and
    device on a GPU, not one per weight): pruned weights stay exactly 0."""
    if pairs:
        torch._foreach_mul_([p for p, _ in pairs], [m for _, m in pairs])


def train_epoch(net, data, cfg, optimizer, scaler, pairs, generator, procs=None, penalty=None):
    """One epoch of SGD over global batches of cfg.batch_size examples (this process: its slice of each).

    pairs: mask_pairs, applied after every step; generator: the epoch's seeded draw (order, augmentation);
    penalty: a term added to every step's loss (ADMM's). A last global batch smaller than the number of
    processes is skipped (some would get no example). Returns (mean train loss, train accuracy) over all
    processes; sums stay on the device but every DIVERGENCE_CHECK_STEPS steps. Diverged when the loss is
    not finite.
    """
    procs = procs or Processes()
    net.train()
    sums = torch.zeros(2, device=data.device)
    seen = 0
    for i, (x, y) in enumerate(datasets.train_batches(data, cfg.batch_size, generator,
                                                      procs.rank, procs.world)):
        global_size = min(cfg.batch_size, data.num_train - i * cfg.batch_size)
        if global_size < procs.world:
            break
        loss_sum, correct = train_step(net, optimizer, scaler, pairs, x, y, procs.world / global_size, cfg,
                                       penalty)
        sums += torch.stack([loss_sum, correct.float()])
        seen += global_size
        if (i + 1) % DIVERGENCE_CHECK_STEPS == 0:
            total = procs.sum([sums[0].item()], data.device)[0]   # every process checks the same total
            if not math.isfinite(total):
                raise Diverged(total / seen)
    loss_sum, correct = procs.sum(sums.tolist(), data.device)
    if not math.isfinite(loss_sum):
        raise Diverged(loss_sum / seen)
    return loss_sum / seen, correct / seen


def train_step(net, optimizer, scaler, pairs, x, y, loss_scale, cfg, penalty=None):
    """One SGD step on (x, y), then every (parameter, mask) pair multiplied: pruned weights stay exactly 0.

    loss_scale: processes / global batch size, so that the gradient averaged over processes is the
    global batch's mean; penalty(): a term of the weights added in full on every process. Returns
    (loss sum, number correct) as device tensors."""
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(cfg.amp, x.device):
        out = net(x)
        loss = F.cross_entropy(out.float(), y, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * loss_scale + (penalty() if penalty is not None else 0.0)).backward()
    scaler.step(optimizer)
    scaler.update()
    remask(pairs)
    return loss.detach(), (out.argmax(1) == y).sum()


def grad_scaler(device, amp):
    """--amp's loss scaler: fp16 scales the loss (its gradients underflow otherwise), a no-op else."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


def autocast(amp, device):
    """--amp's autocast context (a no-op for off)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model, data, cfg, split="test", procs=None):
    """Accuracy (fraction correct) of the model on the test (or val) split, in eval mode, with cfg's amp
    and channels_last; each process (procs, default one) evaluates its shard and the counts are summed."""
    procs = procs or Processes()
    model.eval()
    correct = torch.zeros((), device=data.device)
    for x, y in datasets.eval_batches(data, EVAL_BATCH, split, procs.rank, procs.world):
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.amp, data.device):
            correct += (model(x).argmax(1) == y).sum()
    return procs.sum([correct.item()], data.device)[0] / len(data.split_labels(split))


# ---- the experiment: an unstructured trunk and structural branches ----
@dataclasses.dataclass
class Experiment:
    """What the experiment's steps share: the settings (Config), the model and the net that trains it (the
    model, or its DDP / compiled wrapper sharing its parameters), the data (on the device), this process's
    place under torchrun (Processes: is_main writes files and prints) and the log; `held` keeps, per run,
    the last level this process trained: {run name: (level, masks, trained state)}, what the next level
    prunes. The training steps above take what they read instead."""
    cfg: typing.Any
    model: nn.Module
    net: nn.Module
    data: typing.Any
    procs: typing.Any
    log: typing.Callable = print
    held: dict = dataclasses.field(default_factory=dict)


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


@dataclasses.dataclass
class Start:
    """Where a ticket's training starts: its masks (with blocks and the post-processing's per-layer
    stats for a branch), the state its weights are rewound to, and the first epoch of the schedule."""
    masks: dict
    blocks: dict | None
    stats: dict | None
    state: dict
    first_epoch: int


def ticket_path(run, level):
    return os.path.join(run.path, f"level_{level:02d}", "ticket.pt")


def checkpoint_path(run, level):
    """The epoch checkpoint of an unfinished level (removed once its ticket is written)."""
    return os.path.join(run.path, f"level_{level:02d}", "checkpoint.pt")


def trained(exp, run, level):
    """(masks, trained state) of a finished level of `run`: in memory when this process just trained it,
    else (an earlier command or another process trained it) read from its ticket.pt."""
    if exp.held.get(run.name, (None,))[0] == level:
        return exp.held[run.name][1:]
    ticket = load_ticket(ticket_path(run, level), exp.model)
    return ticket["masks"], ticket["state_dict"]


# mask sources: (experiment, level) -> (the trunk's mask m_L, the trained state its weights came from)
def imp_source(exp, level):
    """IMP (Alg. 1): trunk level L-1's trained weights, magnitude_prune'd by --prune-rate."""
    masks, state = trained(exp, trunk_run(exp.cfg), level - 1)
    return magnitude_prune({n: state[n] for n in masks}, masks, exp.cfg.prune_rate), state


def omp_source(exp, level):
    """OMP: one-shot global magnitude pruning of the trained dense network (level 0) to density 0.8^L."""
    masks, state = trained(exp, trunk_run(exp.cfg), 0)
    scores = {n: state[n].abs() for n in masks}
    return prune_to_density(scores, level_density(exp.cfg.prune_rate, level)), state


def random_source(exp, level):
    """RP: uniformly random masks with OMP's layerwise densities at this level."""
    masks, state = omp_source(exp, level)
    return (random_masks(masks, torch.Generator().manual_seed(mix_seed(exp.cfg.seed, level, RANDOM_MASK))),
            state)


def init_scores_source(criterion):
    """A pruning-at-initialization source: `criterion` scores theta_0 on one seeded training batch (SNIP,
    GraSP: --snip-samples, --grasp-samples samples when given, in passes of --batch-size)."""
    def source(exp, level):
        state = init_state(exp)
        count = {snip_scores: exp.cfg.snip_samples, grasp_scores: exp.cfg.grasp_samples}.get(criterion)
        images, labels = score_batch(exp, 0) if count is None else score_samples(exp, count)
        more = dict(chunk=exp.cfg.batch_size) if count is not None else {}
        scores = criterion(network_at(exp, state), list(prunable_weights(exp.model)), images, labels, **more)
        return prune_to_density(scores, level_density(exp.cfg.prune_rate, level)), state
    return source


def synflow_source(exp, level):
    """SynFlow: data-free, iterative (--synflow-rounds) at theta_0, to density 0.8^L."""
    state = init_state(exp)
    masks = synflow_masks(network_at(exp, state), list(prunable_weights(exp.model)),
                          level_density(exp.cfg.prune_rate, level), exp.cfg.synflow_rounds,
                          exp.data.image_shape)
    return masks, state


def admm_source(exp, level):
    """ADMM: the trained dense network (level 0) ADMM-trained toward density 0.8^L (--admm-iterations epochs
    at --admm-lr, --admm-rho), then pruned hard. One ADMM run per level, kept in the trunk's level
    directory (admm.pt) for the branch and the trunk of that level. Its state: the ADMM-trained weights."""
    cfg = exp.cfg
    path = os.path.join(os.path.dirname(ticket_path(trunk_run(cfg), level)), "admm.pt")
    if os.path.exists(path):
        cached = load_file(path, "ADMM result")
        return cached["masks"], cached["state"]
    model = exp.model                          # trained in place, through exp.net (DDP / compile share it)
    model.load_state_dict(trained(exp, trunk_run(cfg), 0)[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.admm_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scaler = grad_scaler(exp.data.device, cfg.amp)

    def w_step(iteration, penalty):            # one epoch on loss + penalty, a draw of its own
        generator = torch.Generator(device=exp.data.device).manual_seed(
            mix_seed(cfg.seed, level, ADMM_EPOCHS - iteration))
        try:
            train_epoch(exp.net, exp.data, cfg, optimizer, scaler, [], generator, exp.procs, penalty)
        except Diverged as e:
            raise UsageError(f"ADMM for trunk level {level} diverged in W-step {iteration + 1}: the training "
                             f"loss is {e.loss}; lower --admm-lr ({cfg.admm_lr:g}) or --admm-rho "
                             f"({cfg.admm_rho:g}). Nothing was written for this level") from None
    masks = admm_prune(model, list(prunable_weights(model)), level_density(cfg.prune_rate, level), w_step,
                       cfg.admm_iterations, cfg.admm_rho)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if exp.procs.is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save(dict(masks={n: m.cpu() for n, m in masks.items()},
                  state={k: v.cpu() for k, v in state.items()}), path)
    exp.procs.barrier()                        # every rank finds the file from now on
    return masks, state


def import_source(exp, level):
    """Imported masks (--import-masks): file L is trunk level L's mask, trained like a one-shot source's
    (rewound to theta_k). Refill's scores use the file's trained weights where it has them (the `_orig`
    tensors of torch.nn.utils.prune, a ticket's state_dict), else the dense network's (level 0)."""
    import lth_tools                           # mask import lives with the tools; loaded when used
    masks, weights = lth_tools.read_imported_masks(exp.cfg.import_masks[level - 1], exp.model, exp.cfg.arch)
    return masks, {**trained(exp, trunk_run(exp.cfg), 0)[1], **weights}


MASK_SOURCES = {
    "imp": imp_source,                            # iterative magnitude pruning (the paper's default)
    "omp": omp_source,                            # one-shot magnitude pruning
    "random": random_source,                      # random pruning at OMP's layer densities
    "snip": init_scores_source(snip_scores),      # Lee et al. 2019
    "grasp": init_scores_source(grasp_scores),    # Wang et al. 2020
    "synflow": synflow_source,                    # Tanaka et al. 2020
    "admm": admm_source,                          # Zhang et al. 2018
    "import": import_source,                      # masks from files (--import-masks)
}


def branch_masks(exp, run, level):
    """A branch level's (masks, blocks, per-layer stats): the trunk's m_L post-processed by the branch's
    method; group-aware (App. A1, Alg. 4): the branch's own level L-1 (level 0: the dense trunk) pruned
    by --prune-rate instead. Refill's scores use the weights the unstructured mask was pruned from."""
    if run.group_aware:
        masks, state = trained(exp, run if level > 1 else trunk_run(exp.cfg), level - 1)
        masks = magnitude_prune({n: state[n] for n in masks}, masks, exp.cfg.prune_rate)
    else:
        masks, state = MASK_SOURCES[exp.cfg.mask_source](exp, level)
    knobs = branch_knobs(exp.cfg, run.method)
    feats = None
    if needs_feats(run.method, knobs.get("score")):
        feats = conv_channel_stats(network_at(exp, state), list(masks), *score_batch(exp, level))
    new, blocks = postprocess(run.method, {n: state[n] for n in masks}, masks, feats, **knobs)
    cut = [n for n in new if masks[n].any() and not new[n].any()]
    if cut:
        raise UsageError(f"{run.name} level {level}: {run.method} with {knobs} keeps no weight of "
                         f"{len(cut)} layer(s) ({', '.join(cut[:3])}), which cuts the network; the built-in "
                         "post-processors keep part of every layer that has weights, so check the one used")
    stats = {n: layer_stats(masks[n], new[n], None if blocks is None else blocks[n]) for n in new}
    return new, blocks, stats


def level_start(exp, run, level):
    """The Start of a level. Level 0: the dense network at theta_0. Trunk level L: the mask source's m_L.
    Branch level L: branch_masks. Then rewind to theta_k and resume the schedule at epoch k, or
    (--init reinit) a fresh seeded initialization, an epoch-0 network that trains the whole schedule:
    the paper's random tickets (Tables A3, A4)."""
    if level == 0:
        state = init_state(exp)
        return Start(ones_masks({n: state[n] for n in prunable_weights(exp.model)}), None, None, state, 0)
    if run.name == "trunk":
        masks, blocks, stats = MASK_SOURCES[exp.cfg.mask_source](exp, level)[0], None, None
        warn_empty_layers(exp, level, masks)
    else:
        masks, blocks, stats = branch_masks(exp, run, level)
    if run.init == "reinit":
        torch.manual_seed(mix_seed(exp.cfg.seed, level, REINIT))
        return Start(masks, blocks, stats,
                     model_zoo.MODELS[exp.cfg.arch](exp.data.num_classes).state_dict(), 0)
    return Start(masks, blocks, stats, rewind_state(exp), first_epoch(exp.cfg, run, level))


def warn_empty_layers(exp, level, masks):
    """One WARNING when a trunk level's mask keeps no weight of some layers (the global prune emptied
    them): their outputs are 0, which cuts a network without shortcuts around them."""
    empty = [n for n, m in masks.items() if not m.any()]
    fix = f"the file {exp.cfg.import_masks[level - 1]} empties them (another network's masks?)" \
        if exp.cfg.mask_source == "import" else "fewer --levels or a smaller --prune-rate keeps them"
    if empty and exp.procs.is_main:
        print(f"WARNING: trunk level {level} keeps no weight of {len(empty)} layer(s) ({', '.join(empty)}): "
              "their outputs are 0, so a network without shortcuts around them (VGG) predicts one class; "
              f"{fix}", file=sys.stderr)


def first_epoch(cfg, run, level):
    """The epoch a level's schedule starts at: the rewind epoch k for rewound tickets (--lr-schedule
    resume), else 0 (the dense level 0, re-initialized tickets, and --lr-schedule restart)."""
    return cfg.rewind_epoch if level > 0 and run.init == "rewind" and cfg.lr_schedule == "resume" else 0


def init_state(exp):
    """theta_0: the seeded initialization, init.pt."""
    return model_state(exp, "init.pt", "initialization")


def rewind_state(exp):
    """theta_k: the full state at the end of epoch k of the dense level 0 (k = 0: the initialization)."""
    return model_state(exp, "init.pt" if exp.cfg.rewind_epoch == 0 else "rewind.pt", "rewind state")


def model_state(exp, name, what):
    """A state_dict the experiment saved, checked against its network: a file of another kind (a slim
    export written over it, another --arch's) is a DamagedFile naming it, not a load_state_dict traceback."""
    path = os.path.join(exp.cfg.out_dir, name)
    state = load_file(path, what)
    if not state_fits(exp.model, state):
        first = f"the {what} {path} is not a state of this experiment's {exp.cfg.arch} network"
        raise DamagedFile(f"{first}. {DAMAGED_FIX[what]}", first)
    return state


def state_fits(model, state):
    """True when `state` is a state_dict of `model`'s network: the same names, tensors of the same shapes."""
    want = model.state_dict()
    return isinstance(state, dict) and state.keys() == want.keys() and all(
        torch.is_tensor(state[k]) and state[k].shape == want[k].shape for k in want)


def score_batch(exp, level):
    """One seeded training batch (the first of a draw no training epoch uses): (images, labels)."""
    g = torch.Generator(device=exp.data.device).manual_seed(mix_seed(exp.cfg.seed, level, SCORE_BATCH))
    return next(datasets.train_batches(exp.data, exp.cfg.batch_size, g))


def score_samples(exp, count):
    """`count` seeded training samples: score_batch's draw, continued over the epoch's next batches
    (all the training set when it is smaller). Returns (images, labels)."""
    g = torch.Generator(device=exp.data.device).manual_seed(mix_seed(exp.cfg.seed, 0, SCORE_BATCH))
    batches, taken = [], 0
    for images, labels in datasets.train_batches(exp.data, exp.cfg.batch_size, g):
        batches.append((images, labels))
        taken += len(images)
        if taken >= count:
            break
    return tuple(torch.cat(t)[:count] for t in zip(*batches))


def network_at(exp, state):
    """A copy of the experiment's model holding `state`, to score a mask on (the model itself is left as
    it is)."""
    model = copy.deepcopy(exp.model)
    model.load_state_dict(state)
    return model


def train_level(exp, run, level, eta):
    """Train one ticket: its Start (or its epoch checkpoint), retrain with a checkpoint and a log line
    after every epoch, then its ticket.pt (and the branch's layers.csv); its masks and trained state stay
    in exp.held for the next level. Returns its result row. A loss that diverges, or a stop by a signal,
    leaves the last epoch checkpoint and nothing else of the level."""
    cfg, model = exp.cfg, exp.model
    ckpt_path = checkpoint_path(run, level)
    start, ckpt = resume_or_start(exp, run, level, ckpt_path)
    masks = {n: m.to(exp.data.device) for n, m in start.masks.items()}
    exp.procs.check_same(masks, exp.data.device)
    progress = dict(epoch=start.first_epoch, seconds=ckpt["seconds"] if ckpt else 0.0, t0=time.perf_counter())
    try:
        metrics = retrain(model, exp.data, cfg, training_masks(model, masks, run.method), start.state,
                          start.first_epoch, level, net=exp.net, procs=exp.procs, resume=ckpt,
                          after_epoch=checkpointer(exp, run, level, start, ckpt_path, progress, eta))
    except Diverged as e:
        raise UsageError(diverged_message(exp, run, level, e, ckpt_path)) from None
    except (KeyboardInterrupt, Stopped) as e:
        e.where = f"{run.name} level {level} in epoch {min(progress['epoch'] + 1, cfg.epochs)}/{cfg.epochs}"
        raise
    counts = whole_model_counts(model, masks, exp.data.image_shape)
    row = result_row(cfg, run, level, masks, start.blocks, start.stats, metrics, progress["seconds"], counts)
    exp.held[run.name] = (level, {n: m.cpu().clone() for n, m in start.masks.items()},
                          {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    if exp.procs.is_main:
        write_ticket(exp, run, level, start, row)
        remove_if_there(ckpt_path)
    exp.procs.barrier()                        # the level is finished on disk before any rank goes on
    return row


def resume_or_start(exp, run, level, ckpt_path):
    """(Start, checkpoint or None): an unfinished level's epoch checkpoint, else level_start. A checkpoint
    that cannot be read (cut short, damaged) is set aside with one WARNING and the level starts over."""
    if exp.procs.is_main:
        os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
    ckpt = None
    if os.path.exists(ckpt_path):
        try:
            ckpt = load_checkpoint(ckpt_path, exp.model)
        except DamagedFile as e:
            print(f"WARNING: {e.first_line}: set aside as {ckpt_path}.damaged; {run.name} level {level} "
                  "starts over", file=sys.stderr)
            exp.procs.barrier()                # every rank has tried to read it before it moves
            if exp.procs.is_main:
                os.replace(ckpt_path, ckpt_path + ".damaged")
    if ckpt is not None:
        exp.log(f"{run.name} level {level}: resuming at epoch {ckpt['metrics']['epoch']} from {ckpt_path}")
        return Start(ckpt["masks"], ckpt["blocks"], ckpt["stats"], ckpt["model"],
                     ckpt["metrics"]["epoch"]), ckpt
    return level_start(exp, run, level), None


def checkpointer(exp, run, level, start, ckpt_path, progress, eta):
    """retrain's after_epoch: the epoch checkpoint (and, in level 0, the rewind state theta_k), then one
    progress line (level, epoch, loss, accuracies, density, seconds, ETA). progress: epoch, seconds, t0."""
    cfg, model, dens = exp.cfg, exp.model, density(start.masks)

    def after_epoch(metrics, optimizer, scaler):
        dt = time.perf_counter() - progress["t0"]
        progress.update(epoch=metrics["epoch"], seconds=progress["seconds"] + dt, t0=time.perf_counter())
        if exp.procs.is_main:
            if level == 0 and metrics["epoch"] == cfg.rewind_epoch:
                save(model.state_dict(), os.path.join(cfg.out_dir, "rewind.pt"))
            save(dict(masks=start.masks, blocks=start.blocks, stats=start.stats, model=model.state_dict(),
                      optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), metrics=metrics,
                      seconds=progress["seconds"]), ckpt_path)
        exp.log(epoch_line(run, level, metrics, cfg, dens, dt, eta.update(dt)))
    return after_epoch


def diverged_message(exp, run, level, e, ckpt_path):
    """What a diverged level tells the user: where, the loss, what was kept and how to go on."""
    cfg = exp.cfg
    kept = f"its last good epoch checkpoint is kept ({ckpt_path})" if os.path.exists(ckpt_path) else \
        "it had no finished epoch"
    amp = " or --amp off" if cfg.amp != "off" else ""
    return (f"{run.name} level {level} diverged in epoch {e.epoch}/{cfg.epochs} at learning rate {e.lr:g}: "
            f"the training loss is {e.loss} (not a finite number). "
            f"Nothing was written for this level; {kept}. "
            f"Training is deterministic (on GPUs up to low-order bits), so the same command would diverge "
            f"again: lower --lr{amp}. --lr and "
            f"--amp are trunk settings, which {cfg.out_dir} refuses to change once level 0 has started: run "
            f"the new setting with another --out-dir, or delete {cfg.out_dir} to start it over")


def run_experiment(cfg, log=print):
    """One trunk and (per --method/--init) one branch: train whatever is missing, reuse the rest.

    Paper: Sec. 3.1-3.2 with Alg. 1-3: trunk level 0 is the dense network, trunk level L the mask
    source's unstructured ticket (IMP: level L-1 pruned by 20%), branch level L that mask refilled or
    regrouped, rewound (or re-initialized) and retrained. Order: trunk 0, branch 1, trunk 1, branch 2,
    ...; a group-aware branch is its own chain from the dense level 0. Writes each run's results and
    the experiment's combined results.csv; returns the combined rows."""
    exp, trunk, branch = open_experiment(cfg, log)
    check_finished_tickets(cfg.out_dir, exp.model)
    order = [(trunk, 0)]
    for level in range(1, cfg.levels + 1):
        order += [(branch, level)] if branch is not None else []
        order += [(trunk, level)] if branch is None or not branch.group_aware else []
    todo = [(run, level) for run, level in order if not os.path.exists(ticket_path(run, level))]
    warn_kept_after_missing(exp, order, todo)
    eta = Eta(sum(cfg.epochs - first_epoch(cfg, run, level) for run, level in todo))
    for run, level in order:
        with stop_point(f"{run.name} level {level}", checkpoint_path(run, level)):
            lock = claim_level(exp, run, level) if (run, level) in todo else None
            if lock is None:
                by = "earlier" if (run, level) not in todo else "by another process"
                if (run, level) in todo:               # (the earlier ones were read before the loop)
                    load_ticket(ticket_path(run, level), exp.model, mmap=True)
                exp.log(f"{run.name} level {level}: finished {by}, reused ({ticket_path(run, level)})")
                if exp.procs.is_main and (run, level) not in todo:   # a stop between ticket and cleanup
                    remove_if_there(checkpoint_path(run, level))
                continue
            try:
                exp.log(summary_line(train_level(exp, run, level, eta)))
            finally:
                release(lock)
        if exp.procs.is_main:
            write_results(cfg.out_dir)
    rows = write_results(cfg.out_dir) if exp.procs.is_main else []
    exp.log("\n" + markdown_table(rows) if rows else "")
    exp.log(f"results are in {cfg.out_dir}: results.csv and results.json (one row per ticket), "
            "level_NN/ticket.pt (trunk) and BRANCH/level_NN/ticket.pt")
    return rows


def check_finished_tickets(exp_dir, model):
    """Read every finished ticket of the experiment, every run's (mapped: cheap), and check that its masks
    fit `model`, before any level trains: results.json is rebuilt from all of them after each level, so a
    damaged one stops the command now, not after a level's training."""
    for path in run_dirs(exp_dir):
        for ticket in finished_tickets(path):
            load_ticket(ticket, model, mmap=True)


def warn_kept_after_missing(exp, order, todo):
    """One WARNING when an IMP trunk level is trained again (its ticket was deleted) while levels built
    from it are kept: training is exact on the CPU, so they still match it there; on GPUs they may not."""
    missing = [level for run, level in todo if run.name == "trunk"]
    if exp.cfg.mask_source != "imp" or not missing or not exp.procs.is_main:
        return
    kept = [f"{run.name} level {level}" for run, level in order if level > min(missing)
            and (run, level) not in todo]
    if kept:
        print(f"WARNING: trunk level {min(missing)} is trained again, but {', '.join(kept)} (built from it) "
              "are kept: they match it only where training is exact (the CPU); delete them to train them "
              "again from it", file=sys.stderr)


@contextlib.contextmanager
def stop_point(where, ckpt_path):
    """A stop inside (Ctrl-C, SIGTERM) says it stopped at `where`, unless a step within named a closer
    place (train_level: the epoch), and whether the level's epoch checkpoint is there to resume from."""
    try:
        yield
    except (KeyboardInterrupt, Stopped) as e:
        e.where = getattr(e, "where", where)
        e.kept = ckpt_path if os.path.exists(ckpt_path) else None
        raise


# ==================================== tooling ====================================
# Everything below serves the method above: the settings and the CLI parser derived from them, torchrun,
# files (atomic writes, safe loading, checkpoints, tickets), file locks, results, the CLI. The tools run
# on finished tickets (report, benchmarks, slim export, mask import) are in lth_tools.py.

MESSAGE_CHARS = 300  # an exception's first line is cut to this many characters when a message quotes it


class UsageError(Exception):
    """A user-facing error: the CLI prints it (with its hint) and exits with code 2, no traceback."""


class DamagedFile(UsageError):
    """A file of the experiment that cannot be read (cut short, damaged, or not lth_ref's)."""

    def __init__(self, message, first_line):
        super().__init__(message)
        self.first_line = first_line


class Stopped(BaseException):
    """A signal (SIGTERM: a job scheduler) asked the run to stop; the CLI exits with 128 + its number. Not an
    Exception, as KeyboardInterrupt is not: the handlers of bad files (`except Exception`) let it through."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---- settings: one Config field per flag (default, help with unit, argument group, role) ----
ROLES = {  # what a setting defines, which decides where it is recorded and whether it may change
    "trunk": "the experiment's trunk (config.json; refused once level 0 has started)",
    "source": "the trunk, for one mask source only (metadata 'source')",
    "branch": "a branch (branch.json): the method, its init, its knobs",
    "run": "this command only (may differ between commands on one experiment)",
    "tool": "benchmarks, export and report (not recorded)",
}
GROUPS = ("experiment", "training", "refill", "regroup", "benchmarks", "report")   # --help's sections


def setting(default, help, group, role="run", official=None, check=None, knob=None, label=None, source=None,
            **flag):
    """A Config field: its default, help text (with its unit), argument group and role (ROLES); the
    official code's name where it has one; check = (condition text, predicate) for bad values; knob =
    the postprocess keyword it feeds (label: its short name in a branch directory's name); flag: extra
    argparse keywords (choices, nargs, metavar, const)."""
    meta = dict(help=help, group=group, role=role, official=official, check=check, knob=knob, label=label,
                source=source, flag=flag)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# a post-processing knob's default: its function's (refill_mask, regroup_mask, refill+'s extra)
KNOB_DEFAULTS = {k: v for method in POSTPROCESS for k, v in method_knobs(method).items()}


TABLE1 = "Table 1's value for --arch on --dataset"   # the help of settings whose default comes from there


def table1_values(key):
    """Help text of one Table 1 setting, read from SCHEDULES: each value with its datasets, then the
    (arch, dataset) cells that differ, e.g. '0.1 on every dataset'."""
    text = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else f"{v:g}"
    paper = {d: row for d, row in SCHEDULES.items() if d != "synthetic"}
    by_value = {}
    for dataset, row in paper.items():
        by_value.setdefault(text(row[key]), []).append(dataset)
    parts = [f"{v} on " + ("every dataset" if len(ds) == len(paper) else ", ".join(ds))
             for v, ds in by_value.items()]
    cells = [f"{arch} on {d}: {text(row[key])}" for (arch, d), row in SCHEDULE_BY_ARCH.items()
             if key in row and d in paper]
    return "; ".join(parts + cells)
IS_POSITIVE, NOT_NEGATIVE = (">= 1", lambda v: v >= 1), (">= 0", lambda v: v >= 0)
FINITE_ABOVE_0 = ("a finite number > 0", lambda v: 0 < v < float("inf"))     # NaN fails every comparison
SEED_LIMIT = 2 ** 32          # numpy's legacy seed range; the derived seeds (mix_seed) stay within int64


@dataclasses.dataclass
class Config:
    """Every setting of a command, with its default, help and role; build_parser is derived from these
    fields and resolve() fills in Table 1's row of --arch/--dataset where a default is None."""
    arch: str = setting("resnet20", "network", "experiment", "trunk", choices=sorted(model_zoo.MODELS))
    dataset: str = setting("cifar10", "synthetic = small deterministic CIFAR-shaped data for smoke runs",
                           "experiment", "trunk", choices=list(datasets.DATASETS))
    data_dir: str = setting("data", "where the datasets live: CIFAR archives or folders, tiny-imagenet-200/, "
                            "imagenet/", "experiment")
    out_dir: str | None = setting(None, "experiment directory (default: runs/ARCH_DATASET_SOURCE, plus "
                                  "_seedN for --seed N != 0)", "experiment")
    levels: int | None = setting(None, "pruning levels after the dense level 0 (default: "
                                 f"{PAPER['levels']}, or the number of --import-masks files)", "experiment",
                                 check=NOT_NEGATIVE, official="--pruning_times")
    import_masks: list | None = setting(
        None, "trunk masks from files, one per level (level 1 first): a torch.nn.utils.prune state_dict "
        "(`*_mask`, with `*_orig` weights), an official Structure-LTH checkpoint, an open_lth mask.pth, a "
        "{name: 0/1 tensor} file or an lth_ref ticket.pt (transfer); sets --mask-source import", "experiment",
        nargs="+", metavar="FILE")
    mask_source: str = setting(
        "imp", "the trunk's unstructured masks: imp (iterative magnitude pruning), omp (one-shot magnitude "
        "of the trained dense net), random (random at omp's layer densities), snip, grasp, synflow (scores "
        "at initialization), admm (ADMM training of the dense net toward that density), import "
        "(--import-masks); one-shot sources reach density (1 - prune rate)^level", "experiment", "trunk",
        choices=list(MASK_SOURCES))
    snip_samples: int | None = setting(
        None, "--mask-source snip: training samples scored (default: one batch of --batch-size; "
        "Synaptic-Flow scores 10 x the classes: 100 on CIFAR-10)", "experiment", "source", source="snip",
        check=IS_POSITIVE)
    grasp_samples: int | None = setting(
        None, "--mask-source grasp: training samples scored, in two halves (default: one batch of "
        "--batch-size; published GraSP: 10 x the classes, 100 on CIFAR-10)", "experiment", "source",
        source="grasp", check=IS_POSITIVE)
    synflow_rounds: int = setting(SYNFLOW_ROUNDS, "pruning rounds of --mask-source synflow", "experiment",
                                  "source", source="synflow", check=IS_POSITIVE)
    admm_rho: float = setting(ADMM_RHO, "--mask-source admm: penalty weight rho", "experiment", "source",
                              source="admm", official="rho", check=FINITE_ABOVE_0)
    admm_iterations: int = setting(ADMM_ITERATIONS, "--mask-source admm: iterations, each one W-step epoch "
                                   "then the Z- and U-steps", "experiment", "source", source="admm",
                                   check=IS_POSITIVE)
    admm_lr: float = setting(ADMM_LR, "--mask-source admm: SGD learning rate of the W-steps (ours)",
                             "experiment", "source", source="admm", check=FINITE_ABOVE_0)
    method: str = setting(
        "imp", "the branch: how each trunk level's mask is post-processed: imp (not at all: with --init "
        "rewind the trunk is the ticket), refill (channel-wise), refill+ (channel-wise, extra channels), "
        "regroup (group-wise dense blocks)", "experiment", "branch", choices=list(POSTPROCESS))
    init: str = setting("rewind", "the branch's weights: rewind (theta_k, the paper's tickets) or reinit (a "
                        "fresh seeded initialization trained from epoch 0: random tickets)", "experiment",
                        "branch", choices=INITS, official="--reinit (main_eval_fillback.py)")
    group_aware: bool = setting(False, "group-aware IMP (paper App. A1, Alg. 4): the branch prunes its own "
                                "previous level instead of the trunk's; needs --mask-source imp and a "
                                "--method other than imp", "experiment", "branch",
                                official="main_imp_regroup.py")
    seed: int = setting(0, "seed for init, data order and augmentation", "experiment", "trunk",
                        official="--seed", check=(f"in [0, {SEED_LIMIT})", lambda v: 0 <= v < SEED_LIMIT))
    verbose: bool = setting(False, "print the per-layer table of every level", "experiment")
    wait: bool = setting(False, "when another process trains the branch this command asks for: wait for it "
                         "(default: stop with a message; the trunk is always waited for)", "experiment")
    epochs: int | None = setting(None, f"epochs per level; default: {TABLE1} ({table1_values('epochs')})",
                                 "training", "trunk", check=IS_POSITIVE, official="--epochs")
    lr_drops: list | None = setting(
        None, "epochs at which the LR drops x0.1 (one at or after --epochs never applies); default: "
        f"{TABLE1} ({table1_values('lr_drops')}), scaled to --epochs, never before epoch 1 (--epochs 1: no "
        "drop)", "training", "trunk", nargs="*", metavar="EPOCH", type=int, official="--decreasing_lr",
        check=("epochs >= 1", lambda v: all(e >= 1 for e in v)))
    rewind_epoch: int | None = setting(
        None, f"rewind to the end of this epoch (0 = initialization); default: {TABLE1} "
        f"({table1_values('rewind_epoch')}), scaled to --epochs", "training", "trunk", check=NOT_NEGATIVE,
        official="--rewind_epoch")
    schedule: str = setting(
        "table1", "the defaults of --epochs, --lr-drops and --rewind-epoch: table1 (the paper's Table 1 for "
        "--arch on --dataset) or plus (App. A2's (+) setting of VGG-16(+) and WRN-32-2(+): "
        f"{SCHEDULE_PRESETS['plus']['epochs']} epochs, x0.1 at "
        f"{', '.join(map(str, SCHEDULE_PRESETS['plus']['lr_drops']))}, rewind to epoch "
        f"{SCHEDULE_PRESETS['plus']['rewind_epoch']}); explicit flags override", "training",
        choices=list(SCHEDULE_PRESETS))
    lr_schedule: str = setting("resume", "after rewinding to epoch k: resume = the schedule goes on from "
                               "epoch k to the end (the paper's Alg. 1, Frankle et al. 2020); restart = it "
                               "runs from epoch 0 for the full length (official main_imp.py; --rewind-epoch "
                               "may then equal --epochs)", "training", "trunk", choices=LR_SCHEDULES,
                               official="main_imp.py: restart")
    prune_rate: float = setting(PAPER["prune_rate"], "fraction of the remaining prunable weights removed per "
                                "level", "training", "trunk", check=("in (0, 1)", lambda v: 0 < v < 1),
                                official="--rate")
    lr: float | None = setting(None, f"SGD learning rate; default: {TABLE1} ({table1_values('lr')})",
                               "training", "trunk", official="--lr", check=FINITE_ABOVE_0)
    momentum: float = setting(PAPER["momentum"], "SGD momentum", "training", "trunk",
                              check=("in [0, 1)", lambda v: 0 <= v < 1))
    weight_decay: float | None = setting(
        None, f"L2 weight decay; default: {TABLE1} ({table1_values('weight_decay')})", "training", "trunk",
        official="--weight_decay", check=("a finite number >= 0", lambda v: 0 <= v < float("inf")))
    batch_size: int | None = setting(
        None, f"examples per SGD step, over all processes under torchrun; default: {TABLE1} "
        f"({table1_values('batch_size')})", "training", "trunk", check=IS_POSITIVE, official="--batch_size")
    train_subset: int | None = setting(None, "train on a seeded random subset of N examples (default: all)",
                                       "training", "trunk", check=IS_POSITIVE)
    val_split: int = setting(0, "hold out N training images (seeded, before --train-subset) as a validation "
                             "set; its accuracy is reported next to test accuracy (0 = none)", "training",
                             "trunk", check=NOT_NEGATIVE)
    device: str = setting("auto", "auto = cuda if available", "training", choices=("auto", "cpu", "cuda"))
    amp: str = setting("off", "mixed precision: autocast to bf16, or fp16 with loss scaling (CUDA only)",
                       "training", "trunk", choices=list(AMP_DTYPES))
    channels_last: bool = setting(False, "train with channels-last model and batches", "training")
    deterministic: bool = setting(False, "GPUs: deterministic algorithms only (cuDNN, cuBLAS), for reruns "
                                  "and resumes that repeat every bit on the same GPU and software; slower "
                                  "(the CPU is deterministic without it)", "training")
    compile: bool = setting(False, "torch.compile the training network", "training")
    sync_bn: bool = setting(False, "under torchrun on GPUs: BatchNorm statistics over all processes "
                            "(default: per process)", "training", "trunk")
    refill_score: str = setting(
        KNOB_DEFAULTS["score"], "channel score for refill: l1 = L1 norm of the kept weights (paper), "
        "remain = number of kept weights (official default); fmap_l1, fmap_l2, saliency = the channel's "
        "output on one training batch: sum |y|, sum y^2, sum |y dL/dy| (official l1, l2, saliency)", "refill",
        "branch", official="--criterion", knob="score", label="score", choices=list(CHANNEL_SCORES))
    refill_extra: float = setting(
        KNOB_DEFAULTS["extra"], "refill+: extra fraction of the pruned channels kept (ours; the paper gives "
        "no value)", "refill", "branch", official="--fillback-rate", knob="extra", label="extra",
        check=("in [0, 1]", lambda v: 0 <= v <= 1))
    channel_multiple: int = setting(
        KNOB_DEFAULTS["channel_multiple"], "refill, refill+: each layer's kept-channel count rounded up to a "
        "multiple of this, at most the layer's width (ours: 8 suits GPUs and vector units; 1 = off)",
        "refill", "branch", check=IS_POSITIVE, knob="channel_multiple", label="mult")
    regroup_unit: str = setting(
        KNOB_DEFAULTS["unit"], "regroup column unit: position = one (c,ky,kx) (paper), channel = whole input "
        "channel, vector = 8 channels at one (ky,kx) (GPU kernel)", "regroup", "branch", knob="unit",
        label="unit", choices=list(REGROUP_UNITS))
    groups: int = setting(
        KNOB_DEFAULTS["groups"], "regroup: groups per layer (paper t1)", "regroup", "branch",
        official="cn = 8 hMETIS parts", check=IS_POSITIVE, knob="groups", label="groups")
    row_multiple: int = setting(
        KNOB_DEFAULTS["row_multiple"], "regroup: group rows are a multiple of this, at least this (paper b1, "
        "min rows)", "regroup", "branch", check=IS_POSITIVE, knob="row_multiple", label="rows",
        official="B2 = 16: parts of more than 16 rows")
    min_col_nnz: int = setting(
        KNOB_DEFAULTS["min_col_nnz"], "regroup: nonzeros a column needs inside a group to be selected (paper "
        "t2; at most --row-multiple)", "regroup", "branch", check=IS_POSITIVE, knob="min_col_nnz",
        label="colnnz")
    min_block_cols: int = setting(
        KNOB_DEFAULTS["min_block_cols"], "regroup: columns a group needs to become a block (paper b2)",
        "regroup", "branch", check=IS_POSITIVE, knob="min_block_cols", label="cols")
    block_columns: str = setting(
        KNOB_DEFAULTS["block_columns"],
        "regroup: which columns join a group's dense block: budget (ours: the densest (group, column) "
        "pairs until the blocks' area equals IMP's nonzeros: IMP's density), paper (Alg. 3 as written: "
        "every column with >= --min-col-nnz nonzeros in the group; denser than IMP), intended (the "
        "official width rule as meant: a prefix of the most used columns until every row has fewer than "
        "width/1.5 nonzeros outside), official (the official code as it runs: its width loop with its "
        "column-index and early-stop bugs, 8 parts of which those of more than 16 rows may become blocks,"
        " a layer with no block left unstructured; --row-multiple, --min-col-nnz, --min-block-cols do not"
        " apply; needs --regroup-unit position)", "regroup", "branch", knob="block_columns", label="colrule",
        choices=list(BLOCK_COLUMNS))
    bench: str | None = setting(
        None, "benchmark instead of training: kernels (the default when given alone) = dense vs grouped "
        "GEMM on a ticket, paper = the same in the paper's per-layer setting "
        f"({kernels.PAPER_PROFILE}), regroup = partitioner coverage and speed vs baselines, train = "
        "training images/s vs a plain PyTorch loop with the same settings, and the cost of the masks",
        "benchmarks", "tool", nargs="?", const="kernels", choices=("kernels", "paper", "regroup", "train"))
    export: str | None = setting(None, "instead of training: save the ticket (--ticket, or the last level "
                                 "in --out-dir of the run --method names) without its dead channels, as a "
                                 "smaller dense network; PATH ends in .pt (models.load_slim), .pt2 "
                                 "(torch.export) or .onnx (ONNX, an optional extra)", "benchmarks", "tool",
                                 metavar="PATH")
    ticket: str | None = setting(None, "ticket.pt to benchmark or export (default: the last level, in "
                                 "--out-dir, of the run --method names; not both); it runs as it is, so an "
                                 "--arch, --dataset or --method given with it must be its own", "benchmarks",
                                 "tool")
    bench_density: float | None = setting(None, "bench a fresh --arch pruned to this density and "
                                          "post-processed by --method (with the regroup/refill flags) "
                                          "instead of a saved ticket (--bench regroup: the masks it "
                                          "partitions)", "benchmarks", "tool",
                                          check=("in (0, 1]", lambda v: 0 < v <= 1))
    bench_batch: list = setting([64], "batch sizes for --bench kernels", "benchmarks", "tool", nargs="+",
                                type=int, check=("a list of numbers >= 1", lambda v: all(b >= 1 for b in v)))
    bench_repeats: int = setting(30, "timed runs per measurement (median)", "benchmarks", "tool",
                                 check=IS_POSITIVE)
    bench_memory_format: str = setting("auto", "memory format of the activations, dense and regrouped "
                                       "alike; auto = the one in which the dense model runs faster on this "
                                       "machine (measured first)", "benchmarks", "tool",
                                       choices=["auto", *kernels.MEMORY_FORMATS])
    bench_dtype: str = setting("auto", "precision of --bench kernels/paper: model and inputs in fp32, fp16 "
                               "or bf16, dense and regrouped alike; auto = fp16 on CUDA (what GPU users "
                               "deploy), fp32 on the CPU", "benchmarks", "tool",
                               choices=["auto", *kernels.BENCH_DTYPES])
    report: list | None = setting(None, "instead of training: report.md, CSVs and figures (matplotlib) of "
                                  "experiment directories, into --out-dir if given, else DIR/report (one "
                                  "DIR) or report/ in the DIRs' common parent", "report", "tool", nargs="+",
                                  metavar="DIR")
    report_layers: list | None = setting(None, "convs drawn by --report's mask pictures, e.g. "
                                         "layer3.2.conv2 (default: the last three)", "report", "tool",
                                         nargs="+", metavar="NAME")


def settings_of(role):
    """Config fields of one role (ROLES), in declaration order."""
    return [f for f in dataclasses.fields(Config) if f.metadata["role"] == role]


RUN_SETTINGS = tuple(f.name for f in settings_of("run"))         # may differ between commands
SOURCE_SETTINGS = tuple(f.name for f in settings_of("source"))   # trunk settings of one mask source


def resolve(cfg):
    """Validate a Config and fill in the defaults that depend on others: Table 1's row for --arch and
    --dataset (epochs, lr, lr_drops, batch, weight decay, rewind epoch, the epochs scaled to --epochs)
    and out_dir. UsageError with the flag and the rule for a bad value."""
    table = paper_schedule(cfg.arch, cfg.dataset, cfg.schedule)
    epochs = cfg.epochs if cfg.epochs is not None else table["epochs"]
    scaled = lambda e: round(e * epochs / table["epochs"])   # the table's epochs at this schedule's length
    pick = lambda value, key: value if value is not None else table[key]
    cfg = resolve_import(cfg)
    late = [d for d in cfg.lr_drops or [] if d >= epochs]
    if late and os.environ.get("RANK", "0") == "0":           # resolve runs before torchrun's group exists
        print(f"WARNING: --lr-drops {' '.join(map(str, late))}: at or after --epochs {epochs} a drop never "
              "applies (a drop at epoch E lowers the LR of the epochs after the first E)", file=sys.stderr)
    cfg = dataclasses.replace(
        cfg, levels=cfg.levels if cfg.levels is not None else PAPER["levels"], epochs=epochs,
        lr=pick(cfg.lr, "lr"),
        weight_decay=pick(cfg.weight_decay, "weight_decay"),
        batch_size=pick(cfg.batch_size, "batch_size"),
        lr_drops=sorted(cfg.lr_drops if cfg.lr_drops is not None else    # never before epoch 1: the first
                        [max(1, scaled(e)) for e in table["lr_drops"]]),  # epoch trains at the table's LR
        rewind_epoch=cfg.rewind_epoch if cfg.rewind_epoch is not None else scaled(table["rewind_epoch"]),
        out_dir=cfg.out_dir or os.path.join(
            "runs", f"{cfg.arch}_{cfg.dataset}_{cfg.mask_source}" + (f"_seed{cfg.seed}" if cfg.seed else "")))
    for f in dataclasses.fields(Config):
        value, check = getattr(cfg, f.name), f.metadata["check"]
        if check is not None and value is not None and not check[1](value):
            raise UsageError(f"{flag_name(f.name)} must be {check[0]}, got {value}")
    check_combinations(cfg)
    return cfg


def resolve_import(cfg):
    """--import-masks: the trunk's masks, one level per file, from mask source `import` (which
    config_from_args sets when --mask-source is not given); UsageError otherwise."""
    if not cfg.import_masks:
        if cfg.mask_source == "import":
            raise UsageError("--mask-source import reads its masks from --import-masks FILE [FILE ...]: "
                             "give the files")
        return cfg
    if cfg.mask_source != "import":
        raise UsageError(f"--import-masks gives the trunk's masks: drop --mask-source {cfg.mask_source}")
    missing = [f for f in cfg.import_masks if not os.path.isfile(f)]
    if missing:
        problem = "a directory: give the mask files in it, one per level" if os.path.isdir(missing[0]) else \
            "no such file"
        raise UsageError(f"--import-masks {missing[0]}: {problem}")
    levels = len(cfg.import_masks) if cfg.levels is None else cfg.levels
    if levels > len(cfg.import_masks):
        raise UsageError(f"--levels {levels} needs {levels} --import-masks files (one per level), got "
                         f"{len(cfg.import_masks)}")
    return dataclasses.replace(cfg, levels=levels)


def check_combinations(cfg):
    """Refuse settings that contradict each other, with the fix."""
    modes = [flag for flag, value in (("--report", cfg.report), ("--bench", cfg.bench),
                                      ("--export", cfg.export)) if value is not None]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} are separate commands: run one at a time")
    if cfg.rewind_epoch > cfg.epochs or (cfg.rewind_epoch == cfg.epochs and cfg.lr_schedule == "resume"):
        raise UsageError(f"--rewind-epoch must be in [0, --epochs), got {cfg.rewind_epoch} "
                         f"with --epochs {cfg.epochs} "
                         "(--lr-schedule restart also allows --rewind-epoch = --epochs)")
    if cfg.group_aware and cfg.method == "imp":
        raise UsageError("--group-aware post-processes every level of its own chain: give it a --method "
                         "(refill, refill+ or regroup)")
    if "regroup" in (cfg.method, cfg.bench):
        try:
            check_regroup_knobs(cfg.block_columns, cfg.regroup_unit, flag_name, row_multiple=cfg.row_multiple,
                                min_col_nnz=cfg.min_col_nnz)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if cfg.group_aware and cfg.mask_source != "imp":
        raise UsageError("--group-aware prunes its own previous level iteratively: it needs --mask-source "
                         f"imp, not {cfg.mask_source} (one-shot sources have no chain)")
    if cfg.bench_density is not None and cfg.bench not in ("kernels", "paper", "regroup"):
        raise UsageError("--bench-density is read by --bench kernels, paper and regroup: drop it")
    unread = ticket_unread(cfg) if cfg.ticket is not None else None
    if unread:
        raise UsageError(f"--ticket {cfg.ticket} is not read by this command: {unread}; drop it")


def ticket_unread(cfg):
    """Why the command cfg describes reads no --ticket; None where it reads one (--export, --bench kernels,
    paper and regroup)."""
    if cfg.report is not None:
        return "--report reads experiment directories"
    if cfg.export is not None or (cfg.bench in ("kernels", "paper", "regroup") and cfg.bench_density is None):
        return None
    if cfg.bench == "train":
        return "--bench train times training steps of a fresh --arch network"
    if cfg.bench_density is not None:
        return "--bench-density benchmarks a fresh --arch network instead"
    return "an experiment trains its own tickets (--ticket is for --bench and --export)"


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


def trunk_config(cfg):
    """The settings that define the experiment's trunk (a changed one is a new experiment)."""
    keys = [f.name for f in settings_of("trunk")] + \
        [f.name for f in settings_of("source") if f.metadata["source"] == cfg.mask_source]
    imported = {"import_sha256": [file_sha256(f) for f in cfg.import_masks]} \
        if cfg.mask_source == "import" else {}
    return {**{k: getattr(cfg, k) for k in keys}, **imported}


def branch_knobs(cfg, method):
    """{postprocess keyword: value} of the method's knobs in cfg (the fields whose `knob` it takes)."""
    takes = method_knobs(method)
    return {f.metadata["knob"]: getattr(cfg, f.name) for f in settings_of("branch")
            if f.metadata["knob"] in takes}


def branch_config(cfg):
    """The settings that define a branch: method, init, group-aware and the method's knobs (by field name)."""
    takes = method_knobs(cfg.method)
    return {f.name: getattr(cfg, f.name) for f in settings_of("branch")
            if f.metadata["knob"] is None or f.metadata["knob"] in takes}


def branch_name(cfg):
    """Readable and unique: the method, each knob that differs from its default, the init, group-aware."""
    default, takes = Config(), method_knobs(cfg.method)
    parts = [cfg.method] + [f"{f.metadata['label']}-{getattr(cfg, f.name)}" for f in settings_of("branch")
                            if f.metadata["knob"] in takes
                            and getattr(cfg, f.name) != getattr(default, f.name)]
    return "_".join(parts + ["reinit"] * (cfg.init == "reinit") + ["group-aware"] * cfg.group_aware)


def trunk_run(cfg):
    return Run("trunk", cfg.out_dir, "imp", "rewind", False)


def branch_run(cfg):
    """The branch a command trains; None for --method imp --init rewind (the trunk is that ticket)."""
    if cfg.method == "imp" and cfg.init == "rewind":
        return None
    name = branch_name(cfg)
    return Run(name, os.path.join(cfg.out_dir, name), cfg.method, cfg.init, cfg.group_aware)


def settings_line(cfg, procs):
    """The schedule in one line, so a log says what ran (defaults: Table 1's row for arch/dataset)."""
    files = len(cfg.import_masks or [])
    pruning = f"masks from {files} --import-masks file{'s' * (files != 1)}" if cfg.mask_source == "import" \
        else f"prune {cfg.prune_rate:.0%} per level, mask source {cfg.mask_source}"
    subset = f", a seeded subset of {cfg.train_subset} training images" if cfg.train_subset else ""
    applied = [d for d in cfg.lr_drops if d < cfg.epochs]     # a drop at epoch >= --epochs never applies
    drops = ", ".join(f"x{0.1 ** applied.count(d):g} at {d}" for d in sorted(set(applied))) or "no drop"
    return (f"settings: {cfg.arch} on {cfg.dataset}{subset}, {cfg.levels} level{'s' * (cfg.levels != 1)} of "
            f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}, lr {cfg.lr} ({drops}), batch {cfg.batch_size}"
            f"{f' over {procs.world} processes' if procs.world > 1 else ''}, weight decay "
            f"{cfg.weight_decay}, rewind to epoch {cfg.rewind_epoch}, {pruning}, amp {cfg.amp}, LR schedule "
            f"after rewinding: {cfg.lr_schedule}{' (App. A2 (+) schedule)' * (cfg.schedule == 'plus')}")


# ---- torchrun: decided once at setup; one process is world 1 ----
DIST_TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long at a collective (rank 0 writes
                                               # tickets meanwhile) before the job fails


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in the job: rank, world size; is_main (rank 0) writes files and prints. The
    collectives are no-ops in one process."""
    rank: int = 0
    world: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def sum(self, values, device):
        """Sum a list of numbers over every process (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self):
        """Wait for every process (after rank 0 wrote a file the others read)."""
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's value (plain data) on every process."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, masks, device):
        """Masks are computed by every process from the same files and seeds: check that they agree."""
        if self.world == 1:
            return
        digest = torch.tensor([float((m.flatten().double()
                                      * torch.arange(1, m.numel() + 1, device=m.device)).sum())
                               for m in masks.values()], dtype=torch.float64, device=device)
        low, high = digest.clone(), digest.clone()
        torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError("the processes computed different masks: every rank must read the same "
                               "experiment directory (a shared file system) with the same torch version")


def start_processes(device):
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU.
    Returns (Processes, this process's device: cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", timeout=DIST_TIMEOUT)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size()), device
    return Processes(), device


def training_net(model, cfg, device, procs):
    """What the training steps call: the model, wrapped in DistributedDataParallel under torchrun
    (SyncBatchNorm with --sync-bn) and compiled with --compile."""
    net = model
    if procs.world > 1:
        if cfg.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        cuda = torch.device(device).type == "cuda"
        net = nn.parallel.DistributedDataParallel(net,
                                                  device_ids=[torch.device(device).index] if cuda else None)
    return torch.compile(net) if cfg.compile else net


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


CUBLAS_DETERMINISTIC = ":4096:8"  # the CUBLAS_WORKSPACE_CONFIG under which cuBLAS is deterministic (the
                                  # cuBLAS docs, "Results reproducibility"); read when a cuBLAS handle is made


@contextlib.contextmanager
def deterministic_algorithms(on):
    """--deterministic: inside, torch uses deterministic algorithms only (cuDNN convolutions too, its
    autotuner off) and cuBLAS its deterministic workspace; an op with no deterministic CUDA version
    prints torch's warning naming it and runs as before. The previous settings come back after."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def check_training_flags(cfg, device, procs):
    """Refuse combinations that cannot run here, with the fix."""
    cuda = torch.device(device).type == "cuda"
    if cfg.amp == "fp16" and not cuda:
        raise UsageError("--amp fp16 needs a CUDA GPU (its loss scaling is for GPUs); "
                         "use --amp bf16 on the CPU")
    if cfg.sync_bn and procs.world == 1:
        raise UsageError("--sync-bn synchronizes BatchNorm across processes: launch with torchrun "
                         "--nproc_per_node N (N > 1), or drop it")
    if cfg.sync_bn and not cuda:
        raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); drop it on the CPU")



# ---- files: atomic writes, safe loading, the experiment directory ----
def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file next to `path`, flushed to disk, then renamed over `path`: a crash
    never leaves half a file, nor does an exception raised by write. The one way every file here is
    written; mode None: write(temporary path) writes the file itself (exporters that take a path). The
    temporary name keeps path's extension (readers such as torch.export.load go by it)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}.{socket.gethostname()}{ext}"
    remove_stale_temporaries(path)
    try:
        if mode is None:
            write(tmp)
        else:
            with open(tmp, mode, **({} if "b" in mode else dict(newline=""))) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename == tmp:                  # a message names the file asked for, not its temporary
            e.filename = path
        raise
    finally:
        remove_if_there(tmp)


def remove_stale_temporaries(path):
    """Remove the temporaries of `path` that writers killed mid-write (kill -9, power loss) left: those
    named for a process of this machine that no longer runs (another machine's are left to it)."""
    root, ext = os.path.splitext(path)
    pattern = re.compile(rf"{re.escape(os.path.basename(root))}\.tmp(\d+)\.{re.escape(socket.gethostname())}"
                         + re.escape(ext))
    directory = os.path.dirname(path) or "."
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        found = pattern.fullmatch(name)
        if found and not process_alive(int(found.group(1))):
            remove_if_there(os.path.join(directory, name))


def process_alive(pid):
    """Whether a process with this id runs on this machine (another user's counts; on Windows, where
    os.kill(pid, 0) is no such test, every process counts as running)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_if_there(path):
    """Remove a file if it is there (another process, or a rename, may have taken it first)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_text(text, path):
    atomic_write(path, lambda f: f.write(text), "w")


def write_csv(rows, path):
    """Rows (dicts with the first row's keys) to CSV, atomically."""
    def write(f):
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, write, "w")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_file(path, what, mmap=False):
    """torch.load a file we wrote, tensors and plain data only (weights_only: a file that would run
    code when unpickled is refused, not run). A missing, corrupt or unsafe file is a UsageError naming it.
    mmap: map the tensors instead of reading them (cheap when only a small entry is needed)."""
    if not os.path.exists(path):
        raise UsageError(f"the {what} {path} does not exist: the experiment directory is incomplete "
                         "(a file was deleted or moved); put it back, or start over with another --out-dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, wrong format, disallowed globals: all mean "not ours"
        first = (str(e).strip().splitlines() or [""])[0]
        first = first[:MESSAGE_CHARS] + "..." * (len(first) > MESSAGE_CHARS)
        first = f"cannot read the {what} {path} ({type(e).__name__}: {first})"
        fix = DAMAGED_FIX.get(what, "Delete it to compute that step again (a ticket: its level is trained "
                                    "again), or point --out-dir elsewhere")
        raise DamagedFile(f"{first}; lth_ref writes only tensors and plain data, so the file is cut short, "
                          f"damaged or was not written by lth_ref. {fix}", first) from None


DAMAGED_FIX = {  # what to do about a file load_file cannot read, where deleting it is not enough
    "initialization": "theta_0 cannot be computed again once levels are trained from it: restore it from a "
                      "copy, or start over with another --out-dir",
    "rewind state": "Delete it and level_00/ to train level 0 again, which writes it again (or start over "
                    "with another --out-dir)",
    "--ticket file": "Pass a ticket.pt lth_ref wrote (RUN/level_NN/ticket.pt, RUN/BRANCH/level_NN/ticket.pt)",
}


def check_masks_fit(model, masks, what="mask"):
    """Raise UsageError unless `masks` names exactly the prunable weights of `model`, shape for shape."""
    weights = prunable_weights(model)
    missing, extra = sorted(set(weights) - set(masks)), sorted(set(masks) - set(weights))
    bad = [n for n in set(weights) & set(masks) if tuple(masks[n].shape) != tuple(weights[n].shape)]
    if missing or extra or bad:
        raise UsageError(
            f"the {what} does not fit the model (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {sorted(bad)[:3]}); was it made for another --arch or --dataset?")


TICKET_KEYS = {"level": (int, type(None)), "masks": dict, "blocks": (dict, type(None)), "state_dict": dict,
               "metrics": dict, "config": dict, "num_classes": int}


def load_ticket(path, model=None, mmap=False, what="ticket"):
    """Load a ticket.pt and check its structure (and, given a model, that its masks fit it); `what` names
    it in a message (DAMAGED_FIX)."""
    ticket = load_file(path, what, mmap=mmap)
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


def load_checkpoint(path, model):
    """An unfinished level's epoch checkpoint, checked to fit the model (older files: their metrics); a
    file of another kind or network is a DamagedFile (resume_or_start sets it aside)."""
    ckpt = load_file(path, "checkpoint")
    if not (isinstance(ckpt, dict) and state_fits(model, ckpt.get("model"))
            and ("metrics" in ckpt or "epoch" in ckpt)
            and all(isinstance(ckpt.get(k), dict) for k in ("masks", "optimizer", "scaler"))):
        first = f"the checkpoint {path} is not an epoch checkpoint of this experiment's network"
        raise DamagedFile(first, first)
    check_masks_fit(model, ckpt["masks"], "checkpoint")
    if "metrics" not in ckpt:                  # written before metrics were one dict: the same numbers
        ckpt["metrics"] = dict(epoch=ckpt["epoch"], loss=ckpt["loss"], train_acc=float("nan"), **ckpt["accs"])
    return ckpt


def write_ticket(exp, run, level, start, row):
    """ticket.pt of a finished level (masks, blocks, trained state, its result row, per-layer stats, the
    config: every setting, the imported files' sha256, the process count) and, for a branch, layers.csv
    (printed with --verbose)."""
    cfg, model = exp.cfg, exp.model
    ticket = dict(level=level, masks={n: m.cpu() for n, m in start.masks.items()}, blocks=start.blocks,
                  state_dict={k: v.cpu() for k, v in model.state_dict().items()}, metrics=row,
                  layer_stats=start.stats, num_classes=exp.data.num_classes, normalization=dict(
                      mean=exp.data.mean.cpu().tolist(), std=exp.data.std.cpu().tolist()),
                  config={**dataclasses.asdict(cfg), **trunk_config(cfg), "processes": exp.procs.world,
                          "method": run.method, "init": run.init,
                          "group_aware": run.group_aware, "branch": run.name})
    if start.stats:                            # before the ticket: a stop between the two loses nothing
        table = [dict(name=n, **s) for n, s in start.stats.items()]
        write_csv(table, os.path.join(os.path.dirname(ticket_path(run, level)), "layers.csv"))
        if cfg.verbose:
            exp.log(markdown_table(table))
    save(ticket, ticket_path(run, level))


def check_config(path, settings, started, reuse=None, running=None):
    """Refuse settings that differ from the config.json at `path` once training has started there
    (before that, a corrected command simply replaces it). reuse: the experiment's Config, for the trunk's
    config.json: settings trunk level 0 does not read (LEVEL0_FREE) may change while no level they feed
    has started, and no other process runs the trunk (running: 'pid P on HOST' of the one that does);
    else the message names the directories to delete (or another --out-dir)."""
    if (started or running) and not os.path.exists(path):
        what = "experiment there has started (its init.pt or level_00" if reuse is not None else \
            "branch there has started (its level_01"
        raise UsageError(f"{path} is missing, but the {what} is there): put the file back, or "
                         f"{settings_fix(path)}")
    if not ((started or running) and os.path.exists(path)):
        return
    changed = config_changes(path, settings)
    here = os.path.dirname(path) or "."
    fixed = {k: c for k, c in changed.items() if reuse is None or running or k not in LEVEL0_FREE}
    if fixed and running:
        raise UsageError(f"{here} is being trained by {running} with other settings ({changes_text(fixed)}); "
                         "wait for it to finish, use its values, or use another --out-dir")
    if fixed:
        raise UsageError(f"{here} holds an experiment with other settings ({changes_text(fixed)}); to go "
                         "on here use the recorded values (only --levels may grow); to run the new settings "
                         f"use another --out-dir, or delete {here} to start over")
    stale = stale_levels(reuse, changed) if reuse is not None and changed else []
    if stale:
        raise UsageError(f"{here}: {changes_text(changed)} changes levels that have started here ("
                         f"{', '.join(stale)}); the levels before them are reused. Delete those directories "
                         "to train them again with the new settings, or use another --out-dir")


def config_changes(path, settings):
    """{setting: (recorded, given)} for the settings that differ from the config.json at `path` (a setting
    newer than the file: recorded as its default)."""
    try:
        old = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is damaged (not JSON): {settings_fix(path)}") from None
    if not isinstance(old, dict):
        raise UsageError(f"{path} is damaged (JSON, but not an object of settings): {settings_fix(path)}")
    defaults = Config()
    recorded = {k: old.get(k, getattr(defaults, k, None)) for k in settings}
    return {k: (recorded[k], v) for k, v in settings.items() if recorded[k] != v}


def settings_fix(path):
    """How to rebuild a run's config.json or branch.json at `path` that is missing or damaged: from the
    settings its last finished ticket records (a superset of the file's), else start over."""
    tickets = finished_tickets(os.path.dirname(path) or ".")
    if not tickets:
        return "use another --out-dir, or delete the directory to start over"
    code = ("import json, sys, torch; json.dump(torch.load(sys.argv[1], weights_only=True)['config'], "
            "open(sys.argv[2], 'w'), indent=1)")
    return (f"rebuild it from the settings {tickets[-1]} records: python -c \"{code}\" "
            f"{shlex.quote(tickets[-1])} {shlex.quote(path)}")


LEVEL0_FREE = ("prune_rate", "lr_schedule", "import_sha256", *SOURCE_SETTINGS)   # trunk settings that the
                                                     # dense level 0 (and theta_0, theta_k) does not depend on


def changes_text(changed):
    """'--flag old -> new; ...' with real flag names (imported files by their position and content)."""
    text = [f"{flag_name(k)} {old} -> {new}" for k, (old, new) in changed.items() if k != "import_sha256"]
    if "import_sha256" in changed:
        old, new = (v or [] for v in changed["import_sha256"])
        files = [i + 1 for i, (a, b) in enumerate(zip(old, new)) if a != b]
        if files:
            text.append(f"--import-masks file {', '.join(map(str, files))} (other content than before)")
        if len(old) != len(new):
            text.append(f"--import-masks {len(old)} -> {len(new)} files")
    return "; ".join(text)


def stale_levels(cfg, changed):
    """The started level directories (trunk and every branch) that settings in LEVEL0_FREE feed, when they
    change: the level of each imported file whose content changed, every level >= 1 for the others."""
    if set(changed) == {"import_sha256"}:              # a file changed, or left out: its level is stale
        old, new = (v or [] for v in changed["import_sha256"])
        levels = [i + 1 for i, a in enumerate(old) if i >= len(new) or a != new[i]]
    else:
        levels = range(1, max(cfg.levels, *levels_started(cfg.out_dir)) + 1)
    dirs = [os.path.join(r, f"level_{level:02d}") for r in run_dirs(cfg.out_dir) for level in levels]
    return [d for d in dirs if os.path.isdir(d)]


def levels_started(path):
    """The level numbers of the level_NN directories under an experiment's trunk and branches."""
    found = [0]
    for root in run_dirs(path):
        found += [int(d[len("level_"):]) for d in os.listdir(root) if re.fullmatch(r"level_\d+", d)]
    return found


def check_paths(cfg):
    """UsageError with a hint for an --out-dir or --data-dir that is a file, or that this user cannot use."""
    check_dir("--out-dir", cfg.out_dir)
    if cfg.dataset != "synthetic":
        check_dir("--data-dir", cfg.data_dir, os.R_OK)


def check_dir(what, path, need=os.W_OK):
    """UsageError unless `path` is a directory this user may write to (need os.R_OK: read), or one that can
    be created there (its nearest existing ancestor is a writable directory): checked before the work,
    writing by creating and removing a folder there."""
    above = next(p for p in (path, *parents(path)) if os.path.lexists(p))
    if os.path.islink(above) and not os.path.exists(above):
        raise UsageError(f"{what} {path}: {above} is a link to {os.readlink(above)}, which does not exist "
                         "(storage not mounted?); fix the link or pass another directory")
    if not os.path.isdir(above):
        raise UsageError(f"{what} {path}: {above} is a file, not a directory; pass a directory (one that "
                         "is missing is created)")
    if not os.access(above, need | os.X_OK):
        raise UsageError(f"{what} {path}: this user may not {'write to' if need == os.W_OK else 'read'} "
                         f"{above} (its permissions, or a read-only file system); fix that or pass another "
                         "directory")
    try:                                       # a real try where file modes say nothing (root, /proc)
        if need == os.W_OK:
            os.rmdir(tempfile.mkdtemp(dir=above, prefix=".lth_ref-probe-"))
    except OSError as e:
        raise UsageError(f"{what} {path}: nothing can be created in {above} ({e.strerror}); pass another "
                         "directory") from None


def parents(path):
    """The ancestors of a path, nearest first, up to the working directory or the root."""
    out, path = [], os.path.abspath(path)
    while os.path.dirname(path) != path:
        path = os.path.dirname(path)
        out.append(path)
    return out


WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                errno.EISDIR)   # what a write meets in a read-only, full or forbidden place


def write_fault(e):
    """The `error:` text of an OSError that a write met (WRITE_ERRNOS), or None for any other OSError."""
    if e.errno not in WRITE_ERRNOS:
        return None
    where = f" {e.filename}" if e.filename else ""
    return (f"cannot write{where}: {e.strerror or e}. Files here are written whole or not at all, so what "
            "was finished before is kept: free space or fix the permissions and run the same command again, "
            "or pass another --out-dir (or path)")


def open_experiment(cfg, log=print):
    """Check the settings against the experiment directory, load the data, build the model, then (only
    now: a failed start leaves nothing behind) write the configs and theta_0. Returns (experiment,
    trunk, branch or None). Under torchrun every process opens it; rank 0 writes."""
    check_paths(cfg)
    procs, device = start_processes(resolve_device(cfg.device))
    log = log if procs.is_main else (lambda *_: None)   # one copy of every line
    check_training_flags(cfg, device, procs)
    check_inputs(cfg)
    log(settings_line(cfg, procs))
    trunk, branch = trunk_run(cfg), branch_run(cfg)
    check_settings_here(cfg, branch,                      # early, for a quick answer; again under the lock
                        experiment_holder(cfg.out_dir) if procs.is_main and os.path.isdir(cfg.out_dir)
                        else None)                            # (rank 0 speaks for its ranks)
    data = datasets.load_dataset(cfg.dataset, cfg.data_dir, device, cfg.train_subset, cfg.seed, log=log,
                                 val_split=cfg.val_split)
    torch.manual_seed(cfg.seed)
    model = model_zoo.MODELS[cfg.arch](data.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if procs.is_main:
        with waiting_lock(os.path.join(cfg.out_dir, "setup.lock")):   # one process at a time checks and
                                                                            # writes the settings
            check_settings_here(cfg, branch, running=experiment_holder(cfg.out_dir))
            write_settings(cfg, model, branch, procs)
    procs.barrier()                            # every rank reads theta_0 from init.pt
    return (Experiment(cfg, model, training_net(model, cfg, device, procs), data, procs, log),
            trunk, branch)


def check_settings_here(cfg, branch, running=None):
    """check_config for the trunk's config.json (running: the process that trains the trunk now) and the
    branch's branch.json (started: its level 1 is there)."""
    check_config(os.path.join(cfg.out_dir, "config.json"), trunk_config(cfg), trunk_started(cfg.out_dir),
                 reuse=cfg, running=running)
    if branch is not None:
        check_config(os.path.join(branch.path, "branch.json"), branch_config(cfg),
                     os.path.exists(os.path.join(branch.path, "level_01")))


def trunk_started(out_dir):
    """Whether an experiment's trunk has started: its theta_0 (init.pt, written with config.json) or its
    level 0 is there."""
    return any(os.path.exists(os.path.join(out_dir, f)) for f in ("init.pt", "level_00"))


def write_settings(cfg, model, branch, procs):
    """config.json (trunk and run settings, the process count: one WARNING when it changed), theta_0 as
    init.pt unless it is there (the model as seeded by --seed), and the branch's branch.json."""
    record = {**trunk_config(cfg), **{f.name: getattr(cfg, f.name) for f in settings_of("run")},
              "processes": procs.world}
    path, started = os.path.join(cfg.out_dir, "config.json"), trunk_started(cfg.out_dir)
    before = read_json(path).get("processes", 1) if started and os.path.exists(path) else procs.world
    if before != procs.world:
        print(f"WARNING: {path} recorded {before} process(es), this run has {procs.world}: every step trains "
              "on the same data, but BatchNorm statistics are per process (unless --sync-bn), so the levels "
              f"trained from here differ slightly from a run with {before}", file=sys.stderr)
    write_text(json.dumps(record, indent=1), path)
    if not started:
        save(model.state_dict(), os.path.join(cfg.out_dir, "init.pt"))
    if branch is not None:
        os.makedirs(branch.path, exist_ok=True)
        write_text(json.dumps(branch_config(cfg), indent=1), os.path.join(branch.path, "branch.json"))


def check_inputs(cfg):
    """Before anything trains: every --import-masks file read, matched to --arch and validated, and --levels
    within the level where a layer must lose its last weight. On a shape-only ("meta") model: no memory,
    no random draws (theta_0 is drawn later from --seed)."""
    with torch.device("meta"):
        model = model_zoo.MODELS[cfg.arch](datasets.CLASS_COUNTS[cfg.dataset])
    if cfg.import_masks:
        import lth_tools                       # mask import lives with the tools; loaded when used
        for path in cfg.import_masks:          # those beyond --levels too: they are recorded for later levels
            lth_tools.read_imported_masks(path, model, cfg.arch)
    if cfg.mask_source != "import":
        check_levels(cfg, prunable_weights(model))


def check_levels(cfg, weights):
    """UsageError when --levels reaches a level with fewer prunable weights left than prunable layers: from
    there on at least one layer keeps no weight and cuts the network (IMP removes round(rate * remaining)
    per level, the one-shot sources keep round((1 - rate)^L * total))."""
    total, layers = sum(w.numel() for w in weights.values()), len(weights)
    kept, iterative = total, cfg.mask_source == "imp" or cfg.group_aware
    for level in range(1, cfg.levels + 1):
        kept = kept - int(round(cfg.prune_rate * kept)) if iterative else \
            int(round(level_density(cfg.prune_rate, level) * total))
        if kept < layers:
            raise UsageError(f"--levels {cfg.levels}: at level {level} only {kept} of the {total} prunable "
                             f"weights are left for {layers} prunable layers, so at least one layer keeps no "
                             f"weight from there on; pass --levels {level - 1} or fewer (or a smaller "
                             "--prune-rate)")


def file_sha256(path):
    """Hex sha256 of a file's bytes (imported masks are recorded by content, not by path). The trunk's
    settings are checked before every level and recorded in every ticket: a file is read again only when
    its size or modification time changed."""
    stat = os.stat(path)
    return _sha256_of(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256_of(path, size, mtime_ns):
    """file_sha256 of the file as it was at (size, mtime_ns)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- one experiment, several processes: a file lock per run ----
LOCK_POLL_S = 10        # seconds between looks at a level another process is training
LOCK_LOG_S = 300        # seconds between progress lines while waiting for it


def lock_path(run):
    return os.path.join(run.path, "run.lock")


def posix_locks():
    """The fcntl module, or None (with one WARNING) on an OS without POSIX file locks."""
    try:
        import fcntl                           # POSIX; the one OS-specific import
        return fcntl
    except ImportError:
        kernels._warn_once("this OS has no POSIX file locks (fcntl): "
                           "run one process per experiment directory")
        return None


def try_lock(path):
    """Take the OS file lock (fcntl.flock) at `path` without waiting: the open file (the lock lasts while
    it is open; the kernel drops it when the process dies, so a crash leaves no stale lock), or None when
    another process holds it. The file then names this process (pid, host) for the others' messages."""
    fcntl = posix_locks()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "a+")
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def release(lock):
    """Drop a lock from try_lock (closing the file releases it); other ranks' placeholders: nothing."""
    if hasattr(lock, "close"):
        lock.close()


def lock_holder(path):
    """'pid P on HOST' of the process holding the lock at `path`, as it wrote it."""
    try:
        with open(path) as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def waiting_lock(path):
    """Hold the OS file lock at `path`, waiting for it (others hold it for a moment): setup.lock while a
    process checks and writes the settings, so two commands started together cannot both find the
    directory fresh; results.lock while one rewrites the results files."""
    fcntl = posix_locks()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)      # released when the file closes
        yield


def experiment_holder(out_dir):
    """'pid P on HOST' of another process that trains a level of this experiment now (the trunk's or a
    branch's), or None. Looks with a shared lock taken and dropped at once: creates and rewrites nothing."""
    fcntl = posix_locks()
    for path in [os.path.join(d, "run.lock") for d in run_dirs(out_dir)]:
        if fcntl is None or not os.path.exists(path):
            continue
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return lock_holder(path)
    return None


def claim_level(exp, run, level):
    """Make this process the one that trains (run, level): its lock (rank 0; True on the other ranks), or
    None once another process has finished it. While another process trains it: a trunk level is waited
    for (a line every LOCK_LOG_S seconds); a branch level stops this command unless --wait. Under
    torchrun only rank 0 takes locks and tells the other ranks what it found."""
    waited = None
    while True:
        lock, state = None, "done" if os.path.exists(ticket_path(run, level)) else "busy"
        if exp.procs.is_main and state == "busy":
            lock = try_lock(lock_path(run))
            state = "busy" if lock is None else "mine"
            if lock is not None and os.path.exists(ticket_path(run, level)):   # finished meanwhile
                release(lock)
                lock, state = None, "done"
            elif lock is not None and (moved := settings_changed(exp.cfg, run, level)):
                release(lock)
                lock, state = None, moved
        state = exp.procs.broadcast(state)
        if state not in ("busy", "done", "mine"):
            raise UsageError(state)
        if state != "busy":
            return None if state == "done" else (lock if exp.procs.is_main else True)
        holder = exp.procs.broadcast(lock_holder(lock_path(run)))
        if run.name != "trunk" and not exp.cfg.wait:
            raise UsageError(f"{run.path} is being trained by {holder}; this command stops "
                             "(the other process trains it). "
                             "Add --wait to wait for it instead, or pick another --method or knob")
        if waited is None or time.monotonic() - waited >= LOCK_LOG_S:
            exp.log(f"{run.name} level {level}: being trained by {holder}; waiting for its ticket")
            waited = time.monotonic()
        time.sleep(LOCK_POLL_S)


def settings_changed(cfg, run, level):
    """The error text when the trunk's config.json no longer holds this command's trunk settings (another
    command started here since changed a setting level 0 does not read), or None: checked before each
    level, the branches' too (their masks come from the trunk's)."""
    path = os.path.join(cfg.out_dir, "config.json")
    with waiting_lock(os.path.join(cfg.out_dir, "setup.lock")):   # not while a command writes it
        changed = {k: (given, was) for k, (was, given) in config_changes(path, trunk_config(cfg)).items()}
    if not changed:
        return None
    return (f"{path} no longer holds this command's settings ({changes_text(changed)}): another command "
            f"started here rewrote it, or an --import-masks file changed; this command stops before "
            f"{run.name} level {level}")


# ---- results: one row per ticket, per run and for the whole experiment ----
class Eta:
    """Remaining time of this command from the mean time of a step (an epoch; a benchmarked layer) so far."""

    def __init__(self, steps_left):
        self.left, self.seconds, self.done = steps_left, 0.0, 0

    def update(self, dt):
        """The ETA, as 0h00m00s, after one more step that took dt seconds."""
        self.seconds, self.done, self.left = self.seconds + dt, self.done + 1, self.left - 1
        s = int(max(0, self.left) * self.seconds / self.done)
        return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def epoch_line(run, level, metrics, cfg, dens, dt, eta):
    """The progress line of one epoch: level, epoch, loss, accuracies, density, seconds, ETA."""
    val = f" val {metrics['val']:.4f}" if "val" in metrics else ""
    return (f"{run.name} level {level:2d} epoch {metrics['epoch']:3d}/{cfg.epochs} "
            f"loss {metrics['loss']:.4f} train {metrics['train_acc']:.4f} test {metrics['test']:.4f}{val} "
            f"density {dens:.4f} {dt:6.1f}s ETA {eta}")


def result_row(cfg, run, level, masks, blocks, stats, metrics, seconds, counts):
    """One result row: which ticket (run, source, method, init, level), its accuracy, the structure of its
    mask (density over the prunable weights, kept channels, blocks, coverage = kept IMP nonzeros / IMP
    nonzeros over all layers, FLOP ratio) and the whole network's counts (whole_model_counts: parameters
    and MACs, dense and of the ticket)."""
    rows = sum(m.shape[0] for m in masks.values())
    kept_rows = sum(int((m.reshape(m.shape[0], -1).sum(1) > 0).sum()) for m in masks.values())
    row = dict(branch=run.name, source=cfg.mask_source,
               method=cfg.mask_source if run.name == "trunk" else run.method,
               init=run.init, level=level, density=round(density(masks), 6), density_before="",
               test_acc=round(metrics["test"], 6),
               val_acc=round(metrics["val"], 6) if "val" in metrics else "",
               train_loss=round(metrics["loss"], 6),
               seconds=round(seconds, 1), channel_density=round(kept_rows / rows, 6), blocks="", coverage="",
               flop_ratio="", **counts)
    if stats:                                  # a branch: the unstructured mask it post-processed
        nnz = {n: stats[n]["density_before"] * m.numel() for n, m in masks.items()}   # IMP's, per layer
        kept = sum(stats[n]["coverage"] * nnz[n] for n in masks)                     # of them, kept
        row["coverage"] = round(kept / sum(nnz.values()), 6) if sum(nnz.values()) else 1.0
        row["density_before"] = round(sum(nnz.values()) / sum(m.numel() for m in masks.values()), 6)
    if blocks is not None:                     # the layers' FLOP ratios, weighted by their weights
        ratio = sum(kernels.flop_ratio(tuple(m.shape), blocks[n]) * m.numel() for n, m in masks.items())
        row.update(blocks=sum(len(b) for b in blocks.values()),
                   flop_ratio=round(ratio / sum(m.numel() for m in masks.values()), 6))
    return row


def whole_model_counts(model, masks, shape):
    """Parameters and multiply-accumulates (one image of `shape`) of the whole network, stem, classifier
    and BN included (as Torch-Pruning reports them): dense, and of the ticket = its slim network (dead
    channels removed, for the models with channel-link rules) without its pruned weights (MACs of nonzero
    weights only)."""
    try:
        model_zoo.channel_links(model)
    except ValueError:                         # a model without channel-link rules: nothing to slim
        slim = copy.deepcopy(model)
        apply_masks(slim, masks)
    else:
        slim = model_zoo.slim_model(model, masks)
    pruned = sum(int((w == 0).sum()) for w in prunable_weights(slim).values())
    return dict(params=model_zoo.count_params(model), params_ticket=model_zoo.count_params(slim) - pruned,
                macs=model_zoo.count_macs(model, shape),
                macs_ticket=model_zoo.count_macs(slim, shape, nonzero=True))


def summary_line(row):
    extra = "".join(f" {k} {row[k]}" for k in ("channel_density", "blocks", "coverage", "flop_ratio")
                    if row[k] != "")
    return (f"== {row['branch']} level {row['level']} done: density {row['density']:.4f} test_acc "
            f"{row['test_acc']:.4f} train_loss {row['train_loss']:.4f} {row['seconds']:.0f}s{extra}")


def finished_tickets(path):
    """The ticket.pt of every finished level of the run in `path`, by level."""
    levels = sorted(d for d in os.listdir(path) if d.startswith("level_")) if os.path.isdir(path) else []
    return [t for t in (os.path.join(path, d, "ticket.pt") for d in levels) if os.path.exists(t)]


def branch_dirs(exp_dir):
    """Names of the experiment's branch directories (those holding a branch.json or a finished level: its
    branch.json lost, a branch still counts for the results and the stale-level check), sorted."""
    is_branch = lambda d: os.path.exists(os.path.join(exp_dir, d, "branch.json")) or \
        finished_tickets(os.path.join(exp_dir, d))
    return sorted(d for d in os.listdir(exp_dir) if is_branch(d))


def run_dirs(exp_dir):
    """The directories of an experiment's runs: the trunk's (the experiment's own), then each branch's."""
    return [exp_dir] + [os.path.join(exp_dir, b) for b in branch_dirs(exp_dir)]


def write_results(exp_dir):
    """results.json/csv per branch and, combined with the trunk's rows, for the experiment, rewritten from
    every finished ticket under the experiment's results.lock (two processes never lose each other's
    rows). Returns the combined rows (trunk first, then branches by name; by level within a run)."""
    with waiting_lock(os.path.join(exp_dir, "results.lock")):
        return write_result_files(exp_dir)


def write_result_files(exp_dir):
    run_rows = lambda path: [load_ticket(t, mmap=True)["metrics"] for t in finished_tickets(path)]
    rows = run_rows(exp_dir)
    for name in branch_dirs(exp_dir):
        branch_rows = run_rows(os.path.join(exp_dir, name))
        if branch_rows:
            write_table(branch_rows, os.path.join(exp_dir, name, "results"))
        rows += branch_rows
    if rows:
        write_table(rows, os.path.join(exp_dir, "results"))
    return rows


def write_table(rows, stem):
    """stem.json and stem.csv, atomically."""
    write_text(json.dumps(rows, indent=1), f"{stem}.json")
    write_csv(rows, f"{stem}.csv")


def markdown_table(rows):
    """A list of dicts with the same keys as a markdown table (floats to 4 decimals)."""
    keys = list(rows[0])
    fmt = lambda v: str(v) if not isinstance(v, float) else f"{v:.1e}" if 0 < abs(v) < 1e-3 else \
        f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}".rstrip("0").rstrip(".")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# ---- CLI: the parser derived from Config, one entry point ----
class HelpFormatter(argparse.HelpFormatter):
    """--help shows a flag's default once: '(default: X)' unless the help already names it or it is
    derived (None: the help says how); the examples at the end keep their lines."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False \
            and action.default != argparse.SUPPRESS             # a default of 0 is shown (0 == False)
        if shown and "default" not in text and action.option_strings:
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) \
                else action.default
            text += f" (default: {default})"
        return text


HELP_EXAMPLES = """examples:
  python lth_ref.py --dataset synthetic --train-subset 2000 --epochs 4 --lr 0.05 --levels 2 \\
      --method regroup --out-dir runs/cpu_demo          # a CPU run in minutes: the trunk and a branch
  python lth_ref.py --arch resnet20 --method regroup     # the paper's setting (downloads CIFAR-10)
  python lth_ref.py --report runs/cpu_demo                # tables and figures of finished runs
  python lth_ref.py --export slim.onnx --out-dir runs/cpu_demo --method refill   # a slim dense network"""


def build_parser(defaults=True):
    """The CLI: one flag per Config field, in its argument group, with its default, help and choices.
    defaults=False leaves every default out, so a parse holds only the flags given (given_flags)."""
    p = argparse.ArgumentParser(
        description="Find structurally sparse lottery tickets (Chen et al., ICML 2022): an unstructured "
                    "trunk (--mask-source) and a structural branch (--method, --init) per level.",
        epilog=HELP_EXAMPLES, formatter_class=HelpFormatter)
    sections = {group: p.add_argument_group(group) for group in GROUPS}
    values = Config()
    for f in dataclasses.fields(Config):
        meta, default = f.metadata, getattr(values, f.name) if defaults else argparse.SUPPRESS
        text = meta["help"] + (f" (official: {meta['official']})" if meta["official"] else "")
        if f.type is bool:
            sections[meta["group"]].add_argument(flag_name(f.name), action="store_true", default=default,
                                                 help=text)
            continue
        kind = next(a for a in (*typing.get_args(f.type), f.type) if a is not type(None))
        kind = str if kind is list else kind   # a list flag's items: strings unless its flag says otherwise
        sections[meta["group"]].add_argument(flag_name(f.name), default=default, help=text,
                                             **{"type": kind, **meta["flag"]})
    return p


def given_flags(argv=None):
    """The Config fields set on the command line, told apart from their defaults (a flag given with its
    default value counts as given)."""
    return frozenset(vars(build_parser(defaults=False).parse_args(argv)))


def config_from_args(args, given):
    """The parsed flags as a resolved Config (Table 1's row for --arch/--dataset filled in, values
    checked). given: given_flags; --import-masks without --mask-source makes the source `import`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    if values["import_masks"] and "mask_source" not in given:
        values["mask_source"] = "import"
    cfg = resolve(Config(**values))
    unread = unread_given(cfg, given)
    if unread:
        raise UsageError(f"{unread[0]}: drop it")
    return cfg


def unread_given(cfg, given):
    """Why each flag given on the command line goes unread by this command: a post-processing knob of
    another --method (--bench regroup reads regroup's; --report and --bench train none), a setting of
    another mask source (read when training only)."""
    tool = "--report" if cfg.report else f"--bench {cfg.bench}" if cfg.bench in ("train", "regroup") else None
    reader = "regroup" if cfg.bench == "regroup" else None if tool else cfg.method
    out = []
    for f in settings_of("branch"):
        knob = f.metadata["knob"]
        if f.name in given and knob and (reader is None or knob not in method_knobs(reader)):
            takers = " and ".join(m for m in POSTPROCESS if knob in method_knobs(m))
            out.append(f"{flag_name(f.name)} is read by --method {takers}, not by this command "
                       f"({tool or f'--method {cfg.method}'})")
    training = not (cfg.report or cfg.bench or cfg.export is not None)
    this = f"--mask-source {cfg.mask_source}" if training else "a tool"
    for f in settings_of("source"):
        if f.name in given and not (training and f.metadata["source"] == cfg.mask_source):
            out.append(f"{flag_name(f.name)} is read by --mask-source {f.metadata['source']} when training, "
                       f"not by this command ({this})")
    return out


def main(argv=None):
    """The single entry point: run an experiment (default), or a benchmark (--bench), an export (--export)
    or a report (--report); the last three run lth_tools.py, imported only then."""
    args, given = build_parser().parse_args(argv), given_flags(argv)
    try:
        cfg = config_from_args(args, given)
        if cfg.report:
            import lth_tools
            lth_tools.write_report(cfg.report, args.out_dir, cfg.report_layers)
        elif cfg.bench:
            import lth_tools
            lth_tools.run_bench(cfg, args.out_dir, given)
        elif cfg.export is not None:
            import lth_tools
            out_dir = lth_tools.experiment_dir(cfg, args.out_dir)
            lth_tools.export_slim(*lth_tools.find_ticket(cfg.ticket, out_dir, cfg, given=given), cfg.export)
        else:
            previous = signal.signal(signal.SIGTERM, stop_on_signal)   # a scheduler's stop: as Ctrl-C
            try:
                with deterministic_algorithms(cfg.deterministic):   # process-wide, so set here
                    run_experiment(cfg)
            finally:
                signal.signal(signal.SIGTERM, previous)
    except (UsageError, datasets.DataError) as e:
        if main_process():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if write_fault(e) is None:
            raise
        if main_process():
            print(f"error: {write_fault(e)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as e:
        if main_process():
            tool = args.report or args.bench or args.export is not None
            print(stop_message(e, training=not tool), file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def stop_message(e, training):
    """What a stop by a signal says: where it stopped, and what the same command goes on from."""
    name = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
    if not training:
        return f"stopped by {name}; run the same command again to redo it"
    go_on = "the same command goes on from there (finished levels are reused)"
    if not hasattr(e, "where"):                # at setup, or between levels
        return f"stopped by {name}: {go_on}"
    kept = getattr(e, "kept", None)
    kept = f"its last epoch checkpoint is kept ({kept})" if kept else "no epoch of that level was kept"
    return f"stopped by {name} at {e.where}: {kept}; {go_on}"


def stop_on_signal(signum, frame):
    """SIGTERM handler: stop the run where it is (the current step is abandoned) like Ctrl-C does."""
    raise Stopped(signum)


def main_process():
    """True in one process, and on rank 0 under torchrun (the one that reports)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


if __name__ == "__main__":
    # run as a script this module is __main__; lth_tools' `import lth_ref` must find it,
    # not load a second copy
    sys.modules.setdefault("lth_ref", sys.modules[__name__])
    if hasattr(signal, "SIGPIPE"):                 # `... | head` ends quietly, like other Unix tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
