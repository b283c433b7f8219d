"""``--relearn_rho``: a sharpness-aware forget step against relearning (Fan et al., "Towards LLM Unlearning Resilient
to Relearning Attacks: A Sharpness-Aware Minimization Perspective and Beyond", ICML 2025).

A relearning attack fine-tunes the erased weights on images of the concept with its prompt. To make the erasure hold
under such a fine-tune, each step evaluates SalUn's forget term not at the weights ``theta`` but at
``theta + delta``, where ``delta`` is one normalised relearning step::

    delta = -rho * g / ||g||,   g = grad of the diffusion loss of the step's forget latents with the forget prompt

(the loss a relearning fine-tune lowers; ``||g||`` over the weights ``delta`` spans), or with
``--relearn_direction sign`` ``delta = -rho * sign(g) / ||sign(g)||``: the direction of Adam's first step, which a
relearning fine-tune with Adam takes (on the digit world one normalised gradient step of any size lowers the
relearning loss far less than a sign step of the same norm: the gradient direction is sharp). The forget term's
gradient at ``theta + delta`` is applied to ``theta``, beside the retain term's gradient at ``theta`` (alpha-weighted,
as usual). ``delta`` spans every U-Net weight (``--relearn_scope all``, what relearning moves) or only the masked
ones (``mask``). The perturbation is undone by copying back the saved weights (bit-exact), before the retain term and
the optimizer step, so the weights outside the mask stay bit-identical to the base and only the masked ones are trained.
Cost: one more forward-backward per micro-batch (the relearning gradient; ``k`` with ``--relearn_steps k``), and the
forget and retain terms in two passes instead of one. The relearning gradient is taken with ``torch.autograd.grad``,
which never writes ``.grad`` (the masked-gradient hooks do not see it). Its noise comes from the step's own seed, so a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from ..config import EraseConfig
from ..objectives import diffusion_loss


def check_relearn_fits(config: EraseConfig, num_processes: int, sharded: bool) -> None:
    """Refuse, in one line, what the sharpness-aware step does not support: several processes or sharded weights (the
    extra backward would have to be reduced or gathered across processes)."""
    if config.relearn_rho and (num_processes > 1 or sharded):
        raise ValueError("--relearn_rho runs in one process on unsharded weights (its relearning gradient is not "
                         "reduced across processes): drop --relearn_rho, or run one process without --shard_weights")


class RelearnPerturbation:
    """Moves the U-Net's weights ``--relearn_steps`` normalised relearning steps (:meth:`apply`) and back exactly
    (:meth:`undo`)."""

    def __init__(self, unet: torch.nn.Module, mask: Mapping[str, torch.Tensor], config: EraseConfig):
        self.rho, self.steps, self.scope, self.sign = float(config.relearn_rho), int(config.relearn_steps), \
            config.relearn_scope, config.relearn_direction == "sign"
        named = dict(unet.named_parameters())
        if self.scope == "mask":
            self.params = {n: named[n] for n in mask if bool(mask[n].any())}
            self.masks = {n: mask[n].to(named[n].device) for n in self.params}
        else:
            self.params, self.masks = named, {}
        self.saved: Optional[dict] = None
        self.last_norm: Optional[float] = None  # ||d|| of the last inner step

    def apply(self, unet, scheduler, latents: torch.Tensor, embeds, generator: torch.Generator,
              check: Callable[[torch.Tensor], None]) -> None:
        """``k`` times (``--relearn_steps``): ``theta <- theta - (rho / k) * d / ||d||`` on the spanned weights, ``d``
        the relearning gradient (or its sign) at the current, moved weights on fresh noise from ``generator``;
        ``check(norm)`` sees each ``||d||`` first (e.g. to stop on a non-finite one)."""
        if self.saved is not None:
            raise RuntimeError("RelearnPerturbation.apply twice without undo")
        params = list(self.params.values())
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}
        for _ in range(self.steps):
            self._step(unet, scheduler, latents, embeds, generator, check, params)

    def _step(self, unet, scheduler, latents, embeds, generator, check, params) -> None:
        flags = [p.requires_grad for p in params]
        for p in params:  # frozen tensors (no masked entry) are moved by relearning too
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss = diffusion_loss(unet, scheduler, latents, embeds, generator)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        grads = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads)]
        if self.sign:  # Adam's first step: every weight moves by the same amount, against its gradient's sign
            grads = [g.sign() for g in grads]
        if self.masks:
            grads = [g * m for g, m in zip(grads, self.masks.values())]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        check(norm)
        self.last_norm = float(norm)
        scale = -(self.rho / self.steps) / max(self.last_norm, 1e-12)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g.to(p.dtype), alpha=scale)

    @torch.no_grad()
    def undo(self) -> None:
        """Every spanned weight back to its value before :meth:`apply`, bit for bit."""
        for n, p in self.params.items():
            p.copy_(self.saved[n])
        self.saved = None


def make_perturbation(unet, mask, config: EraseConfig) -> Optional[RelearnPerturbation]:
    """The relearning perturbation of ``--relearn_rho`` (None at 0: the loop is SalUn's, unchanged)."""
    return RelearnPerturbation(unet, mask, config) if config.relearn_rho else None
