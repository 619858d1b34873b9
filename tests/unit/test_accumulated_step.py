"""Gradient accumulation of one training step (training/cuda_graph.py `accumulated_step`, the
step GraphedTrainStep captures) and its plumbing in tools/bench_throughput.py, on the CPU."""

import pytest
import torch

from megatron_moc.training.cuda_graph import accumulated_step


def _quadratic_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)
                               ).double()


def _loss_fn(model):
    return lambda x, y: ((model(x).squeeze(-1) - y) ** 2).mean()


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_accumulation_is_one_step_on_the_mean_loss(max_grad_norm):
    """N micro-batches, loss_i / N each, one clip and one SGD step == one step on the whole
    batch (equal micro-batches: the mean of the means is the mean). A step per micro-batch,
    a missing 1/N or the same micro-batch N times all land elsewhere."""
    num_micro, micro = 3, 4
    x = torch.randn(num_micro, micro, 5, dtype=torch.float64)
    y = torch.randn(num_micro, micro, dtype=torch.float64)
    ours, whole = _quadratic_model(), _quadratic_model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    loss = accumulated_step(_loss_fn(ours), (x, y), list(ours.parameters()), opt, max_grad_norm)

    whole_loss = _loss_fn(whole)(x.reshape(-1, 5), y.reshape(-1))
    grads = torch.autograd.grad(whole_loss, list(whole.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, max_grad_norm / (norm.item() + 1e-6)) if max_grad_norm > 0 else 1.0
    if max_grad_norm > 0:
        assert scale < 0.5, "the case must clip"
    torch.testing.assert_close(loss, whole_loss.detach(), rtol=1e-12, atol=1e-12)
    for p, p0, g in zip(ours.parameters(), whole.parameters(), grads):
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.detach(), p0.detach() - 0.5 * scale * g,
                                   rtol=1e-10, atol=1e-12)


def test_inputs_must_share_the_micro_batch_dim():
    model = _quadratic_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="leading micro-batch dim"):
        accumulated_step(_loss_fn(model), (torch.randn(2, 3, 5, dtype=torch.float64),
                                           torch.randn(3, 3, dtype=torch.float64)),
                         list(model.parameters()), opt)


def test_bench_counts_every_micro_batch(megatron_world, monkeypatch):
    """tools/bench_throughput.py --grad-accum: N micro-batches of their own tokens per step,
    tok/s over N × micro × seq tokens, grad_accum in the row."""
    import tools.bench_throughput as bench_tool
    from megatron_moc.parallel.cpu_compat import seed_everything

    seed_everything(0)   # as the tool's main: Megatron's RNG tracker (weight init) needs it
    seen = []
    real_build = bench_tool.build_ours

    def build_ours(args, kind):
        cfg, model, opt, loss_fn, extra = real_build(args, kind)

        def counting_loss(ids, labels):
            seen.append(ids.clone())
            return loss_fn(ids, labels)

        return cfg, model, opt, counting_loss, extra

    monkeypatch.setattr(bench_tool, "build_ours", build_ours)
    p = bench_tool.argparse.Namespace(
        impl="ours", preset="tiny", backend="auto", mediator_backend="auto", compile=False,
        cuda_graph=False,
        recompute="none", research_ckpt="none", seq=16, steps=2, warmup=1, device="cpu",
        profile=None, peak_tflops=989.0, grad_accum=3)
    row = bench_tool.bench(p, "moe", micro_batch=2)
    assert row["grad_accum"] == 3
    assert len(seen) == 3 * (1 + 2)                    # (warmup + steps) × N micro-batches
    assert all(ids.shape == (2, 16) for ids in seen)
    assert not torch.equal(seen[0], seen[1])           # each micro-batch its own tokens
    assert row["tokens_per_s"] == pytest.approx(3 * 2 * 16 / (row["step_ms"] / 1e3))
