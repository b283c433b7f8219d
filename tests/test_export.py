"""Single-file export (original SD layout) and the kohya-layout LoRA, read back by diffusers' own loaders
(``from_single_file``, ``load_lora_weights``): the bundled digit model (SD 1.x, real weights) and tiny SD 2.x / SDXL
pipelines (SD path, mechanical)."""

import copy
import os
import types

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection

from salun_diffusers import export
from salun_diffusers.export import KOHYA_LORA_NAME, save_kohya_lora, save_single_file, unet_to_original
from salun_diffusers.families import load_base_pipeline
from salun_diffusers.lora import delta_to_lora, save_lora
from salun_diffusers.testing import _text_config, get_dummy_components, save_dummy_pipeline

DIGIT_SD = os.path.join(os.path.dirname(export.__file__), "assets", "digit-sd")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
LOADER = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def _save_tiny_sdxl(path):
    """A tiny SDXL whose two text encoders differ in width (8 and 12), as SD-XL's (768, 1280) do: diffusers'
    single-file loader tells the encoders apart by their position-embedding width, so equal widths would load the
    first encoder's weights into both."""
    c = get_dummy_components(family="sdxl")
    h1, h2, t = 8, 12, 4
    torch.manual_seed(0)
    c["unet"] = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=h1 + h2, norm_num_groups=4, attention_head_dim=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=t, projection_class_embeddings_input_dim=6 * t + h2)
    torch.manual_seed(1)
    c["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(c["tokenizer"], h2, hidden_act="gelu",
                                                                   projection_dim=h2))
    StableDiffusionXLPipeline(**c).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-sources")
    return {"sd1": DIGIT_SD, "sd2": save_dummy_pipeline(str(root / "sd2"), family="sd2"),
            "sdxl": _save_tiny_sdxl(str(root / "sdxl"))}


def _perturbed(source):
    """The source pipeline with every weight moved (as an erasure would move some): what comes back from the file
    then cannot have come from the config folder."""
    pipe = load_base_pipeline(source)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in COMPONENTS:
            module = getattr(pipe, name, None)
            for p in [] if module is None else module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return pipe


def _states(pipe):
    return {n: getattr(pipe, n).state_dict() for n in COMPONENTS if getattr(pipe, n, None) is not None}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("half", [False, True])
def test_from_single_file_reads_back_every_weight_bit_identical(sources, family, half, tmp_path):
    pipe = _perturbed(sources[family])
    path = save_single_file(pipe, str(tmp_path / "erased.safetensors"), half=half)
    dtype = torch.float16 if half else torch.float32
    loaded = LOADER[family].from_single_file(path, config=sources[family], torch_dtype=dtype)
    original, source, back = _states(pipe), _states(load_base_pipeline(sources[family])), _states(loaded)
    assert set(back) == set(original) == ({"unet", "vae", "text_encoder", "text_encoder_2"} if family == "sdxl"
                                          else {"unet", "vae", "text_encoder"})
    for name, state in original.items():
        assert set(back[name]) == set(state), name
        for key, value in state.items():
            expected = value.to(dtype) if value.is_floating_point() else value
            assert torch.equal(back[name][key], expected), f"{name}.{key}"
        # the weights came from the file, not from the config folder
        assert any(not torch.equal(back[name][k].float(), source[name][k].float()) for k in state if
                   state[k].is_floating_point())
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16" if half else "F32"}
        assert f.metadata()["salun_diffusers.family"] == family
    # the original layout's landmarks, the keys the UIs detect the model type by
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"} <= set(keys)
    text_key = {"sd1": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                "sdxl": "conditioner.embedders.1.model.text_projection"}[family]
    assert text_key in keys


