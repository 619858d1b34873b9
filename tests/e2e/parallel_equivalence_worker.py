"""Many ranks compute what one process computes: the worker behind test_expert_parallel.py.

    python parallel_equivalence_worker.py reference OUT --dp D [--kind K] [--drops]
        one process, EP = TP = 1: for D micro-batches (one per data-parallel rank of the parallel
        run) the logits and losses, and the gradients of their mean (what data parallelism
        averages to). Saves weights, data and results to OUT.
    torchrun --nproc_per_node W parallel_equivalence_worker.py parallel OUT --tp T --ep E
        W ranks with TP = T (+ sequence parallel), EP = E, DP = W / T: loads the reference's
        weights sliced to this rank (TP partition of Megatron's params, this EP rank's
        experts), runs its DP rank's micro-batch, reduces gradients the way DeepSpeed ZeRO does
        (non-expert: mean over DP; expert: sum over expert-data-parallel / DP), and compares
        logits, loss and every gradient with the reference (fp32, rtol 1e-5).
    torchrun --nproc_per_node 2 parallel_equivalence_worker.py zero _ --ep 2  (or a case zero:2)
        the expert all-to-all alone where EP rank 1 receives no rows at all and, in a second
        call, where rank 1 sends none (every pair dropped): output and gradients against
        one process running all experts on the same rows.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

BATCH, SEQ, VOCAB = 2, 16, 512


def make_config(kind: str, drops: bool, tp: int = 1, ep: int = 1):
    from megatron_moc.config import tiny_config

    extra = dict(moc_model_kind=kind)
    if kind == "moe":
        extra.update(moc_irl_steps=1)
    if kind == "moc":
        extra.update(moc_irl_steps=2, moc_collab_rounds=2, moc_step_penalty_coeff=0.01,
                     moc_round_penalty_coeff=0.01, moc_gate_entropy_coeff=0.05)
    return tiny_config(num_moe_experts=8, moe_router_topk=2, vocab_size=VOCAB,
                       moc_capacity_factor=1.0 if drops else -1.0,
                       moc_drop_loss_coeff=0.01, moe_z_loss_coeff=1e-3,
                       tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                       sequence_parallel=tp > 1, moc_expert_backend="grouped_mm", **extra)


def make_batches(dp: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (dp, BATCH, SEQ + 1), generator=g)
    return ids[..., :-1].contiguous(), ids[..., 1:].contiguous()


def forward(model, tokens, labels):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, pos, None)
    total, ce, aux = model.lm_loss(tokens, labels, None, pos)
    return logits, total


def reference(out: str, dp: int, kind: str, drops: bool) -> None:
    from megatron_moc.model.gpt import build_model
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat
    from megatron_moc.parallel.groups import init_single_process

    enable_cpu_compat()
    init_single_process()
    torch.manual_seed(1234)
    cfg = make_config(kind, drops)
    model = build_model(cfg)
    tokens, labels = make_batches(dp)
    logits, losses = [], []
    for d in range(dp):
        lg, loss = forward(model, tokens[d], labels[d])
        logits.append(lg.detach())
        losses.append(loss)
    torch.stack(losses).mean().backward()
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()
                          if not k.endswith("_extra_state")},
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                "logits": torch.stack(logits), "losses": torch.stack(losses).detach(),
                "tokens": tokens, "labels": labels, "kind": kind, "drops": drops}, out)


def parallel(ref_path: str, tp: int, ep: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_moc.model.gpt import build_model
    from megatron_moc.parallel import groups
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat, seed_everything
    from megatron_moc.training.checkpoint_reader import local_slices

    enable_cpu_compat()
    groups.destroy_groups() if dist.is_initialized() else None
    groups.build_groups(tp, ep, backend="gloo")
    seed_everything(99)  # a different init: the reference weights must replace all of it
    ref = torch.load(ref_path, weights_only=True)
    cfg = make_config(ref["kind"], ref["drops"], tp, ep)
    model = build_model(cfg)
    # This rank's slices of the full weights and gradients: the trainer's own slicing
    # (train.init_from / Stage II), so this test covers it too.
    weights, ref_grads = local_slices(ref["state"], model), local_slices(ref["grads"], model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            assert weights[name].shape == p.shape, (name, weights[name].shape, p.shape)
            p.copy_(weights[name])

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tokens, labels = ref["tokens"][dp_rank], ref["labels"][dp_rank]
    logits, loss = forward(model, tokens, labels)
    loss.backward()
    ref_logits = ref["logits"][dp_rank]
    if tp > 1:
        ref_logits = torch.chunk(ref_logits, tp, dim=-1)[ps.get_tensor_model_parallel_rank()]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), ref["losses"][dp_rank], rtol=1e-5, atol=1e-6)

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=ps.get_data_parallel_group())
    torch.testing.assert_close(mean_loss / dp, ref["losses"].mean(), rtol=1e-5, atol=1e-6)
    for name, p in params.items():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "allreduce", True) is False:
            if ep < dp:
                dist.all_reduce(g, group=groups.expert_data_parallel_group(ep))
        else:
            dist.all_reduce(g, group=ps.get_data_parallel_group())
        g /= dp
        expected = ref_grads[name]
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"rank {dist.get_rank()} grad {name}: {m}")
    kept = [l.last_stats.kept_hist for l in model.moc_layers()]
    kept = torch.stack(kept).sum(0).tolist() if kept else "-"
    print(f"rank {dist.get_rank()} OK: tp {tp} ep {ep} dp {dp} loss {loss.item():.6f} "
          f"kept pairs per expert {kept}", flush=True)


def zero_rows(ep: int) -> None:
    from megatron_moc.moc.experts import IRLExperts
    from megatron_moc.parallel import groups
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat
    from megatron_moc.parallel.expert_parallel import run_experts_all_to_all

    enable_cpu_compat()
    groups.destroy_groups() if dist.is_initialized() else None
    groups.build_groups(1, ep, backend="gloo")
    rank = dist.get_rank()
    cfg = make_config("moc", drops=True)
    E, D = cfg.num_moe_experts, cfg.hidden_size
    torch.manual_seed(5)
    full = IRLExperts(cfg, E)                      # every expert, same init on every rank
    torch.manual_seed(5)
    local = IRLExperts(cfg, E, expert_parallel=ep)  # this rank's E / EP of them
    for name, p in local.named_parameters():
        torch.testing.assert_close(p, getattr(full, name)[local.first_expert:][:p.shape[0]])
    g = torch.Generator().manual_seed(11 + rank)
    cases = {
        # Every row goes to experts of EP rank 0: rank 1 receives nothing.
        "rank 1 receives no rows": torch.randint(0, E // ep, (12,), generator=g),
        # Rank 1 sends nothing (all its pairs dropped); rank 0 sends to every expert.
        "rank 1 sends no rows": (torch.randint(0, E, (12,), generator=g) if rank == 0
                                 else torch.empty(0, dtype=torch.long)),
    }
    for case, expert_rows in cases.items():
        expert_rows = expert_rows.sort().values
        kept = expert_rows.numel()
        dropped = 3
        x = torch.randn(kept + dropped, D, generator=g, requires_grad=True)
        counts = torch.bincount(expert_rows, minlength=E)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        expert_P = torch.cat([expert_rows, torch.zeros(dropped, dtype=torch.long)])
        h, steps, ent = run_experts_all_to_all(local, x, offsets, groups.expert_parallel_group(ep),
                                               gate_entropy=True)
        (h.square().sum() + steps.sum() + ent.sum()).backward()
        x_ref = x.detach().clone().requires_grad_(True)
        h_ref, steps_ref = full(x_ref, expert_P, offsets)
        kept_P = torch.arange(kept + dropped) < kept
        h_ref = torch.where(kept_P.unsqueeze(-1), h_ref, 0)
        steps_ref = steps_ref * kept_P
        ent_ref = full.gate_entropy(x_ref, expert_P) * kept_P
        (h_ref.square().sum() + steps_ref.sum() + ent_ref.sum()).backward()
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(steps, steps_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        # Expert weight grads: this rank's slice of the full grads summed over the EP ranks.
        for name, p in local.named_parameters():
            ref_grad = getattr(full, name).grad.clone()
            dist.all_reduce(ref_grad)
            torch.testing.assert_close(p.grad, ref_grad[local.first_expert:][:p.shape[0]],
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} {name}: {m}")
            p.grad = None
            getattr(full, name).grad = None
        print(f"rank {rank} OK: {case} (sent {kept} rows)", flush=True)


def logits_from_checkpoint(save_dir: str, out: str, ep: int) -> None:
    """Load the newest checkpoint of `save_dir` at expert-parallel size `ep` through the
    trainer's own path (DeepSpeed engine + training/checkpoint.py) and save rank 0's logits on
    a fixed batch, plus the LR the schedule is at."""
    import yaml

    from megatron_moc.config import MoCConfig
    from megatron_moc.model.gpt import build_model
    from megatron_moc.parallel import groups
    from megatron_moc.parallel.cpu_compat import enable_cpu_compat, seed_everything
    from megatron_moc.training import checkpoint as ckpt
    from megatron_moc.training.engine import load_ds_config, setup_engine
    from megatron.core import parallel_state as ps

    enable_cpu_compat()
    groups.build_groups(1, ep, backend="gloo")
    seed_everything(3)
    tag = ckpt.find_checkpoint(save_dir)
    with open(os.path.join(save_dir, tag, "config.yaml")) as f:
        values = yaml.safe_load(f)
    with open(os.path.join(save_dir, tag, "recipe.yaml")) as f:
        train = yaml.safe_load(f)["train"]
    values["expert_model_parallel_size"] = ep
    cfg = MoCConfig(**values, params_dtype=torch.float32, use_cpu_initialization=True)
    model = build_model(cfg)
    dp = ps.get_data_parallel_world_size()  # batch sizes do not matter for loading
    ds_config, _ = load_ds_config(os.path.join(ROOT, train["ds_config"]), 1, dp, dp,
                                  train["clip_grad"])
    engine = setup_engine(model, ds_config, train["lr"], train["min_lr"], train["warmup_iters"],
                          train["train_iters"], train["weight_decay"])
    state = ckpt.load_checkpoint(engine, save_dir, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).unsqueeze(0).expand_as(tokens)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, pos, None)
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "step": state["step"],
                    "lr": engine.optimizer.param_groups[0]["lr"]}, out)
    print(f"rank {dist.get_rank()} OK: loaded {tag} at EP {ep}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["reference", "parallel", "zero", "logits"])
    ap.add_argument("--out", default=None)
    ap.add_argument("path", help="reference file; for `parallel`, REF:TP:EP[,REF:TP:EP...] "
                    "runs the cases one after another in the same ranks")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--kind", default="moc")
    ap.add_argument("--drops", action="store_true")
    args = ap.parse_args()
    if args.mode == "reference":
        for case in args.path.split(","):  # OUT[:DP:KIND:drops] ..., one process for all
            out, dp, kind, drops = (case.split(":") + [None] * 3)[:4]
            reference(out, int(dp or args.dp), kind or args.kind,
                      args.drops if drops is None else drops == "drops")
    elif args.mode == "logits":
        logits_from_checkpoint(args.path, args.out, args.ep)
    elif args.mode == "zero":
        zero_rows(args.ep)
    else:
        for case in args.path.split(","):  # REF:TP:EP or zero:EP
            if case.startswith("zero:"):
                zero_rows(int(case.split(":")[1]))
                continue
            ref, tp, ep = case.rsplit(":", 2) if case.count(":") >= 2 else (case, args.tp, args.ep)
            parallel(ref, int(tp), int(ep))


if __name__ == "__main__":
    main()
