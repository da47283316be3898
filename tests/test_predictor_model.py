"""Latency predictor: tile search, operator/block/network model, qualitative findings (no torch needed)."""

import math

import pytest

from laudnet_ops.predictor import blocks, devices, networks, operators as ops, tiles
from laudnet_ops.predictor.blocks import FUSED, UNFUSED, BlockSpec, predict_block
from laudnet_ops.predictor.devices import Device, Efficiency, get_device
from laudnet_ops.predictor.networks import predict_network


@pytest.fixture(autouse=True)
def _no_saved_calibration(tmp_path, monkeypatch):
    # predictions must not pick up a calibration file someone saved on this machine
    monkeypatch.setenv("LAUDNET_PREDICTOR_CALIBRATION_DIR", str(tmp_path / "cal"))


def toy_device(num_pe: int, dram_gbs: float = 1.0) -> Device:
    """1 FP32 lane per PE at 1 MHz (2 MFLOP/s), no launch cost: latencies are easy to work out by hand."""
    eff = Efficiency(compute=1.0, simple=1.0, index=1.0, memory=1.0, onchip=1.0, segment_bytes=0.0,
                     launch_us=0.0, sync_us=0.0, overlap=0.0)
    return Device(name="toy", description="toy", kind="gpu", num_pe=num_pe, fp32_per_pe=1, clock_mhz=1.0,
                  dram_gbs=dram_gbs, onchip_bytes=1 << 30, pe_mem_bytes=1 << 20, efficiency=eff)


# --- tile search, checked by hand -----------------------------------------------------------------------

def test_tile_search_splits_channels_over_two_pes():
    # 4 outputs of 1 MAC each: 1 us per output on a PE.  tc=1: 4 tiles in 2 waves (2 us) but 4 input
    # re-reads; tc=2: 2 tiles in 1 wave (2 us) with fewer bytes; tc=4: one PE does everything (4 us).
    k = ops.conv2d("c", 1, 1, 4, 1, 1, 1)
    cost = tiles.price(k, toy_device(2, dram_gbs=1e-3))
    assert cost.tile == (1, 2, 1, 1)
    assert cost.n_tiles == 2 and cost.waves == 1


def test_tile_search_one_sample_per_pe_when_pes_suffice():
    k = ops.conv2d("c", 4, 1, 1, 1, 1, 1)
    cost = tiles.price(k, toy_device(4, dram_gbs=1e-3))
    assert cost.tile == (1, 1, 1, 1)
    assert cost.waves == 1
    assert cost.compute == pytest.approx(1e-6)


def test_tile_search_keeps_the_halo_inside_one_tile_on_one_pe():
    # 3x3 conv, 4x4 output, one PE: every tiling computes the same; one 4x4 tile reads a 6x6 window
    # (36 values) where four 2x2 tiles read four 4x4 windows (64), so the whole map wins.
    k = ops.conv2d("c", 1, 1, 1, 4, 4, 3)
    cost = tiles.price(k, toy_device(1, dram_gbs=1e-4))
    assert cost.tile[2:] == (4, 4)


def test_wave_quantisation_counts_partial_waves():
    # 3 outputs (1 us each) on 2 PEs cannot finish in 1.5 us: whether as 3 tiles in 2 waves or as a
    # 2-output and a 1-output tile, the busiest PE works 2 us.  With 4 PEs, 1 us.
    k = ops.conv2d("c", 3, 1, 1, 1, 1, 1)
    assert tiles.price(k, toy_device(2, dram_gbs=1e3)).compute == pytest.approx(2e-6)
    assert tiles.price(k, toy_device(4, dram_gbs=1e3)).compute == pytest.approx(1e-6)


def test_access_penalty_whole_transactions():
    dev = toy_device(1)
    assert tiles.access_penalty(0, dev) == 1.0
    assert tiles.access_penalty(4, dev) == pytest.approx(32 / 4)  # one 32-byte sector for 4 bytes
    assert tiles.access_penalty(64, dev) == pytest.approx(1.0)


