#!/usr/bin/env python
"""Robustness of digit erasures on the digit world: three attacks against the base model, SalUn and SalUn --adversarial.

    nice -n 10 python benchmarks/bench_robustness.py --output_dir out/bench-robustness          # digits 1, 4, 7
    python benchmarks/bench_robustness.py --digits 7 --num_prompts 4 --n_per_digit 10 \\
        --ratios 0.5 --token_steps 20 --inversion_steps 40 --output_dir out/robustness-small   # a few minutes
    nice -n 10 python benchmarks/bench_robustness.py --pretrained_model_name_or_path salun-diffusers/digit-sd3 \\
        --models base,SalUn --ratios 0.5 --strong_conditioning_steps 0 --output_dir out/bench-robustness-sd3

For every digit: the base model, the default SalUn erasure (``salun_diffusers.erase``, mask ratio 0.5) and the
``--adversarial`` erasure (same recipe plus the inner attack), each attacked by the project's three attacks through
``salun_diffusers.attacks.runner.run_attack`` (what ``salun-attack`` runs: per prompt row, a target image drawn by the
base model from the digit's prompt and the row's seed, the attack against the attacked model's own denoising loss, the
image drawn again from the adversarial conditioning with the same seed, the bundled digit judge; a row succeeds when
the image before or after the attack shows the digit). The base model is attacked from a neutral prompt
(``--neutral_prompt``), the erasures from the digit's own prompt. UA (share of the digit's images the judge does not
call that digit) and retained accuracy (judge accuracy on the other nine prompts) come from
``salun_diffusers.reporting.digit_scores``. Then the conditioning attack's success rate against the mask ratio, beside
retained accuracy (``tradeoff.png``).

Writes report.json, report.md and tradeoff.png into --output_dir after every finished piece; erasures and attack runs
are kept under it and reused by a rerun with the same settings (a killed run resumes). This is the digit world (a
real model trained on real MNIST), not Stable Diffusion.

``--pretrained_model_name_or_path salun-diffusers/digit-sd3`` runs the same on the SD3-format digit world (a
flow-matching transformer): its erasures are ``train_erase.py --pretrained_model_name_or_path salun-diffusers/digit-sd3``'s
(the SD3 digit preset), the attacks go through its family object (flow-matching loss, hidden states + pooled
embeddings), and only the attacks it takes run by default (conditioning, token).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from salun_diffusers.attacks import DEFAULT_STEPS  # noqa: E402
from salun_diffusers.attacks.config import AttackConfig  # noqa: E402
from salun_diffusers.attacks.runner import run_attack  # noqa: E402
from salun_diffusers.concepts import DIGIT_WORDS  # noqa: E402
from salun_diffusers.config import EraseConfig  # noqa: E402
from salun_diffusers.delta import WEIGHTS_NAME  # noqa: E402
from salun_diffusers.digits import DigitJudge, load_digit_pipeline  # noqa: E402
from salun_diffusers.erase import erase  # noqa: E402
from salun_diffusers.attacks.core import ATTACK_REFUSALS  # noqa: E402
from salun_diffusers.families import load_base_pipeline, model_class_name  # noqa: E402
from salun_diffusers.hub import BUNDLED_DIGIT_MODEL, resolve_base_model  # noqa: E402
from salun_diffusers.loaders import load_erasure  # noqa: E402
from salun_diffusers.reporting import EVAL_SEED, base_digit_scores, digit_scores  # noqa: E402
from salun_diffusers.utils import read_json_or_none, write_json, write_text  # noqa: E402

logger = logging.getLogger("bench_robustness")
ATTACKS = ("conditioning", "token", "inversion")
MODELS = ("base", "SalUn", "SalUn --adversarial")
SALUN_RATIO = 0.5
STRONG = "conditioning_strong"  # the row key of the stronger conditioning attack
ATTACK_SEED = 2 * EVAL_SEED  # attacked rows use seeds ATTACK_SEED + 1000 * seed + i: never training or UA seeds


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="out/bench-robustness")
    p.add_argument("--pretrained_model_name_or_path", default=BUNDLED_DIGIT_MODEL,
                   help="the digit world: salun-diffusers/digit-sd (U-Net, default) or salun-diffusers/digit-sd3 "
                        "(SD3-format flow-matching transformer)")
    p.add_argument("--attacks", default=None,
                   help=f"comma-separated attacks of {', '.join(ATTACKS)} (default: every one the world's family takes)")
    p.add_argument("--digits", type=_ints, default=[7, 1, 4], help="digits erased and attacked (in this order)")
    p.add_argument("--num_prompts", type=int, default=10,
                   help="attacked prompt rows (seeds) per digit, model and attack")
    p.add_argument("--n_per_digit", type=int, default=20, help="judged images per digit prompt for UA / retained")
    for attack in ATTACKS:
        p.add_argument(f"--{attack}_steps", type=int, default=None,
                       help=f"{attack} attack steps (default: salun-attack's, {DEFAULT_STEPS[attack]})")
    p.add_argument("--strong_conditioning_steps", type=int, default=300,
                   help="budget of a second, stronger conditioning attack on the erasures and in the mask-ratio sweep "
                        "(0: none). At the CLI's 100 steps plain SalUn already resists on the digit world, which "
                        "would hide the difference --adversarial makes")
    p.add_argument("--sweep_prompts", type=int, default=None,
                   help="attack only the first N prompt rows in the mask-ratio sweep (default: --num_prompts)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models to attack per digit, of: {', '.join(MODELS)}")
    p.add_argument("--neutral_prompt", default="a handwritten digit", help="what the base model is attacked from")
    p.add_argument("--ratios", type=_floats, default=[0.1, 0.3, 0.5, 0.7, 1.0],
                   help="mask ratios of the trade-off sweep (conditioning attack + retained accuracy)")
    p.add_argument("--sweep_digits", type=_ints, default=None, help="digits of the sweep (default: all --digits)")
    p.add_argument("--seed", type=int, default=0, help="erasure seed; attack rows use seeds 20000000 + 1000*seed + i")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--merge", default=None, help="comma-separated report names in --output_dir (e.g. "
                   "report7,report1,report4 from processes run side by side): combine them into --report_name and stop")
    p.add_argument("--report_name", default="report", help="report files: <name>.json / .md (another name lets a "
                   "second process share --output_dir's erasures and attack runs, e.g. the sweep alone)")
    p.add_argument("--erase_args", default="{}", help="JSON of extra EraseConfig fields for every erasure")
    p.add_argument("--adversarial_args", default="{}",
                   help="JSON of extra EraseConfig fields for the --adversarial erasure, e.g. '{\"adversarial_every\": 1}'")
    args = p.parse_args(argv)
    args.erase_extra = json.loads(args.erase_args)
    args.adversarial_extra = json.loads(args.adversarial_args)
    if args.sweep_digits is None:
        args.sweep_digits = list(args.digits)
    family = model_class_name(args.pretrained_model_name_or_path)
    if args.attacks is None:
        args.attacks = [a for a in ATTACKS if (family, a) not in ATTACK_REFUSALS]
    else:
        args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        if not set(args.attacks) <= set(ATTACKS):
            p.error(f"--attacks must be of {', '.join(ATTACKS)}")
    return args


def load_world(args):
    """The digit world's base pipeline (a fresh one: erasures change their pipeline's weights)."""
    if args.pretrained_model_name_or_path == BUNDLED_DIGIT_MODEL:
        return load_digit_pipeline()
    return load_base_pipeline(resolve_base_model(args.pretrained_model_name_or_path))


# ------------------------------------------------------------------------------------------------------ erasures
def erase_config(args, digit: int, ratio: float, adversarial: bool, name: str, **more) -> EraseConfig:
    extra = {**args.erase_extra, **(args.adversarial_extra if adversarial else {}), **more}
    if args.pretrained_model_name_or_path != BUNDLED_DIGIT_MODEL:
        extra.setdefault("pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    return EraseConfig(concept=DIGIT_WORDS[digit], mask_ratio=ratio, output_dir=os.path.join(args.output_dir, "runs", name),
                       overwrite_output_dir=True, cache_dir=os.path.join(args.output_dir, "data-cache"), seed=args.seed,
                       save_merged_unet=False, save_pipeline="none", verdict_images=0, threads=args.threads,
                       adversarial=adversarial, **extra)


def prepare_data(args, digit: int) -> None:
    """Generate (cache) the digit's forget / retain images first, so that erasure timings compare training alone."""
    erase(erase_config(args, digit, SALUN_RATIO, False, f"{DIGIT_WORDS[digit]}-data", save_mask_only=True),
          pipe=load_world(args))


