"""lth_tools: the tools lth_ref runs on finished tickets (report, benchmarks, export, mask import),
beside the method in lth_ref.py.

    python lth_ref.py --report DIR [DIR ...]                 # the paper's tables and figures
    python lth_ref.py --bench [kernels|paper|regroup|train]  # dense vs grouped GEMM, partitioner, training
    python lth_ref.py --export slim.pt                       # a channel-wise ticket as a smaller network
    python lth_ref.py --import-masks FILE ...                # other tools' masks as the trunk's levels

lth_ref.main imports this module only for those flags (and the experiment loop, for --import-masks);
this module imports lth_ref, never the other way round at load time. Sections, top to bottom: tickets
for the tools (a finished level, or a fresh pruned network), bringing masks in, slim export, benchmarks,
report. The report's functions take and return plain data and can be called from a notebook.
"""
import copy
import dataclasses
import functools
import importlib
import io
import json
import os
import re
import shlex
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lth_ref import datasets, kernels, model_zoo   # data.py, kernels.py, models.py as lth_ref loaded them
from lth_ref import (  # the method
    BLOCK_COLUMNS, OFFICIAL_MIN_ROWS, REGROUP_UNITS, apply_masks, autocast, ceil_div, conv_channel_stats,
    layer_stats, grad_scaler, magnitude_prune, mask_pairs, needs_feats, paper_schedule, postprocess,
    prunable_weights, prune_to_density, refill, regroup_mask, remask, rewind, train_step)
from lth_ref import (  # settings, files and results
    LEVEL0_FREE, RUN_SETTINGS, SOURCE_SETTINGS, Config, Eta, Processes, UsageError, atomic_write,
    branch_config, branch_dirs, branch_knobs, branch_run, check_dir, check_masks_fit, check_training_flags,
    finished_tickets, load_file, load_ticket, markdown_table, read_json, resolve_device, save, settings_fix,
    ticket_unread, trunk_run, whole_model_counts, write_csv, write_text)


# ---- tickets for the tools: a finished level, or a fresh pruned network ----
def find_ticket(ticket=None, out_dir=None, cfg=None, required=True, given=frozenset()):
    """(path, ticket) to benchmark or export: `ticket`, else the last finished level, in the experiment
    `out_dir`, of the run that cfg's --method/--init and knobs name (the trunk for imp); not both. given:
    the flags on the command line (lth_ref.given_flags); an --arch, --dataset or --method there that is
    not the ticket's is refused (check_given_network)."""
    path = ticket
    if path is not None and out_dir:
        raise UsageError(f"--ticket {path} and --out-dir {out_dir} both say which ticket: give one "
                         "(--out-dir with --method picks the last finished level of that run)")
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"--ticket {path} is not a file: pass a finished level's ticket, e.g. "
                         "RUN/BRANCH/level_NN/ticket.pt (the trunk's: RUN/level_NN/ticket.pt), or "
                         "--out-dir RUN with --method and its knobs for the run's last finished level")
    if path is None and out_dir and not os.path.isdir(out_dir):
        problem = "is a file" if os.path.exists(out_dir) else "does not exist"
        raise UsageError(f"--out-dir {out_dir} {problem}: pass the directory of an experiment with a "
                         "finished level (and --method for a branch), or --ticket PATH")
    if path is None and out_dir:
        located = dataclasses.replace(cfg, out_dir=out_dir)
        run = branch_run(located) or trunk_run(located)
        tickets = finished_tickets(run.path)
        if not tickets:
            raise UsageError(f"{out_dir} has no finished level of the {run.name} (branches here: "
                             f"{', '.join(branch_dirs(out_dir)) or 'none'}); name one with --method and its "
                             "knobs, or pass --ticket")
        path = tickets[-1]
    if path is None:
        if required:
            raise UsageError("no ticket to benchmark or export: pass --ticket PATH, or --out-dir of an "
                             "experiment with at least one finished level (and --method for a branch)")
        return None, None
    level_dir = os.path.basename(os.path.dirname(os.path.abspath(path)))
    own = ticket is None or (re.fullmatch(r"level_\d+", level_dir) and os.path.basename(path) == "ticket.pt")
    found = load_ticket(path, what="ticket" if own else "--ticket file")
    check_given_network(path, found, cfg, given)
    return path, found


def experiment_dir(cfg, out_dir):
    """The experiment --export and --bench kernels/paper take their ticket from: --out-dir; else, without
    --ticket, the one a training command with the same flags writes (Config's default out_dir)."""
    if out_dir is not None or cfg.ticket is not None:
        return out_dir
    if not os.path.isdir(cfg.out_dir):
        raise UsageError("no ticket to benchmark or export: pass --ticket PATH, or --out-dir of an "
                         f"experiment with a finished level (these flags' own experiment, {cfg.out_dir}, "
                         "does not exist)")
    return cfg.out_dir


def check_given_network(path, ticket, cfg, given):
    """UsageError when the command line's --arch, --dataset or --method (given) is not the ticket's own."""
    own = ticket["config"]
    differ = [f"--{k} {getattr(cfg, k)}" for k in ("arch", "dataset", "method")
              if k in given and own.get(k, getattr(cfg, k)) != getattr(cfg, k)]
    if differ:
        method = f" ({own['method']})" if "method" in own else ""
        raise UsageError(f"{path} holds a {own.get('arch')} on {own.get('dataset')} ticket{method}, which "
                         f"runs as it is: drop {' and '.join(differ)}")


def ticket_model(ticket):
    """The ticket's network (its arch and class count) holding its trained state, masked, in eval mode."""
    model = model_zoo.MODELS[ticket["config"]["arch"]](ticket["num_classes"])
    check_masks_fit(model, ticket["masks"], "ticket")
    rewind(model, ticket["state_dict"], ticket["masks"])
    return model.eval()


def pruned_network(arch, dataset, density_, seed=0):
    """(model, {name: weight}, masks): a seeded, untrained --arch and its masks at that density, pruned by
    global magnitude in one step (what the benches use when they have no trained ticket)."""
    torch.manual_seed(seed)
    model = model_zoo.MODELS[arch](datasets.CLASS_COUNTS[dataset])
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    return model, weights, prune_to_density({n: w.abs() for n, w in weights.items()}, density_)


def fresh_ticket(arch, dataset, density_, method, knobs, seed=0, out_dir=None):
    """(bench.json path, ticket) for --bench-density: a seeded, untrained --arch pruned by global magnitude
    to that density in one step, post-processed by --method with its knobs, BN calibrated."""
    if method == "imp":
        raise UsageError("--bench-density needs --method refill, refill+ or regroup (an unstructured imp "
                         "mask has no blocks)")
    out_dir = out_dir or os.path.join("runs", f"bench_{arch}_{method}")
    check_dir("--out-dir", out_dir)                          # before the work, like the ticket below
    if os.path.exists(os.path.join(out_dir, "ticket.pt")):
        raise UsageError(f"--out-dir {out_dir} holds a ticket, whose bench.json --bench-density would "
                         "replace with a fresh network's: give another --out-dir")
    classes, shape = datasets.CLASS_COUNTS[dataset], datasets.IMAGE_SHAPES[dataset]
    model, weights, masks = pruned_network(arch, dataset, density_, seed)
    feats = None
    if needs_feats(method, knobs.get("score")):              # an untrained model: a random batch will do
        calibrate_batchnorm(model, shape)
        feats = conv_channel_stats(model, list(weights), torch.randn(BN_CALIBRATION_BATCH, *shape),
                                   torch.randint(0, classes, (BN_CALIBRATION_BATCH,)))
    masks, blocks = postprocess(method, weights, masks, feats, **knobs)
    apply_masks(model, masks)
    calibrate_batchnorm(model, shape)
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, "ticket.pt"), dict(
        config=dict(arch=arch, dataset=dataset, method=method), level=None, num_classes=classes, masks=masks,
        blocks=blocks, state_dict=model.state_dict())


BN_CALIBRATION_BATCHES, BN_CALIBRATION_BATCH = 4, 64   # random batches that set an untrained net's BN stats
BN_MOMENTUM = 0.1   # torch's BatchNorm default, set back once the calibration's cumulative average is done


