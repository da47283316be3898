"""Whole-network benchmark: LAUD-ResNet-50 in eval, each skipping mode sparse vs the same network dense.

    python benchmarks/bench_models.py [--batch 8] [--size 224] [--keep 0.5] [--threads 2] [--csv out.csv]

Every network has the same weights; the dynamic ones keep a random ``--keep`` fraction of their
units (``force_keep``, seeded). Baselines, in one run: the dense network with batch norm folded
(the dense mode's inference path: what the sparse paths are compared with) and the torchvision-style
unfolded dense network. Target of issue 5: <= 0.65x of the folded dense network.

The LAUD networks (folded dense and sparse) run once each, fed the NCHW input a caller would pass: on
the CPU their inference path lays it out channels_last itself (``inference_layout`` in
``laudnet_ops.models._common``), so an NCHW row of theirs would time the same computation twice. The
networks that compute in their input's layout (torchvision-style, and the fused row below) run on an
NCHW and on a channels_last input.

One more dense row, for reference: the folded network with each block's last conv, residual add and
ReLU in one oneDNN call (the convolution post-op torch.compile's CPU backend fuses them into). The
channel and layer networks fuse their residual adds too; this row shows the dense network with the
same advantage. The ratio column stays relative to the plain folded network (the dense mode);
the last column is relative to the fastest dense row of any kind, this one included.
"""

import argparse
import csv
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from laudnet_ops.models import laud_resnet50
from laudnet_ops.models._common import inference_layout
from laudnet_ops.nn import set_execution, set_force_keep, stats
from laudnet_ops.nn.blocks import conv_weight_layout, missing_sparse_ops
from laudnet_ops.nn.stats import part_densities
from laudnet_ops.predictor.timing import steady_allocator
GRANULARITY = {"dense": None, "spatial": (4, 4, 2, 1), "channel": 4, "layer": None}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
LAUD_FORMAT = "nchw -> cl"  # an NCHW input the model lays out channels_last


def build(mode, keep, state):
    model = laud_resnet50(mode=mode, granularity=GRANULARITY[mode])
    model.load_state_dict(state, strict=False)
    if mode != "dense":
        set_force_keep(model, keep, seed=0)
    return model.eval()


def blocks(model):
    return [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]


def fused_residual_dense(model):
    """``model`` (a dense LaudResNet in eval) with conv3 + add + ReLU of every block as one oneDNN call;
    None where this torch build lacks that post-op."""
    post_op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise_", None)
    if post_op is None or not hasattr(post_op, "binary"):
        return None

    def forward(x):
        w, b = model._stem_folded("conv1", model.conv1, model.bn1, conv_weight_layout(x))
        x = model.maxpool(F.relu_(F.conv2d(x, w, b, model.conv1.stride, model.conv1.padding)))
        for block in blocks(model):
            h = block._conv(block._conv(x, 1), 2)
            w, b = block._fold("conv3", block.conv3, block.bn3, conv_weight_layout(h))
            # The identity (this forward's own intermediate map) receives the result.
            x = post_op.binary(block._identity(x), h, w, b, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")
        return model.fc(torch.flatten(model.avgpool(x), 1))

    return forward


def conv_floor(dense, sparse, x, min_run_time):
    """``(dense ms, floor ms)``: the dense network's convolutions (with their ReLUs) each timed alone on
    the input it gets in the dense forward, summed; and the same sum with each block's convolutions
    scaled by the fraction of them ``sparse`` computed in its last forward. The second is what the
    sparse network's convolutions would take if every sparse kernel ran at oneDNN's dense speed for
    its shape: the floor its convolution time can be compared with."""
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for block in blocks(dense)]
    with torch.no_grad():
        dense(x)
    for hook in hooks:
        hook.remove()

    def ms(fn):
        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return 1e3 * timer.blocked_autorange(min_run_time=min_run_time).median

    image = inference_layout(x)
    w, b = dense._stem_folded("conv1", dense.conv1, dense.bn1, conv_weight_layout(image))
    stem = ms(lambda: F.relu_(F.conv2d(image, w, b, dense.conv1.stride, dense.conv1.padding)))
    total = floor = stem
    with torch.no_grad():
        for block, twin, h in zip(blocks(dense), blocks(sparse), inputs):
            density = part_densities(twin)
            h1 = block._conv(h, 1)
            h2 = block._conv(h1, 2)
            parts = {"conv1": lambda: block._conv(h, 1), "conv2": lambda: block._conv(h1, 2),
                     "conv3": lambda: block._conv(h2, 3, activation=False)}
            if block._projection() is not None:
                parts["downsample"] = lambda: block._identity(h)
            for part, fn in parts.items():
                t = ms(fn)
                total += t
                floor += t * density.get(part, 1.0)
    return total, floor


