"""--tensor-parallel-size: the model split across ranks (CPU processes over gloo here, float32), against one rank.

Greedy outputs of TP=2 equal TP=1 token for token (the sums of a row-parallel projection run in another order, so
logits differ in the last bits; the random checkpoints' peaky logits keep greedy picks far from ties), with
chunked prefill and preemption, on a GQA and a qkv-bias (Qwen2) checkpoint, with async scheduling (the previous
step's tokens reach the followers as a device tensor) and prompt logprobs; a low-bit format; the errors for sizes
that cannot work; a follower's death; and the service with a TP=2 CPU worker, whose followers end with it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.tensor_parallel import TensorParallelError
from tests.checkpoints import write_checkpoint
from tests.service import MODEL, Service, wait_done
from tests.test_data_parallel import _alive, _descendants, _wait_until

# Prompts up to 50 tokens in steps of 16 tokens: most are prefilled in chunks; 12 blocks of 8 tokens cannot hold
# six requests of up to 74 tokens, so some are preempted and computed again.
ENGINE = dict(device="cpu", skip_tokenizer_init=True, max_num_batched_tokens=16, num_kv_blocks=12, block_size=8)
PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(5 + 9 * i)] for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    paths = {}
    for arch in ("llama3-gqa-tied", "qwen2-bias"):
        write_checkpoint(root / arch, arch)
        paths[arch] = root / arch
    paths["llama-all-biases"] = _write_llama_with_biases(root / "llama-all-biases")
    return paths


def _write_llama_with_biases(directory: Path) -> Path:
    """A Llama with attention_bias and mlp_bias: the row-parallel projections (o_proj, down_proj) have biases too,
    which a rank adds once after the sum. Random biases (transformers initialises them to zero)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.checkpoints import _COMMON

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_COMMON, num_key_value_heads=2, attention_bias=True, mlp_bias=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


def _run(model: Path, tp: int, params: SamplingParams = GREEDY, **options):
    """(outputs, the follower processes) of one engine over PROMPTS, shut down afterwards."""
    llm = LLM(str(model), tensor_parallel_size=tp, **ENGINE | options)
    followers = list(llm.engine.tensor_parallel.followers) if tp > 1 else []
    try:
        return llm.generate(PROMPTS, params), followers
    finally:
        llm.engine.shutdown()


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch, options", [
    ("llama3-gqa-tied", {}),
    # Async scheduling: each decode's input tokens are the previous step's sampled ones, still on the device.
    ("qwen2-bias", {"async_scheduling": True}),
    ("llama-all-biases", {}),
])
def test_tp2_greedy_equals_tp1_with_chunked_prefill_and_preemption(checkpoints, arch, options):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    one, _ = _run(checkpoints[arch], 1, params, **options)
    two, followers = _run(checkpoints[arch], 2, params, **options)
    assert _tokens(two) == _tokens(one)
    assert sum(o.num_preemptions for o in two) > 0 and max(map(len, PROMPTS)) > ENGINE["max_num_batched_tokens"]
    for a, b in zip(one, two):  # scored prompt rows: the same distribution, to float32 rounding
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
    assert followers and all(p.poll() is not None for p in followers)  # shutdown ended them


def test_low_bit_under_tp_equals_the_same_format_on_one_rank(checkpoints):
    """sym_int8 keeps one scale per whole row: the row-parallel slices are quantized with the row's maximum over
    the ranks, so the shards hold exactly the one-rank weights."""
    one, _ = _run(checkpoints["qwen2-bias"], 1, load_in_low_bit="sym_int8")
    two, _ = _run(checkpoints["qwen2-bias"], 2, load_in_low_bit="sym_int8")
    float32, _ = _run(checkpoints["qwen2-bias"], 1)
    assert _tokens(two) == _tokens(one)
    assert _tokens(one) != _tokens(float32)  # the format is in effect


