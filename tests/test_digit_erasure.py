"""Issue 3's end-to-end check: erase a digit from the bundled MNIST model with the preset defaults and judge it.

This is the digit world (a real model trained on real MNIST digits), so the bounds are real efficacy bounds.
About a minute or two on 2 CPU cores.
"""

import torch

from salun_diffusers.config import EraseConfig
from salun_diffusers.digits import DigitJudge, load_digit_pipeline
from salun_diffusers.erase import erase
from salun_diffusers.masking import load_mask
from salun_diffusers.reporting import digit_scores

N_PER_DIGIT = 20


def test_erasing_seven_forgets_seven_and_keeps_the_other_digits(tmp_path):
    judge = DigitJudge.from_pretrained()
    base = load_digit_pipeline()
    before = digit_scores(base, judge, 7, N_PER_DIGIT)
    assert before["unlearning_accuracy"] <= 0.1 and before["retained_accuracy"] >= 0.95  # the base draws digits

    config = EraseConfig(concept="seven", output_dir=str(tmp_path / "no-seven"), save_merged_unet=False,
                         save_pipeline="none")
    result = erase(config, pipe=load_digit_pipeline())
    after = digit_scores(result.pipeline, judge, 7, N_PER_DIGIT)
    assert after["unlearning_accuracy"] >= 0.9, after
    assert before["retained_accuracy"] - after["retained_accuracy"] <= 0.05, (before, after)

    # SalUn changed only the salient half of the U-Net
    mask, _ = load_mask(result.mask_path)
    base_params = dict(base.unet.named_parameters())
    for name, p in result.unet.named_parameters():
        assert torch.equal(p.detach()[~mask[name]], base_params[name].detach()[~mask[name]]), name
