"""Safe loading, checked in the source: no file is unpickled except DeepSpeed's own shards.

Every `torch.load` in the repository's Python files must pass `weights_only=True`, unless a
comment `# deepspeed-exception: <why>` sits on the call or in the three lines above it
(docs/reliability.md documents the exception: DeepSpeed's model-state and optimizer shards
pickle DeepSpeed objects, so they are read with `weights_only=False`). `pickle.load(s)`,
`yaml.load` / `yaml.unsafe_load` / `yaml.full_load` and `numpy.load(allow_pickle=True)` are
refused outright. The auditor is tested on snippets first, so this test can fail.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNED = ("megatron_moc", "tools", "kernels", "launchers", "tests")
MARKER = "deepspeed-exception:"


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kwarg(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def audit_source(source: str, filename: str = "<string>") -> list:
    """Findings as 'file:line: what', for one module's source."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    aliases = {}  # local name -> dotted origin, from imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{filename}:{node.lineno}"
        if full in ("torch.load", "torch.serialization.load"):
            if _is_true(_kwarg(node, "weights_only")):
                continue
            nearby = lines[max(0, node.lineno - 4):node.end_lineno]
            if any(MARKER in line for line in nearby):
                continue
            findings.append(f"{where}: torch.load without weights_only=True (and no "
                            f"'# {MARKER}' comment)")
        elif full in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load",
                      "dill.load", "dill.loads"):
            findings.append(f"{where}: {full} (unpickles arbitrary code)")
        elif full in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                      "yaml.unsafe_load_all"):
            findings.append(f"{where}: {full} (use yaml.safe_load)")
        elif full in ("numpy.load", "np.load") and _is_true(_kwarg(node, "allow_pickle")):
            findings.append(f"{where}: {full}(allow_pickle=True)")
    return findings


def _python_files():
    for top in SCANNED:
        for root, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", ".venv")]
            yield from (os.path.join(root, n) for n in files if n.endswith(".py"))


@pytest.mark.parametrize("snippet, bad", [
    ("import torch\ntorch.load(p)\n", True),
    ("import torch\ntorch.load(p, weights_only=False)\n", True),
    ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n", False),
    ("from torch import load\nload(p)\n", True),
    ("import torch as T\nT.load(p)\n", True),
    ("import torch\n# deepspeed-exception: DeepSpeed's own shard\nx = torch.load(\n    p,\n"
     "    weights_only=False)\n", False),
    ("import torch\n# some other comment\nx = torch.load(p, weights_only=False)\n", True),
    ("import pickle\npickle.loads(b)\n", True),
    ("import yaml\nyaml.load(f, Loader=yaml.Loader)\n", True),
    ("import yaml\nyaml.safe_load(f)\n", False),
    ("import numpy as np\nnp.load(p, allow_pickle=True)\n", True),
    ("import numpy as np\nnp.load(p)\n", False),
])
def test_the_auditor_catches_unsafe_loads(snippet, bad):
    assert bool(audit_source(snippet)) == bad, audit_source(snippet)


def test_no_unsafe_load_in_the_repository():
    findings, exceptions, scanned = [], [], 0
    for path in _python_files():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        rel = os.path.relpath(path, ROOT)
        findings += audit_source(source, rel)
        exceptions += [f"{rel}:{i + 1}" for i, line in enumerate(source.splitlines())
                       if MARKER in line]
        scanned += 1
    assert scanned > 50, scanned
    assert not findings, "\n".join(findings)
    # The exception is documented where users read about it.
    with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
        doc = f.read()
    assert MARKER in doc and "weights_only=True" in doc
    assert exceptions  # the DeepSpeed load sites carry the marker (checkpoint.py at least)
    assert any(e.startswith(os.path.join("megatron_moc", "training", "checkpoint.py"))
               for e in exceptions), exceptions


