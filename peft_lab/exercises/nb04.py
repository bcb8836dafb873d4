"""Exercises of notebook 04 (prefix tuning and prompt tuning). Expected answers are computed, not stored: the
counts by building the prefix on the meta device, the memory of 04.ex2 by measuring it, the debugged prefix of
04.ex3 against the package's prefix tuning."""
from __future__ import annotations

import functools
import math

import torch

from ..tolerance import is_close  # student's order of operations vs ours: float32 reordering
from . import exercise, number, run_student
from .hinted import hinted


def _configs():
    from transformers import GPT2Config, LlamaConfig
    return {
        "gpt2-small": GPT2Config(n_layer=12, n_embd=768, n_head=12),
        "a 4-layer GPT-2 of width 128": GPT2Config(n_layer=4, n_embd=128, n_head=4),
        "LLaMA-3-8B shape (32 heads, 8 key/value heads)": LlamaConfig(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, vocab_size=128256),
        "a small GQA model (6 heads, 2 key/value heads, head_dim 32)": LlamaConfig(
            hidden_size=192, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=256, vocab_size=100),
    }


def _prefix_count(config, num_virtual_tokens: int) -> int:
    """Equation (04.3), counted on a real prefix: build it on the meta device and add up ``numel``."""
    from ..prefix import PrefixEncoder, prefix_shapes
    s = prefix_shapes(config)
    encoder = PrefixEncoder(num_virtual_tokens, s["num_layers"], s["kv_dim"], device="meta")
    return sum(p.numel() for p in encoder.parameters())


@exercise("04.ex1", "Write prefix_params(config, num_virtual_tokens) -> int: the number of trainable parameters "
                    "of prefix tuning (no reparameterization) for a transformers config — GPT-2 (n_layer, n_embd, "
                    "n_head) or LLaMA (num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads). "
                    "Pass the function itself.", kind="build", hidden=lambda: [])
def _count_function(answer):
    for name, config in _configs().items():
        for P in (1, 20):
            expected = _prefix_count(config, P)
            got = answer(config, P)
            if isinstance(got, bool) or not isinstance(got, (int, float)) and not hasattr(got, "item"):
                raise TypeError(f"prefix_params returned {got!r}; return a number")
            got = int(got.item() if hasattr(got, "item") else got)
            if got != expected:
                L, d = config.num_hidden_layers, config.hidden_size
                hint = ""
                if got == L * 2 * P * d and expected != got:
                    hint = (" You used the model width d; with grouped-query attention the keys and values have "
                            "num_key_value_heads · head_dim features per token, fewer than d.")
                elif got * 2 == expected:
                    hint = " Keys AND values: each layer stores two P × d_kv tensors."
                elif got == 2 * P * d or got == P * d:
                    hint = " Every layer gets its own prefix: multiply by the number of layers."
                return False, f"for {name} with P = {P} you return {got:,}, the prefix has {expected:,}.{hint}"
    return True, ("L · 2 · P · d_kv, with d_kv = num_key_value_heads · head_dim (= d without grouped-query "
                  "attention): e.g. 368,640 for gpt2-small and P = 20, and 4× fewer than L · 2 · P · d on a model "
                  "with 8 of 32 heads for keys and values.")


