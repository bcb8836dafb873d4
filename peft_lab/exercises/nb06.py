"""Exercises of notebook 06 (head to head; both are *build* exercises, graded on configs the notebook never
shows). Expected answers are computed by the package or PEFT, not stored."""
from __future__ import annotations

from functools import lru_cache

from . import exercise

GiB = 2**30


# ----------------------------------------------------------------------------------------------------------
# 06.ex1: IA3's trainable parameters on any GPT-2 or LLaMA config, against PEFT itself
# ----------------------------------------------------------------------------------------------------------

def _ia3_configs() -> list:
    """The configs the student's function is run on: the course's two tiny models, gpt2-small, and two made-up
    shapes (a GPT-2 with its own feed-forward width, a LLaMA with grouped-query attention and 1 KV head)."""
    from transformers import GPT2Config, LlamaConfig

    from ..models import architecture_config
    # the made-up LLaMA comes before tiny-llama, whose KV width d/2 makes two different mistakes give one number
    return [architecture_config("tiny"),
            GPT2Config(n_embd=96, n_layer=3, n_head=4, n_inner=200, vocab_size=50, n_positions=16),
            LlamaConfig(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=1,
                        num_hidden_layers=2, vocab_size=50, max_position_embeddings=16),
            architecture_config("tiny-llama"), architecture_config("gpt2")]


def _ia3_counted(config) -> int:
    """Trainable parameters of PEFT's IA3 with its default targets, on ``config`` built on the meta device."""
    return _ia3_counted_json(config.to_json_string())


@lru_cache(maxsize=None)
def _ia3_counted_json(config_json: str) -> int:
    import json
    import warnings

    import peft
    from transformers import AutoConfig

    from ..measure import count_parameters
    from ..models import build_from_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on GPT-2's Conv1D and fan_in_fan_out
        config = json.loads(config_json)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        model = peft.get_peft_model(build_from_config(config, device="meta"), peft.IA3Config(task_type="CAUSAL_LM"))
    return count_parameters(model)[0]


def _ia3_shape(config) -> tuple[str, int, int, int, int]:
    """(model type, layers L, width d, key/value width, feed-forward width) read from the config."""
    from .. import arch
    if config.model_type == "gpt2":
        d = config.n_embd
        return "gpt2", config.n_layer, d, d, config.n_inner or 4 * d
    kv = arch.num_kv_heads(config) * arch.head_dim(config)
    return config.model_type, config.num_hidden_layers, config.hidden_size, kv, config.intermediate_size


def _ia3_hint(config, got) -> str:
    kind, L, d, kv, ff = _ia3_shape(config)
    if kind == "gpt2":
        if got == L * (2 * d + ff):
            return (" GPT-2's c_attn is one fused projection: its output is queries, keys and values (3·d), and IA3 "
                    "scales all of it.")
        if got == L * (3 * d + 4 * d) or got == L * 3 * d:
            return (" The feed-forward vector scales the input of mlp.c_proj, whose width is n_inner (4·d only when "
                    "n_inner is None).")
        return " PEFT's IA3 on GPT-2 targets c_attn (its output) and mlp.c_proj (its input), in every block."
    if got == L * (d + 2 * kv + ff) or got == L * (3 * d + ff):
        return " PEFT's IA3 on LLaMA targets k_proj and v_proj, not q_proj."
    if got == L * (2 * d + ff):
        return (" With grouped-query attention k_proj and v_proj output num_key_value_heads·head_dim, "
                "not hidden_size.")
    if got == L * (2 * kv + d):
        return " The feed-forward vector scales the input of down_proj, whose width is intermediate_size."
    return (" PEFT's defaults are in peft.utils.constants (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and "
            "..._FEEDFORWARD_MODULES_MAPPING).")


@exercise("06.ex1", "Write ia3_params(config) -> the trainable parameters PEFT's IA3 (default targets) adds to a "
                    "GPT-2 or LLaMA model with that transformers config.",
          kind="build", hidden=lambda: [])
