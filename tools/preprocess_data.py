"""Tokenize text / jsonl / parquet files into one Megatron indexed dataset (.bin/.idx), resumably.

Each input file is tokenized by a pool of worker processes (documents in chunks, results taken
back in input order, so the output never depends on scheduling) into its own part dataset under
``<prefix>.parts/``. A manifest, ``<prefix>.manifest.json``, records each finished input (path,
size, mtime, documents, tokens): a killed job re-run with the same command skips the inputs it
had finished and redoes only the one it was in. When every input is done, the parts are merged
in input order into ``<prefix>.tmp.bin``/``.tmp.idx``, which are then renamed into place, so a
final file is either complete or absent, never half written. Every document ends with the
tokenizer's end-of-document id.

Formats, chosen by file name: ``.jsonl``/``.json``/``.ndjson`` (one JSON object per line, the
text under ``--json-key``), ``.parquet`` (the ``--json-key`` column), optionally ``.gz`` for the
line formats; anything else is UTF-8 text (``--text-unit``: one document per file, per
blank-line separated paragraph, or per line).

    python tools/preprocess_data.py --input data/stdlib.jsonl --tokenizer data/tok.model \\
        --output-prefix data/stdlib --workers 8
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

if __package__ in (None, ""):  # run as `python tools/preprocess_data.py`: import from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MANIFEST_VERSION = 1
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_UNITS = ("file", "paragraph", "line")


# ----------------------------------------------------------------------------- reading inputs


def input_format(path: str) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"text"``, from the file name (ignoring a ``.gz``)."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def iter_documents(path: str, json_key: str = "text", text_unit: str = "file") -> Iterator[str]:
    """Yield the documents of one input file, in file order; empty documents are skipped.

    Args:
        path: a jsonl, parquet or text file (see `input_format`).
        json_key: the field (jsonl) or column (parquet) holding the text.
        text_unit: for text files: ``"file"`` (whole file), ``"paragraph"`` (blank-line
            separated) or ``"line"``.

    Raises:
        ValueError: with the file (and line) for a missing file, invalid UTF-8, invalid JSON,
            a missing field or column, or an unreadable parquet file.
    """
    if not os.path.isfile(path):
        raise ValueError(f"input file not found: {path}")
    fmt = input_format(path)
    try:
        if fmt == "jsonl":
            yield from _iter_jsonl(path, json_key)
        elif fmt == "parquet":
            yield from _iter_parquet(path, json_key)
        else:
            yield from _iter_text(path, text_unit)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError) as err:  # e.g. a truncated .gz
        raise ValueError(f"{path}: cannot read: {err}") from None


def _iter_jsonl(path: str, json_key: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or json_key not in record:
                raise ValueError(f"{path}:{lineno}: no field {json_key!r} (set --json-key)")
            text = record[json_key]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{lineno}: field {json_key!r} is {type(text).__name__}, not a string"
                )
            if text:
                yield text


def _iter_parquet(path: str, json_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    # pyarrow's own errors (ArrowInvalid, ArrowIOError, ...) get the file name added.
    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
    except Exception as err:
        raise ValueError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from None
    if json_key not in columns:
        raise ValueError(f"{path}: no column {json_key!r} (columns: {columns}; set --json-key)")
    batches = parquet.iter_batches(batch_size=1024, columns=[json_key])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:
            raise ValueError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from None
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"{path}: column {json_key!r} holds {type(text).__name__}, not strings"
                )
            if text:
                yield text


def _iter_text(path: str, text_unit: str) -> Iterator[str]:
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    with _open_text(path) as f:
        if text_unit == "line":
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
            return
        text = f.read()
    if text_unit == "file":
        if text.strip():
            yield text
        return
    paragraph: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph)
            paragraph = []
    if paragraph:
        yield "".join(paragraph)


def resolve_inputs(inputs: Iterable[str]) -> list[str]:
    """Absolute paths of the inputs; a directory stands for its files (recursively, sorted).

    Raises:
        ValueError: naming the first input that does not exist, or when nothing is left.
    """
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).rglob("*")
                if p.is_file() and not any(s.startswith(".") for s in p.relative_to(item).parts)
            )
            paths.extend(os.path.abspath(p) for p in found)
        elif os.path.isfile(item):
            paths.append(os.path.abspath(item))
        else:
            raise ValueError(f"input file not found: {item}")
    if not paths:
        raise ValueError(f"no input files in {list(inputs)}")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"input given twice: {dup}")
    return paths


# ------------------------------------------------------------------------------- workers

_WORKER_TOKENIZER = None
_WORKER_OPTIONS: dict = {}


def _init_worker(tokenizer_path: str, append_bos: bool, dtype_name: str) -> None:
    global _WORKER_TOKENIZER, _WORKER_OPTIONS
    from megatron_moc.training.tokenizer import build_tokenizer

    _WORKER_TOKENIZER = build_tokenizer(tokenizer_path)
    _WORKER_OPTIONS = {"append_bos": append_bos, "dtype": np.dtype(dtype_name)}


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a chunk of documents: (all ids concatenated, one length per document)."""
    tok, opts = _WORKER_TOKENIZER, _WORKER_OPTIONS
    docs = []
    for text in texts:
        ids = tok.tokenize(text)
        if opts["append_bos"]:
            ids = [tok.bos] + ids
        ids.append(tok.eod)
        docs.append(ids)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((i for d in docs for i in d), dtype=opts["dtype"], count=int(lengths.sum()))
    return flat, lengths


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_map(pool, fn: Callable, items: Iterator, max_in_flight: int) -> Iterator:
    """`pool.imap(fn, items)` with at most `max_in_flight` chunks read ahead.

    `Pool.imap` feeds its queue from a thread that drains `items` as fast as it can, which
    would read a whole multi-GB input into memory ahead of the workers. Results still come
    back strictly in input order.
    """
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ------------------------------------------------------------------------- manifest, files