# ------------------------------------------------------------------- tools stay in their output
def _snapshot(root: str) -> dict:
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            st = os.lstat(path)  # a directory counts by existence (its mtime follows files)
            out[os.path.relpath(path, root)] = None if name in dirs else (st.st_size,
                                                                          st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_tools_write_only_into_their_output(tmp_path):
    """Each data / import / export tool runs from an empty working directory with its own
    TMPDIR and HOME, reading inputs from a read-only directory: afterwards the only new or
    changed paths are under the output it was given (temp files included: none left anywhere
    else), apart from transformers' modules cache named below."""
    import subprocess
    import sys

    import torch

    from tests.reference.lunaris_reference import (ReferenceModel, config_for_kind,
                                                   save_research_checkpoint)
    from tests.unit.test_import_lunaris import BASE

    inputs = tmp_path / "in"
    inputs.mkdir()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_default_corpus.py"),
                    "--output-dir", str(inputs), "--max-mb", "0.2"], check=True,
                   capture_output=True, timeout=300)
    cfg = config_for_kind("moc", **dict(BASE))
    torch.manual_seed(0)
    save_research_checkpoint(ReferenceModel(cfg), cfg, inputs / "latest_checkpoint.pt")
    for path in [inputs, *inputs.iterdir()]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    py = sys.executable
    tools = {
        "corpus": [py, f"{ROOT}/tools/build_default_corpus.py", "--output-dir", "{out}",
                   "--max-mb", "0.2"],
        "tokenizer": [py, f"{ROOT}/tools/train_tokenizer.py", "--input",
                      str(inputs / "stdlib.jsonl"), "--output-prefix", "{out}/tok",
                      "--vocab-size", "512", "--num-threads", "1"],
        "preprocess": [py, f"{ROOT}/tools/preprocess_data.py", "--input",
                       str(inputs / "stdlib.jsonl"), "--tokenizer", "{tok}", "--output-prefix",
                       "{out}/ds", "--workers", "2", "--no-progress"],
        "import": [py, f"{ROOT}/tools/import_lunaris.py", "--ckpt",
                   str(inputs / "latest_checkpoint.pt"), "--out", "{out}/model"],
        "to_hf": [py, f"{ROOT}/tools/convert_to_hf.py", "--checkpoint",
                  str(tmp_path / "import" / "out" / "model"), "--output", "{out}/hf"],
        "from_hf": [py, f"{ROOT}/tools/convert_from_hf.py", "--hf",
                    str(tmp_path / "to_hf" / "out" / "hf"), "--output", "{out}/model"],
    }
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "TRITON_INTERPRET")}
    env.update(PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", DS_ACCELERATOR="cpu")
    try:
        for name, cmd in tools.items():
            box = tmp_path / name
            for sub in ("cwd", "tmp", "home"):
                (box / sub).mkdir(parents=True)
            out = box / "out"
            cmd = [c.format(out=out, tok=tmp_path / "tokenizer" / "out" / "tok.model")
                   for c in cmd]
            before = _snapshot(str(tmp_path))
            proc = subprocess.run(cmd, cwd=box / "cwd", capture_output=True, text=True,
                                  timeout=300, env=dict(env, TMPDIR=str(box / "tmp"),
                                                        HOME=str(box / "home")))
            assert proc.returncode == 0, (name, proc.stderr[-3000:])
            after = _snapshot(str(tmp_path))
            changed = sorted(p for p in after if p not in before or before[p] != after[p])
            # The one write elsewhere, allowed by name: transformers copies the modeling code
            # of a trust_remote_code model into its modules cache under HOME when
            # convert_to_hf / convert_from_hf verify the export by loading it
            # (--no-verify avoids it).
            cache = os.path.join(name, "home", ".cache", "huggingface", "modules")
            allowed = (os.path.join(name, "out"), cache)
            parents = (os.path.dirname(os.path.dirname(cache)), os.path.dirname(cache))
            outside = [p for p in changed if p not in parents and not any(
                (p + os.sep).startswith(a + os.sep) for a in allowed)]
            assert os.listdir(out), name
            assert not outside, f"{name} wrote outside its output: {outside}"
    finally:
        for path in [inputs, *inputs.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
