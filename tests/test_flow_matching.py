"""Flow matching for SD3 / FLUX transformers (salun_diffusers.flow_matching) on tiny offline pipelines."""

import numpy as np
import pytest
import torch

from salun_diffusers.flow_matching import (
    compute_mu, encode_flow_prompts, flow_family, flow_matching_loss, image_seq_len, model_latents, noisy_latents,
    pack_flux_latents, pipeline_mu, predict_velocity, sample_sigmas, shift_sigmas, transformer_kwargs,
    unpack_flux_latents, velocity_target)
from salun_diffusers.testing import build_t5_tokenizer, get_flow_pipeline

PROMPT = "a photo of cat"
T5_LEN = 8


@pytest.fixture(scope="module")
def sd3():
    return get_flow_pipeline("sd3")


@pytest.fixture(scope="module", params=[False, True], ids=["flux-schnell-like", "flux-dev-like"])
def flux(request):
    return get_flow_pipeline("flux", guidance_embeds=request.param)


def test_noising_endpoints_and_zero_loss_at_exact_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    assert torch.equal(noisy_latents(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(noisy_latents(x0, noise, torch.ones(3)), noise)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    xt = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    # the velocity is d x_t / d sigma: an Euler step along it from sigma=1 to 0 lands on x0
    torch.testing.assert_close(noise - 1.0 * velocity_target(x0, noise), x0)
    assert flow_matching_loss(velocity_target(x0, noise), x0, noise).item() == 0.0
    per_sample = flow_matching_loss(torch.zeros_like(x0), x0, noise, reduction="none")
    torch.testing.assert_close(per_sample, (noise - x0).pow(2).flatten(1).mean(1))


def test_sigma_sampling_schemes_and_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    u = sample_sigmas(plain, 4096, generator=torch.Generator().manual_seed(0), scheme="uniform")
    torch.testing.assert_close(u, torch.rand(4096, generator=torch.Generator().manual_seed(0)))  # shift 1: identity
    ln = sample_sigmas(plain, 4096, generator=torch.Generator().manual_seed(0))
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.median().item() - 0.5) < 0.03  # logit-normal(0, 1): median 1/2
    shifted = sample_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 4096,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * ln / (1 + 2 * ln))  # same draws, SD3's shift pushes them to noise
    with pytest.raises(ValueError, match="sigma scheme"):
        sample_sigmas(plain, 2, scheme="beta")
    with pytest.raises(ValueError, match="mu"):
        sample_sigmas(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shift_matches_scheduler_set_timesteps(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(7)  # as StableDiffusion3Pipeline: shift(linspace(sigma_max, sigma_min)), not given sigmas
    ours = shift_sigmas(sched, torch.from_numpy(np.linspace(sched.sigma_max, sched.sigma_min, 7)))
    torch.testing.assert_close(ours.float(), sched.sigmas[:-1], atol=1e-6, rtol=0)
    if shift != 1.0:  # the shift moves every interior sigma towards noise
        assert (sched.sigmas[1:-1] > torch.linspace(sched.sigma_max, sched.sigma_min, 7)[1:].float()).all()


def test_pack_roundtrip_and_family():
    x = torch.randn(2, 4, 8, 6)
    packed = pack_flux_latents(x)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(unpack_flux_latents(packed, 8, 6), x)
    with pytest.raises(ValueError, match="even"):
        pack_flux_latents(torch.randn(1, 4, 7, 8))
    from salun_diffusers.testing import get_dummy_pipeline

    with pytest.raises(ValueError, match="SD3 or FLUX"):
        flow_family(get_dummy_pipeline())


def test_t5_tokenizer_built_offline(tmp_path):
    from transformers import T5TokenizerFast

    tok = build_t5_tokenizer(save_directory=str(tmp_path))
    assert T5TokenizerFast.from_pretrained(str(tmp_path))(PROMPT).input_ids == tok(PROMPT).input_ids
    ids = tok(["a photo of cat"], padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt")
    assert ids.input_ids.shape == (1, T5_LEN)
    assert ids.input_ids[0, 4].item() == tok.eos_token_id and ids.input_ids[0, -1].item() == tok.pad_token_id
    assert tok.unk_token_id not in ids.input_ids[0, :4].tolist()  # every word is in the vocabulary


def _capture_pipeline_calls(pipe, **call):
    """Run the pipeline and record the keyword arguments of every transformer call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), height=16, width=16, num_inference_steps=3,
             max_sequence_length=T5_LEN, output_type="latent", **call)
    finally:
        handle.remove()
    return calls


def _check_against_pipeline(pipe, calls, unpack, guidance_scale=None):
    cond = encode_flow_prompts(pipe, [PROMPT], max_sequence_length=T5_LEN)
    assert len(calls) == 3
    for step, seen in enumerate(calls):
        latents = unpack(seen["hidden_states"])
        sigma = pipe.scheduler.sigmas[step].reshape(1)  # the schedule the pipeline just used (shift / mu applied)
        ours = transformer_kwargs(pipe, latents, sigma, cond, guidance_scale=guidance_scale)
        for name, value in seen.items():
            if name in ("joint_attention_kwargs", "return_dict"):
                continue
            if value is None:
                assert ours[name] is None, name
            else:
                torch.testing.assert_close(ours[name], value, atol=1e-6, rtol=1e-6, msg=name)
        with torch.no_grad():
            expected = pipe.transformer(**seen)[0]
            got = predict_velocity(pipe, latents, sigma, cond, guidance_scale=guidance_scale)
        torch.testing.assert_close(pack_flux_latents(got) if unpack is not _identity else got, expected,
                                   atol=1e-6, rtol=1e-5)


def _identity(x):
    return x


def test_sd3_kwargs_match_pipeline_call(sd3):
    assert flow_family(sd3) == "sd3" and image_seq_len(sd3, 8, 8) == 16  # 2x2 patches
    assert pipeline_mu(sd3, 8, 8) is None  # static shift
    calls = _capture_pipeline_calls(sd3, guidance_scale=1.0)  # no CFG: one conditional call per step
    _check_against_pipeline(sd3, calls, _identity)
    # the shift (3.0, static) is what the pipeline's schedule used
    base = torch.from_numpy(np.linspace(sd3.scheduler.sigma_max, sd3.scheduler.sigma_min, 3))
    torch.testing.assert_close(shift_sigmas(sd3.scheduler, base).float(), sd3.scheduler.sigmas[:-1])


def test_flux_kwargs_match_pipeline_call(flux):
    distilled = flux.transformer.config.guidance_embeds
    calls = _capture_pipeline_calls(flux, guidance_scale=3.5)
    _check_against_pipeline(flux, calls, lambda packed: unpack_flux_latents(packed, 8, 8),
                            guidance_scale=3.5 if distilled else None)
    # the dynamic shift: mu from the packed sequence length (4x4 = 16 tokens), as FluxPipeline computes it
    mu = compute_mu(flux.scheduler, image_seq_len(flux, 8, 8))
    assert pipeline_mu(flux, 8, 8) == mu and image_seq_len(flux, 8, 8) == 16
    base = torch.from_numpy(np.linspace(1.0, 1 / 3, 3))
    torch.testing.assert_close(shift_sigmas(flux.scheduler, base, mu=mu).float(), flux.scheduler.sigmas[:-1])
    if distilled:
        with pytest.raises(ValueError, match="guidance_scale"):
            transformer_kwargs(flux, torch.zeros(1, 4, 8, 8), torch.ones(1),
                               encode_flow_prompts(flux, [PROMPT], max_sequence_length=T5_LEN))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_step_reaches_transformer_and_text_encoders(family):
    pipe = get_flow_pipeline(family)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    with torch.no_grad():
        x0 = model_latents(pipe.vae, pipe.vae.encode(images).latent_dist.mean)
    torch.testing.assert_close(x0, (pipe.vae.encode(images).latent_dist.mean - 0.1) * 1.5)
    noise = torch.randn(x0.shape, generator=gen)
    sigmas = sample_sigmas(pipe.scheduler, 2, generator=gen, mu=pipeline_mu(pipe, 8, 8))
    cond = encode_flow_prompts(pipe, [PROMPT, ""], max_sequence_length=T5_LEN)
    loss = flow_matching_loss(predict_velocity(pipe, noisy_latents(x0, noise, sigmas), sigmas, cond), x0, noise)
    loss.backward()
    assert loss.item() > 0
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), type(module).__name__