@dataclass
class PreprocessResult:
    """What `preprocess` did: totals of the final dataset and which inputs it (re)tokenized."""

    output_prefix: str
    num_documents: int
    num_tokens: int
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def manifest_path(output_prefix: str) -> str:
    return output_prefix + ".manifest.json"


def parts_dir(output_prefix: str) -> str:
    return output_prefix + ".parts"


def _part_name(path: str) -> str:
    # Keyed by the input's path, not its position, so reordering inputs keeps finished parts.
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_manifest(output_prefix: str, settings: dict, overwrite: bool) -> dict:
    path = manifest_path(output_prefix)
    fresh = {"version": MANIFEST_VERSION, "settings": settings, "inputs": {}, "output": None}
    if overwrite:
        return fresh
    if not os.path.exists(path):
        for suffix in (".bin", ".idx"):
            if os.path.exists(output_prefix + suffix):
                raise ValueError(
                    f"{output_prefix + suffix} exists but {path} does not: pass --overwrite to "
                    "replace it, or choose another --output-prefix"
                )
        return fresh
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable manifest ({err.msg}); pass --overwrite") from None
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("settings") != settings:
        old = manifest.get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ValueError(
            f"{path} was written with other settings (differ: {', '.join(diff)}): pass "
            "--overwrite to start over, or choose another --output-prefix"
        )
    return manifest


def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else -1


def _part_is_complete(prefix: str, entry: dict | None, path: str) -> bool:
    if entry is None or {k: entry[k] for k in ("size", "mtime_ns")} != _stat(path):
        return False
    part = os.path.join(parts_dir(prefix), entry["part"])
    return (_file_size(part + ".bin") == entry["part_bin_bytes"]
            and _file_size(part + ".idx") == entry["part_idx_bytes"])


def _output_is_complete(prefix: str, manifest: dict, paths: list[str]) -> bool:
    out = manifest.get("output")
    if not out or out["inputs"] != paths:
        return False
    for path in paths:
        entry = manifest["inputs"].get(path)
        if entry is None or {k: entry[k] for k in ("size", "mtime_ns")} != _stat(path):
            return False
    return (_file_size(prefix + ".bin") == out["bin_bytes"]
            and _file_size(prefix + ".idx") == out["idx_bytes"])