def erasure(args, digit: int, ratio: float, adversarial: bool, judge) -> dict:
    """Erase ``digit`` (cached in runs/<word>-<method>/ with its scores and timings); return the run record."""
    name = f"{DIGIT_WORDS[digit]}-r{ratio:g}" + ("-adversarial" if adversarial else "")
    cfg = erase_config(args, digit, ratio, adversarial, name)
    out = cfg.output_dir
    record_file = os.path.join(out, "bench_run.json")
    record = read_json_or_none(record_file)
    if record and record.get("config") == cfg.to_dict() and os.path.isfile(os.path.join(out, WEIGHTS_NAME)):
        print(f"  reusing {out}")
        return record
    wall, cpu = time.perf_counter(), time.process_time()
    result = erase(cfg, pipe=load_world(args))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    m = result.metrics
    scores = digit_scores(result.pipeline, judge, digit, args.n_per_digit)
    record = {"config": cfg.to_dict(), "digit": digit, "mask_ratio": ratio, "adversarial": adversarial,
              "folder": out, "wall_seconds": wall, "cpu_seconds": cpu, "data_seconds": m["data_seconds"],
              "train_seconds": m["train_seconds"], "unlearning_accuracy": scores["unlearning_accuracy"],
              "retained_accuracy": scores["retained_accuracy"], "per_digit_accuracy": scores["per_digit_accuracy"]}
    write_json(record_file, record)
    print(f"  erased {name}: UA {record['unlearning_accuracy']:.1%}, retained {record['retained_accuracy']:.1%}, "
          f"{wall:.0f}s wall ({m['data_seconds']:.0f}s data, {m['train_seconds']:.0f}s training), {cpu:.0f}s CPU")
    return record