def measure(model, x, min_run_time):
    with torch.no_grad():
        model(x)  # warm-up: folds batch norm, primes oneDNN
        timer = benchmark.Timer("model(x)", globals={"model": model, "x": x},
                                num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="spatial,channel,layer")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip timing each dense convolution alone for the spatial network's floor")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steady_allocator()  # steady-state latencies for every variant, whatever ran before
    torch.manual_seed(0)

    dense = laud_resnet50(mode="dense").eval()
    state = dense.state_dict()
    x = torch.randn(args.batch, 3, args.size, args.size)
    inputs = {name: x.contiguous(memory_format=fmt) for name, fmt in FORMATS.items()}
    inputs[LAUD_FORMAT] = inputs["nchw"]
    rows = []

    # Every configuration is timed once per round, rounds interleaved, and its fastest round kept:
    # on a shared machine this keeps load drift out of the ratios.
    configs = [("dense", "folded BN", LAUD_FORMAT, dense, None)]
    unfolded = build("dense", 1.0, state)
    set_execution(unfolded, "masked")
    configs += [("dense", "torchvision-style (BN unfolded)", fmt, unfolded, None) for fmt in FORMATS]
    fused = fused_residual_dense(dense)
    if fused is not None:
        configs += [("dense", "folded BN, residual fused (oneDNN)", fmt, fused, None) for fmt in FORMATS]
    for mode in filter(None, args.modes.split(",")):
        missing = missing_sparse_ops(mode)
        if missing:
            print(f"{mode}: skipped, ops not built: {missing}", file=sys.stderr)
            continue
        model = build(mode, args.keep, state)
        configs.append((f"{mode} keep={args.keep}", "sparse", LAUD_FORMAT, model, mode))
    best_time = [float("inf")] * len(configs)
    flops = [None] * len(configs)
    for _ in range(args.rounds):
        for i, (_, _, fmt, model, mode) in enumerate(configs):
            best_time[i] = min(best_time[i], measure(model, inputs[fmt], args.min_run_time))
            if mode is not None:
                flops[i] = float(stats(model)["flops_ratio"])
    best = min(t for t, c in zip(best_time, configs) if c[1] == "folded BN")
    best_any = min(t for t, c in zip(best_time, configs) if c[0] == "dense")
    for (network, execution, fmt, _, mode), seconds, ratio in zip(configs, best_time, flops):
        rows.append(dict(network=network, execution=execution, format=fmt, ms=1e3 * seconds,
                         ratio=seconds / best, flops_ratio=ratio, ratio_to_fastest_dense=seconds / best_any))

    print(f"LAUD-ResNet-50, eval, batch {args.batch}, {args.size}x{args.size}, float32, "
          f"{torch.get_num_threads()} threads; ratio = time / folded dense ({1e3 * best:.1f} ms); "
          f"vs any dense = time / fastest dense row ({1e3 * best_any:.1f} ms)")
    print(f"{'network':<18} {'execution':<36} {'format':<14} {'ms':>9} {'ratio':>7} {'FLOPs ratio':>12} "
          f"{'vs any dense':>13}")
    for r in rows:
        ratio = f"{r['ratio']:.3f}"
        flops = "" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f}"
        print(f"{r['network']:<18} {r['execution']:<36} {r['format']:<14} {r['ms']:>9.1f} {ratio:>7} {flops:>12} "
              f"{r['ratio_to_fastest_dense']:>13.3f}")
    spatial = [c[3] for c in configs if c[4] == "spatial"]
    if spatial and not args.no_floor:
        total, floor = conv_floor(dense, spatial[0], inputs[LAUD_FORMAT], args.min_run_time / 10)
        print(f"spatial at oneDNN's dense speed per convolution: the dense network's convolutions (each timed "
              f"alone) {total:.1f} ms, scaled by the fractions the spatial network computes {floor:.1f} ms "
              f"({floor / total:.3f}); its other ops (pooling, adds, head, maskers) are not in these sums")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
