"""Training logs: console progress (tokens/s, MFU, ETA), TensorBoard, optional W&B, routing.

FLOPs are counted in one place, `model_flops_per_token`: 6 × the matmul parameters a token
touches (forward 2, backward 4), where an expert or FFN run S times by the Iterative Reasoning
Loop counts S times and each mediator round counts once per round, plus the attention
score / value products (12 · L · seq · D, the PaLM convention: full, not causal-halved).

Routing diagnostics (MOC_MATH.md §1–§5) are accumulated on the device at every micro-batch
(no host sync) and read back once per log interval, all-reduced over data parallel.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from typing import Dict, List, Optional

import torch

# Dense bf16 peak TFLOP/s per device, matched on torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "MI300X": 1307.4, "MI325": 1307.4,
               "MI355": 2300.0, "B200": 2250.0}


def model_flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of `cfg` at sequence length `seq_len`.

    Per layer, matmul parameters touched per token:
        attention   D·(D + 2·kv) + D·D                      (QKV, output projection)
        dense/IRL   S · 3·D·F                               (SwiGLU: W13 is D×2F, W2 is F×D)
        MoE/MoC     router D·E + K·S·3·D·F_moe + step gates K·E·(S+1)·D (all E gates are
                    evaluated for every row, as experts.py does) + o_proj D·D
        mediator    context D² + R · (q D² + k D² + v D² + 2·D² MLP + feedback D² + K·D gate
                    + 2·K·D scores / β-weighted states) + round gate D·(R+1) + fusion gate D;
                    k and v count once per round, not K times: mediator.py applies W_k to q
                    and W_v to Σ_k β_k e_k (same math, the products it executes)
        MoC v1      all E experts E·3·D·F, router and fusion attentions, W_r, FFN_c, o_proj
                    (`moc.v1.v1_flops_params_per_token`)
    plus the output projection D·V (tied embedding; the input lookup is free), and
    attention scores + values 2·seq·D per layer (as matmul-parameter equivalents).
    """
    D, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    kv = cfg.num_query_groups * cfg.head_dim
    S = cfg.moc_irl_steps
    attn = D * (D + 2 * kv) + D * D
    if cfg.moc_model_kind == "moc_v1":  # all E experts + two attentions (moc/v1.py)
        from megatron_moc.moc.v1 import v1_flops_params_per_token

        ffn = v1_flops_params_per_token(cfg)
    elif cfg.has_experts:
        E, K = cfg.num_moe_experts, cfg.moe_router_topk
        F = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        ffn = D * E + K * S * 3 * D * F + D * D
        if cfg.adaptive_steps_on:
            ffn += K * E * (S + 1) * D
        R = cfg.moc_collab_rounds if cfg.has_mediator else 0
        if R > 0:
            rank = cfg.moc_value_rank
            value = 2 * rank * D if 0 < rank < D else D * D
            per_round = D * D + D * D + value + 2 * D * D + 2 * K * D
            if cfg.moc_feedback:
                per_round += D * D + K * D + D
            ffn += D * D + R * per_round + D
            if cfg.adaptive_rounds_on:
                ffn += D * (R + 1)
    else:
        ffn = S * 3 * D * cfg.ffn_hidden_size
    matmul_params = L * (attn + ffn) + D * V
    attention_products = L * 2 * seq_len * D
    return 6.0 * (matmul_params + attention_products)


def peak_flops_per_device(override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of this device, or None when unknown (CPU): MFU is then omitted."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def gini(hist: torch.Tensor) -> float:
    """Gini coefficient of a load histogram: 0 = perfectly even, → 1 = one expert takes all."""
    x = hist.double().sort().values
    n, total = x.numel(), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    index = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (index * x).sum() / (n * total) - (n + 1) / n).clamp_min(0))


class RoutingMonitor:
    """Sums each MoC layer's RoutingStats over the micro-batches of a log interval, on device."""

    SCALARS = ("drop_rate", "router_entropy", "avg_steps", "avg_rounds", "mean_gamma",
               "step_gate_entropy", "round_gate_entropy", "gate_entropy_beta")

    def __init__(self, dead_window: int = 3):
        self.sums: Optional[List[torch.Tensor]] = None
        self.count = 0
        self.dead_window = dead_window
        self.history: List[deque] = []  # per layer: kept hists of the last intervals

    def update(self, stats_list) -> None:
        rows = []
        for st in stats_list:
            scalars = torch.stack([getattr(st, k).float().reshape(()) for k in self.SCALARS])
            rows.append(torch.cat([st.kept_hist.float(), st.requested_hist.float(), scalars]))
        if not rows:
            return
        if self.sums is None:
            self.sums = [r.detach().clone() for r in rows]
        else:
            for s, r in zip(self.sums, rows):
                s.add_(r.detach())
        self.count += 1

    def read(self, group=None) -> List[Dict[str, float]]:
        """Per-layer diagnostics of the interval (all-reduced over `group`), then reset."""
        if self.sums is None or self.count == 0:
            return []
        packed = torch.stack(self.sums)                              # [L, 2E + 5]
        count = torch.tensor([float(self.count)], device=packed.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed, group=group)
            torch.distributed.all_reduce(count, group=group)
        packed, n = packed.cpu(), float(count.item())
        num_scalars = len(self.SCALARS)
        E = (packed.shape[1] - num_scalars) // 2
        out = []
        while len(self.history) < packed.shape[0]:
            self.history.append(deque(maxlen=self.dead_window))
        for layer, row in enumerate(packed):
            kept, requested, scalars = row[:E], row[E:2 * E], row[2 * E:] / n
            hist = self.history[layer]
            hist.append(kept.clone())
            dead = (int((torch.stack(list(hist)).sum(0) == 0).sum())
                    if len(hist) == self.dead_window else 0)
            item = {"gini": gini(kept), "gini_requested": gini(requested), "dead_experts": dead}
            item.update({k: float(v) for k, v in zip(self.SCALARS, scalars)})
            out.append(item)
        self.sums, self.count = None, 0
        return out


