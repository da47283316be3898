"""The experimental CUDA paths (not yet run on a GPU) against the validated ones and dense cuDNN.

On a GPU, ResNet-50 / RegNet stage shapes at batch 128, half the S = 4 patches kept, channels_last.
Each row times the validated path (the default), the experimental one and a dense baseline:

  gather_conv2d float32        3x3 width->width: SIMT kernel | halo tiles through cuDNN (experimental)
                               | dense F.conv2d 3x3
  gather_conv2d grouped fp16   3x3, 16 channels a group (RegNet's group width): SIMT kernel | one
                               tensor-core GEMM per group (experimental) | dense grouped F.conv2d 3x3
  channel_gated_conv2d grouped 3x3, 16 channels a group and a gate group, half the gate groups on:
    fp16                       SIMT kernel | one tensor-core GEMM per (sample, group) (experimental)
                               | dense grouped F.conv2d 3x3
  channel_gated_conv2d float32 3x3 width->width, gate groups of 4, half of them on in and out: SIMT
    G=4                        kernel | one grouped cuDNN convolution over the (sample, conv group)
                               pairs' active channels (experimental) | dense F.conv2d 3x3
  masker_conv1x1 float32       1x1 4*width->width + 1 masker channel: SIMT kernel | two cuDNN 1x1
                               convs and a pooling (experimental) | dense F.conv2d 1x1
  conv1x1_scatter_add float32  1x1 width->4*width on the packed patches + scatter-add onto the
                               residual: SIMT kernel | cuDNN 1x1 conv + scatter_add kernel
                               (experimental) | dense F.conv2d 1x1 over the whole map + add + relu
  sample_gather fp16           half the samples of a 4*width map: one element a thread | 16-byte
                               row vectors (experimental) | copying the same bytes (Tensor.copy_)
  sample_scatter_add fp16      the block's output of half the samples added back, relu: one element
                               a thread | 16-byte row vectors (experimental) | the dense block's
                               add + relu over the whole batch

The composite rows ask whether cuDNN under the sparse ops beats the tensor-core kernels on the calls
those take (float16): the validated column is then the tensor-core kernel, the experimental one the
composite, called through its internal op (the switch does not route such calls to it):

  gather_conv2d fp16 tiles     tensor-core gather GEMM | halo tiles through cuDNN
  channel_gated_conv2d fp16    G = 16: tensor-core GEMM per sample | one grouped cuDNN convolution
    pairs                      over the pairs' active channels
  masker_conv1x1 fp16 cudnn    tensor-core GEMM with the pooling epilogue | cuDNN 1x1 convs + pooling
  conv1x1_scatter_add fp16     tensor-core GEMM with the scatter epilogue | cuDNN 1x1 conv +
    cudnn                      scatter_add kernel

Each row also reports the largest difference between the two sparse paths' outputs (both computed
here, so a wrong experimental result shows next to its speed). cuDNN settings are torch's defaults
(TF32 allowed for float32 convolutions), the same for the tiles and the dense baseline.

    python benchmarks/bench_experimental.py --csv out.csv
"""

import argparse
import csv
import functools
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


class Case:
    """``op``: the call as users make it (validated path with the switch off, experimental with it
    on), or with ``candidate``: the validated path is ``op`` and the experimental one ``candidate``,
    both timed with the switch off. ``dense``: the baseline."""

    def __init__(self, op, dense, candidate=None):
        self.op, self.dense, self.candidate = op, dense, candidate

    def validated(self):
        return on_path(False, self.op)

    def experimental(self):
        return on_path(False, self.candidate) if self.candidate is not None else on_path(True, self.op)


def patch_indices(N, side, args, gen):
    S = args.patch_size
    mask = torch.rand(N, math.ceil(side / S), math.ceil(side / S), generator=gen) < args.rate
    return reference.patch_indices(mask).cuda()