@torch.no_grad()
def calibrate_batchnorm(model, shape):
    """Set BN running stats from random batches of `shape` images, so an untrained sparse network passes a
    signal of normal scale (without it, the logits of a 10%-dense VGG-16 at init are just the FC
    bias, and the end-to-end output check compares constants)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                                    # cumulative average over the batches
    model.train()
    for _ in range(BN_CALIBRATION_BATCHES):
        model(torch.randn(BN_CALIBRATION_BATCH, *shape))
    for bn in bns:
        bn.momentum = BN_MOMENTUM
    model.eval()


def channel_blocks(mask):
    """A channel-wise (refilled) mask as blocks: one block of the kept rows x every column."""
    mask2d = mask.reshape(mask.shape[0], -1)
    rows = torch.nonzero(mask2d.sum(1) > 0).flatten().cpu()
    if not torch.equal(mask2d[rows].cpu(), torch.ones(len(rows), mask2d.shape[1])) or \
            mask2d.sum() != len(rows) * mask2d.shape[1]:
        raise UsageError("this mask is not channel-wise or block-structured: an unstructured (imp) "
                         "ticket has no blocks; benchmark a refill or regroup ticket")
    return [(rows, torch.arange(mask2d.shape[1]))] if len(rows) else []


# ---- bringing masks in: other tools' files as trunk masks ----
# tool -> --arch -> [(pattern, replacement)]: its parameter names -> ours (re.sub, in order)
IMPORT_NAME_MAPS = {
    "Structure-LTH": {   # the official code's models (utils.setup_model_dataset)
        "resnet18": [(r"\.downsample\.", ".shortcut.")],
        "vgg16": [(r"^classifier\.", "fc.")],
        "wrn32_2": [(r"^bn\.", "bn1."), (r"\.downsample\.0\.", ".shortcut.0."), (r"\.bn3\.", ".shortcut.1."),
                    (r"^linear\.", "fc.")],
        "mobilenet_v1": [(r"^linear\.", "fc.")],
    },
    "open_lth": {        # cifar_resnet_20/32 (a flat `blocks` list of 3 stages), cifar_vgg_16 (`layers.i`)
        "resnet20": [(r"^conv\.", "conv1."), (r"^bn\.", "bn1."),
                     (r"^blocks\.(\d+)\.", lambda m: f"layer{int(m[1]) // 3 + 1}.{int(m[1]) % 3}.")],
        "resnet32": [(r"^conv\.", "conv1."), (r"^bn\.", "bn1."),
                     (r"^blocks\.(\d+)\.", lambda m: f"layer{int(m[1]) // 5 + 1}.{int(m[1]) % 5}.")],
        "vgg16": [(r"^layers\.(\d+)\.(conv|bn)\.",
                   lambda m: f"features.{OPEN_LTH_VGG16[int(m[1])] + (m[2] == 'bn')}.")],
    },
}
# open_lth's VGG-16 `layers.i` (its max-pools hold no weights) -> our `features.j`
OPEN_LTH_VGG16 = dict(zip((0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16),
                          (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)))
# re-saves the tensors and dicts of tensors (NumPy arrays as tensors) of a trusted file (argv 1) as plain
# data (argv 2)
RESAVE_CODE = ("import sys, numpy, torch; c = torch.load(sys.argv[1], weights_only=False); "
               "c = c.state_dict() if hasattr(c, 'state_dict') else c; "
               "t = lambda v: torch.as_tensor(v) if isinstance(v, numpy.ndarray) else v; "
               "c = {k: {j: t(u) for j, u in v.items()} if isinstance(v, dict) else t(v) "
               "for k, v in c.items()}; "
               "torch.save({k: v for k, v in c.items() if torch.is_tensor(v) or isinstance(v, dict) and "
               "all(map(torch.is_tensor, v.values()))}, sys.argv[2])")


def read_imported_masks(path, model, arch):
    """({our name: 0/1 mask}, {our name: trained weight}) of one imported file, for the prunable weights of
    `model` (--arch; any device, "meta" too). UsageError naming the problem: not a torch file, a pickled
    object, a state_dict without masks, names that match no weight, a mask that is not 0/1 or has another
    shape (expected vs found), prunable weights without a mask. Masks of layers lth_ref does not prune
    (stem, classifier, depthwise convs) are ignored with one WARNING."""
    masks, weights = split_import(load_import(path), path)
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prunable, rules = prunable_weights(model), best_name_map(list(masks), ours, arch)
    mapped = {name: rename(name, rules) for name in masks}
    problem = import_mismatch(path, arch, masks, mapped, ours, prunable)
    if problem:
        raise UsageError(problem)
    ignored = sorted(m for m in mapped.values() if m not in prunable)
    if ignored:
        kernels._warn_once(f"{path}: masks of {len(ignored)} layers lth_ref does not prune are ignored (the "
                           f"stem, the classifier and depthwise convs stay dense): {', '.join(ignored[:4])}")
    out = {m: masks[n].float() for n, m in mapped.items() if m in prunable}
    not_binary = sorted(n for n, m in out.items() if not torch.isin(m, torch.tensor([0.0, 1.0])).all())
    if not_binary:
        found = torch.unique(out[not_binary[0]])[:4].tolist()
        raise UsageError(f"--import-masks {path}: a mask must hold only 0 and 1; other values in "
                         f"{', '.join(not_binary[:4])} ({not_binary[0]} holds {found}; is it a weight file?)")
    return out, {mapped[n]: w.float() for n, w in weights.items() if mapped.get(n) in prunable}


# torch.save's files before zip archives pickle this number first (its protocol and opcode bytes before it)
TORCH_MAGIC, TORCH_MAGIC_WITHIN = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little"), 32
NPZ_CONVERT = ("python -c \"import sys, numpy, torch; torch.save({k: torch.from_numpy(v) for k, v in "
               "numpy.load(sys.argv[1]).items()}, sys.argv[2])\"")   # a NumPy .npz of masks -> a torch file


def load_import(path):
    """torch.load one --import-masks file, tensors and plain data only; UsageError saying what it is when
    it is not a torch file, or holds Python objects that weights_only refuses to run."""
    what = not_torch_file(path)
    if what:
        fix = (f"convert it: {NPZ_CONVERT} {shlex.quote(path)} {shlex.quote(path + '.pt')}" if "NumPy" in what
               else "save the masks with torch.save, e.g. torch.save(model.state_dict(), PATH) after "
               "torch.nn.utils.prune, or a {name: 0/1 tensor} dict")
        raise UsageError(f"--import-masks {path} is not a torch file ({what}): {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- anything weights_only refuses or cannot read
        first = (str(e).strip().splitlines() or [""])[0]
        what = "holds Python objects that torch.load(weights_only=True) refuses to unpickle" \
            if "weights only load failed" in first.lower() else f"cannot be read ({type(e).__name__})"
        copy = shlex.quote(path + ".tensors.pt")
        raise UsageError(f"--import-masks {path} {what}; if you trust the file, import the copy of its "
                         "tensors and dicts of tensors that this command writes as plain data: python -c "
                         f"\"{RESAVE_CODE}\" {shlex.quote(path)} {copy}") from None


def not_torch_file(path):
    """What `path` is when torch.save did not write it, else None: torch's zip archives hold a data.pkl;
    its older files pickle TORCH_MAGIC first (a pickle.dump or a NumPy .npz does neither)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None
        npz = names and all(n.endswith(".npy") for n in names)
        return "a NumPy .npz archive" if npz else "a zip archive without torch's data.pkl"
    with open(path, "rb") as f:
        head = f.read(TORCH_MAGIC_WITHIN)
    if TORCH_MAGIC in head:
        return None
    return "a pickle, not torch.save's" if head[:1] == b"\x80" else f"it begins with {head[:8]!r}"


def import_mismatch(path, arch, masks, mapped, ours, prunable):
    """What keeps an imported file's masks (by the file's names, `mapped` to ours) from fitting --arch's
    parameter shapes `ours`, or None: projection-shortcut masks our option-A ResNet has no layer for,
    names that match no weight, masks of another shape (expected vs found), weights without a mask."""
    unmatched = sorted(n for n, m in mapped.items() if m not in ours)
    shortcuts = [n for n in unmatched if re.search(r"\.shortcut\.\d+\.weight$", n) and masks[n].dim() == 4]
    if shortcuts and not any(".shortcut." in n for n in ours):
        return (f"--import-masks {path} holds masks of 1x1 projection shortcuts "
                f"({', '.join(repr(n) for n in shortcuts)}): that tool's network has convolutions in its "
                f"downsampling shortcuts, our --arch {arch} has none (option-A shortcuts: subsample and "
                "zero-pad, no weights), so these masks have no layer here. The other layers are the same: "
                f"drop those entries and import the rest, e.g. python -c \"{drop_command(path, shortcuts)}\"")
    wrong = sorted(n for n, m in mapped.items() if m in prunable and tuple(masks[n].shape) != ours[m])
    missing = sorted(set(prunable) - set(mapped.values()))
    if not (unmatched or wrong or missing):
        return None
    shapes = "; ".join(f"{n}: expected {ours[mapped[n]]}, found {tuple(masks[n].shape)}" for n in wrong[:4])
    parts = [f"no weight of that name {unmatched[:4]}" * bool(unmatched),
             f"another shape ({shapes})" * bool(wrong), f"no mask for {missing[:4]}" * bool(missing)]
    return (f"--import-masks {path} does not fit --arch {arch}: {', '.join(p for p in parts if p)}; was it "
            "made for another --arch, or saved transposed?")


def drop_command(path, names):
    """A one-line Python program that writes PATH.option_a.pt: the file without the entries of `names`
    (bare names), whatever the file calls them (prefixes, `_mask`/`_orig`, open_lth's `___`, a wrapper)."""
    keys = "|".join(r"(^|[._])" + re.escape(n).replace(r"\.", r"(\.|___)") for n in names)
    wrappers = ("masks",) + CHECKPOINT_KEYS
    return (f"import re, torch; m = torch.load('{path}'); d = next((m[k] for k in {wrappers} "
            f"if isinstance(m.get(k), dict)), m); [d.pop(k) for k in list(d) if re.search(r'{keys}', k)]; "
            f"torch.save(m, '{path}.option_a.pt')")