@functools.lru_cache(maxsize=None)
def _activation_ratio(P: int) -> tuple[float, float, float]:
    """Measured activation bytes of prompt tuning and of prefix tuning with ``P`` virtual tokens on the tiny model,
    for notebook 04's memory batch (the first 16 training reviews), and the ratio of the two."""
    import copy

    from ..data import collate, encode_task, load_task
    from ..measure import measure_memory
    from ..models import load_base_model
    from ..prefix import apply_prefix_tuning, apply_prompt_tuning
    base, tok = load_base_model("tiny", device="cpu")
    batch = collate(encode_task(load_task("train", n=16), tok), pad_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prompt = measure_memory(apply_prompt_tuning(copy.deepcopy(base), P), batch)["activations"]
        prefix = measure_memory(apply_prefix_tuning(copy.deepcopy(base), P), batch)["activations"]
    return prompt, prefix, prompt / prefix


PREDICT_P = 32


@exercise("04.ex2", f"Predict, then measure: on the tiny model with section 5's memory batch (16 reviews, T = 29 "
                    f"tokens), prompt tuning and prefix tuning both with P = {PREDICT_P} virtual tokens. Prompt "
                    "tuning's activation memory is how many times prefix tuning's? Write your prediction (a ratio) "
                    "before you run the check, which measures both; within 10% counts.",
          kind="predict", hidden=lambda: [f"{_activation_ratio(PREDICT_P)[2]:.2f}",
                                          f"{_activation_ratio(PREDICT_P)[2]:.3f}"])
def _predict_activations(answer):
    prompt, prefix, ratio = _activation_ratio(PREDICT_P)
    T = 29
    ok, _ = number(answer, ratio, rel_tol=0.10)
    measured = (f"measured: prompt tuning {prompt / 2**20:.1f} MiB of activations, prefix tuning "
                f"{prefix / 2**20:.1f} MiB, a ratio of {ratio:.2f}")
    guess = float(answer)
    if ok:
        return True, (f"{measured}; you said {guess:.3g}. (T + P) / T = {(T + PREDICT_P) / T:.2f} is the first guess: "
                      "prompt tuning runs every layer on T + P positions. The measured ratio is a little lower, "
                      "because prefix tuning's own activations grow too: its score matrices are T × (P + T).")
    if math.isclose(guess, 1.0, rel_tol=0.05):
        return False, ("both train about the same few numbers, but memory here is activations, not parameters: "
                       "how many positions does each layer process with a prompt, and with a prefix? Try again.")
    if guess < 1:
        return False, ("prompt tuning stores more activations than prefix tuning, not fewer: which method makes "
                       "every layer process extra positions? Try again.")
    return False, (f"{guess:g} is {'too high' if guess > ratio else 'too low'} (more than 10% off): count the "
                   f"positions each layer processes with a prompt (T + P) and with a prefix (T queries), with "
                   f"T = {T} and P = {PREDICT_P}. Try again.")


def _mask_fixed_reference(model, table, input_ids, attention_mask):
    """What the broken snippet of 04.ex3 should compute: prefix tuning with ``table`` in PEFT's layout."""
    from ..prefix import apply_prefix_tuning
    P = table.shape[0]
    prefixed = apply_prefix_tuning(model, P)
    try:
        with torch.no_grad():
            prefixed.prompt_encoder.embedding.weight.copy_(table)
            return prefixed(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        from ..prefix import remove_prefix
        remove_prefix(prefixed)


@exercise("04.ex3", "Debug: prefix_logits(model, table, input_ids, attention_mask) hands a prefix table (PEFT's "
                    "layout, P × L·2·d_kv) to a frozen model as its key/value cache, runs without an error, and yet "
                    "its logits are not prefix tuning's, so a prefix trained through it learns the wrong thing. "
                    "Find the bug, fix it, and pass the fixed function.", kind="debug", hidden=lambda: [])
def _debug_mask(answer):
    import copy

    from ..models import build_from_config, load_base_model
    from ..prefix import prefix_shapes
    g = torch.Generator().manual_seed(43)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(43)
        models = {"tiny (GPT-2)": load_base_model("tiny", device="cpu")[0],
                  "tiny-llama (RoPE, grouped-query attention)": build_from_config("tiny-llama", device="cpu").eval()}
    for name, model in models.items():
        s = prefix_shapes(model.config)
        for P, lengths in ((3, (6, 4)), (7, (5, 5, 2))):
            table = torch.randn(P, s["num_layers"] * 2 * s["kv_dim"], generator=g)
            T = max(lengths)
            ids = torch.randint(0, model.config.vocab_size, (len(lengths), T), generator=g)
            mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])          # right padding
            want = _mask_fixed_reference(copy.deepcopy(model), table, ids, mask)
            with torch.no_grad():
                got = run_student(answer, copy.deepcopy(model), table.clone(), ids, mask)
            got = getattr(got, "logits", got)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                return False, f"on {name} with P = {P} return the logits of the real tokens, shape " \
                              f"{tuple(want.shape)}; got {shape}."
            real = mask.bool()
            if not is_close(got[real], want[real]):
                return False, (f"on {name} with P = {P} the logits differ from prefix tuning's by up to "
                               f"{(got[real] - want[real]).abs().max().item():.3g}. The cache now holds P + T "
                               "positions: does every part of the input the model is given know that?")
    return True, ("the attention mask has to cover the cache too: P ones in front of it, so that every real token "
                  "may attend to the whole prefix. A mask of only T columns does not describe the P + T keys the "
                  "model attends to: no error, just another model.")


@exercise("04.ex4", "GPT-2 has 1024 positions. With a prefix of P = 20 virtual tokens (as PEFT places it), how many "
                    "real tokens can one input have at most? (An exact whole number.)", kind="compute",
          hidden=lambda: ["1004", "1,004"])
