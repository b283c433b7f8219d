"""train_erase.py --method: the peer methods (ESD, UCE, AdvUnlearn) run by the same tool on tiny models: the same
outputs (sealed erasure over the changed component, pipeline folder, records), flag refusals, family refusals, and
erasing again from an AdvUnlearn (text-encoder) output or from a SalUn output with AdvUnlearn."""

import json
import os
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

import train_erase
from salun_diffusers.config import EraseConfig
from salun_diffusers.delta import CONFIG_NAME, WEIGHTS_NAME, erasure_id, read_delta
from salun_diffusers.erase import erase
from salun_diffusers.erasure.peers import method_config, resolve_method
from salun_diffusers.loaders import get_loaded_erasures, load_erasure, set_erasure_scale, unload_erasure
from salun_diffusers.masking import load_mask
from salun_diffusers.methods import NEXT_DIGIT, esd_mask, text_encoder_mask, uce_mask
from salun_diffusers.pipelines import StableDiffusionErasedPipeline
from salun_diffusers.testing import get_flow_pipeline, save_dummy_pipeline

# a few steps each: mechanics, not efficacy (the digit-world presets are the lead's)
RUNS = {
    "esd-x": dict(max_train_steps=3, partial_sampling_steps=3, learning_rate=1e-3),
    "esd-u": dict(max_train_steps=3, partial_sampling_steps=3, learning_rate=1e-3),
    "uce": dict(preserve_scale=0.5),
    "advunlearn": dict(max_train_steps=3, partial_sampling_steps=3, attack_steps=2, attack_warmup=1,
                       learning_rate=1e-3),
}
COMPONENT = {"esd-x": "unet", "esd-u": "unet", "uce": "unet", "advunlearn": "text_encoder"}


def _load(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _expected_mask(method, pipe):
    if method.startswith("esd"):
        return esd_mask(pipe.unet, method)
    return uce_mask(pipe.unet) if method == "uce" else text_encoder_mask(pipe.text_encoder)


@pytest.fixture(scope="module")
def runs(dummy_pipeline_dir, tmp_path_factory):
    out = {}
    for method, kw in RUNS.items():
        config = EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept="nudity", method=method,
                             output_dir=str(tmp_path_factory.mktemp(method) / "out"), **kw)
        out[method] = (config, erase(config))
    return out


@pytest.mark.parametrize("method", list(RUNS))
def test_peer_output_loads_and_changes_only_its_weights(runs, method, dummy_pipeline_dir):
    config, result = runs[method]
    component = COMPONENT[method]
    base_pipe = _load(dummy_pipeline_dir)
    base = {c: _params(getattr(base_pipe, c)) for c in ("unet", "text_encoder", "vae")}
    # the changed set: the method's own, recorded in mask.safetensors and the erasure; non-empty, and it moved
    mask, _ = load_mask(result.mask_path)
    expected = _expected_mask(method, base_pipe)
    assert set(mask) == set(expected) and all(torch.equal(mask[n], expected[n]) for n in mask)
    erased = _params(result.unet)
    moved = sum(int((erased[n][m] != base[component][n][m]).sum()) for n, m in mask.items())
    assert moved > 0
    for n, m in mask.items():
        assert torch.equal(erased[n][~m], base[component][n][~m]), n
    # plain from_pretrained: the changed component is the erased one, every other component is the base's
    folder = _load(config.output_dir)
    for c, params in base.items():
        got = _params(getattr(folder, c))
        want = erased if c == component else params
        assert all(torch.equal(got[n], want[n]) for n in want), c
    # the loader verbs onto the base pipeline: bit-exact, and back
    meta = load_erasure(base_pipe, config.output_dir)
    assert meta["config"]["method"] == method and meta["config"]["component"] == component
    assert get_loaded_erasures(base_pipe)[0]["component"] == component
    assert all(torch.equal(p.detach(), erased[n]) for n, p in getattr(base_pipe, component).named_parameters())
    set_erasure_scale(base_pipe, 0.0)
    assert all(torch.equal(p.detach(), base[component][n]) for n, p in getattr(base_pipe, component).named_parameters())
    set_erasure_scale(base_pipe, 1.0)
    unload_erasure(base_pipe)
    for c, params in base.items():
        assert all(torch.equal(p.detach(), params[n]) for n, p in getattr(base_pipe, c).named_parameters()), c


