"""Block benchmark (first version): the patch bookkeeping and the fused scatter of a spatial block.

Measures, on this machine, the two operators that every spatially sparse block ends with --
patch_indices (mask -> indices) and scatter_add (the fused scatter + residual add + ReLU) -- against
what a dense network does at the same place, `relu(residual + branch)`, in NCHW and in channels_last,
at several activation rates. ``--gpu`` names the device profile that the latency predictor will use;
the measured numbers always come from the machine this runs on (CUDA when visible, else the CPU).

    python benchmarks/bench_block.py --gpu v100
"""

import argparse
import csv
import math
import sys

import torch
from torch.utils import benchmark

import laudnet_ops

PROFILES = ("v100", "rtx3090", "rtx3060", "tx2", "nano", "a100", "h100", "h200", "host")

# A representative block output of each ResNet stage (C, H, W) and the paper's patch size there.
STAGES = {
    "stage1": (256, 56, 56, 4),
    "stage2": (512, 28, 28, 4),
    "stage3": (1024, 14, 14, 2),
    "stage4": (2048, 7, 7, 1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="host", choices=PROFILES, help="device profile of the predictor")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on CUDA, 4 on CPU)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per measurement")
    p.add_argument("--csv", default=None, help="also write the table as CSV to this path")
    return p.parse_args(argv)


def timed_ms(fn, min_run_time, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def bench_stage(name, batch, rate, dtype, device, min_run_time):
    C, H, W, S = STAGES[name]
    gen = torch.Generator().manual_seed(0)
    Hp, Wp = math.ceil(H / S), math.ceil(W / S)
    mask = (torch.rand(batch, Hp, Wp, generator=gen) < rate).to(device)
    rows = []
    for layout in (torch.contiguous_format, torch.channels_last):
        residual = torch.randn(batch, C, H, W, device=device, dtype=dtype).contiguous(memory_format=layout)
        branch = torch.randn_like(residual)
        indices = laudnet_ops.patch_indices(mask)
        packed = torch.randn(indices.shape[0], C, S, S, device=device, dtype=dtype).contiguous(memory_format=layout)
        post = torch.relu(residual)
        dense = timed_ms(lambda: torch.relu(residual + branch), min_run_time, device)
        fused = timed_ms(lambda: laudnet_ops.scatter_add(residual, packed, indices), min_run_time, device)
        inplace = timed_ms(lambda: laudnet_ops.scatter_add_(post, packed, indices), min_run_time, device)
        rows.append(dict(
            stage=name, layout="channels_last" if layout == torch.channels_last else "nchw", S=S,
            rate=rate, patches=indices.shape[0], dense_add_relu_ms=dense, scatter_add_ms=fused,
            scatter_add_inplace_ms=inplace, inplace_vs_dense=inplace / dense,
        ))
    indices_ms = timed_ms(lambda: laudnet_ops.patch_indices(mask), min_run_time, device)
    for row in rows:
        row["patch_indices_ms"] = indices_ms
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (32 if device == "cuda" else 4)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"profile: {args.gpu} (latency predictions arrive with the predictor); measuring on: {where}")
    print(f"batch {batch}, {args.dtype}; times are medians in ms; 'in-place/dense' < 1 means the sparse tail is cheaper")
    rows = []
    for name in args.stages:
        for rate in args.rates:
            rows.extend(bench_stage(name, batch, rate, dtype, device, args.min_run_time))
    header = f"{'stage':7} {'layout':13} {'S':>2} {'rate':>5} {'P':>6} {'dense':>8} {'scatter':>8} {'in-place':>8} {'indices':>8} {'in-place/dense':>15}"
    print(header)
    for r in rows:
        print(f"{r['stage']:7} {r['layout']:13} {r['S']:>2} {r['rate']:>5.2f} {r['patches']:>6} "
              f"{r['dense_add_relu_ms']:>8.3f} {r['scatter_add_ms']:>8.3f} {r['scatter_add_inplace_ms']:>8.3f} "
              f"{r['patch_indices_ms']:>8.3f} {r['inplace_vs_dense']:>15.2f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
