"""Stacking erasures (issue 19): several loaded onto one pipeline, on top of each other or beside each other, and
erasing again from an erased model. Each composition is exact or refused; unloading restores the base bit for bit."""

import json
import logging
import os
import shutil

import pytest
import torch

from salun_diffusers.delta import WEIGHTS_NAME, base_values_digest, build_delta, erasure_id, read_delta, save_delta
from salun_diffusers.erase import erase
from salun_diffusers.loaders import (fuse_erasure, get_loaded_erasures, load_erasure, set_erasure_scale,
                                     unload_erasure)
from salun_diffusers.testing import get_dummy_components

NAMES = ["conv_in.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.bias"]


def _unet(seed=0):
    return get_dummy_components(seed=seed)["unet"]


def _params(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def _same(unet, params):
    return all(torch.equal(p.detach(), params[n]) for n, p in unet.named_parameters())


def _make(folder, base_unet, seed, shift, concept, names=NAMES, stacked_on=None):
    """An erasure of ``base_unet`` (a copy is changed): ~40% of three tensors' weights moved by ``shift``. Returns
    the folder and the erased U-Net's parameters."""
    g = torch.Generator().manual_seed(seed)
    params = dict(base_unet.named_parameters())
    mask = {n: torch.rand(params[n].shape, generator=g) < 0.4 for n in names}
    digest = base_values_digest(base_unet, mask)
    erased = {n: p.detach().clone() for n, p in base_unet.named_parameters()}
    for n in mask:
        erased[n][mask[n]] += shift * torch.randn(int(mask[n].sum()), generator=g)
    target = _unet(0)
    with torch.no_grad():
        for n, p in target.named_parameters():
            p.copy_(erased[n])
    cfg = {"concept": concept, "base_model": "tiny-seed-0"}
    if stacked_on:
        cfg["stacked_on"] = stacked_on
    os.makedirs(folder, exist_ok=True)
    save_delta(build_delta(target, mask, cfg, base_digest=digest), folder)
    return folder, erased, mask


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A and B: erasures of the same base (overlapping masks); C: made on top of A (from A's result)."""
    root = tmp_path_factory.mktemp("stack")
    base = _unet(0)
    a = _make(str(root / "a"), base, 1, 0.5, "seven")
    b = _make(str(root / "b"), base, 2, -0.3, "four")
    on_a = _unet(0)
    load_erasure(on_a, a[0])
    a_id = erasure_id(read_delta(a[0])[1])
    c = _make(str(root / "c"), on_a, 3, 0.2, "one", stacked_on=[{"id": a_id, "concept": "seven"}])
    return _params(base), a, b, c


def test_beside_erasures_compose_exactly_and_unload_restores_the_base(three, caplog):
    base, (a, erased_a, ma), (b, erased_b, mb), _ = three
    unet = _unet(0)
    load_erasure(unet, a)
    with caplog.at_level(logging.WARNING):
        load_erasure(unet, b)
    assert "made beside the loaded erasure(s)" in caplog.text and "erase the concepts together" in caplog.text
    assert [e["stacked"] for e in get_loaded_erasures(unet)] == ["base", "beside"]
    assert [e["concept"] for e in get_loaded_erasures(unet)] == ["seven", "four"]
    params = dict(unet.named_parameters())
    overlap = 0
    for n, p in params.items():
        p = p.detach()
        if n not in ma:
            assert torch.equal(p, base[n])
            continue
        only_a, only_b, both = ma[n] & ~mb[n], mb[n] & ~ma[n], ma[n] & mb[n]
        assert torch.equal(p[only_a], erased_a[n][only_a]) and torch.equal(p[only_b], erased_b[n][only_b])
        # where both masks hold, the two changes add up (in float32, in load order)
        assert torch.equal(p[both], erased_a[n][both] + (erased_b[n][both] - base[n][both]))
        assert torch.equal(p[~(ma[n] | mb[n])], base[n][~(ma[n] | mb[n])])
        overlap += int(both.sum())
    assert overlap > 50  # the masks really overlap
    # the other order: the same up to float rounding
    other = _unet(0)
    load_erasure(other, b)
    load_erasure(other, a)
    for n, p in other.named_parameters():
        torch.testing.assert_close(p.detach(), params[n].detach(), rtol=0, atol=1e-6)
    unload_erasure(unet, only_last=True)
    assert _same(unet, erased_a)  # exactly as before B was loaded
    load_erasure(unet, b)
    set_erasure_scale(unet, 0.0)
    assert _same(unet, base)
    set_erasure_scale(unet, 1.0)
    assert all(torch.equal(p.detach(), params[n].detach()) for n, p in unet.named_parameters())
    unload_erasure(unet)
    assert _same(unet, base) and get_loaded_erasures(unet) == []


def test_an_erasure_made_on_top_of_another_stacks_exactly_onto_it(three, caplog):
    base, (a, erased_a, _), (b, _, _), (c, erased_c, _) = three
    unet = _unet(0)
    load_erasure(unet, a)
    with caplog.at_level(logging.WARNING):
        load_erasure(unet, c)
    assert "not loaded" not in caplog.text  # its parent is loaded beneath it
    assert [e["stacked"] for e in get_loaded_erasures(unet)] == ["base", "on top"]
    assert _same(unet, erased_c)  # bit-identical to the model C was made from, with C's values
    unload_erasure(unet, only_last=True)
    assert _same(unet, erased_a)
    unload_erasure(unet)
    assert _same(unet, base)


def test_stacks_that_cannot_compose_are_refused_with_the_fix(three):
    base, (a, _, _), (b, erased_b, _), (c, _, _) = three
    unet = _unet(0)
    # C (made on top of A) onto the base alone: its base values are A's, not the base's
    with pytest.raises(ValueError, match="made from other base weights"):
        load_erasure(unet, c)
    assert _same(unet, base) and get_loaded_erasures(unet) == []
    # C onto B: neither on top of B nor from B's base
    load_erasure(unet, b)
    with pytest.raises(ValueError, match=r"erasure of 'one' was made neither from the base beneath the loaded "
                                         r"erasure\(s\) 'four' nor on top of them; unload_erasure\(pipe\) and load the "
                                         r"erasures it was made on top of first, in order"):
        load_erasure(unet, c)
    assert _same(unet, erased_b) and len(get_loaded_erasures(unet)) == 1
    # the same file twice
    with pytest.raises(RuntimeError, match="'four' is already loaded"):
        load_erasure(unet, b)
    # A's child over A at scale 0.5: the fix names the scale
    unload_erasure(unet)
    load_erasure(unet, a, scale=0.5)
    with pytest.raises(ValueError, match=r"at scale 0\.5.*set_erasure_scale\(pipe, 1\.0\) first"):
        load_erasure(unet, c)
    # a fused erasure below: B beside it cannot be checked against the base any more
    set_erasure_scale(unet, 1.0)
    fuse_erasure(unet)
    with pytest.raises(ValueError, match="made from other base weights"):
        load_erasure(unet, b)
    load_erasure(unet, c)  # made on top of what the U-Net now holds: loads


def test_an_erasure_whose_parent_is_not_loaded_warns(three, tmp_path, caplog):
    """C's parent A is not loaded but C's mask misses every weight A changed: the base check passes, so the loader
    can only say that A is missing (unless the U-Net is A's merged one)."""
    base, (a, _, ma), _, _ = three
    unet = _unet(0)
    names = ["mid_block.resnets.0.conv1.weight"]
    assert not set(names) & set(ma)
    folder, _, _ = _make(str(tmp_path / "d"), unet, 4, 0.1, "two", names=names,
                         stacked_on=[{"id": erasure_id(read_delta(a)[1]), "concept": "seven"}])
    with caplog.at_level(logging.WARNING):
        load_erasure(unet, folder)
    assert "made from an erased model" in caplog.text and "load it first" in caplog.text


# ------------------------------------------------------------------------------------- erasing an erased model


def test_erasing_again_from_an_erased_model_stacks_exactly(erase_config, dummy_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    first = erase(erase_config(output_dir=str(tmp_path / "first"), max_train_steps=2))
    second = erase(erase_config(output_dir=str(tmp_path / "second"), pretrained_model_name_or_path=first.output_dir,
                                concept="dragons", forget_prompt="a dragon", pseudo_prompt=["a lizard"],
                                retain_prompt=["a castle"], max_train_steps=2))
    meta = read_delta(second.erasure_path)[1]
    first_id = erasure_id(read_delta(first.erasure_path)[1])
    assert meta["config"]["stacked_on"] == [{"id": first_id, "concept": "nudity", "base_model": dummy_pipeline_dir}]
    assert json.load(open(os.path.join(second.output_dir, "metrics.json")))["stacked_on"][0]["id"] == first_id
    assert "The base model is itself erased" in open(os.path.join(second.output_dir, "README.md")).read()
    merged = _params(UNet2DConditionModel.from_pretrained(second.output_dir, subfolder="unet"))
    pipe = StableDiffusionPipeline.from_pretrained(dummy_pipeline_dir, safety_checker=None)
    base = _params(pipe.unet)
    load_erasure(pipe, first.output_dir)
    load_erasure(pipe, second.output_dir)
    assert _same(pipe.unet, merged)  # the two erasures on the base = the second run's merged U-Net, bit for bit
    unload_erasure(pipe)
    assert _same(pipe.unet, base)
    from salun_diffusers.pipelines import StableDiffusionErasedPipeline

    sub = StableDiffusionErasedPipeline.from_pretrained(second.output_dir, safety_checker=None)
    assert [e["concept"] for e in get_loaded_erasures(sub)] == ["nudity", "dragons"]
    assert _same(sub.unet, merged)
    sub.unload_erasure()
    assert _same(sub.unet, base)
    # a folder whose U-Net no longer holds its erasure is refused before any work
    changed = tmp_path / "changed"
    shutil.copytree(first.output_dir, changed, symlinks=True)
    unet_file = changed / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(unet_file))
    state["conv_in.weight"] = state["conv_in.weight"] + 1
    save_file(state, str(unet_file))
    with pytest.raises(ValueError, match=r"does not hold the erasure beside it .*'conv_in\.weight' differs.*erase from "
                                         r"its base model"):
        erase(erase_config(output_dir=str(tmp_path / "third"), pretrained_model_name_or_path=str(changed),
                           max_train_steps=1))
