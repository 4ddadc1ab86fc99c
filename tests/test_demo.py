"""The demo's measurements come from real encoded bytes and real algorithm rounds."""

from fedlowrank import demo


def test_demo_round_measures_bytes_and_update_error():
    fedavg, ffa, srd = (demo.run_one(n) for n in ("fedavg", "ffa-lora", "fedsrd"))
    dense_kb = sum(4 * demo.RANK * (o + i) for o, i in demo.MODULES.values()) / 1e3
    assert fedavg["upload_kb"] >= dense_kb  # every fp32 value plus headers
    assert ffa["upload_kb"] < 0.7 * fedavg["upload_kb"]  # B only
    assert ffa["update_error"] < 1e-4  # FFA-LoRA aggregates products exactly
    assert fedavg["update_error"] > 1e-3  # the product of means is not the mean of products
    assert srd["upload_kb"] + srd["download_kb"] < 0.15 * (fedavg["upload_kb"] + fedavg["download_kb"])
    assert srd["upload_bound_kb"] <= srd["upload_kb"]