def attacked_pipeline(args, folder):
    pipe = load_world(args)
    if folder:
        load_erasure(pipe, folder)
    return pipe


def attack(args, digit: int, model: str, folder, attack_name: str, base_pipe, pipe, steps=None, limit=None) -> dict:
    """One ``salun-attack`` run (resumable, in attacks/<word>-<model>-<attack>[-s<steps>]/); its results dict."""
    slug = {"base": "base", "SalUn": "salun", "SalUn --adversarial": "adversarial"}.get(model, model)
    steps = steps or getattr(args, f"{attack_name}_steps")
    name = f"{DIGIT_WORDS[digit]}-{slug}-{attack_name}" + (f"-s{steps}" if steps else "")
    cfg = AttackConfig(model=folder or args.pretrained_model_name_or_path, output_dir=os.path.join(
        args.output_dir, "attacks", name), attack=attack_name, digit=digit,
        from_prompt=args.neutral_prompt if folder is None else None, num_prompts=args.num_prompts, steps=steps,
        seed=ATTACK_SEED + 1000 * args.seed, label=f"{model} ({DIGIT_WORDS[digit]})", limit=limit)
    t0 = time.perf_counter()
    results = run_attack(cfg, base_pipe=base_pipe, pipe=pipe)
    print(f"  {model:20s} {attack_name:12s} ASR {results['asr']:.0%} (after {results['after_rate']:.0%}, "
          f"before {results['before_rate']:.0%}); {results['mean_attack_seconds']:.1f}s per prompt, "
          f"{time.perf_counter() - t0:.0f}s")
    return {k: results[k] for k in ("asr", "after_rate", "before_rate", "target_rate", "num_prompts",
                                    "mean_attack_seconds", "attack_steps", "attack_lr")}


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.merge:
        return merge_reports(args)
    print(f"digit world ({args.pretrained_model_name_or_path}); torch threads {torch.get_num_threads()}; "
          f"erasure seed {args.seed}; attacked rows use seeds "
          f"{ATTACK_SEED + 1000 * args.seed}..{ATTACK_SEED + 1000 * args.seed + args.num_prompts - 1}; UA/retained "
          f"images use seeds {EVAL_SEED} + 1000*digit + i (i < {args.n_per_digit})")
    judge = DigitJudge.from_pretrained()
    base = load_world(args)
    base_acc = base_digit_scores(base, judge, 0, args.n_per_digit)["per_digit_accuracy"]
    world = "" if args.pretrained_model_name_or_path == BUNDLED_DIGIT_MODEL else \
        f", {args.pretrained_model_name_or_path}: SD3-format flow-matching transformer"
    report = {"world": f"digit (bundled MNIST text-to-image model{world}, judged by the bundled digit classifier)",
              "args": {k: v for k, v in vars(args).items() if not k.endswith("_extra")},
              "torch_threads": torch.get_num_threads(), "base_per_digit_accuracy": base_acc,
              "rows": [], "sweep": [], "complete": False}
    t_start = time.perf_counter()
    for d in args.digits:
        print(f"digit {d} ({DIGIT_WORDS[d]})")
        prepare_data(args, d)
        wanted = args.models.split(",")
        plain = erasure(args, d, SALUN_RATIO, False, judge) if "SalUn" in wanted or d in args.sweep_digits else None
        adv = erasure(args, d, SALUN_RATIO, True, judge) if "SalUn --adversarial" in wanted else None
        others = [base_acc[o] for o in range(10) if o != d]
        base_row = {"digit": d, "model": "base", "unlearning_accuracy": 1.0 - base_acc[d],
                    "retained_accuracy": float(np.mean(others))}
        for model, run in zip(MODELS, (base_row, plain, adv)):
            if model not in wanted:
                continue
            folder = run.get("folder")
            pipe = attacked_pipeline(args, folder)
            row = {"digit": d, "model": model, "unlearning_accuracy": run["unlearning_accuracy"],
                   "num_prompts": args.num_prompts, "n_per_digit": args.n_per_digit,
                   "retained_accuracy": run["retained_accuracy"],
                   **{k: run[k] for k in ("wall_seconds", "cpu_seconds", "data_seconds", "train_seconds") if k in run}}
            for a in args.attacks:
                row[a] = attack(args, d, model, folder, a, base, pipe)
            if folder and args.strong_conditioning_steps:
                row[STRONG] = attack(args, d, model, folder, "conditioning", base, pipe,
                                     steps=args.strong_conditioning_steps)
            report["rows"].append(row)
            write_report(args, report)
        if SALUN_RATIO in args.ratios and d in args.sweep_digits:
            report["sweep"].append(sweep_point(report, plain, d, SALUN_RATIO))
    for d in args.sweep_digits:
        ratios = [r for r in args.ratios if not (r == SALUN_RATIO and d in args.digits)]  # 0.5: the SalUn row above
        if ratios and d not in args.digits:
            prepare_data(args, d)
        for ratio in ratios:
            print(f"sweep: digit {d}, mask ratio {ratio:g}")
            run = erasure(args, d, ratio, False, judge)
            model = "SalUn" if ratio == SALUN_RATIO else f"mask{ratio:g}"  # 0.5: the same run as the table's
            res = attack(args, d, model, run["folder"], "conditioning", base, attacked_pipeline(args, run["folder"]),
                         steps=args.strong_conditioning_steps or None, limit=args.sweep_prompts)
            report["sweep"].append({"digit": d, "mask_ratio": ratio, "conditioning_asr": res["asr"],
                                    "num_prompts": res["num_prompts"],
                                    "unlearning_accuracy": run["unlearning_accuracy"],
                                    "retained_accuracy": run["retained_accuracy"]})
            write_report(args, report)
    report["complete"] = True
    report["total_seconds"] = time.perf_counter() - t_start
    write_report(args, report)
    print(markdown(report))
    return report


