"""peft_lab.prefix: prefix tuning and prompt tuning (notebook 04), equal to PEFT's with the weights copied in."""
from __future__ import annotations

import copy
import dataclasses
import json

import peft
import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, LlamaConfig

import peft_lab
from builders import VOCAB, small_gpt2, tiny
from peft_lab.core import fill_seeded
from peft_lab.interop import CONFIG_NAME, WEIGHTS_NAME, export_peft_adapter, import_peft_adapter
from peft_lab.measure import count_parameters, print_trainable_parameters
from peft_lab.prefix import (
    PrefixEncoder,
    PrefixModel,
    PrefixTuningModel,
    PromptEmbedding,
    PromptTuningModel,
    apply_prefix_tuning,
    apply_prompt_tuning,
    disable_prefix,
    fold_prefix_projection,
    load_prefix_state_dict,
    prefix_shapes,
    prefix_state_dict,
    remove_prefix,
)
from peft_lab.tolerance import COMMITTED, assert_close, is_close

pytestmark = pytest.mark.usefixtures("one_thread")
P = 5  # virtual tokens in the small tests
PEFT = "another library: with a projection PEFT runs the MLP once per batch row, we once for all rows"


def small_llama_gqa(seed: int = 0, layers: int = 2):
    """A random LLaMA with grouped-query attention: 4 query heads share 2 key/value heads."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return peft_lab.build_from_config(cfg, device="cpu", seed=seed)


MODELS = {"gpt2": small_gpt2, "llama-gqa": small_llama_gqa, "tiny": tiny}
METHODS = {  # ours, PEFT's config
    "prefix": (lambda m: apply_prefix_tuning(m, P),
               lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    "prefix+projection": (lambda m: apply_prefix_tuning(m, P, projection_dim=48),
                          lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                     prefix_projection=True, encoder_hidden_size=48)),
    "prompt": (lambda m: apply_prompt_tuning(m, P),
               lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
}


def batch(vocab: int, padding: str | None, b: int = 3, t: int = 9, seed: int = 0):
    """Token ids, attention mask and labels; rows 1 and 2 padded on ``padding``'s side (None: no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if padding == "left":
        mask[1:, :3], mask[2:, :1] = 0, 1
    elif padding == "right":
        mask[1:, -3:], mask[2:, -1:] = 0, 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def randomise(encoder: nn.Module, seed: int = 1, std: float = 0.3):
    fill_seeded(dict(encoder.named_parameters()), seed, std)


def pair(kind: str, method: str):
    """(ours, PEFT's) on two copies of one base, PEFT's encoder weights copied into ours one to one."""
    base = MODELS[kind]()
    ours_fn, config_fn = METHODS[method]
    theirs = get_peft_model(copy.deepcopy(base), config_fn())
    randomise(theirs.prompt_encoder["default"])
    ours = ours_fn(base)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())  # strict: same names
    return ours, theirs


def real_token_logits(theirs, out, length):
    return out.logits[:, -length:]  # PEFT's prompt tuning returns the P virtual positions too


# ---------------------------------------------------------------------------------------------------------
# Equivalence with PEFT
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_loss_and_gradients_match_peft(kind, method, padding):
    ours, theirs = pair(kind, method)
    ids, mask, labels = batch(ours.config.vocab_size, padding)
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == (*ids.shape, ours.config.vocab_size)  # aligned with the input tokens
    # With a projection PEFT runs the MLP once per batch row and we once for all rows (another summation order).
    assert_close(a.logits, real_token_logits(theirs, b, ids.shape[1]), reason=PEFT, what="logits")
    assert_close(a.loss, b.loss, reason=PEFT, what="loss")
    a.loss.backward()
    b.loss.backward()
    grads = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, p in ours.prompt_encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, grads[name].grad, reason=PEFT, what=name)
    assert all(p.grad is None for p in ours.base_model.parameters())  # the base is frozen


@pytest.fixture(scope="module")
def gpt2_small():
    return peft_lab.build_from_config("gpt2", device="cpu")


