"""GPU throughput: inferq against its peers on one workload (W256), plus a decode-step profile of inferq.

Peers: HF static-batch generate and transformers' continuous batching. Same workload for every system: N requests,
random prompt lengths and random max_new_tokens, on a random-weight Llama-shaped model (EOS disabled so every
request runs to its limit). Prints ceilings (copy bandwidth, bf16 matmul rate), a roofline for decode, the floor
of the workload, and a table (out tok/s, fraction of floor, ratio to each other system).

inferq runs first, with the HF model still on the GPU (its KV cache takes gpu_memory_utilization of the card, the
HF weights counted as used); it is then freed before the peers run. After the inferq run, a decode-step
microbenchmark (MICRO batch sizes, each request ~MICRO_CTX tokens of context) and a torch.profiler pass over
PROFILE_STEPS decode steps at PROFILE_BATCH.

    python bench/peers_gpu.py tinyllama-1.1b [N]              # N requests of W256 (default 256)
    PEERS=inferq,hf_static_b64 python bench/peers_gpu.py llama2-7b
    MICRO= PROFILE_BATCH=0 python bench/peers_gpu.py ...      # skip the microbenchmark / profile

Env: PEERS (comma list of inferq, transformers_cb, transformers_cb_graphs, transformers_cb_compiled,
hf_static_b64; default inferq,transformers_cb,hf_static_b64; inferq always runs first, the peers after it in the
order given), MICRO (default 1,8,64,256), MICRO_CTX (512), PROFILE_BATCH (comma list, default 64; empty or 0 skips;
the last one's table is printed), PROFILE_STEPS (10), GPU_UTIL (0.85), OUT (directory for full outputs),
INFERQ_ATTENTION (auto | torch | triton), INFERQ_LOW_BIT (a --load-in-low-bit format for inferq), INFERQ_EAGER=1 (no decode graphs), INFERQ_ASYNC=0|1 (async scheduling off/on;
default: the engine's, on for GPUs).
BENCH_DEVICE=cpu with the `tiny` shape is a smoke test of the script itself, not a benchmark.
"""
import gc, json, os, random, statistics, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # Smoke test of this script only.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32000),
}
DEV = os.environ.get("BENCH_DEVICE", "cuda")
OUT = os.environ.get("OUT")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=10):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps / 1e3


