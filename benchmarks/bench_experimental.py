"""The experimental CUDA paths (not yet run on a GPU) against the validated ones and dense cuDNN.

On a GPU, ResNet-50 / RegNet stage shapes at batch 128, half the S = 4 patches kept, channels_last:

  gather_conv2d float32        3x3 width->width: SIMT kernel | halo tiles through cuDNN (experimental)
                               | dense F.conv2d 3x3
  gather_conv2d grouped fp16   3x3, 16 channels a group (RegNet's group width): SIMT kernel | one
                               tensor-core GEMM per group (experimental) | dense grouped F.conv2d 3x3
  channel_gated_conv2d grouped 3x3, 16 channels a group and a gate group, half the gate groups on:
    fp16                       SIMT kernel | one tensor-core GEMM per (sample, group) (experimental)
                               | dense grouped F.conv2d 3x3
  masker_conv1x1 float32       1x1 4*width->width + 1 masker channel: SIMT kernel | two cuDNN 1x1
                               convs and a pooling (experimental) | dense F.conv2d 1x1
  conv1x1_scatter_add float32  1x1 width->4*width on the packed patches + scatter-add onto the
                               residual: SIMT kernel | cuDNN 1x1 conv + scatter_add kernel
                               (experimental) | dense F.conv2d 1x1 over the whole map + add + relu

Each row also reports the largest difference between the two sparse paths' outputs (both computed
here, so a wrong experimental result shows next to its speed). cuDNN settings are torch's defaults
(TF32 allowed for float32 convolutions), the same for the tiles and the dense baseline.

    python benchmarks/bench_experimental.py --csv out.csv
"""

import argparse
import csv
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import laudnet_ops  # noqa: E402
from laudnet_ops import reference  # noqa: E402

import _common as C  # noqa: E402

