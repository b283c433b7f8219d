"""Issue 17, ``--reinit_fraction`` (erasure/reinit.py): the top fraction of the masked weights by saliency is reset once
before the masked fine-tune. Off it is SalUn bit for bit; on, exactly the chosen entries (inside the mask) are reset,
the weights outside the mask stay bit-identical to the base, a resumed run equals an uninterrupted one without resetting
again, and bad values are refused. Tiny config-built pipeline on CPU (mechanics, seconds)."""

import pytest
import torch

from salun_diffusers import erase as erase_module
from salun_diffusers import load_mask
from salun_diffusers.erase import erase
from salun_diffusers.erasure.reinit import check_reinit_fits, reinit_selection, reinitialise
from salun_diffusers.families import denoiser, load_base_pipeline
from salun_diffusers.masking import mask_from_saliency
from salun_diffusers.testing import changed_inside_mask, get_dummy_pipeline


def _same(a, b):
    wa, wb = dict(a.unet.named_parameters()), dict(b.unet.named_parameters())
    return all(torch.equal(wa[n].detach(), wb[n].detach()) for n in wa)


@pytest.fixture
def recorded(monkeypatch):
    """Every reset erase() makes: (selection, the weights right after it)."""
    calls = []

    def spy(unet, selection, config):
        count = reinitialise(unet, selection, config)
        calls.append(({n: s.clone() for n, s in selection.items()},
                      {n: p.detach().clone() for n, p in unet.named_parameters()}))
        return count

    monkeypatch.setattr(erase_module, "reinitialise", spy)
    return calls


def test_the_selection_is_the_top_fraction_of_the_masked_weights_by_saliency():
    unet = get_dummy_pipeline(0).unet
    g = torch.Generator().manual_seed(0)
    saliency = {n: torch.rand(p.shape, generator=g) for n, p in unet.named_parameters()}
    mask = mask_from_saliency({n: torch.rand(s.shape, generator=g) for n, s in saliency.items()}, 0.5)
    sel = reinit_selection(saliency, mask, 0.1)
    masked = sum(int(m.sum()) for m in mask.values())
    assert sum(int(s.sum()) for s in sel.values()) == round(0.1 * masked)
    assert all(not bool((sel[n] & ~mask[n]).any()) for n in mask)  # inside the mask only
    chosen = torch.cat([saliency[n][sel[n]] for n in sel])
    left = torch.cat([saliency[n][mask[n] & ~sel[n]] for n in sel])
    assert float(chosen.min()) >= float(left.max())  # the most salient masked entries


@pytest.mark.parametrize("mode", ["zero", "random"])
def test_exactly_the_chosen_entries_are_reset_and_outside_the_mask_stays_the_base(mode, erase_config, recorded,
                                                                                   dummy_pipeline_dir):
    result = erase(erase_config(reinit_fraction=0.2, reinit_mode=mode, max_train_steps=2))
    mask, _ = load_mask(result.mask_path)
    base = {n: p.detach() for n, p in denoiser(load_base_pipeline(dummy_pipeline_dir)).named_parameters()}
    (selection, after), = recorded  # one reset, before training
    masked = sum(int(m.sum()) for m in mask.values())
    assert sum(int(s.sum()) for s in selection.values()) == round(0.2 * masked)
    for n, b in base.items():
        sel = selection.get(n, torch.zeros_like(mask[n]))
        assert not bool((sel & ~mask[n]).any()), n
        assert torch.equal(after[n][~sel], b[~sel]), n  # nothing else moved
        if mode == "zero":
            assert bool((after[n][sel] == 0).all()), n
        elif float(b.std()) > 0:  # a constant tensor (a fresh norm's ones) draws its own value again
            assert bool((after[n][sel] != b[sel]).all()), n
    assert changed_inside_mask(result, dummy_pipeline_dir) > 0  # trained; outside the mask bit-identical
    assert result.metrics["reinit_weights"] == round(0.2 * masked)


def test_fraction_zero_is_salun_bit_for_bit(erase_config, recorded, tmp_path):
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), max_train_steps=2))
    off = erase(erase_config(output_dir=str(tmp_path / "off"), max_train_steps=2, reinit_fraction=0.0,
                             reinit_mode="random"))
    assert _same(plain, off) and not recorded
    on = erase(erase_config(output_dir=str(tmp_path / "on"), max_train_steps=2, reinit_fraction=0.2))
    assert not _same(plain, on)  # the reset changes the result