def test_tensor_cores_used_for_half_precision_gemms_only():
    v100 = get_device("v100", calibration=False)
    conv32 = ops.conv2d("c", 128, 256, 256, 14, 14, 3, dtype="fp32")
    conv16 = ops.conv2d("c", 128, 256, 256, 14, 14, 3, dtype="fp16")
    assert tiles.pe_rate(conv16, v100) == pytest.approx(8 * tiles.pe_rate(conv32, v100))  # 1024 vs 128 FLOP/clk
    relu16, relu32 = (ops.elementwise("r", (1, 1, 1, 1000), dtype=d) for d in ("fp16", "fp32"))
    assert tiles.pe_rate(relu16, v100) == pytest.approx(2 * tiles.pe_rate(relu32, v100))  # half2, no tensor cores
    assert tiles.price(conv16, v100).latency < tiles.price(conv32, v100).latency


# --- devices ---------------------------------------------------------------------------------------------

def test_paper_table_and_datasheet_devices():
    v100 = get_device("v100", calibration=False)
    assert (v100.num_pe, v100.fp32_per_pe, v100.clock_mhz, v100.dram_gbs, v100.default_batch) == (80, 64, 1500, 700, 128)
    nano = get_device("nano", calibration=False)
    assert (nano.num_pe, nano.fp32_per_pe, nano.clock_mhz, nano.dram_gbs, nano.default_batch) == (1, 128, 921, 25.6, 1)
    h100 = get_device("h100", calibration=False)
    assert h100.matrix_tflops["bf16"] == 989.0  # dense, not the 2:4-sparse 1979
    assert get_device("h200", calibration=False).dram_gbs == 4800
    assert get_device("a100", calibration=False).num_pe == 108


def test_unknown_device_lists_known_ones():
    with pytest.raises(ValueError) as err:
        get_device("tpu-v9")
    msg = str(err.value)
    assert "tpu-v9" in msg and "v100" in msg and "host" in msg and "h200" in msg


def test_host_is_detected():
    host = get_device("host", calibration=False)
    assert host.kind == "cpu" and host.num_pe >= 1 and host.fp32_per_pe >= 4 and host.clock_mhz > 0


def test_user_devices_from_json_and_yaml(tmp_path):
    json_file = tmp_path / "devs.json"
    json_file.write_text('{"devices": [{"name": "myjet", "num_pe": 8, "fp32_per_pe": 128, '
                         '"clock_mhz": 1300, "dram_gbs": 204.8, "default_batch": 1, '
                         '"efficiency": {"launch_us": 6}}]}')
    (dev,) = devices.load_devices(json_file)
    assert get_device("MyJet", calibration=False) == dev
    assert dev.efficiency.launch_us == 6 and dev.efficiency.compute == Efficiency().compute
    assert predict_network("myjet", "resnet50", "layer", 0.5).dynamic > 0
    yaml = pytest.importorskip("yaml")
    yaml_file = tmp_path / "devs.yaml"
    yaml_file.write_text(yaml.safe_dump({"name": "yjet", "num_pe": 4, "fp32_per_pe": 64, "clock_mhz": 900,
                                         "dram_gbs": 50}))
    assert devices.load_devices(yaml_file)[0].name == "yjet"
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "num_pe": 1, "fp32_per_pe": 1, "clock_mhz": 1, "dram_gbs": 1, "sms": 3}')
    with pytest.raises(ValueError, match="sms"):
        devices.load_devices(bad)


# --- networks ----------------------------------------------------------------------------------------------

def test_model_structure_and_flops():
    r101 = networks.get_model("resnet101")
    assert len(r101.blocks) == 33
    assert len(networks.get_model("resnet50").blocks) == 16
    gmacs = {m: networks.network_flops(m) / 2e9 for m in networks.known_models()}
    assert gmacs["resnet50"] == pytest.approx(4.1, rel=0.03)
    assert gmacs["resnet101"] == pytest.approx(7.8, rel=0.03)
    assert gmacs["regnety400mf"] == pytest.approx(0.40, rel=0.06)
    assert gmacs["regnety800mf"] == pytest.approx(0.80, rel=0.06)


def test_network_includes_stem_and_head():
    net = predict_network("v100", "resnet101", "layer", 0.5, calibration=False)
    assert net.stem and net.head
    fixed = sum(k.latency for k in net.stem + net.head)
    assert net.dense == pytest.approx(fixed + sum(b.dense for b in net.blocks))


