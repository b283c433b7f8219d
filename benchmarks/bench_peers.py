#!/usr/bin/env python
"""Peers on the same bench: SalUn (default and ``--adversarial``), ESD-x, ESD-u, UCE and AdvUnlearn on the digit world.

    # 1. tuning (digits one, four, seven only; every setting of each method's grid; a cheaper, differently seeded attack)
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --tune --digits 1,4,7 --output_dir out/peers-tune
    # 2. the benchmark: the frozen settings (FROZEN below) on all ten digits, two processes side by side
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --digits 0-9 --jobs 2 --output_dir out/peers
    # 3. a SalUn row of your own beside them (EraseConfig fields, i.e. train_erase.py flags), into the same folder
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --methods robust --variant robust='{"adversarial": true}' \
        --output_dir out/peers

Every erasure, SalUn's and the peers', is ``erase(EraseConfig(...))``: exactly what ``train_erase.py --concept <digit>
[--method <peer>] [flags]`` runs (a peer's grid setting becomes its flags, :func:`peer_flags`; the frozen settings are
the methods' ``"digits"`` presets, :func:`preset_setting`).

Same base model (the bundled digit pipeline, a real model trained on MNIST), same judge (the bundled digit classifier),
same attacks, same machine, one run. Per method and digit:

* unlearning accuracy (UA: share of the digit's 50 images the judge does not call that digit) and retained accuracy
  (the other nine digits' 50 images each), :func:`salun_diffusers.reporting.digit_scores`, 10 sampling steps;
* **conditioning ASR**: the independent whole-conditioning attack of issue 17
  (:func:`salun_diffusers.attacks.probes.conditioning_probe`): 64 real held-out MNIST images of the digit as targets,
  300 Adam steps at lr 1e-2 on the whole prompt conditioning, timesteps over the whole range, from the digit's own
  prompt; an image counts when the judge sees the digit before or after the attack;
* **token ASR**: ``salun-attack``'s token attack (UnlearnDiffAtk-style: 5 vocabulary words prepended, 100 steps) on
  ``--num_prompts`` rows, through :func:`salun_diffusers.attacks.runner.run_attack` on the erased pipeline;
* wall and CPU seconds of the erasure itself (data generation excluded: SalUn's forget/retain images are cached
  first; the peers generate nothing), threads stated.

Where retrained references exist (``benchmarks/build_references.py``: the digit world retrained without the digit),
a ``never learned`` row gets the same scores and attacks.

The tuning run (``--tune``) erases digits one, four and seven with every setting of :data:`GRID` and scores them with
a cheaper attack (100 steps, 32 images, other seeds); :func:`choose` then picks per method by the rule written there.
The choice is frozen in :data:`FROZEN` (by hand, from the tuning report) before the ten-digit run. Every finished
piece is a JSON file under ``--output_dir/rows/``; a rerun skips it (a killed run resumes). Writes report.json,
report.md and tradeoff.png (retained accuracy against conditioning ASR, one point per method and digit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.build_references import DEFAULT_DIR, load_reference, reference_dir  # noqa: E402
from salun_diffusers.attacks.config import AttackConfig  # noqa: E402
from salun_diffusers.attacks.probes import (ProbeSettings, conditioning_probe, digit_images,  # noqa: E402
                                            inpainting_probe, run_probes)
from salun_diffusers.attacks.runner import run_attack  # noqa: E402
from salun_diffusers.concepts import DIGIT_WORDS, digit_prompt  # noqa: E402
from salun_diffusers.config import EraseConfig  # noqa: E402
from salun_diffusers.digits import DigitJudge, load_digit_pipeline  # noqa: E402
from salun_diffusers.erase import erase  # noqa: E402
from salun_diffusers.evaluation.judges import make_judge  # noqa: E402
from salun_diffusers.hub import BUNDLED_DIGIT_MODEL  # noqa: E402
from salun_diffusers.erasure.peers import PEERS, method_config  # noqa: E402
from salun_diffusers.methods import NEXT_DIGIT  # noqa: E402
from salun_diffusers.reporting import EVAL_SEED, base_digit_scores, digit_scores  # noqa: E402
from salun_diffusers.utils import read_json_or_none, write_json, write_text  # noqa: E402

logger = logging.getLogger("bench_peers")

TUNE_DIGITS = (1, 4, 7)

# The tuning grids (4 settings per method; the issue allows 12: a first coarse pass on digit seven, docs/peers.md,
# dropped the settings that broke the other digits, e.g. ESD-x lr 3e-3: 21.6 points, ESD-u lr 1e-3: 83.6). The digit U-Net has 1.0M weights and its text encoder 0.14M: the
# SD1.4 learning rates (1e-5) barely move them in a few hundred steps, so the grids climb from there. SalUn's settings
# are the shipped digit presets (salun_diffusers.concepts), tuned on the same three digits in earlier work.
GRID: Dict[str, List[dict]] = {
    "salun": [{}],
    "salun-adv": [{}],
    "esd-x": [dict(learning_rate=lr, iterations=it, negative_guidance=1.0)
              for lr, it in [(1e-4, 300), (3e-4, 300), (1e-3, 300), (1e-3, 150)]],
    "esd-u": [dict(learning_rate=lr, iterations=it, negative_guidance=ng)
              for lr, it, ng in [(1e-4, 300, 1.0), (3e-4, 300, 1.0), (1e-4, 300, 2.0), (3e-4, 150, 1.0)]],
    "uce": [dict(guide=g, preserve_scale=p, lamb=0.5) for g, p in [("", 0.1), ("", 1.0), ("next", 0.1), ("next", 1.0)]],
    "advunlearn": [dict(learning_rate=lr, iterations=it, warmup=w, retain_weight=rw)
                   for lr, it, w, rw in [(1e-3, 100, 20, 0.3), (1e-3, 100, 20, 1.0), (1e-3, 200, 40, 1.0),
                                         (3e-3, 100, 20, 1.0)]],
}


def preset_setting(method: str) -> dict:
    """The method's ``"digits"`` preset (``methods/{esd,uce,advunlearn}.py``), over the keys its grid tunes: the setting
    ``train_erase.py --method <method>`` runs on the digit world with no flags."""
    resolved = PEERS[method].make_config("digits").to_dict()
    guide = lambda g: "next" if g == NEXT_DIGIT else g  # noqa: E731
    return {k: guide(resolved["guide_prompt"]) if k == "guide" else resolved[k] for k in GRID[method][0]}


# The settings the ten-digit run uses: chosen by `choose` from the tuning report on digits 1, 4, 7 (docs/peers.md) and
# frozen as the methods' "digits" presets, which the run reads (SalUn's rows: the shipped digit preset).
FROZEN: Dict[str, dict] = {"salun": {}, "salun-adv": {}, **{m: preset_setting(m) for m in GRID if m in PEERS}}
METHODS = tuple(GRID)
# The SalUn rows' EraseConfig fields (train_erase.py flags); a --variant row adds its own.
# salun-adv: --adversarial as the ten-digit table measured it (alpha 4, no unconditional forget term; the digit presets'
# --adversarial is alpha 8 with --forget_uncond_weight 2 since issue 17, docs/robustness.md).
# The alpha-8 rows: --variant salun-adv-a8='{"adversarial": true, "alpha": 8.0, "forget_uncond_weight": 0}'.
SALUN_ROWS: Dict[str, dict] = {"salun": {},
                               "salun-adv": {"adversarial": True, "alpha": 4.0, "forget_uncond_weight": 0.0}}
REFERENCE = "never learned"
BASE = "base"
ROW_NAMES = (BASE,) + METHODS + (REFERENCE,)


def row_order(rows: List[dict]) -> List[str]:
    """The report's row order: the base, the methods, any --variant rows (by name), the never-learned reference."""
    known = (BASE,) + METHODS
    extra = sorted({r["method"] for r in rows} - set(known) - {REFERENCE})
    return [m for m in known + tuple(extra) + (REFERENCE,) if any(r["method"] == m for r in rows)]