@pytest.mark.parametrize("method", list(METHODS))
def test_gpt2_small_architecture_matches_peft(gpt2_small, method):
    # 124M parameters: prompt learning leaves the base's modules untouched, so PEFT and we share one base.
    base = gpt2_small
    ours_fn, config_fn = METHODS[method]
    theirs = get_peft_model(base, config_fn())
    randomise(theirs.prompt_encoder["default"], std=0.05)
    ours = ours_fn(base)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    ids, mask, labels = batch(base.config.vocab_size, "right", b=2, t=8)
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits[:, -8:], reason=PEFT, what="gpt2 logits")
    a.loss.backward()
    b.loss.backward()
    grads = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, p in ours.prompt_encoder.named_parameters():
        assert_close(p.grad, grads[name].grad, reason=PEFT, what=name)
    remove_prefix(ours)  # the next method may wrap the same base


@pytest.mark.parametrize("method, trainable", [("prefix", 368_640), ("prompt", 15_360)])
def test_trainable_parameter_line_matches_peft_on_gpt2_small(capsys, method, trainable):
    base = peft_lab.build_from_config("gpt2", device="meta")  # counting needs shapes only
    config = (PrefixTuningConfig if method == "prefix" else PromptTuningConfig)(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=20)
    get_peft_model(copy.deepcopy(base), config).print_trainable_parameters()
    apply = apply_prefix_tuning if method == "prefix" else apply_prompt_tuning
    print_trainable_parameters(apply(base, 20))
    peft_line, our_line = capsys.readouterr().out.strip().splitlines()
    assert our_line == peft_line
    assert our_line.startswith(f"trainable params: {trainable:,d} ||")


def test_counts_follow_equation_04_3_with_grouped_query_attention():
    model = small_llama_gqa(layers=3)
    s = prefix_shapes(model.config)
    assert (s["num_kv_heads"], s["head_dim"], s["kv_dim"]) == (2, 16, 32)
    wrapped = apply_prefix_tuning(model, 7)
    assert count_parameters(wrapped)[0] == 3 * 2 * 7 * 32  # L · 2 · P · d_kv, not d
    theirs = get_peft_model(small_llama_gqa(layers=3), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7))
    assert theirs.get_nb_trainable_parameters()[0] == 3 * 2 * 7 * 32
    keys, values = wrapped.prefix_key_values(batch_size=2)[0]
    assert keys.shape == values.shape == (2, 2, 7, 16)  # batch × kv heads × P × head_dim
    assert count_parameters(apply_prompt_tuning(small_llama_gqa(), 7))[0] == 7 * 64  # P · d


@pytest.mark.parametrize("method", list(METHODS))
def test_twenty_training_steps_match_peft(method):
    ours, theirs = pair("tiny", method)
    vocab = ours.config.vocab_size
    losses = []
    for model in (ours, theirs):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for step in range(20):
            ids, mask, labels = batch(vocab, "right", b=4, t=12, seed=step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][0] != losses[0][-1]  # it did train
    # With a projection the gradient is summed in another order (~5e-9 apart per step) and Adam carries it along.
    assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), reason=PEFT, what="20-step loss curve")


@pytest.mark.parametrize("projection_dim", [None, 32])
def test_zero_init_is_peft_init_weights_zero(projection_dim):
    base = small_llama_gqa()
    ours = apply_prefix_tuning(copy.deepcopy(base), P, projection_dim=projection_dim, init="zero")
    assert (ours.prompt_encoder() == 0).all() and ours.prefix_config.init == "zero"
    if "init_weights" not in {f.name for f in dataclasses.fields(PrefixTuningConfig)}:
        pytest.skip(f"peft {peft.__version__} has no PrefixTuningConfig.init_weights to compare with")
    theirs = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, init_weights="zero",
                                                     prefix_projection=projection_dim is not None,
                                                     encoder_hidden_size=projection_dim))
    ids, mask, _ = batch(VOCAB, "left")
    with torch.no_grad():  # no weights copied: the zero prefix is the same prefix
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
    assert_close(a, b, reason=PEFT, what="logits")
    with pytest.raises(ValueError, match="init must be"):
        apply_prefix_tuning(small_gpt2(), P, init="vocab")


