#!/usr/bin/env python
"""Speed and memory as a user meets them: the README's first command, SD1.4 shape on CPU, and the GPU path.

    python benchmarks/bench_speed.py                          # readme + busy (minutes on the 2-core machine)
    python benchmarks/bench_speed.py --parts sd14             # SD1.4-shaped U-Net on CPU: ~10 GiB, minutes
    python benchmarks/bench_speed.py --parts gpu              # on a CUDA machine: SD1.4 shape, bf16, batch 8
    python benchmarks/bench_speed.py --parts gpu --device cpu --unet_config tiny   # the GPU path's CPU fallback

Parts (``--parts``, comma-separated):

* ``readme``: ``python train_erase.py --concept seven`` exactly as a user runs it (default threads: the user's
  OMP_NUM_THREADS is removed from its environment), into a fresh output folder; run ``--repeats`` times with one
  fresh user cache (``SALUN_DIFFUSERS_CACHE``), so the first run is cold (data generated) and the later ones warm
  (data reused). Reports wall time, CPU time, peak memory, the phases train_erase prints and the verdict.
* ``busy``: the same, while a process this script starts keeps one core busy (pinned to the last usable core).
* ``sd14``: the SD1.4-shaped U-Net (random weights, ``--sd14_config``) on CPU, in a subprocess of its own so its
  peak RSS is its own: one saliency batch, the exact global top-k mask (timed), masked AdamW steps
  (``benchmarks/bench_erase.py --phases saliency,train``).
* ``gpu``: ``bench_erase.py`` on ``--device`` (default cuda) at SD1.4 shape: saliency, SalUn step time and peak memory
  at batch 8 bf16, and fp16 sampling images/s (50 CFG steps: the data generation's and the audit's cost per image).

Results: a JSON file (``--output``) and a markdown table on stdout (machine, threads, load average, date).
Timings never belong in tests; the tests run this script's CPU fallback only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD14_CONFIG = os.path.join(ROOT, "..", "shared", "data", "configs", "sd14_unet_config.json")
TIME_LINE = re.compile(r"time: data ([\d.]+)s, saliency ([\d.]+)s, training ([\d.]+)s \(([\d.]+)s/step\)"
                       r"(?:, verdict ([\d.]+)s)?")
VERDICT_LINE = re.compile(r"verdict: UA ([\d.]+)%.*retained accuracy ([\d.]+)% \(before ([\d.]+)%, drop ([+-][\d.]+)")


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": platform.processor() or platform.machine(), "cores_usable": len(os.sched_getaffinity(0)),
            "load_average_1_5_15": [round(x, 2) for x in load], "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def start_busy_process(core: int):
    """A process spinning on one core (like a browser tab or a CI neighbour)."""
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def run_readme_command(output_dir: str, cache_dir: str, extra_args=()) -> dict:
    """``python train_erase.py --concept seven`` in a fresh environment; wall/CPU time, peak RSS, printed phases."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"SALUN_DIFFUSERS_CACHE": cache_dir, "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_erase.py"), "--concept", "seven",
                           "--output_dir", output_dir, *extra_args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"train_erase.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
           "peak_rss_gib": after.ru_maxrss / 2 ** 20}
    threads = re.search(r"torch threads: (\d+) \(([^)]*)", proc.stderr)
    if threads:
        out["threads"], out["threads_why"] = int(threads.group(1)), threads.group(2)
    m = TIME_LINE.search(proc.stdout)
    if m:
        out.update({"data_s": float(m.group(1)), "saliency_s": float(m.group(2)), "train_s": float(m.group(3)),
                    "s_per_step": float(m.group(4)), "verdict_s": float(m.group(5) or 0.0)})
        out["other_s"] = wall - sum(out[k] for k in ("data_s", "saliency_s", "train_s", "verdict_s"))
    v = VERDICT_LINE.search(proc.stdout)
    if v:
        out.update({"ua": float(v.group(1)), "retained": float(v.group(2)), "retained_before": float(v.group(3)),
                    "retained_drop_points": float(v.group(4))})
    return out


