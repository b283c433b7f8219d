"""Attacks on an erased model: make it draw the erased concept again.

All three minimise the **attacked model's own denoising loss** on target latents of the concept (images the base
model draws for the same prompt and seed, as UnlearnDiffAtk does); no auxiliary classifier is in the loop.

* :func:`token_attack` (UnlearnDiffAtk, Zhang et al. 2024): ``num_tokens`` adversarial tokens prepended to the
  prompt, optimised in embedding space and projected back onto the vocabulary at every step (straight-through, as in
  PEZ, Wen et al. 2023), so the result is a real prompt anyone can type;
* :func:`inversion_attack` (concept inversion, Pham et al. 2024): one new token embedding learned textual-inversion
  style on images of the concept;
* :func:`conditioning_attack`: the whole text conditioning ``[B, 77, D]`` optimised directly (white-box, the
  strongest of the three).

Model families: the attacks go through the family object (:mod:`salun_diffusers.families`) passed as ``scheduler``
(a DDPM scheduler stands for the U-Net family): its noise, timesteps / sigmas, training target and model call are the
loss. SD 1.x/2.x: the conditioning is the CLIP hidden states ``[B, 77, D]``. SD3 / FLUX (a
:class:`~salun_diffusers.families.FlowFamily`): a :class:`~salun_diffusers.families.PromptCond` of the hidden states
and the pooled embeddings, as the pipeline's ``encode_prompt`` makes them; the conditioning attack optimises both, the
token attack types its words into both of SD3's CLIP encoders (T5, when there is one, reads the typed prompt). What
a family cannot be attacked with is refused in one line (:func:`check_attack_fits`).

Every attack is seeded by an explicit ``torch.Generator`` (noise, timesteps, initial tokens) and deterministic on
CPU. The attacked U-Net (and text encoder) are frozen for the duration and their ``requires_grad`` flags restored
afterwards: their weights and ``.grad`` are never touched, so the attacks can run inside training
(``FAST_STEPS`` gives budgets for that).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..families import (FLUX, SD3, SDXL, PromptCond, map_cond, pipeline_class_name, pipeline_family,
                        training_scheduler)
from ..objectives import diffusion_loss

logger = logging.getLogger(__name__)

# Budgets. DEFAULT_*: the audit / CLI defaults (measured on the digit world, see docs/robustness.md); FAST_STEPS: few
# steps, for an inner attack inside adversarial training.
DEFAULT_STEPS: Dict[str, int] = {"token": 100, "inversion": 200, "conditioning": 100}
FAST_STEPS: Dict[str, int] = {"token": 10, "inversion": 20, "conditioning": 10}
DEFAULT_LR: Dict[str, float] = {"token": 1e-2, "inversion": 5e-3, "conditioning": 1e-2}
# The CLI's conditioning attack: 8 noise draws per step, timesteps 500-999. Measured on the digit world's base model
# from "a handwritten digit" (digit 7, rows 0, 3, 4, 7 of salun-attack --digit 7, 100 steps): the plain attack
# (1 draw, t from 0) drew the 7 on 2 of 4 (8 of 10 over all rows), 8 draws alone 2, lr 0.1 2, 300 steps 2; from
# t >= 500 3 (also at 300 steps or lr 0.03); t >= 300 2, t >= 700 or 800 1 of rows 3, 7.
CONDITIONING_DEFAULTS: Dict[str, int] = {"draws": 8, "min_timestep": 500}
EVAL_DRAWS = 8  # noise draws of the fixed evaluation that picks the best token set
# The added conditioning the conditioning attack optimises besides the hidden states (SD3 / FLUX: the pooled text
# embeddings); anything else (SDXL's time ids) is kept as given.
ATTACKED_ADDED = ("pooled_projections",)
# (pipeline class, attack) -> why it is refused
ATTACK_REFUSALS: Dict[tuple, str] = {
    (SDXL, "token"): "SDXL is not supported by the attacks yet (two text encoders and time ids); attack an SD 1.x/2.x, "
                     "SD3 or FLUX model",
    (FLUX, "token"): "FLUX's prompt hidden states come from T5, which does not read the CLIP word vocabulary the token "
                     "attack chooses from; use --attack conditioning",
    (SD3, "inversion"): "concept inversion learns one token embedding of a single CLIP text encoder, and SD3 reads the "
                        "prompt through two CLIP encoders (and T5); use --attack token or conditioning",
    (FLUX, "inversion"): "concept inversion learns one token embedding of a CLIP text encoder, and FLUX's prompt hidden "
                         "states come from T5; use --attack conditioning",
}
ATTACK_REFUSALS[(SDXL, "inversion")] = ATTACK_REFUSALS[(SDXL, "conditioning")] = ATTACK_REFUSALS[(SDXL, "token")]


def _generator(generator: Optional[torch.Generator]) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def check_attack_fits(pipeline_class: Optional[str], attack: str) -> None:
    """Refuse, in one line saying why, an attack the model family cannot take (``pipeline_class``: the pipeline's
    class name, e.g. from ``model_index.json``; None passes)."""
    reason = ATTACK_REFUSALS.get((pipeline_class, attack))
    if reason:
        raise ValueError(f"the {attack} attack does not fit {pipeline_class}: {reason}")


def _is_flow(scheduler) -> bool:
    return bool(getattr(scheduler, "flow", False))


def _hidden(cond):
    return cond if isinstance(cond, torch.Tensor) else cond.embeds


def _batched(cond):
    """A conditioning with a batch dimension (``[77, D]`` -> ``[1, 77, D]``; a PromptCond's every tensor)."""
    return map_cond(cond, lambda t: t.unsqueeze(0)) if _hidden(cond).ndim == 2 else cond


def _repeat(cond, times: int):
    """``times`` copies of a batch of conditionings, one after another (like ``Tensor.repeat`` on the batch)."""
    return map_cond(cond, lambda t: t.repeat(times, *([1] * (t.ndim - 1))))


def _detached_like(cond, like):
    """``cond`` detached, each tensor in the dtype of ``like``'s."""
    if isinstance(cond, torch.Tensor):
        return cond.detach().to(like.dtype)
    added = None if cond.added is None else {k: v.detach().to(like.added[k].dtype) for k, v in cond.added.items()}
    return PromptCond(cond.embeds.detach().to(like.embeds.dtype), added)


@contextlib.contextmanager
def frozen(*modules: Optional[torch.nn.Module]) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``modules`` for the duration; the flags are restored after."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def attack_loss(unet, scheduler, target_latents: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator,
                added_cond_kwargs=None, min_timestep: int = 0) -> torch.Tensor:
    """The attacked model's own denoising loss: MSE of ``eps(x_t | embeds)`` against the noise that made ``x_t``
    from ``target_latents`` (noise and timesteps drawn from ``generator``). ``embeds`` with batch 1 is shared by
    every target. ``scheduler`` may be a family object (SD3 / FLUX: sigmas with the pipeline's shift, the velocity
    target, ``embeds`` a PromptCond with the pooled embeddings)."""
    latents = target_latents.to(unet.device, unet.dtype)
    embeds = _batched(map_cond(embeds, lambda t: t.to(unet.device, unet.dtype)))
    if _hidden(embeds).shape[0] == 1 and latents.shape[0] > 1:
        embeds = map_cond(embeds, lambda t: t.expand(latents.shape[0], *t.shape[1:]))
    return diffusion_loss(unet, scheduler, latents, embeds, generator, added_cond_kwargs=added_cond_kwargs,
                          min_timestep=min_timestep)


