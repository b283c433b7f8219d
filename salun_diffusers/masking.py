"""Weight-saliency masks: exact top-k selection, packed-bit storage, and exact restoration outside the mask.

One implementation serves the diffusion path (U-Net) and the classifier path (any ``torch.nn.Module``).

* :func:`mask_from_saliency` turns per-parameter saliency (``|accumulated gradient|``) into boolean masks that
  select exactly ``round(ratio * N)`` entries, either globally (one threshold over all weights, SalUn's default)
  or per layer. The global threshold is exact: a seeded sample brackets it, counting passes verify the bracket, and
  ``torch.kthvalue`` on the few values inside finds it; it works for SD1.4's ~860M weights in seconds
  (``torch.quantile`` refuses more than 2**24 elements) and streams tensor by tensor.
  Ties at the threshold are broken deterministically (parameter-name order, then flat index).
  Sharded saliencies (FSDP2 ``DTensor`` s, each process holding its shard): the same selection without gathering
  them, a distributed search for the threshold (:func:`_top_k_shards`); the masks come back sharded as the saliency.
* :func:`save_mask` / :func:`load_mask` store masks as packed bits in a safetensors file (1 bit per weight), sealed with
  sha256 digests of the bits and the header that are verified on load (docs/erasure-format.md).
* :class:`MaskedUpdate` trains flat tensors of the masked values only (optimizer state sized by the mask) and writes
  them into the masked entries after every step; the weights outside the mask are never written, so they stay
  bit-identical to the base even with weight decay or momentum, and no copy of them is kept.
  Sharded weights (FSDP2 ``DTensor`` s): the same on each process's local shard.
* :class:`MaskedAdamW` (``--optimizer_in_backward``) is the same AdamW stepped inside backward, weight by weight, on
  the masked entries in place: no flat copy of the masked values nor of their gradients (SD1.4: 3.4 GB less).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Iterable, Mapping, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

try:  # sharded weights (FSDP2); torch builds without torch.distributed have none
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = ()

from .utils import SEAL_KEY, atomic_path, check_seal, seal_header

logger = logging.getLogger(__name__)

MASK_FORMAT = "salun-mask"
MASK_FORMAT_VERSION = 2

Mask = Dict[str, torch.Tensor]


def _flat_values(values: torch.Tensor) -> torch.Tensor:
    """Saliency as a flat float tensor, checked: non-negative and not NaN (one pass)."""
    values = values.detach().reshape(-1)
    if values.dtype != torch.float32 and values.dtype != torch.float64:
        values = values.float()
    if values.numel() and not bool(values.min() >= 0):  # one reduction, no temporary; NaN propagates into min
        if bool(torch.isnan(values).any()):
            raise ValueError("saliency contains NaN: the forget loss produced NaN gradients; lower the learning rate "
                             "or check the forget data before computing the mask")
        raise ValueError("saliency must be non-negative (pass |gradient|, e.g. from compute_saliency)")
    return values


def _kth_largest(flats, k: int, sample_size: int = 1 << 21) -> float:
    """Exact value of the k-th largest element (1-based) over several flat tensors, in a few streaming passes.

    A seeded random sample brackets the answer (its order statistics around rank ``k``, a wide margin), one pass over
    all values counts those above the bracket and gathers the few inside it, and ``torch.kthvalue`` on those finds
    the answer. The bracket is verified by exact counts, so the result is exact whatever the sample; an unlucky
    sample only widens the bracket and repeats the pass.
    """
    total = sum(f.numel() for f in flats)
    gen = torch.Generator().manual_seed(0)
    parts = []
    for f in flats:  # sample proportionally to each tensor's size (at least one value each)
        n = max(1, round(sample_size * f.numel() / total))
        idx = torch.randint(0, f.numel(), (n,), generator=gen).to(f.device)
        parts.append(f[idx].cpu())
    sample = torch.cat(parts).sort(descending=True).values
    s = sample.numel()
    pos = (k - 0.5) / total * s  # where the k-th largest sits in the sorted sample
    spread = 8.0 * math.sqrt(max(pos * (1 - pos / s), 1.0)) + 16
    for attempt in range(4):
        width = spread * (8 ** attempt)
        hi_i, lo_i = (int(pos - width), int(pos + width)) if attempt < 3 else (-1, s)  # last: everything
        hi = float(sample[hi_i]) if hi_i >= 0 else math.inf
        lo = float(sample[lo_i]) if lo_i < s else -math.inf
        if lo == hi:  # a tie mass around rank k: count it rather than gather it
            above = sum(int(torch.count_nonzero(f > hi)) for f in flats)
            if 1 <= k - above <= sum(int(torch.count_nonzero(f == hi)) for f in flats):
                return hi
            continue
        above, closed = 0, []
        for f in flats:  # one counting pass: values above the bracket, and the (few) values inside it
            above += int(torch.count_nonzero(f > hi))
            closed.append(f[(f >= lo) & (f <= hi)])
        r = k - above  # rank of the answer among the values <= hi
        if r < 1:  # bracket too low: more than k values above hi
            continue
        values = torch.cat(closed)
        if r <= values.numel():  # the answer is inside the bracket: the r-th largest of the values in it
            return float(torch.kthvalue(values.cpu(), values.numel() - r + 1).values)
    raise AssertionError("unreachable: the last bracket holds every value")


def _select_top_k(named: Mapping[str, torch.Tensor], k: int) -> Mask:
    """Boolean masks selecting exactly k largest entries over all tensors (ties: name order, then flat index)."""
    names = sorted(named)
    total = sum(named[n].numel() for n in names)
    if k >= total:
        return {n: torch.ones_like(named[n], dtype=torch.bool) for n in names}
    if any(isinstance(named[n], DTensor) for n in names):
        return _select_top_k_sharded(named, k)
    flats = [_flat_values(named[n]) for n in names]
    threshold = _kth_largest(flats, k)
    masks: Mask = {n: (f > threshold).view(named[n].shape) for n, f in zip(names, flats)}
    need = k - sum(int(torch.count_nonzero(m)) for m in masks.values())  # entries equal to the threshold to take
    for n, f in zip(names, flats):  # ties: name order, then flat index (usually the first tensor holding the value)
        if need <= 0:
            break
        take = torch.nonzero(f == threshold).flatten()[:need]
        masks[n].view(-1)[take] = True
        need -= take.numel()
    return masks


FLOAT32_INF_BITS = 0x7F800000  # float32 +inf's bit pattern; non-negative float32s order as their int32 bit patterns


def _top_k_shards(flats, k, rank: int, world: int, all_reduce) -> list:
    """This process's part of exactly k largest entries over every process's ``flats``, without gathering them.

    ``flats``: this process's shard of each tensor, flat float32, in the tie order (name order; a tensor's shards in
    rank order make it, row-major, as FSDP2's dim-0 shards do); ``all_reduce(t)`` sums an int64 tensor over the
    processes in place. ``k``: an int, the k largest over all tensors; or a list, one k per tensor, the k largest of
    each (``--mask_scope layer``), every tensor's searched at once. Each threshold, the k-th largest value, is found
    by bisection over the int32 bit patterns of the (non-negative) values, 31 or 32 rounds of one all-reduce of the
    counts (one per tensor, whatever the number of thresholds); ties at it are taken in tensor order, then rank order,
    then flat index: the entries the one-process :func:`_select_top_k` takes (of each tensor alone, with a list).
    Returns bool flats. All-reduces per process: at most 34 (the check, the rounds, the tie table)."""
    device = flats[0].device
    per_tensor = not isinstance(k, int)
    group = list(range(len(flats))) if per_tensor else [0] * len(flats)  # tensor j's threshold (and k)
    ks = torch.tensor(list(k) if per_tensor else [k], dtype=torch.int64)
    index = torch.tensor(group)

    def totals(counts):  # counts per tensor, summed over the processes, then over each threshold's tensors
        counts = torch.stack(counts).to(torch.int64)
        all_reduce(counts)
        return torch.zeros_like(ks).index_add_(0, index, counts.cpu())

    if int(totals([torch.count_nonzero((f < 0) | f.isnan()) for f in flats]).sum()):  # every process raises alike
        raise ValueError("saliency must be non-negative and not NaN (pass |gradient|, e.g. from compute_saliency)")
    bits = [f.abs().view(torch.int32) for f in flats]  # -0.0 (bit pattern 0x80000000) as 0.0, as _select_top_k does
    lo = torch.zeros_like(ks)  # per threshold: count(bits >= lo) >= k > count(bits >= hi)
    hi = torch.full_like(ks, FLOAT32_INF_BITS + 1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    while bool((hi - lo > 1).any()):
        active, mid = hi - lo > 1, (lo + hi) // 2  # a threshold found already counts nothing more
        mids, counted = mid.tolist(), active.tolist()
        enough = totals([torch.count_nonzero(b >= mids[g]) if counted[g] else zero
                         for b, g in zip(bits, group)]) >= ks
        lo = torch.where(active & enough, mid, lo)
        hi = torch.where(active & ~enough, mid, hi)
    lo = lo.tolist()
    # per process (a row each) and tensor, the entries equal to its threshold and (second half) those above it
    table = torch.zeros(world, 2 * len(bits), dtype=torch.int64, device=device)
    table[rank] = torch.stack([torch.count_nonzero(b == lo[g]) for b, g in zip(bits, group)]
                              + [torch.count_nonzero(b > lo[g]) for b, g in zip(bits, group)])
    all_reduce(table)
    table = table.cpu()
    # ties to take per threshold, in its tensors' order, then rank order
    need = (ks - torch.zeros_like(ks).index_add_(0, index, table[:, len(bits):].sum(0))).tolist()
    masks = [b > lo[g] for b, g in zip(bits, group)]
    for j, (b, g) in enumerate(zip(bits, group)):
        before = int(table[:rank, j].sum())  # this tensor's ties on the processes before this one
        if need[g] - before > 0:
            take = torch.nonzero(b == lo[g]).flatten()[:need[g] - before]
            masks[j][take] = True
        need[g] -= int(table[:, j].sum())
    return masks


def _select_top_k_sharded(named: Mapping[str, torch.Tensor], k) -> Mask:
    """:func:`_select_top_k` over sharded (``DTensor``) saliencies: each process selects in its own shards
    (:func:`_top_k_shards`); ``k``: an int (over all tensors) or name -> k (each tensor's own top-k, all found in
    one search). The masks are ``DTensor`` s sharded as the saliencies (collective: every process calls it with the
    same names)."""
    names = sorted(named)
    first = named[names[0]]
    mesh = first.device_mesh
    flats = [_local(named[n]).detach().reshape(-1).float() for n in names]
    if not isinstance(k, int):  # each tensor's k, at most its size (all of it, as _select_top_k takes then)
        k = [min(k[n], named[n].numel()) for n in names]
    picked = _top_k_shards(flats, k, mesh.get_local_rank(), mesh.size(),
                           lambda t: dist.all_reduce(t, group=mesh.get_group()))
    return {n: DTensor.from_local(m.view(_local(named[n]).shape), mesh, named[n].placements, shape=named[n].shape,
                                  stride=named[n].stride())
            for n, m in zip(names, picked)}


def mask_from_saliency(saliency: Mapping[str, torch.Tensor], ratio: float = 0.5, scope: str = "global") -> Mask:
    """Select the ``ratio`` most salient weights.

    Args:
        saliency: parameter name -> non-negative saliency (same shape as the parameter).
        ratio: share of weights to select, in (0, 1]. SalUn's default for SD is 0.5.
        scope: ``"global"`` (one threshold over all weights) or ``"layer"`` (the top ``ratio`` of every tensor).

    Returns:
        parameter name -> bool tensor on the saliency's device; exactly ``round(ratio * numel)`` True entries
        (globally or per tensor). Sharded (``DTensor``) saliencies give ``DTensor`` masks sharded alike (collective:
        every process calls it).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}; e.g. --mask_ratio 0.5")
    if scope not in ("global", "layer"):
        raise ValueError(f"mask scope must be 'global' or 'layer', got {scope!r}")
    if not saliency:
        raise ValueError("saliency is empty: no trainable parameters received gradients")
    if scope == "layer":
        ks = {n: max(1, round(ratio * s.numel())) for n, s in saliency.items()}
        if any(isinstance(s, DTensor) for s in saliency.values()):  # one distributed search for every tensor's
            masks = _select_top_k_sharded(saliency, ks)
            return {n: masks[n] for n in saliency}
        return {n: _select_top_k({n: s}, ks[n])[n] for n, s in saliency.items()}
    total = sum(s.numel() for s in saliency.values())
    k = max(1, round(ratio * total))
    masks = _select_top_k(saliency, k)
    return {n: masks[n] for n in saliency}


