"""The SD1.4-shaped U-Net (random weights, config from ../shared/data) through SalUn's core path.

Marked ``gpu`` (needs CUDA; run with ``pytest -m gpu``): saliency on SD1.4's 860M weights, the exact global top-k mask,
a masked AdamW step that leaves every weight outside the mask bit-identical, and the delta round trip.
"""

import json
import os

import pytest
import torch

from salun_diffusers.delta import build_delta, parse_delta, read_delta, save_delta
from salun_diffusers.loaders import load_erasure, unload_erasure
from salun_diffusers.masking import MaskedUpdate, mask_from_saliency
from salun_diffusers.objectives import diffusion_loss, salun_loss
from salun_diffusers.saliency import compute_saliency


@pytest.fixture
def sd14_unet(data_dir):
    from diffusers import UNet2DConditionModel

    path = os.path.join(data_dir, "configs", "sd14_unet_config.json")
    if not os.path.isfile(path):
        pytest.skip("SD1.4 U-Net config not available")
    with open(path) as f:
        config = json.load(f)
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sd14_shaped_salun_step_is_exact_outside_the_mask(sd14_unet, tmp_path):
    from diffusers import DDPMScheduler

    device = torch.device("cuda")
    unet = sd14_unet.to(device)
    assert sum(p.numel() for p in unet.parameters()) > 8e8
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator(device=device).manual_seed(0)
    lat = torch.randn(4, 4, 64, 64, generator=g, device=device)
    cond = torch.randn(3, 77, 768, generator=g, device=device)

    def loss_fn(model, idx, gen):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return diffusion_loss(model, sched, lat[idx], cond[0].expand(len(idx), -1, -1), gen)

    sal = compute_saliency(unet, [[0, 1], [2, 3]], loss_fn)
    mask = mask_from_saliency(sal, 0.5)
    del sal
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.5 * total)
    guard = MaskedUpdate(unet, mask)
    opt = torch.optim.AdamW(guard.trainable_parameters(), lr=1e-4, weight_decay=1e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = salun_loss(unet, sched, lat[:2], cond[0].expand(2, -1, -1), cond[1].expand(2, -1, -1), lat[2:],
                                cond[2].expand(2, -1, -1), 0.1, g)
    loss.backward()
    guard.mask_gradients()
    opt.step()
    guard.restore()
    for n, p in unet.named_parameters():
        assert torch.equal(p.detach()[~mask[n]], base[n][~mask[n]]), n
    erased = {n: p.detach().clone() for n, p in unet.named_parameters()}
    del opt, guard
    save_delta(build_delta(unet, mask, {"concept": "test"}), str(tmp_path))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            p.copy_(base[n])
    load_erasure(unet, str(tmp_path))
    assert all(torch.equal(p.detach(), erased[n]) for n, p in unet.named_parameters())
    unload_erasure(unet)
    assert all(torch.equal(p.detach(), base[n]) for n, p in unet.named_parameters())
    tensors, meta = read_delta(str(tmp_path))
    assert parse_delta(tensors, meta, unet).num_changed() > 0