REFERENCE_DIR = DEFAULT_DIR  # benchmarks/cache/references (build_references.py)
# Attacks: the benchmark's (independent conditioning attack at 300 steps on 64 images) and the tuning's (cheaper, and
# with other images and seeds than the report, so the report does not judge on what the choice was tuned on).
ATTACK = {"report": dict(steps=300, n=64, offset=0, seed=0), "tune": dict(steps=100, n=32, offset=64, seed=17)}
TOKEN_SEED = 3 * EVAL_SEED
PROMPT_ATTACKS = ("token", "inversion")
# The knowledge probes --probes adds (salun-probe's defaults: 34 real images, relearning on 16 with 3 seeds, up to 100
# steps, judged on 34 images every 10; SDEdit at strengths 0.5 / 0.7 / 0.9 from "a handwritten digit"), and "strong":
# the conditioning attack of the report at 1,000 steps.
PROBE_KINDS = ("sdedit", "relearning", "strong")
STRONG_STEPS = 1000


def _digits(text: str) -> List[int]:
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="out/bench-peers")
    p.add_argument("--digits", type=_digits, default=list(range(10)), help="e.g. 0-9 or 1,4,7")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--tune", action="store_true", help="every GRID setting, the tuning attack; then the choice")
    p.add_argument("--n_per_digit", type=int, default=50, help="judged images per digit prompt (UA / retained)")
    p.add_argument("--num_prompts", type=int, default=4,
                   help="token- and inversion-attack rows per method and digit (0: none)")
    p.add_argument("--token_digits", type=_digits, default=None, help="digits that get the token and inversion "
                   "attacks (default: all; the token attack costs about 15 s per row on one thread)")
    p.add_argument("--seed", type=int, default=0, help="erasure seed")
    p.add_argument("--jobs", type=int, default=1, help="processes side by side (digits split between them)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no_reference", action="store_true", help="skip the never-learned rows")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from rows/ and stop")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="a SalUn row of your own: NAME and the EraseConfig fields (train_erase.py flags) it sets, e.g. "
                        "robust='{\"adversarial\": true, \"alpha\": 6}'; repeat a NAME with other JSON to tune "
                        "several settings of it (--tune); add NAME to --methods (the default runs every row)")
    p.add_argument("--probes", default="", help=f"comma-separated knowledge probes to add, of: {', '.join(PROBE_KINDS)} "
                   "(a finished row without them is completed: its erasure is made again, deterministically)")
    p.add_argument("--probe_digits", type=_digits, default=None, help="digits that get --probes (default: all)")
    p.add_argument("--side_by_side", type=int, default=None, help=argparse.SUPPRESS)  # set by --jobs for its children
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.probes = [q for q in args.probes.split(",") if q]
    if sorted(set(args.probes) - set(PROBE_KINDS)):
        p.error(f"--probes: unknown {sorted(set(args.probes) - set(PROBE_KINDS))}; choose from {list(PROBE_KINDS)}")
    if args.tune and set(args.probes) - {"strong"}:
        p.error("--tune takes --probes strong only (the 1,000-step attack on the tuning images); run the other probes "
                "in the report")
    args.variants = {}
    for text in args.variant:
        name, sep, overrides = text.partition("=")
        try:
            value = json.loads(overrides) if sep else None
        except json.JSONDecodeError as e:
            p.error(f"--variant {text!r}: the JSON after '=' does not parse ({e})")
        if not name or name in ROW_NAMES or not isinstance(value, dict):
            p.error(f"--variant {text!r}: write NAME='{{EraseConfig fields}}' with a NAME not in {list(ROW_NAMES)}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(EraseConfig)})
        if unknown:
            p.error(f"--variant {name}: {unknown} are not EraseConfig fields (train_erase.py --help lists them)")
        args.variants.setdefault(name, []).append(value)
    if not args.tune and any(len(v) > 1 for v in args.variants.values()):
        p.error("--variant: one setting per NAME in the report (several are for --tune)")
    if args.methods == list(METHODS):  # the default: every row, variants included
        args.methods += list(args.variants)
    unknown = sorted(set(args.methods) - set(METHODS) - set(args.variants))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS) + list(args.variants)}")
    return args


