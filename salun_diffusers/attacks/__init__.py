"""Attacks on erased models (one implementation for the ``salun-attack`` CLI, the audit and adversarial training).

    from salun_diffusers.attacks import token_attack, inversion_attack, conditioning_attack, attack_loss

See :mod:`salun_diffusers.attacks.core` for what each attack optimises. ``salun-attack`` runs
:func:`salun_diffusers.attacks.runner.run_attack` (config in :mod:`~salun_diffusers.attacks.config`, report in
:mod:`~salun_diffusers.attacks.report`); :mod:`salun_diffusers.attacks.cli` is the thin command (also
``salun-probe``: the knowledge probes of :mod:`salun_diffusers.attacks.probes`).
"""

from .core import (CONDITIONING_DEFAULTS, DEFAULT_LR, DEFAULT_STEPS, FAST_STEPS, InversionResult, TokenAttackResult,
                   attack_loss, conditioning_attack, encode_ids, encode_prompt, evaluate_loss, frozen, inversion_attack,
                   token_attack, word_vocabulary)
from .probes import (PROBES, ProbeSettings, ProbeTarget, conditioning_probe, digit_images, inpainting_probe,
                     probe_summary, probe_target, relearning_probe, run_probes, sdedit_probe)

__all__ = ["CONDITIONING_DEFAULTS", "DEFAULT_LR", "DEFAULT_STEPS", "FAST_STEPS", "InversionResult", "TokenAttackResult",
           "attack_loss", "conditioning_attack", "encode_ids", "encode_prompt", "evaluate_loss", "frozen",
           "inversion_attack", "token_attack", "word_vocabulary", "PROBES", "ProbeSettings", "ProbeTarget",
           "conditioning_probe", "digit_images", "inpainting_probe", "probe_summary", "probe_target",
           "relearning_probe", "run_probes", "sdedit_probe"]
