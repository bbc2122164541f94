"""The single-row GEMV (engine/fused_kernels.py) against cuBLAS on the Llama-2-7B projections, over a sweep of
launch settings: where gemv_triton's settings come from. Every weight is cycled through several copies, so the L2
cache never holds it (as in a decode step, where each layer's weights are read once).

    python bench/gemv_tune.py          # on a GPU; prints, per projection, cuBLAS and the 8 best settings
"""
import itertools, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, torch.nn.functional as F
from engine.fused_kernels import launch_gemv
from peers_gpu import ceilings

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}
dt = torch.bfloat16


def bench(fn_list, reps=20):
    # fn_list: callables over rotating weight copies (so L2 never holds the weight)
    g = torch.cuda.CUDAGraph()
    for f in fn_list: f()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fn_list: f()
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); g.replay(); e.record(); e.synchronize()
    return s.elapsed_time(e) * 1e3 / (reps * len(fn_list))


def main():
    bw_copy, _ = ceilings()
    print(f"{torch.cuda.get_device_name()} copy {bw_copy/1e12:.2f} TB/s")
    configs = [c for c in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8), (1, 3))
               if c[0] * c[1] <= 16384 and c[0] * c[1] >= 1024]
    for name, (n, k) in SHAPES.items():
        copies = max(2, (400 << 20) // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=dt) for _ in range(copies)]
        silu = name == "down"
        x = torch.randn(1, 2 * k if silu else k, device="cuda", dtype=dt)
        xin = (F.silu(x[:, :k].float()) * x[:, k:].float()).to(dt) if silu else x
        ideal = n * k * 2 / bw_copy * 1e6
        ref = [lambda w=w: F.linear(xin, w) for w in ws]
        t_ref = bench(ref)
        want = F.linear(xin, ws[0]).float()
        results = []
        for bn, bk, nw, ns in configs:
            try:
                got = launch_gemv(x, ws[0], None, silu, bn, bk, nw, ns)
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                t = bench([lambda w=w: launch_gemv(x, w, None, silu, bn, bk, nw, ns) for w in ws])
                results.append((t, bn, bk, nw, ns, err))
            except Exception as exc:
                print(name, bn, bk, nw, ns, "failed", type(exc).__name__, str(exc)[:100])
        results.sort()
        print(f"== {name} N={n} K={k}: ideal {ideal:.1f} us, cuBLAS {t_ref:.1f} us ({ideal/t_ref:.2f} of copy rate)")
        for t, bn, bk, nw, ns, err in results[:8]:
            print(f"  bn={bn} bk={bk} warps={nw} stages={ns}: {t:.1f} us ({ideal/t:.2f}) err {err:.1e}")
        del ws
        torch.cuda.empty_cache()


main()