@pytest.mark.parametrize("method", list(RUNS))
def test_peer_records_its_method_and_resolved_recipe(runs, method):
    config, result = runs[method]
    out = config.output_dir
    recorded = EraseConfig.from_json_file(os.path.join(out, "train_config.json"))
    assert recorded == config and recorded.method == method
    resolved = method_config(config).to_dict()
    with open(os.path.join(out, CONFIG_NAME)) as f:
        meta = json.load(f)["config"]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert meta["method_config"] == resolved == metrics["method_config"]
    assert meta["method_preset"] == metrics["method_preset"] == "sd14"  # not the bundled digit model
    for flag, value in RUNS[method].items():  # the flags given win over the preset
        assert getattr(recorded, flag) == value
    if method != "uce":
        assert resolved["iterations"] == 3 and len(metrics["history"]["loss"]) == 3
        assert recorded.negative_guidance == 1.0  # unset: the preset's (sd14), written back
    else:
        assert recorded.guide_prompt == "" and resolved["lamb"] == 0.5
    assert metrics["component"] == COMPONENT[method] and metrics["num_changed_weights"] > 0
    assert f"--method {method}" in open(os.path.join(out, "README.md")).read()


def test_presets_per_model_and_flags_over_them(dummy_pipeline_dir):
    digits = EraseConfig(method="esd-u")
    record = resolve_method(digits)
    assert record["preset"] == "digits" and digits.learning_rate == 1e-4 and digits.max_train_steps == 300
    assert digits.partial_sampling_steps == 10
    assert resolve_method(digits) == record  # idempotent
    sd = EraseConfig(method="esd-x", pretrained_model_name_or_path=dummy_pipeline_dir, learning_rate=2e-5)
    assert resolve_method(sd)["preset"] == "sd14" and sd.learning_rate == 2e-5 and sd.max_train_steps == 1000
    adv = EraseConfig(method="advunlearn")
    resolve_method(adv)
    assert (adv.alpha, adv.attack_warmup, adv.attack_steps, adv.max_train_steps) == (1.0, 40, 5, 200)
    uce = EraseConfig(method="uce")
    resolve_method(uce)
    assert uce.preserve_scale == 0.1 and uce.guide_prompt == NEXT_DIGIT
    assert resolve_method(EraseConfig()) is None and EraseConfig().negative_guidance is None