def readme_part(work: str, repeats: int, busy: bool, extra_args=()) -> list:
    cache = os.path.join(work, "cache-busy" if busy else "cache")
    spinner = start_busy_process(sorted(os.sched_getaffinity(0))[-1]) if busy else None
    runs = []
    try:
        for i in range(repeats):
            run = run_readme_command(os.path.join(work, f"{'busy' if busy else 'idle'}-{i}"), cache, extra_args)
            run.update({"case": ("busy core" if busy else "idle") + (", cold cache" if i == 0 else ", warm cache"),
                        "load_average_1": round(os.getloadavg()[0], 2)})
            runs.append(run)
            print(json.dumps(run), flush=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return runs


def bench_erase_part(args, device: str, extra) -> dict:
    """``bench_erase.py`` in a subprocess of its own (its peak RSS is its own); returns its JSON result."""
    out = os.path.join(args.work_dir, f"bench-erase-{device}.json")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_erase.py"), "--device", device,
           "--output", out, *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env)  # its progress lines go straight to this script's output
    if proc.returncode != 0:
        raise SystemExit(f"bench_erase.py failed ({proc.returncode})")
    with open(out) as f:
        result = json.load(f)
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
    return result


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores_usable']} usable cores, load average {m['load_average_1_5_15']} at "
             f"start, {m['date']}", "",
             "| case | threads | wall s | CPU s | data s | saliency s | training s (s/step) | verdict s | other s | "
             "peak GiB | UA | retained drop |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("readme", []):
        lines.append(f"| {r['case']} (load {r['load_average_1']}) | {r.get('threads', '?')} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r.get('data_s', 0):.1f} | {r.get('saliency_s', 0):.1f} | "
                     f"{r.get('train_s', 0):.1f} ({r.get('s_per_step', 0):.3f}) | {r.get('verdict_s', 0):.1f} | "
                     f"{r.get('other_s', 0):.1f} | {r['peak_rss_gib']:.2f} | {r.get('ua', float('nan')):.1f}% | "
                     f"{r.get('retained_drop_points', float('nan')):+.1f} |")
    for key in ("sd14", "gpu"):
        r = result.get(key)
        if r:
            lines.append("")
            lines.append(f"{key}: {r['device_name']}, {r['parameters'] / 1e6:.0f}M parameters, threads "
                         f"{r['threads']}, {r['mixed_precision']}, batch {r['batch_size']}, latent {r['latent_size']}: "
                         f"top-k mask {r.get('mask_seconds', float('nan')):.1f} s; saliency peak "
                         f"{r.get('saliency_peak_gib', float('nan')):.2f} GiB; SalUn step "
                         f"{r.get('train_s_per_step', float('nan')):.3f} s, peak "
                         f"{r.get('train_peak_gib', float('nan')):.2f} GiB"
                         + (f"; sampling {r['sample_images_per_s']:.2f} images/s ({r['num_inference_steps']} CFG "
                            f"steps, {r['sample_dtype']})" if "sample_images_per_s" in r else ""))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="readme,busy", help="comma-separated: readme, busy, sd14, gpu")
    p.add_argument("--repeats", type=int, default=2, help="runs of the README command per case (first: cold cache)")
    p.add_argument("--readme_args", default="", help="extra train_erase.py flags, e.g. '--threads 2'")
    p.add_argument("--sd14_config", default=SD14_CONFIG, help="SD1.4 U-Net config.json (random weights)")
    p.add_argument("--sd14_latent_size", type=int, default=16,
                   help="latent side for the CPU SD1.4 part (memory is dominated by weights, gradients and optimizer "
                        "state, not activations, at this size)")
    p.add_argument("--device", default="cuda", help="device of the gpu part (cpu: its fallback, for tests)")
    p.add_argument("--unet_config", default=None, help="gpu part's U-Net config (default: --sd14_config)")
    p.add_argument("--gpu_batch_size", type=int, default=8)
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--output", default=None, help="JSON output path")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - {"readme", "busy", "sd14", "gpu"})
    if unknown:
        p.error(f"unknown parts {unknown}; choose from readme, busy, sd14, gpu")
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench-speed-")
    result = {"machine": machine(), "parts": parts}
    print(f"bench_speed: {result['machine']}; work dir {args.work_dir}", flush=True)
    extra = args.readme_args.split()
    if "readme" in parts or "busy" in parts:
        result["readme"] = []
        if "readme" in parts:
            result["readme"] += readme_part(args.work_dir, args.repeats, busy=False, extra_args=extra)
        if "busy" in parts:
            result["readme"] += readme_part(args.work_dir, args.repeats, busy=True, extra_args=extra)
    if "sd14" in parts:
        if not os.path.isfile(args.sd14_config):
            raise SystemExit(f"--sd14_config {args.sd14_config!r} not found (../shared/data/configs/"
                             "sd14_unet_config.json)")
        result["sd14"] = bench_erase_part(args, "cpu", [
            "--unet_config", args.sd14_config, "--mixed_precision", "no", "--batch_size", "1",
            "--latent_size", str(args.sd14_latent_size), "--saliency_batches", "1", "--train_steps", "1",
            "--phases", "saliency,train"])
    if "gpu" in parts:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("gpu part: no CUDA device here; run it on a GPU machine (or --device cpu for the fallback)")
        else:
            cuda = args.device.startswith("cuda")
            result["gpu"] = bench_erase_part(args, args.device, [
                "--unet_config", args.unet_config or args.sd14_config, "--batch_size", str(args.gpu_batch_size),
                "--mixed_precision", "bf16" if cuda else "no", "--sample_dtype", "fp16" if cuda else "fp32",
                "--num_inference_steps", "50" if cuda else "2", "--sample_batch", "8" if cuda else "2",
                "--train_steps", "3" if cuda else "1", "--saliency_batches", "2" if cuda else "1"])
    if args.output:
        sys.path.insert(0, ROOT)
        from salun_diffusers.utils import write_json

        write_json(args.output, result)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
