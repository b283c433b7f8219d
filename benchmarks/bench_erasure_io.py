"""What the erasure format v2 checks cost: sha256 seal and base-values fingerprint, on save and on load (CPU).

SD path, mechanical: a module of random weights with ``--params`` parameters in SD1.4-sized tensors, a random mask of
``--ratio``; times ``base_values_digest`` (3 dtypes, once per training run), ``save_delta`` (with the seal),
``read_delta`` (with the seal check), ``parse_delta`` without / with the base check, and the whole ``load_erasure``.
Scale linearly to SD1.4's 860M U-Net weights.

    nice -n 10 python benchmarks/bench_erasure_io.py --params 100_000_000
"""

import argparse
import json
import tempfile
import time

import torch

from salun_diffusers.delta import base_values_digest, build_delta, parse_delta, read_delta, save_delta
from salun_diffusers.loaders import load_erasure


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--ratio", type=float, default=0.5, help="mask ratio (SalUn's SD default: 0.5)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    chunk = 1280 * 1280 * 9  # the largest SD1.4 conv weight: 14.7M entries
    sizes = [chunk] * (args.params // chunk) + ([args.params % chunk] if args.params % chunk else [])
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    for i, n in enumerate(sizes):
        model.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(n, generator=g), requires_grad=False))
    mask = {name: torch.rand(p.shape, generator=g) < args.ratio for name, p in model.named_parameters()}
    t, cpu = {}, {}
    clock = time.perf_counter

    class timed:  # wall and CPU seconds of a block (CPU time is what matters on a shared, busy machine)
        def __init__(self, key):
            self.key = key

        def __enter__(self):
            self.w, self.c = clock(), time.process_time()

        def __exit__(self, *exc):
            t[self.key], cpu[self.key] = clock() - self.w, time.process_time() - self.c

    with timed("base_values_digest (fp32+fp16+bf16)"):
        digest = base_values_digest(model, mask)
    folder = tempfile.mkdtemp()
    with timed("build_delta + save_delta (with seal)"):
        save_delta(build_delta(model, mask, {"concept": "bench"}, base_digest=digest), folder)
    with timed("read_delta (with seal check)"):
        tensors, meta = read_delta(folder)
    with timed("parse_delta, no base check"):
        parse_delta(tensors, meta, model, check_base=False)
    with timed("parse_delta with base check (fp32)"):
        parse_delta(tensors, meta, model)
    with timed("load_erasure (all checks + apply)"):
        load_erasure(model, folder)
    scale = 860e6 / args.params
    print(json.dumps({"params": args.params, "mask_ratio": args.ratio,
                      "wall_seconds": {k: round(v, 3) for k, v in t.items()},
                      "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
                      "cpu_seconds_scaled_to_sd14_860M": {k: round(v * scale, 1) for k, v in cpu.items()}}, indent=2))


if __name__ == "__main__":
    main()
