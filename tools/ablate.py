"""Ablation runner: model kinds × seeds × overrides on one dataset and token budget.

    python tools/ablate.py --config launchers/configs/tiny.yaml --out runs/ablate \\
        --kinds dense moe moc moc_v1 --seeds 1 2 --train-iters 60 \\
        --set train.data_path=[data/stdlib] train.tokenizer=data/tok.model --jobs 2
    python tools/ablate.py ... --grid model.num_moe_experts=4,8          # × every value
    python tools/ablate.py ... --variant moc_ent moc model.moc_gate_entropy_coeff=0.1 \\
                               --kinds moc moc_ent                       # a named variant
    python tools/ablate.py --out runs/ablate --report-only              # tables + plot again

Every run is `python -m megatron_moc.training.pretrain --config <recipe> <overrides>` in its
own process and directory, `<out>/<variant>/<grid>/seed<k>/` (`train.save` points there, so a
run that was cut off resumes from its checkpoint). A run is finished when its `done.json`
exists: written last, atomically, after the run's validation curve was read back from its
`train_log.jsonl`. Killing the runner (even with SIGKILL: the children get SIGKILL from the
kernel when it dies, Linux `PR_SET_PDEATHSIG`) and starting the same command again skips
the finished runs and resumes the others. `run.json` holds each run's fingerprint (resolved
recipe): an output directory filled with other settings is refused rather than mixed.

Runs go one at a time by default (`--jobs 1`: one GPU, or the CPU); `--jobs N` keeps N
processes going, `--gpus 0,1,..` gives each its own devices (`--nproc` ranks per run through
torchrun). Kind presets: dense / moe / collab_only / moc_v1 run S = 1, irl_only S ≥ 2; the
rest of the recipe is shared, so every kind sees the same data, batch and token budget.

Outputs in `--out` (rewritten after every finished run):
    results.csv / results.md   one row per (variant, grid point): runs, validation loss and
                               perplexity (mean, standard deviation, 95% CI: two-sided
                               Student t over the seeds), tokens/s, routing Gini, dead experts
    runs.csv                   one row per run
    valid_curves.png           validation loss against tokens, mean per row with 95% CI band
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Model fields each kind needs whatever the recipe says (MoCConfig refuses the others).
KIND_PRESETS: Dict[str, Dict[str, Any]] = {
    "dense": {"moc_irl_steps": 1},
    "moe": {"moc_irl_steps": 1},
    "collab_only": {"moc_irl_steps": 1},
    "moc_v1": {"moc_irl_steps": 1},
    "irl_only": {},   # S >= 2: taken from the recipe, raised to 2 if it has 1 (plan_runs)
    "moc": {},
}
DONE, RUN_INFO, PID_FILE, LOG_FILE = "done.json", "run.json", "pid", "train.log"

# Two-sided 95% Student t critical values t_{0.975, df} (scipy is used when installed).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074,
         23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045,
         30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Run:
    variant: str                       # a kind, or a --variant name
    kind: str                          # moc_model_kind
    grid: Tuple[Tuple[str, str], ...]  # (key, value) of the grid point
    seed: int
    overrides: Tuple[str, ...]         # section.key=value for pretrain, in order
    run_dir: str

    @property
    def run_id(self) -> str:
        return f"{self.variant}/{grid_tag(self.grid)}/seed{self.seed}"

    @property
    def group(self) -> Tuple[str, str]:
        return self.variant, grid_tag(self.grid)


def grid_tag(grid: Sequence[Tuple[str, str]]) -> str:
    if not grid:
        return "base"
    text = "_".join(f"{k.split('.', 1)[-1]}={v}" for k, v in grid)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)


def parse_grid(specs: Sequence[str]) -> List[Tuple[Tuple[str, str], ...]]:
    """['model.num_moe_experts=4,8', 'model.x=a,b'] → the cartesian product of the values."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or "." not in key or not values:
            raise ValueError(f"--grid {spec!r}: expected section.key=v1,v2,...")
        axes.append([(key, v) for v in values.split(",")])
    return [tuple(point) for point in itertools.product(*axes)] if axes else [()]


