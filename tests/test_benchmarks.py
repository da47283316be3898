"""The benchmark scripts run end to end with tiny settings and write well-formed CSV.

Measurements run on the CPU when the compiled extension is built (the fused paths need it); otherwise
the scripts are run for predictions only, which is what a pure-Python install can do.
"""

import csv
import math
import os
import re
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCH)

import bench_block  # noqa: E402
import bench_network  # noqa: E402
import ablation_fusion  # noqa: E402
from laudnet_ops._library import extension_error  # noqa: E402

REQUIRED = ["device", "block", "mode", "granularity", "rate", "predicted_ms", "measured_ms"]
MEASURE = "none" if extension_error is not None else "cpu"
TINY = ["--min-run-time", "0.005", "--quiet"]


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:len(REQUIRED)] == REQUIRED
        rows = list(reader)
    assert rows
    for row in rows:
        assert set(row) == set(reader.fieldnames)  # no ragged rows
        assert row["mode"] in ("dense", "spatial", "channel", "layer")
        assert 0.0 <= float(row["rate"]) <= 1.0
        for key in ("predicted_ms", "measured_ms"):
            if row[key] != "":
                value = float(row[key])
                assert math.isfinite(value) and value > 0, (key, row)
    return rows


def measured(rows):
    return [r for r in rows if r["measured_ms"] != ""]


def test_bench_block_predicts_and_measures(tmp_path, capsys):
    path, png = tmp_path / "block.csv", tmp_path / "block.png"
    argv = ["--gpu", "v100", "--measure", MEASURE, "--block", "regnety400mf:s4.b2",
            "--rates", "0.5,1.0", "--cpu-batch", "1", "--csv", str(path), "--plot", str(png), *TINY]
    assert bench_block.main(argv) == 0
    rows = read_csv(path)
    predicted = [r for r in rows if r["device"] == "v100"]
    # dense + (spatial fused/unfused, channel, layer fused/unfused) x 2 rates, per block
    assert len(predicted) == 1 + 5 * 2
    assert all(r["measured_ms"] == "" and r["batch"] == "128" for r in predicted)
    assert {r["block"] for r in rows} == {"regnety400mf:s4.b2"}
    assert {r["schedule"] for r in rows if r["mode"] == "channel"} == {"fused"}
    if MEASURE == "cpu":
        m = measured(rows)
        assert len(m) == 2 + 5 * 2  # dense in two layouts
        assert all(r["device"].startswith("cpu") and r["profile"] == "host" and r["batch"] == "1" for r in m)
        assert all(float(r["measured_speedup"]) > 0 for r in m)
        full = [r for r in m if r["mode"] != "dense" and float(r["rate"]) == 1.0]
        # Rate 1.0 is a keep just below 1 where the masker's own FLOPs count (0.998 for the spatial
        # masker here), and force_keep draws each unit at random: one of the 49 patches may be dropped.
        assert all(float(r["keep"]) > 0.99 for r in full)
        assert all(float(r["realised_keep"]) >= 1 - 2 / 49 for r in full)
    captured = capsys.readouterr()
    assert "speed-up over dense" in captured.out and "layer fused" in captured.out
    assert png.exists() or "matplotlib is not installed" in captured.err


