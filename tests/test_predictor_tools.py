"""Latency predictor tools: CLI, calibration file round trip, validation, recommendation, plotting."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import importlib

from laudnet_ops.predictor import cli, get_device, predict_network, recommend
from laudnet_ops.predictor.calibrate import Calibration, Sample, apply_calibration, load_calibration
from laudnet_ops.predictor.validate import spearman

ROOT = Path(__file__).resolve().parents[1]
# the package exports a ``calibrate`` function that shadows the submodule's attribute
cal_mod = importlib.import_module("laudnet_ops.predictor.calibrate")


@pytest.fixture(autouse=True)
def _calibration_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUDNET_PREDICTOR_CALIBRATION_DIR", str(tmp_path / "cal"))
    return tmp_path / "cal"


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# --- CLI ---------------------------------------------------------------------------------------------------

def test_cli_table(capsys):
    code, out, _ = run_cli(capsys, "--gpu", "v100", "--model", "resnet101", "--mode", "layer", "--rate", "0.4")
    assert code == 0
    assert "layer3.22" in out and "total" in out


def test_cli_json_has_the_documented_fields(capsys):
    code, out, _ = run_cli(capsys, "--gpu", "rtx3090", "--model", "resnet50", "--mode", "spatial",
                           "--granularity", "4-4-2-1", "--batch", "64", "--dtype", "fp16", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("device", "model", "mode", "granularity", "rate", "batch", "dtype", "dense_ms", "dynamic_ms",
                "speedup", "blocks"):
        assert key in data
    assert data["granularity"] == [4, 4, 2, 1] and data["batch"] == 64 and data["dtype"] == "fp16"
    assert len(data["blocks"]) == 16
    assert data["speedup"] == pytest.approx(data["dense_ms"] / data["dynamic_ms"])


def test_cli_unknown_device_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "--gpu", "gtx480", "--json")
    assert code == 2
    assert "gtx480" in err and "v100" in err and "nano" in err


def test_cli_recommend_and_devices(capsys):
    code, out, _ = run_cli(capsys, "recommend", "--gpu", "tx2", "--model", "regnety400mf", "--rate", "0.5", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["best"]["mode"] in ("layer", "channel", "spatial")
    code, out, _ = run_cli(capsys, "devices")
    assert code == 0 and "h200" in out and "host" in out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "laudnet_ops.predictor", "--gpu", "nano", "--model",
                           "regnety800mf", "--mode", "channel", "--granularity", "2", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["device"] == "nano"


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    code, _, _ = run_cli(capsys, "--gpu", "tx2", "--model", "resnet50", "--plot", str(png))
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- recommendation ----------------------------------------------------------------------------------------

def test_recommend_picks_the_fastest_option():
    rec = recommend("v100", "resnet101", 0.5)
    assert rec.best.dynamic_ms == min(o.dynamic_ms for o in rec.options)
    spatial = next(o for o in rec.options if o.mode == "spatial")
    # the per-stage search can only improve on any fixed setting it contains
    for gran in ("1", "2-2-2-1", "4-4-2-1"):
        fixed = predict_network("v100", "resnet101", "spatial", 0.5, gran).dynamic * 1e3
        assert spatial.dynamic_ms <= fixed + 1e-9
    assert "best" in rec.table()


# --- calibration -------------------------------------------------------------------------------------------

def test_calibration_round_trip(tmp_path, _calibration_dir):
    cal = Calibration(device="host", efficiency={"compute": 0.33, "launch_us": 7.5, "overlap": 0.2},
                      dram_gbs=42.0, samples=[Sample("x", 1e-3, 1.1e-3)], threads=1)
    path = cal.save(tmp_path / "c.json")
    back = load_calibration(path)
    assert back == cal
    host = apply_calibration(get_device("host", calibration=False), back)
    assert host.calibrated and host.dram_gbs == 42.0 and host.num_pe == 1
    assert host.efficiency.compute == 0.33 and host.efficiency.launch_us == 7.5
    # saved as the device's default file, later predictions pick it up by themselves
    cal.save()
    assert (_calibration_dir / "calibration-host.json").exists()
    assert get_device("host").efficiency.compute == 0.33
    assert get_device("host", calibration=False).efficiency.compute != 0.33
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_calibration(tmp_path / "missing.json")


def test_calibrate_quick_measures_fits_and_saves(tmp_path):
    path = tmp_path / "quick.json"
    cal = cal_mod.calibrate("cpu", path, quick=True, repeats=3, rounds=1, show_progress=False, threads=1)
    assert path.exists() and len(cal.samples) == 4
    assert all(s.measured > 0 and s.predicted > 0 for s in cal.samples)
    assert cal.dram_gbs > 0
    # the fit must beat the uncalibrated host on its own microbenchmarks
    host = get_device("host", calibration=False).replace(num_pe=1)
    fitted = apply_calibration(host, load_calibration(path))
    from math import log

    from laudnet_ops.predictor.tiles import price

    benches = cal_mod.microbenchmarks(quick=True)
    measured = {s.name: s.measured for s in cal.samples}

    def err(dev):
        return sum(log(sum(price(k, dev).latency for k in b.kernels()) / measured[b.name]) ** 2 for b in benches)

    assert err(fitted) < err(host)


def test_cli_calibrate_json(tmp_path, capsys):
    out_file = tmp_path / "c.json"
    code, out, _ = run_cli(capsys, "calibrate", "--quick", "--repeats", "2", "--rounds", "1", "--threads", "1",
                           "--out", str(out_file), "--json")
    assert code == 0 and json.loads(out)["device"] == "host" and out_file.exists()


# --- validation --------------------------------------------------------------------------------------------

def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        spearman([1], [1])


def test_validate_quick_runs_every_paradigm(capsys):
    from laudnet_ops.predictor.validate import validate

    rep = validate("cpu", calibration=False, quick=True, repeats=2, rounds=1, threads=1, show_progress=False)
    modes = {r.mode for r in rep.results}
    assert modes == {"dense", "layer", "channel", "spatial"}
    assert all(r.measured > 0 and r.predicted > 0 for r in rep.results)
    assert -1.0 <= rep.spearman <= 1.0 and rep.median_ape >= 0
    assert "median |error|" in rep.table()
    assert all(r.impl for r in rep.results)


def test_standins_compute_what_the_block_computes():
    """The layer-skip stand-in equals the masked dense block on the kept samples (and leaves the others)."""
    import torch

    from laudnet_ops.predictor.blocks import BlockSpec
    from laudnet_ops.predictor.validate import _build_dense, _build_layer

    spec = BlockSpec("t", 16, 8, 16, 6, 6)
    layer = _build_layer(spec, 4, 2)("cpu")
    dense = _build_dense(spec, 4)("cpu")
    # both builders draw the same weights and input from fixed seeds
    with torch.no_grad():
        out_dense = dense().clone()
        out_layer = layer()
    kept = torch.zeros(4, dtype=torch.bool)
    kept[torch.randperm(4, generator=torch.Generator().manual_seed(1))[:2].sort().values] = True
    torch.testing.assert_close(out_layer[kept], out_dense[kept])
    assert not torch.allclose(out_layer[~kept], out_dense[~kept])


def test_spatial_standin_updates_only_the_kept_patches():
    import torch

    from laudnet_ops.predictor.blocks import BlockSpec
    from laudnet_ops.predictor.validate import _build_dense, _build_spatial

    spec = BlockSpec("t", 16, 8, 16, 8, 8)
    dense = _build_dense(spec, 2)("cpu")
    spatial = _build_spatial(spec, 2, 4, 3, {})("cpu")  # 3 of the 8 4x4 patches
    with torch.no_grad():
        out_dense = dense().clone()
        out_spatial = spatial()
    # kept patches equal the dense block there (same weights and input from fixed seeds)
    same = (out_spatial - out_dense).abs().amax(dim=1) < 1e-5  # (N, H, W) positions that match dense
    patches = same.view(2, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(2, 2, 2, 16).all(-1)
    assert int(patches.sum()) == 3
