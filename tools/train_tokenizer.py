"""Train a SentencePiece tokenizer (BPE by default, unigram on request) from text / jsonl files.

The ids of the special pieces are fixed, because the data pipeline relies on them: pad 0
(``<pad>``), unk 1 (``<unk>``), bos 2 (``<s>``), eos 3 (``</s>``, also the end-of-document id
that preprocessing appends); user-defined symbols follow. Byte fallback is on, and the text is
neither normalized nor whitespace-collapsed, so any UTF-8 text (code included) decodes back
exactly. Training reads lines: documents are split at newlines, and at most
``--max-sentences`` lines are kept by seeded reservoir sampling, so the same inputs and options
always give the same ``<prefix>.model`` and ``<prefix>.vocab``.

    python tools/train_tokenizer.py --input data/stdlib.jsonl --output-prefix data/tok \\
        --vocab-size 32000
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from pathlib import Path
from typing import Iterable

if __package__ in (None, ""):  # run as `python tools/train_tokenizer.py`: import from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.preprocess_data import iter_documents, resolve_inputs  # noqa: E402

SPECIAL_PIECES = {"pad": (0, "<pad>"), "unk": (1, "<unk>"), "bos": (2, "<s>"), "eos": (3, "</s>")}
MODEL_TYPES = ("bpe", "unigram")
# SentencePiece silently drops training lines longer than this many bytes.
MAX_SENTENCE_BYTES = 8192


def sample_lines(
    inputs: Iterable[str], json_key: str = "text", max_sentences: int = 2_000_000, seed: int = 0
) -> list[str]:
    """The non-blank lines of all documents, reservoir-sampled down to `max_sentences`.

    Args:
        inputs: files or directories (jsonl, parquet or text; see tools/preprocess_data.py).
        json_key: field / column holding the text.
        max_sentences: cap on the lines returned; 0 keeps all.
        seed: seed of the sampling.

    Returns:
        The lines, in input order when all fit, else in the reservoir's (seeded) order.
    """
    rng = random.Random(seed)
    kept: list[str] = []
    seen = 0
    for path in resolve_inputs(inputs):
        for doc in iter_documents(path, json_key):
            for line in doc.split("\n"):
                line = line.rstrip("\r")
                if not line.strip() or len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                    continue
                seen += 1
                if not max_sentences or len(kept) < max_sentences:
                    kept.append(line)
                else:
                    j = rng.randrange(seen)
                    if j < max_sentences:
                        kept[j] = line
    if not kept:
        raise ValueError(f"no text found in {list(inputs)} (json key {json_key!r})")
    return kept


def train_tokenizer(
    inputs: Iterable[str],
    output_prefix: str,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    character_coverage: float = 0.9999,
    user_defined_symbols: Iterable[str] = (),
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 8,
    verbose: bool = False,
) -> str:
    """Train a tokenizer on `inputs`; write ``<output_prefix>.model`` and ``.vocab``.

    Args:
        inputs: files or directories of text / jsonl / parquet.
        output_prefix: path prefix of the two outputs (its directory is created).
        vocab_size: total pieces, including the 4 specials, 256 byte pieces and user symbols.
        model_type: ``"bpe"`` or ``"unigram"``.
        character_coverage: share of characters that get their own piece; the rest are bytes.
        user_defined_symbols: extra pieces that are never split (ids 4, 5, ...).
        json_key: field / column holding the text.
        max_sentences: lines sampled for training (0: all).
        seed: sampling seed.
        num_threads: trainer threads. BPE pieces do not depend on it; unigram pieces can,
            and the number is stored in the model, so keep it fixed for identical files.
        verbose: show SentencePiece's training log.

    Returns:
        The path of the ``.model`` file.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    user_defined_symbols = list(user_defined_symbols)
    floor = len(SPECIAL_PIECES) + 256 + len(user_defined_symbols)
    if vocab_size <= floor:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for learned pieces: 4 specials + 256 byte "
            f"pieces + {len(user_defined_symbols)} user symbols = {floor}"
        )
    lines = sample_lines(inputs, json_key, max_sentences, seed)
    model = io.BytesIO()
    options = {f"{name}_id": i for name, (i, _) in SPECIAL_PIECES.items()}
    options.update({f"{name}_piece": piece for name, (_, piece) in SPECIAL_PIECES.items()})
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type=model_type,
            vocab_size=vocab_size, character_coverage=character_coverage, byte_fallback=True,
            user_defined_symbols=user_defined_symbols, input_sentence_size=0,
            shuffle_input_sentence=False, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES, num_threads=num_threads,
            minloglevel=0 if verbose else 2, **options,
        )
    except RuntimeError as err:
        raise ValueError(f"sentencepiece training failed: {err}") from None

    output_prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                    for i in range(sp.get_piece_size()))
    for suffix, data in ((".model", model.getvalue()), (".vocab", vocab.encode("utf-8"))):
        with open(output_prefix + suffix + ".tmp", "wb") as f:
            f.write(data)
        os.replace(output_prefix + suffix + ".tmp", output_prefix + suffix)
    return output_prefix + ".model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text / jsonl / parquet files")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model/.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9999)
    parser.add_argument("--user-defined-symbols", nargs="*", default=[],
                        help="extra pieces kept whole, e.g. '<|fim_prefix|>'")
    parser.add_argument("--json-key", default="text", help="jsonl field / parquet column")
    parser.add_argument("--max-sentences", type=int, default=2_000_000,
                        help="lines sampled for training (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=8)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = train_tokenizer(
            args.input, args.output_prefix, args.vocab_size, args.model_type,
            args.character_coverage, args.user_defined_symbols, args.json_key,
            args.max_sentences, args.seed, args.num_threads, args.verbose,
        )
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path} and {args.output_prefix}.vocab")


if __name__ == "__main__":
    main()