@torch.no_grad()
def evaluate_loss(unet, scheduler, target_latents, embeds, seed: int = 0, draws: int = EVAL_DRAWS) -> float:
    """:func:`attack_loss` averaged over ``draws`` fixed noise draws per target (``seed``): comparable across calls."""
    latents = target_latents.repeat(draws, *([1] * (target_latents.ndim - 1)))
    embeds = _batched(embeds)
    if _hidden(embeds).shape[0] > 1:
        embeds = _repeat(embeds, draws)
    gen = torch.Generator(device=unet.device).manual_seed(int(seed))
    return float(attack_loss(unet, scheduler, latents, embeds, gen))


def _prompt_attack_setup(pipe, unet, scheduler, generator):
    """The attacked denoiser (default ``pipe.unet``; SD3 / FLUX: ``pipe.transformer``), the training noise schedule
    (the family object for SD3 / FLUX), the attack's generator and the seed of its fixed evaluation noise (drawn
    first, so it depends on the generator alone)."""
    gen = _generator(generator)
    eval_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=gen.device))
    if scheduler is None:
        family = pipeline_family(pipe)
        scheduler = family if family.flow else training_scheduler(pipe)
    if unet is None:
        unet = pipe.transformer if _is_flow(scheduler) else pipe.unet
    return unet, scheduler, gen, eval_seed