@pytest.mark.parametrize("argv, needle", [
    (["--method", "uce", "--mask_ratio", "0.3"], "--mask_ratio does not apply to --method uce"),
    (["--method", "uce", "--adversarial"], "--adversarial does not apply to --method uce"),
    (["--negative_guidance", "2"], "--negative_guidance does not apply to --method salun"),
    (["--method", "esd-x", "--alpha", "1"], "--alpha does not apply to --method esd-x"),
    (["--method", "uce", "--resume_from_checkpoint", "latest"], "no training steps to checkpoint"),
    (["--method", "uce", "--checkpointing_steps", "5"], "uce is one closed-form solve"),
    (["--method", "esd-x", "--concept", "one", "two"], "one concept per run"),
    (["--method", "esd-x", "--learning_rate", "0"], "--learning_rate must be > 0"),
])
def test_wrong_flags_for_the_method_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert train_erase.main([*argv, "--output_dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(out)


def test_peers_refuse_sdxl_and_flow_bases(tmp_path, capsys):
    sdxl = save_dummy_pipeline(str(tmp_path / "tiny-sdxl"), family="sdxl")
    out = str(tmp_path / "out")
    assert train_erase.main(["--method", "uce", "--pretrained_model_name_or_path", sdxl, "--concept", "nudity",
                             "--output_dir", out]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and loading bars)
    assert len(errors) == 1 and "--method uce fits StableDiffusionPipeline, not StableDiffusionXL" in errors[0]
    assert not os.path.exists(os.path.join(out, "train_config.json"))  # refused before anything was written
    config = EraseConfig(method="esd-x", concept="nudity", pretrained_model_name_or_path=sdxl,
                         output_dir=str(tmp_path / "flow"), max_train_steps=1)
    with pytest.raises(ValueError, match="fits StableDiffusionPipeline, not StableDiffusion3Pipeline"):
        erase(config, pipe=get_flow_pipeline("sd3"))


def test_a_second_run_never_overwrites(runs):
    config, _ = runs["uce"]
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        erase(EraseConfig(**{**config.to_dict(), "hub_token": None}))


def test_cli_uce_on_the_digit_world(tmp_path, capsys):
    out = str(tmp_path / "digit-uce")
    assert train_erase.main(["--method", "uce", "--concept", "seven", "--output_dir", out,
                             "--verdict_images", "0"]) == 0
    assert f"erased concept 'seven' -> {out}" in capsys.readouterr().out
    recorded = EraseConfig.from_json_file(os.path.join(out, "train_config.json"))
    assert recorded.method == "uce" and recorded.preserve_scale == 0.1  # the digit preset, recorded
    assert recorded.guide_prompt == NEXT_DIGIT
    with open(os.path.join(out, CONFIG_NAME)) as f:
        meta = json.load(f)["config"]
    assert meta["method_preset"] == "digits" and meta["component"] == "unet"
    pipe = _load(out)
    from salun_diffusers.digits import load_digit_pipeline
    base = load_digit_pipeline()
    load_erasure(base, out)
    assert all(torch.equal(p, q) for p, q in zip(base.unet.parameters(), pipe.unet.parameters()))


def test_uce_erases_several_concepts_in_one_edit(dummy_pipeline_dir, tmp_path):
    config = EraseConfig(pretrained_model_name_or_path=dummy_pipeline_dir, concept=["nudity", "van_gogh"],
                         method="uce", output_dir=str(tmp_path / "out"), save_pipeline="none")
    result = erase(config)
    assert result.metrics["final"]["erased_prompts"] == ["a photo of a nude person",
                                                         "a painting in the style of Van Gogh"]
    with open(os.path.join(config.output_dir, CONFIG_NAME)) as f:
        meta = json.load(f)["config"]
    assert [c["name"] for c in meta["erased_concepts"]] == ["nudity", "van_gogh"]
    base = _params(_load(dummy_pipeline_dir).unet)
    assert any(not torch.equal(p.detach(), base[n]) for n, p in result.unet.named_parameters())


# ------------------------------------------------------------------------ stacking onto and under a text-encoder erasure


def _erasure_meta(path):
    return read_delta(path)[1]


def _same_params(module, params):
    return all(torch.equal(p.detach(), params[n]) for n, p in module.named_parameters())


def _second_run(method, base_folder, out, erase_config):
    """A run of ``method`` from an erased model's folder (SalUn: a seconds-long run of the tiny pipeline)."""
    if method == "salun":
        return erase(erase_config(output_dir=out, pretrained_model_name_or_path=base_folder, max_train_steps=2))
    return erase(EraseConfig(pretrained_model_name_or_path=base_folder, concept="nudity", method=method,
                             output_dir=out, **RUNS[method]))


@pytest.mark.parametrize("method", ["salun", "esd-x"])
def test_erasing_again_from_an_advunlearn_output_stacks_exactly(method, runs, erase_config, dummy_pipeline_dir,
                                                                tmp_path, caplog):
    first_dir = runs["advunlearn"][0].output_dir
    first_id = erasure_id(_erasure_meta(os.path.join(first_dir, WEIGHTS_NAME)))
    second = _second_run(method, first_dir, str(tmp_path / "second"), erase_config)
    meta = _erasure_meta(second.erasure_path)["config"]
    assert meta["stacked_on"] == [{"id": first_id, "concept": "nudity", "base_model": dummy_pipeline_dir}]
    assert meta["component"] == "unet"
    # the folder: AdvUnlearn's text encoder (its own, linked) and the new U-Net
    erased_te = _params(_load(first_dir).text_encoder)
    folder = _load(second.output_dir)
    assert _same_params(folder.text_encoder, erased_te)
    merged_unet = _params(folder.unet)
    assert _same_params(second.unet, merged_unet)
    # both erasures onto the base, in order: each on its own component, bit for bit; then the base back
    pipe = _load(dummy_pipeline_dir)
    base = {c: _params(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    load_erasure(pipe, first_dir)
    with caplog.at_level("WARNING"):
        load_erasure(pipe, second.output_dir)
    assert "made from an erased model" not in caplog.text  # its parent is loaded (in the text encoder)
    assert [(e["component"], e["stacked"]) for e in get_loaded_erasures(pipe)] == [("text_encoder", "base"),
                                                                                   ("unet", "base")]
    assert _same_params(pipe.text_encoder, erased_te) and _same_params(pipe.unet, merged_unet)
    unload_erasure(pipe)
    assert all(_same_params(getattr(pipe, c), base[c]) for c in base)
    # the second alone: the loader names the erasure it lacks
    with caplog.at_level("WARNING"):
        load_erasure(pipe, second.output_dir)
    assert f"made from an erased model (erasure {first_id})" in caplog.text
    # the erased pipeline class loads the chain from the folder alone
    chain = StableDiffusionErasedPipeline.from_pretrained(second.output_dir, safety_checker=None)
    assert [e["component"] for e in get_loaded_erasures(chain)] == ["text_encoder", "unet"]
    assert _same_params(chain.text_encoder, erased_te) and _same_params(chain.unet, merged_unet)


def test_advunlearn_on_top_of_a_salun_output_stacks_exactly(erase_config, dummy_pipeline_dir, tmp_path):
    first = erase(erase_config(output_dir=str(tmp_path / "salun"), max_train_steps=2))
    second = _second_run("advunlearn", first.output_dir, str(tmp_path / "adv"), erase_config)
    meta = _erasure_meta(second.erasure_path)["config"]
    assert meta["stacked_on"] == [{"id": erasure_id(_erasure_meta(first.erasure_path)), "concept": "nudity",
                                   "base_model": dummy_pipeline_dir}]
    assert meta["component"] == "text_encoder"
    salun_unet = _params(_load(first.output_dir).unet)
    folder = _load(second.output_dir)
    erased_te = _params(second.unet)  # the erased text encoder
    assert _same_params(folder.unet, salun_unet) and _same_params(folder.text_encoder, erased_te)
    pipe = _load(dummy_pipeline_dir)
    base = {c: _params(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    load_erasure(pipe, first.output_dir)
    load_erasure(pipe, second.output_dir)
    assert _same_params(pipe.unet, salun_unet) and _same_params(pipe.text_encoder, erased_te)
    unload_erasure(pipe)
    assert all(_same_params(getattr(pipe, c), base[c]) for c in base)


@pytest.mark.parametrize("method", ["salun", "esd-x"])
def test_an_advunlearn_folder_whose_text_encoder_changed_is_refused(method, runs, erase_config, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(runs["advunlearn"][0].output_dir, changed, symlinks=True)
    weights = changed / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("final_layer_norm.weight"))  # transformers 5 drops "text_model."
    state[key] = state[key] + 1
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the text encoder in .* does not hold the erasure beside it "
                                         r"\(erasure\.safetensors: '(text_model\.)?final_layer_norm\.weight' differs\).*"
                                         r"erase from its base model"):
        _second_run(method, str(changed), str(tmp_path / "out"), erase_config)
    assert not os.path.exists(tmp_path / "out" / WEIGHTS_NAME)