def gather_inputs(N, side, width, groups, dtype, args, gen):
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", dtype))
    w = (torch.randn(width, width // groups, 3, 3, generator=gen) / math.sqrt(9 * width // groups)).to("cuda", dtype)
    b = torch.randn(width, generator=gen).to("cuda", dtype)
    return x, patch_indices(N, side, args, gen), w, b


def gather_case(N, side, width, args, gen, dtype=torch.float32, group_width=None, composite=False):
    groups = width // group_width if group_width else 1
    x, idx, w, b = gather_inputs(N, side, width, groups, dtype, args, gen)
    wcl = cl(w)
    S = args.patch_size
    candidate = None
    if composite:
        candidate = functools.partial(torch.ops.laudnet_ops._gather_conv2d_by_tiles, x, idx, w, b, S, 1, 1, 1, groups,
                                      "relu")
    return Case(lambda: laudnet_ops.gather_conv2d(x, idx, w, b, S, 1, 1, groups=groups),
                lambda: F.conv2d(x, wcl, b, 1, 1, groups=groups), candidate)


def grouped_channel_case(N, side, width, args, gen):
    groups, G = width // GROUP_WIDTH, GROUP_WIDTH
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", torch.float16))
    w = (torch.randn(width, GROUP_WIDTH, 3, 3, generator=gen) / math.sqrt(9 * GROUP_WIDTH)).to("cuda", torch.float16)
    b = torch.randn(width, generator=gen).to("cuda", torch.float16)
    gin = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    gout = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    wcl = cl(w)
    return Case(lambda: laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, padding=1, groups=groups),
                lambda: F.conv2d(x, wcl, b, 1, 1, groups=groups))


def channel_case(N, side, width, args, gen, dtype=torch.float32, G=4, composite=False):
    """A channel block's 3x3 with half of its gate groups on, in and out."""
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", dtype))
    w = (torch.randn(width, width, 3, 3, generator=gen) / math.sqrt(9 * width)).to("cuda", dtype)
    b = torch.randn(width, generator=gen).to("cuda", dtype)
    gin = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    gout = (torch.rand(N, width // G, generator=gen) < args.rate).cuda()
    wcl = cl(w)
    candidate = None
    if composite:
        candidate = functools.partial(torch.ops.laudnet_ops._channel_gated_conv2d_by_sample_groups, x, w, b, gin,
                                      gout, G, [1, 1], [1, 1], [1, 1], 1, "relu")
    return Case(lambda: laudnet_ops.channel_gated_conv2d(x, w, b, gin, gout, G, padding=1),
                lambda: F.conv2d(x, wcl, b, 1, 1), candidate)


def masker_case(N, side, width, args, gen, dtype=torch.float32, composite=False):
    cin = 4 * width
    x = cl(torch.randn(N, cin, side, side, generator=gen).to("cuda", dtype))
    w = (torch.randn(width, cin, 1, 1, generator=gen) / math.sqrt(cin)).to("cuda", dtype)
    b = torch.randn(width, generator=gen).to("cuda", dtype)
    mw = (torch.randn(1, cin, 1, 1, generator=gen) / math.sqrt(cin)).to("cuda", dtype)
    mb = torch.randn(1, generator=gen).to("cuda", dtype)
    wcl = cl(w)
    S = args.patch_size
    candidate = None
    if composite:
        candidate = functools.partial(torch.ops.laudnet_ops._masker_conv1x1_by_dense_conv, x, w, b, mw, mb, S, 1,
                                      "relu")
    return Case(lambda: laudnet_ops.masker_conv1x1(x, w, b, mw, mb, S), lambda: F.conv2d(x, wcl, b), candidate)


def conv1x1_scatter_add_case(N, side, width, args, gen, dtype=torch.float32, composite=False):
    S, cout = args.patch_size, 4 * width
    idx = patch_indices(N, side, args, gen)
    packed = cl(torch.randn(idx.shape[0], width, S, S, generator=gen).to("cuda", dtype))
    w = (torch.randn(cout, width, 1, 1, generator=gen) / math.sqrt(width)).to("cuda", dtype)
    b = torch.randn(cout, generator=gen).to("cuda", dtype)
    residual = cl(torch.randn(N, cout, side, side, generator=gen).to("cuda", dtype))
    x = cl(torch.randn(N, width, side, side, generator=gen).to("cuda", dtype))
    wcl = cl(w)
    candidate = None
    if composite:
        candidate = functools.partial(torch.ops.laudnet_ops._conv1x1_scatter_add_by_dense_conv, residual, packed,
                                      idx, w, b, "relu")
    return Case(lambda: laudnet_ops.conv1x1_scatter_add(residual, packed, idx, w, b),
                lambda: torch.relu_(F.conv2d(x, wcl, b).add_(residual)), candidate)


def layer_inputs(N, side, width, args, gen):
    """A bottleneck's output map (4 * width channels) and half the samples' gates."""
    x = cl(torch.randn(N, 4 * width, side, side, generator=gen).to("cuda", torch.float16))
    gates = (torch.rand(N, generator=gen) < args.rate).cuda()
    return x, gates


def sample_gather_case(N, side, width, args, gen):
    x, gates = layer_inputs(N, side, width, args, gen)
    kept = int(gates.sum())
    src, dst = x[:kept], torch.empty_like(x[:kept])
    return Case(lambda: laudnet_ops.sample_gather(x, gates), lambda: dst.copy_(src))


def sample_scatter_add_case(N, side, width, args, gen):
    residual, gates = layer_inputs(N, side, width, args, gen)
    y, sel = laudnet_ops.sample_gather(torch.randn_like(residual), gates)
    full = torch.randn_like(residual)
    return Case(lambda: laudnet_ops.sample_scatter_add(residual, y, sel),
                lambda: torch.relu(residual + full))


CASES = {
    "gather_conv2d float32": gather_case,
    "gather_conv2d grouped fp16": functools.partial(gather_case, dtype=torch.float16, group_width=GROUP_WIDTH),
    "channel_gated_conv2d grouped fp16": grouped_channel_case,
    "channel_gated_conv2d float32 G=4": channel_case,
    "masker_conv1x1 float32": masker_case,
    "conv1x1_scatter_add float32": conv1x1_scatter_add_case,
    "sample_gather fp16": sample_gather_case,
    "sample_scatter_add fp16": sample_scatter_add_case,
    "gather_conv2d fp16 tiles": functools.partial(gather_case, dtype=torch.float16, composite=True),
    "channel_gated_conv2d fp16 pairs": functools.partial(channel_case, dtype=torch.float16, G=16, composite=True),
    "masker_conv1x1 fp16 cudnn": functools.partial(masker_case, dtype=torch.float16, composite=True),
    "conv1x1_scatter_add fp16 cudnn": functools.partial(conv1x1_scatter_add_case, dtype=torch.float16,
                                                        composite=True),
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
          f"{C.cuda_paths()}; the experimental column turns the experimental paths on")
    print(f"{'case':<36}{'stage':<8}{'validated ms':>13}{'exp ms':>9}{'dense ms':>10}{'exp/val':>9}"
          f"{'exp/dense':>11}{'max diff':>10}")
    rows = []
    for stage in args.stages.split(","):
        side, width = STAGES[stage]
        for case_name, make in CASES.items():
            case = make(args.batch, side, width, args, gen)
            validated = C.time_ms(case.validated, args.min_ms / 1e3, "cuda")
            experimental = C.time_ms(case.experimental, args.min_ms / 1e3, "cuda")
            dense_ms = C.time_ms(case.dense, args.min_ms / 1e3, "cuda")
            diff = max_abs_diff(case.experimental(), case.validated())
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
