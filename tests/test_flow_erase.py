"""SalUn on the flow-matching transformers (SD3, FLUX; issue 20) through the whole path on tiny config-built pipelines
(mechanical): the family object (conditioning = what the pipeline feeds its transformer, velocity target), erasure
end to end with the weights outside the mask bit-identical, the sealed erasure loading and unloading bit-exactly onto
``pipe.transformer``, the output folder as a plain ``StableDiffusion3Pipeline`` / ``FluxPipeline``, the LoRA export,
resume exactness, the model card, and the guarantees the U-Net families have (seal, lock, one-line refusals)."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

from salun_diffusers import load_mask
from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.families import FlowFamily, PromptCond, denoiser, load_base_pipeline, model_family
from salun_diffusers.flow_matching import velocity_target
from salun_diffusers.loaders import load_erasure, unload_erasure
from salun_diffusers.objectives import diffusion_loss
from salun_diffusers.testing import drop_final_outputs, save_flow_pipeline

PIPELINE = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "flux-dev": FluxPipeline}
PROMPT = "a photo of a nude person"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": save_flow_pipeline(str(root / "sd3"), "sd3"),
            "flux": save_flow_pipeline(str(root / "flux"), "flux"),
            "flux-dev": save_flow_pipeline(str(root / "flux-dev"), "flux", guidance_embeds=True)}


def flow_config(path, out, cache, **kw):
    args = dict(pretrained_model_name_or_path=path, concept="nudity", output_dir=str(out), cache_dir=str(cache),
                num_forget_images=4, num_retain_images=4, data_num_inference_steps=2, max_train_steps=3,
                train_batch_size=2, learning_rate=1e-2, adam_weight_decay=0.1, mask_ratio=0.3, resolution=16,
                seed=0)
    args.update(kw)
    return EraseConfig(**args)


@pytest.fixture(scope="module", params=["sd3", "flux-dev"])
def erased(request, flow_dirs, tmp_path_factory):
    """One short erasure per family (weight decay > 0, so restoring the unmasked weights matters)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    config = flow_config(flow_dirs[family], root / "out", root / "cache", export_lora_rank=4)
    return family, config, erase(config)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _images(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    return pipe([PROMPT] * 2, num_inference_steps=2, height=16, width=16, generator=gens, output_type="np").images


@pytest.mark.parametrize("family", ["sd3", "flux", "flux-dev"])
def test_training_conditioning_and_call_are_what_the_pipeline_feeds_its_transformer(flow_dirs, family):
    """The family's prompt conditioning and transformer call equal the pipeline's own, at a sigma of its schedule."""
    pipe = load_base_pipeline(flow_dirs[family])
    fam = model_family(pipe)
    assert isinstance(fam, FlowFamily) and denoiser(pipe) is pipe.transformer
    embeds = fam.encode_prompts([PROMPT], 16)
    assert list(embeds) == [PROMPT, ""]
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out[0])), with_kwargs=True)
    pipe(PROMPT, num_inference_steps=2, height=16, width=16, guidance_scale=3.0, generator=torch.Generator(),
         output_type="latent")
    hook.remove()
    kw, out = seen[0]
    x = kw["hidden_states"]
    if family == "sd3":  # classifier-free guidance outside the transformer: batch [negative "", prompt]
        cond = PromptCond.stack([embeds[""], embeds[PROMPT]])
        sigma = kw["timestep"] / 1000
    else:
        from salun_diffusers.flow_matching import unpack_flux_latents
        cond, sigma = embeds[PROMPT].expand(1), kw["timestep"]
        x, out = unpack_flux_latents(x, 8, 8), unpack_flux_latents(out, 8, 8)
        assert not kw["txt_ids"].any()
        if family == "flux-dev":  # the distilled guidance is an input of the transformer
            assert kw["guidance"].tolist() == [3.0]
            fam.guidance_scale = 3.0
        else:
            assert kw["guidance"] is None
    # the conditioning is exactly the pipeline's (CLIP + T5 hidden states, pooled CLIP)
    assert torch.equal(kw["encoder_hidden_states"], cond.embeds)
    assert torch.equal(kw["pooled_projections"], cond.added["pooled_projections"])
    with torch.no_grad():
        mine = fam.predict(pipe.transformer, x, sigma, cond)
    # the same call up to the timestep's float32 round trip through the pipeline's sigma * 1000 (a few ulps)
    torch.testing.assert_close(mine, out, rtol=0, atol=1e-5 * out.abs().max().item())