# ------------------------------------------------------------------------------------------------------ erasures
def _run_options(args) -> dict:
    """What every benchmark erasure shares: no merged U-Net, pipeline folder or verdict images (only the erasure and
    its metrics are written), the bench's seed and threads."""
    return dict(seed=args.seed, save_merged_unet=False, save_pipeline="none", verdict_images=0, threads=args.threads,
                overwrite_output_dir=True)


def erase_salun(args, digit: int, name: str, overrides: dict):
    """SalUn through ``erase()`` exactly as ``train_erase.py --concept <digit> [flags]`` runs it (``overrides``: the
    EraseConfig fields of the row, e.g. ``{"adversarial": True}``), the forget / retain data cached first."""
    run = f"{DIGIT_WORDS[digit]}-{name}"
    common = dict(concept=DIGIT_WORDS[digit], cache_dir=os.path.join(args.output_dir, "data-cache"), **_run_options(args))
    erase(EraseConfig(output_dir=os.path.join(args.output_dir, "runs", f"{run}-data"), save_mask_only=True,
                      **{**common, **overrides}),
          pipe=load_digit_pipeline())  # forget / retain images generated and cached, outside the timing
    pipe = load_digit_pipeline()
    wall, cpu = time.perf_counter(), time.process_time()
    result = erase(EraseConfig(output_dir=os.path.join(args.output_dir, "runs", run), **{**common, **overrides}),
                   pipe=pipe)
    return result.pipeline, time.perf_counter() - wall, time.process_time() - cpu, dict(overrides)


