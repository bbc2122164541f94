"""The single-row GEMV (engine/fused_kernels.py) against cuBLAS on the Llama-2-7B projections, over a sweep of
launch settings: where gemv_triton's settings come from. Every weight is cycled through several copies, so the L2
cache never holds it (as in a decode step, where each layer's weights are read once).

    python bench/gemv_tune.py          # on a GPU; prints, per projection, cuBLAS and the 8 best settings
"""
import itertools, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, torch.nn.functional as F
import triton
from engine.fused_kernels import _gemv_kernel


def gemv_triton(x, weight, silu_mul, block_n, block_k, num_warps, num_stages):
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    n = weight.shape[0]
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, weight, out, n, k, weight.stride(0), BLOCK_N=block_n,
                                             BLOCK_K=block_k, EVEN_K=k % block_k == 0, HAS_BIAS=False,
                                             SILU_MUL=silu_mul, num_warps=num_warps, num_stages=num_stages)
    return out

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
    bw_copy = None
    x4 = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda"); y4 = torch.empty_like(x4)
    for _ in range(3): y4.copy_(x4)
    torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record(); [y4.copy_(x4) for _ in range(5)]; e.record(); e.synchronize()
    bw_copy = 2 * x4.numel() * 5 / (s.elapsed_time(e) / 1e3); del x4, y4
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
                got = gemv_triton(x, ws[0], silu_mul=silu, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                t = bench([lambda w=w: gemv_triton(x, w, silu_mul=silu, block_n=bn, block_k=bk, num_warps=nw,
                                                    num_stages=ns) for w in ws])
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