def split_import(raw, path):
    """The masks and trained weights of a loaded file, by the file's own names (wrappers removed): an
    lth_ref ticket; the dict under `masks` or a checkpoint's CHECKPOINT_KEYS, read as below;
    torch.nn.utils.prune's `<p>_mask` (weights `<p>_orig`); open_lth's PrunedModel buffers
    `mask_<p with . as ___>`; else every tensor of a {name: tensor} dict."""
    is_dict = lambda key: isinstance(raw, dict) and isinstance(raw.get(key), dict)
    if is_dict("masks") and is_dict("state_dict"):
        return raw["masks"], {n: raw["state_dict"][n] for n in raw["masks"] if n in raw["state_dict"]}
    raw = next((raw[k] for k in ("masks",) + CHECKPOINT_KEYS if is_dict(k)), raw)
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"--import-masks {path} holds no dict of tensors (a mask file is "
                         "{name: 0/1 tensor})")
    tensors = {bare_name(k): v.to_dense() if v.layout != torch.strided else v   # sparse masks: dense
               for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        inner = [k for k, v in raw.items() if isinstance(v, dict)]
        raise UsageError(f"--import-masks {path} holds no tensors at its top level (its dicts: {inner[:4]}): "
                         f"save the dict of masks itself, e.g. torch.save(torch.load(FILE)[KEY], PATH)")
    if any(k.endswith("_mask") for k in tensors):
        masks = {k[:-len("_mask")]: v for k, v in tensors.items() if k.endswith("_mask")}
        return masks, {n: tensors[n + "_orig"] for n in masks if n + "_orig" in tensors}
    if any(k.startswith("mask_") for k in tensors):
        masks = {k[len("mask_"):].replace("___", "."): v for k, v in tensors.items() if k.startswith("mask_")}
        return masks, {}
    if is_weights_only(tensors):
        stats = " and BN statistics" * any(k.endswith(BN_BUFFERS) for k in tensors)
        raise UsageError(f"--import-masks {path} is a state_dict with no masks (it holds weights{stats}, no "
                         "0/1 masks; torch.nn.utils.prune.remove() drops them): save the `*_mask` buffers or "
                         "a {name: mask} dict (the state_dict before prune.remove holds the buffers)")
    return tensors, {}


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")   # a state_dict's names, never a mask's
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")  # where training scripts keep the
                                                                      # state_dict inside a checkpoint


def is_weights_only(tensors):
    """True for a {name: tensor} dict that is a model's state_dict rather than masks: it holds BN statistics,
    or none of its weight matrices and kernels (2 or more dims) looks like a mask (zeros and at most one
    other value: 0/1, or 0/255 that the 0/1 check then names)."""
    looks_like_mask = lambda t: len(torch.unique(t[t != 0])) <= 1
    return any(k.endswith(BN_BUFFERS) for k in tensors) or not any(
        looks_like_mask(t) for t in tensors.values() if t.dim() >= 2)


def bare_name(name):
    """A name without DataParallel/DDP's `module` components and open_lth PrunedModel's `model.` prefix."""
    name = ".".join(part for part in name.split(".") if part != "module")
    return name[len("model."):] if name.startswith("model.") else name


def best_name_map(names, ours, arch):
    """The rules (ours unchanged, or a tool's IMPORT_NAME_MAPS for arch) under which most names are ours."""
    candidates = [[]] + [maps[arch] for maps in IMPORT_NAME_MAPS.values() if arch in maps]
    return max(candidates, key=lambda rules: sum(rename(n, rules) in ours for n in names))


def rename(name, rules):
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


# ---- slim export: a channel-wise ticket as a smaller dense network ----
EXPORT_CHECK_BATCH = 8      # random images on which an export is checked against its ticket


def kept_dead_rows(model, masks):
    """Output channels whose conv row is pruned but whose BN scale or shift is not 0: they still feed
    relu(BN shift) to the next layer, so slim_model keeps them (tickets trained without BN masks)."""
    modules, pairs, kept = dict(model.named_modules()), model_zoo.conv_bn_pairs(model), 0
    for name, mask in masks.items():
        bn = modules[pairs[name]]
        dead = mask.reshape(mask.shape[0], -1).sum(1) == 0
        kept += int((dead & ((bn.weight != 0) | (bn.bias != 0))).sum())
    return kept


EXPORT_TOLERANCE = 1e-3     # largest relative output error (against the batch spread) of a written
                            # export: fp32 rounding through ResNet-50 reaches about 1e-4; a wrong weight, more
ONNX_EXTRA = "pip install onnx onnxscript onnxruntime"   # the optional extra of --export .onnx and ORT timing


def export_slim(path, ticket, out, log=print):
    """--export PATH: the ticket without its dead channels, as a smaller dense network: PATH.pt =
    models.slim_state (arch, widths, state_dict; models.load_slim rebuilds it), PATH.pt2 = torch.export's
    program, PATH.onnx = ONNX (the optional extra). The file is written to a temporary name, read back and
    run on a random batch of another size than the export's (dynamic batch), checked against the masked
    ticket, and only then renamed into place.

    Paper: A2, refill's FLOPs count the trimmed input and output channels."""
    writer = EXPORT_FORMATS.get(os.path.splitext(out)[1].lower())   # slim.PT is a .pt file too
    if writer is None:
        raise UsageError(f"--export {out}: the file name must end in one of {', '.join(EXPORT_FORMATS)} "
                         "(its format)")
    if os.path.isdir(out):
        raise UsageError(f"--export {out} is a directory: give the path of the file to write")
    check_dir("--export", os.path.dirname(os.path.abspath(out)))
    if os.path.exists(out) and (os.path.samefile(out, path) or os.path.basename(out) in EXPERIMENT_FILES):
        raise UsageError(f"--export {out} would write over the experiment's own file (an experiment reads "
                         f"{', '.join(EXPERIMENT_FILES)}): give the path of a new file, e.g. slim.pt")
    model = ticket_model(ticket)
    slim = model_zoo.slim_model(model, ticket["masks"]).eval()
    kept = kept_dead_rows(model, ticket["masks"])
    if kept:
        print(f"WARNING: {kept} pruned output channels keep a BN scale or shift (ticket trained without BN "
              "masks): they stay in the slim network", file=sys.stderr)
    if ticket["blocks"]:
        log("note: the grouped-GEMM model (kernels.regrouped_model) does not export; this is the slim dense "
            "network, with the zeros inside its blocks")
    shape = datasets.IMAGE_SHAPES[ticket["config"].get("dataset", "cifar10")]
    g = torch.Generator().manual_seed(ticket["config"].get("seed", 0))   # the same check on every call
    x, x_check = (torch.randn(n, *shape, generator=g) for n in (EXPORT_CHECK_BATCH,
                                                                 EXPORT_CHECK_BATCH // 2 + 1))
    err = None

    def write_and_check(tmp):                  # raising here leaves nothing at `out`
        nonlocal err
        with torch.no_grad():
            err = kernels.rel_err(writer(slim, ticket, x, x_check, tmp), model(x_check), centered=True)
        if not err <= EXPORT_TOLERANCE:
            raise UsageError(f"--export {out}: the written network's outputs differ from the ticket's by "
                             f"{err:.2e} (relative; at most {EXPORT_TOLERANCE:g} expected): nothing was "
                             "written")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, write_and_check, mode=None)
    row = dict(ticket=path, **whole_model_counts(model, ticket["masks"], shape), max_rel_err=err, wrote=out,
               params_written=model_zoo.count_params(slim))   # zeros it keeps (linked channels) included
    log(markdown_table([row]))
    return row


def write_slim_state(slim, ticket, x, x_check, path):
    """.pt: models.slim_state; returns the outputs of the file's network (models.load_slim) on x_check."""
    save(model_zoo.slim_state(slim, ticket["config"]["arch"], ticket["num_classes"]), path)
    return model_zoo.load_slim(load_file(path, "slim network")).eval()(x_check)


def write_exported_program(slim, ticket, x, x_check, path):
    """.pt2: torch.export's program with a dynamic batch; returns torch.export.load(path)'s outputs."""
    program = torch.export.export(slim, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    atomic_write(path, lambda f: torch.export.save(program, f))
    return torch.export.load(path).module()(x_check)


def write_onnx(slim, ticket, x, x_check, path):
    """.onnx: torch.onnx.export (dynamic batch, one file); returns ONNX Runtime's outputs of the file."""
    onnxruntime = import_onnx("--export .onnx")
    atomic_write(path, lambda f: f.write(with_input_metadata(onnx_bytes(slim, x), ticket)))
    run = onnx_runner(onnxruntime, path, x_check)
    return torch.from_numpy(run()[0])


def input_metadata(ticket):
    """{key: text} that tells a deployer what the network expects: the input's normalization (per-channel
    mean and std in pixel units 0..255, from the ticket's training set; older tickets: where to find it)."""
    norm, dataset = ticket.get("normalization"), ticket["config"].get("dataset", "cifar10")
    meta = {"lth_ref.input": "float32 (N, 3, H, W) images, (pixel - mean) / std per channel, pixel in 0..255",
            "lth_ref.dataset": dataset, "lth_ref.arch": ticket["config"]["arch"]}
    if norm:
        return {**meta, "lth_ref.mean": json.dumps(norm["mean"]), "lth_ref.std": json.dumps(norm["std"])}
    return {**meta, "lth_ref.mean": f"not in this ticket: data.load_dataset('{dataset}', ...).mean",
            "lth_ref.std": f"not in this ticket: data.load_dataset('{dataset}', ...).std"}


def with_input_metadata(model_bytes, ticket):
    """An ONNX file's bytes with input_metadata(ticket) in its metadata_props (read by onnx, or by ONNX
    Runtime as get_modelmeta().custom_metadata_map of the loaded model)."""
    onnx = importlib.import_module("onnx")
    model = onnx.load_from_string(model_bytes)
    onnx.helper.set_model_props(model, input_metadata(ticket))
    return model.SerializeToString()


def onnx_bytes(net, x):
    """The network as one ONNX file's bytes (torch.onnx.export, the batch dimension dynamic), no progress
    lines."""
    buffer = io.BytesIO()
    with quiet_onnx_export(), torch.no_grad():
        torch.onnx.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                          verbose=False).save(buffer)
    return buffer.getvalue()


def onnx_runner(onnxruntime, model, x):
    """A call that runs an ONNX model (a path or its bytes) on x in ONNX Runtime's CPU provider."""
    runtime = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    feed = {runtime.get_inputs()[0].name: x.numpy()}
    return lambda: runtime.run(None, feed)


EXPERIMENT_FILES = ("ticket.pt", "init.pt", "rewind.pt", "checkpoint.pt", "admm.pt")   # what a run reads back
EXPORT_FORMATS = {".pt": write_slim_state, ".pt2": write_exported_program, ".onnx": write_onnx}


def import_onnx(what):
    """onnxruntime (with onnx and onnxscript, which torch.onnx.export needs), or UsageError with the pip
    line."""
    try:
        for needed in ("onnx", "onnxscript"):  # torch.onnx.export imports them itself: are they there
            importlib.import_module(needed)
        onnxruntime = importlib.import_module("onnxruntime")
    except ImportError as e:
        raise UsageError(f"{what} needs the optional ONNX extra ({e.name} is not installed): "
                         f"{ONNX_EXTRA}") from None
    return onnxruntime


class quiet_onnx_export:
    """torch.onnx.export without its progress and registry lines (torchvision's ops, a torch-internal
    FutureWarning): its real warnings and errors still show."""

    def __enter__(self):
        import logging
        import warnings
        self.logger = logging.getLogger("torch.onnx")
        self.level, self.warnings = self.logger.level, warnings.catch_warnings()
        self.logger.setLevel(logging.ERROR)
        self.warnings.__enter__()
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        self.warnings.__exit__(*exc)


# ---- benchmarks (python lth_ref.py --bench [kernels|paper|regroup|train]) ----
BENCH_TRAIN_DENSITY = 0.2   # the benchmarked ticket keeps 20% of the prunable weights (7 IMP levels)
FORMAT_PROBE_RUNS = 5       # timed forwards per memory format when --bench-memory-format auto measures them
TIMING_SGD = dict(lr=0.01, momentum=0.9)   # --bench train's optimizer: a step's time does not depend on them


def bench_train(arch="resnet20", dataset="cifar10", batch_size=128, device="cpu", amp="off",
                channels_last=False, compile=False, repeats=30, seed=0, log=print):
    """Training throughput (images/s) of lth_ref's step next to a plain PyTorch step, same run.

    Three steps interleaved on the same random batch (drift hits all alike), each with its own copy of the
    model and optimizer and the same amp / channels-last / compile / batch: ours = train_step with the
    masks of a BENCH_TRAIN_DENSITY ticket, ours without masks, and a plain loop (forward, mean
    cross-entropy, backward, step). The masking alone (weight *= mask) is timed too."""
    cfg = Config(amp=amp, channels_last=channels_last)
    classes = datasets.CLASS_COUNTS[dataset]
    model, _, masks = pruned_network(arch, dataset, BENCH_TRAIN_DENSITY, seed)
    model = model.to(device)
    apply_masks(model, masks)
    x = torch.randn(batch_size, *datasets.IMAGE_SHAPES[dataset], device=device)
    y = torch.randint(0, classes, (batch_size,), device=device)
    steps, ours_pairs = {}, None
    for name in ("ours", "ours_unmasked", "plain"):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        m = copy.deepcopy(model).to(memory_format=layout)
        net, opt = torch.compile(m) if compile else m, torch.optim.SGD(m.parameters(), **TIMING_SGD)
        scaler = grad_scaler(device, amp)
        pairs = mask_pairs(m, masks) if name == "ours" else []
        ours_pairs = pairs if name == "ours" else ours_pairs
        steps[name] = functools.partial(plain_train_step, net, opt, scaler, x, y, cfg) if name == "plain" \
            else functools.partial(train_step, net, opt, scaler, pairs, x, y, 1.0 / batch_size, cfg)
    steps["masking"] = functools.partial(remask, ours_pairs)
    log(f"timing {kernels.BENCH_WARMUP} + {repeats} rounds of three training steps (ours, ours without "
        f"masks, plain) and the masking, {arch} at batch {batch_size} on {device_name(device)}")
    ms = dict(zip(steps, kernels.time_interleaved(list(steps.values()), torch.device(device), repeats,
                                                  warmup=kernels.BENCH_WARMUP)))
    ips = {k: batch_size / (ms[k] / 1e3) for k in ("ours", "ours_unmasked", "plain")}
    row = dict(arch=arch, device=device_name(device), batch=batch_size, amp=amp, channels_last=channels_last,
               compile=compile, steps=repeats, img_s_ours=round(ips["ours"], 1),
               img_s_unmasked=round(ips["ours_unmasked"], 1), img_s_plain=round(ips["plain"], 1),
               ours_vs_plain=round(ips["ours"] / ips["plain"], 3),
               masked_vs_unmasked=round(ips["ours"] / ips["ours_unmasked"], 3),
               ms_masking=round(ms["masking"], 3),
               masking_pct_of_step=round(100 * ms["masking"] / ms["ours"], 2))
    log(markdown_table([row]))
    return row


def plain_train_step(net, optimizer, scaler, x, y, cfg):
    """The step of a plain PyTorch loop, for comparison: same settings, no masks, mean loss."""
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(cfg.amp, x.device):
        loss = F.cross_entropy(net(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def bench_regroup(masks, unit="position", seed=0, log=print, **knobs):
    """Partitioner quality and speed per layer: ours vs a random partition vs rows sorted by nnz.

    masks: {name: (O, C, kh, kw)} unstructured masks. All three partitions use the same group size and
    the same column rule, so coverage compares the partitions alone. The official width rule (corrected:
    "intended") is also applied to our groups, to compare the column rules (area, coverage).
    knobs: regroup_mask's."""
    rng, rows = np.random.default_rng(seed), []
    for name, mask in masks.items():
        m2, cols_per_unit = mask.reshape(mask.shape[0], -1).cpu(), REGROUP_UNITS[unit](mask.shape)
        t0 = time.perf_counter()
        new, blocks = regroup_mask(mask.cpu(), unit, **knobs)
        seconds, new = time.perf_counter() - t0, new.reshape(m2.shape)
        if not blocks:                         # an empty layer
            log(f"{name}: regroup keeps no block here; left out of the table")
            continue
        if knobs.get("block_columns") == "official" and torch.equal(new, m2):
            log(f"{name}: the official rule leaves this layer unstructured (no group of more than "
                f"{OFFICIAL_MIN_ROWS} rows); left out of the table")
            continue
        size = max(len(r) for r, _ in blocks)
        nonempty = np.flatnonzero(m2.sum(1).numpy() > 0)
        chunks = lambda order: [np.sort(order[i:i + size]) for i in range(0, len(order), size)]
        by_nnz = nonempty[np.argsort(-m2[nonempty].sum(1).numpy(), kind="stable")]
        official = group_blocks(m2, [b[0].numpy() for b in blocks], 1, "intended")
        official_stats = layer_stats(m2, kernels.block_mask(tuple(m2.shape), official), official)
        rows.append(dict(name=name, shape="x".join(map(str, m2.shape)), density=round(float(m2.mean()), 4),
                         group_rows=size, blocks=len(blocks),
                         coverage=round(layer_stats(m2, new, blocks)["coverage"], 4),
                         random=round(partition_coverage(m2, chunks(rng.permutation(nonempty)),
                                                         cols_per_unit), 4),
                         sorted_nnz=round(partition_coverage(m2, chunks(by_nnz), cols_per_unit), 4),
                         area_vs_nnz=round(float(new.sum() / m2.sum()), 3),
                         official_area_vs_nnz=round(official_stats["density"] / float(m2.mean()), 3),
                         official_coverage=round(official_stats["coverage"], 4), ms=round(1e3 * seconds, 1)))
    if not rows:
        log("no layer keeps a block: nothing to compare")
        return rows
    log(markdown_table(rows))
    mean = lambda k: round(float(np.mean([r[k] for r in rows])), 4)
    log(f"mean coverage: ours {mean('coverage')}, random {mean('random')}, sorted by nnz "
        f"{mean('sorted_nnz')}; official width rule on our groups: coverage {mean('official_coverage')} at "
        f"{mean('official_area_vs_nnz')}x the IMP nonzeros (ours {mean('area_vs_nnz')}x); slowest layer "
        f"{max(r['ms'] for r in rows)} ms, total "
        f"{round(sum(r['ms'] for r in rows), 1)} ms")
    return rows


def group_blocks(mask2d, parts, unit=1, rule="budget"):
    """The blocks [(rows, cols)] that `parts` (row index arrays of an (O, K) mask) get under one of
    regroup's column rules (BLOCK_COLUMNS; budget: the mask's nonzeros), t2 = b2 = 1 unit."""
    units = mask2d.cpu().numpy().reshape(mask2d.shape[0], -1, unit).sum(2)
    found = BLOCK_COLUMNS[rule](units, parts, unit, float(mask2d.sum()), 1, 1)
    columns = lambda c: torch.from_numpy((c[:, None] * unit + np.arange(unit)).ravel())   # units -> columns
    return [(torch.from_numpy(np.asarray(r)).long(), columns(c)) for r, c in found]


def partition_coverage(mask2d, parts, unit=1):
    """Coverage of the blocks that `parts` get under regroup's budget column rule."""
    blocks = group_blocks(mask2d, parts, unit)
    return layer_stats(mask2d, kernels.block_mask(tuple(mask2d.shape), blocks), blocks)["coverage"]


def bench_kernels(path, ticket, device="cpu", batches=(64,), repeats=30, memory_format="auto", paper=False,
                  log=print, dtype=torch.float32):
    """Dense conv vs the grouped GEMM on a ticket: per conv layer and end to end; writes bench.json.

    Each layer at its real activation shape (the dataset's images), then the whole model (dense masked vs
    regrouped_model) and the slim network, for every batch size. paper=True: the paper's profiling setting
    (kernels.PAPER_PROFILE, conv only). Refill tickets run as one block of kept channels per layer.
    memory_format: a kernels.MEMORY_FORMATS key or auto (the faster for dense);
    dtype: of the models and inputs, every side alike. Each figure with its min-max range and a noisy flag."""
    out = os.path.join(os.path.dirname(path), "bench.json")
    check_dir("--bench writes bench.json into", os.path.dirname(os.path.abspath(out)))   # before the work
    setting = f"paper ({kernels.PAPER_PROFILE}, conv only)" if paper else "dataset images"
    warn_replaced_bench(out, setting, ticket["config"]["method"])
    model = ticket_model(ticket)
    blocks = ticket["blocks"] or {n: channel_blocks(m) for n, m in ticket["masks"].items()}
    shape = datasets.IMAGE_SHAPES[ticket["config"].get("dataset", "cifar10")]
    if memory_format == "auto":
        memory_format = faster_memory_format(kernels.masked_model(model, blocks), shape, batches[0], device,
                                             log, dtype)
    report = dict(ticket=None if ticket["level"] is None else path,    # None: a fresh (--bench-density) one
                  arch=ticket["config"]["arch"], method=ticket["config"]["method"], level=ticket["level"],
                  device=device_name(device), memory_format=memory_format,
                  threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
                  **{k: v for k, v in kernels.runtime_info(device, dtype).items() if k != "device"},
                  setting=setting,
                  counts=whole_model_counts(model, ticket["masks"], shape), runs=[])
    fmt, batches = kernels.MEMORY_FORMATS[memory_format], [kernels.PAPER_PROFILE_BATCH] if paper else batches
    progress = layer_progress(len(blocks), len(batches), log)
    for batch in batches:
        layers = kernels.bench_layers(model, blocks, batch, device, paper_setting=paper, repeats=repeats,
                                      input_size=shape, memory_format=fmt, dtype=dtype,
                                      log=functools.partial(progress, batch))
        log(f"\nper layer, batch {batch}, {report['device']}, {memory_format}, {report['dtype']}, median of "
            f"{repeats} (range: min-max ms; noisy: the range is wider than the gap; candidates: each path's "
            "median ms when the layer chose):")
        log(markdown_table([{k: fmt_cell(v) for k, v in row.items()} for row in layers]))
        run = dict(batch=batch, layers=layers)
        if not paper:
            log(f"batch {batch}: timing the whole network (dense, regrouped, slim)")
            run.update(bench_end_to_end(model, ticket, blocks, batch, device, repeats, shape, fmt, log,
                                        dtype))
        report["runs"].append(run)
    write_text(json.dumps(report, indent=1, default=str), out)
    log(f"wrote {out}")
    return report


def warn_replaced_bench(out, setting, method):
    """One WARNING when the bench.json about to be written replaces one of another setting or method (the
    report reads one bench.json per ticket: the last one written)."""
    old = read_bench(out, warn=False) if os.path.exists(out) else None
    if old is not None and (old.get("setting"), old.get("method")) != (setting, method):
        print(f"WARNING: {out} holds a bench of a {old.get('method')} ticket, {old.get('setting')}: this one "
              f"({method}, {setting}) replaces it", file=sys.stderr)


def layer_progress(layers, batches, log):
    """line(batch, row), bench_layers' per-layer callback: one progress line per layer timed (its path, its
    time, the ETA of the layers of every batch)."""
    eta, last = Eta(layers * batches), [time.perf_counter()]

    def line(batch, row):
        now = time.perf_counter()
        left, seconds, last[0] = eta.update(now - last[0]), now - last[0], now
        log(f"batch {batch}: layer {(eta.done - 1) % layers + 1}/{layers} {row['name']} timed "
            f"({row['path']}) in {seconds:.1f}s, ETA {left}")
    return line


SLIM_CHANNEL_MULTIPLE = 8   # the channel multiple --bench times next to a refill ticket's own slim network


def bench_end_to_end(model, ticket, blocks, batch, device, repeats, shape, fmt, log, dtype=torch.float32):
    """The whole network on one batch: dense masked vs the grouped GEMM (regrouped_model) vs the slim network;
    for channel-wise tickets also the slim network with SLIM_CHANNEL_MULTIPLE channel counts and, with the
    ONNX extra on the CPU, the dense and slim networks in ONNX Runtime; all in dtype, on CUDA also in CUDA
    graphs. Returns bench.json's entries."""
    out = dict(model=kernels.bench_model(model, blocks, batch, device, repeats, input_size=shape,
                                         memory_format=fmt, dtype=dtype),
               slim=bench_slim(model, ticket["masks"], batch, device, repeats, shape, fmt, dtype))
    log(markdown_table([{k: fmt_cell(v) for k, v in out["model"].items()}]))
    log("the ticket without its dead channels (slim_model), end to end:")
    slims, variants = [dict(channel_multiple=1, **out["slim"])], {"slim": ticket["masks"]}
    if ticket["config"].get("method") in ("refill", "refill+"):
        weights = {n: ticket["state_dict"][n] for n in ticket["masks"]}
        # its own channels, plus zero channels up to the multiple
        rounded = refill(weights, ticket["masks"], channel_multiple=SLIM_CHANNEL_MULTIPLE)
        out["slim_multiple"] = bench_slim(model, rounded, batch, device, repeats, shape, fmt, dtype)
        slims.append(dict(channel_multiple=SLIM_CHANNEL_MULTIPLE, **out["slim_multiple"]))
        variants[f"slim_multiple_{SLIM_CHANNEL_MULTIPLE}"] = rounded
    log(markdown_table(slims))
    if len(variants) > 1:
        out["onnx"] = bench_onnx(model, variants, batch, device, repeats, shape, log)
    return out


def bench_onnx(model, variants, batch_size, device, repeats, input_size, log):
    """The masked dense ticket and its slim networks ({name: masks}) as ONNX models in ONNX Runtime (CPU),
    outputs checked against the ticket, then timed interleaved on one batch; None (with one WARNING)
    without the ONNX extra or off the CPU."""
    if torch.device(device).type != "cpu":
        return None
    try:
        onnxruntime = import_onnx("timing in ONNX Runtime")
    except UsageError as e:
        kernels._warn_once(f"{e}; skipping the ONNX Runtime timing")
        return None
    ticket = dead_rows_zeroed(model, next(iter(variants.values())))
    nets = {"dense": ticket, **{name: model_zoo.slim_model(ticket, m).eval() for name, m in variants.items()}}
    x = torch.randn(batch_size, *input_size)
    runs = {name: onnx_runner(onnxruntime, onnx_bytes(net, x), x) for name, net in nets.items()}
    with torch.no_grad():                      # every ONNX model computes what the ticket does
        err = max(kernels.rel_err(torch.from_numpy(run()[0]), ticket(x), centered=True)
                  for run in runs.values())
    ms = dict(zip(runs, kernels.time_interleaved(list(runs.values()), torch.device("cpu"), repeats,
                                                 warmup=kernels.BENCH_WARMUP)))
    row = dict(runtime=f"onnxruntime {onnxruntime.__version__}",
               **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
               **{f"{k}_speedup": round(ms["dense"] / v, 3) for k, v in ms.items() if k != "dense"},
               max_rel_err=err)
    log("in ONNX Runtime (CPU), end to end:")
    log(markdown_table([row]))
    return row


def dead_rows_zeroed(model, masks):
    """An eval copy of the ticket with its masks and the BN of its dead rows applied, as training leaves a
    structural ticket (a fresh --bench-density ticket has not trained): what slim_model removes exactly."""
    ticket = copy.deepcopy(model).eval()
    apply_masks(ticket, {**masks, **model_zoo.bn_masks(ticket, masks)})
    return ticket


def bench_slim(model, masks, batch_size, device, repeats, input_size, memory_format=torch.contiguous_format,
               dtype=torch.float32):
    """End to end (eval, no_grad, in dtype): the masked dense ticket vs the same ticket without its dead
    channels (models.slim_model, stock convs), interleaved on one input, eager and on CUDA also as CUDA
    graphs (graph_* cells); outputs checked first. Dead rows' BN scale and shift are zeroed as training
    leaves them (a fresh --bench-density ticket has not trained). Times: kernels.spread_fields."""
    device = torch.device(device)
    ticket = dead_rows_zeroed(model, masks)
    slim = model_zoo.slim_model(ticket, masks).eval()
    macs = model_zoo.count_macs(ticket, input_size), model_zoo.count_macs(slim, input_size)
    ticket, slim = (m.to(device, dtype, memory_format=memory_format) for m in (ticket, slim))
    x = torch.randn(batch_size, *input_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    fns = [lambda: ticket(x), lambda: slim(x)]
    with torch.no_grad():
        err = kernels.rel_err(slim(x), ticket(x), centered=True)
        out = dict(params=model_zoo.count_params(ticket), params_slim=model_zoo.count_params(slim),
                   mac_ratio=round(macs[1] / macs[0], 4), ideal_speedup=round(macs[0] / macs[1], 3),
                   **kernels.spread_fields(*kernels.time_spread(fns, device, repeats, kernels.BENCH_WARMUP),
                                           "slim"),
                   max_rel_err=err)
        if device.type == "cuda":
            replays = [kernels.cuda_graph(fn) for fn in fns]
            timed = kernels.time_spread(replays, device, repeats, kernels.BENCH_WARMUP)
            out.update(kernels.spread_fields(*timed, "slim", prefix="graph_"))
    return out


def faster_memory_format(model, shape, batch_size, device, log=print, dtype=torch.float32):
    """The memory format (kernels.MEMORY_FORMATS key) in which the dense model runs a batch faster on this
    machine, measured (which one wins depends on the CPU or GPU and its oneDNN / cuDNN kernels), so the
    grouped GEMM is compared with the faster dense network (in dtype, as it is benchmarked)."""
    x = torch.randn(batch_size, *shape, device=device, dtype=dtype)
    runs = {}
    for name, memory_format in kernels.MEMORY_FORMATS.items():
        m = copy.deepcopy(model).to(device, dtype, memory_format=memory_format).eval()
        xf = x.contiguous(memory_format=memory_format)
        runs[name] = lambda m=m, xf=xf: m(xf)
    with torch.no_grad():
        ms = dict(zip(runs, kernels.time_interleaved(list(runs.values()), torch.device(device),
                                                     FORMAT_PROBE_RUNS, warmup=kernels.BENCH_WARMUP)))
    best = min(ms, key=ms.get)
    log(f"memory format: {best} (dense forward {', '.join(f'{k} {v:.1f} ms' for k, v in ms.items())})")
    return best


def fmt_cell(v):
    """Table cell: shapes (tuples) as AxB; the rest as markdown_table formats it."""
    return "x".join(map(str, v)) if isinstance(v, tuple) else v


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_bench(cfg, out_dir, given=frozenset()):
    """--bench: the benchmark cfg.bench names, on a saved ticket (--ticket / out_dir and --method) or on a
    fresh pruned network (--bench-density). given: the flags on the command line (find_ticket)."""
    fresh = cfg.bench == "train" or cfg.bench == "regroup" and cfg.bench_density is not None
    if out_dir is not None and fresh:                        # nothing read from it, nothing written into it
        raise UsageError(f"--out-dir {out_dir} is not read by this command ({ticket_unread(cfg)}, and it "
                         "writes no file): drop it")
    device = resolve_device(cfg.device)
    if cfg.bench == "train":
        check_training_flags(cfg, device, Processes())
        return bench_train(cfg.arch, cfg.dataset, cfg.batch_size, device, cfg.amp, cfg.channels_last,
                           cfg.compile, cfg.bench_repeats, cfg.seed)
    knobs = branch_knobs(cfg, cfg.method)
    if cfg.bench == "regroup":
        trunk = dataclasses.replace(cfg, method="imp", init="rewind")   # regroup reads the trunk's masks
        path, ticket = (None, None) if cfg.bench_density is not None else \
            find_ticket(cfg.ticket, out_dir, trunk, required=False, given=given - {"method"})
        if ticket is not None and ticket["config"].get("branch", "trunk") != "trunk":
            print(f"WARNING: {path} is a ticket of the branch {ticket['config']['branch']}, whose masks are "
                  "already post-processed; regroup works on the trunk's (RUN/level_NN/ticket.pt)",
                  file=sys.stderr)
        if ticket is not None:                 # its next IMP mask: the trained weights pruned once more
            weights = {n: ticket["state_dict"][n] for n in ticket["masks"]}
            masks = magnitude_prune(weights, ticket["masks"], cfg.prune_rate)
            print(f"masks: {path}'s trained weights pruned once more by --prune-rate {cfg.prune_rate:g}")
        else:                                  # a seeded, freshly initialized network (default: 20% dense)
            density_ = cfg.bench_density or BENCH_TRAIN_DENSITY
            _, weights, masks = pruned_network(cfg.arch, cfg.dataset, density_, cfg.seed)
            print(f"masks: a fresh seeded {cfg.arch} pruned to density {density_:g} by weight magnitude "
                  f"(seed {cfg.seed}{'; no --ticket or --out-dir given' * (cfg.bench_density is None)})")
        regroup_knobs = {k: v for k, v in branch_knobs(cfg, "regroup").items() if k != "unit"}
        return bench_regroup(masks, cfg.regroup_unit, cfg.seed, **regroup_knobs)
    auto_dtype = "fp16" if torch.device(device).type == "cuda" else "fp32"
    dtype = kernels.BENCH_DTYPES[auto_dtype if cfg.bench_dtype == "auto" else cfg.bench_dtype]
    try:
        kernels.check_dtype(device, dtype)
    except ValueError as e:
        raise UsageError(f"--bench-dtype {cfg.bench_dtype}: {e}") from None
    if cfg.bench_density is not None:
        path, ticket = fresh_ticket(cfg.arch, cfg.dataset, cfg.bench_density, cfg.method, knobs, cfg.seed,
                                    out_dir)
    else:
        path, ticket = find_ticket(cfg.ticket, experiment_dir(cfg, out_dir), cfg, given=given)
    return bench_kernels(path, ticket, device, cfg.bench_batch, cfg.bench_repeats, cfg.bench_memory_format,
                         paper=cfg.bench == "paper", dtype=dtype)


# ---- report: the paper's tables and figures from experiment directories ----
FIG_DPI = 100                   # dots per inch of every PNG: readable labels, files of tens of KB
ACCURACY_FIGSIZE = (6.4, 4.0)   # inches: 640x400 px
SPEEDUP_FIGSIZE = (8.0, 4.0)    # inches: 800x400 px, one bar group per conv layer
BAR_GROUP_WIDTH = 0.8           # x units one layer's bars share (1 would touch the next layer's)
SPEEDUP_HEADROOM = 1.3          # y axis up to 1.3x the tallest bar or mark: room for the legend above
MASK_PANEL_INCHES = 2.4         # width and height of one mask panel (240 px)
MASK_TITLE_INCHES = 0.6         # room above the panels for the titles
MASK_MAX_CELLS = int(MASK_PANEL_INCHES * FIG_DPI)  # displayed cells per mask axis: about one per pixel
REPORT_LAYERS = 3               # default mask pictures: the last three convs, as the paper's Fig. A9
NO_MATPLOTLIB = ("WARNING: matplotlib is not installed: writing report.md and the CSVs without pictures "
                 "(pip install matplotlib to get the PNGs)")
REPORT_NUMBERS = ("density", "test_acc", "flop_ratio", "blocks", "coverage")  # averaged over seeds


# The paper's numbers, transcribed from its appendix (ICML 2022 version): per (arch, dataset, method, init)
# the table, the schedule it was trained with (Table 1's, or App. A2's (+): --schedule plus) and (IMP round,
# remaining weights %, test accuracy %) as printed. Tables A3/A4 (ResNet-18, CIFAR-10): "Ours" = rewind,
# "Random Tickets" = reinit.
PAPER_RESULTS = {
    ("resnet18", "cifar10", "refill", "rewind"): ("A3", "table1", (
        (1, 80.29, 94.14), (2, 64.49, 94.24), (3, 51.43, 94.45), (4, 41.24, 94.16), (5, 32.97, 93.86))),
    ("resnet18", "cifar10", "refill", "reinit"): ("A3", "table1", (
        (1, 80.29, 94.04), (2, 64.49, 93.96), (3, 51.43, 94.20), (4, 41.24, 93.98), (5, 32.97, 93.53))),
    ("resnet18", "cifar10", "regroup", "rewind"): ("A4", "table1", (
        (1, 80.00, 94.48), (2, 72.95, 94.75), (3, 69.37, 94.29), (4, 67.12, 94.62), (5, 58.54, 94.32))),
    ("resnet18", "cifar10", "regroup", "reinit"): ("A4", "table1", (
        (1, 80.00, 94.19), (2, 72.95, 93.42), (3, 69.37, 93.58), (4, 67.12, 93.84), (5, 58.54, 93.76))),
    ("vgg16", "cifar100", "imp", "rewind"): ("A5", "plus", (
        (1, 80.00, 73.64), (2, 64.00, 73.80), (3, 51.20, 73.67), (4, 40.96, 74.01), (5, 32.77, 74.27),
        (6, 26.21, 74.56), (7, 20.97, 74.58), (8, 16.78, 74.52), (9, 13.42, 74.42))),
    ("vgg16", "cifar100", "refill", "rewind"): ("A5", "plus", (
        (1, 80.17, 73.43), (2, 64.06, 72.87), (3, 51.31, 72.67), (4, 41.08, 71.37), (5, 32.85, 70.79),
        (6, 26.33, 71.07), (7, 21.03, 69.42), (8, 16.94, 68.75), (9, 13.42, 67.25))),
    ("vgg16", "cifar100", "regroup", "rewind"): ("A5", "plus", (
        (1, 82.36, 73.63), (2, 80.00, 73.81), (3, 69.46, 74.31), (4, 62.61, 73.94), (5, 56.09, 75.05),
        (6, 46.53, 74.98), (7, 38.18, 75.24), (8, 30.98, 74.68), (9, 25.27, 75.25))),
    ("wrn32_2", "cifar100", "imp", "rewind"): ("A6", "plus", (     # the table prints no round 5
        (1, 80.00, 76.21), (2, 64.00, 75.78), (3, 51.20, 76.02), (4, 40.96, 75.92), (6, 26.21, 75.74),
        (7, 20.97, 75.92), (8, 16.78, 75.87), (9, 13.42, 75.41))),
    ("wrn32_2", "cifar100", "refill", "rewind"): ("A6", "plus", (
        (1, 80.00, 75.46), (2, 64.06, 74.59), (3, 51.51, 73.53), (4, 41.51, 72.95), (6, 26.53, 70.91),
        (7, 21.11, 69.55), (8, 17.11, 67.74), (9, 13.67, 65.73))),
    ("wrn32_2", "cifar100", "regroup", "rewind"): ("A6", "plus", (
        (1, 80.00, 75.98), (2, 64.00, 76.19), (3, 51.20, 76.13), (4, 40.96, 75.88), (6, 26.27, 75.78),
        (7, 21.76, 74.74), (8, 18.14, 73.85), (9, 14.85, 72.99))),
    ("resnet50_3x3stem", "tinyimagenet", "imp", "rewind"): ("A7", "table1", (
        (1, 80.00, 65.44), (2, 64.00, 65.69), (3, 51.20, 65.50), (4, 40.96, 65.73), (5, 32.77, 65.23))),
    ("resnet50_3x3stem", "tinyimagenet", "refill", "rewind"): ("A7", "table1", (
        (1, 80.30, 65.27), (2, 64.16, 63.40), (3, 51.42, 61.89), (4, 41.08, 60.43), (5, 32.85, 59.64))),
    ("resnet50_3x3stem", "tinyimagenet", "regroup", "rewind"): ("A7", "table1", (
        (1, 80.15, 65.51), (2, 68.25, 65.16), (3, 58.19, 65.21), (4, 54.19, 64.42), (5, 51.75, 64.52))),
}
PAPER_DENSE = {  # (arch, dataset): (table, dense test accuracy %), from the tables' captions
    ("vgg16", "cifar100"): ("A5", 73.43), ("wrn32_2", "cifar100"): ("A6", 75.53),
    ("resnet50_3x3stem", "tinyimagenet"): ("A7", 65.33)}
PAPER_SAVINGS = {  # (arch, dataset, method): (running-time saving %, sparsity %, where): the headline numbers
    ("resnet18", "cifar100", "regroup"): (64.93, 78, "abstract, Sec. 4"),
    ("resnet50", "tinyimagenet", "regroup"): (64.84, 74, "abstract, Sec. 4"),
    ("resnet50", "imagenet", "regroup"): (60.23, 58, "abstract, Sec. 4 (0.95 points below dense)"),
}


def paper_cell(arch, dataset, method, init, level):
    """The paper's (table, setting, remaining weights %, test accuracy %) of one ticket, or None."""
    table, setting, points = PAPER_RESULTS.get((arch, dataset, method, init), (None, None, ()))
    return next(((table, setting, remaining, acc) for r, remaining, acc in points if r == level), None)


PAPER_METHOD_SETTINGS = {  # settings a table implies beyond its schedule, per method
    "regroup": dict(block_columns="official", regroup_unit="position"),   # its code: pruning_utils.regroup
}
OFFICIAL_RULE_IGNORES = ("row_multiple", "min_col_nnz", "min_block_cols")   # b1, t2, b2: not read by the
                                                                               # official block-column rule
UNRECORDED = object()       # a setting the experiment's files do not hold (config.json of an older version)


def paper_setting(arch, dataset, method, init):
    """The settings that define a PAPER_RESULTS entry ({} when the paper has none): the table's row
    (arch, dataset, method, init), IMP masks at the paper's prune rate, its schedule preset with every
    value of it (epochs, LR, LR drops, batch, weight decay, rewind epoch), the paper's momentum and LR
    schedule after rewinding, the full training set (no subset, no validation split), and the method's
    settings: Config's defaults (the paper's) with the column rule the table implies."""
    if (arch, dataset, method, init) not in PAPER_RESULTS:
        return {}
    table, preset, _ = PAPER_RESULTS[(arch, dataset, method, init)]
    sched = paper_schedule(arch, dataset, preset)
    default = Config(method=method)
    ignored = ("method", "init", *OFFICIAL_RULE_IGNORES * (PAPER_METHOD_SETTINGS.get(method, {}).get(
        "block_columns") == "official"))
    knobs = {k: v for k, v in branch_config(default).items() if k not in ignored} if method != "imp" else {}
    return {**dict(arch=arch, dataset=dataset, method=method, init=init, mask_source="imp", schedule=preset),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in sched.items()},
            **dict(prune_rate=default.prune_rate, momentum=default.momentum, lr_schedule=default.lr_schedule,
                   train_subset=None, val_split=0), **knobs, **PAPER_METHOD_SETTINGS.get(method, {})}


def paper_mismatch(expected, settings):
    """The settings of a paper cell that a run does not share, as "KEY OURS, paper THEIRS" ("unknown" for
    one its files do not record); [] when every one matches."""
    got = lambda k: settings.get(k, UNRECORDED)
    return [f"{k} {'unknown' if got(k) is UNRECORDED else got(k)}, paper {v}" for k, v in expected.items()
            if got(k) != v]


def with_paper(rows, cfg, branches=None):
    """combine_seeds rows with the paper's remaining weights and accuracy where the run has the paper
    cell's settings (paper_setting: config.json, the branch's branch.json in `branches`, the row's method
    and init) and the paper has its level: paper_table ("A4", "A5 (+)"), paper_remaining, paper_acc ("" 
    elsewhere); paper_differs: the settings that keep a paper cell of this run out ("" when none)."""
    out = []
    for r in rows:
        settings = {**cfg, **(branches or {}).get(r["branch"], {}), "method": r["method"], "init": r["init"]}
        differs = paper_mismatch(paper_setting(cfg.get("arch"), cfg.get("dataset"), r["method"], r["init"]),
                                 settings)
        cell = None if differs else paper_cell(cfg.get("arch"), cfg.get("dataset"), r["method"], r["init"],
                                               r["level"])
        out.append({**r, "paper_table": "" if cell is None else cell[0] + " (+)" * (cell[1] == "plus"),
                    "paper_remaining": "" if cell is None else cell[2],
                    "paper_acc": "" if cell is None else cell[3], "paper_differs": "; ".join(differs)})
    return out


def branch_settings(exp):
    """{branch: its branch.json} of an experiment (read_experiment); a missing or unreadable file: {}."""
    out = {}
    for branch, path in exp["runs"].items():
        try:
            out[branch] = read_json(os.path.join(path, "branch.json")) if branch != "trunk" else {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            out[branch] = {}
    return out


def paper_notes(rows):
    """One line per run whose paper cells are not shown, naming the settings that differ."""
    runs = {r["branch"]: r["paper_differs"] for r in rows if r["paper_differs"]}
    return [f"- {branch}: paper cell not shown: {differs}" for branch, differs in runs.items()]


def read_experiment(path):
    """An experiment directory as data: {path, config, rows, runs {branch: its directory}}.

    Rows come from results.json. A directory of the single-run layout (rows without `branch`, config.json
    with a `method`) reads as one run named by its method. A branch whose directory is missing keeps its
    rows but has no run (one WARNING): its tickets and timings are not the trunk's.
    """
    config, rows = experiment_files(path)
    method, single = config.get("method", "imp"), not any("branch" in r for r in rows)
    defaults = dict(branch=method, source=config.get("mask_source", "imp"), method=method,
                    init=config.get("init", "rewind"))
    rows = [{**defaults, **r} for r in rows]
    runs = {}
    for branch in dict.fromkeys(r["branch"] for r in rows):
        sub = os.path.join(path, branch)
        if branch == "trunk" or single:
            runs[branch] = path
        elif os.path.isdir(sub):
            runs[branch] = sub
        else:
            print(f"WARNING: {path}: results.json lists the branch {branch}, but {sub} is missing: its rows "
                  "are reported, its masks and timings are not", file=sys.stderr)
    return dict(path=path, config=config, rows=rows, runs=runs)


def experiment_files(path):
    """(config, rows): an experiment directory's config.json and results.json, checked; UsageError naming
    what is missing or damaged, and what to do about it."""
    files = [os.path.join(path, f) for f in ("config.json", "results.json")]
    if os.path.exists(files[0]) and not os.path.exists(files[1]):
        raise UsageError(f"{path} has finished levels but no results.json (a stop before it was written): "
                         "run its training command again, which reuses the levels and writes it"
                         if finished_tickets(path) else
                         f"{path} has no finished level yet (results.json appears when its first one has)")
    if not all(os.path.exists(f) for f in files):
        problem = "does not exist" if not os.path.exists(path) else "is a file" if not os.path.isdir(path) \
            else f"is a branch: pass its experiment, {os.path.dirname(os.path.abspath(path))}" \
            if os.path.exists(os.path.join(path, "branch.json")) else "lacks config.json or results.json"
        raise UsageError(f"{path} is not an experiment directory: it {problem} (--report reads the --out-dir "
                         "of a training run; results.json appears when its first level has finished)")
    rewrite = "run the training command again, which rewrites it from the finished tickets"
    config = json_of(files[0], dict, lambda: settings_fix(files[0]))
    rows = json_of(files[1], list, lambda: rewrite)
    if not rows:
        raise UsageError(f"{path}: results.json holds no result rows; {rewrite}")
    bad = next(((i, why) for i, r in enumerate(rows, 1) if (why := row_problem(r))), None)
    if bad:
        raise UsageError(f"{files[1]} is damaged (row {bad[0]}: {bad[1]}): {rewrite}")
    return config, rows


def json_of(path, kind, fix):
    """path's JSON value when it is a `kind` (dict or list); else UsageError: damaged, and fix() says what
    to do."""
    try:
        value = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is damaged (not JSON): {fix()}") from None
    if not isinstance(value, kind):
        raise UsageError(f"{path} is damaged (not a JSON {'object' if kind is dict else 'list'}): {fix()}")
    return value


def row_problem(row):
    """What keeps a results.json row from the report, "" when nothing: it is an object with an integer
    level, names (branch, source, method, init) that are strings, and REPORT_NUMBERS that are finite
    numbers where given (density and test accuracy always)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))
    if not isinstance(row, dict):
        return f"{str(row)[:40]} is not an object"
    level = row.get("level")
    if not (isinstance(level, int) and not isinstance(level, bool) and level >= 0):
        return f"level {row.get('level')!r} is not a level number"
    named = [k for k in ("branch", "source", "method", "init") if k in row and not isinstance(row[k], str)]
    if named:
        return f"{named[0]} {row[named[0]]!r} is not a name"
    given = [k for k in REPORT_NUMBERS if k in ("density", "test_acc") or row.get(k, "") != ""]
    return next((f"{k} {row.get(k)!r} is not a number" for k in given if not number(row.get(k))), "")


def run_key(e):
    """(the settings that make an experiment, its seed): equal keys are copies of one run."""
    settings = {k: v for k, v in e["config"].items() if k not in ("seed", *RUN_SETTINGS)}
    return json.dumps(settings, sort_keys=True), e["config"].get("seed", 0)


def group_seeds(experiments):
    """Experiments whose config.json differ only in `seed` (or in settings a later command may change,
    like --levels) as groups, in first-seen order; within a group by seed. A directory whose settings and
    seed repeat an earlier one's is a copy, not another seed: it opens a group of its own."""
    groups, keys = {}, [run_key(e) for e in experiments]
    for i, e in enumerate(experiments):
        groups.setdefault((keys[i][0], keys[:i].count(keys[i])), []).append(e)
    return [sorted(g, key=lambda e: e["config"].get("seed", 0)) for g in groups.values()]


def repeated_runs(experiments):
    """The directories whose settings and seed repeat an earlier directory's."""
    keys = [run_key(e) for e in experiments]
    return [e["path"] for i, e in enumerate(experiments) if keys[i] in keys[:i]]


def combine_seeds(row_lists):
    """One row per (branch, level) over several seeds' result rows: the mean of each number, the test
    accuracy's min and max, the sparsity (% of the prunable weights), how many seeds reached it and
    dense_acc, the mean dense accuracy of those seeds ("" when none has level 0)."""
    cells, dense = {}, {}
    for rows in row_lists:
        seed_dense = dense_accuracy(rows)
        for r in rows:
            cells.setdefault((r["branch"], r["level"]), []).append(r)
            dense.setdefault((r["branch"], r["level"]), []).append(seed_dense)
    out = []
    for (branch, level), rs in cells.items():
        same_seeds = [a for a in dense[branch, level] if a is not None]
        mean = {k: round(float(np.mean(v)), 6) if (v := [r[k] for r in rs if r.get(k, "") != ""]) else ""
                for k in REPORT_NUMBERS}
        if mean["blocks"] != "" and float(mean["blocks"]).is_integer():
            mean["blocks"] = int(mean["blocks"])              # a count, unless seeds differ
        accs = [r["test_acc"] for r in rs]
        out.append(dict(source=rs[0]["source"], branch=branch, method=rs[0]["method"], init=rs[0]["init"],
                        level=level, seeds=len(rs), **mean, sparsity=round(100 * (1 - mean["density"]), 4),
                        acc_min=min(accs), acc_max=max(accs),
                        dense_acc=round(float(np.mean(same_seeds)), 6) if same_seeds else ""))
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
    rows: each row's mean accuracy is compared with its own dense_acc, the mean dense accuracy of the
    seeds it averages. rows: dicts with level, density, test_acc (a row's own dense_acc wins over the
    argument).
    """
    if dense_acc is None:
        return None
    wins = [r for r in rows if r["level"] >= 1 and r["test_acc"] >= dense_for(r, dense_acc)]
    return min(wins, key=lambda r: (r["density"], -r["test_acc"], r["level"]), default=None)


def dense_for(row, dense_acc):
    """The dense accuracy a row's accuracy is held against: its own dense_acc where it has one
    (combine_seeds: of the seeds it averages), else dense_acc."""
    return dense_acc if row.get("dense_acc", "") == "" else row["dense_acc"]


def _number(d, key):
    """d[key] as a float, NaN when absent or not a number (bench.json is read defensively)."""
    v = d.get(key) if isinstance(d, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def bench_layers_of(run):
    """A bench.json run's layers as plain numbers: name, flop_ratio, ideal 1/flop_ratio, dense_ms,
    regrouped_ms, speedup (dense_ms / regrouped_ms where the file leaves it out), path. A layer whose
    two sides ran the same conv (speedup kernels.SAME_PATH) counts as speedup 1 and regrouped_ms =
    dense_ms: the two timings of one conv differ by noise only."""
    out = []
    for layer in run.get("layers") or []:
        ratio, dense_ms, sparse_ms = (_number(layer, k) for k in ("flop_ratio", "dense_ms", "regrouped_ms"))
        speedup = _number(layer, "speedup")
        if layer.get("speedup") == kernels.SAME_PATH:
            speedup, sparse_ms = 1.0, dense_ms
        elif speedup != speedup and sparse_ms > 0:                 # NaN: not in the file
            speedup = dense_ms / sparse_ms
        out.append(dict(name=str(layer.get("name", "?")), flop_ratio=ratio,
                        ideal=1 / ratio if ratio > 0 else float("nan"), dense_ms=dense_ms,
                        regrouped_ms=sparse_ms, speedup=speedup, path=str(layer.get("path", "")),
                        noisy=layer.get("noisy") is True and layer.get("speedup") != kernels.SAME_PATH))
    return out


def bench_saving(bench):
    """Running-time saving 1 - t_sparse / t_dense of a bench.json's first batch: over its conv layers
    (the paper's profiling, conv only) and end to end where measured (NaN where absent).
    Returns dict(conv, end_to_end, batch, device, date, noisy_layers: how many conv layers' two timings
    overlap (kernels.is_noisy), noisy_end_to_end, paper: timed in the paper's profile, --bench paper)."""
    run = next(iter(bench.get("runs") or []), {}) if isinstance(bench, dict) else {}
    layers = bench_layers_of(run)
    dense, sparse = sum(l["dense_ms"] for l in layers), sum(l["regrouped_ms"] for l in layers)
    model = run.get("model") or {}
    saving = lambda d, s: 1 - s / d if d > 0 else float("nan")
    return dict(conv=saving(dense, sparse) if layers else float("nan"),
                end_to_end=saving(_number(model, "dense_ms"), _number(model, "regrouped_ms")),
                batch=run.get("batch"), device=bench.get("device", "?"), date=bench.get("date", "?"),
                noisy_layers=sum(l["noisy"] for l in layers), noisy_end_to_end=model.get("noisy") is True,
                paper=isinstance(bench, dict) and str(bench.get("setting", "")).startswith("paper"))


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
    """A curve's name: the mask source, the branch that post-processes it, and the experiment where the
    figure holds two of one source (they differ in the source's own settings)."""
    name = f"{row['source']} " + ("(unstructured)" if row["branch"] == "trunk" else f"+ {row['branch']}")
    return name + (f" [{row['experiment']}]" if row.get("experiment") else "")


def accuracy_figure(rows, dense_acc, title="", arch=None, dataset=None):
    """Test accuracy against sparsity (the paper's Figs. 3-6): one line per (mask source, branch) of
    combine_seeds' rows, a min-max band where several seeds ran, the dense accuracy as a dashed line, and
    (given arch and dataset) the paper's numbers of the same runs (PAPER_RESULTS) as hollow markers."""
    fig = _figure(ACCURACY_FIGSIZE)
    ax = fig.add_subplot()
    for label in dict.fromkeys(map(line_label, rows)):
        line = sorted((r for r in rows if line_label(r) == label), key=lambda r: r["level"])
        x = [r["sparsity"] for r in line]
        drawn = ax.plot(x, [100 * r["test_acc"] for r in line], marker="o", markersize=3, label=label)
        if any(r["seeds"] > 1 for r in line):
            ax.fill_between(x, [100 * r["acc_min"] for r in line], [100 * r["acc_max"] for r in line],
                            color=drawn[0].get_color(), alpha=0.2, linewidth=0)
        key = (arch, dataset, line[0]["method"], line[0]["init"])
        table, _, points = PAPER_RESULTS.get(key, (None, None, ()))
        if points and not line[0].get("paper_differs"):      # only beside a run of the same setting
            ax.plot([100 - w for _, w, _ in points], [a for _, _, a in points], linestyle="none",
                    marker="o", markerfacecolor="none", color=drawn[0].get_color(),
                    label=f"{label}: paper, Table {table}")
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
    x, width = np.arange(len(names)), BAR_GROUP_WIDTH / max(1, len(runs))
    for i, (batch, layers) in enumerate(runs):
        speed = {l["name"]: l["speedup"] for l in layers}
        ax.bar(x - BAR_GROUP_WIDTH / 2 + (i + 0.5) * width, [speed.get(n, np.nan) for n in names], width,
               label=f"measured, batch {batch}")
    if runs:
        ax.plot(x, [l["ideal"] for l in runs[0][1]], linestyle="none", marker="_", markersize=12,
                markeredgewidth=2, color="black", label="ideal: 1 / FLOP ratio")
    ax.axhline(1.0, color="gray", linewidth=1, label="dense = 1")
    ax.set_xticks(x, [n.removesuffix(".weight") for n in names], rotation=90, fontsize="x-small")
    ax.set(ylabel="speedup over dense",
           title=f"{title}\n{bench.get('device', '?')}, {bench.get('date', '?')}")
    tallest = np.nanmax([1.0] + [l[k] for _, layers in runs for l in layers for k in ("speedup", "ideal")
                                 if np.isfinite(l[k])])
    ax.set_ylim(0, SPEEDUP_HEADROOM * tallest)
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=FIG_DPI))
    return tuple(int(round(v)) for v in fig.get_size_inches() * FIG_DPI)


def report_tags(experiments):
    """A short unique name per experiment: its directory's name (numbered where two are equal)."""
    names = [os.path.basename(os.path.abspath(e["path"])) for e in experiments]   # `.`: the folder's name
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
    """A bench.json as a dict; None (with one WARNING line unless warn=False) when it cannot be read or
    lacks the structure the report reads: runs, a list of objects whose layers (a list of objects) and
    model (an object) may be left out."""
    objects = lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)
    try:
        bench = read_json(path)
        runs = bench.get("runs", []) if isinstance(bench, dict) else None
        if objects(runs) and all(objects(r.get("layers") or []) and isinstance(r.get("model") or {}, dict)
                                 for r in runs):
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
    noisy = max(s.get("noisy_layers", 0) for s in savings)
    conv_noise = f" ({noisy} noisy layer{'s' * (noisy > 1)})" if noisy else ""
    e2e_noise = " (noisy)" if any(s.get("noisy_end_to_end") for s in savings) else ""
    parts = [f"{100 * v:.1f}% {what}" for v, what in ((conv, f"conv layers{conv_noise}"),
                                                      (e2e, f"end to end{e2e_noise}")) if v == v]
    first = savings[0]
    batch = kernels.PAPER_PROFILE if first.get("paper") else f"batch {first['batch']}"   # and its image size
    where = f"{batch}, {first['device']}, {first['date']}" + \
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
                        dense_acc="" if dense is None else dense if best is None else dense_for(best, dense),
                        extreme_level="none" if best is None else best["level"], density=pick("density"),
                        sparsity=pick("sparsity"), test_acc=pick("test_acc"),
                        saving_conv=finite_mean(s["conv"] for s in savings) if savings else "",
                        saving_end_to_end=finite_mean(s["end_to_end"] for s in savings) if savings else "",
                        saving=saving_text(savings)))
    return out


def markdown_rows(rows, extremes, several):
    """report.md's two tables of a seed group: method x level, and the extreme winning tickets."""
    spread = lambda r: {"acc min-max": f"{r['acc_min']:.4f}-{r['acc_max']:.4f}", "seeds": r["seeds"]}
    none = lambda r: "not shown: settings differ" if r["paper_differs"] else "no paper number"
    paper = lambda r: {"paper: table, remaining %, acc %": none(r) if r["paper_table"] == "" else
                       f"{r['paper_table']}: {r['paper_remaining']:.2f}, {r['paper_acc']:.2f}",
                       "acc - paper (points)": "" if r["paper_table"] == "" else
                       f"{100 * r['test_acc'] - r['paper_acc']:+.2f}"}
    table = [dict(branch=r["branch"], method=r["method"], init=r["init"], level=r["level"],
                  density=r["density"], **{"sparsity %": f"{r['sparsity']:.2f}"}, test_acc=r["test_acc"],
                  **(spread(r) if several else {}), flop_ratio=r["flop_ratio"], blocks=r["blocks"],
                  coverage=r["coverage"], **paper(r)) for r in rows]
    ext = [{"run": e["branch"],
            "extreme winning ticket":
                "none" if e["extreme_level"] == "none" else f"level {e['extreme_level']}",
            "sparsity %": "-" if e["sparsity"] == "" else f"{e['sparsity']:.2f}",
            "test_acc": "-" if e["test_acc"] == "" else f"{e['test_acc']:.4f}",
            **({"vs dense_acc (its seeds)": "-" if e["dense_acc"] == "" else f"{e['dense_acc']:.4f}"}
               if several else {}), "time saving": e["saving"]}
           for e in extremes]
    return markdown_table(table), markdown_table(ext)


def group_markdown(tag, group, rows, dense, extremes):
    """One experiment's (seed group's) section of report.md: settings, dense accuracy, the method x level
    table, the extreme winning tickets."""
    cfg, seeds = group[0]["config"], [e["config"].get("seed", 0) for e in group]
    several = len(group) > 1
    shown = ("arch", "dataset", "seed", "mask_source", *RUN_SETTINGS)   # in the heading, or per command
    settings = ", ".join(f"{k} {v}" for k, v in cfg.items() if k not in shown)
    dense_text = "not finished (no level 0)" if dense is None else f"{dense:.4f}"
    if several and dense is not None:
        accs = [a for e in group if (a := dense_accuracy(e["rows"])) is not None]
        dense_text += f" (mean of {len(accs)} seeds, range {min(accs):.4f}-{max(accs):.4f})"
    dense_text += paper_dense_text(cfg)
    table, ext = markdown_rows(rows, extremes, several)
    savings, notes = paper_saving_lines(cfg, branch_settings(group[0]), extremes), paper_notes(rows)
    return "\n".join([
        f"## {tag}: {cfg.get('arch')} on {cfg.get('dataset')}, mask source {cfg.get('mask_source', 'imp')}, "
        f"seed{'s' * several} {', '.join(map(str, seeds))}", "",
        f"Directories: {', '.join('`' + e['path'] + '`' for e in group)}. Settings: {settings}.", "",
        f"Dense accuracy (level 0): {dense_text}.", "", table, "", *notes, *[""][:len(notes)],
        "Extreme winning tickets: per run, the sparsest level whose test accuracy is at least the dense "
        "accuracy (the paper's definition; ties: the higher accuracy, then the lower level"
        + ("; with several seeds the mean accuracy against the mean dense accuracy of the same seeds"
           if several else "") +
        "). Time saving = 1 - t_ticket / t_dense from the bench.json next to the ticket "
        "(`python lth_ref.py --bench --ticket RUN/BRANCH/level_NN/ticket.pt` writes one).", "", ext, "",
        *savings, *[""][:len(savings)]])


def paper_saving_lines(cfg, branches, extremes):
    """report.md lines: the paper's running-time saving (PAPER_SAVINGS) beside each run's measured one
    (extreme_rows), for runs of its (arch, dataset, method) with the column rule its tickets imply
    (PAPER_METHOD_SETTINGS); where that rule differs, which setting. Each says where it was measured."""
    lines = []
    for e in extremes:
        entry = PAPER_SAVINGS.get((cfg.get("arch"), cfg.get("dataset"), e["method"]))
        if entry is None:
            continue
        settings = {**cfg, **branches.get(e["branch"], {})}
        differs = paper_mismatch(PAPER_METHOD_SETTINGS.get(e["method"], {}), settings)
        paper = f"{entry[0]:.2f}% at {entry[1]}% sparsity ({entry[2]}; the paper's hardware)"
        ours = "-" if e["sparsity"] == "" else f"{e['saving']} at {e['sparsity']:.2f}% sparsity"
        lines.append(f"- {e['branch']}: the paper's time saving not shown: {'; '.join(differs)}" if differs
                     else f"- {e['branch']}: time saving, paper: {paper}; ours: {ours}")
    return lines


def paper_dense_text(cfg):
    """The paper's dense accuracy for report.md's dense line, when the trunk has its table's schedule and
    data (paper_setting of the table's IMP row, less the mask source); else which setting differs."""
    arch, dataset = cfg.get("arch"), cfg.get("dataset")
    if (arch, dataset) not in PAPER_DENSE:
        return ""
    table_name, acc = PAPER_DENSE[(arch, dataset)]
    expected = {k: v for k, v in paper_setting(arch, dataset, "imp", "rewind").items()
                if k not in ("method", "init", "mask_source", *LEVEL0_FREE)}
    differs = paper_mismatch(expected, cfg)
    if differs:
        return f"; the paper's (Table {table_name}) not shown: {'; '.join(differs)}"
    return f"; the paper's: {acc:.2f}% (Table {table_name}, schedule {expected['schedule']})"


def figure_key(exp):
    """Experiments drawn in one accuracy figure: the same settings but for the seed and the mask source
    (its own settings and imported files' hashes too)."""
    return json.dumps({k: v for k, v in exp["config"].items()
                       if k not in ("seed", "mask_source", "import_sha256", *RUN_SETTINGS, *SOURCE_SETTINGS)},
                      sort_keys=True)


def accuracy_pictures(curves, tags):
    """[(file name, make figure)]: one accuracy_vs_sparsity figure per figure_key, holding each seed
    group's lines; the dense line is the mean of the groups' dense accuracies."""
    out = []
    for figure in curves.values():
        first, sources = figure[0][0][0], [group[0]["config"].get("mask_source") for group, _, _ in figure]
        named = len(set(sources)) < len(sources)           # a source twice: its lines name their experiment
        rows = [{**r, **(dict(experiment=tags[group[0]["path"]]) if named else {})}
                for group, group_rows, _ in figure for r in group_rows]
        dense = finite_mean(d for _, _, d in figure if d is not None)
        seeds = max(len(group) for group, _, _ in figure)
        title = f"{first['config'].get('arch')} on {first['config'].get('dataset')}" + \
            (f" ({seeds} seeds: mean, band = min-max)" if seeds > 1 else "")
        name = "accuracy_vs_sparsity.png" if len(curves) == 1 else \
            f"accuracy_vs_sparsity_{tags[first['path']]}.png"
        arch, dataset = first["config"].get("arch"), first["config"].get("dataset")
        out.append((name, lambda r=rows, d=None if dense != dense else dense, t=title: accuracy_figure(
            r, d, t, arch, dataset)))
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
    figure = lambda n: mask_figure([mask_panel(label(b), t, n) for b, t in tickets.items()], f"{title} {n}")
    return [(f"masks_{prefix}{n.removesuffix('.weight')}.png", functools.partial(figure, n)) for n in chosen]


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
    """True when matplotlib and its Figure import (the pictures need them)."""
    try:
        importlib.import_module("matplotlib.figure")   # imports the matplotlib package first
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
    unique = {}
    for d in dirs:                             # each directory once, however it is spelled (links too)
        unique.setdefault(os.path.realpath(d), os.path.normpath(d))
    dirs = list(unique.values())
    experiments = [read_experiment(d) for d in dirs]
    out_dir = out_dir or os.path.join(dirs[0] if len(dirs) == 1 else
                                      os.path.commonpath([os.path.abspath(d) for d in dirs]), "report")
    check_dir("--report's output directory", out_dir)
    tags = dict(zip(dirs, report_tags(experiments)))
    prefix = lambda e: f"{tags[e['path']]}_" if len(experiments) > 1 else ""
    for path in repeated_runs(experiments):
        print(f"WARNING: {path} repeats the settings and seed of another directory: reported on its own, "
              "not as another seed", file=sys.stderr)
    sections, pictures, curves = [], [], {}
    csvs = {"accuracy_vs_sparsity.csv": [], "extreme_tickets.csv": []}
    for group in group_seeds(experiments):
        tag, rows = tags[group[0]["path"]], with_paper(combine_seeds([e["rows"] for e in group]),
                                                       group[0]["config"], branch_settings(group[0]))
        dense = finite_mean(a for e in group if (a := dense_accuracy(e["rows"])) is not None)
        dense = None if dense != dense else round(dense, 6)
        ext = extreme_rows(group, rows, dense)
        sections.append(group_markdown(tag, group, rows, dense, ext))
        csvs["accuracy_vs_sparsity.csv"] += [   # dense_acc last: the paper's columns keep their places
            dict(experiment=tag, **{k: v for k, v in r.items() if k != "dense_acc"}, dense_acc=r["dense_acc"])
            for r in rows]
        csvs["extreme_tickets.csv"] += [dict(experiment=tag, **{k: v for k, v in e.items() if k != "saving"})
                                        for e in ext]
        curves.setdefault(figure_key(group[0]), []).append((group, rows, dense))
        pictures += mask_pictures(group[0], prefix(group[0]), layers)
    for e in experiments:
        pictures += speedup_pictures(e, prefix(e), tags[e["path"]], csvs)
    return write_report_files(out_dir, dirs, sections, csvs, accuracy_pictures(curves, tags) + pictures, log)


REPORT_FILES = re.compile(r"(accuracy_vs_sparsity|extreme_tickets|layer_speedup_|masks_).*\.(png|csv)")


def stale_report_files(out_dir, keep):
    """Names of the files an earlier --report wrote into out_dir (it holds a report.md; REPORT_FILES) that
    are not in `keep`: left there, they would show older numbers beside the new report's."""
    if not os.path.isfile(os.path.join(out_dir, "report.md")):
        return []
    return sorted(f for f in os.listdir(out_dir) if f not in keep and REPORT_FILES.fullmatch(f)
                  and os.path.isfile(os.path.join(out_dir, f)))


def write_report_files(out_dir, dirs, sections, csvs, pictures, log):
    """Write the CSVs, the pictures (when matplotlib imports; else one WARNING line) and report.md; an
    earlier report's files that this one does not write are removed (stale_report_files), with one line."""
    drawn = have_matplotlib()
    keep = {n for n, rows in csvs.items() if rows} | ({n for n, _ in pictures} if drawn else set())
    stale = stale_report_files(out_dir, keep)
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    if stale:
        log(f"removed {len(stale)} file(s) of an earlier report in {out_dir} that this one does not write: "
            f"{', '.join(stale[:4])}{', ...' * (len(stale) > 4)}")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, rows in csvs.items():
        if rows:
            write_csv(rows, written.setdefault(name, os.path.join(out_dir, name)))
    if not drawn:
        print(NO_MATPLOTLIB, file=sys.stderr)
    sizes = {name: save_figure(make(), written.setdefault(name, os.path.join(out_dir, name)))
             for name, make in (pictures if drawn else [])}
    figures = [f"- `{name}` ({w}x{h} px)\n\n  ![{name}]({name})" for name, (w, h) in sizes.items()]
    if not drawn:
        figures = ["Not drawn: matplotlib is not installed (`pip install matplotlib`, then run the same "
                   "command again). The numbers behind them are in the CSVs."]
    text = "\n".join([
        "# lth_ref report", "",
        f"Built by `--report` on {time.strftime('%Y-%m-%d')} from {', '.join(dirs)}. Sparsity = % "
        "of the prunable weights (every conv but the stem) removed; test_acc = the final epoch's test "
        "accuracy; flop_ratio = the blocks' share of the dense conv's multiply-adds.", "",
        *sections, "## Figures", "",
        "Masks: black = kept, rows = output channels (O), columns = (c, ky, kx) positions (K); a mask larger "
        f"than {MASK_MAX_CELLS} cells per axis is block-averaged for display (grey = partly kept). Regroup "
        "masks have their rows and columns reordered by block (`block_order`).", "", *figures, ""])
    write_text(text, written.setdefault("report.md", os.path.join(out_dir, "report.md")))
    log(f"wrote {written['report.md']} ({len(sizes)} figures, {len(written) - len(sizes) - 1} CSVs)")
    return written
