"""Network benchmark: whole LAUD-ResNet-50/101 and LAUD-RegNetY-400MF/800MF, dense vs each paradigm at
activation rates 0.3-0.7, predicted for a device profile and measured where this machine can.

    python benchmarks/bench_network.py --gpu v100                       # predictions (batch 128)
    python benchmarks/bench_network.py --gpu host --models resnet50     # predict and measure this CPU
    python benchmarks/bench_network.py --gpu v100 --measure cpu --csv net.csv --plot net.png

Every residual block runs in the paradigm with the same activation rate (executed / dense FLOPs of its
branch); a seeded random fraction of each block's units is kept -- the keep ratio the predictor's FLOPs
accounting gives for that block and rate -- so predicted and measured rows describe the same networks.
Stem, head and projection shortcuts stay dense. Measured: the library's models in eval, sparse path
(batch norm folded), channels_last input; dense in NCHW and channels_last, speed-ups over the faster.
The ``realised_flops_ratio`` column (``(FLOPs)`` lines) is executed / dense FLOPs of the last measured forward,
stem and head included (laudnet_ops.nn.stats): a check that the measured network did the asked-for work.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402
from laudnet_ops import models, predictor  # noqa: E402
from laudnet_ops.nn import set_execution, stats  # noqa: E402
from laudnet_ops.nn.blocks import DynamicBlock  # noqa: E402

BUILDERS = {"resnet50": models.laud_resnet50, "resnet101": models.laud_resnet101,
            "regnety400mf": models.laud_regnety_400mf, "regnety800mf": models.laud_regnety_800mf}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--gpu", default="v100", choices=C.PROFILES, help="predictor device profile (default v100)")
    p.add_argument("--models", default=",".join(BUILDERS), help="comma-separated: " + ", ".join(BUILDERS))
    p.add_argument("--modes", default="dense,spatial,channel,layer")
    p.add_argument("--rates", type=C.parse_floats, default=[0.3, 0.5, 0.7])
    p.add_argument("--granularity", default=None, help="S / G, one value or per stage (default: the paper's)")
    p.add_argument("--batch", type=int, default=None, help="prediction (and CUDA) batch; default the profile's")
    p.add_argument("--cpu-batch", type=int, default=1, help="batch of CPU measurements (default 1)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--measure", default="auto", choices=("auto", "none", "cpu", "cuda"))
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--clock", default="auto", choices=C.CLOCKS,
                   help="CPU timing clock: thread CPU time (needs --threads 1; robust on a loaded machine) "
                        "or wall; auto: thread with one thread, else wall")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=None, help="PNG: network speed-up vs rate per model")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.dtype = C.dtype_name(args.dtype)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in BUILDERS:
            p.error(f"unknown model {m!r}; choose from {list(BUILDERS)}")
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in C.MODES:
            p.error(f"unknown mode {m!r}; choose from {C.MODES}")
    # Dense first: the measured speed-ups are over the dense network of the same run.
    args.modes = ["dense"] + [m for m in args.modes if m != "dense"]
    args.granularity = C.parse_granularity(args.granularity)
    return args


def granularity(model, mode, gran):
    spec = predictor.get_model(model)
    return tuple(C.stage_granularity(model, mode, s, gran) for s in range(spec.stages))


def build(model, mode, gran, rate, device, dtype, resolution):
    """The model in eval on the sparse path, each block keeping the fraction that makes its rate ``rate``."""
    net = BUILDERS[model](mode=mode, granularity=gran if mode in ("spatial", "channel") else None)
    net = net.to(device, C.DTYPES[dtype]).eval()
    blocks = [m for m in net.modules() if isinstance(m, DynamicBlock)]
    specs = predictor.get_model(model, resolution).blocks
    if len(blocks) != len(specs):
        raise RuntimeError(f"{model}: {len(blocks)} blocks in the model, {len(specs)} in the predictor")
    if mode != "dense":
        for i, (block, spec) in enumerate(zip(blocks, specs)):
            block.masker.set_force_keep(C.block_keep(spec, mode, rate, gran[spec.stage]), seed=i)
    set_execution(net, "sparse")
    return net


def measure(net, batch, resolution, device, dtype, channels_last, min_run_time):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=C.DTYPES[dtype]).contiguous(memory_format=fmt)
    net = net.to(memory_format=fmt)
    ms = C.time_ms(C.same_masks_every_call(net, lambda: net(x)), min_run_time, device)
    return ms, float(stats(net)["flops_ratio"])


def run(args, profile, batch, measure_on, mbatch, bar):
    rows = []
    machine = C.matching_profile(measure_on) if measure_on != "none" else None
    for model in args.models:
        dense_meas = {}
        for mode in args.modes:
            gran = granularity(model, mode, args.granularity)
            gtext = "-".join(map(str, gran)) if mode in ("spatial", "channel") else "1"
            for rate in ([1.0] if mode == "dense" else args.rates):
                p = predictor.predict_network(C.profile(profile), model, mode, rate, gran, batch, args.dtype,
                                              resolution=args.resolution)
                rows.append(dict(device=profile, block=model, mode=mode, granularity=gtext, rate=rate,
                                 predicted_ms=(p.dense if mode == "dense" else p.dynamic) * 1e3,
                                 predicted_speedup=1.0 if mode == "dense" else p.speedup, batch=batch,
                                 dtype=args.dtype))
                if measure_on == "none":
                    bar.update()
                    continue
                mp = None
                if machine:
                    mp = predictor.predict_network(C.profile(machine), model, mode, rate, gran, mbatch, args.dtype,
                                                   resolution=args.resolution)
                net = build(model, mode, gran, rate, measure_on, args.dtype, args.resolution)
                layouts = (("nchw", False), ("channels_last", True)) if mode == "dense" else (("channels_last", True),)
                for layout, cl in layouts:
                    ms, realised = measure(net, mbatch, args.resolution, measure_on, args.dtype, cl, args.min_run_time)
                    if mode == "dense":
                        dense_meas[layout] = ms
                    row = dict(device=C.machine_name(measure_on), profile=machine, block=model, mode=mode,
                               granularity=gtext, rate=rate, layout=layout, batch=mbatch, dtype=args.dtype,
                               predicted_ms=None if mp is None else (mp.dense if mode == "dense" else mp.dynamic) * 1e3,
                               predicted_speedup=None if mp is None else (1.0 if mode == "dense" else mp.speedup),
                               measured_ms=ms, realised_flops_ratio=realised)
                    if dense_meas:
                        row["measured_speedup"] = min(dense_meas.values()) / ms
                    rows.append(row)
                if mode == "dense":
                    for r in rows[-2:]:
                        r["measured_speedup"] = min(dense_meas.values()) / r["measured_ms"]
                bar.update()
                del net
    return rows


def print_table(rows, args):
    rates = "".join(f"{r:>8.2f}" for r in args.rates)
    print("\nnetwork speed-up over dense (dense / dynamic latency) at each activation rate")
    for model in args.models:
        for device in dict.fromkeys(r["device"] for r in rows if r["block"] == model):
            rs = [r for r in rows if r["block"] == model and r["device"] == device]
            measured = device != args.gpu
            key = "measured_speedup" if measured else "predicted_speedup"
            dense = [r for r in rs if r["mode"] == "dense"]
            if measured:
                dtext = ", ".join(f"{r['measured_ms']:.4g} ms {r['layout']}" for r in dense)
                title = f"{device}, measured at batch {rs[0]['batch']}: dense {dtext}"
            else:
                title = f"{device}, predicted at batch {rs[0]['batch']}: dense {dense[0]['predicted_ms']:.4g} ms" \
                    if dense else f"{device}, predicted at batch {rs[0]['batch']}"
            print(f"\n{model} -- {title}")
            print(f"  {'paradigm':10}{'S/G':>9}{rates}")
            for mode in args.modes:
                if mode == "dense":
                    continue
                cells = {r["rate"]: r for r in rs if r["mode"] == mode}
                if not cells:
                    continue
                gran = next(iter(cells.values()))["granularity"]
                vals = "".join(f"{cells[r][key]:>7.2f}x" if r in cells and cells[r].get(key) is not None
                               else f"{'-':>8}" for r in args.rates)
                print(f"  {mode:10}{gran:>9}{vals}")
                if measured:
                    realised = "".join(f"{cells[r]['realised_flops_ratio']:>8.2f}" if r in cells else f"{'-':>8}"
                                       for r in args.rates)
                    print(f"  {'  (FLOPs)':10}{'':>9}{realised}")


def plot(rows, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no plot written", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(args.models), figsize=(4.2 * len(args.models), 3.6), squeeze=False)
    colors = {"spatial": "tab:blue", "channel": "tab:orange", "layer": "tab:green"}
    for ax, model in zip(axes[0], args.models):
        for mode in [m for m in args.modes if m != "dense"]:
            pr = [r for r in rows if r["block"] == model and r["mode"] == mode and r["device"] == args.gpu]
            mr = [r for r in rows if r["block"] == model and r["mode"] == mode and r["device"] != args.gpu]
            if pr:
                ax.plot([r["rate"] for r in pr], [r["predicted_speedup"] for r in pr], "-", color=colors[mode],
                        label=f"{mode} ({args.gpu}, predicted)")
            if mr:
                ax.plot([r["rate"] for r in mr], [r["measured_speedup"] for r in mr], "--", marker="o",
                        color=colors[mode], alpha=0.6, label=f"{mode} ({mr[0]['device']}, measured)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(model)
        ax.set_xlabel("activation rate")
        ax.set_ylabel("speed-up over dense")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    C.configure_cpu(args.threads, args.clock)
    torch.manual_seed(0)
    profile = C.profile(args.gpu)
    measure_on = C.measuring_device(args.measure, args.gpu)
    batch, mbatch = C.batches(args, profile, measure_on)
    print(f"bench_network: profile {args.gpu} ({profile.description}), models {', '.join(args.models)}")
    if measure_on == "none":
        print("measuring: nothing (no CUDA device; add --measure cpu, or use --gpu host, to time this CPU)")
    else:
        print(f"measuring: {C.machine_name(measure_on)}, batch {mbatch}, {args.resolution}x{args.resolution}")
    total = len(args.models) * sum(1 if m == "dense" else len(args.rates) for m in args.modes)
    bar = C.progress(total, "bench_network", args.quiet)
    try:
        with torch.no_grad():
            rows = run(args, args.gpu, batch, measure_on, mbatch, bar)
    finally:
        bar.close()
    print_table(rows, args)
    if args.csv:
        C.write_csv(args.csv, rows, ("batch", "dtype", "predicted_speedup", "measured_speedup", "profile",
                                     "layout", "realised_flops_ratio"))
    if args.plot:
        plot(rows, args, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