STAGES = {"stage2": (28, 128), "stage3": (14, 256)}  # output side, width
GROUP_WIDTH = 16
COLUMNS = ("device", "case", "stage", "batch", "validated_ms", "experimental_ms", "dense_ms",
           "experimental_vs_validated", "experimental_vs_dense", "max_abs_diff")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--stages", default="stage2,stage3")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.5, help="fraction of patches kept")
    p.add_argument("--min-ms", type=float, default=40.0, help="timed milliseconds per measurement")
    p.add_argument("--csv", default=None)
    return p.parse_args()


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def gather_case(N, side, width, groups, dtype, args, gen):
    S = args.patch_size
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", dtype))
    w = (torch.randn(width, width // groups, 3, 3, generator=gen) / math.sqrt(9 * width // groups)).to("cuda", dtype)
    b = torch.randn(width, generator=gen).to("cuda", dtype)
    mask = torch.rand(N, math.ceil(side / S), math.ceil(side / S), generator=gen) < args.rate
    idx = reference.patch_indices(mask).cuda()
    wcl = cl(w)
    return (lambda: laudnet_ops.gather_conv2d(x, idx, w, b, S, 1, 1, groups=groups),
            lambda: F.conv2d(x, wcl, b, 1, 1, groups=groups))


def grouped_channel_case(N, side, width, args, gen):
    groups, G = width // GROUP_WIDTH, GROUP_WIDTH
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", torch.float16))
    w = (torch.randn(width, GROUP_WIDTH, 3, 3, generator=gen) / math.sqrt(9 * GROUP_WIDTH)).to("cuda", torch.float16)
    b = torch.randn(width, generator=gen).to("cuda", torch.float16)
    gin = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    gout = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    wcl = cl(w)
    return (lambda: laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, padding=1, groups=groups),
            lambda: F.conv2d(x, wcl, b, 1, 1, groups=groups))


def masker_case(N, side, width, args, gen):
    cin = 4 * width
    x = cl(torch.randn(N, cin, side, side, generator=gen).cuda())
    w = (torch.randn(width, cin, 1, 1, generator=gen) / math.sqrt(cin)).cuda()
    b = torch.randn(width, generator=gen).cuda()
    mw = (torch.randn(1, cin, 1, 1, generator=gen) / math.sqrt(cin)).cuda()
    mb = torch.randn(1, generator=gen).cuda()
    wcl = cl(w)
    return (lambda: laudnet_ops.masker_conv1x1(x, w, b, mw, mb, args.patch_size),
            lambda: F.conv2d(x, wcl, b))


def conv1x1_scatter_add_case(N, side, width, args, gen):
    S, cout = args.patch_size, 4 * width
    mask = torch.rand(N, math.ceil(side / S), math.ceil(side / S), generator=gen) < args.rate
    idx = reference.patch_indices(mask).cuda()
    packed = cl(torch.randn(idx.shape[0], width, S, S, generator=gen).cuda())
    w = (torch.randn(cout, width, 1, 1, generator=gen) / math.sqrt(width)).cuda()
    b = torch.randn(cout, generator=gen).cuda()
    residual = cl(torch.randn(N, cout, side, side, generator=gen).cuda())
    x = cl(torch.randn(N, width, side, side, generator=gen).cuda())
    wcl = cl(w)
    return (lambda: laudnet_ops.conv1x1_scatter_add(residual, packed, idx, w, b),
            lambda: torch.relu_(F.conv2d(x, wcl, b).add_(residual)))


CASES = {
    "gather_conv2d float32": lambda N, side, width, args, gen: gather_case(N, side, width, 1, torch.float32, args, gen),
    "gather_conv2d grouped fp16": lambda N, side, width, args, gen: gather_case(
        N, side, width, width // GROUP_WIDTH, torch.float16, args, gen),
    "channel_gated_conv2d grouped fp16": grouped_channel_case,
    "masker_conv1x1 float32": masker_case,
    "conv1x1_scatter_add float32": conv1x1_scatter_add_case,
}


def on_path(experimental, fn):
    laudnet_ops.set_experimental_kernels(experimental)
    try:
        return fn()
    finally:
        laudnet_ops.set_experimental_kernels(False)


def max_abs_diff(a, b):
    """Largest difference between two op results (a tensor, or a tuple of them)."""
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_experimental: needs a CUDA GPU (none is visible); nothing was measured")
    if laudnet_ops.extension_error is not None:
        sys.exit(f"bench_experimental: {laudnet_ops.extension_error}")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name()
    gen = torch.Generator().manual_seed(0)
    print(f"device: {name}; batch {args.batch}, channels_last, rate {args.rate}, S = {args.patch_size}; "
          f"tensor cores {'on' if laudnet_ops.tensor_cores_enabled() else 'off'}")
    print(f"{'case':<36}{'stage':<8}{'validated ms':>13}{'exp ms':>9}{'dense ms':>10}{'exp/val':>9}"
          f"{'exp/dense':>11}{'max diff':>10}")
    rows = []
    for stage in args.stages.split(","):
        side, width = STAGES[stage]
        for case_name, make in CASES.items():
            op, dense = make(args.batch, side, width, args, gen)
            validated = on_path(False, lambda: C.time_ms(op, args.min_ms / 1e3, "cuda"))
            experimental = on_path(True, lambda: C.time_ms(op, args.min_ms / 1e3, "cuda"))
            dense_ms = C.time_ms(dense, args.min_ms / 1e3, "cuda")
            diff = max_abs_diff(on_path(True, op), on_path(False, op))
            row = dict(device=name, case=case_name, stage=stage, batch=args.batch, validated_ms=round(validated, 4),
                       experimental_ms=round(experimental, 4), dense_ms=round(dense_ms, 4),
                       experimental_vs_validated=round(experimental / validated, 4),
                       experimental_vs_dense=round(experimental / dense_ms, 3), max_abs_diff=diff)
            rows.append(row)
            print(f"{case_name:<36}{stage:<8}{validated:>13.3f}{experimental:>9.3f}{dense_ms:>10.3f}"
                  f"{experimental / validated:>9.3f}{experimental / dense_ms:>11.2f}{diff:>10.2e}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