def ceilings():
    if DEV != "cuda":  # smoke test: nominal numbers
        return 1e11, 1e12
    x = torch.randint(0, 255, (4 << 30,), dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
    bw = 2 * x.numel() / timed(lambda: y.copy_(x))
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    fl = 2 * 8192 ** 3 / timed(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()  # the engine sizes its KV cache from free memory: give the cached blocks back
    return bw, fl


def workload(n, seed=0, pmin=64, pmax=512, omin=16, omax=512, vocab=32000):
    r = random.Random(seed)
    return [([r.randrange(3, vocab) for _ in range(r.randint(pmin, pmax))], r.randint(omin, omax)) for _ in range(n)]


def floor_seconds(reqs, cfg, nparam, bw, fl, dtype_bytes=2):
    """Lower bound for the workload: prefill FLOPs at the matmul rate, plus decode bytes (weights once per step of the
    longest request, every KV read once per generated token) at the copy bandwidth, or decode FLOPs if larger."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype_bytes
    prefill = sum(len(p) for p, _ in reqs) * 2 * nparam / fl
    kv = sum(m * len(p) + m * (m - 1) / 2 for p, m in reqs) * kv_per_tok / bw
    weights = max(m for _, m in reqs) * nparam * dtype_bytes / bw
    dec_flops = sum(m for _, m in reqs) * 2 * nparam / fl
    return prefill + max(kv + weights, dec_flops)


def run_static(model, reqs, batch):
    model.generation_config.pad_token_id = 0
    useful = 0
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        L = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (L - len(p)) + p for p, _ in chunk], device=DEV)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p, _ in chunk], device=DEV)
        mx = max(m for _, m in chunk)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=mx, min_new_tokens=mx,
                             do_sample=False, eos_token_id=None)
        useful += sum(m for _, m in chunk)
    sync()
    return useful, time.perf_counter() - t0


def run_cb(model, reqs, **cb_options):
    """transformers' continuous batching; cb_options go to ContinuousBatchingConfig (e.g. use_cuda_graph=True)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    gc_ = GenerationConfig(do_sample=False, max_new_tokens=max(m for _, m in reqs), eos_token_id=-1)
    cbc = ContinuousBatchingConfig(**cb_options)
    with model.continuous_batching_context_manager(generation_config=gc_, warmup=True,
                                                   continuous_batching_config=cbc) as mgr:
        t0 = time.perf_counter()
        for i, (p, m) in enumerate(reqs):
            mgr.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=m)
        done, useful = 0, 0
        while done < len(reqs):
            res = mgr.get_result(timeout=1)
            if res is not None and res.is_finished():
                done += 1
                useful += len(res.generated_tokens)
        sync()
        return useful, time.perf_counter() - t0


# ---- inferq ----

def load_inferq(model_dir, max_num_seqs=256):
    from engine.llm import LLM
    t0 = time.perf_counter()
    llm = LLM(model_dir, skip_tokenizer_init=True, device=DEV, dtype="bfloat16", max_num_seqs=max_num_seqs,
              max_num_batched_tokens=8192, gpu_memory_utilization=float(os.environ.get("GPU_UTIL", "0.85")),
              attention_backend=os.environ.get("INFERQ_ATTENTION", "auto"),
              load_in_low_bit=os.environ.get("INFERQ_LOW_BIT") or None,
              enforce_eager=os.environ.get("INFERQ_EAGER") == "1",
              async_scheduling=None if os.environ.get("INFERQ_ASYNC") is None else os.environ["INFERQ_ASYNC"] == "1")
    stats = llm.engine.stats()
    print(f"inferq loaded in {time.perf_counter()-t0:.1f}s: {stats['num_kv_blocks']} KV blocks of "
          f"{llm.engine.config.block_size} tokens, max_model_len {llm.engine.max_model_len}", flush=True)
    return llm


def run_inferq(llm, reqs, log):
    from engine.sampling_params import SamplingParams
    engine = llm.engine
    # Warm-up: a few short requests (kernel selection, allocator growth, first-launch costs).
    r = random.Random(1)
    llm.generate([[r.randrange(3, 32000) for _ in range(n)] for n in (16, 40, 100, 300)],
                 [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 4)
    # Count and time every engine step of the timed run (per-step wall time and batch size, for planning).
    steps, real_step = [], engine.step

    def counted_step():
        s = time.perf_counter()
        out = real_step()
        steps.append((time.perf_counter() - s, engine.last_step_batch_size))
        return out

    engine.step = counted_step
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    sync()
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], params)
    sync()
    dt = time.perf_counter() - t0
    del engine.step  # back to the class's method (keeping a bound method on the instance would be a cycle)
    useful = sum(len(o.outputs[0].token_ids) for o in outs)
    assert useful == sum(m for _, m in reqs), (useful, sum(m for _, m in reqs))
    full = [t for t, b in steps if b == max(b for _, b in steps)]
    summary = {"steps": len(steps), "mean_step_ms": 1e3 * dt / len(steps),
               "median_step_ms": 1e3 * statistics.median(t for t, _ in steps),
               "max_batch": max(b for _, b in steps), "steps_at_max_batch": len(full),
               "median_step_ms_at_max_batch": 1e3 * statistics.median(full)}
    log["inferq_steps"] = summary
    log["inferq_step_trace"] = [(round(t * 1e3, 3), b) for t, b in steps]
    print(f"inferq steps: {summary}", flush=True)
    return useful, dt


def _fill_decoding(engine, batch, ctx, tag):
    """Add `batch` requests of `ctx` prompt tokens and step until every one is decoding."""
    from engine.sampling_params import SamplingParams
    r = random.Random(batch)
    ids = [f"{tag}{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [r.randrange(3, 32000) for _ in range(ctx)],
                           SamplingParams(temperature=0, max_tokens=4 * ctx, ignore_eos=True))
    while engine.scheduler.waiting or any(not q.output_token_ids for q in engine.scheduler.running):
        engine.step()
    assert len(engine.scheduler.running) == batch
    return ids


def _drain(engine, ids):
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def step_time_ms(engine, steps):
    """Mean wall time of `steps` consecutive engine steps, with no device sync between them: with async
    scheduling a step's device work overlaps the host work around it, which a sync after each step would undo."""
    sync(); start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return 1e3 * (time.perf_counter() - start) / steps