def test_4bit_under_tp_equals_the_same_format_on_one_rank(tmp_path):
    """sym_int4 and asym_int4 with widths whose halves are whole groups (o_proj 256 inputs, down_proj 512, groups of
    128): each rank quantizes its slice in the whole width's groups, so TP=2 holds exactly the one-rank weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.checkpoints import _COMMON

    torch.manual_seed(0)
    shape = _COMMON | dict(hidden_size=256, intermediate_size=512, num_key_value_heads=2)
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(tmp_path / "wide")
    for fmt in ("sym_int4", "asym_int4"):
        one, _ = _run(tmp_path / "wide", 1, load_in_low_bit=fmt)
        two, _ = _run(tmp_path / "wide", 2, load_in_low_bit=fmt)
        assert _tokens(two) == _tokens(one), fmt


def test_quantized_checkpoints_are_sliced_as_stored(checkpoints, tmp_path):
    """A pre-quantized directory (sym_int8, one scale per row: kept by every slice of the row) and a GGUF file (Q4_0,
    groups of 32: o_proj's 64 inputs split into whole groups) run under TP=2 with their stored values."""
    gguf = pytest.importorskip("gguf")
    from engine.quantized_checkpoint import save_quantized
    from tests.test_gguf import random_llama, write_gguf

    quantized = save_quantized(checkpoints["qwen2-bias"], tmp_path / "q8", "sym_int8")
    gguf_file = write_gguf(tmp_path / "random.gguf", random_llama(), gguf.GGMLQuantizationType.Q4_0)
    for model in (quantized, gguf_file):
        one, _ = _run(model, 1)
        two, _ = _run(model, 2)
        assert _tokens(two) == _tokens(one), model


def test_sizes_that_cannot_split_are_refused_by_name(checkpoints):
    model = str(checkpoints["llama3-gqa-tied"])  # 4 attention heads, 2 KV heads, 128 MLP units, 64 hidden
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(model=model, tensor_parallel_size=0)
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=rf"--tensor-parallel-size {cores + 1} exceeds the {cores} CPU cores"):
        LLM(model, tensor_parallel_size=cores + 1, **ENGINE)
    if cores >= 3:
        with pytest.raises(ValueError, match="--tensor-parallel-size 3 does not divide the model's "
                                             "num_attention_heads"):
            LLM(model, tensor_parallel_size=3, **ENGINE)
    # sym_int4 groups the 64 inputs of o_proj by 64: halves of 32 would split a group.
    with pytest.raises(ValueError, match="--tensor-parallel-size 2 leaves 32 of a row-parallel projection's 64 "
                                         "inputs on each rank, not whole sym_int4 groups of 64"):
        LLM(model, tensor_parallel_size=2, load_in_low_bit="sym_int4", **ENGINE)


