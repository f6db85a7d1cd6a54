"""Issue 11 (bad input, secrets): the checks themselves, without a server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from corral.controller import _redacted_manifests
from corral.domain import hyperparameters
from corral.domain.deploy_request import check_secret_env, parse_engine_args
from corral.domain.errors import InvalidInput
from corral.domain.manifests import ANNOTATION_ENGINE_ARGS, deployment_manifest
from corral.domain.models import Deployment
from corral.engines import get_engine, redact_args
from corral.finetune.dataset import load_dataset


@pytest.mark.parametrize(("argv", "shown"), [
    (["--api-key", "sk-1", "--x", "1"], ["--api-key", "***", "--x", "1"]),
    (["--api-key=sk-1"], ["--api-key=***"]),
    (["--hf-token", "hf", "--ssl-keyfile-password", "pw", "--admin-api-key=a"], ["--hf-token", "***", "--ssl-keyfile-password", "***", "--admin-api-key=***"]),
    (["--token", "t", "--max-num-batched-tokens", "8192", "--tokenizer", "x"], ["--token", "***", "--max-num-batched-tokens", "8192", "--tokenizer", "x"]),
    (["--api-key"], ["--api-key"]),  # no value: nothing to hide
    (["--api-key", "--api-key", "x"], ["--api-key", "***", "x"]),  # the value is whatever follows
    # argparse's prefix rule (issue 26): an abbreviation sets the flag, so its value is a secret too, in both forms.
    (["--api-ke", "sk-1", "--api-k=sk-2", "--api", "sk-3"], ["--api-ke", "***", "--api-k=***", "--api", "***"]),
    (["--hf-tok", "hf", "--ssl-keyfile-pass=pw", "--admin-api", "a"], ["--hf-tok", "***", "--ssl-keyfile-pass=***", "--admin-api", "***"]),
    (["--db-pass", "pw", "--my-api-ke=k", "--x-secr", "s", "--y-toke", "t"], ["--db-pass", "***", "--my-api-ke=***", "--x-secr", "***", "--y-toke", "***"]),
    (["--timeout-sec", "3", "--port", "1", "--max-num-seqs", "4", "--tensor-parallel-size", "2"],  # no secret prefix: shown
     ["--timeout-sec", "3", "--port", "1", "--max-num-seqs", "4", "--tensor-parallel-size", "2"]),
])
def test_secret_values_are_redacted(argv: list[str], shown: list[str]) -> None:
    assert redact_args(argv) == shown


@pytest.mark.parametrize(("engine", "args", "flag"), [
    ("vllm", ["--host", "0.0.0.0"], "--host"), ("vllm", ["--port=1"], "--port"), ("vllm", ["--model", "m"], "--model"),
    ("vllm", ["--served-model-name", "x"], "--served-model-name"), ("vllm", ["--serv", "x"], "--served-model-name"),
    ("sglang", ["--model-path=m"], "--model-path"), ("sglang", ["--model", "m"], "--model"),
    ("transformers", ["--port", "1"], "--port"), ("simulator", ["--model=x"], "--model"), ("simulator", ["--hos", "::"], "--host"),
])
def test_flags_corral_sets_are_refused(engine: str, args: list[str], flag: str) -> None:
    with pytest.raises(InvalidInput, match=f"engineArgs may not set {flag}"):
        parse_engine_args(args, get_engine(engine).check_args)


def test_other_engine_arguments_pass() -> None:
    args = ["--model-impl", "vllm", "--max-model-len", "4096", "--enable-lora", "--lora-modules", "a=/x", "-tp", "2", ""]
    assert parse_engine_args(args, get_engine("vllm").check_args) == args
    assert parse_engine_args("--ttft-ms 5 --tokens-per-second '1000'", get_engine("simulator").check_args) == ["--ttft-ms", "5", "--tokens-per-second", "1000"]


@pytest.mark.parametrize(("value", "message"), [
    (["a\x00"], "engineArgs\\[0\\] contains a NUL byte"), (["x", "\x7f"], "engineArgs\\[1\\] contains the control character"),
    (["--x"] * 257, "at most 256"), (["a" * 4097], "at most 4096"), ("x" * 20000, "at most"), ([1], "list of strings"),
])
def test_engine_argument_limits(value: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_engine_args(value)  # type: ignore[arg-type]


def test_secret_env_checks_never_quote_a_value() -> None:
    assert check_secret_env({"VLLM_API_KEY": "sk", "HF_TOKEN": "hf"}) == {"VLLM_API_KEY": "sk", "HF_TOKEN": "hf"}
    assert check_secret_env(None) == {}
    for bad in ({"A-B": "sk-secret"}, {"PATH": "sk-secret"}, {"PYTHONPATH": "sk-secret"}, {"X": "sk-secret\x00"},
                {f"K{i}": "sk-secret" for i in range(33)}, {"X": 5}):
        with pytest.raises(InvalidInput) as refusal:
            check_secret_env(bad)  # type: ignore[arg-type]
        assert "sk-secret" not in refusal.value.message


def test_written_manifests_hold_no_secret() -> None:
    deployment = Deployment(name="vllm-m-pool", engine="vllm", model_id="org/m", model_tag="m", is_pool=True, replicas=1,
                            engine_args=("--api-key", "sk-secret", "--hf-token=hf-secret"))
    args = get_engine("vllm").server_args(model_id="org/m", model_tag="m", port=8000, host="0.0.0.0", gpus=1,
                                          extra=list(deployment.engine_args))
    documents = [deployment_manifest(deployment, args)]
    written = _redacted_manifests(documents, {"VLLM_API_KEY": "sk-env"})
    text = json.dumps(written)
    assert "secret" not in text.replace("secretKeyRef", "").replace("-secret-env", "") and "sk-env" not in text
    container = written[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-3:] == ["--api-key", "***", "--hf-token=***"]
    assert container["env"] == [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-m-pool-secret-env", "key": "VLLM_API_KEY"}}}]
    assert json.loads(written[0]["metadata"]["annotations"][ANNOTATION_ENGINE_ARGS]) == ["--api-key", "***", "--hf-token=***"]
    assert "sk-secret" in json.dumps(documents), "the objects applied to a cluster are not changed"


def test_hyperparameters_keep_integers_and_refuse_what_the_trainer_cannot_use() -> None:
    checked = hyperparameters.validate({"batchSize": 2, "maxSeqLen": 64.0, "learningRate": 1})
    assert checked["batchSize"] == 2 and type(checked["batchSize"]) is int and type(checked["maxSeqLen"]) is int
    assert type(checked["learningRate"]) is float and checked["epochs"] == 3
    assert all(type(checked[k]) is int for k in hyperparameters.INTEGERS)
    for bad, message in [({"batchSize": 2.5}, "got 2.5"), ({"loraRank": math.nan}, "got NaN"), ({"epochs": math.inf}, "got Infinity"),
                         ({"learningRate": 0}, "positive number"), ({"loraDropout": 1}, "less than 1"), ({"seed": False}, "got False"),
                         ({"nope": 1}, "unknown hyperparameter")]:
        with pytest.raises(InvalidInput, match=message):
            hyperparameters.validate(bad)
    # A task queued by an older Corral (2.0 stored) still reaches the trainer with integers.
    assert hyperparameters.for_trainer({"batchSize": 2.0, "learningRate": 1e-4}) == {**hyperparameters.DEFAULTS, "batchSize": 2,
                                                                                  "learningRate": 1e-4, "loraAlpha": 16}


def test_binary_and_unreadable_datasets_are_refused(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"PK\x03\x04\x00\x00" + bytes(200))
    (tmp_path / "l1.jsonl").write_bytes(b'{"instruction": "\xe9", "output": "b"}\n')
    cases = [(tmp_path / "w.bin", "is a binary file"), (tmp_path / "l1.jsonl", "line 1: not UTF-8 text"),
             (tmp_path / "a\x00b", "is not a file"), (tmp_path / ("n" * 5000), "is not a file"), (tmp_path, "is not a file")]
    for path, message in cases:
        with pytest.raises(InvalidInput, match=message):
            load_dataset(path)
