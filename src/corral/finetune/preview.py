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
from corral.domain.finetune_request import PREFERENCE_METHODS
from corral.finetune import packing, templates
from corral.finetune.checks import no_chat_template
from corral.finetune.dataset import read_sources
from corral.finetune.examples import Encoded, Encoder, TemplateError, length_histogram
from corral.finetune.formats import parse
from corral.finetune.preference import parse_preference

MAX_ANALYZED = 20_000  # examples tokenized for the counts and the histogram (`analyzed` in the answer says how many)


def preview(base_model: str, dataset_path: Path, max_seq_len: int, train_on_prompt: bool, shown: int = 5,
            tokenizer: Any = None, chat_template: str = templates.MODEL, batch_size: int = 4, seed: int = 42,
            sources: list[tuple[Path, float]] | None = None, method: str = "lora") -> dict[str, Any]:
    """`sources`: a mix's (path, ratio), mixed as a submit does (`dataset.mix`, same seed); else `dataset_path`. For dpo
    and orpo the examples are preference pairs, shown and counted with their chosen answer."""
    preferred = method in PREFERENCE_METHODS
    dataset = read_sources(sources or [(dataset_path, 1.0)], seed, mixed=sources is not None,  # first: a bad line is
                           parser=parse_preference if preferred else parse)  # reported without loading anything
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model)
    if not templates.apply(tokenizer, chat_template) and dataset.chat:  # the chosen template, as the trainer does
        raise CorralError(no_chat_template(base_model, dataset.format))
    warnings = end_of_turn_warnings(tokenizer, chat_template, base_model) if dataset.chat else []
    encoder = Encoder(tokenizer, max_seq_len, train_on_prompt)  # after `end_of_turn_warnings`: the EOS the trainer uses
    analyzed = [pair.side("chosen") for pair in dataset.examples[:MAX_ANALYZED]] if preferred else dataset.examples[:MAX_ANALYZED]
    if preferred:
        warnings.append(f"preference pairs ({method}): shown and counted with their chosen answer; the rejected one is "
                        "trained against it (each pair runs both)")
    try:
        encoding = encoder.encode_all(analyzed)
    except TemplateError as exc:
        raise CorralError(str(exc)) from None
    examples = [_shown(encoder, e) for e in encoding.encoded[:shown]]
    return {
        "format": dataset.format, "formats": dataset.formats, "count": len(dataset.examples), "analyzed": len(analyzed),
        "examples": examples, "truncated": encoding.truncated, "turnsCut": encoding.turns_cut, "dropped": encoding.dropped,
        "dropReasons": encoding.drop_reasons, "warnings": warnings,
        "trainedTokens": sum(e.trained_tokens for e in encoding.encoded), "totalTokens": sum(len(e.input_ids) for e in encoding.encoded),
        "maxSeqLen": max_seq_len, "trainOnPrompt": train_on_prompt,
        "lengthHistogram": length_histogram(encoding.lengths, max_seq_len),
        "sources": dataset.sources,
        "packing": None if preferred else {
            "batchSize": batch_size, **packing.estimate([len(e.input_ids) for e in encoding.encoded], max_seq_len, batch_size, seed).as_json()},
    }


def end_of_turn_warnings(tokenizer: Any, chat_template: str, base_model: str) -> list[str]:
    """What the preview warns about the end of a turn, replacing the EOS as the trainer does (`templates.replace_eos`):
    a built-in template whose end-of-turn token is not the model's EOS (the result's EOS becomes that token), one whose
    markers are not tokens (learned as text: nothing stops), or the model's own template ending turns with a token that
    is neither its EOS nor in its generation_config.json (served, it would not stop after an answer)."""
    warnings = []
    if missing := templates.missing_markers(tokenizer, chat_template):
        warnings.append(f"chat template {chat_template}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a token "
                        "of this tokenizer; learned as text, and an engine will not stop at the end of a turn by itself: prefer "
                        "a template whose markers the tokenizer has")
    old = tokenizer.eos_token
    if (replaced := templates.replace_eos(tokenizer, chat_template)) is not None:
        warnings.append(f"chat template {chat_template} ends a turn with {tokenizer.eos_token}, not the model's EOS {replaced}: the "
                        f"result's EOS and generation_config.eos_token_id are set to {tokenizer.eos_token} (with {replaced}), so "
                        "served it stops at the end of its answer")
    elif chat_template == templates.MODEL and (end := templates.end_of_turn(tokenizer)) and end != old:
        stops = _generation_eos(base_model)
        if tokenizer.convert_tokens_to_ids(end) not in stops:
            warnings.append(f"the model's chat template ends a turn with {end}, which is not its EOS ({old}) nor in its "
                            "generation_config.json eos_token_id: served, it may not stop after an answer; add "
                            f"{end}'s id to eos_token_id in generation_config.json, or choose a built-in chatTemplate")
    return warnings


def _generation_eos(base_model: str) -> set[int]:
    """The eos_token_id of a local model's generation_config.json (empty when it has none here)."""
    try:
        value = json.loads((Path(base_model) / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return set()
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int)}


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
                         int(request.get("examples", 5)), chat_template=request.get("chatTemplate", templates.MODEL),
                         batch_size=int(request.get("batchSize", 4)), seed=int(request.get("seed", 42)),
                         sources=[(Path(s["path"]), float(s["ratio"])) for s in request["datasets"]] if request.get("datasets") else None,
                         method=request.get("method", "lora"))
    except CorralError as exc:
        answer = {"error": exc.message}
    except (OSError, ValueError) as exc:  # the tokenizer cannot be loaded (a hub id offline, a broken directory)
        answer = {"error": f"cannot load the tokenizer of {request['baseModel']}: {exc}"[:1000]}
    sys.stdout.write("\n" + json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