def parse_variants(kinds: Sequence[str], variant_specs: Sequence[Sequence[str]]
                   ) -> List[Tuple[str, str, Tuple[str, ...]]]:
    """(variant, kind, overrides) for each name of --kinds; --variant NAME KIND [OVERRIDES]
    defines names beyond the plain kinds."""
    from megatron_moc.config import MODEL_KINDS

    defined = {}
    for spec in variant_specs:
        if len(spec) < 2:
            raise ValueError(f"--variant {' '.join(spec)}: expected NAME KIND [section.key=value ...]")
        name, kind, *overrides = spec
        if kind not in MODEL_KINDS:
            raise ValueError(f"--variant {name}: unknown kind {kind!r}; choose one of {MODEL_KINDS}")
        defined[name] = (name, kind, tuple(overrides))
    out = []
    for name in kinds:
        if name in defined:
            out.append(defined[name])
        elif name in MODEL_KINDS:
            out.append((name, name, ()))
        else:
            raise ValueError(f"--kinds: {name!r} is neither a model kind {MODEL_KINDS} nor "
                             "a --variant name")
    if len({v for v, _, _ in out}) != len(out):
        raise ValueError(f"--kinds: a name appears twice: {list(kinds)}")
    return out


def plan_runs(config: str, out_dir: str, kinds: Sequence[str], seeds: Sequence[int],
              sets: Sequence[str] = (), grid: Sequence[str] = (),
              variants: Sequence[Sequence[str]] = (), train_iters: Optional[int] = None,
              tokens: Optional[int] = None) -> Tuple[List[Run], Dict[str, Any]]:
    """Every run of the grid with its pretrain overrides (checked against the recipe now, so
    a typo fails before anything starts). Returns (runs, facts: steps, tokens per step)."""
    from megatron_moc.training.pretrain import load_recipe

    shared = list(sets)
    recipe = load_recipe(config, shared)
    tokens_per_step = recipe["train"].get("global_batch_size", 8) * recipe["train"].get(
        "seq_length", 1024)
    if tokens is not None:
        train_iters = max(1, math.ceil(tokens / tokens_per_step))
    if train_iters is not None:
        shared.append(f"train.train_iters={train_iters}")
    recipe = load_recipe(config, shared)
    steps = int(recipe["train"].get("train_iters", 1000))
    if int(recipe["train"].get("eval_interval", 100)) <= 0:
        raise ValueError("train.eval_interval must be > 0: the ablation reads validation curves")
    runs = []
    for variant, kind, var_overrides in parse_variants(kinds, variants):
        preset = dict(KIND_PRESETS[kind])
        if kind == "irl_only" and int(recipe["model"].get("moc_irl_steps", 1)) < 2:
            preset["moc_irl_steps"] = 2
        for point in parse_grid(grid):
            for seed in seeds:
                run_dir = os.path.join(out_dir, variant, grid_tag(point), f"seed{seed}")
                overrides = (*shared, f"model.moc_model_kind={kind}",
                             *(f"model.{k}={v}" for k, v in preset.items()), *var_overrides,
                             *(f"{k}={v}" for k, v in point), f"train.seed={seed}",
                             f"train.save={run_dir}")
                load_recipe(config, overrides)  # unknown keys fail here, naming the run
                runs.append(Run(variant, kind, point, seed, overrides, run_dir))
    return runs, {"steps": steps, "tokens_per_step": tokens_per_step}


