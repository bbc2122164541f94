"""Engine behaviour beyond greedy parity: bad input, abort, seeded sampling, stops, logprobs, n > 1."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.checkpoints import VOCAB, greedy_reference, write_checkpoint

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, transformers model) for a small GQA Llama."""
    directory = tmp_path_factory.mktemp("tiny")
    return directory, write_checkpoint(directory, "llama3-gqa-tied")


def engine_for(directory, **options) -> LLMEngine:
    # A fixed cache (8,192 tokens) rather than a share of free memory: on a GPU each test's engines then leave room
    # for the next ones.
    options.setdefault("num_kv_blocks", 512)
    return LLMEngine(EngineConfig(model=str(directory), skip_tokenizer_init=True, **options))


def drain(engine: LLMEngine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def assert_all_blocks_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0


# ---- bad input: a clear ValueError, and the engine goes on serving the others ----

@pytest.mark.parametrize("prompt, message", [
    ([], "prompt must not be empty"),
    ([7] * 600, "prompt is 600 tokens long, but max_model_len is 512"),
    ([7, VOCAB + 3], "prompt token ids must be integers in [0, 512)"),
    ([7, -1], "prompt token ids must be integers"),
])
def test_bad_prompt_is_rejected_and_others_continue(tiny, prompt, message):
    directory, model = tiny
    engine = engine_for(directory)
    engine.add_request("good-1", [5, 6, 7], SamplingParams(max_tokens=6, **GREEDY))
    engine.step()
    with pytest.raises(ValueError) as error:
        engine.add_request("bad", prompt, SamplingParams(max_tokens=4, **GREEDY))
    assert message in str(error.value)
    engine.add_request("good-2", [9, 10], SamplingParams(max_tokens=5, **GREEDY))
    finished = drain(engine)
    assert set(finished) == {"good-1", "good-2"}
    assert finished["good-1"].outputs[0].token_ids == greedy_reference(model, [5, 6, 7], 6)
    assert finished["good-2"].outputs[0].token_ids == greedy_reference(model, [9, 10], 5)
    assert_all_blocks_free(engine)


def test_duplicate_request_id_is_rejected(tiny):
    engine = engine_for(tiny[0])
    engine.add_request("a", [5, 6], SamplingParams(max_tokens=2, **GREEDY))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5, 6], SamplingParams(max_tokens=2))
    assert set(drain(engine)) == {"a"}


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", 21), ("n", 0), ("stop", [""]), ("stop_token_ids", [-4]),
])
def test_invalid_sampling_values_name_the_parameter(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


@pytest.mark.parametrize("field, value", [("block_size", 0), ("max_num_seqs", 0), ("max_num_batched_tokens", -1),
                                          ("gpu_memory_utilization", 1.5), ("num_kv_blocks", 0)])
def test_invalid_engine_config(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="unused", **{field: value})


@pytest.mark.parametrize("device, message", [("tpu", "device must be auto, cpu, cuda"),
                                             ("cuda:99", "device 'cuda:99' (was asked for|does not exist)")])
def test_unusable_device_is_rejected(tiny, device, message):
    with pytest.raises(ValueError, match=message):
        engine_for(tiny[0], device=device)


def test_unknown_dtype_is_rejected(tiny):
    with pytest.raises(ValueError, match="dtype must be auto, bfloat16, float16 or float32, got 'int3'"):
        engine_for(tiny[0], dtype="int3")


def test_max_model_len_over_the_models_context_is_rejected(tiny):
    with pytest.raises(ValueError, match="max_model_len 4096 exceeds the model's max_position_embeddings 512"):
        engine_for(tiny[0], max_model_len=4096)


# ---- broken checkpoints ----

def broken_copy(tiny, tmp_path, edit_config=None, edit_weights=None):
    directory, _ = tiny
    for file in directory.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    if edit_config:
        config = json.loads((tmp_path / "config.json").read_text())
        edit_config(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    if edit_weights:
        weights = load_file(tmp_path / "model.safetensors")
        edit_weights(weights)
        save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_unknown_architecture(tiny, tmp_path):
    path = broken_copy(tiny, tmp_path, edit_config=lambda c: c.update(architectures=["FalconForCausalLM"]))
    with pytest.raises(ValueError, match="unknown architecture.*FalconForCausalLM.*supported: LlamaForCausalLM"):
        engine_for(path)


def test_missing_weight(tiny, tmp_path):
    path = broken_copy(tiny, tmp_path, edit_weights=lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"weights missing from the checkpoint: \['model.layers.1.mlp.up_proj.weight'\]"):
        engine_for(path)


def test_mismatched_weight_shape(tiny, tmp_path):
    path = broken_copy(tiny, tmp_path, edit_config=lambda c: c.update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight in model.safetensors has shape \(64, 128\), the config implies \(64, 96\)"):
        engine_for(path)


def test_unexpected_weight(tiny, tmp_path):
    path = broken_copy(tiny, tmp_path, edit_config=lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(ValueError, match="does not have.*model.layers.1"):
        engine_for(path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        engine_for(tmp_path)


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    model = write_checkpoint(tmp_path, "qwen2-bias", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    output = LLM(str(tmp_path), skip_tokenizer_init=True).generate([[4, 8, 15, 16]], SamplingParams(max_tokens=8, **GREEDY))
    assert output[0].outputs[0].token_ids == greedy_reference(model, [4, 8, 15, 16], 8)


def test_missing_shard(tmp_path):
    write_checkpoint(tmp_path, "qwen2-bias", max_shard_size="40KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(ValueError, match="shards named in model.safetensors.index.json are missing"):
        engine_for(tmp_path)


# ---- abort ----

def test_abort_waiting_running_and_mid_prefill_frees_blocks(tiny):
    directory, model = tiny
    engine = engine_for(directory, max_num_batched_tokens=8, max_num_seqs=3)
    prompts = {str(i): [3 + i] * (5 + 7 * i) for i in range(6)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=10, **GREEDY))
    for _ in range(4):
        engine.step()
    # "0" is decoding, "1"/"2" are mid-prefill or decoding, "5" is still waiting.
    assert engine.abort_request("1") and engine.abort_request("5")
    assert not engine.abort_request("5")
    finished = drain(engine)
    assert finished["1"].outputs[0].finish_reason == finished["5"].outputs[0].finish_reason == "abort"
    for request_id in ("0", "2", "3", "4"):
        assert finished[request_id].outputs[0].token_ids == greedy_reference(model, prompts[request_id], 10)
    assert_all_blocks_free(engine)


def test_abort_frees_blocks_at_once(tiny):
    engine = engine_for(tiny[0])
    engine.add_request("long", [5] * 100, SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    assert engine.stats()["num_free_kv_blocks"] < engine.stats()["num_kv_blocks"]
    engine.abort_request("long")
    assert_all_blocks_free(engine)


# ---- sampling through the engine ----

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(tiny):
    directory, _ = tiny
    alone = LLM(str(directory), skip_tokenizer_init=True).generate([[5, 6, 7, 8]], SEEDED)[0].outputs[0].token_ids
    mixed_prompts = [[9] * 30, [5, 6, 7, 8], [11, 12], [5, 6, 7, 8]]
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True), SEEDED,
                    SamplingParams(temperature=0.5, seed=99, max_tokens=5), SamplingParams(max_tokens=20, **GREEDY)]
    # Preemption and chunked prefill must not change it either.
    llm = LLM(str(directory), skip_tokenizer_init=True, block_size=4, num_kv_blocks=20, max_num_batched_tokens=6)
    outputs = llm.generate(mixed_prompts, mixed_params)
    assert outputs[1].outputs[0].token_ids == alone
    assert outputs[3].outputs[0].token_ids != alone  # the greedy request really is different


def test_n_choices_are_returned_and_seeded(tiny):
    llm = LLM(str(tiny[0]), skip_tokenizer_init=True)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = llm.generate([[5, 6, 7]], params)[0]
    again = llm.generate([[5, 6, 7]], params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


def test_min_tokens_and_stop_token_ids(tiny):
    directory, model = tiny
    llm = LLM(str(directory), skip_tokenizer_init=True)
    free = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0].token_ids
    stop_token = free[3]
    stopped = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, stop_token_ids=[stop_token], temperature=0))
    choice = stopped[0].outputs[0]
    assert choice.token_ids == free[:free.index(stop_token) + 1]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop_token)
    held = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, min_tokens=10, stop_token_ids=[stop_token],
                                                    temperature=0))[0].outputs[0]
    assert len(held.token_ids) >= 10 and stop_token not in held.token_ids[:10]


