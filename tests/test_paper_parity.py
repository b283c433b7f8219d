"""The official SalUn recipe (OPTML-Group/Unlearn-Saliency@a6e89fd) as the project's defaults: guided saliency loss,
preset values, and the classifier path's batch / augmentation / random-label scheme / SVC membership attack."""

import pytest
import torch

from salun_diffusers.classification.methods import (MethodConfig, augment_batch, black_level, random_labels,
                                                    relabel_epoch)
from salun_diffusers.classification.metrics import evaluate_unlearning, mia_efficacy
from salun_diffusers.config import EraseConfig
from salun_diffusers.erasure.saliency import guided_diffusion_loss
from salun_diffusers.objectives import diffusion_loss


@pytest.fixture(scope="module")
def tiny_unet_and_scheduler():
    from diffusers import DDPMScheduler

    from salun_diffusers.testing import get_dummy_components

    parts = get_dummy_components()
    return parts["unet"], DDPMScheduler.from_config(parts["scheduler"].config)


def test_guided_saliency_loss_equals_a_hand_computed_reference(tiny_unet_and_scheduler):
    unet, scheduler = tiny_unet_and_scheduler
    torch.manual_seed(0)
    latents, cond, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 16), torch.randn(3, 77, 16)
    w = 7.5
    loss = guided_diffusion_loss(unet, scheduler, latents, cond, uncond, w, torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(loss, list(unet.parameters()), allow_unused=True)

    # by hand: the same draws (noise, then timesteps), q(x_t | x_0), two separate U-Net calls
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (3,), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    eps_c = unet(x_t, t, encoder_hidden_states=cond).sample
    eps_u = unet(x_t, t, encoder_hidden_states=uncond).sample
    ref = ((noise - ((1 + w) * eps_c - w * eps_u)) ** 2).mean()
    ref_grads = torch.autograd.grad(ref, list(unet.parameters()), allow_unused=True)
    # the same float32 arithmetic in another grouping (one batched U-Net call against two): the loss agrees to a few
    # hundred ulps; a gradient entry sums many terms, so its rounding scales with the tensor's largest entries, not its
    # own size (entries near zero come from cancellation): the relative 1e-4 is also taken of the largest entry
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    # the unconditional branch is part of the gradient (as in the official code), and w = 0 is the plain loss
    assert any(b is not None and b.abs().sum() > 0 for b in ref_grads)
    plain = diffusion_loss(unet, scheduler, latents, cond, torch.Generator().manual_seed(5))
    torch.testing.assert_close(guided_diffusion_loss(unet, scheduler, latents, cond, uncond, 0.0,
                                                     torch.Generator().manual_seed(5)), plain)


def test_guided_and_conditional_saliency_masks_differ_and_are_recorded(erase_config, tmp_path):
    from salun_diffusers.erase import erase
    from salun_diffusers.masking import load_mask

    masks = {}
    for kind in ("guided", "conditional"):
        res = erase(erase_config(output_dir=str(tmp_path / kind), saliency_loss=kind, save_mask_only=True))
        masks[kind], meta = load_mask(res.mask_path)
        assert meta["saliency_loss"] == kind and float(meta["saliency_guidance_scale"]) == 7.5
    assert any(not torch.equal(masks["guided"][n], masks["conditional"][n]) for n in masks["guided"])
    assert EraseConfig(concept="seven").saliency_loss == "guided"  # the official loss is the default


def test_presets_carry_the_official_values_and_user_values_win():
    sd = dict(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4")
    nudity = EraseConfig(concept="nudity", **sd)
    assert (nudity.max_train_steps, nudity.train_batch_size, nudity.learning_rate, nudity.alpha,
            nudity.adam_weight_decay, nudity.max_grad_norm, nudity.num_forget_images) == (100, 8, 1e-5, 0.1, 0.0,
                                                                                            0.0, 800)
    church = EraseConfig(concept="church", **sd)  # Imagenette class 4: c' = the next class, french horn
    assert church.concept_spec().pseudo_prompts == ("an image of a french horn",)
    assert church.alpha == 0.5 and church.max_train_steps == 5 * 400 // 8
    assert EraseConfig(concept="parachute", **sd).concept_spec().pseudo_prompts == ("an image of a tench",)
    assert EraseConfig(concept="church", num_forget_images=160, **sd).max_train_steps == 5 * 20  # still 5 epochs
    mine = EraseConfig(concept="nudity", max_train_steps=7, adam_weight_decay=0.01, max_grad_norm=1.0, alpha=0.3,
                       learning_rate=2e-5, train_batch_size=4, pseudo_prompt=["a photo of a cat"], **sd)
    assert (mine.max_train_steps, mine.adam_weight_decay, mine.max_grad_norm, mine.alpha, mine.learning_rate,
            mine.train_batch_size, mine.concept_spec().pseudo_prompts) == (7, 0.01, 1.0, 0.3, 2e-5, 4,
                                                                          ("a photo of a cat",))
    assert EraseConfig(concept="nudity", num_train_epochs=3, **sd).max_train_steps == 300
    assert EraseConfig(concept="seven", num_train_epochs=2).max_train_steps == 2 * 64 // 16  # beats the preset
    assert EraseConfig(concept="seven", num_train_epochs=2, max_train_steps=9).max_train_steps == 9
    with pytest.raises(ValueError, match="num_train_epochs"):
        EraseConfig(concept="seven", num_train_epochs=0)


def test_augment_batch_crops_with_black_padding_and_flips():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5) + 1.0
    same = augment_batch(x, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert torch.equal(same, x)
    fill = torch.tensor([-7.0])
    gen = torch.Generator().manual_seed(0)
    seen_shift = False
    for _ in range(20):
        out = augment_batch(x, gen, padding=2, flip=False, fill=fill)
        assert out.shape == x.shape
        for i in range(2):
            padded = torch.full((9, 9), -7.0)
            padded[2:7, 2:7] = x[i, 0]
            windows = [padded[r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
            assert any(torch.equal(out[i, 0], wdw) for wdw in windows)  # a 5x5 window of the padded image
            seen_shift |= not torch.equal(out[i, 0], x[i, 0])
    assert seen_shift
    flips = [augment_batch(x, gen, padding=0, flip=True) for _ in range(20)]
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1)) for f in flips for i in range(2))
    assert any(torch.equal(f[0], x[0].flip(-1)) for f in flips) and any(torch.equal(f[0], x[0]) for f in flips)
    assert torch.equal(black_level(torch.tensor([[[[0.5, -0.4]]], [[[-0.1, 2.0]]]])), torch.tensor([-0.4]))
    assert MethodConfig().augment == "crop_flip" and MethodConfig().batch_size == 256
    with pytest.raises(ValueError, match="augment"):
        MethodConfig(augment="rotate")


def test_official_random_label_scheme_forget_pass_then_retain_pass():
    fx, fy = torch.full((10, 1, 2, 2), -1.0), torch.zeros(10, dtype=torch.long)
    rx, ry = torch.full((7, 1, 2, 2), 1.0), torch.arange(7) % 3 + 1
    gen = torch.Generator().manual_seed(0)
    batches = relabel_epoch((fx, fy), (rx, ry), MethodConfig(batch_size=4), 10, gen)
    kinds = [float(x[0, 0, 0, 0]) for x, _ in batches]
    assert kinds == [-1.0] * 3 + [1.0] * 2  # ceil(10/4) forget batches first, then ceil(7/4) retain batches
    assert all(bool((x == x[0, 0, 0, 0]).all()) for x, _ in batches)  # no batch mixes forget and retain samples
    retain_labels = torch.cat([y for x, y in batches[3:]])
    assert sorted(retain_labels.tolist()) == sorted(ry.tolist())  # true labels kept on the retain set
    second = relabel_epoch((fx, fy), (rx, ry), MethodConfig(batch_size=4), 10, gen)
    assert not torch.equal(torch.cat([y for _, y in batches[:3]]), torch.cat([y for _, y in second[:3]]))  # fresh
    drawn = random_labels(torch.zeros(5000, dtype=torch.long), 10, torch.Generator().manual_seed(1))
    counts = torch.bincount(drawn, minlength=10)
    assert counts.min() > 400 and counts[0] > 400  # uniform over all classes, the true one included
    mixed = relabel_epoch((fx, fy), (rx, ry), MethodConfig(batch_size=17, rl_scheme="mixed"), 10, gen)
    assert len(mixed) == 1 and (mixed[0][1][mixed[0][0][:, 0, 0, 0] < 0] != 0).all()  # wrong labels, one shuffle


def test_svc_membership_attack():
    def logits_with_confidence(conf, n):
        p = torch.full((n, 2), 0.0)
        p[:, 0] = torch.log(torch.as_tensor(conf))
        p[:, 1] = torch.log(1 - torch.as_tensor(conf))
        return p

    gen = torch.Generator().manual_seed(0)
    members = logits_with_confidence(0.97 + 0.02 * torch.rand(200, generator=gen), 200)
    nonmembers = logits_with_confidence(0.3 + 0.3 * torch.rand(200, generator=gen), 200)
    zeros = torch.zeros(200, dtype=torch.long)
    like_test = logits_with_confidence(0.35 + 0.2 * torch.rand(50, generator=gen), 50)
    like_train = logits_with_confidence(0.975 + 0.01 * torch.rand(50, generator=gen), 50)
    z50 = torch.zeros(50, dtype=torch.long)
    assert mia_efficacy(members, zeros, nonmembers, zeros, like_test, z50) == 100.0
    assert mia_efficacy(members, zeros, nonmembers, zeros, like_train, z50) == 0.0
    assert mia_efficacy(members, zeros, nonmembers, zeros, like_test, z50, attack="threshold") == 100.0
    with pytest.raises(ValueError, match="attack"):
        mia_efficacy(members, zeros, nonmembers, zeros, like_test, z50, attack="lira")


def test_evaluate_unlearning_uses_the_svc_attack_by_default():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(60, 1, 2, 2), torch.randint(0, 3, (60,))
    args = (model, x, y, torch.arange(10), torch.arange(10, 40), x[40:], y[40:])
    svc, thr = evaluate_unlearning(*args), evaluate_unlearning(*args, mia="threshold")
    assert set(svc) == {"UA", "RA", "TA", "MIA", "MIA_svc", "MIA_threshold"} and 0 <= svc["MIA"] <= 100
    assert svc["MIA"] == svc["MIA_svc"] and thr["MIA"] == thr["MIA_threshold"]
    assert {k: svc[k] for k in ("UA", "RA", "TA", "MIA_svc", "MIA_threshold")} == \
        {k: thr[k] for k in ("UA", "RA", "TA", "MIA_svc", "MIA_threshold")}
