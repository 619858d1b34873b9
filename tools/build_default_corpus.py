"""Build the default corpus: this machine's Python standard-library sources as one jsonl file.

Every Python install ships its standard library as source, so a tokenizer and a tiny
pretraining run need no network and no download. The files are read in sorted order, test
directories and installed packages are skipped, and the corpus stops at a byte cap, so the same
Python version always gives the same file. Each line is ``{"text": <file>, "path": <relative
path>}``; the preprocessing tools read the ``text`` field.

    python tools/build_default_corpus.py --output-dir data/ --max-mb 20
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Directory names never entered: the test suites (they hold deliberately odd encodings and
# would dominate the corpus) and anything installed on top of the standard library.
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
DEFAULT_FILENAME = "stdlib.jsonl"


@dataclass(frozen=True)
class CorpusInfo:
    """What `build_default_corpus` wrote."""

    path: str
    num_documents: int
    num_bytes: int  # UTF-8 bytes of the texts, without the JSON framing


def stdlib_dir() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``*.py`` files under `root` outside test and package directories, sorted.

    Args:
        root: directory to scan; defaults to `stdlib_dir()`.

    Returns:
        Absolute paths, in the order of their POSIX relative paths (independent of the file
        system's listing order).
    """
    root = Path(root) if root is not None else stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def build_default_corpus(
    output_dir: str | os.PathLike,
    max_bytes: int = 20_000_000,
    filename: str = DEFAULT_FILENAME,
    root: str | os.PathLike | None = None,
) -> CorpusInfo:
    """Write the standard-library sources as jsonl into `output_dir`, up to `max_bytes` of text.

    Files are taken in sorted order until the next one would pass the cap; files that are not
    valid UTF-8 or are empty are skipped. The file is written under a temporary name and
    renamed, so a killed run never leaves a half corpus behind.

    Args:
        output_dir: directory to write into (created if missing).
        max_bytes: cap on the UTF-8 size of all texts together.
        filename: name of the jsonl file inside `output_dir`.
        root: source directory; defaults to `stdlib_dir()`.

    Returns:
        A `CorpusInfo` with the path written, the number of documents and their bytes.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise ValueError(f"source directory not found: {root}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out_path = output_dir / filename
    tmp_path = output_dir / (filename + ".tmp")

    num_documents = num_bytes = 0
    with open(tmp_path, "w", encoding="utf-8") as out:
        for path in list_source_files(root):
            raw = path.read_bytes()
            if not raw.strip():
                continue
            if num_bytes + len(raw) > max_bytes:
                break
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            record = {"text": text, "path": path.relative_to(root).as_posix()}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            num_documents += 1
            num_bytes += len(raw)
    os.replace(tmp_path, out_path)
    return CorpusInfo(str(out_path), num_documents, num_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True, help="directory to write the jsonl into")
    parser.add_argument("--max-mb", type=float, default=20.0, help="cap on the text size, in MB")
    parser.add_argument("--filename", default=DEFAULT_FILENAME, help="name of the jsonl file")
    parser.add_argument("--source-dir", default=None,
                        help="scan this directory instead of the standard library")
    args = parser.parse_args(argv)
    info = build_default_corpus(args.output_dir, int(args.max_mb * 1_000_000), args.filename,
                                args.source_dir)
    print(f"wrote {info.path}: {info.num_documents} documents, {info.num_bytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