def test_logprobs_are_returned_per_token(tiny):
    llm = LLM(str(tiny[0]), skip_tokenizer_init=True)
    choice = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, logprobs=3, **GREEDY))[0].outputs[0]
    assert len(choice.logprobs) == 6
    for token, entry in zip(choice.token_ids, choice.logprobs):
        assert 3 <= len(entry) <= 4 and token in entry
        assert entry[token] == max(entry.values())  # greedy picks the most likely token


def test_penalties_run_in_a_mixed_batch(tiny):
    llm = LLM(str(tiny[0]), skip_tokenizer_init=True)
    params = [SamplingParams(max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5,
                             **GREEDY), SamplingParams(max_tokens=16, **GREEDY)]
    penalised, plain = llm.generate([[5, 6, 7], [5, 6, 7]], params)
    assert len(penalised.outputs[0].token_ids) == len(plain.outputs[0].token_ids) == 16
    assert penalised.outputs[0].token_ids != plain.outputs[0].token_ids


def test_decode_graph_sizes_and_devices():
    from engine.attention import select_backend
    from engine.decode_graphs import graph_batch_sizes, graphs_supported

    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]
    assert not graphs_supported(torch.device("cpu"), select_backend("torch", torch.device("cpu")))


def test_a_request_that_does_not_stream_gets_its_first_and_its_final_output(tiny):
    directory, model = tiny
    engine = engine_for(directory)
    engine.add_request("quiet", [5, 6, 7], SamplingParams(max_tokens=10, **GREEDY), stream=False)
    engine.add_request("loud", [8, 9], SamplingParams(max_tokens=10, **GREEDY))
    seen: dict[str, list] = {"quiet": [], "loud": []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output.outputs[0])
    assert len(seen["loud"]) == 10
    first, final = seen["quiet"]
    expected = greedy_reference(model, [5, 6, 7], 10)
    assert first.delta_token_ids == expected[:1]
    # The final output carries everything since the first: the skipped steps' tokens are not lost.
    assert final.delta_token_ids == expected[1:] and final.token_ids == expected and final.finish_reason == "length"
    assert_all_blocks_free(engine)



