"""Channel and layer skipping against dense convolutions, on one machine, in one run.

Cases (issue 4), on x of shape (N, 256, 28, 28), gate groups of G channels, half of the
groups on, chosen at random per sample:

  conv1x1   1x1 conv 256 -> 256, out_gates only         target <= 0.60x dense
  conv3x3   3x3 conv 256 -> 256, in and out gates       target <= 0.40x dense
  block     ResNet bottleneck (1x1 256->64, 3x3 64->64, 1x1 64->256, folded BN, ReLU,
            residual) run for half of the samples via sample_gather / sample_scatter_add_
                                                         target <= 0.55x dense

Each dense baseline is timed in NCHW and in channels_last (oneDNN's fast path); ratios are
taken against the faster of the two. The "reference" rows run the dynamic variant's FLOPs as a
plain dense op (the kept channel counts, or the kept samples only) in channels_last: how close
the dynamic op gets to what its FLOPs would cost on the dense path. They are not baselines.
Example:

    python benchmarks/bench_channel_layer_ops.py --threads 2 --csv benchmarks/out/channel_layer.csv
"""

import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import laudnet_ops  # noqa: E402
from laudnet_ops.predictor.timing import steady_allocator  # noqa: E402

TARGETS = {"conv1x1": 0.60, "conv3x3": 0.40, "block": 0.55}


def half_gates(N, groups, gen, device):
    """bool (N, groups): exactly half of the groups on in each sample, at random."""
    order = torch.rand(N, groups, generator=gen).argsort(dim=1)
    return (order < groups // 2).to(device)


def time_us(fn, min_run_time, clock="wall"):
    """Median microseconds per call.

    clock="wall": torch.utils.benchmark's blocked_autorange. clock="thread": CPU time of the
    calling thread (time.thread_time), for one-thread runs on a shared machine, where other
    processes only ever add wall time; calls are batched so the clock's coarse ticks average out.
    """
    fn()  # warm-up (allocator, oneDNN primitive cache)
    if clock == "wall":
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=min_run_time)
        return m.median * 1e6
    start = time.thread_time()
    fn()
    calls = max(1, min(64, int(min_run_time / 5 / max(time.thread_time() - start, 1e-4))))
    samples = []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        samples.append((time.thread_time() - start) / calls)
    return statistics.median(samples) * 1e6


def layouts(x):
    return {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}