# ---------------------------------------------------------------------------------------------------------
# What the wrapper is: frozen base, registered encoder, positions, folding, removing
# ---------------------------------------------------------------------------------------------------------

def test_structure_and_frozen_base():
    model = apply_prefix_tuning(small_gpt2(), P)
    assert isinstance(model.prompt_encoder, PrefixEncoder) and isinstance(model, PrefixModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.embedding.weight"}
    assert "prompt_encoder.embedding.weight" in model.state_dict()
    assert model.prompt_encoder.embedding.weight.shape == (P, 2 * 2 * 64)  # P × L·2·d
    assert model.config is model.base_model.config
    text = repr(model)
    assert "prompt_encoder" in text and "method=prefix_tuning" in text
    prompt = apply_prompt_tuning(small_gpt2(), P)
    assert isinstance(prompt.prompt_encoder, PromptEmbedding)
    # one class per method, each injecting only its own input
    assert type(model) is PrefixTuningModel and type(prompt) is PromptTuningModel
    assert not hasattr(prompt, "prefix_key_values") and not hasattr(model, "prompt_embeddings")


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_real_tokens_sit_at_positions_p_onwards(kind):
    model = apply_prefix_tuning(MODELS[kind](), P)
    randomise(model.prompt_encoder)
    ids, mask, _ = batch(model.config.vocab_size, None)
    default = model(input_ids=ids, attention_mask=mask).logits
    # position_ids are shifted by P, as PEFT does: 0…T−1 given means P…P+T−1 used
    given = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None]).logits
    assert torch.equal(default, given)
    cache = model.prefix_cache(ids.shape[0])
    from_zero = model.base_model(input_ids=ids, attention_mask=torch.cat([torch.ones(3, P, dtype=torch.long), mask], 1),
                                 position_ids=torch.arange(ids.shape[1])[None], **{model._cache_arg: cache}).logits
    assert (from_zero - default).abs().max().item() > 1e-3  # starting at 0 is another model


def test_fold_projection_gives_identical_logits():
    model = apply_prefix_tuning(tiny(), P, projection_dim=32)
    randomise(model.prompt_encoder, std=0.1)
    ids, mask, _ = batch(model.config.vocab_size, "right")
    before = model(input_ids=ids, attention_mask=mask).logits
    trainable_before = count_parameters(model)[0]
    assert fold_prefix_projection(model) is model
    assert model.prompt_encoder.projection_dim is None and model.prefix_config.projection_dim is None
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert count_parameters(model)[0] == P * 4 * 2 * 128 < trainable_before
    fold_prefix_projection(model)  # idempotent


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_disable_and_remove_give_the_base_back_exactly(method):
    base = tiny()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    ids, mask, labels = batch(base.config.vocab_size, "right")
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    model = METHODS[method][0](base)
    randomise(model.prompt_encoder)
    peft_lab.train(model, [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids], steps=3, batch_size=3,
                   lr=1e-2, pad_id=0)
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - base_logits).abs().max() > 1e-3
        with disable_prefix(model):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base_logits)
    back = remove_prefix(model)
    assert back is base and all(torch.equal(reference[k], v) for k, v in back.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=mask).logits, base_logits)
    apply_prefix_tuning(back, 2)  # removed: may be wrapped again