def test_a_quiet_request_streams_from_when_asked(tiny):
    """stream_request: a request added with stream=False gets an output after every step from then on; the first
    of them carries every token since its first output, so nothing is lost or repeated."""
    directory, model = tiny
    engine = engine_for(directory)
    engine.add_request("quiet", [5, 6, 7], SamplingParams(max_tokens=12, **GREEDY), stream=False)
    seen, steps = [], 0
    while engine.has_unfinished_requests():
        steps += 1
        if steps == 6:
            assert engine.stream_request("quiet")
        seen += [o.outputs[0] for o in engine.step()]
    expected = greedy_reference(model, [5, 6, 7], 12)
    assert seen[0].delta_token_ids == expected[:1] and len(seen[1].delta_token_ids) > 1
    assert [t for o in seen for t in o.delta_token_ids] == expected
    assert all(len(o.delta_token_ids) == 1 for o in seen[2:])
    assert not engine.stream_request("quiet")  # done: unknown now

# ---- async scheduling: the next decode step is queued before this step's tokens are read ----

def count_steps_ahead(engine: LLMEngine) -> list[int]:
    """Counts (in a one-element list) the steps run on input ids that had not reached the host."""
    calls = [0]
    execute = engine.runner.execute

    def counting(chunks, input_ids=None, *args):
        calls[0] += input_ids is not None
        return execute(chunks, input_ids, *args)

    engine.runner.execute = counting
    return calls


def test_async_scheduling_gives_the_same_outputs(tiny):
    """Greedy (against transformers), seeded sampling, logprobs, n > 1, stop tokens, min_tokens, penalties (whose
    sampling waits for the previous step's tokens on the host) and different lengths in one staggered batch:
    identical with and without async scheduling, streamed token by token with each token sent once, and most
    decode steps really queued ahead."""
    directory, model = tiny
    stop_token = greedy_reference(model, [5, 6, 7], 20)[6]
    work = [([5, 6, 7], SamplingParams(max_tokens=20, **GREEDY)),
            ([5, 6, 7], SamplingParams(max_tokens=20, stop_token_ids=[stop_token], temperature=0)),
            ([5, 6, 7], SamplingParams(max_tokens=20, min_tokens=8, stop_token_ids=[stop_token], temperature=0)),
            ([9] * 30, SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=3, max_tokens=15, ignore_eos=True)),
            ([11, 12], SamplingParams(max_tokens=9, logprobs=2, **GREEDY)),
            ([13, 14, 15], SamplingParams(max_tokens=5, repetition_penalty=1.2, **GREEDY)),
            ([16] * 7, SamplingParams(max_tokens=3, **GREEDY))]

    def run(async_scheduling: bool) -> tuple[dict, int]:
        engine = engine_for(directory, async_scheduling=async_scheduling, max_num_batched_tokens=16)
        ahead = count_steps_ahead(engine)
        streamed: dict[str, list[int]] = {}
        finished = {}
        for step in range(60):
            if step < len(work):  # one new request per step: admissions interleave with steps queued ahead
                engine.add_request(str(step), *work[step])
            for output in engine.step():
                streamed.setdefault(output.request_id, []).extend(output.outputs[0].delta_token_ids)
                if output.finished:
                    finished[output.request_id] = [(c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)
                                                   for c in output.outputs]
            if step >= len(work) and not engine.has_unfinished_requests():
                break
        for request_id, choices in finished.items():
            if len(choices) == 1:
                assert streamed[request_id] == choices[0][0], "each token streamed exactly once"
        assert_all_blocks_free(engine)
        return finished, ahead[0]

    sync, sync_ahead = run(False)
    overlapped, steps_ahead = run(True)
    assert sync_ahead == 0 and steps_ahead >= 8
    assert overlapped == sync
    assert sync["0"][0][0] == greedy_reference(model, [5, 6, 7], 20)
    assert sync["1"][0][2:] == ("stop", stop_token) and len(sync["1"][0][0]) == 7