# ---------------------------------------------------------------------------------------------------- text side
def encode_ids(text_encoder, input_ids: torch.Tensor, edit: Optional[Callable] = None) -> torch.Tensor:
    """Hidden states ``[B, 77, D]`` (what the pipeline feeds the U-Net) of ``input_ids``.

    ``edit(token_embeddings) -> token_embeddings`` replaces rows of the input token embeddings before the position
    embeddings are added (differentiably), e.g. to put a learned vector where a placeholder token stands.
    """
    handle = None
    if edit is not None:
        handle = text_encoder.get_input_embeddings().register_forward_hook(lambda module, args, out: edit(out))
    try:
        return text_encoder(input_ids.to(text_encoder.device))[0]
    finally:
        if handle is not None:
            handle.remove()


def _ids(tokenizer, pieces: Sequence[int]) -> torch.Tensor:
    """``[1, max_length]``: BOS, ``pieces`` (truncated), EOS, padding, as ``tokenizer(..., padding='max_length')``."""
    n = tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *list(pieces)[:n - 2], tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([ids + [pad] * (n - len(ids))])


def _pieces(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []


def encode_prompt(pipe, prompt: str, scheduler=None):
    """The conditioning ``[1, 77, D]`` the pipeline makes of ``prompt`` (no classifier-free guidance). SD3 / FLUX
    (``scheduler`` the family object, default the pipeline's): a batch-1 PromptCond of the pipeline's
    ``encode_prompt`` (hidden states and pooled embeddings)."""
    if scheduler is None and getattr(pipe, "transformer", None) is not None:
        scheduler = pipeline_family(pipe)
    with torch.no_grad():
        if _is_flow(scheduler):
            return scheduler.prompt_conds([prompt])
        return encode_ids(pipe.text_encoder, _ids(pipe.tokenizer, _pieces(pipe.tokenizer, prompt))).float()


def word_vocabulary(tokenizer) -> torch.Tensor:
    """Ids of whole-word tokens made of lower-case letters and digits (``"cat</w>"``): the token attack's choices.

    Such a token decodes to a plain word that tokenizes back to itself, so the adversarial prompt is a real,
    typeable prompt.
    """
    cached = getattr(tokenizer, "_salun_word_vocabulary", None)
    if cached is not None:
        return cached
    pattern = re.compile(r"[a-z0-9]+</w>")
    ids = sorted(i for tok, i in tokenizer.get_vocab().items() if pattern.fullmatch(tok))
    if not ids:
        raise ValueError("the tokenizer has no whole-word tokens (like 'cat</w>') for the token attack to choose from")
    result = torch.tensor(ids)
    try:
        tokenizer._salun_word_vocabulary = result
    except AttributeError:
        pass
    return result


def _word(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id)).replace("</w>", "")


