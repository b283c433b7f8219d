"""SD 2.x (v-prediction) and SDXL (two text encoders, pooled text embeddings, time ids) through the whole SalUn path:
loading, conditioning, objectives, erasure, delta, loaders and the erased pipelines, on tiny config-built pipelines
(SD path, mechanical)."""

import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from salun_diffusers import load_mask
from salun_diffusers.config import EraseConfig
from salun_diffusers.erase import erase
from salun_diffusers.families import training_scheduler
from salun_diffusers.families import PromptCond, encode_prompts, load_base_pipeline, unet_kwargs
from salun_diffusers.loaders import load_erasure, unload_erasure
from salun_diffusers.objectives import diffusion_loss
from salun_diffusers.pipelines import StableDiffusionErasedPipeline, StableDiffusionXLErasedPipeline
from salun_diffusers.testing import save_dummy_pipeline

PIPELINE = {"sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
ERASED = {"sd2": StableDiffusionErasedPipeline, "sdxl": StableDiffusionXLErasedPipeline}
PROMPT = "a photo of a nude person"


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {fam: save_dummy_pipeline(str(root / fam), family=fam) for fam in ("sd2", "sdxl")}


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def erased(request, pipeline_dirs, tmp_path_factory):
    """One short erasure per family (AdamW weight decay > 0, so restoring the unmasked weights matters)."""
    family = request.param
    config = EraseConfig(pretrained_model_name_or_path=pipeline_dirs[family], concept="nudity",
                         output_dir=str(tmp_path_factory.mktemp(family) / "out"), num_forget_images=4,
                         num_retain_images=4, data_num_inference_steps=2, max_train_steps=3, train_batch_size=2,
                         learning_rate=1e-2, adam_weight_decay=0.1, mask_ratio=0.3, export_lora_rank=4)
    return family, config, erase(config)


def _params(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def _images(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    return pipe([PROMPT] * 2, num_inference_steps=3, generator=gens, output_type="np").images


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_base_loads_as_its_own_class_and_training_keeps_its_prediction_type(pipeline_dirs, family):
    pipe = load_base_pipeline(pipeline_dirs[family])
    assert type(pipe) is PIPELINE[family]
    expected = "v_prediction" if family == "sd2" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected
    assert training_scheduler(pipe).config.prediction_type == expected


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_training_conditioning_is_what_the_pipeline_samples_with(pipeline_dirs, family):
    """The U-Net sees the same conditioning in training as in sampling: with guidance, the pipeline's batch is
    [unconditional, prompt], which must equal ``embeds[""]`` and ``embeds[prompt]`` (SDXL: pooled text embeddings
    and time ids for the drawn size too)."""
    pipe = load_base_pipeline(pipeline_dirs[family])
    embeds = encode_prompts(pipe, [PROMPT], size=16)
    assert list(embeds) == [PROMPT, ""]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    pipe(PROMPT, num_inference_steps=1, height=16, width=16, guidance_scale=5.0, generator=torch.Generator())
    hook.remove()
    batch = PromptCond.stack([embeds[""], embeds[PROMPT]])
    torch.testing.assert_close(seen[0]["encoder_hidden_states"], batch.embeds, rtol=0, atol=0)
    if family == "sdxl":
        for key in ("text_embeds", "time_ids"):
            torch.testing.assert_close(seen[0]["added_cond_kwargs"][key].float(), batch.added[key], rtol=0, atol=0)
        assert embeds[PROMPT].added["time_ids"].tolist() == [16, 16, 0, 0, 16, 16]
        assert not embeds[""].embeds.any()  # force_zeros_for_empty_prompt
    else:
        assert embeds[PROMPT].added is None


def test_v_prediction_target_is_the_velocity(pipeline_dirs):
    pipe = load_base_pipeline(pipeline_dirs["sd2"])
    scheduler = training_scheduler(pipe)
    cond = encode_prompts(pipe, [PROMPT])[PROMPT].expand(3)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = diffusion_loss(pipe.unet, scheduler, latents, cond, torch.Generator().manual_seed(1))
    # the same draws by hand: v = sqrt(abar) * noise - sqrt(1 - abar) * x0 (Salimans & Ho 2022)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (3,), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    with torch.no_grad():
        pred = pipe.unet(noisy, t, **unet_kwargs(cond)).sample
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(loss, F.mse_loss(pred, velocity))
    assert abs(loss.item() - F.mse_loss(pred, noise).item()) > 1e-3  # not the epsilon target


def test_sdxl_added_conditioning_reaches_the_unet(pipeline_dirs):
    pipe = load_base_pipeline(pipeline_dirs["sdxl"])
    cond = encode_prompts(pipe, [PROMPT], size=16)[PROMPT].expand(2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    base = diffusion_loss(pipe.unet, pipe.scheduler, latents, cond, torch.Generator().manual_seed(1))
    for key in ("text_embeds", "time_ids"):
        other = PromptCond(cond.embeds, {**cond.added, key: cond.added[key] * 2})
        changed = diffusion_loss(pipe.unet, pipe.scheduler, latents, other, torch.Generator().manual_seed(1))
        assert changed.item() != base.item(), key


def test_erasure_changes_only_masked_weights(erased):
    family, config, result = erased
    assert result.metrics["final"]["loss"] == result.metrics["final"]["loss"]  # finite, ran to the end
    base = _params(load_base_pipeline(config.pretrained_model_name_or_path).unet)
    mask, _ = load_mask(result.mask_path)
    assert set(mask) == set(base)
    changed = 0
    for name, p in result.unet.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], base[name][~m]), name
        changed += int((p.detach()[m] != base[name][m]).sum())
    assert changed > 0.5 * sum(int(m.sum()) for m in mask.values())
    if family == "sdxl":  # the added-embedding layers are part of the erasure like any other weight
        assert any(n.startswith("add_embedding.") and mask[n].any() for n in mask)


def test_delta_round_trips_and_the_erased_pipeline_generates(erased):
    family, config, result = erased
    erased_params = _params(result.unet)
    pipe = load_base_pipeline(config.pretrained_model_name_or_path)
    base_params = _params(pipe.unet)
    base_images = _images(pipe)
    load_erasure(pipe, config.output_dir)
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in pipe.unet.named_parameters())
    erased_images = _images(pipe)
    assert not (erased_images == base_images).all()
    unload_erasure(pipe)
    assert all(torch.equal(p.detach(), base_params[n]) for n, p in pipe.unet.named_parameters())

    sub = ERASED[family].from_pretrained(config.output_dir)
    sub.set_progress_bar_config(disable=True)
    assert isinstance(sub, PIPELINE[family])
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in sub.unet.named_parameters())
    assert (_images(sub) == erased_images).all()
    sub.unload_erasure()
    assert (_images(sub) == base_images).all()

    # the output folder is a pipeline of the base's class, with the erased U-Net
    plain = DiffusionPipeline.from_pretrained(config.output_dir)
    assert type(plain) is PIPELINE[family]
    assert all(torch.equal(p.detach(), erased_params[n]) for n, p in plain.unet.named_parameters())

    wrong = ERASED["sdxl" if family == "sd2" else "sd2"]
    with pytest.raises(ValueError, match=ERASED[family].__name__):
        wrong.from_pretrained(config.pretrained_model_name_or_path, erasure=config.output_dir)