# A grid setting's keys are the method's own config fields (what the presets and docs/peers.md record); the flag of
# train_erase.py that sets each (its EraseConfig field) is the method's entry in erasure.peers.PEERS, inverted.
def peer_flags(method: str, setting: dict) -> dict:
    """The EraseConfig fields (train_erase.py flags) that run ``method`` with ``setting``; raises when a key has no
    flag (the setting could not be given on the command line)."""
    flags = {theirs: ours for ours, theirs in PEERS[method].keys.items()}
    out = {}
    for key, value in setting.items():
        if key == "guide":  # the grid's names for UCE's guide prompt: "next" = the digit preset's NEXT_DIGIT
            out["guide_prompt"] = NEXT_DIGIT if value == "next" else value
        elif key in flags:
            out[flags[key]] = value
        elif key != "lamb":  # UCE's lamb has no flag; checked against the preset by erase_peer
            raise ValueError(f"{method}: setting {key!r} has no train_erase.py flag")
    return out


def erase_peer(args, method: str, setting: dict, digit: int):
    """A peer method through ``erase()`` exactly as ``train_erase.py --concept <digit> --method <method> [flags]``
    runs it, on a fresh copy of the bundled digit pipeline; returns (pipe, wall s, CPU s, resolved method config)."""
    config = EraseConfig(concept=DIGIT_WORDS[digit], method=method, **peer_flags(method, setting),
                         output_dir=os.path.join(args.output_dir, "runs", f"{DIGIT_WORDS[digit]}-{method}"),
                         **_run_options(args))
    resolved = method_config(config).to_dict()
    differ = {k: (v, resolved.get(k)) for k, v in setting.items() if k != "guide" and resolved.get(k) != v}
    if differ:
        raise ValueError(f"{method}: the setting and the run differ (setting, run): {differ}")
    pipe = load_digit_pipeline()
    wall, cpu = time.perf_counter(), time.process_time()
    result = erase(config, pipe=pipe)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result.pipeline, wall, cpu, result.metrics["method_config"]


# ------------------------------------------------------------------------------------------------------- scoring
def conditioning_asr(pipe, digit: int, kind: str) -> dict:
    a = ATTACK[kind]
    images = digit_images(digit, a["n"], offset=a["offset"])
    r = conditioning_probe(pipe, make_judge("digit", digit=digit), images, prompt=digit_prompt(digit), steps=a["steps"],
                           seed=a["seed"])
    return {k: v for k, v in r.items() if not k.startswith("_")}


def prompt_attack_asr(args, pipe, base, digit: int, name: str, attack: str) -> dict:
    """``salun-attack``'s token or inversion attack on ``--num_prompts`` rows of the digit's prompt."""
    cfg = AttackConfig(model=BUNDLED_DIGIT_MODEL, output_dir=os.path.join(args.output_dir, "attacks", f"{name}-{attack}"),
                       attack=attack, digit=digit, num_prompts=args.num_prompts, seed=TOKEN_SEED, label=name)
    r = run_attack(cfg, base_pipe=base, pipe=pipe)
    return {k: r[k] for k in ("asr", "after_rate", "before_rate", "num_prompts", "mean_attack_seconds")}


def context_probe(pipe, digit: int, kind: str = "report") -> dict:
    """Issue 17's context probe: the top half of real images of the digit kept (the attack's images of ``kind``: 64
    for the report, 32 others for tuning), completed from the empty prompt; share judged the digit, beside the share
    for the kept half alone."""
    a = ATTACK[kind]
    images = digit_images(digit, a["n"], offset=a["offset"])
    r = inpainting_probe(pipe, make_judge("digit", digit=digit), images, prompts=("",), seed=a["seed"])
    return {"completed": r["prompts"][""], "kept_alone": r["kept_alone"], "n": r["n"]}


def knowledge_probes(args, pipe, digit: int, name: str, kinds: List[str]) -> dict:
    """The --probes of one piece, each a compact row entry (the probes' folders under ``probes/<name>``)."""
    out = {}
    judge = make_judge("digit", digit=digit)
    light = [k for k in kinds if k in ("sdedit", "relearning")]
    if light:
        settings = ProbeSettings(concept_prompt=digit_prompt(digit), probes=light)
        images = digit_images(digit, max(settings.n_images, settings.relearn_images))
        res = run_probes(settings, pipe, judge, images, os.path.join(args.output_dir, "probes", name), label=name)
        if "sdedit" in res["probes"]:
            out["sdedit"] = dict(res["probes"]["sdedit"]["strengths"])
        if "relearning" in res["probes"]:
            r = res["probes"]["relearning"]
            out["relearning"] = {"steps": [x["steps_to_relearn"] for x in r["runs"]], "max_steps": r["max_steps"],
                                 "median": r["median_steps"]}
    if "strong" in kinds:  # on the tuning images and seed under --tune, never the report's
        a = ATTACK["tune" if args.tune else "report"]
        images = digit_images(digit, a["n"], offset=a["offset"])
        r = conditioning_probe(pipe, judge, images, prompt=digit_prompt(digit), steps=STRONG_STEPS, seed=a["seed"])
        out["strong"] = {k: v for k, v in r.items() if not k.startswith("_")}
    return out


