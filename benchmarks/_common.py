"""What the benchmark scripts share: timing, real dynamic blocks built from the predictor's block specs,
the unfused composites swapped into those blocks, CSV rows and a progress bar.

Benchmarks are scripts, not part of the package: they import ``laudnet_ops`` from the repository root.
"""

import contextlib
import csv
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from laudnet_ops import predictor, reference, unfused  # noqa: E402
from laudnet_ops.nn import DynamicBottleneck, DynamicRegNetYBlock, set_execution, set_force_keep  # noqa: E402
from laudnet_ops.nn.maskers import Masker  # noqa: E402
from laudnet_ops.nn import blocks as nn_blocks  # noqa: E402
from laudnet_ops.predictor.blocks import keep_for_rate  # noqa: E402
from laudnet_ops.predictor.timing import steady_allocator  # noqa: E402

PROFILES = ("v100", "rtx3090", "rtx3060", "tx2", "nano", "a100", "h100", "h200", "host")
MODES = ("dense", "spatial", "channel", "layer")
# Columns every benchmark CSV starts with (issue 7); scripts append their own after these.
CSV_COLUMNS = ("device", "block", "mode", "granularity", "rate", "predicted_ms", "measured_ms")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

_WEIGHTS_CL = {}


def _gather_conv2d(x, indices, weight, bias, *args):
    """Unfused gather-conv with a channels_last weight (cached), whatever layout the block keeps for the
    fused kernel: oneDNN's conv on the gathered tiles would otherwise re-lay the weight on every call."""
    hit = _WEIGHTS_CL.get(id(weight))
    if hit is None or hit[0] is not weight or hit[1] != weight._version:
        if len(_WEIGHTS_CL) > 64:
            _WEIGHTS_CL.clear()
        # The source is kept alive in the entry, so its id cannot be reused while cached.
        hit = _WEIGHTS_CL[id(weight)] = (weight, weight._version, weight.contiguous(memory_format=torch.channels_last))
    return unfused.gather_conv2d(x, indices, hit[2], bias, *args)


def _scatter_add(residual, packed, indices, activation="relu"):
    """Unfused scatter-add, the conventional order: scatter the packed patches into a zero map of the
    output's size, then add the residual and activate -- separate kernels. (The reference's
    ``scatter_add`` would also validate the indices with a sort; that is not part of the schedule.)"""
    N, C, H, W = residual.shape
    S = packed.shape[2]
    Hp, Wp = math.ceil(H / S), math.ceil(W / S)
    fmt = torch.channels_last if residual.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    canvas = residual.new_zeros(N, C, Hp * S, Wp * S).contiguous(memory_format=fmt)
    patches = canvas.view(N, C, Hp, S, Wp, S).permute(0, 2, 4, 1, 3, 5)  # splitting dims: a view in any format
    n, py, px = indices.long().unbind(1)
    patches.index_put_((n, py, px), packed)
    return reference._activate(residual + canvas[:, :, :H, :W], activation)


def _conv1x1_scatter_add(residual, packed, indices, weight, bias=None, activation="relu"):
    """Unfused last conv + scatter-add: the 1x1 conv writes the (P, Cout, S, S) patches, then the
    unfused scatter-add reads them back."""
    return _scatter_add(residual, torch.nn.functional.conv2d(packed, weight, bias), indices, activation)


def _sample_gather(x, gates):
    """Unfused sample gather: index list, then a row copy."""
    sel = gates.nonzero().flatten().to(torch.int32)
    return x.index_select(0, sel.long()), sel


def _sample_scatter_add(residual, y, sel, activation="relu"):
    """Unfused sample scatter-add: activate the residual, gather the kept rows, add, activate, scatter
    back -- separate kernels, as the predictor's unfused layer schedule prices them."""
    idx = sel.long()
    rows = reference._activate(residual.index_select(0, idx) + y, activation)
    return reference._activate(residual, activation).index_copy_(0, idx, rows)