def test_unknown_model_mode_and_bad_arguments():
    with pytest.raises(ValueError, match="resnet101"):
        predict_network("v100", "vgg16", "layer", 0.5)
    with pytest.raises(ValueError, match="spatial"):
        predict_network("v100", "resnet50", "token", 0.5)
    with pytest.raises(ValueError, match="rate"):
        predict_network("v100", "resnet50", "layer", 1.5)
    with pytest.raises(ValueError, match="granularity"):
        predict_network("v100", "resnet50", "spatial", 0.5, granularity=[4, 4])
    with pytest.raises(ValueError, match="dtype"):
        predict_network("v100", "resnet50", "layer", 0.5, dtype="int3")


# --- blocks: monotonicity and consistency ---------------------------------------------------------------

SPECS = [BlockSpec("s1", 256, 64, 256, 56, 56), BlockSpec("s3d", 512, 256, 1024, 28, 28, stride=2),
         BlockSpec("s4", 2048, 512, 2048, 7, 7), BlockSpec("reg", 104, 208, 208, 28, 28, 2, groups=26, se=26)]
CASES = [("spatial", 1), ("spatial", 2), ("spatial", 4), ("channel", 1), ("channel", 4), ("layer", 1)]


@pytest.mark.parametrize("device", ["v100", "tx2", "h100"])
@pytest.mark.parametrize("mode,gran", CASES)
def test_latency_never_drops_when_rate_grows(device, mode, gran):
    dev = get_device(device, calibration=False)
    for spec in SPECS:
        batch = dev.default_batch if device != "h100" else 16
        lat = [predict_block(spec, dev, mode, r / 20, gran, batch).dynamic for r in range(21)]
        assert all(b >= a * (1 - 1e-12) for a, b in zip(lat, lat[1:])), (spec.name, lat)


@pytest.mark.parametrize("mode,gran", CASES + [("dense", 1)])
def test_latency_never_drops_when_batch_grows(mode, gran):
    dev = get_device("rtx3060", calibration=False)
    for spec in SPECS:
        lat = [predict_block(spec, dev, mode, 0.5, gran, n).dynamic for n in (1, 2, 3, 4, 8, 16, 33, 64, 128)]
        assert all(b >= a * (1 - 1e-12) for a, b in zip(lat, lat[1:])), (spec.name, lat)


@pytest.mark.parametrize("device", devices.PAPER_DEVICES + ("h100",))
@pytest.mark.parametrize("mode,gran", CASES)
def test_full_rate_is_never_faster_than_dense(device, mode, gran):
    dev = get_device(device, calibration=False)
    for spec in SPECS:
        res = predict_block(spec, dev, mode, 1.0, gran, dev.default_batch, rate_kind="keep")
        assert res.dynamic >= res.dense, (spec.name, res.dynamic, res.dense)


def test_channel_conv2_compute_scales_with_density_squared():
    spec = SPECS[0]
    full = {k.name: k.flops for k in blocks.channel_kernels(spec, 8, 4, 1.0)}
    half = {k.name: k.flops for k in blocks.channel_kernels(spec, 8, 4, 0.5)}
    assert half["conv2"] == pytest.approx(full["conv2"] * 0.25)
    assert half["conv1"] == pytest.approx(full["conv1"] * 0.5)
    assert half["conv3"] == pytest.approx(full["conv3"] * 0.5)


def test_channel_group_size_reaches_the_conv_model():
    dev = get_device("v100", calibration=False)
    spec = BlockSpec("s3", 1024, 256, 1024, 14, 14)
    g1 = {k.name: k.latency for k in predict_block(spec, dev, "channel", 0.5, 1, 128, rate_kind="keep").kernels}
    g8 = {k.name: k.latency for k in predict_block(spec, dev, "channel", 0.5, 8, 128, rate_kind="keep").kernels}
    assert g1["conv2"] > g8["conv2"] and g1["conv3"] > g8["conv3"]