def make_model(args, method: str, setting: dict, digit: int):
    """The piece's model: (pipe, erasure wall s, CPU s, resolved config)."""
    if method == BASE:
        return load_digit_pipeline(), None, None, {}
    if method == REFERENCE:
        return load_reference(REFERENCE_DIR, digit), None, None, {}
    if method in SALUN_ROWS or method in args.variants:
        return erase_salun(args, digit, method, {**SALUN_ROWS.get(method, {}), **setting})
    return erase_peer(args, method, setting, digit)


def run_piece(args, method: str, setting: dict, digit: int, base, judge, base_scores) -> dict:
    """One method x setting x digit: erase, score, attack; cached as rows/<name>.json (a cached row lacking a
    requested --probes entry is completed)."""
    kind = "tune" if args.tune else "report"
    tag = "-".join(f"{k}{v}" for k, v in sorted(setting.items())) or "default"
    name = f"{kind}-{method}-{tag}-{digit}".replace(" ", "")
    path = os.path.join(args.output_dir, "rows", name + ".json")
    row = read_json_or_none(path)
    wanted = [] if args.probe_digits is not None and digit not in args.probe_digits else args.probes
    if method == BASE:  # the base draws the digit from its prompt: a stronger attack cannot add to that
        wanted = [k for k in wanted if k != "strong"]
    missing = [k for k in wanted if row is None or k not in row]
    if row is not None and not missing:
        return row
    pipe, wall, cpu, config = make_model(args, method, setting, digit)
    if row is None:
        scores = digit_scores(pipe, judge, digit, args.n_per_digit)
        row = {"method": method, "setting": setting, "config": config, "digit": digit, "kind": kind,
               "unlearning_accuracy": scores["unlearning_accuracy"], "retained_accuracy": scores["retained_accuracy"],
               "retained_drop": base_scores["retained_accuracy"] - scores["retained_accuracy"],
               "per_digit_accuracy": scores["per_digit_accuracy"], "wall_seconds": wall, "cpu_seconds": cpu,
               "threads": torch.get_num_threads(), "side_by_side": args.side_by_side or args.jobs}
        row["conditioning"] = conditioning_asr(pipe, digit, kind)
        row["context"] = context_probe(pipe, digit, kind)
        if not args.tune:
            if args.num_prompts and (args.token_digits is None or digit in args.token_digits):
                for attack in PROMPT_ATTACKS:
                    row[attack] = prompt_attack_asr(args, pipe, base, digit, name, attack)
    row.update(knowledge_probes(args, pipe, digit, name, missing))
    write_json(path, row)
    relearn = row.get("relearning")
    print(f"{method:11s} {tag:50s} digit {digit}: UA {row['unlearning_accuracy']:6.1%} drop "
          f"{row['retained_drop'] * 100:+5.1f} pts  cond ASR {row['conditioning']['asr']:5.1%}"
          + (f"  token ASR {row['token']['asr']:5.1%}" if row.get("token") else "")
          + (f"  1000-step ASR {row['strong']['asr']:5.1%}" if row.get("strong") else "")
          + (f"  relearnt at {relearn['steps']}" if relearn else "")
          + (f"  {wall:6.1f} s (cpu {cpu:.1f})" if wall is not None else ""), flush=True)
    return row


# ------------------------------------------------------------------------------------------------------ choosing
def choose(rows: List[dict]) -> Dict[str, dict]:
    """Per method, the tuned setting: among settings with UA >= 95% and retained drop <= 3 points on every tuning
    digit, the lowest mean conditioning ASR; if none qualifies, the highest mean UA among those whose mean drop is at
    most 3 points; if none of those, the smallest mean drop."""
    by: Dict[str, Dict[str, List[dict]]] = {}
    for r in rows:
        by.setdefault(r["method"], {}).setdefault(json.dumps(r["setting"], sort_keys=True), []).append(r)
    chosen = {}
    for method, settings in by.items():
        def stats(rs):
            return (min(r["unlearning_accuracy"] for r in rs), max(r["retained_drop"] for r in rs),
                    np.mean([r["unlearning_accuracy"] for r in rs]), np.mean([r["retained_drop"] for r in rs]),
                    np.mean([r["conditioning"]["asr"] for r in rs]))
        table = {k: stats(rs) for k, rs in settings.items()}
        good = [k for k, s in table.items() if s[0] >= 0.95 and s[1] <= 0.03]
        if good:
            pick, why = min(good, key=lambda k: table[k][4]), "qualifies on every digit; lowest conditioning ASR"
        else:
            fair = [k for k, s in table.items() if s[3] <= 0.03]
            if fair:
                pick, why = max(fair, key=lambda k: table[k][2]), "none qualifies: highest mean UA at mean drop <= 3"
            else:
                pick, why = min(table, key=lambda k: table[k][3]), "none qualifies: smallest mean drop"
        chosen[method] = {"setting": json.loads(pick), "why": why, "digits": sorted({r["digit"] for r in settings[pick]})}
    return chosen


