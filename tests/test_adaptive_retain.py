"""Issue 17, ``--adaptive_retain``: a per-retain-prompt weight of SalUn's retain term, driven by a fixed probe's MSE.
The weighted retain term is what it says, the update raises the weight of a prompt whose probe MSE rose (and only
that one), only masked weights train (with ``--adversarial`` and ``--forget_uncond_weight``), resume equals an
uninterrupted run, off is today's loss, and bad values are refused. Tiny config-built pipelines on CPU (mechanics)."""

import pytest
import torch
import torch.nn.functional as F

from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.erasure.adaptive_retain import AdaptiveRetain, check_adaptive_retain_fits
from salun_diffusers.erasure.data import ConceptData
from salun_diffusers.families import PromptCond, cat_conds, model_family
from salun_diffusers.objectives import salun_loss
from salun_diffusers.testing import changed_inside_mask, get_dummy_pipeline, save_flow_pipeline

ROBUST = dict(adversarial=True, alpha=8.0, adversarial_steps=2, adversarial_lr=0.05, forget_uncond_weight=2.0)
# two retain prompts, so that each has its own weight; against 1 (not the mean), so that a rising probe MSE moves them
# the tiny random U-Net's retain MSE falls under alpha 8 (it learns the retain images): a small alpha and a large step
# make it rise, so that the weights move
RISING = {**ROBUST, "alpha": 0.01, "learning_rate": 0.1}
ADAPTIVE = dict(adaptive_retain=True, adaptive_retain_every=1, adaptive_retain_relative=False,
                adaptive_retain_rate=50.0, retain_prompt=["a photo of a dog", "a photo of a cat"])


def _inputs(n=3):
    pipe = get_dummy_pipeline(0)
    unet, family = pipe.unet, model_family(pipe)
    g = torch.Generator().manual_seed(0)
    lat, r_lat = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    f_emb, pseudo, r_emb = (torch.randn(n, 77, unet.config.cross_attention_dim, generator=g) for _ in range(3))
    empty = PromptCond(torch.randn(77, unet.config.cross_attention_dim, generator=g))
    return unet, family, lat, r_lat, f_emb, pseudo, r_emb, empty


def test_the_retain_term_is_the_weighted_per_sample_mse():
    """``alpha * sum_i w_i * MSE_i / batch`` on the conditional and (``--forget_uncond_weight``) unconditional
    branch, on the draws SalUn's loss makes (forget noise and t first, then the retain images')."""
    unet, family, lat, r_lat, f_emb, pseudo, r_emb, empty = _inputs()
    w, alpha = torch.tensor([1.0, 2.5, 4.0]), 3.0
    with torch.no_grad():
        total, forget, retain = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, alpha,
                                           torch.Generator().manual_seed(5), uncond_embeds=empty, uncond_weight=2.0,
                                           retain_weights=w)
        plain = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, alpha, torch.Generator().manual_seed(5),
                           uncond_embeds=empty, uncond_weight=2.0)
        gen = torch.Generator().manual_seed(5)
        family.noised(lat, gen)
        r_noisy, r_t, r_target = family.noised(r_lat, gen)
        cond = [F.mse_loss(family.predict(unet, r_noisy[i:i + 1], r_t[i:i + 1], r_emb[i:i + 1]), r_target[i:i + 1])
                for i in range(3)]
        unc = [F.mse_loss(family.predict(unet, r_noisy[i:i + 1], r_t[i:i + 1], empty.expand(1)), r_target[i:i + 1])
               for i in range(3)]
    want = sum(w[i] * (cond[i] + unc[i]) for i in range(3)) / 3
    torch.testing.assert_close(retain, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(total, forget + alpha * retain, rtol=1e-5, atol=0)
    torch.testing.assert_close(forget, plain[1], rtol=1e-6, atol=0)  # the forget term is untouched
    assert float(retain) > float(plain[2])  # weights above 1 add retain pressure (normalised by the batch)
    with torch.no_grad():  # all weights 1: the plain mean
        ones = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, alpha, torch.Generator().manual_seed(5),
                          uncond_embeds=empty, uncond_weight=2.0, retain_weights=torch.ones(3))
    torch.testing.assert_close(ones[2], plain[2], rtol=1e-5, atol=0)
    with torch.no_grad():  # --adaptive_retain_normalize weights: divided by the weights' sum, a weighted mean
        _, _, mean = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, alpha,
                                torch.Generator().manual_seed(5), uncond_embeds=empty, uncond_weight=2.0,
                                retain_weights=w, retain_normalize="weights")
    torch.testing.assert_close(mean, want * 3 / w.sum(), rtol=1e-5, atol=0)