def test_a_dead_follower_fails_the_engine_with_a_clear_error(checkpoints):
    llm = LLM(str(checkpoints["llama3-gqa-tied"]), tensor_parallel_size=2, **ENGINE)
    engine = llm.engine
    try:
        engine.add_request("r", PROMPTS[2], SamplingParams(max_tokens=100, ignore_eos=True))
        engine.step()
        follower = engine.tensor_parallel.followers[0]
        os.kill(follower.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(TensorParallelError, match=rf"tensor-parallel rank 1 \(pid {follower.pid}\) exited with "
                                                      "code -9"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - started < 10
    finally:
        engine.shutdown()


def test_a_leader_killed_outright_leaves_no_follower(checkpoints):
    """kill -9 of the leader's process: its followers see their parent gone and exit."""
    script = (f"from engine.llm import LLM; llm = LLM({str(checkpoints['llama3-gqa-tied'])!r}, "
              f"tensor_parallel_size=2, **{ENGINE!r}); "
              "print(*[p.pid for p in llm.engine.tensor_parallel.followers], flush=True); import time; time.sleep(300)")
    leader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        followers = [int(pid) for pid in leader.stdout.readline().split()]
        assert followers and all(_alive(pid) for pid in followers)
        leader.kill()
        leader.wait(30)
        _wait_until(lambda: not any(_alive(pid) for pid in followers), "the followers to exit", 30)
    finally:
        leader.kill()
        leader.wait(30)


def _followers_of(pid: int) -> set[int]:
    return {p for p in _descendants(pid) if b"engine.tp_follower" in Path(f"/proc/{p}/cmdline").read_bytes()}


@pytest.mark.timeout(300)
def test_a_tp2_cpu_worker_serves_jobs_and_sigterm_ends_its_followers(redis_url, demo_model_dir, tmp_path):
    """`inferq worker --device cpu --tensor-parallel-size 2` behind Redis, Celery and the API: greedy completions
    equal the same engine's at TP=1 offline; SIGTERM stops the worker, and its engine's follower with it."""
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    offline = LLM(str(demo_model_dir), device="cpu")
    expected = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(temperature=0, max_tokens=16,
                                                                                       ignore_eos=True))]
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        service.start_worker(extra_args=("--tensor-parallel-size", "2"))
        followers = _followers_of(service.worker.pid)
        assert len(followers) == 1, _descendants(service.worker.pid)
        service.start_api()
        with service.client() as client:
            texts = []
            for prompt in prompts:
                reply = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 16,
                                                             "temperature": 0, "ignore_eos": True})
                assert reply.status_code == 200, reply.text
                texts.append(reply.json()["choices"][0]["text"])
        assert texts == expected
        everything = _descendants(service.worker.pid)
        service.worker.send_signal(signal.SIGTERM)
        service.worker.wait(timeout=60)
        _wait_until(lambda: not any(_alive(pid) for pid in everything), "the engine and its follower to exit", 30)
    finally:
        service.stop()


@pytest.mark.timeout(300)
def test_a_follower_killed_mid_job_ends_every_job_and_the_worker_serves_on(redis_url, demo_model_dir, tmp_path):
    """kill -9 of a TP=2 worker's follower while its jobs run: the engine process ends (its leader sees the rank
    gone), the worker starts a new engine with a new follower, and the jobs it had resume there and complete."""
    service = Service(redis_url, demo_model_dir, tmp_path)
    try:
        service.start_worker(extra_args=("--tensor-parallel-size", "2"))
        (follower,) = _followers_of(service.worker.pid)
        service.start_api()
        with service.client() as client:
            ids = [client.post("/v1/jobs", json={"model": MODEL, "prompt": f"story {i}:", "max_tokens": 400,
                                                 "temperature": 0, "ignore_eos": True}).json()["id"]
                   for i in range(4)]
            _wait_until(lambda: any(service.store.get(i).status == "running" for i in ids), "a job to run", 60)
            os.kill(follower, signal.SIGKILL)
            jobs = [wait_done(client, job_id) for job_id in ids]
            assert [(j["status"], j["usage"]["completion_tokens"]) for j in jobs] == [("succeeded", 400)] * 4, jobs
            _wait_until(lambda: _followers_of(service.worker.pid) - {follower}, "the new engine's follower", 120)
            reply = client.post("/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 8,
                                                         "temperature": 0, "ignore_eos": True})
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8, reply.text
        log = (tmp_path / "worker.log").read_text()
        assert f"tensor-parallel rank 1 (pid {follower}) exited with code -9" in log, log[-3000:]
        assert "the engine process died" in log, log[-3000:]
    finally:
        service.stop()


def test_the_flag_reaches_the_engine_and_a_worker_pins_its_cards(monkeypatch):
    from worker.cli import build_parser
    from worker.engine_flags import engine_options
    from worker.pinning import pin_device

    parser = build_parser()
    for command in (["generate", "--prompt", "x"], ["worker"], ["serve"]):
        args = parser.parse_args([*command, "--tensor-parallel-size", "2", "--model", "m"])
        assert EngineConfig(**engine_options(args)).tensor_parallel_size == 2
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pin_device("cuda:2", 2) == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert pin_device("cpu", 2) == "cpu"


def test_a_device_list_with_tensor_parallelism_is_one_line():
    result = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--device", "cuda:0-1",
                             "--tensor-parallel-size", "2"], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --tensor-parallel-size 2 takes one --device, the first of its cards (cuda:0 for cuda:0-1), not a "
        "list of workers"], result