def decode_micro(engine, batches, ctx, steps=30, warm=5):
    rows = []
    for b in batches:
        block = engine.config.block_size
        if b * -(-(ctx + warm + steps + 1) // block) > engine.stats()["num_kv_blocks"]:
            print(f"micro batch {b}: skipped, {b} requests of {ctx}+ tokens do not fit the KV cache", flush=True)
            continue
        ids = _fill_decoding(engine, b, ctx, "mb")
        for _ in range(warm):
            engine.step()
        ms = step_time_ms(engine, steps)
        replay_ms = _graph_replay_ms(engine, b)
        rows.append({"batch": b, "context": f"{ctx}..{ctx + warm + steps}", "mean_step_ms": ms, "tok_s": b / (ms / 1e3),
                     "graph_replay_ms": replay_ms})
        print(f"micro batch {b}: {ms:.2f} ms/step, {b/(ms/1e3):.0f} tok/s, graph replay alone "
              f"{replay_ms:.2f} ms" if replay_ms else f"micro batch {b}: {ms:.2f} ms/step", flush=True)
        _drain(engine, ids)
    return rows


def _graph_replay_ms(engine, batch, reps=30):
    """GPU time of the decode graph of this batch size replayed back to back (the step minus all host work);
    None without graphs."""
    graphs = engine.runner.graphs
    if graphs is None or DEV != "cuda" or not graphs.fits(batch):
        return None
    graph, _ = graphs._graphs[next(s for s in graphs._sizes if s >= batch)]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _classify(fe):
    """Bucket of a kernel by the CPU ops that launched it (innermost match wins over the leaf op name)."""
    names = []
    while fe is not None:
        names.append(fe.name)
        fe = fe.cpu_parent
    buckets = [("scaled_dot_product", "attention (SDPA)"), ("index_select", "KV gather (index_select)"),
               ("index_copy", "KV write (index_copy_)"), ("aten::linear", "matmul (linear)"),
               ("aten::mm", "matmul (linear)"), ("aten::addmm", "matmul (linear)"), ("aten::matmul", "matmul (linear)")]
    for name in names:
        for key, bucket in buckets:
            if key in name:
                return bucket
    return "other: " + names[0]


def profile_decode(engine, batch, ctx, nsteps, shape):
    from torch.profiler import ProfilerActivity, profile
    ids = _fill_decoding(engine, batch, ctx, "prof")
    for _ in range(3):
        engine.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(nsteps):
            engine.step()
        sync()
        wall = time.perf_counter() - t0
    _drain(engine, ids)
    ka = prof.key_averages()
    self_table = ka.table(sort_by="self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total", row_limit=15,
                          max_name_column_width=60)
    total_table = ka.table(sort_by="cuda_time_total" if DEV == "cuda" else "cpu_time_total", row_limit=25,
                           max_name_column_width=60)
    cpu_table = ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    buckets, gpu_us, launches = {}, 0.0, 0
    for fe in prof.events():
        for k in getattr(fe, "kernels", []):
            b = _classify(fe)
            buckets[b] = buckets.get(b, 0.0) + k.duration
            gpu_us += k.duration
            launches += 1
    summary = {"batch": batch, "steps": nsteps, "wall_ms_per_step_profiled": 1e3 * wall / nsteps,
               "gpu_kernel_ms_per_step": gpu_us / 1e3 / nsteps, "kernels_per_step": launches / nsteps,
               "buckets_ms_per_step": {k: v / 1e3 / nsteps for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])}}
    if OUT:
        with open(f"{OUT}/profile_{shape}_b{batch}.txt", "w") as f:
            f.write(json.dumps(summary, indent=1) + "\n\n# top ops by self CUDA time\n" + self_table
                    + "\n\n# top ops by total (inclusive) CUDA time\n" + total_table
                    + "\n\n# top ops by self CPU time\n" + cpu_table + "\n")
    return summary, self_table