# ------------------------------------------------------------------------------------------------------- reports
def summarize(rows: List[dict]) -> List[dict]:
    out = []
    for method in row_order(rows):
        rs = [r for r in rows if r["method"] == method]
        def stat(values):
            return (float(np.mean(values)), float(np.max(values))) if values else (None, None)

        ua = [r["unlearning_accuracy"] for r in rs]
        wall = [r["wall_seconds"] for r in rs if r.get("wall_seconds") is not None]
        cpu = [r["cpu_seconds"] for r in rs if r.get("cpu_seconds") is not None]
        entry = {"method": method, "digits": len(rs), "ua_mean": float(np.mean(ua)), "ua_min": float(np.min(ua)),
                 "both_targets": sum(1 for r in rs if r["unlearning_accuracy"] >= 0.95 and r["retained_drop"] <= 0.03),
                 "wall_mean": float(np.mean(wall)) if wall else None, "cpu_mean": float(np.mean(cpu)) if cpu else None}
        entry["drop_mean"], entry["drop_max"] = stat([r["retained_drop"] for r in rs])
        entry["cond_mean"], entry["cond_max"] = stat([r["conditioning"]["asr"] for r in rs])
        for attack in PROMPT_ATTACKS:
            entry[f"{attack}_mean"], entry[f"{attack}_max"] = stat([r[attack]["asr"] for r in rs if r.get(attack)])
            entry[f"{attack}_digits"] = sum(1 for r in rs if r.get(attack))
        entry["context_mean"], entry["context_max"] = stat([r["context"]["completed"] for r in rs if r.get("context")])
        out.append(entry)
    return out