def test_flow_loss_is_the_velocity_mse_at_shifted_sigmas(flow_dirs):
    pipe = load_base_pipeline(flow_dirs["sd3"])
    fam = model_family(pipe)
    cond = fam.encode_prompts([PROMPT])[PROMPT].expand(3)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = diffusion_loss(pipe.transformer, fam, latents, cond, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws by hand: noise, logit-normal u, SD3's static shift 3
    noise = torch.randn(latents.shape, generator=g)
    u = torch.sigmoid(torch.randn(3, generator=g))
    sigma = 3 * u / (1 + 2 * u)
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        pred = pipe.transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                                pooled_projections=cond.added["pooled_projections"]).sample
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, velocity_target(latents, noise)))


def test_erasure_changes_only_masked_transformer_weights(erased):
    family, config, result = erased
    assert result.metrics["pipeline_class"] == PIPELINE[family].__name__
    base = _params(load_base_pipeline(config.pretrained_model_name_or_path).transformer)
    mask, _ = load_mask(result.mask_path)
    assert set(mask) == set(base)
    changed = 0
    for name, p in result.unet.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], base[name][~m]), name
        changed += int((p.detach()[m] != base[name][m]).sum())
    assert changed > 0.5 * sum(int(m.sum()) for m in mask.values())
    # the saliency covers every weight: the text stream of the joint attention, and the guidance embedding of a
    # guidance-distilled model
    assert any(".add_q_proj." in n for n in mask)
    assert any("guidance_embedder" in n for n in mask) == (family == "flux-dev")


def test_erasure_loads_unloads_bit_exactly_and_the_output_is_a_plain_pipeline(erased):
    family, config, result = erased
    erased_params = _params(result.unet)
    pipe = load_base_pipeline(config.pretrained_model_name_or_path)
    base_params = _params(pipe.transformer)
    base_images = _images(pipe)
    load_erasure(pipe, config.output_dir)
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in pipe.transformer.named_parameters())
    erased_images = _images(pipe)
    assert not (erased_images == base_images).all()
    unload_erasure(pipe)
    assert all(torch.equal(p.detach(), base_params[n]) for n, p in pipe.transformer.named_parameters())
    assert (_images(pipe) == base_images).all()

    # (an SD3 base without T5, as the tiny one and the digit world are, names it absent, as its base needs too)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    plain = PIPELINE[family].from_pretrained(config.output_dir, **no_t5)
    plain.set_progress_bar_config(disable=True)
    assert type(plain) is PIPELINE[family] and not os.path.exists(os.path.join(config.output_dir, "unet"))
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in plain.transformer.named_parameters())
    assert (_images(plain) == erased_images).all()

    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert "flow-matching transformer" in card and f"{PIPELINE[family].__name__}.from_pretrained" in card


