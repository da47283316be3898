"""Command line: ``python -m laudnet_ops.predictor [predict flags] | calibrate | validate | recommend | devices``.

    python -m laudnet_ops.predictor --gpu v100 --model resnet101 --mode layer --rate 0.4
    python -m laudnet_ops.predictor --gpu v100 --model resnet101 --mode spatial --granularity 4-4-2-1 --json
    python -m laudnet_ops.predictor --gpu tx2 --model resnet50 --plot curves.png
    python -m laudnet_ops.predictor calibrate [--device cpu|cuda] [--threads 1] [--out FILE]
    python -m laudnet_ops.predictor validate [--device cpu|cuda] [--calibration FILE] [--json]
    python -m laudnet_ops.predictor recommend --gpu rtx3090 --model resnet101 --rate 0.5
    python -m laudnet_ops.predictor devices
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ._util import per_stage
from .blocks import FUSED, MODES, UNFUSED
from .devices import get_device, known_devices, load_devices
from .networks import known_models, predict_network

SUBCOMMANDS = ("predict", "calibrate", "validate", "recommend", "devices")


def _calibration_arg(value: str | None) -> Any:
    if value is None:
        return None
    return False if value.lower() == "none" else value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", "--device", dest="device", default="v100",
                   help=f"device name ({', '.join(known_devices())}, or one from --device-file)")
    p.add_argument("--device-file", action="append", default=[], help="JSON/YAML file of user devices")
    p.add_argument("--calibration", default=None,
                   help="calibration file to apply ('none' = uncalibrated; default: the device's saved one)")
    p.add_argument("--model", default="resnet101", help=f"model ({', '.join(known_models())})")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the device's)")
    p.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m laudnet_ops.predictor",
                                description="Predict LAUDNet latency (subcommands: calibrate, validate, "
                                            "recommend, devices; see --help of each).")
    _common(p)
    p.add_argument("--mode", default="layer", choices=MODES, help="dynamic paradigm")
    p.add_argument("--rate", type=float, default=0.5, help="block activation rate (executed / dense FLOPs)")
    p.add_argument("--keep", action="store_true", help="--rate is the keep ratio, not the FLOPs rate")
    p.add_argument("--granularity", default=None,
                   help="S (spatial) or G (channel): one value or one per stage, e.g. 4-4-2-1")
    p.add_argument("--unfused", action="store_true", help="predict the unfused schedule (fusion ablation)")
    p.add_argument("--kernels", action="store_true", help="list every kernel of every block")
    p.add_argument("--plot", metavar="PNG", default=None, help="also save latency-vs-rate curves per paradigm")
    return p


def _print_prediction(net: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(net.to_dict(kernels=args.kernels)))
        return
    gran = "-".join(map(str, net.granularity)) if net.mode in ("spatial", "channel") else "-"
    print(f"{net.model} on {net.device}: mode {net.mode}, granularity {gran}, rate {net.rate}, "
          f"batch {net.batch}, {net.dtype}")
    print(f"{'block':14s} {'keep':>6s} {'dense ms':>10s} {'dynamic ms':>11s} {'speed-up':>9s}")
    for b in net.blocks:
        print(f"{b.block:14s} {b.keep:6.2f} {b.dense * 1e3:10.3f} {b.dynamic * 1e3:11.3f} {b.speedup:9.2f}")
        if args.kernels:
            for k in b.kernels:
                print(f"    {k.name:22s} {k.latency * 1e3:9.3f} ms  tile {'x'.join(map(str, k.tile))}")
    stem = sum(k.latency for k in net.stem) * 1e3
    head = sum(k.latency for k in net.head) * 1e3
    print(f"{'stem + head':14s} {'':6s} {stem + head:10.3f} {stem + head:11.3f}")
    print(f"{'total':14s} {'':6s} {net.dense * 1e3:10.3f} {net.dynamic * 1e3:11.3f} {net.speedup:9.2f}")


def _run_predict(argv: Sequence[str]) -> int:
    args = _predict_parser().parse_args(argv)
    for path in args.device_file:
        load_devices(path)
    device = get_device(args.device, _calibration_arg(args.calibration))
    gran = None if args.granularity is None else per_stage(args.granularity, 4, "--granularity")
    net = predict_network(device, args.model, args.mode, args.rate, gran, args.batch, args.dtype,
                          UNFUSED if args.unfused else FUSED, rate_kind="keep" if args.keep else "flops")
    _print_prediction(net, args)
    if args.plot:
        from .plot import plot_curves

        path = plot_curves(args.plot, device, args.model, batch=args.batch, dtype=args.dtype,
                           schedule=UNFUSED if args.unfused else FUSED)
        print(f"saved {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _run_recommend(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m laudnet_ops.predictor recommend",
                                description="Best paradigm and per-stage granularity by predicted latency.")
    _common(p)
    p.add_argument("--rate", type=float, default=0.5, help="target activation rate")
    args = p.parse_args(argv)
    for path in args.device_file:
        load_devices(path)
    from .recommend import recommend

    rec = recommend(get_device(args.device, _calibration_arg(args.calibration)), args.model, args.rate,
                    args.batch, args.dtype)
    print(json.dumps(rec.to_dict()) if args.json else rec.table())
    return 0


def _run_calibrate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m laudnet_ops.predictor calibrate",
                                description="Measure microbenchmarks here and fit the model's constants.")
    p.add_argument("--device", default="cpu", help="cpu (the host) or cuda[:i]")
    p.add_argument("--out", default=None, help="calibration file (default: the device's in the cache dir)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads to measure with")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--statistic", default="median", choices=("median", "min"))
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "thread"),
                   help="auto: this thread's CPU time when measuring on one CPU thread, else wall time")
    p.add_argument("--quick", action="store_true", help="a small benchmark set (seconds)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from .calibrate import calibrate
    from .devices import default_calibration_path

    cal = calibrate(args.device, args.out, args.quick, args.repeats, show_progress=not args.json,
                    threads=args.threads, rounds=args.rounds, statistic=args.statistic, clock=args.clock)
    if args.json:
        print(json.dumps(cal.to_dict()))
        return 0
    print(f"{'microbenchmark':42s} {'measured us':>12s} {'fitted us':>10s}")
    for s in cal.samples:
        print(f"{s.name:42s} {s.measured * 1e6:12.1f} {s.predicted * 1e6:10.1f}")
    print("constants: " + ", ".join(f"{k}={v:.4g}" for k, v in cal.efficiency.items()))
    print(f"bandwidth {cal.dram_gbs:.1f} GB/s, {cal.threads} threads; saved to "
          f"{args.out or default_calibration_path(cal.device)}")
    return 0


def _run_validate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m laudnet_ops.predictor validate",
                                description="Measure blocks here and compare with the predictions.")
    p.add_argument("--device", default="cpu", help="cpu (the host) or cuda[:i]")
    p.add_argument("--calibration", default=None, help="calibration file ('none' = uncalibrated)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--statistic", default="median", choices=("median", "min"))
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "thread"),
                   help="auto: this thread's CPU time when measuring on one CPU thread, else wall time")
    p.add_argument("--quick", action="store_true", help="a tiny case set (seconds)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from .validate import validate

    rep = validate(args.device, _calibration_arg(args.calibration), args.quick, args.repeats, args.rounds,
                   args.threads, show_progress=not args.json, statistic=args.statistic, clock=args.clock)
    print(json.dumps(rep.to_dict()) if args.json else rep.table())
    return 0


def _run_devices(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m laudnet_ops.predictor devices")
    p.add_argument("--device-file", action="append", default=[])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for path in args.device_file:
        load_devices(path)
    devices = [get_device(name) for name in known_devices()]
    if args.json:
        print(json.dumps([d.to_dict() for d in devices]))
        return 0
    print(f"{'name':9s} {'PEs':>4s} {'FP32/PE':>8s} {'MHz':>7s} {'GB/s':>8s} {'batch':>6s}  description")
    for d in devices:
        print(f"{d.name:9s} {d.num_pe:4d} {d.fp32_per_pe:8d} {d.clock_mhz:7.0f} {d.dram_gbs:8.1f} "
              f"{d.default_batch:6d}  {d.description}{' [calibrated]' if d.calibrated else ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "predict"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    runner = {"predict": _run_predict, "calibrate": _run_calibrate, "validate": _run_validate,
              "recommend": _run_recommend, "devices": _run_devices}[command]
    try:
        return runner(rest)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