# Which composite replaces each fused op in the "unfused" schedule (the paper's Table I baseline).
# Spatial: laudnet_ops.unfused (gather halo tiles -> dense conv; conv + pool + masker conv) and a scatter
# into a zero map followed by the residual add. Layer: index_select / add / index_copy_ composites. Channel skipping has no
# separate fusion to switch off (the weight gather is part of the gated conv), so it has no unfused row.
_UNFUSED_OPS = {
    "masker_conv1x1": unfused.masker_conv1x1,
    "gather_conv2d": _gather_conv2d,
    "scatter_add": _scatter_add,
    "scatter_add_": _scatter_add,
    "conv1x1_scatter_add": _conv1x1_scatter_add,
    "conv1x1_scatter_add_": _conv1x1_scatter_add,
    "sample_gather": _sample_gather,
    "sample_scatter_add": _sample_scatter_add,
    "sample_scatter_add_": _sample_scatter_add,
}
# The fusion each spatial op stands for (names of the predictor's Schedule fields).
FUSION_OPS = {
    "masker": ("masker_conv1x1",),
    "gather": ("gather_conv2d",),
    "scatter": ("scatter_add", "scatter_add_", "conv1x1_scatter_add", "conv1x1_scatter_add_"),
}
UNFUSED_MODES = ("spatial", "layer")


def dtype_name(name: str) -> str:
    key = DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; choose one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}")
    return key


def parse_floats(text):
    return [float(v) for v in str(text).replace(",", " ").split()]


def measuring_device(measure: str, profile: str) -> str:
    """'cuda', 'cpu' or 'none' from ``--measure`` (auto: CUDA when visible, the CPU for the host profile)."""
    if measure == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu" if profile == "host" else "none"
    if measure == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--measure cuda: no CUDA device is visible")
    return measure


def batches(args, profile, measure_on: str):
    """(predicted batch, measured batch or None) from --batch / --cpu-batch and the profile.

    The host profile is predicted at the batch the CPU is measured at; a GPU profile at its
    paper batch, while a CPU measuring beside it uses --cpu-batch."""
    host = args.gpu == "host"
    batch = args.batch or (args.cpu_batch if host else profile.default_batch)
    measured = {"cuda": batch, "cpu": batch if host else args.cpu_batch}.get(measure_on)
    return batch, measured


def machine_name(device: str) -> str:
    if device == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{torch.get_num_threads()}threads/{_CPU_CLOCK['name']}-clock"


def matching_profile(device: str):
    """The predictor profile of the machine measured: 'host' for the CPU, the GPU's own when known."""
    if device == "cpu":
        return "host"
    if device == "cuda":
        name = torch.cuda.get_device_name().lower()
        for profile in ("h200", "h100", "a100", "v100", "rtx 3090", "rtx 3060"):
            if profile in name:
                return profile.replace(" ", "")
    return None


_PROFILES = {}


def profile(name):
    """The predictor's Device for a profile name (looked up once: 'host' detects this machine)."""
    if not isinstance(name, str):
        return name
    if name not in _PROFILES:
        _PROFILES[name] = predictor.get_device(name)
    return _PROFILES[name]


# --- timing --------------------------------------------------------------------------------------------

CLOCKS = ("auto", "wall", "thread")
_CPU_CLOCK = {"timer": time.perf_counter, "name": "wall"}


def configure_cpu(threads=None, clock: str = "auto") -> str:
    """Set torch's CPU threads and the clock of CPU timings; returns a description for the output.

    ``thread`` times the calling thread's CPU time (``time.thread_time``): with one torch thread every
    kernel runs on it, and the time other processes hold the core is left out -- the only way to get
    stable numbers on a shared, loaded machine. ``auto`` picks it for one thread, wall time otherwise
    (with several threads, OpenMP barriers stall whenever a core is taken away; nothing fixes that).
    """
    if threads:
        torch.set_num_threads(threads)
    # Steady-state latencies: every variant, dense ones included, reuses freed memory as a
    # long-running process does, instead of page-faulting fresh outputs depending on what ran before.
    steady_allocator()
    if clock not in CLOCKS:
        raise SystemExit(f"unknown clock {clock!r}; choose one of {CLOCKS}")
    if clock == "auto":
        clock = "thread" if torch.get_num_threads() == 1 else "wall"
    if clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("--clock thread needs --threads 1 (it times the calling thread only)")
    _CPU_CLOCK.update(timer=time.thread_time if clock == "thread" else time.perf_counter, name=clock)
    return f"{torch.get_num_threads()} threads, {clock} clock"


def cuda_paths() -> str:
    """Which CUDA paths the library's switches select, for a benchmark's header."""
    import laudnet_ops

    def on(flag):
        return "on" if flag else "off"

    return (f"tensor cores {on(laudnet_ops.tensor_cores_enabled())}, experimental paths "
            f"{on(laudnet_ops.experimental_kernels_enabled())}, cuDNN composites "
            f"{on(laudnet_ops.cudnn_composites_enabled())}")