# ------------------------------------------------------------------------------ the job


def preprocess(
    inputs: Iterable[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    json_key: str = "text",
    text_unit: str = "file",
    workers: int = 1,
    append_bos: bool = False,
    chunk_docs: int = 64,
    keep_parts: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PreprocessResult:
    """Tokenize `inputs` into ``<output_prefix>.bin/.idx``, resuming a previous run of the same job.

    Args:
        inputs: files or directories (a directory stands for all its files, sorted).
        output_prefix: path prefix of the outputs; its directory receives everything written.
        tokenizer_path: the ``.model`` file of `tools/train_tokenizer.py`.
        json_key: field (jsonl) or column (parquet) holding the text.
        text_unit: documents of a plain text file: ``"file"``, ``"paragraph"`` or ``"line"``.
        workers: tokenizer processes; 1 tokenizes in this process.
        append_bos: put the bos id before each document (the eod id always ends it).
        chunk_docs: documents per worker task.
        keep_parts: keep the per-input part datasets after the merge (then adding an input
            later re-tokenizes only the new one).
        overwrite: discard an existing manifest / output instead of refusing or resuming.
        progress: show a tqdm bar per input.
        log: receives one line per input processed or skipped.

    Returns:
        A `PreprocessResult`: document and token totals, inputs processed and skipped.

    Raises:
        ValueError: naming the file, for a missing input or tokenizer, an unreadable input
            line, or a manifest written with other settings.
    """
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    if workers < 1 or chunk_docs < 1:
        raise ValueError(f"workers and chunk_docs must be >= 1, got {workers}, {chunk_docs}")
    paths = resolve_inputs(inputs)  # before the slow imports: a typo fails at once

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_moc.training.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_path)
    tokenizer_path = tokenizer.path
    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 below 65500 ids, else int32
    settings = {
        "tokenizer_sha256": tokenizer.sha256, "json_key": json_key, "text_unit": text_unit,
        "append_bos": append_bos, "dtype": np.dtype(dtype).name,
    }
    output_prefix = os.path.abspath(output_prefix)
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    manifest = _load_manifest(output_prefix, settings, overwrite)
    if overwrite and os.path.isdir(parts_dir(output_prefix)):
        shutil.rmtree(parts_dir(output_prefix))
    result = PreprocessResult(output_prefix, 0, 0)

    if _output_is_complete(output_prefix, manifest, paths):
        result.skipped = list(paths)
        for path in paths:
            log(f"skip {path}: finished in a previous run")
        if not keep_parts and os.path.isdir(parts_dir(output_prefix)):
            shutil.rmtree(parts_dir(output_prefix))  # a run killed right after its merge
        _fill_totals(result, manifest, paths)
        log(f"{output_prefix}.bin/.idx are up to date")
        return result

    os.makedirs(parts_dir(output_prefix), exist_ok=True)
    todo = []
    for path in paths:
        if _part_is_complete(output_prefix, manifest["inputs"].get(path), path):
            entry = manifest["inputs"][path]
            log(f"skip {path}: finished in a previous run "
                f"({entry['documents']} documents, {entry['tokens']} tokens)")
            result.skipped.append(path)
        else:
            todo.append(path)

    pool = None
    if todo and workers > 1:
        # fork where the platform has it: workers inherit the imported modules at no cost.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ctx.Pool(workers, _init_worker, (tokenizer_path, append_bos, np.dtype(dtype).name))
    else:
        _init_worker(tokenizer_path, append_bos, np.dtype(dtype).name)
    try:
        for path in todo:
            entry = _tokenize_one(path, output_prefix, dtype, pool, workers, json_key,
                                  text_unit, chunk_docs, progress, IndexedDatasetBuilder)
            manifest["inputs"][path] = entry
            manifest["output"] = None
            _write_json_atomic(manifest_path(output_prefix), manifest)
            result.processed.append(path)
            log(f"done {path}: {entry['documents']} documents, {entry['tokens']} tokens")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    _merge_parts(output_prefix, paths, manifest, dtype, IndexedDatasetBuilder)
    manifest["output"] = {
        "inputs": paths,
        "bin_bytes": os.path.getsize(output_prefix + ".bin"),
        "idx_bytes": os.path.getsize(output_prefix + ".idx"),
    }
    _write_json_atomic(manifest_path(output_prefix), manifest)
    if not keep_parts:
        shutil.rmtree(parts_dir(output_prefix))
    _fill_totals(result, manifest, paths)
    log(f"wrote {output_prefix}.bin/.idx: {result.num_documents} documents, "
        f"{result.num_tokens} tokens ({np.dtype(dtype).name})")
    return result


def _fill_totals(result: PreprocessResult, manifest: dict, paths: list[str]) -> None:
    result.num_documents = sum(manifest["inputs"][p]["documents"] for p in paths)
    result.num_tokens = sum(manifest["inputs"][p]["tokens"] for p in paths)


def _tokenize_one(path, output_prefix, dtype, pool, workers, json_key, text_unit, chunk_docs,
                  progress, builder_cls) -> dict:
    """Tokenize one input into its part dataset; return its manifest entry."""
    from tqdm import tqdm

    stat = _stat(path)  # taken before reading: a file changed meanwhile is redone next time
    name = _part_name(path)
    part = os.path.join(parts_dir(output_prefix), name)
    tmp = part + ".tmp"
    builder = builder_cls(tmp + ".bin", dtype=dtype)
    num_docs = num_tokens = 0
    try:
        chunks = _chunks(iter_documents(path, json_key, text_unit), chunk_docs)
        with tqdm(desc=os.path.basename(path), unit="doc", disable=not progress,
                  file=sys.stderr) as bar:
            for flat, lengths in _ordered_map(pool, _encode_chunk, chunks, 4 * workers):
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for i, length in enumerate(lengths.tolist()):
                    builder.add_document(flat[offsets[i]:offsets[i + 1]], [length])
                num_docs += len(lengths)
                num_tokens += int(lengths.sum())
                bar.update(len(lengths))
                bar.set_postfix(tokens=num_tokens, refresh=False)
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        raise
    for suffix in (".bin", ".idx"):
        _fsync(tmp + suffix)
        os.replace(tmp + suffix, part + suffix)
    return {
        **stat, "documents": num_docs, "tokens": num_tokens, "part": name,
        "part_bin_bytes": os.path.getsize(part + ".bin"),
        "part_idx_bytes": os.path.getsize(part + ".idx"),
    }


def _merge_parts(output_prefix, paths, manifest, dtype, builder_cls) -> None:
    """Concatenate the parts in input order into temp files, then rename them into place."""
    tmp = output_prefix + ".tmp"
    builder = builder_cls(tmp + ".bin", dtype=dtype)
    for path in paths:
        builder.add_index(os.path.join(parts_dir(output_prefix), manifest["inputs"][path]["part"]))
    builder.finalize(tmp + ".idx")
    for suffix in (".bin", ".idx"):
        _fsync(tmp + suffix)
    # .bin first: a kill between the two renames leaves the manifest without an "output"
    # entry, so the next run merges again, and validation would catch the stale pair.
    os.replace(tmp + ".bin", output_prefix + ".bin")
    os.replace(tmp + ".idx", output_prefix + ".idx")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="input files or directories (jsonl, parquet, text)")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    parser.add_argument("--json-key", default="text", help="jsonl field / parquet column")
    parser.add_argument("--text-unit", choices=TEXT_UNITS, default="file",
                        help="documents of a plain text file")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--append-bos", action="store_true", help="bos id before each document")
    parser.add_argument("--chunk-docs", type=int, default=64, help="documents per worker task")
    parser.add_argument("--keep-parts", action="store_true",
                        help="keep per-input part datasets after the merge")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an existing manifest and output")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        preprocess(args.input, args.output_prefix, args.tokenizer, json_key=args.json_key,
                   text_unit=args.text_unit, workers=args.workers, append_bos=args.append_bos,
                   chunk_docs=args.chunk_docs, keep_parts=args.keep_parts,
                   overwrite=args.overwrite, progress=not args.no_progress)
    except ValueError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