def merge_reports(args):
    """One report from several (rows in the order given, a later sweep point replacing an earlier one of the same digit
    and ratio; the first report's settings)."""
    parts = []
    for name in args.merge.split(","):
        with open(os.path.join(args.output_dir, f"{name.strip()}.json")) as f:
            parts.append(json.load(f))
    rows = [r for p in parts for r in p["rows"]]
    sweep = {(s["digit"], s["mask_ratio"]): s for p in parts for s in p["sweep"]}
    for r in rows:  # the SalUn row is the sweep's ratio-0.5 point where a sweep process did not make one
        if r["model"] == "SalUn" and STRONG in r and any(d == r["digit"] for d, _ in sweep):
            sweep.setdefault((r["digit"], SALUN_RATIO), {
                "digit": r["digit"], "mask_ratio": SALUN_RATIO, "conditioning_asr": r[STRONG]["asr"],
                "num_prompts": r[STRONG]["num_prompts"], "unlearning_accuracy": r["unlearning_accuracy"],
                "retained_accuracy": r["retained_accuracy"]})
    report = {**parts[0], "rows": rows, "sweep": sorted(sweep.values(), key=lambda s: (s["digit"], s["mask_ratio"])),
              "merged_from": args.merge,
              "complete": all(p["complete"] for p in parts),
              "total_seconds": None}  # the parts ran side by side
    write_report(args, report)
    print(markdown(report))
    return report


