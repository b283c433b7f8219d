"""``EraseConfig``: every knob of an erasure run, typed, with help text, checks and a JSON round trip (peft style).

Fields left at ``None`` take the concept preset's default (see :mod:`salun_diffusers.concepts`) in ``__post_init__``.
``train_erase.py`` builds its command-line flags from these fields, so flag names match the field names.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from typing import List, Optional, Union

from diffusers.optimization import SchedulerType

from .concepts import DEFAULT_MAX_TRAIN_STEPS, AnySpec, concept_from_row, preset_defaults, resolve_concepts
from .utils import JsonConfigMixin, flag_field

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

# --method: SalUn, or a peer erasure method (salun_diffusers.methods) run by the same tool, with the same outputs
METHODS = ("salun", "esd-x", "esd-u", "esd-full", "uce", "advunlearn")
ESD_METHODS = ("esd-x", "esd-u", "esd-full")
# what each method changes: the family's denoiser ("unet" / "transformer") or the text encoder
TEXT_ENCODER_METHODS = ("advunlearn",)
# the peers' own knobs (None: the method's preset, salun_diffusers.erasure.peers.resolve_method)
PEER_FIELDS = ("negative_guidance", "start_guidance", "partial_sampling_steps", "guide_prompt", "preserve_scale",
               "attack_steps", "attack_warmup")
# the flags every method reads: the model, the concept, the seed, where and how the outputs are written
SHARED_FIELDS = ("pretrained_model_name_or_path", "revision", "variant", "method", "concept", "concepts",
                 "forget_prompt", "pseudo_prompt", "retain_prompt", "seed", "threads", "output_dir",
                 "overwrite_output_dir", "save_merged_unet", "save_pipeline", "push_to_hub", "hub_model_id",
                 "hub_token", "delta_dtype", "verdict_images", "save_single_file", "single_file_dtype", "logging_dir")
# the training peers checkpoint and resume as SalUn does (checkpoint-N, sealed; erasure.peers); UCE has no steps
CHECKPOINT_FIELDS = ("checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint")
_ESD_FIELDS = ("learning_rate", "max_train_steps", "negative_guidance", "start_guidance", "partial_sampling_steps",
               "export_lora_rank", *CHECKPOINT_FIELDS)
PEER_METHOD_FIELDS = {
    **{m: _ESD_FIELDS for m in ESD_METHODS},
    "uce": ("guide_prompt", "preserve_scale", "export_lora_rank"),
    "advunlearn": ("learning_rate", "max_train_steps", "alpha", "negative_guidance", "start_guidance",
                   "partial_sampling_steps", "attack_steps", "attack_warmup", *CHECKPOINT_FIELDS),
}


_f = flag_field


@dataclass
class EraseConfig(JsonConfigMixin):
    # model
    pretrained_model_name_or_path: Optional[str] = _f(
        None, "Base pipeline, SD 1.x/2.x, SDXL, SD3 or FLUX: hub id or folder (e.g. CompVis/stable-diffusion-v1-4). "
              "Default: the bundled digit model (salun-diffusers/digit-sd; its flow-matching twin: "
              "salun-diffusers/digit-sd3).")
    revision: Optional[str] = _f(None, "Revision (branch, tag or commit) of the base model on the hub.")
    variant: Optional[str] = _f(None, "Weight variant of the base model, e.g. fp16.")
    method: str = _f("salun", "Erasure method: salun (saliency-masked fine-tuning of the denoiser, the default), "
                              "esd-x / esd-u / esd-full (ESD: fine-tune the U-Net's cross-attention / all but "
                              "cross-attention / all toward negatively guided noise), uce (closed-form edit of the "
                              "cross-attention keys and values), advunlearn (adversarial training of the text "
                              "encoder). The peers fit SD 1.x/2.x; their knobs default to their recipe (the official "
                              "SD1.4 one, or the digit world's on the bundled model): README, 'Other methods'.",
                     choices=list(METHODS))
    # concept
    concept: Union[None, str, List[str]] = _f(
        None, "Concept preset(s) to erase (default: seven, the bundled digit model's README example): nudity, van_gogh, an Imagenette class (church, ...), a digit (zero..nine "
                 "or 0..9 on the digit model), or a custom name with --forget_prompt. Several (--concept seven four "
                 "one, or seven,four,one) are erased jointly in one run (docs/multi.md).", nargs="+")
    concepts: Optional[List[str]] = _f(
        None, "Concepts of your own erased in the same run, each a JSON object {\"forget_prompt\", \"pseudo_prompt\" "
              "(';' between several), \"data_dir\" (optional: its forget images), \"name\" (optional)}; "
              "train_erase.py --concepts_file reads them from a CSV or JSON file.", nargs="+")
    saliency_combine: str = _f("sum", "With several concepts, how their saliencies make one mask: 'sum' = |gradient of "
                                      "the summed forget losses| (one pass), 'normalized' = each concept's |gradient| "
                                      "divided by its total, then summed, 'union' = union of each concept's top "
                                      "mask_ratio/k (docs/multi.md).", choices=["sum", "normalized", "union"])
    forget_prompt: Optional[str] = _f(None, "Prompt of the concept to forget (overrides the preset).")
    pseudo_prompt: Optional[List[str]] = _f(None, "Misaligned prompt(s) c' whose prediction is the forget target.",
                                            nargs="+")
    retain_prompt: Optional[List[str]] = _f(None, "Prompt(s) of data to retain.", nargs="+")
    forget_data_dir: Optional[str] = _f(None, "Folder of forget images (instead of generating them).")
    retain_data_dir: Optional[str] = _f(None, "Folder of retain images (instead of generating them).")
    num_forget_images: Optional[int] = _f(None, "Forget images to generate (preset default; nudity: 800).")
    num_retain_images: Optional[int] = _f(None, "Retain images to generate (spread over the retain prompts).")
    data_num_inference_steps: Optional[int] = _f(None, "Sampling steps when generating forget/retain data (50).")
    data_guidance_scale: Optional[float] = _f(None, "Guidance scale when generating forget/retain data (7.5).")
    data_batch_size: Optional[int] = _f(None, "Images per pipeline call when generating data (default: 64 for a small "
                                              "model such as the digit U-Net, else --train_batch_size).")
    max_sequence_length: Optional[int] = _f(None, "SD3/FLUX: T5 token length of the prompt encoding, in training and "
                                                  "data generation (default: the pipeline's; the bundled SD3 digit "
                                                  "world: 8, as it was trained).")
    flux_guidance_scale: Optional[float] = _f(None, "Guidance-distilled FLUX (FLUX.1-dev): the embedded guidance the "
                                                    "transformer is trained at (default 3.5, FluxPipeline's).")
    resolution: Optional[int] = _f(None, "Image size for data (default: the pipeline's native size).")
    cache_dir: Optional[str] = _f(None, "Where generated data images are cached (default: the user cache, "
                                        "$SALUN_DIFFUSERS_CACHE or $XDG_CACHE_HOME/salun_diffusers or "
                                        "~/.cache/salun_diffusers, under data/; keyed by model, prompt, steps, "
                                        "guidance and size, so every run of the same data reuses it).")
    # saliency
    mask_ratio: float = _f(0.5, "Share of U-Net weights SalUn may change (global top-k of gradient saliency).")
    mask_scope: str = _f("global", "Top-k over all weights ('global') or within each tensor ('layer').",
                         choices=["global", "layer"])
    mask_path: Optional[str] = _f(None, "Reuse a saved mask (mask.safetensors) instead of computing saliency.")
    save_mask_only: bool = _f(False, "Compute and save the saliency mask, then stop.")
    saliency_batch_size: Optional[int] = _f(None, "Batch size for the saliency pass (default: train_batch_size).")
    # official SalUn (SD/train-scripts/generate_mask.py:57-62): guided. Digit world, digits 1/4/7, 30 judged images per
    # digit: guided UA 100/100/100%, retained drop 1.85/1.11/2.22 points; conditional UA 100% everywhere, drop
    # 2.59/1.11/2.59 (docs/paper-parity.md section 1.1): no reason to leave the official loss.
    saliency_loss: str = _f("guided", "Loss whose gradient is the saliency: 'guided' = MSE(noise, (1+w)*eps(x_t,c) - "
                                      "w*eps(x_t,'')) as the official SalUn code, 'conditional' = MSE(noise, "
                                      "eps(x_t,c)).", choices=["conditional", "guided"])
    saliency_guidance_scale: float = _f(7.5, "w of the guided saliency loss (official: 7.5).")
    # issue 17: a mask that leaves the retained concepts' weights alone (docs/robustness.md, "A robust mode at no cost
    # to the other digits")
    saliency_retain_weight: Optional[float] = _f(
        None, "Retain-aware mask: the same saliency loss on the retain images gives a retain saliency r, and the mask "
              "ranks weights by f / (1 + w * r / f) (f: the forget saliency; each divided by its mean) instead of f, "
              "so training cannot move the weights the retained concepts rely on most. 0: SalUn's mask (the "
              "default); one extra gradient pass over the retain images.")
    # training
    max_train_steps: Optional[int] = _f(None, "Optimizer steps (preset default; wins over --num_train_epochs).")
    num_train_epochs: Optional[int] = _f(None, "Passes over the forget images; sets max_train_steps = epochs x "
                                               "ceil(forget images / batch) (nudity: 1 = 100 steps; Imagenette: 5).")
    train_batch_size: Optional[int] = _f(None, "Forget and retain samples per step and process (nudity: 8).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: Optional[float] = _f(None, "Adam(W) learning rate (nudity: 1e-5).")
    alpha: Optional[float] = _f(None, "Weight of the retain diffusion loss (SalUn's alpha).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: Optional[float] = _f(None, "AdamW weight decay (default 0: the official Adam; weights "
                                                  "outside the mask stay exact either way).")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    gradient_checkpointing: bool = _f(False, "Recompute U-Net activations in the backward pass (less memory, "
                                             "about a third more compute).")
    shard_weights: bool = _f(False, "Memory, several processes: shard the denoiser's weights, gradients and masked "
                                    "optimizer state over the processes (FSDP2 fully_shard; each holds 1/N). An "
                                    "accelerate FSDP config turns it on by itself (GPUs); on CPU processes, where "
                                    "accelerate does not shard, pass it. The saliency pass is sharded too (gradient "
                                    "shards, a global top-k over them); only the data phase holds the whole model "
                                    "per process (docs/flow-models.md).")
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes (pip install salun-diffusers[8bit]): a quarter "
                                    "of the optimizer-state memory.")
    max_grad_norm: Optional[float] = _f(None, "Gradient clipping norm (default 0 = none, as the official code).")
    optimizer_in_backward: bool = _f(False, "Memory: step a masked AdamW inside backward, weight by weight (same "
                                            "math; keeps no flat copy of the masked values nor their gradients: "
                                            "SD1.4 at ratio 0.5 saves 3.4 GB). Only with --max_grad_norm 0, "
                                            "--gradient_accumulation_steps 1, no fp16, no --use_8bit_adam and one "
                                            "process, since each weight steps as soon as its gradient is known.")
    lr_scheduler: str = _f("constant", "diffusers lr scheduler name (constant, cosine, linear, ...).")
    lr_warmup_steps: int = _f(0, "Warm-up steps of the lr scheduler.")
    threads: Optional[int] = _f(None, "torch CPU threads (default: 1 for a small model such as the digit U-Net, "
                                      "else every core the process may use; OMP_NUM_THREADS also wins).")
    # robust erasure (AdvUnlearn-style; see docs/robustness.md)
    adversarial: bool = _f(False, "Robust erasure: every --adversarial_every steps an inner attack (from "
                                  "salun_diffusers.attacks) finds conditionings that make the current erased U-Net "
                                  "draw the concept again on forget latents; the forget objective is applied to them "
                                  "too. The mask still limits what changes.")
    adversarial_attack: str = _f("conditioning", "Inner attack: 'conditioning' (the whole text conditioning, the "
                                                 "strongest) or 'token' (adversarial prompt tokens).",
                                 choices=["conditioning", "token"])
    # every 1 / weight 4 (were 2 / 1), measured on digit 7 against salun-attack's conditioning attack at 100 / 300
    # steps (10 rows): plain SalUn 10% / 60%, every 2 weight 1: 10% / 50%, every 1 weight 2: 0% / 40%, every 1 with
    # 10 inner steps: 0% / 50% (training 77 s against 51 s), inner lr 0.03: 0% / 20% (retained drop 1.8), weight 4:
    # 0% / 20% (drop 1.3); docs/robustness.md has the three-digit benchmark
    adversarial_every: int = _f(1, "Run the inner attack every k optimizer steps (its result is reused in between).")
    adversarial_steps: int = _f(5, "Inner attack budget per attack (optimizer steps of the fast inner attack).")
    adversarial_lr: float = _f(1e-2, "Step size of the inner conditioning attack.")
    adversarial_weight: float = _f(4.0, "Weight of the forget objective on the adversarial conditionings.")
    # issue 17: the context probe (docs/robustness.md, "Context: the forget objective on the unconditional branch")
    forget_uncond_weight: Optional[float] = _f(
        None, "Weight of SalUn's forget objective on the unconditional (empty-prompt) branch too: eps(x_t | '') on "
              "the forget images is mapped onto the pseudo prompt's prediction, so that inpainting from context and "
              "the unguided half of classifier-free guidance do not complete the concept; the retain images are "
              "trained unconditionally too. Default 0 (off); 2 under the digit presets' --adversarial on the "
              "U-Net digit world, where it meets the context target on all ten digits (docs/robustness.md). One "
              "more forward-backward of the forget and retain batches per step.")
    # issue 17: relearning resistance (docs/robustness/studies.md, "Relearning: a sharpness-aware forget step")
    relearn_rho: float = _f(0.0, "Sharpness-aware forget step against relearning (Fan et al., ICML 2025): each step "
                                 "evaluates the forget term at the weights moved by one relearning step of norm rho "
                                 "(along -g or -sign(g), --relearn_direction; g the gradient of the forget images' "
                                 "diffusion loss with the forget prompt) and applies its gradient to the unmoved "
                                 "weights; the move is undone exactly. 0: off (SalUn's step). Digit world, with "
                                 "--adversarial: 0.6 with --relearn_direction sign (docs/robustness/studies.md). "
                                 "About one more forward-backward per step; one process, no --optimizer_in_backward.")
    relearn_steps: int = _f(1, "Inner relearning steps of the --relearn_rho move: k normalised steps of rho / k each "
                                "(path length rho), each direction recomputed at the moved weights on fresh noise; 1: "
                                "one straight step. k forward-backwards per step instead of one.")
    relearn_scope: str = _f("all", "Weights the --relearn_rho move spans: 'all' (every U-Net weight, as a relearning "
                                   "fine-tune) or 'mask' (the masked ones only).", choices=["all", "mask"])
    relearn_direction: str = _f("gradient", "Direction of the --relearn_rho move: 'gradient' (-g / ||g||, SAM's) or "
                                            "'sign' (-sign(g) / ||sign(g)||: Adam's first step, what a relearning "
                                            "fine-tune with Adam moves).", choices=["gradient", "sign"])
    # issue 17: the prompt's path (docs/robustness/studies.md, "UCE's prompt-path edit on top of the robust erasure")
    uce_prompt_edit: bool = _f(False, "After the training, UCE's closed-form edit (Gandikota et al., WACV 2024; the "
                                      "official recipe) of every cross-attention key and value projection maps the "
                                      "forget prompt's tokens onto the pseudo prompt's, the retain prompts preserved, "
                                      "so that relearning through the prompt must rebuild its path too. The erasure "
                                      "then spans the saliency mask and those projections (every other weight stays "
                                      "bit-identical). SD 1.x/2.x; a closed-form solve, under a second.")
    uce_adversarial_rounds: int = _f(0, "RECE-style rounds after --uce_prompt_edit's edit (Gong et al., ECCV 2024): "
                                        "each attacks the edited U-Net's conditioning on --uce_adversarial_images "
                                        "forget images, adds what it finds to the erased rows and re-solves UCE "
                                        "from the trained weights. 0: off; 2 is the measured setting.")
    # 64, measured on the digit world (docs/robustness/studies.md, "Every forget image in the rounds"): tuned on eight
    # and seven at seed 0, every forget image (64) let the 1,000-step attack in on 35 of 128 images against one batch's
    # (16) 46; on ten digits at a fresh seed (6) 17.8% mean against 21.2%, at 3.4x the plain README command's time
    uce_adversarial_images: Optional[int] = _f(None, "Forget images each --uce_adversarial_rounds round attacks "
                                                     "(taken in turn from each concept, attacked in --train_batch_size "
                                                     "chunks; at most the forget set). Default with the rounds: 64.")
    uce_adversarial_steps: int = _f(100, "Conditioning-attack steps of each --uce_adversarial_rounds round.")
    # 0.5, measured on the digit world (docs/robustness/studies.md, "Two rounds at half weight"): tuned on seven and
    # four, two rounds at 0.5 let the 1,000-step attack in on 52 of 128 images (one round at 1: 58; the edit alone:
    # 70); two rounds at 1 (48) lost 2.67 points of the other digits erasing seven. On ten digits at a fresh seed (4):
    # 20.2% mean against the edit's 28.6% (seed 0: 24.1% against 35.9%; seed 5: 22.2% against 32.7%)
    uce_adversarial_weight: float = _f(0.5, "Erase weight of one round's adversarial rows, split evenly over its "
                                            "images (the prompt's pairs weigh 1).")
    uce_preserve_word_weight: float = _f(0.0, "--uce_prompt_edit: weight of keeping each retain prompt's last word "
                                              "and end token rows in every solve, beside the whole prompt's 0.1 per "
                                              "row (0: off).")
    # the peer methods' knobs (--method esd-*, uce, advunlearn); None: the method's preset. Shared ones reuse
    # --learning_rate, --max_train_steps (their iterations), --alpha (AdvUnlearn's retain weight) and --seed
    negative_guidance: Optional[float] = _f(None, "ESD / AdvUnlearn: eta of the target eps0 - eta (eps_c - eps0) "
                                                  "(official 1.0).")
    start_guidance: Optional[float] = _f(None, "ESD / AdvUnlearn: guidance of the partial sampling that draws x_t "
                                               "(official 3.0).")
    partial_sampling_steps: Optional[int] = _f(None, "ESD / AdvUnlearn: DDIM steps of the partial sampling (official "
                                                     "50; the digit world: 10).")
    guide_prompt: Optional[str] = _f(None, "UCE: the prompt the erased concept's tokens map onto ('' = the "
                                           "unconditional, the official default; the digit world: '<next digit>', "
                                           "each digit onto the next).")
    preserve_scale: Optional[float] = _f(None, "UCE: weight of keeping the retain prompts' outputs (official 0.1, "
                                               "also the digit world's).")
    attack_steps: Optional[int] = _f(None, "AdvUnlearn: inner soft-prompt attack steps per outer step (official 30; "
                                           "the digit world: 5).")
    attack_warmup: Optional[int] = _f(None, "AdvUnlearn: plain ESD steps before the first attack (official 200; the "
                                            "digit world: 40).")
    seed: int = _f(0, "Seed for data generation, saliency noise and training noise.")
    mixed_precision: str = _f("no", "Mixed precision: no, fp16 or bf16 (accelerate).", choices=["no", "fp16", "bf16"])
    # output and bookkeeping
    output_dir: str = _f("out/erasure", "Where the erasure, mask, merged unet/, checkpoints and model card go.")
    overwrite_output_dir: bool = _f(False, "Allow replacing an erasure already in --output_dir.")
    save_merged_unet: bool = _f(True, "Also save the erased U-Net in full as <output_dir>/unet (from_pretrained); "
                                      "--no-save_merged_unet also means --save_pipeline none. (--method advunlearn: the erased "
                                      "text encoder, as <output_dir>/text_encoder.)")
    save_pipeline: str = _f("link", "Make --output_dir a diffusers pipeline folder (model_index.json + the merged unet/ + "
                                    "the base's other components, symlinked per file or copied): "
                                    "StableDiffusionPipeline.from_pretrained(output_dir) then loads the erased model. "
                                    "'none': only the erasure (and unet/).", choices=["link", "copy", "none"])
    export_lora_rank: int = _f(0, "Also export the erasure as a rank-N LoRA (pytorch_lora_weights.safetensors, for "
                                  "pipe.load_lora_weights) beside the delta; 0: no LoRA.")
    push_to_hub: bool = _f(False, "Upload --output_dir (without data/, checkpoints and logs) to the Hugging Face Hub.")
    hub_model_id: Optional[str] = _f(None, "Hub repository for --push_to_hub (default: the output folder's name).")
    hub_token: Optional[str] = _f(None, "Hub token for --push_to_hub (default: the logged-in token).")
    validation_prompts: Optional[List[str]] = _f(None, "Prompts drawn during training (images saved under "
                                                       "<output_dir>/validation and logged to the trackers).", nargs="+")
    validation_steps: int = _f(0, "Draw the validation prompts every N steps (and after the last); 0: after the last.")
    num_validation_images: int = _f(2, "Images per validation prompt (seeded with --seed).")
    delta_dtype: str = _f("fp32", "dtype of the stored delta values: fp32 (exact), fp16 or bf16 (smaller).",
                          choices=["fp32", "fp16", "bf16"])
    checkpointing_steps: int = _f(0, "Save a checkpoint every N steps (0: never): SalUn's accelerate state (with "
                                     "--shard_weights each process's part, resumed by as many processes), or "
                                     "--method esd-* / advunlearn's loop state (not uce: one closed-form solve).")
    checkpoints_total_limit: Optional[int] = _f(None, "Keep at most this many checkpoints.")
    resume_from_checkpoint: Optional[str] = _f(None, "A checkpoint folder, or 'latest' in --output_dir.")
    report_to: Optional[str] = _f(None, "Tracker for accelerate (tensorboard, wandb, ...); none by default.")
    logging_dir: str = _f("logs", "Tracker log folder, relative to --output_dir.")
    verdict_images: int = _f(50, "Digit model only: images per digit the bundled judge scores before/after (0: skip).")
    # exports for the UIs (Automatic1111, ComfyUI; see the README)
    save_single_file: bool = _f(False, "Also write the erased model as ONE checkpoint in the original Stable Diffusion "
                                       "layout, <output_dir>/<name of output_dir>.safetensors (U-Net, VAE, text "
                                       "encoder(s); SD 1.x/2.x/SDXL): the file Automatic1111, ComfyUI and "
                                       "from_single_file load.")
    single_file_dtype: str = _f("float16", "dtype of the --save_single_file checkpoint (float16: half the size, what "
                                           "the UIs run; float32: the exact weights).", choices=["float16", "float32"])

    def __post_init__(self):
        """Types, ranges and the preset merge only: the config never reads the disk (input paths are checked by
        :func:`salun_diffusers.erasure.outputs.check_before_compute`, so a saved ``train_config.json`` loads on any
        machine)."""
        self._check_method_flags()
        self._normalize_concepts()
        spec = self.concept_spec()
        if self.method == "salun":
            self._apply_presets(spec)
        elif self.method != "uce" and len(spec.concepts) > 1:  # a peer's recipe: its preset (erasure.peers)
            raise ValueError(f"--method {self.method} erases one concept per run, got {len(spec.concepts)}; erase "
                             "them one at a time, or together with --method uce or salun")
        if self.pretrained_model_name_or_path is None and spec.needs_sd:
            raise ValueError(f"concept {spec.name!r} needs a Stable Diffusion model: pass "
                             "--pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 (the bundled default "
                             "model only knows digits: --concept zero..nine)")
        check_values(self)
        if self.adversarial and (self.adversarial_every < 1 or self.adversarial_steps < 1
                                 or self.adversarial_lr <= 0 or self.adversarial_weight < 0):
            raise ValueError("--adversarial needs --adversarial_every >= 1, --adversarial_steps >= 1, "
                             "--adversarial_lr > 0 and --adversarial_weight >= 0")
        if self.uce_adversarial_rounds and not self.uce_prompt_edit:
            raise ValueError("--uce_adversarial_rounds re-solves --uce_prompt_edit's edit: add --uce_prompt_edit or "
                             "drop --uce_adversarial_rounds")
        if self.uce_adversarial_images is not None and not self.uce_adversarial_rounds:
            raise ValueError("--uce_adversarial_images sets the images --uce_adversarial_rounds attacks: add "
                             "--uce_adversarial_rounds or drop --uce_adversarial_images")
        if self.relearn_rho and self.optimizer_in_backward:
            raise ValueError("--relearn_rho moves the weights and back around the forget term, which "
                             "--optimizer_in_backward would step in the moved state: drop one of them")
        if self.relearn_scope not in ("all", "mask") or self.relearn_direction not in ("gradient", "sign"):
            raise ValueError(f"--relearn_scope must be all or mask (got {self.relearn_scope!r}) and "
                             f"--relearn_direction gradient or sign (got {self.relearn_direction!r})")
        if self.saliency_retain_weight and len(spec.concepts) > 1 and self.saliency_combine != "sum":
            raise ValueError("--saliency_retain_weight discounts one forget saliency: use it with --saliency_combine "
                             f"sum (got {self.saliency_combine}), or drop --saliency_retain_weight")
        if self.single_file_dtype not in ("float16", "float32"):
            raise ValueError(f"--single_file_dtype must be float16 or float32, got {self.single_file_dtype!r}")
        if self.save_pipeline not in ("link", "copy", "none"):
            raise ValueError(f"--save_pipeline must be link, copy or none, got {self.save_pipeline!r}")
        # Rule (documented in --save_merged_unet's help): a pipeline folder needs the merged U-Net, so without it the
        # output is the erasure file alone, whatever --save_pipeline says
        if not self.save_merged_unet and self.save_pipeline != "none":
            logger.info("--no-save_merged_unet: --save_pipeline %s becomes none (a pipeline folder needs the merged "
                        "U-Net)", self.save_pipeline)
            self.save_pipeline = "none"

    def _apply_presets(self, spec: AnySpec) -> None:
        """SalUn's recipe: the concept preset's defaults for the fields left unset, and the step count."""
        epochs_given = self.num_train_epochs is not None and self.max_train_steps is None
        for key, value in preset_defaults(spec, bool(self.adversarial), self.pretrained_model_name_or_path).items():
            if getattr(self, key) is None and not (epochs_given and key == "max_train_steps"):
                setattr(self, key, value)
        if self.max_train_steps is None and not self.num_train_epochs:
            self.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
        elif self.max_train_steps is None and not self.forget_data_dir and not any(c.forget_data_dir
                                                                                  for c in spec.concepts):
            forget = self.num_forget_images * len(spec.concepts)  # every concept's generated forget images
            self.max_train_steps = max(1, self.num_train_epochs) * -(-forget // self.train_batch_size)
        # else: epochs over a forget folder; erasure.data.resolve_epoch_steps counts its images before the run
        if self.saliency_batch_size is None:
            self.saliency_batch_size = self.train_batch_size
        if self.saliency_retain_weight is None:
            self.saliency_retain_weight = 0.0
        if self.uce_adversarial_images is None and self.uce_adversarial_rounds:
            self.uce_adversarial_images = UCE_ADVERSARIAL_IMAGES

    def _check_method_flags(self) -> None:
        """Refuse a flag the chosen ``--method`` does not read (one given away from its default), naming the fix."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        allowed = ({f.name for f in fields(self)} - set(PEER_FIELDS) if self.method == "salun"
                   else set(SHARED_FIELDS) | set(PEER_METHOD_FIELDS[self.method]))
        for f in fields(self):
            if f.name in allowed or getattr(self, f.name) == f.default:
                continue
            users = ["salun"] * (f.name not in PEER_FIELDS) + [m for m, names in PEER_METHOD_FIELDS.items()
                                                                if f.name in names]
            if f.name in CHECKPOINT_FIELDS:  # the one peer without them
                why = "uce is one closed-form solve with no training steps to checkpoint: rerun it from the start"
            else:
                why = f"it is a setting of --method {' / '.join(users)}"
            raise ValueError(f"--{f.name} does not apply to --method {self.method} ({why}); drop --{f.name}")

    def to_dict(self) -> dict:
        """All fields, except the hub token (never written to train_config.json, metadata or trackers)."""
        return {**super().to_dict(), "hub_token": None}

    def _normalize_concepts(self) -> None:
        """``concept``: one name as a string, several as a list (commas split); ``concepts``: canonical JSON rows."""
        items = [self.concept] if isinstance(self.concept, str) else list(self.concept or [])
        names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
        if not names and not self.concepts:
            names = ["seven"]  # the bundled digit model's README example
        self.concept = names[0] if len(names) == 1 else names
        rows = []
        for i, row in enumerate(self.concepts or [], 1):
            if isinstance(row, str):
                try:
                    row = json.loads(row)
                except ValueError:
                    raise ValueError(f"--concepts item {i} is not a JSON object: {row!r}") from None
            if not isinstance(row, dict):
                raise ValueError(f"--concepts item {i} is not a JSON object: {row!r}")
            concept_from_row(row, f"--concepts item {i}")
            rows.append(json.dumps(row, sort_keys=True))
        self.concepts = rows or None

    def concept_rows(self) -> List[dict]:
        return [json.loads(r) for r in self.concepts or []]

    def concept_spec(self) -> AnySpec:
        """The concept(s) of the run: a :class:`~salun_diffusers.concepts.ConceptSpec`, or
        :class:`~salun_diffusers.concepts.JointConcepts` for several."""
        return resolve_concepts(self.concept, self.forget_prompt, self.pseudo_prompt, self.retain_prompt,
                                self.concept_rows())