# -------------------------------------------------------------------------------------------------- conditioning
def conditioning_attack(unet, scheduler, target_latents: torch.Tensor, init_embeds, *,
                        steps: int = DEFAULT_STEPS["conditioning"], lr: float = DEFAULT_LR["conditioning"],
                        draws: int = 1, min_timestep: int = 0, generator: Optional[torch.Generator] = None,
                        show_progress: bool = False):
    """Optimise the whole text conditioning (white-box) so the model reconstructs ``target_latents``.

    ``init_embeds``: ``[B, 77, D]`` (or ``[1, 77, D]`` shared by all targets), e.g. a neutral prompt's embedding.
    Adam on the conditioning, ``draws`` fresh noise / timestep draws per target per step (batched: a lower-variance
    gradient for little more time on a small model), timesteps from ``min_timestep`` up (the noisy end, where what
    the image shows is decided; the CLI's defaults in ``CONDITIONING_DEFAULTS``). Returns the adversarial conditioning
    (detached, ``init_embeds``' shape and dtype). The U-Net's weights and gradients are untouched.

    SD3 / FLUX (``scheduler`` a :class:`~salun_diffusers.families.FlowFamily`, ``unet`` the transformer):
    ``init_embeds`` is a :class:`~salun_diffusers.families.PromptCond`; its hidden states and its pooled embeddings
    are optimised together (one Adam over both), ``min_timestep`` is a sigma times 1000.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not 0 <= min_timestep < scheduler.config.num_train_timesteps:
        raise ValueError(f"min_timestep must be in [0, {scheduler.config.num_train_timesteps}), got {min_timestep}")
    gen = _generator(generator)
    embeds = map_cond(init_embeds, lambda t: t.detach().float().clone())
    params = [embeds] if isinstance(embeds, torch.Tensor) else \
        [embeds.embeds, *(v for k, v in (embeds.added or {}).items() if k in ATTACKED_ADDED)]
    for p in params:
        p.requires_grad_(True)
    latents = target_latents.repeat(draws, *([1] * (target_latents.ndim - 1)))
    opt = torch.optim.Adam(params, lr=lr)
    with frozen(unet), torch.enable_grad():
        for _ in tqdm(range(steps), desc="conditioning attack", disable=not show_progress, leave=False):
            opt.zero_grad(set_to_none=True)
            hidden = _hidden(embeds)
            batch = _repeat(embeds, draws) if hidden.ndim == 3 and hidden.shape[0] > 1 else embeds
            attack_loss(unet, scheduler, latents, batch, gen, min_timestep=min_timestep).backward()
            opt.step()
    return _detached_like(embeds, init_embeds)


# --------------------------------------------------------------------------------------------------------- token
@dataclass
class TokenAttackResult:
    """An adversarial prompt: ``num_tokens`` vocabulary words prepended to the original prompt."""

    prompt: str  # the adversarial prompt (adversarial words, a space, the original prompt)
    token_ids: List[int]  # the adversarial tokens' ids
    tokens: List[str]  # ... and their words
    embeds: torch.Tensor  # [1, 77, D]: the conditioning of ``prompt``, to feed the U-Net (SD3: a PromptCond)
    loss_start: float  # evaluate_loss of the initial tokens ...
    loss_final: float  # ... and of the chosen ones (same fixed noise draws)
    losses: List[float] = field(default_factory=list, repr=False)  # per optimisation step


def token_attack(pipe, target_latents: torch.Tensor, prompt: str, *, num_tokens: int = 5,
                 steps: int = DEFAULT_STEPS["token"], lr: float = DEFAULT_LR["token"],
                 generator: Optional[torch.Generator] = None, unet=None, scheduler=None,
                 eval_every: Optional[int] = None, show_progress: bool = False) -> TokenAttackResult:
    """UnlearnDiffAtk: ``num_tokens`` adversarial tokens prepended to ``prompt``, chosen to minimise
    :func:`attack_loss` of the attacked U-Net (``unet``, default ``pipe.unet``) on ``target_latents``.

    Continuous token embeddings are optimised with Adam; every step they are projected onto the nearest whole-word
    vocabulary embedding (cosine) and the projected tokens are what the text encoder sees (straight-through). Every
    ``eval_every`` steps (default ``steps // 4``) the projected token set is scored with :func:`evaluate_loss` on
    fixed noise; the best set (the start included) is returned.

    SD3 (``scheduler`` its :class:`~salun_diffusers.families.FlowFamily`, default the pipeline's): the words go
    through both CLIP encoders, as the pipeline's ``encode_prompt`` puts a prompt through them; each encoder has its
    own soft embeddings, and a word is chosen by the sum of their cosines. The loss is the transformer's own
    flow-matching loss on the conditioning ``encode_prompt`` makes (hidden states and pooled embeddings); ``embeds``
    of the result is that PromptCond for the prompt as typed.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if getattr(pipe, "transformer", None) is not None:
        check_attack_fits(pipeline_class_name(pipe), "token")
    unet, scheduler, gen, eval_seed = _prompt_attack_setup(pipe, unet, scheduler, generator)
    flow = _is_flow(scheduler)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    encoders = [text_encoder, pipe.text_encoder_2] if flow else [text_encoder]
    if flow and pipe.tokenizer_2.get_vocab() != tokenizer.get_vocab():
        raise ValueError("the token attack needs SD3's two CLIP tokenizers to share one vocabulary")
    eval_every = max(1, eval_every or steps // 4 or 1)

    vocab = word_vocabulary(tokenizer).to(text_encoder.device)
    tables = [e.get_input_embeddings().weight.detach()[vocab.to(e.device)].float() for e in encoders]
    units = [F.normalize(t, dim=-1) for t in tables]
    start = torch.randint(0, len(vocab), (num_tokens,), generator=gen, device=gen.device).to(vocab.device)
    ids = _ids(tokenizer, [0] * num_tokens + _pieces(tokenizer, prompt)).to(text_encoder.device)
    span = slice(1, 1 + num_tokens)

    def nearest(softs) -> torch.Tensor:
        """The vocabulary word nearest (cosine, summed over the encoders) to each soft token."""
        scores = F.normalize(softs[0], dim=-1) @ units[0].T
        for soft, unit in zip(softs[1:], units[1:]):
            scores = scores + F.normalize(soft, dim=-1) @ unit.T
        return scores.argmax(-1)

    def conditioning(choice: torch.Tensor, vectors=None):
        if flow:  # the pipeline's encode_prompt on placeholder words; each encoder's span gets its vectors
            return _flow_span_conditioning(pipe, scheduler, encoders, prompt, num_tokens,
                                           vectors or [t[choice] for t in tables])
        run_ids = ids.clone()
        run_ids[0, span] = vocab[choice]
        if vectors is None:
            return encode_ids(text_encoder, run_ids)

        def edit(out):
            out = out.clone()
            out[:, span] = vectors[0].to(out.dtype)
            return out
        return encode_ids(text_encoder, run_ids, edit)

    def score(choice):
        with torch.no_grad():
            return evaluate_loss(unet, scheduler, target_latents, conditioning(choice), eval_seed)

    softs = [table[start].clone().requires_grad_(True) for table in tables]
    opt = torch.optim.Adam(softs, lr=lr)
    best_choice, best = start, score(start)
    loss_start, losses = best, []
    with frozen(unet, *encoders), torch.enable_grad():
        for step in tqdm(range(1, steps + 1), desc="token attack", disable=not show_progress, leave=False):
            choice = nearest(softs)
            # forward: vocabulary tokens; gradient: to the soft ones
            hard = [soft + (table[choice] - soft).detach() for soft, table in zip(softs, tables)]
            opt.zero_grad(set_to_none=True)
            loss = attack_loss(unet, scheduler, target_latents, conditioning(choice, hard), gen)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                choice = nearest([soft.detach() for soft in softs])
                if not torch.equal(choice, best_choice):
                    value = score(choice)
                    if value < best:
                        best_choice, best = choice, value
    token_ids = [int(i) for i in vocab[best_choice]]
    words = [_word(tokenizer, i) for i in token_ids]
    adv_prompt = " ".join(words + ([prompt.strip()] if prompt.strip() else []))
    # the conditioning of the prompt as a user would type it (whole-word tokens tokenize back to themselves)
    embeds = encode_prompt(pipe, adv_prompt, scheduler)
    retyped = _pieces(tokenizer, adv_prompt)[:num_tokens]
    if retyped != token_ids:
        logger.warning("adversarial prompt %r tokenizes to %s, not the optimised %s", adv_prompt, retyped, token_ids)
    loss_final = evaluate_loss(unet, scheduler, target_latents, embeds, eval_seed)  # of the prompt as typed
    return TokenAttackResult(adv_prompt, token_ids, words, embeds, loss_start, loss_final, losses)


def _anchor_word(tokenizer) -> tuple:
    """``(word, id)``: a whole-word token that tokenizes to itself alone (a placeholder the attacks overwrite)."""
    for token_id in word_vocabulary(tokenizer).tolist():
        word = _word(tokenizer, token_id)
        if _pieces(tokenizer, word) == [token_id]:
            return word, token_id
    raise ValueError("the tokenizer has no whole-word token that tokenizes back to itself")


def _flow_span_conditioning(pipe, family, encoders, prompt: str, num_tokens: int, vectors):
    """The conditioning (batch 1, gradients flowing) the pipeline's ``encode_prompt`` makes of ``num_tokens``
    placeholder words then ``prompt``, with encoder ``i``'s input token embeddings of the placeholders replaced by
    ``vectors[i]`` ``[num_tokens, D_i]``."""
    word, anchor = _anchor_word(pipe.tokenizer)
    span = slice(1, 1 + num_tokens)
    text = " ".join([word] * num_tokens + ([prompt.strip()] if prompt.strip() else []))

    def hook(vec):
        def edit(module, args, out):
            if not bool((args[0][:, span] == anchor).all()):
                raise ValueError(f"prompt {prompt!r}: the adversarial tokens fall past the text encoder's token limit")
            out = out.clone()
            out[:, span] = vec.to(out.dtype)
            return out
        return edit

    handles = [e.get_input_embeddings().register_forward_hook(hook(v)) for e, v in zip(encoders, vectors)]
    try:
        return family.prompt_conds([text])
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------ inversion
@dataclass
class InversionResult:
    """A learned token embedding standing for the concept (the word ``placeholder`` in prompts)."""

    embedding: torch.Tensor  # [D], in the text encoder's input-embedding space
    placeholder: str
    init_word: str
    loss_start: float
    loss_final: float
    losses: List[float] = field(default_factory=list, repr=False)
    pipe: object = field(default=None, repr=False, compare=False)

    def prompt_embeds(self, prompt_template: Optional[str] = None, pipe=None) -> torch.Tensor:
        """The conditioning ``[1, 77, D]`` of ``prompt_template`` (which contains ``placeholder`` once, e.g.
        ``"a photo of <adv>"``; default: the placeholder alone) with the learned embedding in its place."""
        pipe = pipe or self.pipe
        if pipe is None:
            raise ValueError("prompt_embeds needs the pipeline (pass pipe=...)")
        ids, pos = _placeholder_ids(pipe.tokenizer, prompt_template or self.placeholder, self.placeholder)
        with torch.no_grad():
            return encode_ids(pipe.text_encoder, ids, _put(pos, self.embedding)).float()


def _placeholder_ids(tokenizer, template: str, placeholder: str):
    """``([1, 77] ids, [1] position)``: ``template`` tokenized with one slot where ``placeholder`` stands."""
    if template.count(placeholder) != 1:
        raise ValueError(f"prompt template {template!r} must contain the placeholder {placeholder!r} exactly once")
    before, after = template.split(placeholder)
    pieces = _pieces(tokenizer, before)
    if len(pieces) + 2 >= tokenizer.model_max_length:
        raise ValueError(f"prompt template {template!r}: the placeholder falls past the token limit")
    ids = _ids(tokenizer, pieces + [tokenizer.eos_token_id] + _pieces(tokenizer, after))
    return ids, torch.tensor([1 + len(pieces)])


def _put(positions: torch.Tensor, vector: torch.Tensor):
    """An ``encode_ids`` edit: row ``i``'s token embedding at ``positions[i]`` becomes ``vector``."""
    def edit(out):
        out = out.clone()
        out[torch.arange(out.shape[0], device=out.device), positions.to(out.device)] = vector.to(out.dtype)
        return out
    return edit


def inversion_attack(pipe, concept_latents: torch.Tensor, *, steps: int = DEFAULT_STEPS["inversion"],
                     lr: float = DEFAULT_LR["inversion"], placeholder: str = "<adv>", init_word: str = "object",
                     templates: Optional[Sequence[str]] = None, batch_size: int = 4,
                     generator: Optional[torch.Generator] = None, unet=None, scheduler=None,
                     show_progress: bool = False) -> InversionResult:
    """Concept inversion: learn one token embedding so the attacked U-Net reconstructs images of the concept.

    ``concept_latents`` ``[N, C, h, w]``: latents of concept images (e.g. the base model's). ``templates``: prompts
    containing ``placeholder`` once, one for all latents or one per latent (default: the placeholder alone). The
    embedding starts at the mean input embedding of ``init_word``'s tokens; Adam, ``batch_size`` latents per step.
    The pipeline is not changed (no token is added to its tokenizer): use :meth:`InversionResult.prompt_embeds`.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    templates = list(templates or [placeholder])
    n = len(concept_latents)
    if len(templates) not in (1, n):
        raise ValueError(f"give one template or one per latent: {len(templates)} templates for {n} latents")
    if getattr(pipe, "transformer", None) is not None:
        check_attack_fits(pipeline_class_name(pipe), "inversion")
    unet, scheduler, gen, eval_seed = _prompt_attack_setup(pipe, unet, scheduler, generator)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    encoded = [_placeholder_ids(tokenizer, t, placeholder) for t in templates]
    all_ids = torch.cat([e[0] for e in encoded]).to(text_encoder.device)
    all_pos = torch.cat([e[1] for e in encoded])
    init_pieces = _pieces(tokenizer, init_word)
    if not init_pieces:
        raise ValueError("init_word must be a non-empty word")
    table = text_encoder.get_input_embeddings().weight.detach()
    vector = table[torch.tensor(init_pieces, device=table.device)].float().mean(0).clone().requires_grad_(True)

    def conditioning(index: torch.Tensor, vec) -> torch.Tensor:
        index_t = index if len(templates) == n else torch.zeros_like(index)
        return encode_ids(text_encoder, all_ids[index_t], _put(all_pos[index_t], vec))

    def score(vec) -> float:
        index = torch.arange(n)
        with torch.no_grad():
            return evaluate_loss(unet, scheduler, concept_latents, conditioning(index, vec), eval_seed)

    loss_start, losses = score(vector.detach()), []
    opt = torch.optim.Adam([vector], lr=lr)
    batch = min(batch_size, n)
    with frozen(unet, text_encoder), torch.enable_grad():
        for _ in tqdm(range(steps), desc="concept inversion", disable=not show_progress, leave=False):
            index = torch.randperm(n, generator=gen, device=gen.device)[:batch].cpu() if batch < n else torch.arange(n)
            opt.zero_grad(set_to_none=True)
            loss = attack_loss(unet, scheduler, concept_latents[index.to(concept_latents.device)],
                               conditioning(index, vector), gen)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    embedding = vector.detach()
    return InversionResult(embedding, placeholder, init_word, loss_start, score(embedding), losses, pipe)