def time_ms(fn, min_run_time: float, device: str) -> float:
    """Median milliseconds per call of ``fn``, after a warm-up.

    CPU: torch.utils.benchmark's blocked_autorange (clock: see ``configure_cpu``). CUDA: CUDA events
    around blocks of calls on the current stream (the host-side sync of data-dependent index lists is
    part of the measured time).
    """
    fn()  # warm-up: oneDNN / cuDNN primitive caches, allocator, folded batch norm
    if device != "cuda":
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(),
                                timer=_CPU_CLOCK["timer"])
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    calls = max(1, min(1000, int(min_run_time * 1e3 / 5 / once)))
    samples = []
    deadline = time.perf_counter() + min_run_time
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 50):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


# --- blocks --------------------------------------------------------------------------------------------

def find_block(name: str, default_model: str = "resnet101"):
    """``(model, BlockSpec)`` from ``"layer3.1"`` (in ``default_model``) or ``"regnety800mf:s3.b2"``."""
    model, _, block = name.rpartition(":")
    model = model or default_model
    spec = predictor.get_model(model)
    for b in spec.blocks:
        if b.name == block:
            return spec.name, b
    raise SystemExit(f"unknown block {block!r} of {spec.name}; choose one of {[b.name for b in spec.blocks]}")


def default_blocks(model: str = "resnet101"):
    """A representative block of each stage: its second block (stride 1, identity shortcut)."""
    spec = predictor.get_model(model)
    names = []
    for stage in range(spec.stages):
        in_stage = [b for b in spec.blocks if b.stage == stage]
        names.append(f"{spec.name}:{in_stage[min(1, len(in_stage) - 1)].name}")
    return names


def stage_granularity(model: str, mode: str, stage: int, granularity=None) -> int:
    """S or G of ``stage``: ``granularity`` (one value or one per stage) or the model's paper default."""
    if mode not in ("spatial", "channel"):
        return 1
    spec = predictor.get_model(model)
    if granularity is None:
        values = spec.default_spatial if mode == "spatial" else spec.default_channel
    else:
        values = granularity if isinstance(granularity, (tuple, list)) else (granularity,)
    return int(values[stage] if len(values) > 1 else values[0])


def parse_granularity(text):
    """``"4"`` -> (4,), ``"4-4-2-1"`` / ``"4,4,2,1"`` -> per stage; None stays None."""
    if text is None:
        return None
    return tuple(int(v) for v in str(text).replace("-", ",").split(",") if v)


def build_block(model: str, spec, mode: str, granularity: int) -> nn.Module:
    """The library's dynamic block for ``spec`` in eval (random weights; batch norm statistics perturbed
    so that folding is not a no-op)."""
    if model.startswith("resnet"):
        downsample = None
        if spec.downsample:
            downsample = nn.Sequential(nn.Conv2d(spec.cin, spec.cout, 1, spec.stride, bias=False),
                                       nn.BatchNorm2d(spec.cout))
        block = DynamicBottleneck(spec.cin, spec.width, spec.stride, downsample, mode=mode, granularity=granularity)
    else:
        block = DynamicRegNetYBlock(spec.cin, spec.cout, spec.stride, spec.width // spec.groups,
                                    se_ratio=spec.se / spec.cin, mode=mode, granularity=granularity)
    gen = torch.Generator().manual_seed(0)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.num_features, generator=gen))
    # As the models do: a block with an identity shortcut owns its post-ReLU input (in-place scatter).
    block.owns_activated_input = not spec.downsample
    return block.eval()


def prepare(block: nn.Module, mode: str, keep: float, seed: int = 0) -> nn.Module:
    """Sparse (inference) execution with a seeded random ``keep`` fraction of the units."""
    if mode != "dense":
        set_force_keep(block, keep, seed)
    set_execution(block, "sparse")
    return block


def same_masks_every_call(module: nn.Module, fn):
    """``fn`` with every forced masker of ``module`` reset to its generator's present state before each call,
    so each call keeps the same units: one configuration, timed in its steady state. (A fresh draw per call
    gives each call another kept-sample or kept-patch count: new shapes for cuDNN's plan cache each time.)"""
    maskers = [m for m in module.modules() if isinstance(m, Masker) and m.force_keep is not None]
    states = [m._generator.get_state() for m in maskers]

    def call():
        for masker, state in zip(maskers, states):
            masker._generator.set_state(state)
        return fn()

    return call


