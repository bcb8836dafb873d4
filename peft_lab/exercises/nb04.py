"""Exercises of notebook 04 (prefix tuning and prompt tuning). Expected answers are computed, not stored: the
counts by building the prefix on the meta device, the attention by PyTorch's own
``scaled_dot_product_attention``."""
from __future__ import annotations

import math

import torch

from ..tolerance import is_close  # student's order of operations vs ours: float32 reordering
from . import exercise, number, run_student


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
                    "Pass the function itself.")
def _count_function(answer):
    if not callable(answer):
        raise TypeError(f"expected a function prefix_params(config, num_virtual_tokens), got {type(answer).__name__}")
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


def _reference_attention(q, k, v, pk, pv):
    """SDPA over [prefix; input] with a boolean mask: every query sees the whole prefix and inputs up to itself."""
    T, P = q.shape[-2], pk.shape[-2]
    mask = torch.cat([torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, torch.cat([pk, k], -2), torch.cat([pv, v], -2),
                                                            attn_mask=mask)


@exercise("04.ex2", "Write prefix_attention(q, k, v, pk, pv) -> output for one head: q, k, v are T × d_h (causal: "
                    "token t sees inputs 0…t), pk, pv are P × d_h (every token sees the whole prefix); scaled "
                    "dot-product softmax attention over [prefix; input] (equation 04.1), returning T × d_h. "
                    "Pass the function itself.")
def _attention_function(answer):
    if not callable(answer):
        raise TypeError(f"expected a function prefix_attention(q, k, v, pk, pv), got {type(answer).__name__}")
    g = torch.Generator().manual_seed(4)
    for T, P, dh in [(5, 3, 8), (1, 1, 4), (7, 12, 16)]:
        q, k, v = (torch.randn(T, dh, generator=g) for _ in range(3))
        pk, pv = (torch.randn(P, dh, generator=g) for _ in range(2))
        expected = _reference_attention(q, k, v, pk, pv)
        got = answer(q, k, v, pk, pv)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (T, dh):
            return False, (f"for T={T}, P={P}, d_h={dh} the output should be a {T} × {dh} tensor, got "
                           f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        if not is_close(got, expected):
            causal_free = torch.nn.functional.scaled_dot_product_attention(
                q, torch.cat([pk, k]), torch.cat([pv, v]))
            no_scale = _reference_attention(q * math.sqrt(dh), k, v, pk, pv)
            if is_close(got, causal_free):
                why = "token t must not see inputs after t: mask the input part causally (the prefix stays visible)."
            elif is_close(got, no_scale):
                why = "divide the scores by √d_h."
            else:
                why = "compare with softmax([q pkᵀ, q kᵀ + causal mask] / √d_h) · [pv; v]."
            return False, f"for T={T}, P={P}, d_h={dh} the output differs by up to " \
                          f"{(got - expected).abs().max().item():.3g}: {why}"
    return True, "the softmax runs over P + T keys; split it into λ and 1 − λ and you get equation (04.2)."


@exercise("04.ex3", "Prompt tuning with P = 20 virtual tokens on LLaMA-2 7B (width d = 4096, 32 layers): how many "
                    "trainable parameters?")
def _prompt_count(answer):
    P, d, L = 20, 4096, 32
    return number(answer, P * d, rel_tol=1e-9,
                  mistakes={L * 2 * P * d: "that is prefix tuning (keys and values in all 32 layers); prompt "
                                           "tuning only adds P input embeddings.",
                            2 * P * d: "prompt tuning learns embeddings, not keys and values: one vector per "
                                       "virtual token.",
                            L * P * d: "only the input layer gets virtual tokens in prompt tuning."},
                  explain=f"P · d = 20 × 4096 = {P * d:,}: 0.001% of the 6.7B weights, 64× fewer than prefix "
                          "tuning's L · 2 · P · d.")


@exercise("04.ex4", "GPT-2 has 1024 positions. With a prefix of P = 20 virtual tokens (as PEFT places it), how many "
                    "real tokens can one input have at most?")
def _positions(answer):
    n, P = 1024, 20
    return number(answer, n - P, rel_tol=1e-9,
                  mistakes={n: "the prefix takes positions 0…P−1, so the real tokens start at P (equation 04.5).",
                            n - 2 * P: "the prefix uses P positions once, not once for keys and once for values."},
                  explain=f"1024 − 20 = {n - P}: the real tokens sit at positions P…P+T−1, which must stay below "
                          "1024.")


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
                    "the function itself.")
def _text_prefix(answer):
    import copy

    from ..prefix import _text_key_values, apply_prefix_tuning, prefix_shapes
    if not callable(answer):
        raise TypeError(f"expected a function text_prefix(model, ids), got {type(answer).__name__}")
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
