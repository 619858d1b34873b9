"""Compile the warp-specialized Gluon GEMM for sm90 on a machine without a GPU.

Gluon kernels do not run in the CPU interpreter, but Triton's compiler (and the ptxas it
bundles) does not need a GPU: this installs a compile-only driver that names an sm90 target,
compiles every config of kernels/grouped_gemm_ws.py and kernels/grouped_gemm_ws_wgrad.py down
to a cubin, and prints its registers, local-memory spills and shared memory. It fails (exit 1) on a compile error, a
spill or a config over Hopper's 227 KiB of shared memory, so a Triton upgrade that changes
the Gluon API (3.7 renamed the TMA copies) shows up in CI, not on the cluster.

    python tools/compile_sm90.py            # one config per kind (the CI check)
    python tools/compile_sm90.py --all      # every config in the autotune lists
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_sm90: unset TRITON_INTERPRET (it replaces the compiler)")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch                                                   # noqa: E402
import triton                                                  # noqa: E402
from triton.backends.compiler import GPUTarget                 # noqa: E402
from triton.backends.driver import DriverBase                  # noqa: E402

SMEM_LIMIT = 227 * 1024


class CompileOnlyDriver(DriverBase):
    """Just enough of a CUDA driver for `JITFunction.warmup`: an sm90 target, device 0,
    stream 0. Nothing is ever launched."""

    @staticmethod
    def is_active():
        return True

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing runs")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("compile-only driver: nothing runs")

    def clear_cache(self, cache):
        pass


def _usage(cubin: bytes) -> dict:
    """Registers and local memory per thread of a cubin (cuobjdump -res-usage)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    path = f"/tmp/compile_sm90_{os.getpid()}.cubin"
    with open(path, "wb") as fh:
        fh.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.remove(path)
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|LOCAL):(\d+)", out)}


def compile_ws(epilogue: int, trans: bool, cfg: tuple, e=8, k=768, f=2048, p=4096,
               shift=1) -> dict:
    """Compile one config of the WS kernel; returns regs, local (spill bytes), smem.
    shift: END_SHIFT, 1 for plain offsets, e + 1 for segments (kernels/row_segments.py)."""
    from kernels import grouped_gemm_tma as tma
    from kernels import grouped_gemm_ws as ws
    bf = torch.bfloat16
    n = f if epilogue in (1, 2) else 2 * f     # 2: the W2 dgrad, dh [P, F] in registers
    a = torch.empty(p, k, dtype=bf)
    if epilogue == 1:
        w = torch.empty(e, k, 2 * f, dtype=bf)
    else:
        w = torch.empty(e, n, k, dtype=bf) if trans else torch.empty(e, k, n, dtype=bf)
    c = torch.empty(p, 2 * f if epilogue == 2 else n, dtype=bf)   # 2: d(gate | up)
    pre = torch.empty(p, 2 * f, dtype=bf)
    offsets = torch.zeros(e + 1, dtype=torch.int64)
    kw = dict(ws.config(*cfg).all_kwargs())
    descs = dict(a_desc=ws._desc(a), b_desc=ws._desc(tma.weights_2d(w)), c_desc=ws._desc(c))
    ws._size_blocks(dict(kw, B_TRANS=trans, **descs))
    kernel = ws._gmm_ws_kernel.warmup(
        descs["a_desc"], descs["b_desc"], descs["c_desc"], c, pre, offsets, shift, n, k, e,
        c.stride(0), pre.stride(0), p, B_TRANS=trans, EPILOGUE=epilogue,
        STORE_PRE=epilogue == 1, grid=(1,), **kw)
    return dict(_usage(kernel.asm["cubin"]), smem=kernel.metadata.shared, ptx=kernel.asm["ptx"])