def conv_cases(args, gen, device):
    N, C, H, W, G = args.batch, args.channels, args.size, args.size, args.group_size
    x = torch.randn(N, C, H, W, generator=gen).to(device)
    rows = []
    for name, K, pad, use_in in (("conv1x1", 1, 0, False), ("conv3x3", 3, 1, True)):
        w = (torch.randn(C, C, K, K, generator=gen) / (C * K * K) ** 0.5).to(device)
        b = torch.randn(C, generator=gen).to(device)
        gin = half_gates(N, C // G, gen, device) if use_in else None
        gout = half_gates(N, C // G, gen, device)
        for fmt, xf in layouts(x).items():
            rows.append((name, f"dense F.conv2d ({fmt})", fmt, lambda xf=xf, w=w, b=b, pad=pad: F.conv2d(xf, w, b, padding=pad)))
        for fmt, xf in layouts(x).items():
            fn = lambda xf=xf, w=w, b=b, gin=gin, gout=gout, pad=pad: laudnet_ops.channel_gated_conv2d(  # noqa: E731
                xf, w, b, gin, gout, G, padding=pad, activation="none")
            rows.append((name, f"channel_gated_conv2d ({fmt})", fmt, fn))
        # The same FLOPs on oneDNN's fast path: a dense conv of the kept channel counts, which writes
        # only the kept outputs (the gated op also writes the zeros of the others).
        cin = C // 2 if use_in else C
        xr = x[:, :cin].contiguous(memory_format=torch.channels_last)
        wr = w[: C // 2, :cin].contiguous(memory_format=torch.channels_last)
        what = "half in, half out" if use_in else "half the outputs"
        rows.append((name, f"reference: dense, {what} (channels_last)", "channels_last",
                     lambda xr=xr, wr=wr, br=b[: C // 2].clone(), pad=pad: F.conv2d(xr, wr, br, padding=pad)))
    return rows


def bottleneck_weights(C, gen, device):
    width = C // 4

    def conv(cout, cin, k):
        return (torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5).to(device)

    # Eval-mode BatchNorm folded into each conv's weight and bias.
    return [(conv(width, C, 1), torch.randn(width, generator=gen).to(device), 0),
            (conv(width, width, 3), torch.randn(width, generator=gen).to(device), 1),
            (conv(C, width, 1) * 0.1, torch.randn(C, generator=gen).to(device) * 0.1, 0)]


def branch(x, layers):
    (w1, b1, p1), (w2, b2, p2), (w3, b3, p3) = layers
    h = F.relu(F.conv2d(x, w1, b1, padding=p1))
    h = F.relu(F.conv2d(h, w2, b2, padding=p2))
    return F.conv2d(h, w3, b3, padding=p3)


def block_cases(args, gen, device):
    N, C, H, W = args.batch, args.channels, args.size, args.size
    layers = bottleneck_weights(C, gen, device)
    x0 = F.relu(torch.randn(N, C, H, W, generator=gen)).to(device)  # a block input is post-ReLU
    gates = torch.zeros(N, dtype=torch.bool)
    gates[torch.randperm(N, generator=gen)[: N // 2]] = True  # exactly half of the samples run the block
    gates = gates.to(device)
    rows = []
    for fmt, x in layouts(x0).items():
        rows.append(("block", f"dense bottleneck ({fmt})", fmt, lambda x=x: F.relu(x + branch(x, layers))))
    for fmt, x in layouts(x0).items():
        work = x.clone()

        def skipped_inplace(work=work):
            # Inference: the block's input is dead afterwards, so the kept samples update it in place.
            kept, sel = laudnet_ops.sample_gather(work, gates)
            return laudnet_ops.sample_scatter_add_(work, branch(kept, layers), sel)

        def skipped(x=x):
            kept, sel = laudnet_ops.sample_gather(x, gates)
            return laudnet_ops.sample_scatter_add(x, branch(kept, layers), sel)

        rows.append(("block", f"layer-skipped, sample_scatter_add_ ({fmt})", fmt, skipped_inplace))
        rows.append(("block", f"layer-skipped, sample_scatter_add ({fmt})", fmt, skipped))
    kept = x0[gates.cpu()].to(device).contiguous(memory_format=torch.channels_last)
    rows.append(("block", "reference: dense, the kept samples only (channels_last)", "channels_last",
                 lambda: F.relu(kept + branch(kept, layers))))
    return rows


def check_correctness(args, device):
    """The timed ops agree with the reference on the benchmark shapes (a guard, not a test)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, args.channels, args.size, args.size, generator=gen).to(device)
    w = torch.randn(args.channels, args.channels, 3, 3, generator=gen).to(device) / 48
    g = half_gates(2, args.channels // args.group_size, gen, device)
    for fmt, xf in layouts(x).items():
        got = laudnet_ops.channel_gated_conv2d(xf, w, None, g, g, args.group_size, padding=1)
        want = laudnet_ops.reference.channel_gated_conv2d(x, w, None, g, g, args.group_size, padding=1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"channel_gated_conv2d ({fmt})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["conv", "block"], help="run one family of cases")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: CPU time of the calling thread (needs --threads 1), robust on a shared machine")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    torch.set_num_threads(args.threads)
    steady_allocator()  # steady-state latencies for every variant, whatever ran before
    device = torch.device(args.device)
    check_correctness(args, device)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        variants = []
        if args.only in (None, "conv"):
            variants += conv_cases(args, gen, device)
        if args.only in (None, "block"):
            variants += block_cases(args, gen, device)
        # Rounds interleave all variants, so a slow spell of a shared machine hits every variant
        # alike; each ratio is taken within a round, against that round's best dense time.
        times = [[] for _ in variants]
        ratios = [[] for _ in variants]
        for _ in range(args.rounds):
            this_round = [time_us(fn, args.min_run_time, args.clock) for _, _, _, fn in variants]
            for i, (case, label, _, _) in enumerate(variants):
                best = min(t for (c, l, _, _), t in zip(variants, this_round) if c == case and l.startswith("dense"))
                times[i].append(this_round[i])
                ratios[i].append(this_round[i] / best)

    print(f"torch {torch.__version__}, {args.threads} threads, device {device}, x = ({args.batch}, {args.channels}, "
          f"{args.size}, {args.size}), G = {args.group_size}, half of the groups / samples on, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'case':8s} {'variant':56s} {'time (us)':>11s} {'vs best dense':>14s} {'target':>7s}")
    table = []
    for (case, label, fmt, _), ts, rs in zip(variants, times, ratios):
        t, ratio = statistics.median(ts), statistics.median(rs)
        measured = not label.startswith(("dense", "reference"))
        target = f"{TARGETS[case]:.2f}" if measured else ""
        verdict = ("met" if ratio <= TARGETS[case] else "MISSED") if measured else ""
        print(f"{case:8s} {label:56s} {t:11.0f} {ratio:13.2f}x {target:>7s} {verdict}")
        table.append(dict(case=case, variant=label, layout=fmt, time_us=round(t, 1), ratio_vs_best_dense=round(ratio, 3),
                          target=target, threads=args.threads, device=str(device)))
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