def main():
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama2-7b"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    chosen = [s for s in os.environ.get("PEERS", "inferq,transformers_cb,hf_static_b64").split(",") if s]
    micro_batches = [int(b) for b in os.environ.get("MICRO", "1,8,64,256").split(",") if b]
    micro_ctx = int(os.environ.get("MICRO_CTX", "512"))
    prof_batches = [int(b) for b in os.environ.get("PROFILE_BATCH", "64").split(",") if b and int(b) > 0]
    prof_steps = int(os.environ.get("PROFILE_STEPS", "10"))
    torch.manual_seed(0)
    bw, fl = ceilings()
    import transformers
    transformers.logging.set_verbosity_error()  # generate() warns about the deliberate EOS/min_new_tokens setup
    name = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    print(f"device {name} torch {torch.__version__} transformers {transformers.__version__}")
    print(f"ceiling copy {bw/1e12:.2f} TB/s  bf16 matmul {fl/1e12:.0f} TFLOP/s")
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with torch.device(DEV):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"model {shape} params {nparam/1e9:.2f}B built in {time.perf_counter()-t0:.1f}s")
    wbytes = nparam * 2
    print(f"roofline decode step (weights only): {wbytes/bw*1e3:.2f} ms -> batch 64 max {64/(wbytes/bw):.0f} tok/s")
    reqs = workload(n)
    tot_out = sum(m for _, m in reqs)
    floor = floor_seconds(reqs, cfg, nparam, bw, fl)
    print(f"workload n={n} prompt_tokens={sum(len(p) for p,_ in reqs)} output_tokens={tot_out}")
    print(f"floor {floor:.2f}s -> at most {tot_out/floor:.0f} out tok/s", flush=True)
    log = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__, "shape": shape,
           "n": n, "copy_TBps": bw / 1e12, "matmul_TFLOPs": fl / 1e12, "nparam": nparam, "floor_s": floor,
           "output_tokens": tot_out, "results": {}}

    def save():
        if OUT:
            json.dump(log, open(f"{OUT}/peers_{shape}.json", "w"), indent=1)

    results = {}

    def record(sys_name, fn):
        try:
            useful, dt = fn()
            results[sys_name] = (useful, dt)
            log["results"][sys_name] = {"useful": useful, "s": dt, "out_tok_s": useful / dt,
                                        "fraction_of_floor": floor / dt}
            print(f"{sys_name}: useful_out={useful} time={dt:.1f}s out_tok/s={useful/dt:.0f} "
                  f"fraction_of_floor={floor/dt:.3f}", flush=True)
        except Exception as e:  # report and go on
            import traceback; traceback.print_exc()
            print(f"{sys_name}: FAILED {type(e).__name__}: {e}", flush=True)
            log["results"][sys_name] = {"failed": f"{type(e).__name__}: {e}"}
        save()

    micro, prof_summary, prof_table, prof_batch = [], None, None, 0
    if "inferq" in chosen:
        with tempfile.TemporaryDirectory() as model_dir:
            t0 = time.perf_counter()
            model.save_pretrained(model_dir)  # bf16 safetensors, same random weights as the peers use
            print(f"saved checkpoint in {time.perf_counter()-t0:.1f}s", flush=True)
            llm = load_inferq(model_dir)
            record("inferq", lambda: run_inferq(llm, reqs, log))
            if micro_batches:
                micro = decode_micro(llm.engine, micro_batches, micro_ctx)
                log["micro"] = micro
                save()
            log["profile"] = {}
            for prof_batch in prof_batches:  # the table printed is the last batch's
                prof_summary, prof_table = profile_decode(llm.engine, prof_batch, micro_ctx, prof_steps, shape)
                log["profile"][prof_batch] = prof_summary
                print(f"profile batch {prof_batch}: {json.dumps(prof_summary)}", flush=True)
                save()
            del llm
            gc.unfreeze()  # the engine froze the heap at start (engine/engine.py): let the collector reach it again
            gc.collect()
            if DEV == "cuda":
                torch.cuda.empty_cache()
                print(f"inferq freed: {torch.cuda.memory_allocated()/2**30:.1f} GiB still allocated (HF model)")

    runs = {"transformers_cb": lambda: run_cb(model, reqs),
            "transformers_cb_graphs": lambda: run_cb(model, reqs, use_cuda_graph=True, max_memory_percent=0.9),
            "transformers_cb_compiled": lambda: run_cb(model, reqs, use_cuda_graph=True, max_memory_percent=0.9,
                                                       default_compile_level=1),
            "hf_static_b64": lambda: run_static(model, reqs, 64)}
    for sys_name in chosen:
        if sys_name != "inferq":
            record(sys_name, runs[sys_name])
            gc.collect()
            if DEV == "cuda":
                torch.cuda.empty_cache()

    # ---- short report, last ----
    print()
    print(f"== {shape} W256 n={n} on {name}, torch {torch.__version__} ==")
    print(f"ceilings: copy {bw/1e12:.2f} TB/s, bf16 matmul {fl/1e12:.0f} TFLOP/s; "
          f"floor {floor:.2f}s ({tot_out/floor:.0f} out tok/s)")
    if prof_table:
        print(f"-- inferq profile, {prof_steps} decode steps at batch {prof_batch} (top ops by self CUDA time) --")
        print(prof_table)
        print(json.dumps(prof_summary, indent=1))
    if micro:
        print("-- inferq decode step (mean of 30 in a row) --")
        print("| batch | context | ms/step | tok/s | graph replay alone, ms |")
        for m in micro:
            replay = f"{m['graph_replay_ms']:.2f}" if m.get("graph_replay_ms") else "-"
            print(f"| {m['batch']} | {m['context']} | {m['mean_step_ms']:.2f} | {m['tok_s']:.0f} | {replay} |")
    ok = [k for k in chosen if k in results]
    print("-- W256 --")
    print("| system | out tokens | s | out tok/s | fraction of floor | " + " | ".join(f"x {k}" for k in ok) + " |")
    for k in ok:
        u, d = results[k]
        ratios = " | ".join(f"{(u/d)/(results[j][0]/results[j][1]):.2f}" for j in ok)
        print(f"| {k} | {u} | {d:.1f} | {u/d:.0f} | {floor/d:.3f} | {ratios} |")
    for k in chosen:
        if k not in results:
            print(f"| {k} | FAILED: {log['results'].get(k, {}).get('failed', 'not run')} |")


if __name__ == "__main__":
    main()