def _positions(answer):
    n, P = 1024, 20
    return hinted(answer, n - P, rel_tol=1e-9,
                   mistakes={n: "the prefix takes positions 0…P−1, so the real tokens start at P (equation 04.5).",
                             n - 2 * P: "the prefix uses P positions once, not once for keys and once for values."},
                   explain="the real tokens sit at positions P…P+T−1, which must stay below 1024.",
                   hint="where does the first real token sit (equation 04.5), and where must the last one stay?")


def _text_models():
    """The models 04.ex5 is graded on: the shipped tiny GPT-2, and tiny-llama's architecture (RoPE, 4 query
    heads sharing 2 key/value heads) with random weights — the property holds for any weights."""
    from ..models import build_from_config, load_base_model
    torch.manual_seed(5)
    return {"tiny (GPT-2)": load_base_model("tiny", device="cpu")[0],
            "tiny-llama (RoPE, grouped-query attention)": build_from_config("tiny-llama", device="cpu").eval()}


def _swap_keys_values(table: torch.Tensor, num_layers: int) -> torch.Tensor:
    P = table.shape[0]
    t = table.view(P, num_layers, 2, -1)
    return t.flip(2).reshape(P, -1)


@exercise("04.ex5", "Write text_prefix(model, ids) -> table: the P × (L·2·d_kv) prefix table (PEFT's layout, the "
                    "one apply_prefix_tuning's prompt_encoder.embedding.weight holds) that makes the model, on any "
                    "input X, compute exactly what the frozen model computes on [text; X] at X's positions — Li & "
                    "Liang's initialisation from real words. ids is a 1-D tensor of the text's P token ids. Pass "
                    "the function itself.", kind="build", hidden=lambda: [])
def _text_prefix(answer):
    import copy

    from ..prefix import _text_key_values, apply_prefix_tuning, prefix_shapes
    g = torch.Generator().manual_seed(5)
    for name, model in _text_models().items():
        s = prefix_shapes(model.config)
        vocab = model.config.vocab_size
        x = torch.randint(0, vocab, (2, 6), generator=g)
        for P in (3, 7):
            ids = torch.randint(0, vocab, (P,), generator=g)
            with torch.no_grad():
                table = run_student(answer, copy.deepcopy(model), ids.clone())
            want_shape = (P, s["num_layers"] * 2 * s["kv_dim"])
            if not isinstance(table, torch.Tensor) or tuple(table.shape) != want_shape:
                got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
                hint = (" With grouped-query attention a layer stores num_key_value_heads · head_dim numbers per "
                        "token for keys (and as many for values), fewer than the width d."
                        if isinstance(table, torch.Tensor) and table.numel() > P * want_shape[1] else "")
                return False, f"on {name} with P = {P} the table must have shape {want_shape}, got {got}.{hint}"
            prefixed = apply_prefix_tuning(copy.deepcopy(model), P)
            with torch.no_grad():
                prefixed.prompt_encoder.embedding.weight.copy_(table.detach().float())
                got = prefixed(input_ids=x).logits
                want = model(input_ids=torch.cat([ids.expand(2, -1), x], 1)).logits[:, P:]
            if is_close(got, want):
                continue
            right = _text_key_values(model, ids)
            swapped = _swap_keys_values(right, s["num_layers"])
            if torch.allclose(table.float(), swapped, atol=1e-5, rtol=1e-4):
                why = "keys and values are swapped: per layer, PEFT's layout holds the keys first, then the values."
            elif torch.allclose(table.float().flatten().sort().values, right.flatten().sort().values,
                                atol=1e-5, rtol=1e-4):
                why = ("the numbers are the right ones in the wrong places: one row per virtual token, and within it "
                       "layer by layer, keys then values, head by head (the inverse of view(B, P, 2L, h_kv, d_h)"
                       ".permute(2, 0, 3, 1, 4)).")
            else:
                why = ("the model does not read X as if the text came first. The keys and values must be the frozen "
                       "model's own, for the text at positions 0…P−1 (its key/value cache: use_cache=True), "
                       "on a model in eval mode.")
            return False, f"on {name} with P = {P} the logits on X differ by up to " \
                          f"{(got - want).abs().max().item():.3g} from the base model on [text; X]: {why}"
    return True, ("the prefix is the text's key/value cache: the real tokens then attend to it exactly as to the "
                  "text, and with PEFT's position shift (eq. 04.5) they also sit at the text's positions P…P+T−1 — "
                  "on GPT-2 and on a RoPE/GQA model alike.")