def test_fusion_ablation_fused_is_faster():
    dev = get_device("v100", calibration=False)
    for spec in SPECS[:3]:
        fused = predict_block(spec, dev, "spatial", 0.5, 2, 128, schedule=FUSED).dynamic
        unfused = predict_block(spec, dev, "spatial", 0.5, 2, 128, schedule=UNFUSED).dynamic
        assert unfused > fused


def test_rate_is_flops_rate():
    spec = SPECS[0]
    for mode, gran in CASES:
        keep = blocks.keep_for_rate(spec, mode, 0.5, gran)
        dense = blocks.executed_macs(spec, "dense", 1.0, gran)
        assert blocks.executed_macs(spec, mode, keep, gran) == pytest.approx(0.5 * dense, rel=1e-6)


def test_layer_gate_is_priced():
    dev = get_device("v100", calibration=False)
    res = predict_block(SPECS[0], dev, "layer", 0.0, 1, 128, rate_kind="keep")
    names = [k.name for k in res.kernels]
    assert "gate-pool" in names and "gate-fc" in names
    assert res.dynamic > 0.02 * res.dense  # reading the block input is not free


# --- the paper's qualitative findings, uncalibrated -------------------------------------------------------

def speedup(device, model, mode, rate, gran=None):
    return predict_network(device, model, mode, rate, gran, calibration=False).speedup


@pytest.mark.parametrize("device", ["v100", "rtx3090"])
def test_pixel_level_spatial_gives_little_speedup_on_server_gpus(device):
    s1 = speedup(device, "resnet101", "spatial", 0.5, 1)
    assert s1 < 1.15
    coarse = [speedup(device, "resnet101", "spatial", 0.5, g) for g in ("2-2-2-1", "4-4-2-1", "8-4-7-1")]
    assert all(c > s1 + 0.1 for c in coarse)
    # diminishing returns: the step from S=1 to S=2 is larger than from 2-2-2-1 to 4-4-2-1
    assert coarse[0] - s1 > coarse[1] - coarse[0]


@pytest.mark.parametrize("rate", [0.4, 0.5, 0.6])
def test_layer_skipping_fastest_for_resnet101_on_v100(rate):
    layer = speedup("v100", "resnet101", "layer", rate)
    others = [speedup("v100", "resnet101", "channel", rate, g) for g in (1, 2, 4)]
    others += [speedup("v100", "resnet101", "spatial", rate, g) for g in ("1", "4-4-2-1", "8-4-7-1")]
    assert layer > max(others)


def _flops_speedup(device, model, mode, gran):
    net = predict_network(device, model, mode, 0.5, gran, calibration=False)
    dense = sum(k.flops for k in net.stem + net.head) + sum(k.flops for b in net.blocks for k in b.dense_kernels)
    dyn = sum(k.flops for k in net.stem + net.head) + sum(k.flops for b in net.blocks for k in b.kernels)
    return dense / dyn, net.speedup


def test_edge_latency_follows_flops_more_closely_than_server():
    # ratio of latency speed-up to FLOPs speed-up: 1 = latency follows FLOPs exactly
    gaps = {d: [] for d in ("v100", "tx2", "nano")}
    for mode, gran in (("spatial", "1"), ("spatial", "4-4-2-1"), ("channel", 2), ("channel", 4)):
        for device in gaps:
            flops, lat = _flops_speedup(device, "resnet101", mode, gran)
            gaps[device].append(lat / flops)
        if mode == "spatial":  # spatial skipping: on every edge device, for every granularity
            assert gaps["tx2"][-1] > gaps["v100"][-1] and gaps["nano"][-1] > gaps["v100"][-1], gaps
    mean = {d: sum(v) / len(v) for d, v in gaps.items()}
    assert mean["tx2"] > mean["v100"] and mean["nano"] > mean["v100"], mean


def test_batch_one_layer_skipping_interpolates_whole_samples():
    dev = get_device("tx2", calibration=False)
    spec = SPECS[2]
    lat = {r: predict_block(spec, dev, "layer", r, 1, 1, rate_kind="keep").dynamic for r in (0.0, 0.5, 1.0)}
    assert lat[0.5] == pytest.approx((lat[0.0] + lat[1.0]) / 2)
    assert math.isfinite(lat[0.5])