def fingerprint(config: str, run: Run) -> str:
    """sha256 of the resolved recipe of a run: same settings ⇔ same fingerprint."""
    from megatron_moc.training.pretrain import load_recipe

    resolved = load_recipe(config, run.overrides)
    text = json.dumps(resolved, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- files
def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summarize_run(run_dir: str, tokens_per_step: int) -> Dict[str, Any]:
    """Read a finished run's `train_log.jsonl`: validation curve, final loss, tokens/s,
    routing Gini and dead experts at the last log. A resumed run logs steps again after its
    checkpoint, so the last record of a step wins; a line cut by a kill is skipped."""
    path = os.path.join(run_dir, "train_log.jsonl")
    records: Dict[int, Dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "valid/loss" in rec:
                records.setdefault(rec["step"], {})["valid"] = rec["valid/loss"]
            if "train/loss" in rec:
                records.setdefault(rec["step"], {})["train"] = rec
    curve = sorted((s, r["valid"]) for s, r in records.items() if "valid" in r)
    if not curve:
        raise ValueError(f"{path}: no validation loss logged")
    trains = [r["train"] for _, r in sorted(records.items()) if "train" in r]
    speeds = sorted(t["train/tokens_per_s"] for t in trains if "train/tokens_per_s" in t)
    last = trains[-1] if trains else {}
    ginis = [v for k, v in last.items() if re.fullmatch(r"routing/layer\d+/gini", k)]
    dead = [v for k, v in last.items() if re.fullmatch(r"routing/layer\d+/dead_experts", k)]
    final_step, final_loss = curve[-1]
    return {
        "final_step": final_step, "tokens": final_step * tokens_per_step,
        "valid_loss": final_loss, "valid_ppl": math.exp(min(final_loss, 50.0)),
        "curve": [[s, v] for s, v in curve],
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,   # median interval
        "gini": sum(ginis) / len(ginis) if ginis else None,           # mean over layers
        "dead_experts": sum(dead) if dead else None,                   # summed over layers
    }


# ----------------------------------------------------------------------------- processes
def _die_with_parent() -> None:  # pragma: no cover (runs in the child before exec)
    """The kernel SIGKILLs this child when the runner dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the runner died before the prctl
            os._exit(1)


def _start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time
    except OSError:
        return None


def kill_leftover(run_dir: str) -> None:
    """A run process group left by an earlier runner (its pid file names it, with the start
    time so a reused pid is never hit): SIGKILL it and wait until it is gone."""
    info = read_json(os.path.join(run_dir, PID_FILE))
    if not info:
        return
    pid = int(info["pid"])
    if info.get("start_time") and _start_time(pid) == info["start_time"]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for _ in range(100):
            if _start_time(pid) != info["start_time"]:
                break
            time.sleep(0.05)
    os.remove(os.path.join(run_dir, PID_FILE))


@dataclass
class Job:
    run: Run
    proc: subprocess.Popen
    slot: int
    started: float
    log: Any = field(repr=False, default=None)


def launch(run: Run, config: str, slot: int, jobs: int, gpus: Sequence[str], nproc: int) -> Job:
    os.makedirs(run.run_dir, exist_ok=True)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TRITON_INTERPRET"):
        env.pop(k, None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    from megatron_moc.parallel.groups import free_port
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * nproc:(slot + 1) * nproc])
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                    str(nproc), "--master_port", env["MASTER_PORT"], "-m",
                    "megatron_moc.training.pretrain"]
    else:
        launcher = [sys.executable, "-m", "megatron_moc.training.pretrain"]
    log = open(os.path.join(run.run_dir, LOG_FILE), "ab")
    proc = subprocess.Popen([*launcher, "--config", config, *run.overrides], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)
    write_json_atomic(os.path.join(run.run_dir, PID_FILE),
                      {"pid": proc.pid, "start_time": _start_time(proc.pid)})
    return Job(run, proc, slot, time.time(), log)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class _Stop(Exception):
    pass


def execute(runs: List[Run], config: str, facts: Dict[str, Any], out_dir: str, jobs: int,
            gpus: Sequence[str], nproc: int, on_done=None) -> List[str]:
    """Run `runs` (those without done.json), `jobs` at a time. Returns failed run ids."""
    pending = list(runs)
    running: List[Job] = []
    failed: List[str] = []
    total, finished = len(runs), 0

    def stop(signum, frame):
        raise _Stop()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            free = [s for s in range(jobs) if s not in {j.slot for j in running}]
            while pending and free:
                run = pending.pop(0)
                print(f"start  {run.run_id}", flush=True)
                running.append(launch(run, config, free.pop(0), jobs, gpus, nproc))
            time.sleep(0.2)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                job.log.close()
                finished += 1
                rc, run = job.proc.returncode, job.run
                log_path = os.path.join(run.run_dir, LOG_FILE)
                try:
                    if rc != 0:
                        raise RuntimeError(f"exit code {rc}")
                    summary = summarize_run(run.run_dir, facts["tokens_per_step"])
                except (RuntimeError, OSError, ValueError) as err:
                    failed.append(run.run_id)
                    print(f"FAILED {run.run_id} ({err}); log {log_path}:\n{_tail(log_path)}",
                          flush=True)
                    continue
                summary.update(run_id=run.run_id, variant=run.variant, kind=run.kind,
                               grid=grid_tag(run.grid), seed=run.seed,
                               fingerprint=fingerprint(config, run),
                               wall_s=round(time.time() - job.started, 1))
                os.remove(os.path.join(run.run_dir, PID_FILE))
                write_json_atomic(os.path.join(run.run_dir, DONE), summary)  # the marker, last
                print(f"done   {run.run_id} [{finished}/{total}]: valid loss "
                      f"{summary['valid_loss']:.4f} (ppl {summary['valid_ppl']:.2f}) at step "
                      f"{summary['final_step']}, {summary['wall_s']:.0f} s", flush=True)
                if on_done is not None:
                    on_done()
    except _Stop:
        print(f"stopping: SIGTERM to {len(running)} run(s) (they save a checkpoint); start the "
              "same command again to resume", flush=True)
        for job in running:
            try:
                os.killpg(job.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for job in running:
            try:
                job.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(job.proc.pid, signal.SIGKILL)
        raise SystemExit(130)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return failed


# ----------------------------------------------------------------------------- statistics
def t_critical(df: int) -> float:
    """t_{0.975, df}: the 95% two-sided Student t quantile."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        pass
    if df in _T975:
        return _T975[df]
    if df > 120:
        return 1.960 + (1.980 - 1.960) * 120 / df  # linear in 1/df toward the normal 1.96
    lo = max(k for k in _T975 if k < df)
    hi = min(k for k in _T975 if k > df)
    w = (1 / df - 1 / hi) / (1 / lo - 1 / hi)
    return _T975[hi] + w * (_T975[lo] - _T975[hi])


def mean_std_ci(values: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, sample standard deviation, 95% CI half-width); nan where n is too small."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t_critical(n - 1) * std / math.sqrt(n)


def aggregate(runs: List[Run], summaries: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (variant, grid point) in grid order, over its finished seeds."""
    groups: Dict[Tuple[str, str], List[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    rows = []
    for (variant, tag), members in groups.items():
        done = [summaries[r.run_id] for r in members if r.run_id in summaries]
        row: Dict[str, Any] = {"variant": variant, "kind": members[0].kind, "grid": tag,
                               "runs": len(done), "runs_planned": len(members),
                               "seeds": " ".join(str(s["seed"]) for s in done)}
        row["steps"] = done[0]["final_step"] if done else None
        row["tokens"] = done[0]["tokens"] if done else None
        for key in ("valid_loss", "valid_ppl", "tokens_per_s"):
            m, sd, ci = mean_std_ci([s[key] for s in done if s.get(key) is not None])
            row.update({f"{key}_mean": m, f"{key}_std": sd, f"{key}_ci95": ci})
        for key in ("gini", "dead_experts"):
            vals = [s[key] for s in done if s.get(key) is not None]
            row[f"{key}_mean"] = sum(vals) / len(vals) if vals else None
        row["curves"] = [s["curve"] for s in done]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reports
CSV_COLUMNS = ("variant", "kind", "grid", "runs", "runs_planned", "seeds", "steps", "tokens",
               "valid_loss_mean", "valid_loss_std", "valid_loss_ci95", "valid_ppl_mean",
               "valid_ppl_std", "valid_ppl_ci95", "tokens_per_s_mean", "tokens_per_s_std",
               "gini_mean", "dead_experts_mean")
RUN_COLUMNS = ("run_id", "variant", "kind", "grid", "seed", "final_step", "tokens",
               "valid_loss", "valid_ppl", "tokens_per_s", "gini", "dead_experts", "wall_s")


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, fmt)


def _csv_value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def _csv(rows: List[Dict[str, Any]], columns) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_csv_value(row.get(c)) for c in columns])
    return buf.getvalue()


def results_csv(rows: List[Dict[str, Any]]) -> str:
    return _csv(rows, CSV_COLUMNS)


def runs_csv(summaries: List[Dict[str, Any]]) -> str:
    return _csv(summaries, RUN_COLUMNS)


def results_markdown(rows: List[Dict[str, Any]], title: str) -> str:
    grid = any(r["grid"] != "base" for r in rows)
    head = ["kind"] + (["grid"] if grid else []) + [
        "runs", "valid loss (mean ± sd)", "95% CI", "perplexity (mean ± sd)", "95% CI",
        "tokens/s", "routing Gini", "dead experts"]
    lines = [f"# {title}", "",
             "Validation loss at the last step (nats/token) and perplexity, over seeds: mean ± "
             "sample standard deviation, 95% CI = mean ± t(0.975, n−1)·sd/√n. tokens/s: median "
             "of the logged intervals per run, mean over seeds. Routing Gini and dead experts "
             "(summed over layers) at the last log; — for dense layers.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lo = r["valid_loss_mean"] - r["valid_loss_ci95"]
        hi = r["valid_loss_mean"] + r["valid_loss_ci95"]
        plo = r["valid_ppl_mean"] - r["valid_ppl_ci95"]
        phi = r["valid_ppl_mean"] + r["valid_ppl_ci95"]
        ci = "—" if math.isnan(lo) else f"[{lo:.4f}, {hi:.4f}]"
        pci = "—" if math.isnan(plo) else f"[{plo:.2f}, {phi:.2f}]"
        runs = f"{r['runs']}" + ("" if r["runs"] == r["runs_planned"] else f"/{r['runs_planned']}")
        cells = [r["variant"]] + ([r["grid"]] if grid else []) + [
            runs, f"{_num(r['valid_loss_mean'], '.4f')} ± {_num(r['valid_loss_std'], '.4f')}", ci,
            f"{_num(r['valid_ppl_mean'], '.2f')} ± {_num(r['valid_ppl_std'], '.2f')}", pci,
            _num(r["tokens_per_s_mean"], ",.0f"), _num(r["gini_mean"], ".3f"),
            _num(r["dead_experts_mean"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: List[Dict[str, Any]], tokens_per_step: int, path: str, title: str) -> None:
    """Validation loss against tokens, one line per row: the mean over seeds at the steps
    every seed logged, with the 95% CI band."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the ablation plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for row in rows:
        curves = [dict(map(tuple, c)) for c in row["curves"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_std_ci([c[s] for c in curves]) for s in steps]
        x = [s * tokens_per_step / 1e3 for s in steps]
        mean = [m for m, _, _ in stats]
        label = row["variant"] + ("" if row["grid"] == "base" else f" {row['grid']}")
        line, = ax.plot(x, mean, marker="o", markersize=3, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, [m - ci for m, _, ci in stats], [m + ci for m, _, ci in stats],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(runs: List[Run], facts: Dict[str, Any], out_dir: str, title: str) -> List[Dict]:
    summaries = {}
    for run in runs:
        s = read_json(os.path.join(run.run_dir, DONE))
        if s is not None:
            summaries[run.run_id] = s
    rows = aggregate(runs, summaries)
    write_text_atomic(os.path.join(out_dir, "results.csv"), results_csv(rows))
    write_text_atomic(os.path.join(out_dir, "runs.csv"),
                      runs_csv([summaries[r.run_id] for r in runs if r.run_id in summaries]))
    write_text_atomic(os.path.join(out_dir, "results.md"), results_markdown(rows, title))
    if summaries:
        plot_curves(rows, facts["tokens_per_step"], os.path.join(out_dir, "valid_curves.png"),
                    title)
    return rows


# ----------------------------------------------------------------------------- main
def check_out_dir(runs: List[Run], config: str) -> Tuple[List[Run], List[Run]]:
    """(finished, to run). A run directory of other settings stops the runner, naming it."""
    finished, todo = [], []
    for run in runs:
        fp = fingerprint(config, run)
        info = read_json(os.path.join(run.run_dir, RUN_INFO))
        if info is not None and info.get("fingerprint") != fp:
            raise ValueError(f"{run.run_dir} holds a run with other settings (its run.json "
                             "differs from this grid's): use another --out, or remove it")
        done = read_json(os.path.join(run.run_dir, DONE))
        if done is not None:
            finished.append(run)
            continue
        kill_leftover(run.run_dir)
        os.makedirs(run.run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run.run_dir, RUN_INFO),
                          {"fingerprint": fp, "config": config, "overrides": list(run.overrides)})
        todo.append(run)
    return finished, todo


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--config", default=None, help="run recipe YAML (model: + train:)")
    p.add_argument("--out", required=True, help="output directory (runs, tables, plot)")
    p.add_argument("--kinds", nargs="+", default=["dense", "moe", "moc", "moc_v1"],
                   help="model kinds and/or --variant names (default: dense moe moc moc_v1)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[],
                   metavar="SECTION.KEY=VALUE", help="overrides for every run")
    p.add_argument("--grid", nargs="+", action="extend", default=[],
                   metavar="SECTION.KEY=V1,V2", help="a grid axis (× every kind and seed)")
    p.add_argument("--variant", nargs="+", action="append", default=[],
                   metavar="NAME KIND [SECTION.KEY=VALUE]",
                   help="a named variant of KIND with its own overrides")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--train-iters", type=int, default=None, help="steps per run")
    budget.add_argument("--tokens", type=int, default=None,
                        help="token budget per run (→ steps = tokens / (global batch × seq))")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--gpus", default="", help="comma-separated device ids, split over --jobs")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the tables and plot from the finished runs, start nothing")
    ns = p.parse_args(argv)
    import warnings

    # Megatron warns at import about optional fused kernels; the runs' logs have them.
    warnings.filterwarnings("ignore", category=UserWarning)

    grid_file = os.path.join(ns.out, "ablation.json")
    try:
        if ns.report_only and ns.config is None:  # the grid of the last invocation
            saved = read_json(grid_file)
            if saved is None:
                raise ValueError(f"{grid_file} not found: give the grid's arguments")
            ns = argparse.Namespace(**{**vars(ns), **saved, "report_only": True})
        if ns.config is None:
            raise ValueError("--config is required")
        gpus = [g for g in ns.gpus.split(",") if g]
        if gpus and len(gpus) < ns.jobs * ns.nproc:
            raise ValueError(f"--gpus {ns.gpus}: {ns.jobs} jobs × {ns.nproc} ranks need "
                             f"{ns.jobs * ns.nproc} devices")
        runs, facts = plan_runs(ns.config, ns.out, ns.kinds, ns.seeds, ns.sets, ns.grid,
                                ns.variant, ns.train_iters, ns.tokens)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(ns.out, exist_ok=True)
    title = (f"{os.path.basename(ns.config)}: {facts['steps']} steps × "
             f"{facts['tokens_per_step']:,} tokens = "
             f"{facts['steps'] * facts['tokens_per_step']:,} tokens per run")
    if ns.report_only:
        write_report(runs, facts, ns.out, title)
        print(f"report: {os.path.join(ns.out, 'results.md')}")
        return 0
    write_json_atomic(grid_file, {k: getattr(ns, k) for k in (
        "config", "kinds", "seeds", "sets", "grid", "variant", "train_iters", "tokens")})
    try:
        finished, todo = check_out_dir(runs, ns.config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for run in finished:
        print(f"skip   {run.run_id} (done.json: finished earlier)", flush=True)
    print(f"{len(runs)} runs: {len(finished)} finished, {len(todo)} to run, {ns.jobs} at a "
          f"time; {facts['steps']} steps × {facts['tokens_per_step']:,} tokens each", flush=True)
    failed = execute(todo, ns.config, facts, ns.out, ns.jobs, gpus, ns.nproc,
                     on_done=lambda: write_report(runs, facts, ns.out, title))
    write_report(runs, facts, ns.out, title)
    print(f"tables: {os.path.join(ns.out, 'results.md')} {os.path.join(ns.out, 'results.csv')}"
          f" | plot: {os.path.join(ns.out, 'valid_curves.png')}", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (run the command again to "
              "retry them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
