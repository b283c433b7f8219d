"""Concept presets: what to forget, what to map it to, what to keep.

A concept names a forget prompt (the concept to erase), pseudo prompts (the misaligned concept c' whose noise
prediction becomes the target for the forget prompt) and retain prompts (data whose ordinary diffusion loss keeps
the rest of the model intact). Presets follow the SalUn paper's setups; ``--forget_prompt`` etc. override them.
Each preset names the base pipeline classes it fits (``pipeline_classes``); ``erase`` refuses any other.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# the diffusers pipeline classes a preset fits (SD 1.x and 2.x are both StableDiffusionPipeline)
SD_AND_SDXL = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# prompt-only concepts fit every text-to-image family: the U-Nets and the flow-matching transformers (SD3, FLUX)
TEXT_TO_IMAGE = SD_AND_SDXL + ("StableDiffusion3Pipeline", "FluxPipeline")
DIGIT_WORLDS = ("StableDiffusionPipeline", "StableDiffusion3Pipeline")  # the bundled digit worlds: U-Net and SD3
DIGIT_SD3_MODEL = "salun-diffusers/digit-sd3"
IMAGENETTE = ("tench", "english springer", "cassette player", "chain saw", "church", "french horn",
              "garbage truck", "gas pump", "golf ball", "parachute")


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    forget_prompt: str
    pseudo_prompts: Tuple[str, ...]
    retain_prompts: Tuple[str, ...]
    kind: str = "generic"  # "nudity" | "digit" | "object" | "style" | "generic"
    target_class: Optional[int] = None  # digit / class index judged by a classifier, where there is one
    needs_sd: bool = True  # False: works on the bundled digit model
    defaults: Dict[str, object] = field(default_factory=dict)  # preset training defaults (EraseConfig fields)
    pipeline_classes: Tuple[str, ...] = TEXT_TO_IMAGE  # base pipeline classes the preset fits
    forget_data_dir: Optional[str] = None  # this concept's own forget images (a concepts file's data folder)
    # defaults that replace ``defaults``' where --adversarial is on (EraseConfig fields; an explicit flag still wins)
    adversarial_defaults: Dict[str, object] = field(default_factory=dict)
    model_defaults: Dict[str, Dict[str, object]] = field(default_factory=dict)  # per base model id, over defaults
    # per base model id, over adversarial_defaults (where a model measured otherwise)
    model_adversarial_defaults: Dict[str, Dict[str, object]] = field(default_factory=dict)

    @property
    def concepts(self) -> Tuple["ConceptSpec", ...]:
        """The concepts a run erases: this one (:class:`JointConcepts` holds several)."""
        return (self,)

    @property
    def target_classes(self) -> Tuple[Optional[int], ...]:
        return (self.target_class,)


def digit_prompt(d: int) -> str:
    """``digit_prompt(7) -> "a handwritten digit seven"`` (the digit model's prompts)."""
    if not 0 <= int(d) <= 9:
        raise ValueError(f"digit must be in 0..9, got {d!r}")
    return f"a handwritten digit {DIGIT_WORDS[int(d)]}"


# the official SD optimiser: torch.optim.Adam(lr=1e-5), batch 8, no clipping (SD/train-scripts/nsfw_removal.py:73,
# random_label.py:56); AdamW with weight decay 0 is exactly Adam
OFFICIAL_OPTIMIZER = {"train_batch_size": 8, "learning_rate": 1e-5, "adam_weight_decay": 0.0, "max_grad_norm": 0.0}
# the official SD recipe for every field a preset leaves unset (SD/train-scripts/nsfw_removal.py); steps: epochs if
# given (preset or flag), else the official nudity run's 100 optimizer steps
RECIPE_FALLBACKS = {"num_forget_images": 64, "num_retain_images": 64, **OFFICIAL_OPTIMIZER, "alpha": 0.1,
                    "data_num_inference_steps": 50, "data_guidance_scale": 7.5, "forget_uncond_weight": 0.0}
DEFAULT_MAX_TRAIN_STEPS = 100


def preset_defaults(spec: "AnySpec", adversarial: bool = False, model: Optional[str] = None) -> Dict[str, object]:
    """The EraseConfig defaults of a concept: :data:`RECIPE_FALLBACKS`, under its preset's, under its preset's for
    ``model`` (a base model id), under (with ``adversarial``) its ``adversarial_defaults``, under those for ``model``
    (``model_adversarial_defaults``)."""
    adv = {**spec.adversarial_defaults, **spec.model_adversarial_defaults.get(model or "", {})} if adversarial else {}
    return {**RECIPE_FALLBACKS, **spec.defaults, **spec.model_defaults.get(model or "", {}), **adv}


# the digit presets on the SD3 digit world (issue 20; tuned on digits one, four and seven, judged on 50 images per
# digit): 50 steps at lr 3e-4 with alpha 4, and the unconditional prompt "" among the retain prompts (its images: the
# world's own unguided-prompt draws). Without "", erasing seven also turned most twos into fives (retained drop 9-10
# points at lr 1e-4 x 100 steps, lr 3e-4 x 50 steps with alpha 4 or 8, a 0.1 mask, the conditional saliency loss);
# with it: seven UA 100%, retained drop 0.2 points.
SD3_DIGIT_DEFAULTS: Dict[str, object] = {"num_forget_images": 64, "num_retain_images": 320, "max_train_steps": 50,
                                         "train_batch_size": 16, "learning_rate": 3e-4, "alpha": 4.0,
                                         "data_num_inference_steps": 20, "data_guidance_scale": 4.0}


def _presets() -> Dict[str, ConceptSpec]:
    presets = {
        # the official NSFW run (SD/README.md; SD/train-scripts/nsfw_removal.py:73,83-84,222-245): forget "a photo of
        # a nude person", map to and retain clothed people, 800 generated images each, one epoch = 100 steps of
        # batch 8, Adam lr 1e-5 (no weight decay, no clipping), alpha 0.1
        "nudity": ConceptSpec(
            "nudity", "a photo of a nude person", ("a photo of a person wearing clothes",),
            ("a photo of a person wearing clothes",), kind="nudity",
            defaults={**OFFICIAL_OPTIMIZER, "num_forget_images": 800, "num_retain_images": 800,
                      "num_train_epochs": 1, "alpha": 0.1}),
        # no van Gogh run in the official code (its SD/ folder has nudity and Imagenette only): the nudity recipe
        "van_gogh": ConceptSpec(
            "van_gogh", "a painting in the style of Van Gogh", ("a painting",),
            ("a painting in the style of Claude Monet", "a painting in the style of Rembrandt", "a painting"),
            kind="style", defaults={**OFFICIAL_OPTIMIZER, "num_forget_images": 800, "num_retain_images": 800,
                                    "num_train_epochs": 1, "alpha": 0.1}),
    }
    for i, cls in enumerate(IMAGENETTE):
        others = tuple(f"an image of a {c}" for c in IMAGENETTE if c != cls)
        # the official class run (SD/README.md; SD/train-scripts/random_label.py:80-83,128): c' = the NEXT class of
        # the ten (one prompt), alpha 0.5, 5 epochs over the forget images, batch 8, Adam lr 1e-5
        presets[cls.replace(" ", "_")] = ConceptSpec(
            cls.replace(" ", "_"), f"an image of a {cls}", (f"an image of a {IMAGENETTE[(i + 1) % 10]}",), others,
            kind="object", target_class=i,
            defaults={**OFFICIAL_OPTIMIZER, "num_forget_images": 400, "num_retain_images": 450,
                      "num_train_epochs": 5, "alpha": 0.5})
    for d, word in enumerate(DIGIT_WORDS):
        others = tuple(digit_prompt(o) for o in range(10) if o != d)
        # one fixed c' (the next digit): with a fresh random other digit per sample the optimum for the forget prompt
        # is the average of the other digits' predictions, which samples like the unconditional model and still draws
        # the erased digit now and then (measured on the digit world: UA plateaued at 83-87% for 2 and 3 at any lr)
        presets[word] = ConceptSpec(
            word, digit_prompt(d), (digit_prompt((d + 1) % 10),), others, kind="digit", target_class=d, needs_sd=False,
            # tuned on the digit world (digit 7, judged): lr 1e-3 x 150 steps cost 3.6 retained points, this 0.3; the
            # official SD scale (lr 1e-5, alpha 0.1, batch 8) erases 7 too but costs 13.3 retained points (this: 2.2,
            # both with the official guided saliency and Adam without decay/clipping; docs/paper-parity.md section 3).
            # issue 12 (time): 100 steps at lr 3e-4 with alpha 2 replace 200 at lr 5e-4 with alpha 1; judged on 50
            # images per digit (20 sampling steps): UA 100% on all ten digits, retained drop in points 0: 0.9, 1: 1.3,
            # 2: 1.1, 3: 2.0, 4: 0.7, 5: 1.6, 6: 1.8, 7: 0.4, 8: 1.1, 9: 2.0 (the 200-step recipe: 5: 0.9, 8: 0.4,
            # 9: 1.3, 7: 2.0). Refused: 100 steps at lr 5e-4 (alpha 1: 2: 3.6, 3: 4.0; alpha 2: 8: 4.2, 9: 3.8, 5: 3.1),
            # 150 steps at alpha 1.5 (8: 6.2, 5: 5.1), 60 steps (1: 8.0), lr 1e-3 (7: 7.3), batch 8 (7: 3.3), 144
            # retain images (6.0-8.2 on 7 / 1 / 4)
            defaults={"num_forget_images": 64, "num_retain_images": 288, "max_train_steps": 100,
                      "train_batch_size": 16, "learning_rate": 3e-4, "alpha": 2.0,
                      "data_num_inference_steps": 20, "data_guidance_scale": 4.0},
            # issue 17: --adversarial doubles the retain weight. Tuning digits 1 / 4 / 7 (50 images per digit, eval
            # attack: whole conditioning, 300 steps, 32 real targets): alpha 2 -> 4 cuts the retained drop from 1.9
            # to 1.2 points mean (worst other digit 10 -> 8) at the same attack success (7% -> 6%); frozen check on
            # the untuned digit two: drop 5.3 -> 2.0 points (worst 22 -> 6), ASR 9% -> 12%. Plain SalUn keeps alpha 2
            # (its drop is 0.8 already). docs/robustness.md, "Knowledge probes and retrained references (issue 17)".
            # Then alpha 4 -> 8: alpha 4 still lost 3.8 / 4.0 / 5.6 points on three / eight / nine of the ten-digit
            # benchmark; tuned on 8 / 4 / 7 against 6 other candidates (a retain-aware mask among them), alpha 8 keeps
            # every digit within 3 points (max 2.9, mean 2.5 -> 1.7) at a 300-step conditioning ASR of 7% mean, 17%
            # max (alpha 4: 5% / 11%); docs/robustness.md, "A robust mode at no cost to the other digits"
            # Then the forget objective on the unconditional branch too, weight 2: chosen on 3 / 8 / 4 by a rule
            # written before tuning (context 49.0% -> 41.7% mean, drops 1.8 / 2.2 -> 1.1 / 1.1 on three / eight), then
            # on all ten digits: the context probe within 5 points of the never-learned model on every digit (alpha 8
            # alone: three +14, eight +8), 300-step ASR 8.3% mean / 18.8% max; judged on 250 images per digit, the
            # largest retained drop of ten digits x two seeds is 3.07 (nine, seed 0; alpha 8 alone: 3.02 there, 3.47
            # on three at seed 1); 2.3x plain SalUn's time (alpha 8 alone: 1.85x). docs/robustness.md, "Context"
            adversarial_defaults={"alpha": 8.0, "forget_uncond_weight": 2.0},
            # the digit prompts and defaults are the bundled digit worlds': an SD-1-style pipeline and an SD3 one
            pipeline_classes=DIGIT_WORLDS,
            model_defaults={DIGIT_SD3_MODEL: {**SD3_DIGIT_DEFAULTS, "retain_prompt": [*others, ""]}},
            # not on the SD3 digit world: there --forget_uncond_weight 2 raised the 100-step conditioning attack on
            # 7 / 1 / 4 from 40 / 20 / 30% to 50 / 30 / 70% (10 rows each; retained 98.9 -> 99.8% mean, UA 100%);
            # docs/flow-models.md, "--adversarial on the SD3 digit world"
            model_adversarial_defaults={DIGIT_SD3_MODEL: {"forget_uncond_weight": 0.0}})
    return presets


PRESETS: Dict[str, ConceptSpec] = _presets()


def resolve_concept(name: Optional[str], forget_prompt: Optional[str] = None,
                    pseudo_prompts: Optional[Tuple[str, ...]] = None,
                    retain_prompts: Optional[Tuple[str, ...]] = None) -> ConceptSpec:
    """A preset by name (digits also as "7"), overridden by explicit prompts; or a custom concept from prompts."""
    key = (name or "").strip().lower().replace(" ", "_").replace("-", "_")
    if key.isdigit() and len(key) == 1:
        key = DIGIT_WORDS[int(key)]
    base = PRESETS.get(key)
    if base is None:
        if not forget_prompt:
            raise ValueError(f"unknown concept {name!r}: use a preset ({', '.join(sorted(PRESETS))}) or give "
                             "--forget_prompt (with --pseudo_prompt and --retain_prompt) for a custom concept")
        if not pseudo_prompts:
            raise ValueError("a custom concept needs --pseudo_prompt: the concept the forget prompt should map to "
                             "(e.g. --pseudo_prompt 'a photo of a person wearing clothes')")
        return ConceptSpec(key or "custom", forget_prompt, tuple(pseudo_prompts),
                           tuple(retain_prompts or pseudo_prompts))
    return replace(base, forget_prompt=forget_prompt or base.forget_prompt,
                   pseudo_prompts=tuple(pseudo_prompts or base.pseudo_prompts),
                   retain_prompts=tuple(retain_prompts or base.retain_prompts))


# ------------------------------------------------------------------------------------------ several concepts at once


@dataclass(frozen=True)
class JointConcepts:
    """Several concepts erased in one run: each maps its forget prompt onto its own pseudo prompt(s); one saliency
    mask comes from the forget data of all of them; one retain set (``retain_prompts``) keeps what must stay.

    It has no ``forget_prompt``: code that handles one concept only fails loudly instead of erasing just the first.
    """

    concepts: Tuple[ConceptSpec, ...]
    retain_prompts: Tuple[str, ...]
    defaults: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "+".join(c.name for c in self.concepts)

    @property
    def kind(self) -> str:
        kinds = {c.kind for c in self.concepts}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def target_class(self) -> Optional[int]:
        return None

    @property
    def target_classes(self) -> Tuple[Optional[int], ...]:
        return tuple(c.target_class for c in self.concepts)

    @property
    def needs_sd(self) -> bool:
        return any(c.needs_sd for c in self.concepts)

    @property
    def model_defaults(self) -> Dict[str, Dict[str, object]]:
        """The first concept's per-model defaults, less its retain prompts (the joint retain set is the run's own)."""
        return {m: {k: v for k, v in d.items() if k != "retain_prompt"}
                for m, d in self.concepts[0].model_defaults.items()}

    @property
    def model_adversarial_defaults(self) -> Dict[str, Dict[str, object]]:
        return self.concepts[0].model_adversarial_defaults

    @property
    def adversarial_defaults(self) -> Dict[str, object]:
        """The first concept's, as :func:`joint_defaults` takes the first concept's preset."""
        return self.concepts[0].adversarial_defaults

    @property
    def pipeline_classes(self) -> Tuple[str, ...]:
        return tuple(p for p in self.concepts[0].pipeline_classes if all(p in c.pipeline_classes for c in self.concepts))


AnySpec = Union[ConceptSpec, JointConcepts]
CONCEPT_ROW_KEYS = ("name", "forget_prompt", "pseudo_prompt", "data_dir")


def concept_from_row(row: Mapping[str, object], where: str = "concept") -> ConceptSpec:
    """A concept of your own from a concepts-file row: ``forget_prompt``, ``pseudo_prompt`` (several separated by
    ``;``), optional ``data_dir`` (its forget images) and ``name``."""
    unknown = sorted(set(row) - set(CONCEPT_ROW_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; a concept row has {list(CONCEPT_ROW_KEYS)}")
    forget = str(row.get("forget_prompt") or "").strip()
    pseudo = row.get("pseudo_prompt") or ""
    pseudo = tuple(p.strip() for p in (pseudo if isinstance(pseudo, (list, tuple)) else str(pseudo).split(";"))
                   if str(p).strip())
    if not forget or not pseudo:
        raise ValueError(f"{where} needs a forget_prompt and a pseudo_prompt (the concept it should become), got "
                         f"{dict(row)}")
    name = str(row.get("name") or "").strip() or re.sub(r"[^a-z0-9]+", "_", forget.lower()).strip("_")[:40]
    return ConceptSpec(name, forget, pseudo, pseudo, forget_data_dir=str(row["data_dir"]) if row.get("data_dir")
                       else None)


def read_concepts_file(path: str) -> List[dict]:
    """The rows of a concepts file: CSV with a header (``forget_prompt,pseudo_prompt[,data_dir][,name]``) or JSON
    (a list of such objects). One-line ``ValueError`` naming the file and the fix."""
    fix = ("a CSV with the header forget_prompt,pseudo_prompt,data_dir,name (data_dir and name optional) or a JSON "
           "list of such objects")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"concepts file {path!r} is not UTF-8 text (byte {exc.start}); write it as {fix}") from None
    except OSError as exc:
        raise ValueError(f"concepts file {path!r} cannot be read ({exc.strerror or exc})") from None
    if path.lower().endswith(".json") or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"concepts file {path!r} is not valid JSON ({exc}); write it as {fix}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"concepts file {path!r} is not a JSON list of objects; write it as {fix}")
    else:
        rows = [dict(r) for r in csv.DictReader(text.splitlines())]
        if rows and "forget_prompt" not in rows[0]:
            raise ValueError(f"concepts file {path!r} has no forget_prompt column (columns: {list(rows[0])}); write "
                             f"it as {fix}")
        rows = [{k: v for k, v in r.items() if k is not None and v not in (None, "")} for r in rows]
    if not rows:
        raise ValueError(f"concepts file {path!r} holds no concepts; write it as {fix}")
    for i, row in enumerate(rows, 1):
        concept_from_row(row, f"concepts file {path!r} row {i}")
    folder = os.path.dirname(os.path.abspath(path))
    for row in rows:  # data folders relative to the file
        if row.get("data_dir") and not os.path.isabs(str(row["data_dir"])):
            row["data_dir"] = os.path.normpath(os.path.join(folder, str(row["data_dir"])))
    return rows


def _ring(spec: ConceptSpec):
    """The ordered set a preset's pseudo prompt comes from (the next member), for digits and Imagenette classes."""
    if spec.kind == "digit":
        return [digit_prompt(d) for d in range(10)]
    if spec.kind == "object":
        return [f"an image of a {c}" for c in IMAGENETTE]
    return None


def _own_pseudo(spec: ConceptSpec, erased: set) -> ConceptSpec:
    """``spec`` with pseudo prompts that are not erased themselves: a digit or class preset whose next member is
    erased too takes the next one that is not; any other concept is refused, naming the clash."""
    if not any(p in erased for p in spec.pseudo_prompts):
        return spec
    ring = _ring(spec)
    if ring is None or spec.forget_prompt not in ring:
        clash = next(p for p in spec.pseudo_prompts if p in erased)
        raise ValueError(f"concept {spec.name!r} would map onto {clash!r}, which this run erases too; give it "
                         "another pseudo prompt (a concepts file row)")
    start = ring.index(spec.forget_prompt)
    nxt = next((ring[(start + i) % len(ring)] for i in range(1, len(ring)) if ring[(start + i) % len(ring)]
                not in erased), None)
    if nxt is None:
        raise ValueError(f"every {spec.kind} is erased: concept {spec.name!r} has nothing left to map onto; keep one")
    return replace(spec, pseudo_prompts=(nxt,))


def joint_defaults(members: Sequence[ConceptSpec], n_retain_prompts: int) -> Dict[str, object]:
    """A joint run's recipe: the first concept's preset, with ``max_train_steps`` = one concept's steps x (1 + 0.5
    (k - 1)) and ``num_retain_images`` at the presets' images per retain prompt (capped at their sum); see
    docs/multi.md. ``num_forget_images`` stays per concept."""
    base = dict(members[0].defaults)
    k = len(members)
    steps = base.pop("max_train_steps", None)
    epochs = base.pop("num_train_epochs", None)
    recipe = {**RECIPE_FALLBACKS, **base}
    if steps is None and epochs:
        steps = int(epochs) * -(-int(recipe["num_forget_images"]) // int(recipe["train_batch_size"]))
    steps = DEFAULT_MAX_TRAIN_STEPS if steps is None else steps
    base["max_train_steps"] = int(math.ceil(int(steps) * (1 + 0.5 * (k - 1))))
    rates = [c.defaults["num_retain_images"] / max(1, len(c.retain_prompts)) for c in members
             if "num_retain_images" in c.defaults]
    if rates and n_retain_prompts:
        total = sum(c.defaults["num_retain_images"] for c in members if "num_retain_images" in c.defaults)
        base["num_retain_images"] = int(min(round(max(rates) * n_retain_prompts), total))
    return base


def resolve_concepts(names: Union[None, str, Sequence[str]], forget_prompt: Optional[str] = None,
                     pseudo_prompts: Optional[Sequence[str]] = None, retain_prompts: Optional[Sequence[str]] = None,
                     rows: Sequence[Mapping[str, object]] = ()) -> AnySpec:
    """One concept (as :func:`resolve_concept`) or several: presets by name and rows of your own (see
    :func:`concept_from_row`). With several, each keeps its own pseudo prompt (a digit or class whose next member is
    erased too maps onto the next one that is not), and the retain set is every member's retain prompts less the
    erased ones (or ``retain_prompts``)."""
    names = [names] if isinstance(names, str) else [n for n in (names or []) if n]
    if len(names) <= 1 and not rows:
        return resolve_concept(names[0] if names else None, forget_prompt, pseudo_prompts, retain_prompts)
    if forget_prompt or pseudo_prompts:
        raise ValueError("--forget_prompt and --pseudo_prompt describe one concept; with several concepts give each "
                         "its prompts in a concepts file (--concepts_file)")
    members = []
    for name in names:
        key = name.strip().lower().replace(" ", "_").replace("-", "_")
        if not (key in PRESETS or (key.isdigit() and len(key) == 1)):
            raise ValueError(f"unknown concept {name!r}: with several concepts use presets ({', '.join(sorted(PRESETS))})"
                             " and give your own in a concepts file (--concepts_file)")
        members.append(resolve_concept(name))
    members += [concept_from_row(r, f"concept row {i}") for i, r in enumerate(rows, 1)]
    forget = [c.forget_prompt for c in members]
    if len(set(forget)) < len(forget):
        twice = next(p for p in forget if forget.count(p) > 1)
        raise ValueError(f"concept {twice!r} is given twice; name each concept once")
    erased = set(forget)
    members = [_own_pseudo(c, erased) for c in members]
    if retain_prompts:
        retain = tuple(retain_prompts)
    else:
        retain = tuple(dict.fromkeys(p for c in members for p in c.retain_prompts if p not in erased))
        retain = retain or tuple(dict.fromkeys(p for c in members for p in c.pseudo_prompts))
    return JointConcepts(tuple(members), retain, joint_defaults(members, len(retain)))
