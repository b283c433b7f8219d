"""Attacks on erased models (one implementation for the ``salun-attack`` CLI, the audit and adversarial training).

    from salun_diffusers.attacks import token_attack, inversion_attack, conditioning_attack, attack_loss

See :mod:`salun_diffusers.attacks.core` for what each attack optimises. ``salun-attack`` runs
:func:`salun_diffusers.attacks.runner.run_attack` (config in :mod:`~salun_diffusers.attacks.config`, report in
:mod:`~salun_diffusers.attacks.report`); :mod:`salun_diffusers.attacks.cli` is the thin command.
"""

from .core import (CONDITIONING_DEFAULTS, DEFAULT_LR, DEFAULT_STEPS, FAST_STEPS, InversionResult, TokenAttackResult,
                   attack_loss, conditioning_attack, encode_ids, encode_prompt, evaluate_loss, frozen, inversion_attack,
                   token_attack, word_vocabulary)

__all__ = ["CONDITIONING_DEFAULTS", "DEFAULT_LR", "DEFAULT_STEPS", "FAST_STEPS", "InversionResult", "TokenAttackResult",
           "attack_loss", "conditioning_attack", "encode_ids", "encode_prompt", "evaluate_loss", "frozen",
           "inversion_attack", "token_attack", "word_vocabulary"]