def test_resumed_run_equals_an_uninterrupted_one_and_does_not_reset_again(erase_config, killed_and_resumed,
                                                                          recorded, tmp_path):
    kw = dict(max_train_steps=4, reinit_fraction=0.2, reinit_mode="random")
    full = erase(erase_config(output_dir=str(tmp_path / "full"), **kw))
    resumed = killed_and_resumed(**kw)
    assert len(recorded) == 2  # the uninterrupted run and the killed one reset; the resumed one did not
    assert _same(full, resumed)


def test_bad_values_are_refused_in_one_line(erase_config, tmp_path):
    with pytest.raises(ValueError, match="--reinit_fraction must be <= 1"):
        erase_config(reinit_fraction=1.5)
    with pytest.raises(ValueError, match="--reinit_fraction must be >= 0"):
        erase_config(reinit_fraction=-0.1)
    with pytest.raises(ValueError, match="--reinit_mode must be zero or random"):
        erase_config(reinit_fraction=0.1, reinit_mode="gauss")
    with pytest.raises(ValueError, match="does not apply to --method esd-x"):
        erase_config(method="esd-x", reinit_fraction=0.1, learning_rate=None, max_train_steps=None,
                     adam_weight_decay=None, num_forget_images=None, num_retain_images=None,
                     data_num_inference_steps=None, train_batch_size=None)
    config = erase_config(reinit_fraction=0.1)
    with pytest.raises(ValueError, match="--reinit_fraction resets unsharded weights"):
        check_reinit_fits(config, sharded=True)
    with pytest.raises(ValueError, match="drop --mask_path"):
        check_reinit_fits(erase_config(reinit_fraction=0.1, mask_path=str(tmp_path / "m.safetensors")), False)
    with pytest.raises(ValueError, match="--reinit_distill.*--relearn_rho"):
        check_reinit_fits(erase_config(reinit_fraction=0.1, reinit_distill=True, relearn_rho=0.5), False)
    with pytest.raises(ValueError, match="--reinit_retain_weight needs retain images"):
        erase(erase_config(reinit_fraction=0.1, reinit_retain_weight=1.0, num_retain_images=0))
    check_reinit_fits(erase_config(), sharded=True)  # off: nothing to refuse
    with pytest.raises(ValueError) as refused:
        erase_config(reinit_fraction=2.0)
    assert "\n" not in str(refused.value)  # one line


def test_retain_aware_ranking_and_distillation_train_only_inside_the_mask(erase_config, recorded, dummy_pipeline_dir,
                                                                           tmp_path):
    """``--reinit_retain_weight`` ranks by the retain-discounted saliency (another selection, still inside the mask);
    ``--reinit_distill`` trains towards the frozen base's predictions (another result); both keep every weight outside
    the mask bit-identical to the base."""
    kw = dict(max_train_steps=2, reinit_fraction=0.2, forget_uncond_weight=1.0)
    plain = erase(erase_config(output_dir=str(tmp_path / "plain"), **kw))
    aware = erase(erase_config(output_dir=str(tmp_path / "aware"), reinit_retain_weight=10.0, **kw))
    distill = erase(erase_config(output_dir=str(tmp_path / "distill"), reinit_distill=True, **kw))
    (sel_plain, _), (sel_aware, _), (sel_distill, _) = recorded
    mask, _ = load_mask(aware.mask_path)
    assert all(not bool((sel_aware[n] & ~mask[n]).any()) for n in sel_aware)
    assert any(not torch.equal(sel_plain[n], sel_aware[n]) for n in sel_plain)
    assert all(torch.equal(sel_plain[n], sel_distill[n]) for n in sel_plain)  # the same reset, other targets
    assert not _same(plain, distill)
    for run in (aware, distill):
        assert changed_inside_mask(run, dummy_pipeline_dir) > 0
    with pytest.raises(ValueError, match="--reinit_retain_weight must be >= 0"):
        erase_config(reinit_fraction=0.1, reinit_retain_weight=-1.0)