def compile_wgrad_ws(accumulate: bool, cfg: tuple, e=8, k=768, n=2048, p=4096,
                     two=False, shift=1) -> dict:
    """Compile one config of the WS wgrad kernel (kernels/grouped_gemm_ws_wgrad.py); two:
    with a second segment of rows (launch_wgrad_pair); shift: both END_SHIFTs."""
    from kernels import grouped_gemm_ws as ws
    from kernels import grouped_gemm_ws_wgrad as wsw
    bf = torch.bfloat16
    a, dy = torch.empty(p, k, dtype=bf), torch.empty(p, n, dtype=bf)
    c = torch.empty(e, k, n, dtype=torch.float32 if accumulate else bf)
    offsets = torch.zeros(e + 1, dtype=torch.int64)
    kw = dict(wsw.config(*cfg).all_kwargs())
    descs = dict(a_desc=ws._desc(a), b_desc=ws._desc(dy), c_desc=wsw.c_descriptor(c),
                 a2_desc=ws._desc(a), b2_desc=ws._desc(dy))
    wsw._size_blocks(dict(kw, c_ptr=c, **descs))
    kernel = wsw._wgrad_ws_kernel.warmup(
        descs["a_desc"], descs["b_desc"], descs["c_desc"], descs["a2_desc"], descs["b2_desc"],
        c, c, offsets, offsets, shift, shift, k, n, e, c.stride(0), c.stride(1), p, TWO=two,
        ACCUMULATE=accumulate, grid=(1,), **kw)
    return dict(_usage(kernel.asm["cubin"]), smem=kernel.metadata.shared, ptx=kernel.asm["ptx"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every config, not one per kind")
    args = ap.parse_args(argv)
    from triton.runtime import driver
    driver.set_active(CompileOnlyDriver())
    from kernels import grouped_gemm_ws as ws
    if ws.gluon is None:
        print("compile_sm90: this Triton has no Gluon; nothing to check")
        return 0
    plain = ws.CONFIGS if args.all else ws.CONFIGS[:1] + ws.CONFIGS[-1:]
    swiglu = ws.SWIGLU_CONFIGS if args.all else ws.SWIGLU_CONFIGS[:1] + ws.SWIGLU_CONFIGS[-1:]
    swiglu_bwd = (ws.SWIGLU_BWD_CONFIGS if args.all
                  else ws.SWIGLU_BWD_CONFIGS[:1] + ws.SWIGLU_BWD_CONFIGS[-1:])
    from kernels import grouped_gemm_ws_wgrad as wsw
    wgrad = wsw.CONFIGS if args.all else wsw.CONFIGS[:1] + wsw.CONFIGS[-1:]
    jobs = ([(f"epilogue 0 trans 0 {c}", compile_ws, (0, False, c)) for c in plain]
            + [(f"epilogue 0 trans 1 {c}", compile_ws, (0, True, c)) for c in plain]
            + [(f"epilogue 1 trans 0 {c}", compile_ws, (1, False, c)) for c in swiglu]
            + [(f"epilogue 2 trans 1 {c}", compile_ws, (2, True, c)) for c in swiglu_bwd]
            + [(f"wgrad accumulate {int(acc)} {c}", compile_wgrad_ws, (acc, c))
               for c in wgrad for acc in (False, True)]
            + [(f"wgrad pair accumulate {int(acc)} {c}", compile_wgrad_ws,
                (acc, c, 8, 768, 2048, 4096, True)) for c in wgrad for acc in (False, True)]
            # hard IRL mode's segments (a runtime END_SHIFT, not the specialized 1)
            + [(f"segments epilogue {ep} trans {int(tr)} {c}", compile_ws,
                (ep, tr, c, 8, 768, 2048, 4096, 9))
               for ep, tr, c in ((0, False, plain[0]), (1, False, swiglu[0]),
                                 (0, True, plain[0]))]
            + [(f"segments wgrad pair {wgrad[0]}", compile_wgrad_ws,
                (False, wgrad[0], 8, 768, 2048, 4096, True, 9))])
    bad = 0
    print(f"triton {triton.__version__}, target sm90")
    for name, compile_one, job in jobs:
        try:
            r = compile_one(*job)
        except Exception as err:   # a compile error: report it, keep checking the rest
            print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[-1][:300]}")
            bad += 1
            continue
        ok = r["local"] == 0 and r["smem"] <= SMEM_LIMIT
        bad += not ok
        print(f"{name}: regs {r['reg']} spill bytes {r['local']} smem {r['smem']}"
              f"{'' if ok else '  <-- over the limit'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