def test_off_the_loss_is_todays():
    """No weights (the default): the retain term is ``F.mse_loss`` of the batch, bit for bit, as before the flag."""
    assert EraseConfig(concept="seven").adaptive_retain is False
    assert EraseConfig(concept="seven", adversarial=True, forget_uncond_weight=2.0).adaptive_retain is False
    unet, family, lat, r_lat, f_emb, pseudo, r_emb, empty = _inputs()
    with torch.no_grad():
        total, forget, retain = salun_loss(unet, family, lat, f_emb, pseudo, r_lat, r_emb, 3.0,
                                           torch.Generator().manual_seed(5), uncond_embeds=empty, uncond_weight=2.0)
        gen = torch.Generator().manual_seed(5)  # the draws and the one pass of forget and retain images, as before
        noisy, t, _ = family.noised(lat, gen)
        r_noisy, r_t, r_target = family.noised(r_lat, gen)
        n = len(lat)
        both = family.predict(unet, torch.cat([noisy, r_noisy]), torch.cat([t, r_t]), cat_conds([f_emb, r_emb]))
        today = F.mse_loss(both[n:].float(), r_target.float()) + F.mse_loss(
            family.predict(unet, r_noisy, r_t, empty.expand(n)).float(), r_target.float())
    assert torch.equal(retain, today)
    assert torch.equal(total, forget + 3.0 * today)


def _probe_data():
    """The tiny U-Net's pipeline and seeded data: a forget prompt (id 0) and two retain prompts, dog (1) and cat (2),
    with three retain images each."""
    pipe = get_dummy_pipeline(0)
    g = torch.Generator().manual_seed(0)
    dim = pipe.unet.config.cross_attention_dim
    embeds = {p: PromptCond(torch.randn(77, dim, generator=g)) for p in ("forget", "dog", "cat")}
    data = ConceptData(torch.randn(2, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g),
                       torch.tensor([1, 2, 1, 2, 1, 2]), embeds)
    return pipe, data


def _adaptive(config, ratios_by_update):
    """An AdaptiveRetain on :func:`_probe_data`, whose probe scores are then replaced by the constructed
    ``base * ratio`` of each update."""
    pipe, data = _probe_data()
    ada = AdaptiveRetain(pipe.unet, model_family(pipe), data, config)
    assert ada.prompts == [1, 2] and float(ada.base[1]) > 0 and float(ada.base[2]) > 0
    for ratio in ratios_by_update:
        ada.score = lambda unet, r=ratio: ada.base * torch.tensor([1.0, *r], dtype=torch.float64)
        ada.update(pipe.unet)
    return ada


def test_a_prompt_whose_probe_mse_rises_gets_a_larger_weight():
    base = dict(concept="seven", adaptive_retain=True, adaptive_retain_rate=4.0, adaptive_retain_max=4.0)
    # against 1: dog's probe MSE rose 10% then 20%, cat's fell then stayed: dog 1 -> e^0.4 -> e^1.2, cat stays 1
    ada = _adaptive(EraseConfig(**base, adaptive_retain_relative=False), [(1.1, 0.9), (1.2, 1.0)])
    assert ada.weights[1].item() == pytest.approx(torch.exp(torch.tensor(1.2)).item(), rel=1e-5)
    assert ada.weights[2].item() == 1.0 and ada.weights[0].item() == 1.0  # the forget prompt has no weight
    assert ada.report()["weights"] == {"dog": pytest.approx(3.3201, abs=1e-4), "cat": 1.0}
    # against the mean: both rose, dog more (1.3 vs 1.1, mean 1.2): dog up by e^0.4, cat stays 1; clamped at the max
    ada = _adaptive(EraseConfig(**base), [(1.3, 1.1)])
    assert ada.weights[1].item() == pytest.approx(torch.exp(torch.tensor(0.4)).item(), rel=1e-5)
    assert ada.weights[2].item() == 1.0
    ada = _adaptive(EraseConfig(**base), [(1.3, 1.1)] * 10)
    assert ada.weights[1].item() == 4.0 and ada.weights[2].item() == 1.0
    # a tolerance: a rise within it leaves the weight at 1
    ada = _adaptive(EraseConfig(**base, adaptive_retain_relative=False, adaptive_retain_tolerance=0.15),
                    [(1.1, 1.0)])
    assert ada.weights[1].item() == 1.0