def sweep_point(report, run, digit, ratio):
    row = next(r for r in report["rows"] if r["digit"] == digit and r["model"] == "SalUn")
    res = row[STRONG if STRONG in row else "conditioning"]
    return {"digit": digit, "mask_ratio": ratio, "conditioning_asr": res["asr"], "num_prompts": res["num_prompts"],
            "unlearning_accuracy": run["unlearning_accuracy"], "retained_accuracy": run["retained_accuracy"]}


# ----------------------------------------------------------------------------------------------------- report
def _mean(rows, key, sub=None):
    values = [(r[key][sub] if sub else r[key]) for r in rows if key in r]
    return float(np.mean(values)) if values else float("nan")


def report_attacks(report) -> list:
    """The attacks a report's run made (reports from before --attacks: all three)."""
    return list(report["args"].get("attacks") or ATTACKS)


def targets(report) -> list:
    """(target, measured, met) for each issue-9 target the run can speak to (erasures paired by digit)."""
    rows = report["rows"]
    by = {m: {r["digit"]: r for r in rows if r["model"] == m} for m in MODELS}
    out = []
    for a in report_attacks(report):
        if by["base"]:
            v = _mean(list(by["base"].values()), a, "asr")
            out.append((f"{a} attack on the base model from a neutral prompt >= 90% (digits "
                        f"{','.join(map(str, by['base']))})", f"{v:.0%}", v >= 0.9))
    digits = [d for d in by["SalUn"] if d in by["SalUn --adversarial"]]
    if not digits:
        return out
    plain, adv = [by["SalUn"][d] for d in digits], [by["SalUn --adversarial"][d] for d in digits]
    for key, what in (("conditioning", ""), (STRONG, f" ({report['args']['strong_conditioning_steps']} steps)")):
        pairs = [(p, q) for p, q in zip(plain, adv) if key in p and key in q]
        if pairs:
            p, q = _mean([x for x, _ in pairs], key, "asr"), _mean([y for _, y in pairs], key, "asr")
            out.append((f"--adversarial at least halves the conditioning attack's ASR{what} (digits "
                        f"{','.join(str(x['digit']) for x, _ in pairs)})",
                        f"{p:.0%} -> {q:.0%}" + (" (nothing to halve)" if p == 0 else ""), q <= p / 2 and p > 0))
    for a in ("token", "inversion"):
        p, q = _mean(plain, a, "asr"), _mean(adv, a, "asr")
        out.append((f"--adversarial {a} ASR at or below SalUn's", f"{p:.0%} -> {q:.0%}", q <= p))
    base_acc = {int(k): v for k, v in report["base_per_digit_accuracy"].items()}
    drops = [100 * (np.mean([base_acc[o] for o in range(10) if o != d]) - by["SalUn --adversarial"][d]["retained_accuracy"])
             for d in digits]
    out.append(("--adversarial retained accuracy within 3 points of the base (every digit)",
                "drop " + ", ".join(f"{x:+.1f}" for x in drops) + " points", max(drops) <= 3.0))
    uas = [r["unlearning_accuracy"] for r in adv]
    out.append(("--adversarial UA >= 95% (every digit)", ", ".join(f"{x:.0%}" for x in uas), min(uas) >= 0.95))
    wall = [q["wall_seconds"] / p["wall_seconds"] for p, q in zip(plain, adv)]  # data cached first: same work timed
    cpu = [q["cpu_seconds"] / p["cpu_seconds"] for p, q in zip(plain, adv)]
    out.append(("--adversarial at most 3x the wall time of a plain erasure",
                f"{', '.join(f'{x:.2f}x' for x in wall)} wall ({', '.join(f'{x:.2f}x' for x in cpu)} CPU)",
                max(wall) <= 3.0))
    return out