def test_lora_export_loads_with_load_lora_weights(erased):
    family, config, result = erased
    pipe = load_base_pipeline(config.pretrained_model_name_or_path)
    fam = model_family(pipe, config)
    cond = fam.encode_prompts([PROMPT])[PROMPT].expand(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        out_base = fam.predict(pipe.transformer, x, sigma, cond)
        out_erased = fam.predict(result.unet, x, sigma, cond)
        pipe.load_lora_weights(config.output_dir, weight_name="pytorch_lora_weights.safetensors")
        out_lora = fam.predict(pipe.transformer, x, sigma, cond)
    assert result.metrics["lora"]["layers"] > 0 and not torch.equal(out_lora, out_base)
    # the LoRA moves the output towards the erased transformer's (an SVD approximation of the delta)
    assert (out_lora - out_erased).norm() < (out_base - out_erased).norm()


def test_a_tampered_erasure_is_refused_before_any_weight_changes(erased, tmp_path):
    family, config, _ = erased
    tensors = load_file(os.path.join(config.output_dir, "erasure.safetensors"))
    from safetensors import safe_open

    with safe_open(os.path.join(config.output_dir, "erasure.safetensors"), "pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    pipe = load_base_pipeline(config.pretrained_model_name_or_path)
    before = _params(pipe.transformer)
    with pytest.raises(ValueError, match="sha256|seal"):
        load_erasure(pipe, str(tmp_path / "bad.safetensors"))
    assert all(torch.equal(p.detach(), before[n]) for n, p in pipe.transformer.named_parameters())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(flow_dirs, family, tmp_path):
    kw = dict(max_train_steps=4)
    full = erase(flow_config(flow_dirs[family], tmp_path / "full", tmp_path / "cache", **kw))
    cfg = flow_config(flow_dirs[family], tmp_path / "resumed", tmp_path / "cache", checkpointing_steps=2, **kw)
    erase(cfg)
    drop_final_outputs(cfg.output_dir, "transformer")  # killed after step 2
    resumed = erase(flow_config(flow_dirs[family], cfg.output_dir, tmp_path / "cache",
                                resume_from_checkpoint="latest", **kw))
    a, b = dict(full.unet.named_parameters()), dict(resumed.unet.named_parameters())
    assert all(torch.equal(a[n].detach(), b[n].detach()) for n in a)


ADV = dict(adversarial=True, adversarial_every=3, adversarial_steps=2, adversarial_lr=0.05, max_train_steps=4)


@pytest.mark.parametrize("family, attack", [("sd3", "conditioning"), ("sd3", "token"), ("flux", "conditioning")])
def test_adversarial_erasure_of_the_flow_families(flow_dirs, family, attack, tmp_path):
    """``--adversarial`` end to end: the weights outside the mask stay bit-identical, the inner attack changes the
    erasure, the checkpoint carries the bank (hidden states and pooled embeddings), a resumed run equals an
    uninterrupted one bit for bit (attacks on steps 0 and 3; the checkpoint at step 2 holds step 0's bank)."""
    kw = dict(ADV, adversarial_attack=attack)
    full = erase(flow_config(flow_dirs[family], tmp_path / "full", tmp_path / "cache", **kw))
    base = _params(load_base_pipeline(flow_dirs[family]).transformer)
    mask, _ = load_mask(full.mask_path)
    changed = 0
    for name, p in full.unet.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], base[name][~m]), name
        changed += int((p.detach()[m] != base[name][m]).sum())
    assert changed > 0.5 * sum(int(m.sum()) for m in mask.values())
    plain = erase(flow_config(flow_dirs[family], tmp_path / "plain", tmp_path / "cache", max_train_steps=4))
    assert any(not torch.equal(p.detach(), q.detach())
               for p, q in zip(plain.unet.parameters(), full.unet.parameters()))

    cfg = flow_config(flow_dirs[family], tmp_path / "resumed", tmp_path / "cache", checkpointing_steps=2, **kw)
    erase(cfg)
    bank = torch.load(os.path.join(cfg.output_dir, "checkpoint-2", "custom_checkpoint_0.pkl"), weights_only=False)
    assert set(bank) == {"bank", "pooled"} and bank["bank"].shape[0] == bank["pooled"].shape[0] == 4
    fam = model_family(load_base_pipeline(flow_dirs[family]), cfg)
    start = fam.encode_prompts([cfg.concept_spec().concepts[0].forget_prompt], 16)
    start = next(iter(start.values()))
    if attack == "conditioning":  # step 0 attacked some forget images: their entries moved off the forget prompt's
        assert not torch.equal(bank["pooled"], start.added["pooled_projections"].float().expand_as(bank["pooled"]))
    drop_final_outputs(cfg.output_dir, "transformer")  # killed after step 2
    resumed = erase(flow_config(flow_dirs[family], cfg.output_dir, tmp_path / "cache",
                                resume_from_checkpoint="latest", **kw))
    a, b = dict(full.unet.named_parameters()), dict(resumed.unet.named_parameters())
    assert all(torch.equal(a[n].detach(), b[n].detach()) for n in a)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guarantees_hold_for_the_flow_families(flow_dirs, family, tmp_path):
    """An existing erasure is never overwritten, a locked folder is refused; FLUX: ``--adversarial_attack token`` is
    refused in one line with exit code 2 before any image is drawn."""
    from salun_diffusers.erasure.outputs import output_lock

    out = tmp_path / "out"
    cfg = flow_config(flow_dirs[family], out, tmp_path / "cache", max_train_steps=1)
    erase(cfg)
    assert os.path.isdir(out / "transformer")
    with pytest.raises(FileExistsError, match="transformer"):
        erase(flow_config(flow_dirs[family], out, tmp_path / "cache", max_train_steps=1))
    with output_lock(str(tmp_path / "locked")):
        with pytest.raises(Exception, match="in use|lock"):
            erase(flow_config(flow_dirs[family], tmp_path / "locked", tmp_path / "cache", max_train_steps=1))
    env = {**os.environ, "PYTHONPATH": ROOT}
    if family == "flux":  # the token attack types CLIP words, and FLUX's prompt hidden states come from T5
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_erase.py"), "--pretrained_model_name_or_path",
                               flow_dirs[family], "--concept", "nudity", "--output_dir", str(tmp_path / "adv"),
                               "--cache_dir", str(tmp_path / "cache2"), "--adversarial", "--adversarial_attack",
                               "token", "--resolution", "16"], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "--adversarial_attack token fits" in last and "--adversarial_attack conditioning" in last \
            and "T5" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not os.path.exists(tmp_path / "cache2") or not any(
            f.endswith(".png") for _, _, files in os.walk(tmp_path / "cache2") for f in files)
    # salun-attack refuses what these families cannot take in one line too (concept inversion learns one CLIP
    # token embedding; tests/test_flow_attacks.py runs the attacks they can)
    proc = subprocess.run([sys.executable, "-m", "salun_diffusers.attacks.cli", "--model", flow_dirs[family],
                           "--digit", "7", "--attack", "inversion", "--output_dir", str(tmp_path / "attack")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "inversion attack does not fit" in proc.stderr.strip().splitlines()[-1], \
        proc.stderr[-2000:]


def test_the_sd3_digit_world_is_a_bundled_model_with_its_own_preset_and_t5_length():
    from salun_diffusers.digits import DIGIT_SD3_PIPELINE_DIR, SD3_DIGIT_SAMPLING, digit_sampling
    from salun_diffusers.hub import resolve_base_model

    assert resolve_base_model("salun-diffusers/digit-sd3") == DIGIT_SD3_PIPELINE_DIR
    config = EraseConfig(concept="seven", pretrained_model_name_or_path="salun-diffusers/digit-sd3", output_dir="x")
    assert config.max_train_steps == 50 and config.alpha == 4.0  # the SD3 world's digit preset
    assert config.concept_spec().retain_prompts[-1] == "" and len(config.concept_spec().retain_prompts) == 10
    unet_world = EraseConfig(concept="seven", output_dir="x")
    assert unet_world.max_train_steps == 100 and unet_world.retain_prompt is None  # the U-Net world's, unchanged
    pipe = load_base_pipeline(DIGIT_SD3_PIPELINE_DIR)
    assert type(pipe) is StableDiffusion3Pipeline and pipe.text_encoder_3 is None
    family = model_family(pipe, config)
    assert family.sampling_kwargs() == {"max_sequence_length": 8} and digit_sampling(pipe) == SD3_DIGIT_SAMPLING
    length = pipe.tokenizer.model_max_length + 8  # CLIP tokens, then the T5 length the world was trained with
    assert family.encode_prompts(["a handwritten digit seven"])[""].embeds.shape[0] == length


def test_adversarial_fits_sd_sd3_and_flux_not_sdxl_nor_the_token_attack_on_flux():
    from salun_diffusers.erasure.adversarial import check_adversarial_fits
    from salun_diffusers.testing import get_dummy_pipeline, get_flow_pipeline

    cond, token = (EraseConfig(output_dir="x", adversarial=True, adversarial_attack=a) for a in ("conditioning", "token"))
    for pipe in (get_dummy_pipeline(), get_flow_pipeline("sd3")):
        check_adversarial_fits(pipe, cond)
        check_adversarial_fits(pipe, token)
    flux = get_flow_pipeline("flux")
    check_adversarial_fits(flux, cond)
    with pytest.raises(ValueError, match="--adversarial_attack token fits StableDiffusionPipeline or "
                                         "StableDiffusion3Pipeline, not FluxPipeline; use --adversarial_attack "
                                         "conditioning"):
        check_adversarial_fits(flux, token)
    with pytest.raises(ValueError, match="--adversarial fits .* not StableDiffusionXLPipeline; drop --adversarial"):
        check_adversarial_fits(get_dummy_pipeline(family="sdxl"), cond)