def block_input(spec, batch: int, device: str, dtype, channels_last: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.cin, spec.h, spec.w, generator=gen).relu_()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def block_keep(spec, mode: str, rate: float, granularity: int) -> float:
    """The keep ratio (patches, groups, samples) whose executed FLOPs are ``rate`` of the dense branch:
    the predictor's inversion, so measured and predicted rows describe the same configuration."""
    return keep_for_rate(spec, mode, rate, granularity)


def realised_keep(block: nn.Module):
    record = getattr(block, "_laud_record", None)
    if record is None or record.mask is None:
        return None
    return float(record.mask.float().mean())


@contextlib.contextmanager
def unfused_ops(names):
    """Within the block, replace the fused ops ``names`` by their unfused composites (same signatures
    and results); the other ops stay fused. The blocks fetch every op through ``blocks.op``."""
    fused_op = nn_blocks.op
    names = set(names)

    def op(name):
        return _UNFUSED_OPS[name] if name in names else fused_op(name)

    nn_blocks.op = op
    try:
        yield
    finally:
        nn_blocks.op = fused_op


def all_unfused_names(mode: str):
    return [n for n in _UNFUSED_OPS if (mode == "layer") == n.startswith("sample_")]


class Measurer:
    """Times the real blocks on ``device``; caches the built block of each (block, mode, granularity)."""

    def __init__(self, device, batch, dtype, min_run_time):
        self.device, self.batch, self.dtype, self.min_run_time = device, batch, DTYPES[dtype], min_run_time
        self._blocks = {}

    def block(self, model, spec, mode, gran):
        key = (model, spec.name, mode, gran)
        if key not in self._blocks:
            self._blocks[key] = build_block(model, spec, mode, gran).to(self.device, self.dtype)
        return self._blocks[key]

    def dense(self, model, spec, channels_last, batch=None):
        block = prepare(self.block(model, spec, "dense", 1), "dense", 1.0)
        x = block_input(spec, batch or self.batch, self.device, self.dtype, channels_last)
        if channels_last:
            block = block.to(memory_format=torch.channels_last)
        return time_ms(lambda: block(x), self.min_run_time, self.device)

    def dynamic(self, model, spec, mode, gran, keep, unfused=(), batch=None):
        """(ms, realised keep fraction) of the sparse block, channels_last input."""
        # channels_last weights as in the dense baseline: oneDNN's convs (conv3 on packed patches, the
        # layer branch, the unfused composites) want them; the fused kernels repack weights anyway.
        block = prepare(self.block(model, spec, mode, gran), mode, keep).to(memory_format=torch.channels_last)
        x = block_input(spec, batch or self.batch, self.device, self.dtype, True)
        # A schedule with a fusion switched off is a row of the paper's ablation, built from
        # masker_conv1x1 or its composite; the fully fused one is the library's default path.
        block.conv1_on_halo = False if unfused else None
        with unfused_ops(unfused):
            ms = time_ms(same_masks_every_call(block, lambda: block(x)), self.min_run_time, self.device)
        return ms, realised_keep(block)


# --- output --------------------------------------------------------------------------------------------

def fmt_ms(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def write_csv(path: str, rows, extra_columns=()):
    columns = list(CSV_COLUMNS)
    for key in list(extra_columns) + [k for r in rows for k in r]:
        if key not in columns:
            columns.append(key)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                             for k, v in row.items()})
    print(f"wrote {path}")


def progress(total: int, desc: str, disable: bool = False):
    """A tqdm bar on stderr, or a plain counter when tqdm is not installed."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=disable, leave=False, file=sys.stderr)
    except ImportError:
        return _Counter(total, desc, disable)


class _Counter:
    def __init__(self, total, desc, disable):
        self.total, self.desc, self.n, self.disable = total, desc, 0, disable or not sys.stderr.isatty()
        self._last = 0.0

    def update(self, k=1):
        self.n += k
        now = time.perf_counter()
        if not self.disable and (now - self._last > 0.5 or self.n == self.total):
            self._last = now
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total}")
            sys.stderr.flush()

    def set_postfix_str(self, text):
        pass

    def close(self):
        if not self.disable:
            sys.stderr.write("\n")
