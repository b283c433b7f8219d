"""Erasure file format v2: every stored byte sealed (sha256), the base values fingerprinted; faults injected into files.

Each test here failed on the format-1 code (which applied tampered files, and erasures made on another base, silently).
"""

import json
import logging
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from salun_diffusers.delta import (BASE_KEY, DELTA_FORMAT_VERSION, WEIGHTS_NAME, base_values_digest, build_delta,
                                   read_delta, save_delta)
from salun_diffusers.erase import erase
from salun_diffusers.loaders import load_erasure, unload_erasure
from salun_diffusers.masking import load_mask, save_mask
from salun_diffusers.testing import get_dummy_components


def _unet(seed=0):
    return get_dummy_components(seed=seed)["unet"]


def _params(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def _same(unet, params):
    return all(torch.equal(p.detach(), params[n]) for n, p in unet.named_parameters())


@pytest.fixture(scope="module")
def erasure(tmp_path_factory):
    """A v2 erasure of the seed-0 tiny U-Net: 30% of the weights of three tensors moved."""
    base = _unet(0)
    g = torch.Generator().manual_seed(0)
    names = ["conv_in.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.bias"]
    params = dict(base.named_parameters())
    mask = {n: torch.rand(params[n].shape, generator=g) < 0.3 for n in names}
    digest = base_values_digest(base, mask)
    erased = _unet(0)
    with torch.no_grad():
        for n, p in erased.named_parameters():
            if n in mask:
                p[mask[n]] += 0.25
    folder = str(tmp_path_factory.mktemp("erasure"))
    save_delta(build_delta(erased, mask, {"concept": "test", "base_model": "tiny-seed-0"}, base_digest=digest), folder)
    return folder, _params(erased)


def _tensor_span(path, key):
    """Byte range of tensor ``key``'s data inside a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _copy_with(tmp_path, src, edit):
    data = bytearray(open(src, "rb").read())
    edit(data)
    out = tmp_path / "tampered.safetensors"
    out.write_bytes(bytes(data))
    return str(out)


def test_v2_file_records_seal_and_base_fingerprint(erasure):
    folder, erased = erasure
    with safe_open(os.path.join(folder, WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == str(DELTA_FORMAT_VERSION) == "2"
    assert set(json.loads(meta[BASE_KEY])) == {"float32", "float16", "bfloat16"}
    assert set(json.loads(meta["sha256"])["tensors"]) == set(safe_open(os.path.join(folder, WEIGHTS_NAME), "pt").keys())
    unet = _unet(0)
    load_erasure(unet, folder)
    assert _same(unet, erased)


def test_flipped_bytes_in_stored_values_are_refused_and_pipeline_untouched(erasure, tmp_path):
    folder, _ = erasure
    src = os.path.join(folder, WEIGHTS_NAME)
    start, end = _tensor_span(src, "conv_in.weight.values")
    mid = (start + end) // 2

    def flip(data):
        for i in range(mid, mid + 8):  # eight bytes in the middle of the stored values
            data[i] ^= 0xFF

    bad = _copy_with(tmp_path, src, flip)
    unet = _unet(0)
    before = _params(unet)
    with pytest.raises(ValueError, match=r"fails its integrity check: the bytes of tensor 'conv_in\.weight\.values'"):
        load_erasure(unet, bad)
    assert _same(unet, before)
    assert getattr(unet, "_salun_erasure", None) is None  # nothing loaded: a later load of the good file works
    load_erasure(unet, folder)


def test_swapped_bits_in_packed_mask_are_refused(erasure, tmp_path):
    folder, _ = erasure
    src = os.path.join(folder, WEIGHTS_NAME)
    start, end = _tensor_span(src, "conv_in.weight.mask")
    data = open(src, "rb").read()
    # find a byte whose bits can be swapped without changing the count of set bits (the old loader's only check)
    pos = next(i for i in range(start, end) if data[i] not in (0, 255) and ((data[i] << 1 | data[i] >> 7) & 255)
               != data[i])

    def rotate(buf):
        buf[pos] = ((buf[pos] << 1) | (buf[pos] >> 7)) & 0xFF

    bad = _copy_with(tmp_path, src, rotate)
    unet = _unet(0)
    before = _params(unet)
    with pytest.raises(ValueError, match=r"integrity check: the bytes of tensor 'conv_in\.weight\.mask'"):
        load_erasure(unet, bad)
    assert _same(unet, before)


def test_edited_header_and_replaced_tensors_are_refused(erasure, tmp_path):
    folder, _ = erasure
    src = os.path.join(folder, WEIGHTS_NAME)
    with safe_open(src, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    unet = _unet(0)
    # the header says another concept (values untouched)
    cfg = json.loads(meta["config"])
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={**meta, "config": json.dumps({**cfg, "concept": "x"})})
    with pytest.raises(ValueError, match="its metadata .header. changed"):
        load_erasure(unet, str(tmp_path / "a.safetensors"))
    # a tensor rewritten with new values by a tool that kept the old header
    key = "conv_out.bias.values"
    save_file({**tensors, key: tensors[key] + 1}, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="conv_out.bias.values"):
        load_erasure(unet, str(tmp_path / "b.safetensors"))
    # the seal removed from a file that says version 2
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={k: v for k, v in meta.items() if k != "sha256"})
    with pytest.raises(ValueError, match="no sha256 seal"):
        load_erasure(unet, str(tmp_path / "c.safetensors"))
    assert getattr(unet, "_salun_erasure", None) is None


def test_other_base_with_the_same_shapes_is_refused_unless_opted_out(erasure):
    folder, erased = erasure
    other = _unet(1)  # same architecture and shapes, other values: SD1.5 to the erasure's SD1.4
    before = _params(other)
    with pytest.raises(ValueError, match="made from other base weights .*'tiny-seed-0'.*check_base=False"):
        load_erasure(other, folder)
    assert _same(other, before)
    load_erasure(other, folder, check_base=False)  # explicit opt-out: applied
    params, mask = dict(other.named_parameters()), other._salun_erasure[-1]["mask"]
    assert all(torch.equal(params[n].detach()[m], erased[n][m]) for n, m in mask.items())
    unload_erasure(other)
    assert _same(other, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_of_the_right_base_passes(erasure, dtype):
    folder, erased = erasure
    unet = _unet(0).to(dtype)
    load_erasure(unet, folder)
    params = dict(unet.named_parameters())
    assert torch.equal(params["conv_in.weight"].detach(), erased["conv_in.weight"].to(dtype))
    other = _unet(1).to(dtype)
    with pytest.raises(ValueError, match="other base weights"):
        load_erasure(other, folder)


def test_fp32_unet_from_a_half_precision_copy_of_the_base_matches_at_that_precision(erasure):
    folder, _ = erasure
    unet = _unet(0).half().float()  # e.g. the fp16 variant of the base, upcast
    load_erasure(unet, folder)


def test_mixed_precision_unet_is_checked_at_its_narrowest_dtype(erasure):
    folder, _ = erasure
    unet = _unet(0).half()
    unet.conv_in.float()  # some modules kept in fp32 (as pipelines do for numerically sensitive layers)
    load_erasure(unet, folder)
    other = _unet(1).half()
    other.conv_in.float()
    with pytest.raises(ValueError, match="other base weights"):
        load_erasure(other, folder)
    both = _unet(0).half()
    both.conv_out.bfloat16()  # float16 and bfloat16 together: no single rendering to compare
    with pytest.raises(ValueError, match="mixes float16 and bfloat16.*check_base=False"):
        load_erasure(both, folder)
    load_erasure(both, folder, check_base=False)


def test_format_1_file_loads_with_one_warning(erasure, tmp_path, caplog):
    folder, erased = erasure
    src = os.path.join(folder, WEIGHTS_NAME)
    with safe_open(src, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    v1 = {k: v for k, v in meta.items() if k not in ("sha256", BASE_KEY)}
    v1["format_version"] = "1"
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata=v1)
    unet = _unet(0)
    with caplog.at_level(logging.WARNING, logger="salun_diffusers"):
        load_erasure(unet, str(tmp_path))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "format version 1" in warnings[0].getMessage()
    assert _same(unet, erased)
    # re-saved as version 2, as docs/erasure-format.md shows: sealed, base fingerprinted, loads without a warning
    from salun_diffusers.delta import parse_delta

    base = _unet(0)
    delta = parse_delta(*read_delta(str(tmp_path / WEIGHTS_NAME)), base)
    delta.metadata[BASE_KEY] = base_values_digest(base, delta.mask)
    save_delta(delta, str(tmp_path / "v2"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="salun_diffusers"):
        load_erasure(base, str(tmp_path / "v2"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING] and _same(base, erased)
    with pytest.raises(ValueError, match="other base weights"):
        load_erasure(_unet(1), str(tmp_path / "v2"))


def test_non_finite_values_are_refused(erasure):
    folder, _ = erasure
    tensors, meta = read_delta(folder)
    key = "conv_in.weight.values"
    bad = dict(tensors)
    bad[key] = bad[key].clone()
    bad[key][3] = float("nan")
    unet = _unet(0)
    before = _params(unet)
    with pytest.raises(ValueError, match="NaN or infinity"):
        load_erasure(unet, bad)
    assert _same(unet, before)


def test_erased_pipeline_from_pretrained_passes_check_base(erasure, tmp_path):
    from salun_diffusers.pipelines import StableDiffusionErasedPipeline
    from salun_diffusers.testing import save_dummy_pipeline

    folder, _ = erasure
    other = save_dummy_pipeline(str(tmp_path / "other-base"), seed=1)  # same shapes, other weights
    kw = dict(safety_checker=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="other base weights"):
        StableDiffusionErasedPipeline.from_pretrained(other, erasure=folder, **kw)
    pipe = StableDiffusionErasedPipeline.from_pretrained(other, erasure=folder, check_base=False, **kw)
    assert pipe.unet._salun_erasure is not None


def test_mask_file_seal(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    mask = {"a": torch.rand(40, 7, generator=g) < 0.5, "b": torch.rand(13, generator=g) < 0.5}
    path = str(tmp_path / "mask.safetensors")
    save_mask(mask, path, {"concept": "nudity"})
    start, end = _tensor_span(path, "a")

    def swap(data):
        data[start + 3] = ((data[start + 3] << 4) | (data[start + 3] >> 4)) & 0xFF

    assert open(path, "rb").read()[start + 3] not in (0x00, 0xFF, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
                                                      0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE)
    bad = _copy_with(tmp_path, path, swap)
    with pytest.raises(ValueError, match=r"mask file .* fails its integrity check: the bytes of tensor 'a'.*"
                                         r"recompute it"):
        load_mask(bad)
    # a format-1 mask (no seal) still loads, with a warning
    with safe_open(path, framework="pt") as f:
        meta, packed = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    v1 = {k: v for k, v in meta.items() if k != "sha256"}
    v1["format_version"] = "1"
    save_file(packed, str(tmp_path / "v1.safetensors"), metadata=v1)
    with caplog.at_level(logging.WARNING, logger="salun_diffusers"):
        loaded, _ = load_mask(str(tmp_path / "v1.safetensors"))
    assert all(torch.equal(loaded[n], mask[n]) for n in mask)
    assert sum("format version 1" in r.getMessage() for r in caplog.records) == 1


def test_erase_records_the_base_fingerprint_before_training(erase_config, dummy_pipeline_dir):
    """The end-to-end file: made from the base's values (not the erased ones), so the base accepts it, another
    base of the same shapes is refused, and an fp16 copy of the base accepts it."""
    from diffusers import UNet2DConditionModel

    result = erase(erase_config(max_train_steps=2))
    base = UNet2DConditionModel.from_pretrained(dummy_pipeline_dir, subfolder="unet")
    load_erasure(base, result.output_dir)
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(base.parameters(), result.unet.parameters()))
    fp16 = UNet2DConditionModel.from_pretrained(dummy_pipeline_dir, subfolder="unet", torch_dtype=torch.float16)
    load_erasure(fp16, result.output_dir)
    with pytest.raises(ValueError, match="other base weights"):
        load_erasure(_unet(1), result.output_dir)