def _ia3_params(answer):
    for config in _ia3_configs():
        label = f"{config.model_type} config (L={_ia3_shape(config)[1]}, d={_ia3_shape(config)[2]})"
        try:
            got = answer(config)
        except Exception as err:  # the student's code failed: say where, not a traceback from here
            return False, f"ia3_params on a {label} raised {type(err).__name__}: {err}"
        if got is None or got is ...:
            return False, "your function returns nothing yet: return the count."
        expected = _ia3_counted(config)
        if got != expected:
            return False, (f"on a {label} you return {got!r}; PEFT's IA3 trains {expected:,}."
                           + _ia3_hint(config, got))
    return True, ("one learned vector per scaled activation: GPT-2 L·(3d + d_ff) (c_attn's fused q, k, v output and "
                  "mlp.c_proj's input); LLaMA L·(2·n_kv·head_dim + intermediate_size) (k_proj, v_proj outputs and "
                  "down_proj's input) — equal to PEFT on every config, grouped-query attention included.")


# ----------------------------------------------------------------------------------------------------------
# 06.ex2: the largest batch that fits a memory budget, by the calculator
# ----------------------------------------------------------------------------------------------------------

# (architecture, method, precision, sequence length, budget in GiB): a 24 GiB card with and without the 4-bit
# base, a 16 GiB card with a prompt, an 80 GiB card where full fine-tuning of a 7B model does not fit at all
_BUDGET_CASES = (("llama-7b", "LoRA r=8", "bf16-mixed", 512, 24), ("llama-7b", "LoRA r=8", "4bit-base", 512, 24),
                 ("gpt2-large", "prompt", "bf16-mixed", 1024, 16), ("gpt2-xl", "full FT", "fp32", 1024, 40),
                 ("llama-7b", "full FT", "bf16-mixed", 512, 80))


def _total(size, method, precision, seq_len, batch):
    from ..compare import calculator
    return calculator(method, size, batch_size=batch, seq_len=seq_len, precision=precision)["total"]


def _largest_batch(size, method, precision, seq_len, budget_gib, limit: int = 1024) -> int:
    """The largest batch whose calculator total is at most ``budget_gib`` GiB (0 when batch 1 does not fit)."""
    batch = 0
    while batch < limit and _total(size, method, precision, seq_len, batch + 1) <= budget_gib * GiB:
        batch += 1
    return batch


@exercise("06.ex2", "Write largest_batch(size, method, precision, seq_len, budget_gib) -> the largest batch size "
                    "whose training step fits budget_gib GiB by compare.calculator (0 if none).",
          kind="build", hidden=lambda: [])
def _budget(answer):
    found = []
    for size, method, precision, seq_len, budget in _BUDGET_CASES:
        call = f"largest_batch({size!r}, {method!r}, {precision!r}, {seq_len}, {budget})"
        try:
            got = answer(size, method, precision, seq_len, budget)
        except Exception as err:
            return False, f"{call} raised {type(err).__name__}: {err}"
        if got is None or got is ...:
            return False, "your function returns nothing yet: return a batch size."
        expected = _largest_batch(size, method, precision, seq_len, budget)
        if got == expected:
            found.append(got)
            continue
        fits = lambda b: b == 0 or _total(size, method, precision, seq_len, b) <= budget * GiB  # noqa: E731
        if not isinstance(got, int) or isinstance(got, bool) or got < 0:
            why = "a batch size is a whole number ≥ 0."
        elif not fits(got):
            why = (f"batch {got} needs {_total(size, method, precision, seq_len, got) / GiB:.2f} GiB, over the "
                   f"budget." + (" Return 0 when even batch 1 does not fit." if got == 1 else
                                 " Off by one? Return the last batch that fits, not the first that does not."))
        elif got == _largest_batch(size, method, precision, seq_len, budget * 1e9 / GiB):
            why = "1 GiB is 2**30 bytes, not 10**9."
        else:
            why = (f"batch {got + 1} fits too ({_total(size, method, precision, seq_len, got + 1) / GiB:.2f} GiB); "
                   "is the calculator called with your arguments (precision, seq_len)?")
        return False, f"{call} returned {got!r}, expected {expected}: {why}"
    return True, (f"on a 24 GiB card LoRA r=8 on LLaMA-2 7B trains {found[0]} sequences of 512 tokens per step in "
                  f"bf16, {found[1]} with the base in 4 bits: the frozen weights shrink, the activations per "
                  "sequence do not, so the gain is far less than the 4x of the weights.")