def test_the_probe_is_scored_with_the_current_weights():
    """The probe is fixed (the same x_t, noise and t at every scoring): the same weights score the same, bit for bit;
    moved weights score differently."""
    pipe, data = _probe_data()
    ada = AdaptiveRetain(pipe.unet, model_family(pipe), data, EraseConfig(concept="seven", adaptive_retain=True))
    assert torch.equal(ada.score(pipe.unet), ada.base)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(1.5)
    moved = ada.score(pipe.unet)
    assert not torch.equal(moved[1:], ada.base[1:]) and moved[0] == 0



def test_only_masked_weights_train_with_adversarial(erase_config, dummy_pipeline_dir, tmp_path):
    off = erase(erase_config(output_dir=str(tmp_path / "off"), max_train_steps=3, **RISING,
                             retain_prompt=ADAPTIVE["retain_prompt"]))
    on = erase(erase_config(output_dir=str(tmp_path / "on"), max_train_steps=3, **RISING, **ADAPTIVE))
    assert changed_inside_mask(on, dummy_pipeline_dir) > 0  # it trained, on the mask only
    weights = on.metrics["final"]["adaptive_retain"]["weights"]
    assert set(weights) == set(ADAPTIVE["retain_prompt"]) and max(weights.values()) > 1.0  # the weights moved
    assert "adaptive_retain" not in off.metrics["final"]
    wb = dict(off.unet.named_parameters())
    assert any(not torch.equal(p.detach(), wb[n].detach()) for n, p in on.unet.named_parameters())  # and mattered


def test_resumed_run_equals_an_uninterrupted_one(erase_config, killed_and_resumed, tmp_path):
    # a slow update (rate 2), so that the weights saved at step 2 are between 1 and the maximum, and a resume that
    # restarted them at 1 would differ
    kw = dict(max_train_steps=5, **RISING, **{**ADAPTIVE, "adaptive_retain_rate": 2.0})
    full = erase(erase_config(output_dir=str(tmp_path / "full"), **kw))
    resumed = killed_and_resumed(**kw)
    a, b = dict(full.unet.named_parameters()), dict(resumed.unet.named_parameters())
    assert all(torch.equal(a[n].detach(), b[n].detach()) for n in a)
    assert full.metrics["final"]["adaptive_retain"] == resumed.metrics["final"]["adaptive_retain"]
    assert max(full.metrics["final"]["adaptive_retain"]["weights"].values()) > 1.0


def test_flow_matching_transformer_keeps_every_weight_outside_the_mask(data_cache, tmp_path):
    """SD3 (flow matching: the probe's targets are velocities, the conditioning carries the pooled projection)."""
    path = save_flow_pipeline(str(tmp_path / "pipe"), "sd3")
    on = erase(EraseConfig(pretrained_model_name_or_path=path, concept="nudity", cache_dir=data_cache,
                           num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=3,
                           train_batch_size=2, seed=0, resolution=16, output_dir=str(tmp_path / "on"),
                           **{**RISING, "adversarial": False}, **ADAPTIVE))
    assert changed_inside_mask(on, path) > 0
    assert set(on.metrics["final"]["adaptive_retain"]["weights"]) == set(ADAPTIVE["retain_prompt"])


@pytest.mark.parametrize("bad, message", [
    (dict(adaptive_retain_max=0.5), "--adaptive_retain_max must be >= 1.0"),
    (dict(adaptive_retain_every=0), "--adaptive_retain_every must be >= 1"),
    (dict(adaptive_retain_rate=-1.0), "--adaptive_retain_rate must be >= 0.0"),
    (dict(adaptive_retain_tolerance=-0.1), "--adaptive_retain_tolerance must be >= 0.0"),
    (dict(adaptive_retain_probe=0), "--adaptive_retain_probe must be >= 1"),
    (dict(adaptive_retain_rate=float("nan")), "--adaptive_retain_rate must be a finite number"),
    (dict(adaptive_retain_normalize="sum"), "--adaptive_retain_normalize must be batch or weights"),
])
def test_bad_values_are_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        EraseConfig(concept="seven", adaptive_retain=True, **bad)
    assert "\n" not in str(err.value)


def test_where_it_does_not_apply_it_is_refused(erase_config):
    with pytest.raises(ValueError, match="needs retain images") as err:
        erase(erase_config(num_retain_images=0, adaptive_retain=True))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="drop --adaptive_retain or --shard_weights"):
        check_adaptive_retain_fits(EraseConfig(concept="seven", adaptive_retain=True), sharded=True)
    check_adaptive_retain_fits(EraseConfig(concept="seven"), sharded=True)  # off: nothing to refuse