def test_package_functions_work_unchanged(tiny):
    base, tok = tiny
    model = apply_prefix_tuning(copy.deepcopy(base), P)
    examples = peft_lab.encode_task(peft_lab.load_task("train", n=8), tok)
    hist = peft_lab.train(model, examples, steps=2, batch_size=4, lr=1e-2, pad_id=tok.eos_token_id)
    assert hist.trainable_params == count_parameters(model)[0] == P * 4 * 2 * 128
    val = peft_lab.load_task("val", n=8)
    with peft_lab.disable_prefix(model):  # evaluate_task sees the wrapper: switched off, it is the base
        off = peft_lab.evaluate_task(model, tok, val)
    assert off == peft_lab.evaluate_task(base, tok, val)
    heldout = peft_lab.load_heldout(n=4)
    with peft_lab.disable_prefix(model):
        assert peft_lab.perplexity(model, tok, heldout) == peft_lab.perplexity(base, tok, heldout)
    assert peft_lab.perplexity(model, tok, heldout) != peft_lab.perplexity(base, tok, heldout)
    mem = peft_lab.measure_memory(model, peft_lab.collate(examples[:4], tok.eos_token_id))
    assert mem["gradients"] == 4 * P * 4 * 2 * 128


def test_half_precision_base_gets_float32_prefix():
    base = small_gpt2().to(torch.bfloat16)
    model = apply_prefix_tuning(base, P)
    assert model.prompt_encoder.embedding.weight.dtype == torch.float32
    ids, mask, labels = batch(VOCAB, "right")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert model.prompt_encoder.embedding.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("text", ["review: the soup was cold . verdict:", "good"])  # cut to P / repeated to P
