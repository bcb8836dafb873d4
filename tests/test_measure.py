"""Memory of a training step: the tensor accounting of measure_memory and the analytic estimate_memory."""
import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from peft_lab.estimate import estimate_memory
from peft_lab.measure import MEMORY_KEYS, measure_memory, time_fn
from peft_lab.models import build_from_config

# measured on CPU: the per-layer formula of activation_elements counts the very tensors autograd saves, so
# the estimate and the measurement agree to well under 1% (padding mask, label storage rounding aside).
REL_TOL = 0.01


def _batch(vocab, B=2, T=24, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def gpt2_2layer():
    """A 2-layer GPT-2 with the real vocabulary and context (width 256 to stay fast)."""
    cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return build_from_config(cfg, device="cpu", seed=0)


def test_keys_and_arithmetic(small_gpt2):
    m = measure_memory(small_gpt2, _batch(1024))
    assert set(m) == {*MEMORY_KEYS, "total"}
    n = sum(p.numel() for p in small_gpt2.parameters())
    assert m["parameters"] == m["gradients"] == 4 * n
    assert m["optimizer"] == 2 * m["gradients"]
    assert m["total"] == sum(m[k] for k in MEMORY_KEYS)
    assert m["activations"] > 0
    assert all(isinstance(v, int) for v in m.values())


def test_weights_grads_mode_untouched(small_gpt2):
    before = {k: v.clone() for k, v in small_gpt2.state_dict().items()}
    small_gpt2.eval()
    measure_memory(small_gpt2, _batch(1024))
    assert all(torch.equal(before[k], v) for k, v in small_gpt2.state_dict().items())
    assert all(p.grad is None for p in small_gpt2.parameters())
    assert not small_gpt2.training


def test_everything_frozen(small_gpt2):
    for p in small_gpt2.parameters():
        p.requires_grad_(False)
    m = measure_memory(small_gpt2, _batch(1024))
    assert m["gradients"] == m["optimizer"] == m["activations"] == 0
    assert m["total"] == m["parameters"] > 0


def test_partly_frozen_counts_only_trainable(small_gpt2):
    for name, p in small_gpt2.named_parameters():
        p.requires_grad_("h.1." in name)
    m = measure_memory(small_gpt2, _batch(1024))
    trainable = sum(p.numel() for p in small_gpt2.parameters() if p.requires_grad)
    assert m["gradients"] == 4 * trainable and m["optimizer"] == 8 * trainable
    assert 0 < m["activations"] < measure_memory(small_gpt2.requires_grad_(True), _batch(1024))["activations"]


def test_bad_batches(small_gpt2):
    with pytest.raises(ValueError, match="empty"):
        measure_memory(small_gpt2, {})
    with pytest.raises(ValueError, match="input_ids"):
        measure_memory(small_gpt2, {"labels": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(TypeError, match="integer"):
        measure_memory(small_gpt2, {"input_ids": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="empty"):
        measure_memory(small_gpt2, {"input_ids": torch.zeros(1, 0, dtype=torch.long)})
    with pytest.raises(TypeError):
        measure_memory("not a model", _batch(1024))
    with pytest.raises(ValueError, match="estimate_memory"):
        measure_memory(build_from_config("gpt2", device="meta"), _batch(1024))


def _close(measured, estimated, keys=(*MEMORY_KEYS, "total")):
    for k in keys:
        assert estimated[k] == pytest.approx(measured[k], rel=REL_TOL), k


def test_estimate_matches_measurement_small_gpt2(gpt2_2layer):
    batch = _batch(gpt2_2layer.config.vocab_size, B=2, T=64)
    _close(measure_memory(gpt2_2layer, batch), estimate_memory(gpt2_2layer.config, batch_size=2, seq_len=64))


def test_estimate_matches_measurement_llama_gqa():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = build_from_config(cfg, device="cpu")
    _close(measure_memory(model, _batch(512, B=3, T=32)), estimate_memory(cfg, batch_size=3, seq_len=32))


def test_estimate_matches_measurement_tiny(tiny):
    from peft_lab.data import collate, encode_task, load_task

    model, tok = tiny
    examples = encode_task(load_task("train", n=8), tok)
    batch = collate(examples, tok.pad_token_id)  # a real, padded task batch
    B, T = batch["input_ids"].shape
    _close(measure_memory(model, batch), estimate_memory("tiny", batch_size=B, seq_len=T))


def test_estimate_model_states():
    n = 124_439_808
    full = estimate_memory("gpt2", batch_size=0)
    assert (full["parameters"], full["gradients"], full["optimizer"], full["activations"]) == (4 * n, 4 * n, 8 * n, 0)
    mixed = estimate_memory("gpt2", batch_size=0, precision="bf16-mixed")
    assert mixed["total"] == full["total"] == 16 * n  # ZeRO: 16 bytes per parameter for mixed-precision Adam
    lora = estimate_memory("gpt2", trainable_params=294_912, batch_size=0)
    assert lora["total"] == 4 * n + 12 * 294_912  # trained parameters are counted among the model's n
    assert estimate_memory("gpt2", trainable_params=0, batch_size=4)["activations"] == 0
    big = estimate_memory("llama-7b", batch_size=1, seq_len=2048, precision="bf16-mixed")
    assert big["parameters"] == 6 * 6_738_415_616 and big["activations"] > 0


@pytest.mark.parametrize("kwargs, error", [(dict(precision="fp16"), ValueError), (dict(batch_size=-1), ValueError),
                                           (dict(seq_len=0), ValueError), (dict(trainable_params=10**12), ValueError),
                                           (dict(trainable_params=1.5), TypeError)])
def test_estimate_rejects_bad_input(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        estimate_memory("gpt2", **kwargs)


def test_time_fn(monkeypatch):
    calls, clock = [], [0.0]

    def f():
        calls.append(1)
        clock[0] += len(calls)        # the n-th call takes n seconds
    monkeypatch.setattr("peft_lab.measure.time.perf_counter", lambda: clock[0])
    t = time_fn(f, repeats=3, warmup=2)
    assert len(calls) == 5 and t == 4.0   # the timed calls take 3, 4, 5 s: the warm-up is not timed
    with pytest.raises(ValueError):
        time_fn(lambda: None, repeats=0)
    with pytest.raises(TypeError):
        time_fn(42)


def test_time_fn_alternates_and_takes_medians(monkeypatch):
    """A dict of callables runs in rounds (a b, b a, a b, …) after the warm-up; each gets the median of its
    calls, so one slow moment — here the first timed call of "a" — cannot decide the comparison."""
    clock, order = [0.0], []
    cost = {"a": [5.0, 1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0, 2.0]}  # seconds per timed call

    def make(name):
        def f():
            order.append(name)
            if len(order) > 2:  # after one warm-up round of both
                clock[0] += cost[name].pop(0)
        return f
    monkeypatch.setattr("peft_lab.measure.time.perf_counter", lambda: clock[0])
    medians = time_fn({"a": make("a"), "b": make("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert medians == {"a": 1.0, "b": 2.0}
    with pytest.raises(TypeError, match=r"fn\['b'\]"):
        time_fn({"a": lambda: None, "b": 3})
    with pytest.raises(ValueError, match="empty"):
        time_fn({})


def test_count_parameters_rejects_non_modules():
    from peft_lab.measure import count_parameters
    with pytest.raises(TypeError, match="nn.Module"):
        count_parameters({"weight": 1})


def test_cuda_first_touched_in_the_warm_up_is_synchronised(monkeypatch):
    """Whether to synchronise is decided after the warm-up: a function that is the first to touch CUDA is
    timed with its kernels, not just their launches (simulated: CUDA becomes initialised at the first call)."""
    state = {"initialised": False, "syncs": 0}

    def f():
        state["initialised"] = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state["initialised"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: state.__setitem__("syncs", state["syncs"] + 1))
    time_fn(f, repeats=3, warmup=1)
    assert state["syncs"] == 6            # before and after each timed call


@pytest.mark.parametrize("method, words", [
    ({"kind": "lora", "rnak": 8, "targets": ["c_attn"]}, "no field 'rnak' (did you mean 'rank'?)"),
    ({"kind": "houlsby"}, "needs ['bottleneck_dim']"),
    ({"kind": "lora", "rank": 0, "targets": ["c_attn"]}, "rank"),
    ({"kind": "lora", "rank": 8, "targets": r".*h\.0\.attn\.c_attn"}, "different layers in different blocks"),
    ({"kind": "prefix", "num_virtual_tokens": 4, "projection": 8}, "did you mean 'projection_dim'"),
])
def test_estimate_refuses_a_misspelt_or_missing_method_field(method, words):
    with pytest.raises(ValueError) as err:
        estimate_memory("tiny", 1000, batch_size=2, seq_len=16, method=method)
    assert words in str(err.value)


def test_estimate_reads_a_regex_target_as_peft_does():
    """One string is a regular expression over the whole module name (not a tuple of its characters)."""
    as_list = estimate_memory("tiny", 16384, batch_size=2, seq_len=16,
                              method={"kind": "lora", "rank": 8, "targets": ["c_attn"]})
    as_regex = estimate_memory("tiny", 16384, batch_size=2, seq_len=16,
                               method={"kind": "lora", "rank": 8, "targets": r".*\.attn\.c_attn"})
    assert as_regex == as_list
