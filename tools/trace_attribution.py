"""GPU time of a profiled (not graph-replayed) step, attributed to what launched it.

    python tools/trace_attribution.py trace.json.gz [--top 40]

A torch-profiler Chrome trace links every GPU kernel to the host call that launched it (the
`correlation` id of the kernel and of its cudaLaunchKernel / cuLaunchKernel event). This tool
walks the host-side scopes enclosing each launch and charges the kernel's time to:
- `graph <id> fwd|bwd`: the compiled graph that launched it (inductor's `## Call
  CompiledFxGraph <id>` scope; `bwd` when it ran inside the autograd engine). A region
  compiled once and run in every layer is one graph, so its rows are per-region totals.
- `eager <op> [in <node>]`: otherwise the outermost aten op around the launch, and the
  autograd node it ran in (backward) if any.
Graphs are numbered in the order they first ran, so a layer's forward regions read in model
order. A trace of a CUDA-graph replay has no such links (one launch for the whole step): profile
without `--cuda-graph` to use this (tools/bench_throughput.py --profile).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

_KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_SCOPE_CATS = ("cpu_op", "user_annotation")
_GRAPH_TAG = "## Call CompiledFxGraph"


def _load(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _launch_scopes(scopes: list, launches: list) -> dict:
    """{id(launch): names of the scopes open at its start, outermost first}, for one
    thread's scopes and launches. Scopes on one thread nest, so one sweep with a stack."""
    scopes = sorted(scopes, key=lambda s: (s["ts"], -s["dur"]))
    out, stack, i = {}, [], 0
    for launch in sorted(launches, key=lambda e: e["ts"]):
        ts = launch["ts"]
        while i < len(scopes) and scopes[i]["ts"] <= ts:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < scopes[i]["ts"]:
                stack.pop()
            stack.append(scopes[i])
            i += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < ts:
            stack.pop()
        out[id(launch)] = [s["name"] for s in stack]
    return out


def attribute(events: list) -> tuple[dict, float]:
    """{scope label: {"ms", "calls", "kernels": {name: ms}, "order"}}, total kernel ms."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {})}
    scopes, calls = defaultdict(list), defaultdict(list)
    for e in events:
        if e.get("cat") in _SCOPE_CATS and e.get("ph") == "X":
            scopes[e["tid"]].append(e)
    for launch in launches.values():
        calls[launch["tid"]].append(launch)
    open_at = {}
    for tid, tid_launches in calls.items():
        open_at.update(_launch_scopes(scopes.get(tid, []), tid_launches))
    graph_order, rows, total = {}, {}, 0.0
    kernels = sorted((e for e in events if e.get("cat") in _KERNEL_CATS and e.get("ph") == "X"),
                     key=lambda e: e["ts"])
    for k in kernels:
        ms = k.get("dur", 0) / 1e3
        total += ms
        launch = launches.get(k.get("args", {}).get("correlation"))
        if launch is None:
            label = "unlinked"
        else:
            names = open_at[id(launch)]
            backward = any(n.startswith("autograd::engine::evaluate_function") for n in names)
            graphs = [n for n in names if n.startswith(_GRAPH_TAG)]
            if graphs:
                gid = graphs[-1][len(_GRAPH_TAG):].strip()
                graph_order.setdefault(gid, len(graph_order))
                label = f"graph {graph_order[gid]:02d} {gid[:8]} {'bwd' if backward else 'fwd'}"
            else:
                ops = [n for n in names if n.startswith("aten::")]
                node = [n.split(": ", 1)[-1] for n in names
                        if n.startswith("autograd::engine::evaluate_function")]
                label = f"eager {ops[0] if ops else (names[-1] if names else '(no scope)')}"
                label += f" in {node[-1]}" if node else ""
        row = rows.setdefault(label, {"ms": 0.0, "calls": 0, "kernels": defaultdict(float),
                                      "order": len(rows)})
        row["ms"] += ms
        row["calls"] += 1
        row["kernels"][k["name"]] += ms
    return rows, total


def format_table(rows: dict, total: float, top: int = 40) -> str:
    lines = [f"GPU kernel time {total:.1f} ms", "",
             "| scope | calls | ms | share | top kernels (ms) |", "|---|---:|---:|---:|---|"]
    for label, r in sorted(rows.items(), key=lambda kv: -kv[1]["ms"])[:top]:
        ks = sorted(r["kernels"].items(), key=lambda kv: -kv[1])[:3]
        ktxt = "; ".join(f"`{n[:50]}` {ms:.2f}" for n, ms in ks)
        lines.append(f"| {label} | {r['calls']} | {r['ms']:.2f} | {r['ms'] / total:.1%} | {ktxt} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    rows, total = attribute(_load(args.trace))
    print(format_table(rows, total, args.top))


if __name__ == "__main__":
    main()