def test_prefix_from_text_is_the_base_model_reading_the_text_first(name, text):
    """Li & Liang's init (§7.2): the prefix holds the text's keys and values, so on an input X the model equals
    the base model on [text; X] at X's positions — GPT-2 (learned positions) and LLaMA (RoPE, grouped-query
    attention: 2 key/value heads for 4 query heads) alike."""
    base, tok = peft_lab.load_base_model(name, device="cpu")
    n = 7
    model = apply_prefix_tuning(copy.deepcopy(base), n, init="text", init_text=text, tokenizer=tok).eval()
    text_ids = tok(text)["input_ids"]
    text_ids = torch.tensor((text_ids * n)[:n])
    ids = torch.tensor([tok("review: the waiter was rude . verdict:")["input_ids"]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        reading = base(input_ids=torch.cat([text_ids[None], ids], 1)).logits[:, n:]
        plain = base(input_ids=ids).logits
    assert model.prefix_config.init == "text" and model.prefix_config.init_text == text
    assert not is_close(ours, plain, COMMITTED)  # the text does change what the model sees
    assert_close(ours, reading, reason="attention over a cache vs over one sequence: another order", what="logits")


def test_prompt_tuning_inits(tiny):
    base, tok = tiny
    words = base.get_input_embeddings().weight
    text = "review: verdict"
    model = apply_prompt_tuning(copy.deepcopy(base), 7, init="text", init_text=text, tokenizer=tok)
    ids = tok(text)["input_ids"]
    expected = words[torch.tensor((ids * 7)[:7])]
    assert torch.equal(model.prompt_encoder.embedding.weight, expected)
    assert model.prefix_config.init == "text" and model.prefix_config.init_text == text
    torch.manual_seed(3)
    vocab = apply_prompt_tuning(copy.deepcopy(base), 7, init="vocab")
    rows = vocab.prompt_encoder.embedding.weight
    assert all(any(torch.equal(r, w) for w in words) for r in rows)  # each row is a token's embedding


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------

def greedy(model, ids, mask, steps):
    """Reference decoding: the full forward pass again for every new token, argmax."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("kind", ["tiny", "llama-gqa"])
def test_generate_continues_as_forward_predicts_and_ignores_padding(kind, method):
    model = METHODS[method][0](MODELS[kind]())
    randomise(model.prompt_encoder, std=0.3 if method == "prefix" else 0.05)
    model.eval()
    vocab = model.config.vocab_size
    rows = [torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 6)]
    alone = []
    for r in rows:
        out = model.generate(input_ids=r, attention_mask=torch.ones_like(r), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        assert torch.equal(out, greedy(model, r, torch.ones_like(r), 6))
        alone.append(out[0, r.shape[1]:])
    # a left-padded batch: each row gets the continuation it gets alone
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - r.shape[1]:], mask[i, 9 - r.shape[1]:] = r[0], 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :9], ids)
    assert all(torch.equal(out[i, 9:], alone[i]) for i in range(2))
    with disable_prefix(model):
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain, model.base_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                        do_sample=False, pad_token_id=0))


# ---------------------------------------------------------------------------------------------------------
# PEFT's files
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_export_import_round_trip_is_bitwise(tmp_path, kind, method):
    model = METHODS[method][0](MODELS[kind]())
    randomise(model.prompt_encoder)
    export_peft_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert list(tensors) == ["prompt_embeddings"]  # PEFT's key, no "base_model.model."
    fresh = import_peft_adapter(MODELS[kind](), tmp_path)
    assert torch.equal(prefix_state_dict(fresh)["prompt_embeddings"], prefix_state_dict(model)["prompt_embeddings"])
    ids, mask, _ = batch(model.config.vocab_size, "left")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           fresh(input_ids=ids, attention_mask=mask).logits)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "PREFIX_TUNING")
    assert config["prefix_projection" if method != "prompt" else "prompt_tuning_init"] == \
        {"prefix": False, "prefix+projection": True, "prompt": "RANDOM"}[method]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_peft_loads_our_export(tmp_path, kind, method):
    model = METHODS[method][0](MODELS[kind]()).eval()
    randomise(model.prompt_encoder)
    export_peft_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    ids, mask, _ = batch(model.config.vocab_size, "right")
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    assert_close(a, b, reason=PEFT, what="logits")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_we_load_peft_save_pretrained(tmp_path, kind, method):
    theirs = get_peft_model(MODELS[kind](), METHODS[method][1]())
    randomise(theirs.prompt_encoder["default"])
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    ours = import_peft_adapter(MODELS[kind](), tmp_path).eval()
    ids, mask, _ = batch(ours.config.vocab_size, "left")
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    assert_close(a, b, reason=PEFT, what="logits")


def test_import_prefix_made_for_another_architecture(tmp_path):
    export_peft_adapter(apply_prefix_tuning(small_gpt2(), P), tmp_path / "gpt2")
    target = small_llama_gqa()
    with pytest.raises(ValueError, match="another architecture"):
        import_peft_adapter(target, tmp_path / "gpt2")
    export_peft_adapter(apply_prefix_tuning(small_llama_gqa(layers=3), P), tmp_path / "three")
    with pytest.raises(ValueError, match="num_layers"):
        import_peft_adapter(target, tmp_path / "three")
    assert not isinstance(target, PrefixModel) and apply_prefix_tuning(target, P)  # left as it came


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: each error names the argument, what it got and what to do
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, error, words", [
    (0, ValueError, "an integer >= 1, got 0"), (-3, ValueError, "an integer >= 1, got -3"), (2.5, TypeError, "2.5"),
    (True, TypeError, "True"), ("20", TypeError, "'20'"), (None, TypeError, "None")])
@pytest.mark.parametrize("apply", [apply_prefix_tuning, apply_prompt_tuning])
def test_bad_num_virtual_tokens(apply, value, error, words):
    with pytest.raises(error, match="num_virtual_tokens") as info:
        apply(small_gpt2(), value)
    assert words in str(info.value)


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), ("64", TypeError)])
def test_bad_projection_dim(value, error):
    """The same kinds of error as num_virtual_tokens (one checker for every count in the package)."""
    with pytest.raises(error, match="projection_dim must be an integer"):
        apply_prefix_tuning(small_gpt2(), P, projection_dim=value)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_sequence_longer_than_the_positions(method):
    model = METHODS[method][0](small_gpt2())  # 64 positions
    ids = torch.randint(0, VOCAB, (1, 64 - P + 1))
    with pytest.raises(ValueError, match=rf"{P} virtual tokens \+ {64 - P + 1} input tokens = 65 positions.*64"):
        model(input_ids=ids)
    model(input_ids=ids[:, :-1])  # exactly fits


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_attention_mask_and_labels_of_the_wrong_shape(method):
    model = METHODS[method][0](small_gpt2())
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of the input, \(2, 8\).*\(2, 13\)"):
        model(input_ids=ids, attention_mask=torch.ones(2, 8 + P, dtype=torch.long))  # a mask with the prefix
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="2-D tensor of token ids"):
        model(input_ids=ids[0])
    with pytest.raises(ValueError, match="exactly one of"):
        model()


def test_gradient_checkpointing_is_refused():
    base = small_gpt2()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        apply_prefix_tuning(base, P)
    model = apply_prefix_tuning(small_gpt2(), P)
    model.base_model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        model(input_ids=torch.randint(0, VOCAB, (1, 4)))


def test_model_without_a_cache_path():
    class NoCache(nn.Module):
        config = GPT2Config(n_layer=1, n_embd=8, n_head=2)

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.lin(input_ids)

    with pytest.raises(TypeError, match="takes no key/value cache"):
        apply_prefix_tuning(NoCache(), P)
    with pytest.raises(TypeError, match="causal language model"):
        apply_prefix_tuning(nn.Linear(2, 2), P)


def test_applying_twice():
    base = small_gpt2()
    model = apply_prefix_tuning(base, P)
    with pytest.raises(ValueError, match="already carries prefix tuning.*remove_prefix"):
        apply_prefix_tuning(model, P)
    with pytest.raises(ValueError, match="already has virtual tokens"):
        apply_prompt_tuning(base, P)  # the base is held by a wrapper


def test_other_bad_uses(tiny):
    base, tok = tiny
    with pytest.raises(ValueError, match="needs tokenizer"):
        apply_prompt_tuning(copy.deepcopy(base), P, init="text", init_text="a review")
    with pytest.raises(ValueError, match="init='text', init_text='a review'"):
        apply_prompt_tuning(copy.deepcopy(base), P, init="a review", tokenizer=tok)
    prompt = apply_prompt_tuning(copy.deepcopy(base), P)
    ids = torch.randint(0, 100, (1, 4))
    with pytest.raises(ValueError, match="position_ids are not supported with prompt tuning"):
        prompt(input_ids=ids, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="num_return_sequences"):
        prompt.generate(input_ids=ids, num_return_sequences=2)
    with pytest.raises(TypeError, match="PrefixModel"):
        fold_prefix_projection(base)
    with pytest.raises(ValueError, match=r"this model needs \(5, 128\)"):
        load_prefix_state_dict(prompt, {"prompt_embeddings": torch.zeros(5, 64)})
    with pytest.raises(ValueError, match="prompt_embeddings"):
        load_prefix_state_dict(prompt, {"embedding.weight": torch.zeros(5, 128)})


def test_failed_load_leaves_a_projected_prefix_unchanged():
    """Every check runs before the projection is folded: an integer tensor of the right shape is refused
    with the reparameterization MLP still in place."""
    from peft_lab.prefix import load_prefix_state_dict
    model = apply_prefix_tuning(tiny(), P, projection_dim=32)
    encoder, config = model.prompt_encoder, model.prefix_config
    shape = (P, config.num_layers * 2 * config.token_dim)
    for bad, error in [({"prompt_embeddings": torch.zeros(shape, dtype=torch.int64)}, TypeError),
                       ({"prompt_embeddings": torch.zeros(3, 3)}, ValueError),
                       ({"prompt_embeddings": torch.zeros(shape), "extra": torch.zeros(1)}, ValueError),
                       ([("prompt_embeddings", torch.zeros(shape))], TypeError)]:
        with pytest.raises(error):
            load_prefix_state_dict(model, bad)
        assert model.prompt_encoder is encoder and encoder.projection_dim == 32
        assert model.prefix_config == config
    load_prefix_state_dict(model, {"prompt_embeddings": torch.ones(shape)})   # a good one folds and loads
    assert model.prompt_encoder.projection_dim is None
    assert torch.equal(model.prompt_encoder.embedding.weight, torch.ones(shape))
