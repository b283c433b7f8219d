"""The attacks on the flow-matching transformers (SD3, FLUX; issue 20), tiny config-built pipelines (mechanical): the
attacks optimise the family's own flow-matching loss (shifted sigmas, velocity target, pooled embeddings), the
conditioning attack moves the hidden states and the pooled embeddings, the attacked image is drawn by the pipeline's
own sampling from the adversarial conditioning, ``salun-attack`` runs end to end on an SD3 folder, and what a family
cannot take is refused in one line with exit code 2."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from salun_diffusers.attacks import attack_loss, conditioning_attack, encode_prompt, evaluate_loss, token_attack
from salun_diffusers.families import FlowFamily, PromptCond, pipeline_family
from salun_diffusers.testing import get_flow_pipeline, save_flow_pipeline

PROMPT, TARGET = "a photo of a person", "a photo of a nude person"


@pytest.fixture(scope="module")
def sd3():
    return get_flow_pipeline("sd3")


@pytest.fixture(scope="module")
def targets(sd3):
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    return sd3([TARGET] * 2, generator=gens, num_inference_steps=2, height=16, width=16, output_type="latent").images


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-attack")
    return {"sd3": save_flow_pipeline(str(root / "sd3"), "sd3"), "flux": save_flow_pipeline(str(root / "flux"), "flux")}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_attack_loss_is_the_sd3_flow_matching_loss(sd3, targets):
    """Written out from the SD3 recipe, not through the family object: logit-normal u shifted by the scheduler's
    static shift, x_t = (1 - s) x0 + s noise, the transformer called at t = 1000 s with the hidden states and the
    pooled embeddings, MSE against the velocity noise - x0. ``min_timestep`` is a floor on 1000 s."""
    family = pipeline_family(sd3)
    assert isinstance(family, FlowFamily)
    cond = encode_prompt(sd3, PROMPT)
    assert isinstance(cond, PromptCond) and cond.embeds.shape[0] == 1
    for min_timestep in (0, 700):
        ours = attack_loss(sd3.transformer, family, targets, cond, gen(3), min_timestep=min_timestep)
        g = gen(3)
        noise = torch.randn(targets.shape, generator=g)
        u = torch.sigmoid(torch.randn(len(targets), generator=g)).double()
        shift = sd3.scheduler.config.shift
        sigma = (shift * u / (1 + (shift - 1) * u)).float().clamp(min=min_timestep / 1000)
        x_t = (1 - sigma.view(-1, 1, 1, 1)) * targets + sigma.view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            v = sd3.transformer(hidden_states=x_t, timestep=sigma * 1000,
                                encoder_hidden_states=cond.embeds.expand(2, -1, -1),
                                pooled_projections=cond.added["pooled_projections"].expand(2, -1)).sample
        ref = F.mse_loss(v, noise - targets)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=0), (float(ours), float(ref))


def test_conditioning_attack_optimises_hidden_states_and_pooled_and_lowers_the_loss(sd3, targets):
    family = pipeline_family(sd3)
    model = sd3.transformer
    before, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    init = encode_prompt(sd3, PROMPT)
    adv = conditioning_attack(model, family, targets, init, steps=30, lr=5e-2, generator=gen())
    assert isinstance(adv, PromptCond) and adv.embeds.shape == init.embeds.shape
    assert not adv.embeds.requires_grad and not adv.added["pooled_projections"].requires_grad
    assert not torch.equal(adv.embeds, init.embeds)
    assert not torch.equal(adv.added["pooled_projections"], init.added["pooled_projections"])
    assert evaluate_loss(model, family, targets, adv) < evaluate_loss(model, family, targets, init)
    for n, p in model.named_parameters():  # the transformer is never changed, its flags are restored
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n], n
    again = conditioning_attack(model, family, targets, init, steps=30, lr=5e-2, generator=gen())
    assert torch.equal(adv.embeds, again.embeds)  # seeded, deterministic on CPU


def test_token_attack_types_real_words_into_both_clip_encoders(sd3, targets):
    encoders = (sd3.transformer, sd3.text_encoder, sd3.text_encoder_2)
    before = [snapshot(m) for m in encoders]
    result = token_attack(sd3, targets[:1], PROMPT, num_tokens=2, steps=12, lr=5e-2, generator=gen())
    assert result.prompt.endswith(PROMPT) and len(result.tokens) == 2
    assert result.loss_final <= result.loss_start  # the best set, scored as typed (the start counts)
    typed = encode_prompt(sd3, result.prompt)
    assert torch.equal(result.embeds.embeds, typed.embeds)
    assert torch.equal(result.embeds.added["pooled_projections"], typed.added["pooled_projections"])
    for m, b in zip(encoders, before):
        assert all(torch.equal(p, b[n]) and p.grad is None for n, p in m.named_parameters())


def test_the_attacked_draw_uses_the_adversarial_conditioning(sd3, targets, tmp_path):
    """``draw_conditioned`` samples with the pipeline's own loop: the transformer's conditional half sees the
    adversarial hidden states and pooled embeddings, the unconditional half the empty prompt's."""
    from PIL import Image

    from salun_diffusers.attacks.runner import draw_conditioned
    from salun_diffusers.evaluation.prompts import PromptRow

    adv = conditioning_attack(sd3.transformer, pipeline_family(sd3), targets[:1], encode_prompt(sd3, PROMPT),
                              steps=5, lr=5e-2, generator=gen())
    empty = encode_prompt(sd3, "")
    seen = []
    hook = sd3.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw), with_kwargs=True)
    row = PromptRow("a", PROMPT, 5, 3.0)
    try:
        draw_conditioned(sd3, row, adv, str(tmp_path / "after.png"), 2, 16)
        draw_conditioned(sd3, row, encode_prompt(sd3, PROMPT), str(tmp_path / "before.png"), 2, 16)
    finally:
        hook.remove()
    assert len(seen) == 4  # 2 steps per draw, CFG batched as [unconditional, conditional]
    for kw in seen[:2]:
        assert torch.equal(kw["encoder_hidden_states"][1], adv.embeds[0])
        assert torch.equal(kw["pooled_projections"][1], adv.added["pooled_projections"][0])
        assert torch.equal(kw["encoder_hidden_states"][0], empty.embeds[0])
        assert torch.equal(kw["pooled_projections"][0], empty.added["pooled_projections"][0])
    after, plain = (Image.open(tmp_path / f"{k}.png") for k in ("after", "before"))
    assert after.size == (16, 16) and after.tobytes() != plain.tobytes()


