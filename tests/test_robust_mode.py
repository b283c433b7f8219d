"""Issue 17's robust mode (the digit preset's ``--adversarial`` at alpha 8) and the retain-aware mask
(``--saliency_retain_weight``): the mask, the guarantee outside it, resume, and the checks. Tiny config-built pipeline
on CPU (mechanics, seconds)."""

import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from salun_diffusers import load_mask
from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.masking import mask_from_saliency
from salun_diffusers.saliency import retain_aware_saliency

# the frozen mode (the digit preset's --adversarial: alpha 8) and the retain-aware mask, with a tiny inner attack
FROZEN = dict(adversarial=True, alpha=8.0, adversarial_steps=2, adversarial_lr=0.05)
ROBUST = dict(FROZEN, saliency_retain_weight=4.0)


def test_a_weight_the_retain_loss_relies_on_leaves_the_mask():
    # four weights, top half: SalUn picks the two largest forget saliencies (0 and 1); weight 1 has a retain saliency
    # far above its forget saliency, so the retain-aware mask swaps it for weight 2
    forget = {"w": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    retain = {"w": torch.tensor([0.1, 30.0, 0.1, 0.1])}
    assert mask_from_saliency(forget, 0.5)["w"].tolist() == [True, True, False, False]
    aware = retain_aware_saliency(forget, retain, 1.0)
    assert mask_from_saliency(aware, 0.5)["w"].tolist() == [True, False, True, False]
    # the formula: f / (1 + w r / f) on mean-normalised saliencies (means 2.5 and 7.575)
    f, r = forget["w"] / 2.5, retain["w"] / 7.575
    torch.testing.assert_close(aware["w"], f / (1 + r / f))


def test_weight_zero_is_salun_and_zero_forget_saliency_is_never_preferred():
    forget = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0, 0.0])}
    retain = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([5.0, 1.0])}
    assert retain_aware_saliency(forget, retain, 0.0) is forget
    aware = retain_aware_saliency(forget, retain, 3.0)
    assert aware["a"][0] == 0 and aware["b"][1] == 0  # 0 / 0 is 0, not NaN
    assert all(bool((t >= 0).all()) for t in aware.values())
    with pytest.raises(ValueError, match="same parameters"):
        retain_aware_saliency(forget, {"a": retain["a"]}, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        retain_aware_saliency(forget, retain, -1.0)


@pytest.mark.parametrize("mode", [FROZEN, ROBUST], ids=["adversarial-alpha8", "retain-aware-mask"])
def test_robust_modes_keep_every_weight_outside_the_mask(mode, erase_config, dummy_pipeline_dir, tmp_path):
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), save_mask_only=True))
    robust = erase(erase_config(output_dir=str(tmp_path / "robust"), max_train_steps=2, **mode))
    m_plain, _ = load_mask(plain.mask_path)
    mask, meta = load_mask(robust.mask_path)
    selected = sum(int(m.sum()) for m in mask.values())
    assert selected == sum(int(m.sum()) for m in m_plain.values())  # same ratio
    differ = sum(int((mask[n] ^ m_plain[n]).sum()) for n in mask)
    if mode.get("saliency_retain_weight"):  # other weights
        assert meta["saliency_retain_weight"] == "4.0" and differ > 0.05 * selected
    else:  # SalUn's mask exactly
        assert differ == 0 and "saliency_retain_weight" not in meta
    base = dict(UNet2DConditionModel.from_pretrained(dummy_pipeline_dir, subfolder="unet").named_parameters())
    changed = 0
    for name, p in robust.unet.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], base[name].detach()[~m]), name  # bit-identical outside the mask
        changed += int((p.detach()[m] != base[name].detach()[m]).sum())
    assert changed > 0.5 * selected


def test_resumed_robust_run_equals_an_uninterrupted_one(resumed_equals_full):
    kw = dict(max_train_steps=4, adversarial_every=3, **ROBUST)
    assert resumed_equals_full(**kw)


def test_checks(erase_config):
    assert EraseConfig(concept="seven").saliency_retain_weight == 0.0  # SalUn's mask unless asked
    assert EraseConfig(concept="seven", adversarial=True).saliency_retain_weight == 0.0
    assert EraseConfig(concept="seven", adversarial=True).alpha == 8.0  # the frozen robust mode
    with pytest.raises(ValueError, match="saliency_retain_weight must be >= 0"):
        EraseConfig(concept="seven", saliency_retain_weight=-1.0)
    with pytest.raises(ValueError, match="--saliency_combine sum"):
        EraseConfig(concept=["seven", "four"], saliency_retain_weight=1.0, saliency_combine="union")
    with pytest.raises(ValueError, match="needs retain images"):
        erase(erase_config(num_retain_images=0, saliency_retain_weight=1.0, save_mask_only=True))
