"""The dataset preview, run in a child process by the task manager (transformers stays out of the control plane).

    echo '{"baseModel": ..., "datasetPath": ..., "maxSeqLen": 1024, "trainOnPrompt": false, "examples": 5}' \\
        | python -m corral.finetune.preview

Prints one JSON line: the preview (`corral.views.PreviewResult`), or `{"error": "..."}`. Builds the examples
exactly as the trainer does (`corral.finetune.examples`), with the base model's own tokenizer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from corral.domain.errors import CorralError
from corral.finetune import templates
from corral.finetune.checks import no_chat_template
from corral.finetune.dataset import read_dataset
from corral.finetune.examples import Encoded, Encoder, TemplateError, length_histogram

MAX_ANALYZED = 20_000  # examples tokenized for the counts and the histogram (`analyzed` in the answer says how many)


def preview(base_model: str, dataset_path: Path, max_seq_len: int, train_on_prompt: bool, shown: int = 5,
            tokenizer: Any = None, chat_template: str = templates.MODEL) -> dict[str, Any]:
    dataset = read_dataset(dataset_path)  # first: a bad line is reported without loading anything
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model)
    if not templates.apply(tokenizer, chat_template) and dataset.chat:  # the chosen template, as the trainer does
        raise CorralError(no_chat_template(base_model, dataset.format))
    encoder = Encoder(tokenizer, max_seq_len, train_on_prompt)
    analyzed = dataset.examples[:MAX_ANALYZED]
    try:
        encoding = encoder.encode_all(analyzed)
    except TemplateError as exc:
        raise CorralError(str(exc)) from None
    examples = [_shown(encoder, e) for e in encoding.encoded[:shown]]
    return {
        "format": dataset.format, "formats": dataset.formats, "count": len(dataset.examples), "analyzed": len(analyzed),
        "examples": examples, "truncated": encoding.truncated, "dropped": encoding.dropped, "dropReasons": encoding.drop_reasons,
        "trainedTokens": sum(e.trained_tokens for e in encoding.encoded), "totalTokens": sum(len(e.input_ids) for e in encoding.encoded),
        "maxSeqLen": max_seq_len, "trainOnPrompt": train_on_prompt,
        "lengthHistogram": length_histogram(encoding.lengths, max_seq_len),
    }


def _shown(encoder: Encoder, encoded: Encoded) -> dict[str, Any]:
    text, spans = "", []
    for piece, trained in encoder.runs(encoded):
        if trained:
            spans.append({"start": len(text), "end": len(text) + len(piece)})
        text += piece
    return {"text": text, "totalTokens": len(encoded.input_ids), "trainedTokens": encoded.trained_tokens, "spans": spans,
            "truncated": encoded.truncated, "originalTokens": encoded.total_tokens}


def main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        answer = preview(request["baseModel"], Path(request["datasetPath"]), int(request["maxSeqLen"]), bool(request["trainOnPrompt"]),
                         int(request.get("examples", 5)), chat_template=request.get("chatTemplate", templates.MODEL))
    except CorralError as exc:
        answer = {"error": exc.message}
    except (OSError, ValueError) as exc:  # the tokenizer cannot be loaded (a hub id offline, a broken directory)
        answer = {"error": f"cannot load the tokenizer of {request['baseModel']}: {exc}"[:1000]}
    sys.stdout.write("\n" + json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
