"""`corral dev tiny-model DIR` as a user runs it (a real process): a loadable chat model, labelled as random
weights, refused into a directory it would clobber, and a clear line when transformers is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from corral.devtools import MARKER_TITLE


def corral(*args: str, python: str = "") -> subprocess.CompletedProcess:
    """`corral ARGS`; `python`: statements run first in the same process (to hide a package)."""
    code = f"{python}\nfrom corral.main import app\napp({list(args)!r}, prog_name='corral')"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=180)


def test_builds_a_labelled_random_weights_model_that_loads(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    built = corral("dev", "tiny-model", str(target))
    assert built.returncode == 0, built.stderr
    assert "RANDOM WEIGHTS" in built.stdout and "✓ saving the model" in built.stdout
    assert f"corral deploy transformers {target}" in built.stdout
    assert (target / "README.md").read_text().startswith(MARKER_TITLE)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    config = AutoConfig.from_pretrained(target)
    assert config.hidden_size // config.num_attention_heads == 64  # the head size vLLM's CPU build supports

    again = corral("dev", "tiny-model", str(target))  # its own earlier output is replaced
    assert again.returncode == 0, again.stderr


def test_refuses_a_directory_it_would_clobber_and_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    refused = corral("dev", "tiny-model", str(tmp_path))
    assert refused.returncode == 1 and "is not an empty directory or a tiny model" in refused.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

    missing = corral("dev", "tiny-model", str(tmp_path / "tiny"), python="import sys; sys.modules['transformers'] = None")
    assert missing.returncode == 1
    assert "error: the tiny model needs transformers: pip install 'corral[train]'" in missing.stderr
    assert not (tmp_path / "tiny").exists()