UCE_ADVERSARIAL_IMAGES = 64  # --uce_adversarial_images' default with the rounds (its measurement: the field's comment)

# (lower, upper) bound of each number (None: unbounded; see _STRICT_LOWER, _OPEN_UPPER); checked after the presets apply
RANGES = {
    "learning_rate": (0.0, None), "alpha": (0.0, None), "adam_beta1": (0.0, 1.0), "adam_beta2": (0.0, 1.0),
    "adam_epsilon": (0.0, None), "adam_weight_decay": (0.0, None), "max_grad_norm": (0.0, None),
    "data_guidance_scale": (0.0, None), "lr_warmup_steps": (0, None), "checkpointing_steps": (0, None),
    "verdict_images": (0, None), "seed": (0, 2 ** 31), "num_retain_images": (0, None),
    "checkpoints_total_limit": (1, None), "max_sequence_length": (1, None), "flux_guidance_scale": (0.0, None),
    "resolution": (8, None), "mask_ratio": (0.0, 1.0),
    "saliency_guidance_scale": (0.0, None), "saliency_retain_weight": (0.0, None), "export_lora_rank": (0, None),
    "validation_steps": (0, None), "relearn_rho": (0.0, None), "forget_uncond_weight": (0.0, None), "relearn_steps": (1, None),
    "negative_guidance": (0.0, None), "start_guidance": (0.0, None), "preserve_scale": (0.0, None),
    "attack_steps": (0, None), "attack_warmup": (0, None), "partial_sampling_steps": (1, None),
    "uce_adversarial_rounds": (0, None), "uce_adversarial_images": (1, None), "uce_adversarial_steps": (1, None),
    "uce_adversarial_weight": (0.0, None), "uce_preserve_word_weight": (0.0, None),
    **{name: (1, None) for name in ("num_forget_images", "max_train_steps", "train_batch_size", "num_train_epochs",
                                    "gradient_accumulation_steps", "saliency_batch_size", "data_num_inference_steps",
                                    "threads", "num_validation_images", "data_batch_size")},
}
_STRICT_LOWER = {"learning_rate", "adam_epsilon", "mask_ratio"}  # must be > the bound, not >=
_OPEN_UPPER = {"adam_beta1", "adam_beta2", "seed"}  # must be < the bound


