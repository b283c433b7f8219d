"""Peer methods (salun_diffusers.methods): ESD, UCE, AdvUnlearn on tiny models from config."""

import copy

import pytest
import torch
import torch.nn.functional as F

from salun_diffusers.attacks import encode_prompt
from salun_diffusers.masking import MaskedUpdate, mask_density
from salun_diffusers.methods import (AdvUnlearnConfig, EsdConfig, UceConfig, advunlearn_loss, apply_uce,
                                     ddim_partial_sample, encode_with_prefix, erase_pairs, esd_loss, esd_mask,
                                     esd_sample, prefix_ids, retain_sample, soft_prompt_attack, text_encoder_mask,
                                     token_embeddings, train_advunlearn, train_esd, uce_closed_form, uce_edit, uce_mask,
                                     uce_projections)
from salun_diffusers.testing import get_dummy_pipeline


@pytest.fixture
def pipe():
    return get_dummy_pipeline()


def _state(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ------------------------------------------------------------------------------------------------------------ ESD
def test_esd_masks_follow_the_official_selection(pipe):
    names = [n for n, _ in pipe.unet.named_parameters()]
    x, u, full = (esd_mask(pipe.unet, v) for v in ("esd-x", "esd-u", "esd-full"))
    assert set(x) == set(u) == set(full) == set(names)  # every parameter named, as masking's format
    for n in names:
        assert bool(x[n].all()) == (".attn2." in n) and bool(x[n].any()) == bool(x[n].all())
        excluded = ".attn2." in n or n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))
        assert bool(u[n].all()) == (not excluded)
        assert bool(full[n].all())
    assert 0 < mask_density(x) < mask_density(u) < mask_density(full) == 1.0
    assert any(n.startswith("conv_in.") and bool(u[n].all()) for n in names)  # the input conv trains under esd-u
    with pytest.raises(ValueError, match="variant"):
        esd_mask(pipe.unet, "esd-q")


def test_esd_partial_sample_is_the_pipelines_own_sampling(pipe):
    """x_t after k steps equals the latents StableDiffusionPipeline itself has after k of its steps (same seed,
    guidance, scheduler); t is the pipeline's k-th timestep; the target is eps0 - eta (eps_c - eps0)."""
    steps, k, guidance, eta = 6, 3, 3.0, 1.5
    cond, uncond = pipe.encode_prompt("a photo of nude person", "cpu", 1, True, "")
    seen = {}

    def grab(p, i, t, kw):
        seen[i] = kw["latents"].clone()
        return kw
    pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=guidance,
         generator=torch.Generator().manual_seed(5), output_type="latent", callback_on_step_end=grab)
    sample = esd_sample(pipe.unet, pipe.scheduler, cond, uncond, negative_guidance=eta, start_guidance=guidance,
                        num_inference_steps=steps, generator=torch.Generator().manual_seed(5), step_index=k)
    torch.testing.assert_close(sample.x_t, seen[k - 1], rtol=0, atol=1e-6)
    pipe.scheduler.set_timesteps(steps)
    assert int(sample.t[0]) == int(pipe.scheduler.timesteps[k])
    with torch.no_grad():
        e0 = pipe.unet(sample.x_t, sample.t, encoder_hidden_states=uncond).sample
        ep = pipe.unet(sample.x_t, sample.t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(sample.target, e0 - eta * (ep - e0), rtol=1e-5, atol=1e-6)
    noise, t0 = ddim_partial_sample(pipe.unet, pipe.scheduler, cond, uncond, 0, num_inference_steps=steps,
                                    generator=torch.Generator().manual_seed(5))
    assert int(t0[0]) == int(pipe.scheduler.timesteps[0])  # step 0: pure noise at the first timestep


@pytest.mark.parametrize("variant", ["esd-x", "esd-u"])
def test_train_esd_moves_only_its_weights_and_lowers_the_loss(pipe, variant):
    base = copy.deepcopy(pipe.unet)
    cond = encode_prompt(pipe, "a photo of nude person")
    null = encode_prompt(pipe, "")
    before = _state(pipe.unet)
    fixed = [esd_sample(base, pipe.scheduler, cond, null, num_inference_steps=4,
                        generator=torch.Generator().manual_seed(s)) for s in range(6)]

    def mean_loss():
        with torch.no_grad():
            return sum(float(esd_loss(pipe.unet, s, cond)) for s in fixed) / len(fixed)
    start = mean_loss()
    config = EsdConfig(variant=variant, learning_rate=1e-4, iterations=40, num_inference_steps=4)
    losses = train_esd(pipe.unet, base, pipe.scheduler, cond, null, config, generator=torch.Generator().manual_seed(1))
    assert len(losses) == 40
    mask = esd_mask(pipe.unet, variant)
    after = _state(pipe.unet)
    for n, p in after.items():
        if bool(mask[n].any()):
            continue
        assert torch.equal(p, before[n]), f"{n} is outside {variant} but changed"
    assert any(not torch.equal(after[n], before[n]) for n in after if bool(mask[n].any()))
    assert mean_loss() < 0.8 * start
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), copy.deepcopy(base).parameters()))