def test_card_audit_loader_and_lora_fit_the_family(erased, tmp_path):
    from salun_diffusers.evaluation.audit import AuditConfig, load_audit_pipeline

    family, config, result = erased
    card = open(os.path.join(config.output_dir, "README.md")).read()
    assert f"{PIPELINE[family].__name__}.from_pretrained" in card and ERASED[family].__name__ in card
    assert result.metrics["pipeline_class"] == PIPELINE[family].__name__

    prompts = tmp_path / "prompts.csv"
    prompts.write_text(f"prompt,evaluation_seed\n{PROMPT},1\n")
    audited = load_audit_pipeline(AuditConfig(output_dir=str(tmp_path / "audit"), erasure=config.output_dir,
                                              judge="none",
                                              pretrained_model_name_or_path=config.pretrained_model_name_or_path,
                                              prompts=str(prompts)))
    assert type(audited) is PIPELINE[family]
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(audited.unet.parameters(), result.unet.parameters()))

    pipe = load_base_pipeline(config.pretrained_model_name_or_path)
    cond = encode_prompts(pipe, [PROMPT], size=16)[PROMPT].expand(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_base = pipe.unet(x, 10, **unet_kwargs(cond)).sample
        pipe.load_lora_weights(config.output_dir, weight_name="pytorch_lora_weights.safetensors")
        out_lora = pipe.unet(x, 10, **unet_kwargs(cond)).sample
    assert result.metrics["lora"]["layers"] > 0 and not torch.equal(out_lora, out_base)


def test_presets_name_the_pipeline_classes_they_fit(pipeline_dirs, tmp_path):
    nudity = EraseConfig(pretrained_model_name_or_path=pipeline_dirs["sdxl"], concept="nudity").concept_spec()
    assert nudity.pipeline_classes == ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                                       "StableDiffusion3Pipeline", "FluxPipeline")
    config = EraseConfig(pretrained_model_name_or_path=pipeline_dirs["sdxl"], concept="seven",
                         output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert config.concept_spec().pipeline_classes == ("StableDiffusionPipeline", "StableDiffusion3Pipeline")
    with pytest.raises(ValueError, match="fits StableDiffusionPipeline or StableDiffusion3Pipeline, not "
                                         "StableDiffusionXLPipeline"):
        erase(config)
    drawn = [f for _, _, files in os.walk(config.cache_dir) for f in files if f.endswith(".png")]
    assert drawn == []  # refused before any image was drawn


@pytest.mark.parametrize("erased", ["sdxl"], indirect=True)  # the SD 1.x/2.x file: test_layout.py
def test_sdxl_community_pipeline_file_loads_with_custom_pipeline(erased):
    family, config, result = erased
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pipe = DiffusionPipeline.from_pretrained(
        config.pretrained_model_name_or_path, trust_remote_code=True,
        custom_pipeline=os.path.join(root, "pipelines", "pipeline_stable_diffusion_xl_erased.py"))
    assert type(pipe).__name__ == "StableDiffusionXLErasedPipeline" and isinstance(pipe, StableDiffusionXLPipeline)
    pipe.load_erasure(config.output_dir)
    erased_params = dict(result.unet.named_parameters())
    assert all(torch.equal(p.detach(), erased_params[n].detach()) for n, p in pipe.unet.named_parameters())


@pytest.mark.parametrize("name,parameters", [("sd21_unet_config.json", 865_910_724),
                                             ("sdxl_unet_config.json", 2_567_463_684)])
def test_benchmark_unet_configs_have_the_published_shapes(name, parameters):
    """benchmarks/configs: SD 2.1's and SDXL's U-Net configs (for bench_erase.py) build U-Nets of the published
    parameter counts (built on the meta device: no memory, no weights)."""
    import json

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs", name)
    with open(path) as f, init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.load(f))
    assert sum(p.numel() for p in unet.parameters()) == parameters