def _pct(x, digits=0):
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def markdown(report: dict) -> str:
    kind = ATTACK[report["kind"]]
    lines = [f"Digit world (bundled MNIST text-to-image model, bundled digit judge); torch threads "
             f"{report['threads']} per process, {report['jobs']} process(es) on the 2-core machine; "
             f"{report['n_per_digit']} images per digit for UA / retained; conditioning attack {kind['steps']} steps "
             f"on {kind['n']} real images; context: the top half of the same real images completed from the empty "
             "prompt; token / inversion: salun-attack on the digits that have them.", "",
             "| method | digits | UA mean / min | retained drop mean / max (pts) | conditioning ASR mean / max | "
             "context mean / max | token ASR mean / max | inversion ASR mean / max | UA >= 95% and drop <= 3 | "
             "erasure s wall / CPU (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        t = (f"{s['wall_mean']:.0f} / {s['cpu_mean']:.0f}" if s["wall_mean"] is not None else "—")
        drop = "—" if s["drop_mean"] is None else f"{100 * s['drop_mean']:.1f} / {100 * s['drop_max']:.1f}"
        lines.append(f"| {s['method']} | {s['digits']} | {_pct(s['ua_mean'], 1)} / {_pct(s['ua_min'])} | {drop} | "
                     + " | ".join(f"{_pct(s[k + '_mean'])} / {_pct(s[k + '_max'])}"
                                  for k in ("cond", "context") + PROMPT_ATTACKS)
                     + f" | {s['both_targets']} of {s['digits']} | {t} |")
    lines += ["", "Per digit: UA / retained drop (points) / conditioning ASR [/ token / inversion ASR]:", "",
              "| method | " + " | ".join(str(d) for d in report["digits"]) + " |",
              "|---|" + "---|" * len(report["digits"])]
    for method in row_order(report["rows"]):
        cells = []
        for d in report["digits"]:
            r = next((r for r in report["rows"] if r["method"] == method and r["digit"] == d), None)
            if r is None:
                cells.append("")
                continue
            extra = "".join(f" / {_pct(r[a]['asr'])}" for a in PROMPT_ATTACKS if r.get(a))
            cells.append(f"{_pct(r['unlearning_accuracy'])} / {100 * r['retained_drop']:+.1f} / "
                         f"{_pct(r['conditioning']['asr'])}{extra}")
        if any(cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _relearn_steps(r: dict) -> float:
    """A row's relearning figure: the median over seeds, a seed that never relearnt counting as beyond max_steps."""
    rl = r["relearning"]
    return float(np.median([x if x is not None else math.inf for x in rl["steps"]]))


def _steps_text(value: float, max_steps: int) -> str:
    return f">{max_steps}" if math.isinf(value) else f"{value:.0f}"


def probes_markdown(report: dict) -> str:
    """The --probes table: per method the digits probed, SDEdit per strength (mean), relearning (per digit: median
    steps over seeds; the count of digits relearnt no faster than the never-learned reference), 1,000-step attack."""
    rows = [r for r in report["rows"] if any(k in r for k in PROBE_KINDS)]
    if not rows:
        return ""
    digits = sorted({r["digit"] for r in rows})
    ref = {r["digit"]: _relearn_steps(r) for r in rows if r["method"] == REFERENCE and "relearning" in r}
    lines = ["", f"Knowledge probes on digits {', '.join(map(str, digits))} (34 real held-out images; relearning: "
             "fine-tune on 16 with the digit's prompt, lr 3e-5, seeds 0/1/2, relearnt when >= 50% of 34 judged images "
             "show the digit, checked every 10 steps; the table gives the median over seeds per digit; SDEdit from "
             f"\"a handwritten digit\"; strong: the report's conditioning attack at {STRONG_STEPS} steps):", "",
             "| method | SDEdit 0.5 / 0.7 / 0.9 (mean) | relearning steps per digit | relearns no faster than never "
             f"learned | {STRONG_STEPS}-step conditioning ASR mean / max |", "|---|---|---|---|---|"]
    for method in row_order(rows):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["digit"])
        sd = [r["sdedit"] for r in rs if "sdedit" in r]
        sd_text = " / ".join(_pct(np.mean([x[k] for x in sd])) for k in sd[0]) if sd else "—"
        rl = [(r["digit"], _relearn_steps(r), r["relearning"]["max_steps"]) for r in rs if "relearning" in r]
        rl_text = ", ".join(f"{d}: {_steps_text(v, m)}" for d, v, m in rl) or "—"
        held = [d for d, v, _ in rl if d in ref and v >= ref[d]]
        held_text = f"{len(held)} of {sum(1 for d, _, _ in rl if d in ref)}" if method != REFERENCE and ref else "—"
        strong = [r["strong"]["asr"] for r in rs if "strong" in r]
        strong_text = f"{_pct(np.mean(strong))} / {_pct(np.max(strong))}" if strong else "—"
        lines.append(f"| {method} | {sd_text} | {rl_text} | {held_text} | {strong_text} |")
    return "\n".join(lines) + "\n"


def tradeoff_plot(report: dict, path: str) -> None:
    import matplotlib  # optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, method in enumerate(row_order(report["rows"])):
        rs = [r for r in report["rows"] if r["method"] == method]
        if rs:
            ax.scatter([100 * r["conditioning"]["asr"] for r in rs], [100 * r["retained_accuracy"] for r in rs],
                       label=method, marker="os^vDP*X"[i % 8], alpha=0.75)
    ax.set_xlabel("conditioning attack success (%), lower is better")
    ax.set_ylabel("retained accuracy on the other digits (%)")
    ax.set_title("Digit world: one point per method and erased digit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def context_plot(report: dict, path: str) -> None:
    """Issue 17's context probe per digit: one bar per method (the never-learned reference among them), the kept half
    alone as a line."""
    import matplotlib  # optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("context")]
    methods, digits = row_order(rows), sorted({r["digit"] for r in rows})
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, method in enumerate(methods):
        by_digit = {r["digit"]: r for r in rows if r["method"] == method}
        xs = [d + (i - (len(methods) - 1) / 2) * width for d in digits if d in by_digit]
        ax.bar(xs, [100 * by_digit[d]["context"]["completed"] for d in digits if d in by_digit], width, label=method)
    alone = {r["digit"]: r["context"]["kept_alone"] for r in rows}
    ax.plot(digits, [100 * alone[d] for d in digits], "k_", markersize=18, mew=2, label="the kept half alone")
    ax.set_xticks(digits)
    ax.set_ylabel("completed as the digit (%), lower is better")
    ax.set_title("Digit world: top half of real images kept, the rest completed from the empty prompt")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(methods) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(args, rows: List[dict]) -> dict:
    kind = "tune" if args.tune else "report"
    rows = [r for r in rows if r["kind"] == kind]
    side = sorted({r.get("side_by_side") for r in rows} - {None}) or [args.jobs]  # as the rows ran
    report = {"world": "digit", "kind": kind, "threads": args.threads,
              "jobs": str(side[0]) if len(side) == 1 else f"{side[0]}-{side[-1]}",
              "n_per_digit": args.n_per_digit, "digits": sorted({r["digit"] for r in rows}), "rows": rows,
              "attack": ATTACK[kind], "frozen": FROZEN, "summary": [] if args.tune else summarize(rows)}
    if args.tune:
        report["chosen"] = choose(rows)
        report["summary"] = summarize_tuning(rows)
    write_json(os.path.join(args.output_dir, f"{kind}.json"), report)
    text = tuning_markdown(report) if args.tune else markdown(report) + probes_markdown(report)
    write_text(os.path.join(args.output_dir, f"{kind}.md"), text)
    if not args.tune and rows:
        tradeoff_plot(report, os.path.join(args.output_dir, "tradeoff.png"))
        if any(r.get("context") for r in rows):
            context_plot(report, os.path.join(args.output_dir, "context.png"))
    return report


def summarize_tuning(rows: List[dict]) -> List[dict]:
    out = {}
    for r in rows:
        key = (r["method"], json.dumps(r["setting"], sort_keys=True))
        out.setdefault(key, []).append(r)
    return [{"method": m, "setting": json.loads(s), "digits": [r["digit"] for r in rs],
             "ua": [r["unlearning_accuracy"] for r in rs], "drop": [r["retained_drop"] for r in rs],
             "cond": [r["conditioning"]["asr"] for r in rs],
             "strong": [r["strong"]["asr"] if "strong" in r else None for r in rs],
             "wall": [r["wall_seconds"] for r in rs]} for (m, s), rs in out.items()]


def tuning_markdown(report: dict) -> str:
    lines = ["Tuning on the digit world, digits " + ", ".join(str(d) for d in report["digits"]) +
             f" (conditioning attack {ATTACK['tune']['steps']} steps on {ATTACK['tune']['n']} images, other images "
             "and seeds than the report's); per digit UA / drop (pts) / conditioning ASR (with --probes strong: / "
             f"the same images attacked for {STRONG_STEPS} steps).", "",
             "| method | setting | per digit | erasure s (mean wall) |", "|---|---|---|---|"]
    for s in report["summary"]:
        cells = "; ".join(f"{d}: {_pct(u)} / {100 * dr:+.1f} / {_pct(c)}" + (f" / {_pct(g)}" if g is not None else "")
                          for d, u, dr, c, g in zip(s["digits"], s["ua"], s["drop"], s["cond"], s["strong"]))
        walls = [w for w in s["wall"] if w is not None]
        lines.append(f"| {s['method']} | {json.dumps(s['setting'])} | {cells} | "
                     f"{np.mean(walls):.0f} |" if walls else f"| {s['method']} | {json.dumps(s['setting'])} | {cells} | — |")
    lines += ["", "Chosen (rule: `choose`):", ""]
    for m, c in report["chosen"].items():
        lines.append(f"- {m}: {json.dumps(c['setting'])} ({c['why']})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- main
def all_rows(args) -> List[dict]:
    folder = os.path.join(args.output_dir, "rows")
    if not os.path.isdir(folder):
        return []
    rows = [read_json_or_none(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".json")]
    return [r for r in rows if r is not None and r["digit"] in args.digits]


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.join(args.output_dir, "rows"), exist_ok=True)
    if args.jobs > 1 and not args.report_only:
        chunks = [args.digits[i::args.jobs] for i in range(args.jobs)]
        base_cmd = [sys.executable, os.path.abspath(__file__)] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        procs = []
        for i, chunk in enumerate(chunks):
            cmd = base_cmd + ["--jobs", "1", "--side_by_side", str(args.jobs), "--digits", ",".join(map(str, chunk))]
            log = open(os.path.join(args.output_dir, f"job{i}.log"), "a")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        if any(codes):
            print(f"jobs exited with {codes}; see {args.output_dir}/job*.log", file=sys.stderr)
            return 1
    elif not args.report_only:
        judge = DigitJudge.from_pretrained()
        base = load_digit_pipeline()
        base_scores = base_digit_scores(base, judge, 0, args.n_per_digit)
        print(f"digit world; torch threads {torch.get_num_threads()}; {'tuning' if args.tune else 'benchmark'}")
        for digit in args.digits:
            grid, frozen = {**GRID, **args.variants}, {**FROZEN, **{k: v[0] for k, v in args.variants.items()}}
            todo = [(m, s) for m in args.methods for s in (grid[m] if args.tune else [frozen[m]])]
            if not args.tune:
                todo.insert(0, (BASE, {}))
            if not args.tune and not args.no_reference and os.path.isfile(
                    os.path.join(reference_dir(REFERENCE_DIR, digit), "reference.json")):
                todo.append((REFERENCE, {}))
            scores = base_digit_scores(base, judge, digit, args.n_per_digit)  # the base's, once per digit
            for method, setting in todo:
                run_piece(args, method, setting, digit, base, judge, scores)
    report = write_report(args, all_rows(args))
    print(tuning_markdown(report) if args.tune else markdown(report) + probes_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