def test_esd_config_checks_and_preset():
    assert EsdConfig.preset("sd14").learning_rate == 1e-5 and EsdConfig.preset("sd14").iterations == 1000
    # the digit world's preset: a per-variant learning rate, resolved for the variant asked for
    assert EsdConfig.preset("digits", variant="esd-u").learning_rate == 1e-4
    assert EsdConfig.preset("digits").iterations == 150 and EsdConfig.preset("digits", variant="esd-u").iterations == 300
    assert EsdConfig.preset("digits").learning_rate == 1e-3 and EsdConfig.preset("digits").num_inference_steps == 10
    assert EsdConfig.preset("digits", variant="esd-x", learning_rate=5e-4).learning_rate == 5e-4
    with pytest.raises(ValueError, match="no ESD preset"):
        EsdConfig.preset("sd99")
    for bad in ({"variant": "x"}, {"learning_rate": 0.0}, {"negative_guidance": float("nan")}, {"iterations": 0}):
        with pytest.raises(ValueError):
            EsdConfig(**bad)


# ------------------------------------------------------------------------------------------------------------ UCE
def _lstsq_solution(w, c_e, v_e, c_p, lamb, es, ps):
    """argmin lamb||W'-W||^2 + es sum||W'c_i - v_i||^2 + ps sum||W'c_j - W c_j||^2, as one stacked least squares."""
    d = w.shape[1]
    a = torch.cat([lamb ** 0.5 * torch.eye(d, dtype=torch.float64), es ** 0.5 * c_e, ps ** 0.5 * c_p])
    b = torch.cat([lamb ** 0.5 * w.T, es ** 0.5 * v_e, ps ** 0.5 * (c_p @ w.T)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T


def test_uce_closed_form_equals_a_direct_least_squares_solve(pipe):
    """Every edited projection of the tiny U-Net equals lstsq of the stacked weighted objective, float64 precision."""
    config = UceConfig(lamb=0.5, erase_scale=1.0, preserve_scale=0.1)
    erase, guide, keep = ["nude person", "naked"], ["person wearing clothes", ""], ["a photo of cat", "dog", ""]
    new = uce_edit(pipe.unet, pipe.tokenizer, pipe.text_encoder, erase, guide, keep, config)
    projections = uce_projections(pipe.unet)
    assert set(new) == set(projections) and len(new) == 8  # to_k and to_v of 4 cross-attention layers
    with torch.no_grad():
        pairs = erase_pairs(pipe.tokenizer, pipe.text_encoder, erase, guide)
        hidden, _ = token_embeddings(pipe.tokenizer, pipe.text_encoder, keep)
    c_e = torch.cat([c for c, _ in pairs]).double()
    g_e = torch.cat([g for _, g in pairs]).double()
    c_p = hidden.reshape(-1, hidden.shape[-1]).double()
    for name, layer in projections.items():
        w = layer.weight.detach().double()
        direct = _lstsq_solution(w, c_e, g_e @ w.T, c_p, 0.5, 1.0, 0.1)
        ours = uce_closed_form(w, c_e, g_e @ w.T, c_p, lamb=0.5, erase_scale=1.0, preserve_scale=0.1)
        # both solve the same well-conditioned normal equations (lamb I keeps it so): agreement to ~1e-13 relative
        assert (ours - direct).abs().max() <= 1e-10 * direct.abs().max(), name
        torch.testing.assert_close(new[name], ours.float(), rtol=0, atol=1e-6)  # written in the weight's dtype


def test_uce_extra_erase_rows_are_erased_pairs(pipe):
    """``extra_erase`` rows join the prompts' pairs: a prompt's own pair given as extra rows equals erasing it twice."""
    with torch.no_grad():
        (c, g), = erase_pairs(pipe.tokenizer, pipe.text_encoder, ["nude person"], ["person wearing clothes"])
    args = (pipe.unet, pipe.tokenizer, pipe.text_encoder)
    twice = uce_edit(*args, ["nude person"] * 2, ["person wearing clothes"] * 2, ["dog"])
    extra = uce_edit(*args, ["nude person"], ["person wearing clothes"], ["dog"], extra_erase=(c, g))
    assert all(torch.equal(twice[n], extra[n]) for n in twice) and len(twice) == 8


def _uce_moves(pipe, config):
    """(erased gap of the concept's word token, erased gap of all its rows, preserved rows' relative move) per edited
    projection, after the edit; gaps relative to the base projection's."""
    erase, guide, keep = ["nude person"], ["person wearing clothes"], ["a photo of cat", "dog", "church"]
    with torch.no_grad():
        (c, g), = erase_pairs(pipe.tokenizer, pipe.text_encoder, erase, guide)
        hidden, _ = token_embeddings(pipe.tokenizer, pipe.text_encoder, keep)
    c_p = hidden.reshape(-1, hidden.shape[-1])
    new = uce_edit(pipe.unet, pipe.tokenizer, pipe.text_encoder, erase, guide, keep, config)
    out = {}
    for n, layer in uce_projections(pipe.unet).items():
        w, w2 = layer.weight.detach(), new[n]
        gap = lambda rows, m: float((rows[0] @ m.T - rows[1] @ w.T).norm() / (rows[0] @ w.T - rows[1] @ w.T).norm())
        out[n] = (gap((c[:1], g[:1]), w2), gap((c, g), w2), float((c_p @ (w2 - w).T).norm() / (c_p @ w.T).norm()))
    return new, out


def test_uce_maps_erased_tokens_to_the_guide_and_keeps_preserved_ones(pipe):
    """Official weights (lamb 0.5, erase 1, preserve 0.1). On this 16-dimensional text encoder the erased prompt's
    75 rows (word, end token, padding) and the preserved prompts' 231 rows share one small space, so the edit is a
    trade-off rather than exact (SD's 768 dimensions leave room): the word token's gap to the guide falls to 0.36-0.51
    of the base's, all erased rows' to ~0.7, the preserved outputs move ~7%; raising a scale moves its side."""
    new, moves = _uce_moves(pipe, UceConfig())
    before = _state(pipe.unet)
    apply_uce(pipe.unet, new)
    mask = uce_mask(pipe.unet)
    for n, p in _state(pipe.unet).items():
        assert torch.equal(p, before[n]) != bool(mask[n].all()), n  # exactly the k/v projections changed
    for n, (word, rows, kept) in moves.items():
        assert word < 0.65 and rows < 0.85 and kept < 0.15, (n, word, rows, kept)
    pipe = get_dummy_pipeline()
    _, keep_more = _uce_moves(pipe, UceConfig(preserve_scale=1.0))
    _, erase_more = _uce_moves(pipe, UceConfig(erase_scale=10.0))
    for n, (word, rows, kept) in moves.items():
        assert keep_more[n][2] < kept and keep_more[n][1] > rows  # preserve more: preserved move less, erased less
        assert erase_more[n][1] < rows and erase_more[n][2] > kept  # erase more: the other way round


# ----------------------------------------------------------------------------------------------------- AdvUnlearn
def test_text_encoder_mask_and_prefix_ids(pipe):
    mask = text_encoder_mask(pipe.text_encoder)
    for n, m in mask.items():
        trains = ".layers." in n or "final_layer_norm" in n
        assert bool(m.all()) == trains and bool(m.any()) == trains, n
    ids = prefix_ids(pipe.tokenizer, "nude person", 2)
    plain = pipe.tokenizer("nude person", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == pipe.tokenizer.bos_token_id
    assert torch.equal(ids[0, 3:5], plain[0, 1:3])  # the prompt's tokens after the 2 slots
    assert torch.equal(prefix_ids(pipe.tokenizer, "nude person", 0), plain)


def test_soft_prompt_attack_lowers_its_loss_and_leaves_the_models(pipe):
    cond, null = encode_prompt(pipe, "a photo of nude person"), encode_prompt(pipe, "")
    fixed = esd_sample(pipe.unet, pipe.scheduler, cond, null, num_inference_steps=4,
                       generator=torch.Generator().manual_seed(0))
    ids = prefix_ids(pipe.tokenizer, "a photo of nude person", 1)
    init = pipe.text_encoder.get_input_embeddings().weight[5:6].detach().clone()

    def loss(prefix):
        with torch.no_grad():
            pred = pipe.unet(fixed.x_t, fixed.t, encoder_hidden_states=encode_with_prefix(pipe.text_encoder, ids,
                                                                                          prefix)).sample
        return float(F.mse_loss(pred, fixed.eps_concept))
    unet_before, te_before = _state(pipe.unet), _state(pipe.text_encoder)
    adv = soft_prompt_attack(pipe.unet, pipe.text_encoder, ids, init, lambda: fixed, steps=30, lr=1e-3)
    assert adv.shape == init.shape and loss(adv) < loss(init)
    assert all(torch.equal(p, unet_before[n]) for n, p in pipe.unet.named_parameters())
    assert all(torch.equal(p, te_before[n]) and p.grad is None for n, p in pipe.text_encoder.named_parameters())


def test_one_advunlearn_step_changes_only_the_text_encoder_and_lowers_the_loss(pipe):
    unet, te = pipe.unet.requires_grad_(False), pipe.text_encoder
    prompt, retain = "a photo of nude person", ["a photo of cat", "dog"]
    cond, null = encode_prompt(pipe, prompt), encode_prompt(pipe, "")
    sample = esd_sample(unet, pipe.scheduler, cond, null, num_inference_steps=4,
                        generator=torch.Generator().manual_seed(0), step_index=2)
    r_ids = torch.cat([prefix_ids(pipe.tokenizer, p, 0) for p in retain])
    r_embeds = torch.cat([encode_prompt(pipe, p) for p in retain])
    kept = retain_sample(unet, pipe.scheduler, r_ids, r_embeds, null, 2, num_inference_steps=4,
                         generator=torch.Generator().manual_seed(1))
    ids = prefix_ids(pipe.tokenizer, prompt, 1)
    prefix = te.get_input_embeddings().weight[7:8].detach().clone()
    unet_before, te_before = _state(unet), _state(te)
    mask = text_encoder_mask(te)
    guard = MaskedUpdate(te, mask)
    opt = torch.optim.Adam(guard.trainable_parameters(), lr=1e-4)
    start, _, _ = advunlearn_loss(unet, te, ids, prefix, sample, kept, 0.3)
    start.backward()
    guard.mask_gradients()
    opt.step()
    guard.restore()
    guard.remove_hooks()
    with torch.no_grad():
        end, _, _ = advunlearn_loss(unet, te, ids, prefix, sample, kept, 0.3)
    assert float(end) < float(start.detach())
    assert all(torch.equal(p, unet_before[n]) for n, p in unet.named_parameters())
    after = _state(te)
    for n, p in after.items():
        assert torch.equal(p, te_before[n]) != bool(mask[n].all()), n  # layers moved, embeddings did not


def test_train_advunlearn_runs_warmup_then_attacks_and_trains_only_the_text_encoder(pipe):
    unet_before, te_before = _state(pipe.unet), _state(pipe.text_encoder)
    config = AdvUnlearnConfig(iterations=3, warmup=1, attack_steps=2, learning_rate=1e-3, attack_lr=1e-2,
                              num_inference_steps=3, retain_batch=2)
    history = train_advunlearn(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, "a photo of nude person",
                               ["a photo of cat", "dog", "church"], config, generator=torch.Generator().manual_seed(0))
    assert len(history["loss"]) == 3
    assert history["retain"][0] == 0 < history["retain"][-1]  # zero until the text encoder has moved
    assert all(torch.equal(p, unet_before[n]) for n, p in pipe.unet.named_parameters())
    assert any(not torch.equal(p, te_before[n]) for n, p in pipe.text_encoder.named_parameters())
    with pytest.raises(ValueError, match="target_latents"):
        train_advunlearn(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, "x", [],
                         AdvUnlearnConfig(inner_attack="token"))
