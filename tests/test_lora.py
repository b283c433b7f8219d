import copy

import pytest
import torch

from salun_diffusers.lora import delta_to_lora, save_lora
from salun_diffusers.testing import get_dummy_pipeline


def _perturbed(unet, rank_of_delta: int, seed: int = 0):
    """A copy of ``unet`` whose 2-D/4-D weights moved by a delta of the given rank."""
    er = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in er.parameters():
            if p.ndim in (2, 4):
                out, rest = p.shape[0], p[0].numel()
                u, v = torch.randn(out, rank_of_delta, generator=g), torch.randn(rank_of_delta, rest, generator=g)
                p.add_(0.02 * (u @ v).reshape(p.shape))
    return er


def test_lora_export_loads_with_load_lora_weights_and_reproduces_the_delta(tmp_path):
    pipe = get_dummy_pipeline()
    base = copy.deepcopy(pipe.unet)
    erased = _perturbed(base, rank_of_delta=2)
    state, stats = delta_to_lora(base, erased, rank=2)
    assert stats["energy_kept"] > 0.999999 and stats["layers"] > 10
    save_lora(state, str(tmp_path / "lora"))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    with torch.no_grad():
        out_lora = pipe.unet(x, 10, encoder_hidden_states=c).sample
        out_erased = erased(x, 10, encoder_hidden_states=c).sample
        out_base = base(x, 10, encoder_hidden_states=c).sample
    effect = float((out_base - out_erased).abs().max())
    assert effect > 1e-2
    # the delta has rank 2, so the rank-2 LoRA holds it up to float32 rounding of its factors (energy kept above
    # 1 - 1e-6: a relative error below 1e-3 of the delta's effect), plus the U-Net's own rounding of its output
    torch.testing.assert_close(out_lora, out_erased, atol=1e-3 * effect, rtol=1e-5)


def test_lower_rank_keeps_less_energy_and_bad_rank_is_rejected():
    pipe = get_dummy_pipeline()
    base = copy.deepcopy(pipe.unet)
    erased = _perturbed(base, rank_of_delta=6)
    kept = [delta_to_lora(base, erased, rank=r)[1]["energy_kept"] for r in (1, 3, 6)]
    assert kept[0] < kept[1] < kept[2] and kept[2] > 0.999
    with pytest.raises(ValueError, match="rank"):
        delta_to_lora(base, erased, rank=0)