def check_values(config) -> None:
    """Refuse non-finite numbers (NaN, inf) in any float field and values outside ``RANGES``, naming the flag.

    torch's optimizers check some values (a NaN learning rate) but not all: a NaN ``alpha`` or ``max_grad_norm``
    would train silently into an erasure full of NaN."""
    for f in fields(config):
        value = getattr(config, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ValueError(f"--{f.name} must be a finite number, got {value}")
    for name, (low, high) in RANGES.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if value < low or (name in _STRICT_LOWER and value == low):
            raise ValueError(f"--{name} must be {'>' if name in _STRICT_LOWER else '>='} {low}, got {value}")
        if high is not None and (value > high or (name in _OPEN_UPPER and value == high)):
            raise ValueError(f"--{name} must be {'<' if name in _OPEN_UPPER else '<='} {high}, got {value}")
    if getattr(config, "optimizer_in_backward", False):
        clash = [flag for flag, bad in (("--max_grad_norm > 0", (config.max_grad_norm or 0) > 0),
                                        ("--gradient_accumulation_steps > 1", config.gradient_accumulation_steps > 1),
                                        ("--mixed_precision fp16", config.mixed_precision == "fp16"),
                                        ("--use_8bit_adam", config.use_8bit_adam)) if bad]
        if clash:
            raise ValueError(f"--optimizer_in_backward steps each weight during backward, which {clash[0]} needs "
                             f"after it: drop {clash[0].split()[0]} or --optimizer_in_backward")
    if config.resolution is not None and config.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE's scale), got {config.resolution}")
    if not str(config.output_dir or "").strip():
        raise ValueError("--output_dir must not be empty")
    names = [t.value for t in SchedulerType]
    if config.lr_scheduler not in names:
        raise ValueError(f"--lr_scheduler {config.lr_scheduler!r} is not a diffusers scheduler; use one of {names}")