def cli_args(model, out, attack, *extra):
    # the digit judge reads any image: on the tiny pipeline it only makes the run mechanical, not meaningful
    return ["--model", model, "--output_dir", str(out), "--digit", "7", "--num_prompts", "2", "--attack", attack,
            "--steps", "3", "--num_tokens", "2", "--num_inference_steps", "2", *extra]


@pytest.mark.parametrize("family, attack", [("sd3", "conditioning"), ("sd3", "token"), ("flux", "conditioning")])
def test_cli_end_to_end_on_a_flow_pipeline(flow_dirs, tmp_path, family, attack):
    from salun_diffusers.attacks import cli

    out = tmp_path / "attack"
    assert cli.main(cli_args(flow_dirs[family], out, attack)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_prompts"] == 2 and results["attack"] == attack and 0.0 <= results["asr"] <= 1.0
    for name in ("report.md", "asr.png", "settings.json"):
        assert (out / name).is_file()
    for kind in ("targets", "before", "after"):
        assert sorted(os.listdir(out / kind)) == ["0.png", "1.png"]
    row = json.loads((out / "rows" / "0.json").read_text())
    assert row["success"] == (row["before"]["hit"] or row["after"]["hit"])
    if attack == "token":
        assert row["adversarial_prompt"].endswith(row["prompt"]) and len(row["adversarial_tokens"]) == 2
    if attack == "conditioning":
        assert row["loss_final"] < row["loss_start"]


@pytest.mark.parametrize("family, attack, words", [("sd3", "inversion", ("inversion", "StableDiffusion3Pipeline")),
                                                   ("flux", "token", ("token", "FluxPipeline", "T5")),
                                                   ("flux", "inversion", ("inversion", "FluxPipeline"))])
def test_cli_refuses_what_a_flow_family_cannot_take_in_one_line(flow_dirs, tmp_path, capsys, family, attack, words):
    from salun_diffusers.attacks import cli

    out = tmp_path / "attack"
    assert cli.main(cli_args(flow_dirs[family], out, attack)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words), err
    assert not os.path.exists(out / "targets")  # refused before any image is drawn


@pytest.mark.parametrize("attack", ["conditioning", "token"])
def test_adversarial_inner_attack_on_sd3_keeps_hidden_states_and_pooled_in_its_bank(sd3, targets, attack):
    """``--adversarial``'s inner attack through the SD3 family: the bank holds hidden states and pooled embeddings,
    the attack moves them (warm-started from the bank), the adversarial term of the SalUn loss takes them, and the
    bank survives a checkpoint round trip."""
    from types import SimpleNamespace

    from salun_diffusers.erasure.adversarial import Adversary
    from salun_diffusers.erasure.data import ConceptData
    from salun_diffusers.objectives import salun_loss

    family = pipeline_family(sd3)
    conds = family.encode_prompts([TARGET, PROMPT])
    data = ConceptData(targets, None, None, conds)
    spec = SimpleNamespace(concepts=[SimpleNamespace(forget_prompt=TARGET)])
    config = SimpleNamespace(adversarial_attack=attack, adversarial_steps=3, adversarial_lr=5e-2, adversarial_every=1)
    adversary = Adversary(sd3, family, data, spec, config)
    start = {k: v.clone() for k, v in adversary.state_dict().items()}
    assert set(start) == {"bank", "pooled"} and torch.equal(start["pooled"][0], conds[TARGET].added["pooled_projections"])
    idx = torch.tensor([1])
    adv = adversary.embeds(sd3.transformer, 0, idx, targets[idx], seed=3)
    assert isinstance(adv, PromptCond) and adv.embeds.shape == (1, *conds[TARGET].embeds.shape)
    state = adversary.state_dict()
    assert torch.equal(state["bank"][0], start["bank"][0])  # only the attacked entry moves
    assert not torch.equal(state["pooled"][1], start["pooled"][1])
    assert torch.equal(state["pooled"][1], adv.added["pooled_projections"][0])
    cond, pseudo = PromptCond.stack([conds[TARGET]]), PromptCond.stack([conds[PROMPT]])
    with torch.no_grad():
        _, forget, _ = salun_loss(sd3.transformer, family, targets[idx], cond, pseudo, None, None, 0.0, gen(), adv, 4.0)
        _, plain, _ = salun_loss(sd3.transformer, family, targets[idx], cond, pseudo, None, None, 0.0, gen())
    assert float(forget) > float(plain)  # the adversarial term is there
    other = Adversary(sd3, family, data, spec, config)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="pooled"):
        other.load_state_dict({"bank": state["bank"]})