def markdown(report) -> str:
    a = report["args"]
    attacks = report_attacks(report)
    steps = {k: a[f"{k}_steps"] or DEFAULT_STEPS[k] for k in attacks}
    per_digit = {r["digit"]: r.get("num_prompts", a["num_prompts"]) for r in report["rows"]}
    n_rows = (", ".join(f"{n} for digit {d}" for d, n in per_digit.items()) if len(set(per_digit.values())) > 1
              else str(next(iter(per_digit.values()), a["num_prompts"])))
    lines = ["# Digit-world robustness benchmark", "",
             f"{report['world']}. Attacks: {n_rows} prompt rows (seeds) per digit, model and attack; "
             f"steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()) + f"; the base model is attacked from "
             f"\"{a['neutral_prompt']}\", the erasures from the digit's own prompt. ASR counts a row when the image "
             f"before or after the attack shows the digit. UA / retained accuracy: {a['n_per_digit']} judged images "
             f"per digit prompt. Erasure seed {a['seed']}; torch threads {report['torch_threads']}.", "",
             "| digit | model | UA | retained acc. | " + "".join(f"{k} ASR | " for k in attacks)
             + (f"conditioning ASR, {a['strong_conditioning_steps']} steps | " if a["strong_conditioning_steps"] else "")
             + "erasure s (wall / CPU) |",
             "|---|---|---|---|" + "---|" * (len(attacks) + bool(a["strong_conditioning_steps"])) + "---|"]
    rows, cols = report["rows"], (*attacks, *([STRONG] if a["strong_conditioning_steps"] else []))

    def cell(rs, k):
        rs = [r for r in rs if k in r]
        return f"{_mean(rs, k, 'asr'):.0%}" if rs else "–"

    for r in rows:
        t = f"{r['wall_seconds']:.0f} / {r['cpu_seconds']:.0f}" if "wall_seconds" in r else "–"
        lines.append(f"| {r['digit']} | {r['model']} | {r['unlearning_accuracy']:.1%} | {r['retained_accuracy']:.1%} | "
                     + " | ".join(cell([r], k) for k in cols) + f" | {t} |")
    for m in MODELS:
        rs = [r for r in rows if r["model"] == m]
        if len(rs) > 1:
            t = (f"{_mean(rs, 'wall_seconds'):.0f} / {_mean(rs, 'cpu_seconds'):.0f}" if "wall_seconds" in rs[0]
                 else "–")
            lines.append(f"| mean | **{m}** | {_mean(rs, 'unlearning_accuracy'):.1%} | "
                         f"{_mean(rs, 'retained_accuracy'):.1%} | " + " | ".join(cell(rs, k) for k in cols)
                         + f" | {t} |")
    found = targets(report)
    if found:
        lines += ["", "## Targets (issue 9), as measured", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in found]
    if report["sweep"]:
        lines += ["", f"## Conditioning attack ({a['strong_conditioning_steps'] or DEFAULT_STEPS['conditioning']} "
                  "steps) vs mask ratio (plain SalUn recipe at each ratio)", "",
                  "| mask ratio | digits | attacked rows | conditioning ASR | UA | retained acc. |",
                  "|---|---|---|---|---|---|"]
        for ratio in sorted({s["mask_ratio"] for s in report["sweep"]}):
            ss = [s for s in report["sweep"] if s["mask_ratio"] == ratio]
            lines.append(f"| {ratio:g} | {','.join(str(s['digit']) for s in ss)} | "
                         f"{','.join(str(s.get('num_prompts', '?')) for s in ss)} | "
                         f"{_mean(ss, 'conditioning_asr'):.0%} | {_mean(ss, 'unlearning_accuracy'):.1%} | "
                         f"{_mean(ss, 'retained_accuracy'):.1%} |")
        lines += ["", "![trade-off](tradeoff.png)"]
    if report.get("total_seconds"):
        lines += ["", f"Total {report['total_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def tradeoff_plot(report, path):
    """Conditioning-attack ASR and retained accuracy against the mask ratio (means over the sweep digits), with the
    --adversarial erasure (ratio 0.5) as a marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from salun_diffusers.utils import atomic_path

    ratios = sorted({s["mask_ratio"] for s in report["sweep"]})
    common = set.intersection(*[{s["digit"] for s in report["sweep"] if s["mask_ratio"] == r} for r in ratios])
    pts = [[s for s in report["sweep"] if s["mask_ratio"] == r and s["digit"] in common] for r in ratios]
    asr = [100 * _mean(ss, "conditioning_asr") for ss in pts]
    kept = [100 * _mean(ss, "retained_accuracy") for ss in pts]
    fig = Figure(figsize=(6.4, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ratios, asr, "o-", color="#c44e52", label="conditioning-attack ASR (SalUn recipe)")
    ax2 = ax.twinx()
    ax2.plot(ratios, kept, "s--", color="#4c72b0", label="retained accuracy")
    adv = [r for r in report["rows"] if r["model"] == "SalUn --adversarial" and r["digit"] in common]
    if adv:
        ax.plot([SALUN_RATIO], [100 * _mean(adv, STRONG if STRONG in adv[0] else "conditioning", "asr")], "*", ms=14, color="#c44e52",
                label="SalUn --adversarial (ratio 0.5): ASR")
        ax2.plot([SALUN_RATIO], [100 * _mean(adv, "retained_accuracy")], "*", ms=14, color="#4c72b0",
                 label="SalUn --adversarial: retained")
    base = [r for r in report["rows"] if r["model"] == "base" and r["digit"] in common]
    if base:
        ax2.axhline(100 * _mean(base, "retained_accuracy"), color="#4c72b0", alpha=0.3, lw=1)
    ax.set_xlabel("mask ratio (share of U-Net weights SalUn may change)")
    ax.set_ylabel("conditioning-attack success rate (%)", color="#c44e52")
    ax2.set_ylabel("retained accuracy (%)", color="#4c72b0")
    ax.set_ylim(-5, 105)
    lo = min(kept + ([100 * _mean(adv, "retained_accuracy")] if adv else []))
    ax2.set_ylim(max(0.0, lo - 10), 100.5)
    ax.set_title(f"Digit world: robustness vs locality (digits {', '.join(map(str, sorted(common)))})", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_report(args, report):
    name = args.report_name
    write_json(os.path.join(args.output_dir, f"{name}.json"), report)
    if report["sweep"] and len({s["mask_ratio"] for s in report["sweep"]}) > 1:
        tradeoff_plot(report, os.path.join(args.output_dir, "tradeoff.png" if name == "report" else f"{name}.png"))
    write_text(os.path.join(args.output_dir, f"{name}.md"), markdown(report))


if __name__ == "__main__":
    main()
