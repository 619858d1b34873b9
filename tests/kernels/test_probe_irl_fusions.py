"""tools/probe_irl_fusions.py: its IRL steps are the model's (soft mode, the weight-gradient
chain), and each kernel is charged to the expert MLP or to the work around it."""

import pytest
import torch

from kernels.expert_mlp import expert_swiglu_mlp_reference
from megatron_moc.model.norm import rms_norm
from tools import bench_grouped_gemm as bgg
from tools import probe_irl_fusions as probe


def _inputs(device, e=3, d=24, f=40, p=37):
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 11, 11, 30], device=device)   # an empty expert, a tail of 7
    mk = lambda *s: torch.randn(*s, generator=g).to(device)   # noqa: E731
    return (mk(p, d), 1 + 0.1 * mk(p, d), torch.rand(p, 2, generator=g).to(device),
            mk(e, d, 2 * f) / d ** 0.5, mk(e, f, d) / f ** 0.5, offsets)


def test_irl_steps_match_the_spec(device):
    x, norm_w, act, w13, w2, off = _inputs(device)
    leaves = [t.requires_grad_() for t in (x, norm_w, act, w13, w2)]
    got = probe.irl_steps(x, norm_w, act, w13, w2, off, 2)
    got.square().sum().backward()
    got_grads = [t.grad.clone() for t in leaves]
    d64 = [t.detach().double().requires_grad_() for t in leaves]
    h = d64[0]
    for s in range(2):   # MOC_MATH.md §3, alpha = 1/sqrt(2)
        z = rms_norm(h + d64[0], d64[1], probe.EPS)
        h = h + d64[2][:, s:s + 1] / 2 ** 0.5 * expert_swiglu_mlp_reference(z, d64[3], d64[4],
                                                                             off)
    h.square().sum().backward()
    torch.testing.assert_close(got.double(), h, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(("x", "norm_w", "activity", "w13", "w2"), got_grads, d64):
        torch.testing.assert_close(a.double(), b.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_kernels_charged_to_their_part(monkeypatch):
    fake = {"_gmm_tma_kernel": (4.0, 30.0), "_wgrad_ws_kernel": (2.0, 20.0),
            "_swiglu_bwd_kernel": (2.0, 5.0), "triton_poi_fused_add_mul_8": (1.0, 3.0),
            "triton_per_fused_mean_mul_pow_rsqrt": (2.0, 2.0)}
    monkeypatch.setattr(probe, "kernel_times", lambda fn, iters: fake)
    monkeypatch.setattr(probe, "setup", lambda shape, p, steps: (lambda mode: None, []))
    monkeypatch.setattr(bgg, "DEV", "cpu")
    res = probe.probe((2, 8, 8), 16, 2, 1, ["eager"])["modes"]["eager"]
    assert (res["expert_us"], res["around_us"]) == (55.0, 5.0)