class TrainLogger:
    """Console + TensorBoard (always) + W&B (when `wandb_project` is set; offline by default)
    + a JSON-lines record of every logged step (`<log_dir>/train_log.jsonl`). Rank 0 only."""

    def __init__(self, log_dir: str, tensorboard_dir: str, config: dict, train_iters: int,
                 wandb_project: Optional[str] = None, wandb_mode: str = "offline",
                 enabled: bool = True):
        self.enabled, self.train_iters = enabled, train_iters
        self.writer = self.wandb = self.jsonl = None
        self.t_last, self.step_last = time.time(), None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.jsonl = open(os.path.join(log_dir, "train_log.jsonl"), "a")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("train.wandb_project is set but wandb is not installed: "
                                  "pip install wandb (or unset wandb_project)") from None
            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, config=config,
                                    dir=log_dir)

    def start(self, step: int) -> None:
        self.t_last, self.step_last = time.time(), step

    def log_train(self, step: int, values: Dict[str, float], tokens_per_step: int,
                  flops_per_token: float, peak_flops: Optional[float], world_size: int,
                  routing: List[Dict[str, float]]) -> None:
        if not self.enabled:
            return
        now = time.time()
        steps = max(1, step - (self.step_last or 0))
        dt = max(1e-9, now - self.t_last)
        self.t_last, self.step_last = now, step
        tok_s = steps * tokens_per_step / dt
        values = dict(values, tokens_per_s=tok_s, step_time_s=dt / steps)
        mfu = None
        if peak_flops:
            mfu = tok_s * flops_per_token / (peak_flops * world_size)
            values["mfu"] = mfu
        eta = (self.train_iters - step) * dt / steps
        line = (f"step {step:>7}/{self.train_iters} | loss {values['loss']:.4f} | "
                f"ce {values['ce']:.4f} | aux {values['aux']:.4f} | lr {values['lr']:.3e} | "
                f"grad_norm {values.get('grad_norm', float('nan')):.3f} | "
                f"{tok_s:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"ETA {_fmt_seconds(eta)}")
        print(line, flush=True)
        for i, r in enumerate(routing):
            gate_h = (f" | gate H steps {r['step_gate_entropy']:.3f} rounds "
                      f"{r['round_gate_entropy']:.3f} beta {r['gate_entropy_beta']:.4f}"
                      if r.get("gate_entropy_beta") else "")
            print(f"    layer {i:>2}: gini {r['gini']:.3f} dead {r['dead_experts']} drop "
                  f"{r['drop_rate']:.3f} entropy {r['router_entropy']:.3f} steps "
                  f"{r['avg_steps']:.2f} rounds {r['avg_rounds']:.2f} gamma {r['mean_gamma']:.3f}"
                  f"{gate_h}", flush=True)
        flat = {f"train/{k}": v for k, v in values.items()}
        for i, r in enumerate(routing):
            flat.update({f"routing/layer{i:02d}/{k}": v for k, v in r.items()})
        self._write(step, flat)

    def log_eval(self, step: int, valid_ce: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(valid_ce, 50.0))
        print(f"validation at step {step}: loss {valid_ce:.4f} | perplexity {ppl:.2f}", flush=True)
        self._write(step, {"valid/loss": valid_ce, "valid/ppl": ppl})

    def _write(self, step: int, flat: Dict[str, float]) -> None:
        for k, v in flat.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)
        self.jsonl.write(json.dumps({"step": step, **flat}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s"


def unigram_entropy(prefix: str) -> float:
    """Entropy (nats/token) of the unigram distribution of `<prefix>.bin`: the loss of a model
    that ignores context, the baseline a trained LM must beat."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dtype = IndexedDataset(prefix).index.dtype
    data = np.memmap(prefix + ".bin", mode="r", dtype=dtype)
    counts = np.bincount(np.asarray(data), minlength=1).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