def test_single_file_from_a_folder_and_refusals(sources, tmp_path):
    path = str(tmp_path / "digit.safetensors")
    save_single_file(DIGIT_SD, path)
    loaded = StableDiffusionPipeline.from_single_file(path, config=DIGIT_SD)
    source = load_base_pipeline(DIGIT_SD)
    assert all(torch.equal(v, source.unet.state_dict()[k]) for k, v in loaded.unet.state_dict().items())
    before = os.path.getmtime(path), os.path.getsize(path)
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        save_single_file(source, path)
    assert (os.path.getmtime(path), os.path.getsize(path)) == before
    save_single_file(source, path, half=True, overwrite=True)
    assert os.path.getsize(path) < before[1]
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_single_file(source, str(tmp_path / "digit.ckpt"))
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        save_single_file(str(tmp_path), str(tmp_path / "x.safetensors"))
    not_sd = types.SimpleNamespace(unet=torch.nn.Linear(2, 2), vae=source.vae, text_encoder=source.text_encoder)
    with pytest.raises(ValueError, match="not UNet2DConditionModel"):
        save_single_file(not_sd, str(tmp_path / "x.safetensors"))
    state = dict(source.unet.state_dict(), **{"class_embedding.linear_1.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="1 U-Net weights have no place.*class_embedding.linear_1.weight"):
        unet_to_original(state, source.unet.config)
    assert sorted(os.listdir(tmp_path)) == ["digit.safetensors"]


def test_a_failed_write_leaves_nothing(sources, tmp_path, monkeypatch):
    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(load_base_pipeline(DIGIT_SD), str(tmp_path / "m.safetensors"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_lora_loads_to_the_same_weights_as_the_diffusers_lora(sources, family, tmp_path):
    """Every Linear and Conv2d of the U-Net moved (conv_in/out, resnet convs and shortcuts, down/upsamplers, time and
    added-conditioning embeddings, attention): both files, fused by diffusers, give bit-identical U-Nets (same
    tensors, scale alpha / rank = 1 in both)."""
    base = load_base_pipeline(sources[family])
    erased = copy.deepcopy(base.unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in erased.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    state, stats = delta_to_lora(base.unet, erased, rank=2)
    save_lora(state, str(tmp_path))
    path = save_kohya_lora(str(tmp_path), base.unet.config)
    assert os.path.basename(path) == KOHYA_LORA_NAME
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 3 * stats["layers"]
    conv_in = "lora_unet_input_blocks_0_0" if family == "sdxl" else "lora_unet_conv_in"
    resnet_conv = ("lora_unet_input_blocks_1_0_in_layers_2" if family == "sdxl"
                   else "lora_unet_down_blocks_0_resnets_0_conv1")
    for module in (conv_in, resnet_conv):
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= keys
    fused = {}
    for name in ("pytorch_lora_weights.safetensors", KOHYA_LORA_NAME):
        pipe = load_base_pipeline(sources[family])
        pipe.load_lora_weights(str(tmp_path), weight_name=name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused[name] = pipe.unet.state_dict()
    a, b = fused.values()
    base_state = base.unet.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    moved = {k for k in a if not torch.equal(a[k], base_state[k])}
    assert len(moved) == stats["layers"]  # every LoRA module was applied, from both files
    with pytest.raises(ValueError, match="already exists"):
        save_kohya_lora(str(tmp_path), base.unet.config)


def test_kohya_lora_refuses_what_is_not_a_unet_lora(tmp_path):
    config = load_base_pipeline(DIGIT_SD).unet.config
    with pytest.raises(ValueError, match="not a U-Net LoRA key"):
        export.kohya_lora_state_dict({"text_encoder.x.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="lacks lora_B"):
        export.kohya_lora_state_dict({"unet.conv_in.lora_A.weight": torch.zeros(1, 4, 3, 3)}, config)
    with pytest.raises(ValueError, match="no LoRA file"):
        save_kohya_lora(str(tmp_path), config)


def test_kohya_lora_keeps_an_alpha_recorded_in_the_diffusers_file(tmp_path):
    """A diffusers LoRA saved with lora_alpha 4 at rank 2 (scale 2): the kohya file carries alpha 4 and fuses to the
    same weights."""
    from diffusers import StableDiffusionPipeline as SD

    base = load_base_pipeline(DIGIT_SD)
    erased = copy.deepcopy(base.unet)
    with torch.no_grad():
        erased.conv_in.weight.add_(0.1)
        erased.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.add_(0.1)
    state, _ = delta_to_lora(base.unet, erased, rank=2)
    SD.save_lora_weights(str(tmp_path), unet_lora_layers=state, safe_serialization=True,
                         unet_lora_adapter_metadata={"r": 2, "lora_alpha": 4, "target_modules": [
                             "conv_in", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]})
    path = save_kohya_lora(str(tmp_path), base.unet.config)
    with safe_open(path, "pt") as f:
        assert {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")} == {4.0}
    fused = []
    for name in ("pytorch_lora_weights.safetensors", KOHYA_LORA_NAME):
        pipe = load_base_pipeline(DIGIT_SD)
        pipe.load_lora_weights(str(tmp_path), weight_name=name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused.append(pipe.unet.conv_in.weight.detach().clone())
    assert torch.equal(fused[0], fused[1])
    # scale alpha / rank = 2: the fused change is twice the delta, up to float32 rounding: the SVD's (backward error
    # ~ eps * |delta|_F, doubled by the scale) and that of W + 2 * BA and of the difference (~ eps * |W|)
    delta = 0.1 * torch.ones_like(fused[0])
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(fused[0] - base.unet.conv_in.weight, 2 * delta, rtol=0,
                               atol=4 * eps * (2 * float(delta.norm()) + float(fused[0].abs().max())))


# Full-size SD 1.5 / SD 2.1 / SDXL-base shapes, built on the meta device (no memory, no weights): the key layout the
# UIs read at real scale, checked by diffusers' own model-type detection and single-file converters.
_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
_SD1_UNET = dict(cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
_SD2_UNET = dict(_SD1_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
_SDXL_UNET = dict(block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                  transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               hidden_act="quick_gelu")
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                   hidden_act="gelu")
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      hidden_act="gelu", projection_dim=1280)
_FULL = {"sd1": (_SD1_UNET, _CLIP_L, None, "v1"), "sd2": (_SD2_UNET, _OPENCLIP_H, None, "v2"),
         "sdxl": (_SDXL_UNET, _CLIP_L, _OPENCLIP_BIGG, "xl_base")}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_is_what_diffusers_detects_and_converts_back(family):
    from diffusers import AutoencoderKL
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                     infer_diffusers_model_type)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, te_config, te2_config, model_type = _FULL[family]
    with torch.device("meta"):
        pipe = types.SimpleNamespace(
            unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**te_config)),
            text_encoder_2=te2_config and CLIPTextModelWithProjection(CLIPTextConfig(**te2_config)))
    layout = export.original_layout(pipe)
    assert infer_diffusers_model_type(layout) == model_type

    def same(converted, module):
        expected = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        assert set(converted) == set(expected)
        assert all(converted[k].shape == expected[k].shape for k in expected)

    same(convert_ldm_unet_checkpoint(layout, pipe.unet.config), pipe.unet)
    same(convert_ldm_vae_checkpoint(layout, pipe.vae.config), pipe.vae)
    if family == "sd2":
        same(convert_open_clip_checkpoint(pipe.text_encoder, layout, prefix=export.SD2_TEXT_PREFIX), pipe.text_encoder)
    else:
        same(convert_ldm_clip_checkpoint(layout), pipe.text_encoder)
    if family == "sdxl":
        same(convert_open_clip_checkpoint(pipe.text_encoder_2, layout, prefix=export.SDXL_TEXT_PREFIXES[1]),
             pipe.text_encoder_2)
    # kohya names for every Linear / Conv2d of the U-Net map back to the same modules through diffusers' reader
    modules = {n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    lora = {f"unet.{n}.lora_{ab}.weight": torch.empty(2, 2, device="meta") for n in modules for ab in "AB"}
    kohya = _maybe_map_sgm_blocks_to_diffusers(export.kohya_lora_state_dict(lora, pipe.unet.config),
                                               pipe.unet.config)
    back, _ = _convert_non_diffusers_lora_to_diffusers(kohya)
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in back.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in back} == modules