def sum_over_shards(values: list, tensors, dtype=torch.int64) -> list:
    """``values`` (numbers computed on this process's local parts of ``tensors``) summed over every process when
    ``tensors`` holds sharded (``DTensor``) ones (one all-reduce over their mesh: collective); as they are otherwise."""
    sharded = next((t for t in tensors if isinstance(t, DTensor)), None)
    if sharded is None:
        return list(values)
    total = torch.tensor(list(values), dtype=dtype, device=_local(sharded).device)
    dist.all_reduce(total, group=sharded.device_mesh.get_group())
    return total.tolist()


def selected_counts(mask: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """name -> selected entries; sharded (``DTensor``) masks: over every process's shard (one all-reduce:
    collective)."""
    counts = [int(torch.count_nonzero(_local(m))) for m in mask.values()]
    return dict(zip(mask, sum_over_shards(counts, mask.values())))


def mask_density(mask: Mapping[str, torch.Tensor]) -> float:
    """Share of selected weights over all masked tensors (sharded masks: collective)."""
    total = sum(m.numel() for m in mask.values())
    return sum(selected_counts(mask).values()) / max(total, 1)


# ----------------------------------------------------------------------------------------------- storage


def pack_mask(mask: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """name -> uint8 tensor of packed bits (numpy ``packbits``, big-endian bit order)."""
    return {n: torch.from_numpy(np.packbits(m.detach().cpu().numpy().reshape(-1).astype(bool))) for n, m in mask.items()}


def unpack_mask(packed: Mapping[str, torch.Tensor], shapes: Mapping[str, Iterable[int]]) -> Mask:
    """Inverse of :func:`pack_mask`; ``shapes`` gives each parameter's shape."""
    out: Mask = {}
    for n, bits in packed.items():
        if n not in shapes:
            raise ValueError(f"packed mask entry {n!r} has no recorded shape; the file is corrupt")
        shape = tuple(int(s) for s in shapes[n])
        numel = math.prod(shape)
        arr = np.unpackbits(bits.cpu().numpy().astype(np.uint8))
        if arr.size < numel or arr.size - numel >= 8:
            raise ValueError(f"packed mask entry {n!r} holds {bits.numel()} bytes, which does not match shape {shape}")
        out[n] = torch.from_numpy(arr[:numel].astype(bool)).view(shape)
    return out


def save_mask(mask: Mapping[str, torch.Tensor], path: str, metadata: Optional[Mapping[str, object]] = None) -> None:
    """Write ``mask`` as packed bits to a safetensors file (atomically: temp file, then rename)."""
    header = {
        "format": MASK_FORMAT,
        "format_version": str(MASK_FORMAT_VERSION),
        "shapes": json.dumps({n: list(m.shape) for n, m in mask.items()}, sort_keys=True),
        "density": f"{mask_density(mask):.6f}",
    }
    for key, value in (metadata or {}).items():
        header[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    packed = pack_mask(mask)
    with atomic_path(path) as tmp:
        save_file(packed, tmp, metadata=seal_header(packed, header))


def load_mask(path: str) -> tuple:
    """Read a mask written by :func:`save_mask`, verifying its seal. Returns ``(mask, metadata)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no mask file at {path!r}; compute one with `train_erase.py --save_mask_only` "
                                "or drop --mask_path to compute it")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            packed = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path!r} is not a readable safetensors mask file ({exc})") from exc
    if meta.get("format") != MASK_FORMAT:
        raise ValueError(f"{path!r} is not a SalUn mask (format={meta.get('format')!r})")
    fix = "recompute it (train_erase.py without --mask_path)"
    if SEAL_KEY in meta:
        check_seal(packed, meta, f"mask file {path!r}", fix)
    elif meta.get("format_version") != "1":
        raise ValueError(f"mask file {path!r} (format version {meta.get('format_version')!r}) has no {SEAL_KEY} seal; "
                         f"the file is corrupt: {fix}")
    else:
        logger.warning("mask file %r is format version 1: it has no integrity seal, so corruption cannot be detected; "
                       "recompute it to get a sealed version %d file", path, MASK_FORMAT_VERSION)
    try:
        shapes = json.loads(meta["shapes"])
    except (KeyError, ValueError):
        raise ValueError(f"mask file {path!r} has no readable 'shapes' field; the file is corrupt: {fix}") from None
    return unpack_mask(packed, shapes), meta


# ----------------------------------------------------------------------------------------------- training


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded (``DTensor``) weight's or gradient's local shard, in place; any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _local_mask(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The part of ``p``'s whole-weight ``mask`` that matches ``p``'s local shard: the same slicing as the weight's
    (FSDP2: dim 0, ceil(rows / N) rows per process, the last ones fewer or none); each process slices its own copy
    (``src_data_rank=None``: no communication). A sharded mask (a ``DTensor``, from a sharded saliency pass) is
    this process's part already."""
    if isinstance(mask, DTensor):
        if mask.placements != p.placements or mask.device_mesh != p.device_mesh:
            raise ValueError(f"a sharded mask must be sharded as its weight: {mask.placements} vs {p.placements}")
        return mask.to_local()
    if not isinstance(p, DTensor):
        return mask
    return distribute_tensor(mask, p.device_mesh, p.placements, src_data_rank=None).to_local()


def _masked_parameters(model: torch.nn.Module, mask: Mapping[str, torch.Tensor]):
    """The model's weights that ``mask`` selects entries of (made trainable) and their bool masks on the weights'
    devices (a sharded weight's: the part of its local shard); every other parameter is frozen."""
    params = dict(model.named_parameters())
    unknown = sorted(set(mask) - set(params))
    if unknown:
        raise ValueError(f"mask names {len(unknown)} parameters the model does not have (e.g. {unknown[0]!r}); "
                         "the mask was computed for a different model")
    selected: Dict[str, torch.nn.Parameter] = {}
    masks: Mask = {}
    counts = selected_counts(mask)  # sharded masks: over every process (a weight is trained by all or none)
    for name, p in params.items():
        m = mask.get(name)
        if m is None or not counts[name]:
            p.requires_grad_(False)
            continue
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
        p.requires_grad_(True)
        selected[name] = p
        masks[name] = _local_mask(p, m.to(device=p.device, dtype=torch.bool))  # sharded: this process's part only
    return selected, masks


INDEX_MAX_ENTRIES = 8_000_000  # MaskedUpdate keeps index positions (64 MB of int64 at most) up to this many entries


class MaskedUpdate:
    """Train only the entries of a model's weights that ``mask`` selects; every other entry is never written.

    Usage::

        guard = MaskedUpdate(model, mask)
        optimizer = torch.optim.AdamW(guard.trainable_parameters(), ...)
        loss.backward(); guard.mask_gradients(); optimizer.step(); guard.restore()

    The optimizer sees one flat tensor per weight tensor holding only its masked values, so its state (Adam's two
    moments) is sized by the mask, not the model. Each weight's gradient is gathered into its flat tensor's gradient
    as soon as backward produces it (a post-accumulate-grad hook) and the full-size gradient is dropped, so at most
    one full-size gradient exists at a time; ``hooks=False`` (needed under DDP, which reduces the full gradients)
    gathers in :meth:`mask_gradients` instead. :meth:`restore` writes the flat values into the masked entries.
    No copy of the weights outside the mask is kept: they are never written, so they stay bit-identical to their
    values at construction time whatever the optimizer does (weight decay, momentum).

    Sharded weights (FSDP2 ``DTensor`` s, :mod:`salun_diffusers.erasure.sharding`): everything above applies to
    each process's local shard, with the mask sliced as the weight is; the flat values, their (reduce-scattered)
    gradients and the optimizer state cover this process's masked entries only. Use ``hooks=False`` there.

    Parameters not named in ``mask``, or with an all-False mask, are frozen (``requires_grad=False``).
    After loading weights into the model (a resumed checkpoint), call :meth:`reload` to refresh the flat values.
    """

    def __init__(self, model: torch.nn.Module, mask: Mapping[str, torch.Tensor], hooks: bool = True):
        self.params, masks = _masked_parameters(model, mask)
        # flat masks over flat views of the weights: the same row-major entries as N-d boolean indexing, without the
        # N int64 index columns that indexing an N-d weight builds (as MaskedAdamW does)
        self.masks = {name: m.reshape(-1) for name, m in masks.items()}
        # up to INDEX_MAX_ENTRIES masked entries (a small model), their flat positions are kept (8 bytes each) and
        # gathered / scattered by index: the same entries in the same order as the boolean mask, without finding them
        # again every step (measured on the digit U-Net, 206 tensors, 1 thread: 1.1 ms vs 15.6 ms per gather,
        # 2.4 vs 8.2 ms per scatter)
        total = sum(int(m.sum()) for m in self.masks.values())
        self.index: Optional[Dict[str, torch.Tensor]] = (
            {name: m.nonzero().squeeze(1) for name, m in self.masks.items()} if total <= INDEX_MAX_ENTRIES else None)
        self.values: Dict[str, torch.nn.Parameter] = {}
        self._handles = []
        for name, p in self.params.items():
            self.values[name] = torch.nn.Parameter(self._take(name, p.detach()))
            if hooks:
                self._handles.append(p.register_post_accumulate_grad_hook(self._gather_hook(name)))

    def _gather_hook(self, name: str):
        def hook(p):
            self._gather(name, p)
        return hook

    @torch.no_grad()
    def _gather(self, name: str, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        g = self._take(name, p.grad).to(self.values[name].dtype)
        v = self.values[name]
        if v.grad is None:
            v.grad = g
        else:
            v.grad.add_(g)
        p.grad = None

    def _take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The masked entries of a weight-shaped tensor, flat (a copy)."""
        flat = _local(t).reshape(-1)
        return flat.index_select(0, self.index[name]) if self.index is not None else flat[self.masks[name]]

    def trainable_parameters(self):
        """The flat tensors of masked values, one per trainable weight tensor (give these to the optimizer)."""
        return list(self.values.values())

    def mask_gradients(self) -> None:
        """Gather any full-size gradients left on the weights into the flat gradients (a no-op with hooks)."""
        for name, p in self.params.items():
            self._gather(name, p)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the flat values into the masked entries of the weights (entries outside the mask are untouched)."""
        for name, p in self.params.items():
            value = self.values[name].detach().to(p.dtype)
            if self.index is not None:
                _local(p.data).view(-1).index_copy_(0, self.index[name], value)
            else:
                _local(p.data).view(-1).masked_scatter_(self.masks[name], value)

    @torch.no_grad()
    def reload(self) -> None:
        """Refresh the flat values from the weights (after the model's weights were loaded, e.g. on resume)."""
        for name, p in self.params.items():
            self.values[name].data.copy_(self._take(name, p.detach()))

    @torch.no_grad()
    def load_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set the flat masked values (as :meth:`trainable_parameters` holds them, e.g. saved by a sharded
        checkpoint) and write them into the weights. ``ValueError`` if they are not this mask's."""
        if sorted(values) != sorted(self.values) or any(values[n].shape != v.shape for n, v in self.values.items()):
            raise ValueError("the saved masked values are not this mask's")
        for name, v in self.values.items():
            v.data.copy_(values[name])
        self.restore()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def to(self, device) -> "MaskedUpdate":
        self.masks = {n: m.to(device) for n, m in self.masks.items()}
        if self.index is not None:
            self.index = {n: i.to(device) for n, i in self.index.items()}
        for v in self.values.values():
            v.data = v.data.to(device)
        return self


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW on the masked entries of a model's weights, stepped inside backward (``--optimizer_in_backward``).

    A post-accumulate-grad hook per weight gathers its masked gradient entries, drops the full-size gradient, runs
    the AdamW update (torch.optim.AdamW's math; decoupled weight decay on the masked values only) and writes the new
    values into the masked entries. The state is flat per weight (``exp_avg``, ``exp_avg_sq`` of the masked entries,
    ``step``), so neither a flat copy of the masked values nor their gradients persist: compared with
    :class:`MaskedUpdate` + AdamW this saves two floats per masked weight (SD1.4 at ratio 0.5: 3.4 GB).
    Entries outside the mask are never written. :meth:`step` is a no-op (the update already happened); the lr
    scheduler drives ``param_groups`` as usual and ``state_dict`` / ``load_state_dict`` are torch's.

    Only valid without global gradient clipping, without gradient accumulation, without a gradient scaler (fp16) and
    in a single process: each weight is updated as soon as its own gradient is known. ``check(name, grad)`` (if given)
    sees every gathered gradient before it is applied (e.g. to stop on a non-finite one). It has the interface of
    :class:`MaskedUpdate` too (``restore``, ``reload``, ... are no-ops), so a training loop can use either.
    """

    def __init__(self, model: torch.nn.Module, mask: Mapping[str, torch.Tensor], lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, check=None):
        self.params, self.masks = _masked_parameters(model, mask)
        super().__init__(list(self.params.values()), dict(lr=lr, betas=tuple(betas), eps=eps,
                                                          weight_decay=weight_decay))
        self.check = check
        # flat views: indexing an N-d tensor by a bool mask builds (count, N) int64 indices, a flat one (count, 1)
        self.masks = {name: m.reshape(-1) for name, m in self.masks.items()}
        for name, p in self.params.items():  # state allocated up front, in one piece, not between backward's buffers
            count = int(torch.count_nonzero(self.masks[name]))
            self.state[p] = {"step": torch.tensor(0.0), "exp_avg": p.new_zeros(count), "exp_avg_sq": p.new_zeros(count)}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in self.params.items()]

    def _hook(self, name: str):
        def hook(p):
            self._update(name, p)
        return hook

    @torch.no_grad()
    def _update(self, name: str, p: torch.Tensor) -> None:
        grad = p.grad.reshape(-1)[self.masks[name]]  # boolean indexing copies
        p.grad = None
        if self.check is not None:
            self.check(name, grad)
        group = self.param_groups[0]  # one group (load_state_dict keeps it one)
        state = self.state[p]
        lr, (beta1, beta2) = group["lr"], group["betas"]
        value = p.detach().view(-1)[self.masks[name]]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1  # torch.optim.AdamW's single-tensor update, on the masked entries
        step = state["step"].item()
        value.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_((1 - beta2 ** step) ** 0.5).add_(group["eps"])
        value.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        p.view(-1).masked_scatter_(self.masks[name], value)  # bumps p's version: autograd refuses if p is still needed

    def step(self, closure=None):
        """No-op: every weight was updated during backward. Runs ``closure`` (with gradients) if given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def trainable_parameters(self):
        return []  # no flat tensors: the weights themselves are updated

    def mask_gradients(self) -> None:
        pass

    def restore(self) -> None:
        pass

    def reload(self) -> None:
        pass

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