@pytest.mark.parametrize("options", [dict(max_num_seqs=4, max_num_batched_tokens=16),  # chunked prompts
                                     dict(max_num_seqs=3, max_num_batched_tokens=7),  # one-token prompt chunks
                                     dict(max_num_seqs=4, num_kv_blocks=12, block_size=4)])  # and preemption
def test_steps_stay_queued_ahead_while_requests_wait(tiny, options):
    """More requests than slots (a full batch with a queue behind it, as a batch job keeps a worker): steps go on
    being queued ahead while requests finish and waiting ones are admitted, their prompts chunked, and every
    output is the same as without async scheduling (greedy: as transformers')."""
    directory, model = tiny
    work = {f"r{i}": ([3 + i, 5, 7 + i] * (1 + i % 5), 4 + (i * 7) % 13) for i in range(14)}

    def run(async_scheduling: bool):
        engine = engine_for(directory, async_scheduling=async_scheduling, **options)
        ahead = count_steps_ahead(engine)
        schedule_ahead = engine.scheduler.schedule_ahead

        def checked(chunks):
            # The runner's contract: the chunks fed by the device come first, and they are all of the step's
            # decodes, longest context first (the attention backends group decodes by length).
            result = schedule_ahead(chunks)
            if result is not None:
                out, rows = result
                decodes = [c for c in out.chunks if c.num_tokens == 1 and c.start > 0]
                assert out.chunks[:len(rows)] == decodes
                assert [c.start for c in decodes] == sorted((c.start for c in decodes), reverse=True)
            return result

        engine.scheduler.schedule_ahead = checked
        steps = [0]
        step = engine.step

        def counted():
            steps[0] += 1
            return step()

        engine.step = counted
        for request_id, (prompt, max_tokens) in work.items():
            engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
        finished = {rid: output.outputs[0].token_ids for rid, output in drain(engine).items()}
        assert_all_blocks_free(engine)
        return finished, ahead[0], steps[0]

    sync, _, _ = run(False)
    overlapped, steps_ahead, steps = run(True)
    assert overlapped == sync
    for request_id, (prompt, max_tokens) in work.items():
        assert sync[request_id] == greedy_reference(model, prompt, max_tokens)
    assert steps_ahead >= steps // 2, (steps_ahead, steps)


def test_abort_while_a_step_is_queued_ahead(tiny):
    """An abort between steps, with the next step already queued: the request ends with the tokens it had, its
    queued token is dropped, the others go on as before and every block comes back."""
    directory, model = tiny
    engine = engine_for(directory, async_scheduling=True)
    engine.add_request("kept", [5, 6, 7], SamplingParams(max_tokens=12, **GREEDY))
    engine.add_request("aborted", [8, 9], SamplingParams(max_tokens=12, **GREEDY))
    sent = {"kept": [], "aborted": []}
    while engine._ahead is None:
        for output in engine.step():
            sent[output.request_id] += output.outputs[0].delta_token_ids
    assert engine.abort_request("aborted")
    finished = drain(engine)
    assert finished["aborted"].outputs[0].finish_reason == "abort"
    assert finished["aborted"].outputs[0].token_ids == sent["aborted"] == greedy_reference(model, [8, 9], 12)[
        :len(sent["aborted"])]
    assert finished["kept"].outputs[0].token_ids == greedy_reference(model, [5, 6, 7], 12)
    assert_all_blocks_free(engine)


def test_async_scheduling_is_on_for_accelerators_only(tiny):
    assert not engine_for(tiny[0], device="cpu").async_scheduling
    assert engine_for(tiny[0], device="cpu", async_scheduling=True).async_scheduling
