"""Issue 17, ``--forget_uncond_weight``: SalUn's forget objective on the unconditional (empty-prompt) branch too, with
the unconditional branch's ordinary loss on the retain images. The loss is what it says, only masked weights train
(SD, SD3), resume equals an uninterrupted run, it composes with ``--relearn_rho``, and bad values are refused. Tiny
config-built pipelines on CPU (mechanics, seconds)."""

import pytest
import torch
import torch.nn.functional as F

from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.families import PromptCond, model_family
from salun_diffusers.objectives import salun_loss
from salun_diffusers.testing import PlainBackward, changed_inside_mask, get_dummy_pipeline, save_flow_pipeline

ROBUST = dict(adversarial=True, alpha=8.0, adversarial_steps=2, adversarial_lr=0.05)



def _differs(a, b) -> int:
    wb = dict(b.unet.named_parameters())
    return sum(int((p.detach() != wb[n].detach()).sum()) for n, p in a.unet.named_parameters())


def _step_inputs():
    """The tiny U-Net, its family, forget and retain latents, forget / pseudo / retain conditionings and the empty
    prompt's (one prompt), all seeded."""
    pipe = get_dummy_pipeline(0)
    unet, family = pipe.unet, model_family(pipe)
    g = torch.Generator().manual_seed(0)
    lat, r_lat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    f_emb, pseudo, r_emb = (torch.randn(2, 77, unet.config.cross_attention_dim, generator=g) for _ in range(3))
    return unet, family, lat, r_lat, f_emb, pseudo, r_emb, PromptCond(
        torch.randn(77, unet.config.cross_attention_dim, generator=g))


def test_the_loss_adds_the_unconditional_forget_and_retain_terms():
    """``salun_loss`` with the empty prompt's conditioning and weight w: the forget term gains w x the MSE of the
    unconditional prediction on the forget x_t against the pseudo prompt's (detached) prediction, the retain term
    gains the unconditional prediction's MSE against the retain images' own target, on the same x_t and t."""
    unet, family, lat, r_lat, f_emb, pseudo, r_emb, empty = _step_inputs()
    alpha, w = 3.0, 0.7
    with torch.no_grad():
        plain, plain_f, plain_r = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, alpha,
                                             torch.Generator().manual_seed(5))
        total, forget, retain = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, alpha,
                                           torch.Generator().manual_seed(5), uncond_embeds=empty, uncond_weight=w)
        # the same draws by hand: forget noise and t first, then the retain images'
        gen = torch.Generator().manual_seed(5)
        noisy, t, _ = family.noised(lat, gen)
        r_noisy, r_t, r_target = family.noised(r_lat, gen)
        target = family.predict(unet, noisy, t, pseudo)
        unc = F.mse_loss(family.predict(unet, noisy, t, empty.expand(2)), target)
        r_unc = F.mse_loss(family.predict(unet, r_noisy, r_t, empty.expand(2)), r_target)
    assert float(unc) > 0 and float(r_unc) > 0
    torch.testing.assert_close(forget, plain_f + w * unc, rtol=1e-5, atol=0)
    torch.testing.assert_close(retain, plain_r + r_unc, rtol=1e-5, atol=0)
    torch.testing.assert_close(total, forget + alpha * retain, rtol=1e-5, atol=0)
    assert not torch.equal(total, plain)


def test_only_masked_weights_train_and_the_term_changes_the_step(erase_config, dummy_pipeline_dir, tmp_path):
    off = erase(erase_config(output_dir=str(tmp_path / "off"), max_train_steps=2, **ROBUST))
    on = erase(erase_config(output_dir=str(tmp_path / "on"), max_train_steps=2, forget_uncond_weight=1.0, **ROBUST))
    assert changed_inside_mask(on, dummy_pipeline_dir) > 0  # it trained, on the mask only
    assert _differs(on, off) > 0  # and the unconditional terms changed what it learned


def test_with_the_relearning_move_only_masked_weights_train(erase_config, dummy_pipeline_dir, tmp_path):
    """``--relearn_rho`` computes the retain term in its own pass: the unconditional retain term is added there."""
    kw = dict(max_train_steps=2, relearn_rho=0.5, relearn_direction="sign", **ROBUST)
    off = erase(erase_config(output_dir=str(tmp_path / "off"), **kw))
    on = erase(erase_config(output_dir=str(tmp_path / "on"), forget_uncond_weight=1.0, **kw))
    assert changed_inside_mask(on, dummy_pipeline_dir) > 0
    assert _differs(on, off) > 0


def test_resumed_run_equals_an_uninterrupted_one(resumed_equals_full):
    kw = dict(max_train_steps=4, forget_uncond_weight=2.0)
    assert resumed_equals_full(**kw)


def test_flow_matching_transformer_keeps_every_weight_outside_the_mask(data_cache, tmp_path):
    """SD3 (flow matching; the empty prompt's conditioning carries the pooled projection too)."""
    path = save_flow_pipeline(str(tmp_path / "pipe"), "sd3")
    common = dict(pretrained_model_name_or_path=path, concept="nudity", cache_dir=data_cache, num_forget_images=4,
                  num_retain_images=4, data_num_inference_steps=2, max_train_steps=2, train_batch_size=2,
                  learning_rate=1e-2, seed=0, resolution=16)
    off = erase(EraseConfig(output_dir=str(tmp_path / "off"), **common))
    on = erase(EraseConfig(output_dir=str(tmp_path / "on"), forget_uncond_weight=1.0, **common))
    assert changed_inside_mask(on, path) > 0
    assert _differs(on, off) > 0


def test_a_negative_weight_is_refused_in_one_line(erase_config):
    with pytest.raises(ValueError, match="--forget_uncond_weight must be >= 0"):
        erase_config(forget_uncond_weight=-1.0)


def test_the_relearning_step_has_the_same_unconditional_terms():
    """``--relearn_rho`` computes the forget and the retain term in two passes: with a zero move and the unconditional
    terms on, its loss and gradients are SalUn's one-pass ones (the same draws: the unconditional retain term on the
    retain images' own x_t), up to float32 summation order."""
    from salun_diffusers.erasure import training
    from salun_diffusers.erasure.sharpness import RelearnPerturbation

    unet, family, lat, r_lat, f_emb, pseudo, r_emb, empty = _step_inputs()
    config = EraseConfig(pretrained_model_name_or_path="x", concept="nudity", alpha=3.0, relearn_rho=1.0,
                         forget_uncond_weight=0.7)
    loss, _, retain = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, 3.0, torch.Generator().manual_seed(5),
                                 uncond_embeds=empty, uncond_weight=0.7)
    loss.backward()
    want = {n: p.grad.clone() for n, p in unet.named_parameters()}
    unet.zero_grad(set_to_none=True)
    move = RelearnPerturbation(unet, {}, config)
    move.rho = 0.0
    total, _, two_pass_retain = training.sharpness_aware_backward(
        PlainBackward, unet, family, move, lat, f_emb, pseudo, r_lat, r_emb, config, torch.Generator().manual_seed(5),
        None, seed=7, step=1, uncond_emb=empty)
    torch.testing.assert_close(two_pass_retain, retain, rtol=1e-5, atol=0)
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=0)
    for n, p in unet.named_parameters():
        scale = float(want[n].abs().max())
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
