"""Spec 02's system endpoints on a real server (this machine: no GPU, the real NVML no-driver path)."""

from __future__ import annotations

from corral.gpus.inventory import read_inventory
from tests.integration.conftest import CorralServer


def test_gpu_info_has_the_spec_shape(corral: CorralServer) -> None:
    info = corral.ok("GET", "/api/system/gpu-info")
    assert {"available", "count", "devices", "recommendation"} <= set(info)
    local = read_inventory()
    assert info["available"] is local.available and info["count"] == len(local.schedulable_units())
    if local.available:  # pragma: no cover - GPU machines
        assert all({"id", "name", "memory_gb"} <= set(d) for d in info["devices"])
        assert "recommended" in info["recommendation"]
    else:
        assert info["devices"] == [] and info["count"] == 0
        assert info["recommendation"].startswith("No NVIDIA GPU detected (NVML:")
        assert info["warning"] == info["recommendation"]


def test_estimate_endpoint(corral: CorralServer) -> None:
    lora = corral.ok("GET", "/api/system/estimate", params={"model": "qwen2.5-coder-7b", "method": "lora"})
    qlora = corral.ok("GET", "/api/system/estimate", params={"model": "qwen2.5-coder-7b", "method": "qlora"})
    # The submit's defaults (maxSeqLen 1024, batchSize 4): the default 7B LoRA task needs 24 GiB, no longer fits 24 GB.
    assert lora["displayName"] == "Qwen 2.5 Coder 7B" and 23 < lora["training"]["totalGb"] < 26
    assert qlora["training"]["totalGb"] < lora["training"]["totalGb"]
    assert 3.9 < qlora["training"]["breakdownGb"]["fp32Casts"] < 4.2  # embeddings and output layer cast to fp32 by peft
    assert set(lora["training"]["breakdownGb"]) == {"weights", "trainable", "activations", "logits", "overhead"}
    assert lora["serving"]["breakdownGb"]["weights"] > 14
    unknown = corral.http.get("/api/system/estimate", params={"model": "gpt-9"})
    assert unknown.status_code == 400 and "model 'gpt-9' is unknown" in unknown.json()["error"]
    bad = corral.http.get("/api/system/estimate", params={"model": "qwen2.5-coder-7b", "method": "dora"})
    assert bad.status_code == 400 and "method must be one of" in bad.json()["error"]
    invalid = corral.http.get("/api/system/estimate", params={"model": "qwen2.5-coder-7b", "seqLen": 0})
    assert invalid.status_code == 400


def test_cli_gpus_and_estimate(corral: CorralServer) -> None:
    from tests.integration.test_cli import cli

    gpus = cli(corral.url, "gpus")
    assert gpus.returncode == 0 and ("No NVIDIA GPU detected" in gpus.stdout or "recommended" in gpus.stdout)
    estimate = cli(corral.url, "estimate", "qwen2.5-coder-7b", "--method", "qlora")
    assert estimate.returncode == 0 and "Qwen 2.5 Coder 7B qlora: about" in estimate.stdout
    unknown = cli(corral.url, "estimate", "gpt-9")
    assert unknown.returncode == 1 and "model 'gpt-9' is unknown" in unknown.stderr