def test_bench_block_default_profile_prints_how_to_measure(capsys):
    assert bench_block.main(["--block", "layer4.1", "--rates", "0.5", "--measure", "none", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "--measure cpu" in out and "v100" in out


def test_bench_block_batch_sweep(tmp_path):
    path = tmp_path / "sweep.csv"
    argv = ["--gpu", "host", "--measure", MEASURE, "--block", "layer4.1", "--modes", "dense,layer",
            "--rates", "0.5", "--cpu-batch", "2", "--batch-sweep", "1,2", "--csv", str(path), *TINY]
    assert bench_block.main(argv) == 0
    sweep = [r for r in read_csv(path) if r["experiment"] == "batch_sweep"]
    assert {r["batch"] for r in sweep} == {"1", "2"}
    for r in sweep:
        if r["per_image_predicted_ms"]:
            assert float(r["per_image_predicted_ms"]) == pytest.approx(float(r["predicted_ms"]) / int(r["batch"]), rel=1e-4)


def test_bench_network(tmp_path):
    path = tmp_path / "net.csv"
    argv = ["--gpu", "v100", "--measure", MEASURE, "--models", "regnety400mf", "--rates", "0.5",
            "--modes", "layer", "--resolution", "64", "--cpu-batch", "1", "--csv", str(path), *TINY]
    assert bench_network.main(argv) == 0
    rows = read_csv(path)
    assert {(r["device"], r["mode"]) for r in rows if r["device"] == "v100"} == {("v100", "dense"), ("v100", "layer")}
    if MEASURE == "cpu":
        layer = [r for r in measured(rows) if r["mode"] == "layer"]
        assert len(layer) == 1
        # The measured network executes about the asked-for fraction of its FLOPs.
        assert 0.3 < float(layer[0]["realised_flops_ratio"]) < 0.8


def test_ablation_fusion(tmp_path):
    path = tmp_path / "ablation.csv"
    argv = ["--gpu", "v100", "--measure", MEASURE, "--block", "layer4.1", "--cpu-batch", "1",
            "--csv", str(path), *TINY]
    assert ablation_fusion.main(argv) == 0
    rows = read_csv(path)
    predicted = {r["schedule"]: r for r in rows if r["device"] == "v100"}
    assert list(predicted) == list(ablation_fusion.SCHEDULES)
    assert float(predicted["none"]["predicted_vs_unfused"]) == pytest.approx(1.0)
    # Gather and scatter fusion only remove copies (masker fusion trades a read for a static conv1).
    for name in ("+gather", "+scatter"):
        assert float(predicted[name]["predicted_ms"]) <= float(predicted["none"]["predicted_ms"])
    if MEASURE == "cpu":
        assert len(measured(rows)) == len(ablation_fusion.SCHEDULES)


@pytest.mark.skipif(extension_error is not None, reason="the ops need the compiled extension")
def test_bench_channel_layer_ops(tmp_path):
    import bench_channel_layer_ops

    path = tmp_path / "ops.csv"
    bench_channel_layer_ops.main(["--batch", "4", "--channels", "16", "--size", "6", "--threads", "1", "--rounds", "1",
                                  "--min-run-time", "0.005", "--csv", str(path)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for case in ("conv1x1", "conv3x3", "block"):
        labels = [r["variant"] for r in rows if r["case"] == case]
        assert sum(label.startswith("dense") for label in labels) == 2
        assert sum(label.startswith("reference") for label in labels) == 1
        measured_rows = [r for r in rows if r["case"] == case and r["target"]]
        assert len(measured_rows) == len(labels) - 3 and measured_rows
    for row in rows:
        assert math.isfinite(float(row["ratio_vs_best_dense"])) and float(row["ratio_vs_best_dense"]) > 0
        # Only the dynamic variants carry a target; a baseline or reference row never does.
        assert bool(row["target"]) == (not row["variant"].startswith(("dense", "reference")))


@pytest.mark.skipif(extension_error is not None, reason="the sparse networks need the compiled extension")
def test_bench_models(tmp_path, capsys):
    import bench_models

    path = tmp_path / "models.csv"
    bench_models.main(["--batch", "1", "--size", "32", "--threads", "1", "--rounds", "1", "--min-run-time", "0.005",
                       "--csv", str(path)])
    floor = re.search(r"convolutions \(each timed alone\) ([\d.]+) ms, scaled .* ([\d.]+) ms \(([\d.]+)\)",
                      capsys.readouterr().out)
    assert floor, "no floor line"
    dense_ms, floor_ms, ratio = map(float, floor.groups())
    # printed to 0.1 ms and 0.001
    assert 0 < floor_ms < dense_ms and ratio == pytest.approx(floor_ms / dense_ms, abs=0.1 / dense_ms + 1e-3)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    laud = [r for r in rows if r["execution"] in ("folded BN", "sparse")]
    # One row per LAUD network (it lays its input out itself), both layouts for the others.
    assert [r["network"] for r in laud] == ["dense", "spatial keep=0.5", "channel keep=0.5", "layer keep=0.5"]
    assert {r["format"] for r in laud} == {bench_models.LAUD_FORMAT}
    assert {r["format"] for r in rows if r["execution"].startswith("torchvision")} == {"nchw", "channels_last"}
    assert float(laud[0]["ratio"]) == 1.0
    for row in laud[1:]:
        assert 0.0 < float(row["flops_ratio"]) < 1.0 and math.isfinite(float(row["ratio"]))


@pytest.mark.skipif(extension_error is not None, reason="the fused path needs the compiled extension")
@pytest.mark.parametrize("mode", ["spatial", "layer"])
def test_unfused_composites_compute_the_fused_block(mode):
    """The benchmarks' unfused schedule is the same computation, only split into separate steps."""
    import torch
    import _common as C

    # S = 2 on a 7 x 7 map: border patches reach outside the map.
    model, spec = C.find_block("regnety400mf:s4.b2" if mode == "spatial" else "layer4.1")
    gran = C.stage_granularity(model, mode, spec.stage, (2,))
    block = C.build_block(model, spec, mode, gran)
    x = C.block_input(spec, 3, "cpu", torch.float32)

    def run():
        C.prepare(block, mode, 0.5, seed=3)  # forced masks are drawn afresh each forward: reseed
        return block(x.clone())

    with torch.no_grad():
        fused = run()
        for fusion in ([], *C.FUSION_OPS) if mode == "spatial" else ([],):
            names = C.all_unfused_names(mode) if not fusion else [
                n for f, ops in C.FUSION_OPS.items() if f != fusion for n in ops]
            with C.unfused_ops(names):
                torch.testing.assert_close(run(), fused, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_residual_dense_baseline_computes_the_dense_network(layout):
    import torch

    import bench_models
    from laudnet_ops.models import laud_resnet50

    torch.manual_seed(0)
    model = laud_resnet50(mode="dense").eval()
    fused = bench_models.fused_residual_dense(model)
    if fused is None:
        pytest.skip("this torch build has no oneDNN convolution post-op")
    x = torch.randn(2, 3, 64, 48).contiguous(memory_format=getattr(torch, "channels_last" if layout != "contiguous"
                                                                      else "contiguous_format"))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("script", ["bench_experimental", "profile_block", "bench_tensor_cores"])
def test_gpu_only_scripts_say_why_they_measure_nothing(script, monkeypatch):
    # On a machine without a GPU they stop at once with the reason, instead of failing halfway.
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would measure")
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        module.main()
