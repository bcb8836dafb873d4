"""Exercises of notebook 07 (scale out). Expected answers are computed by :mod:`peft_lab.scale_out`, not stored:
bytes per rank by ``zero_bytes_per_rank`` (equation 07.1), shard sizes by ``fsdp_elements_per_rank`` (torch's
``chunk`` split, what FSDP2 does)."""
from __future__ import annotations

import math

from . import exercise, number, run_student

# (architecture, trainable parameters or None for full fine-tuning, precision): GPT-2 and LLaMA shapes, fp32 and
# mixed precision, where the master copy has to move from the parameters to the optimizer state.
_CASES = (("tiny", None, "fp32"), ("tiny", 16_384, "fp32"), ("gpt2", None, "bf16-mixed"),
          ("gpt2", 294_912, "bf16-mixed"), ("llama-7b", 4_194_304, "bf16-mixed"), ("llama-7b", None, "fp32"))
_RANKS = (1, 3, 8)


def _as_float(got, call: str) -> float:
    if isinstance(got, dict) and "total" in got:
        got = got["total"]
    if got is None or got is ...:
        raise ValueError(f"{call} returned nothing yet: return the bytes (a number)")
    if isinstance(got, bool) or not isinstance(got, (int, float)) and not hasattr(got, "item"):
        raise TypeError(f"{call} returned {type(got).__name__}; return a number of bytes")
    return float(got.item() if hasattr(got, "item") else got)


def _variants(arch, trainable, precision, ranks, stage) -> dict[str, float]:
    """Known wrong answers, each computed the wrong way on purpose, with the hint that names the mistake."""
    from ..estimate import estimate_memory
    est = estimate_memory(arch, trainable_params=trainable, batch_size=0, precision=precision)
    W, G, O = est["parameters"], est["gradients"], est["optimizer"]
    out = {"all of the model states divided by the ranks at every stage: stage s shards only optimizer state "
           "(s ≥ 1), gradients (s ≥ 2), parameters (s = 3).": (W + G + O) / ranks,
           "the fp32 master copy is optimizer state under ZeRO (sharded from stage 1): move it out of "
           "estimate_memory's parameters.": W / ranks ** (stage >= 3) + G / ranks ** (stage >= 2)
           + O / ranks ** (stage >= 1),
           "nothing divided: that is plain data parallelism (stage 0) whatever the stage.": W + G + O}
    if stage == 2:
        out["stage 2 shards optimizer state and gradients, not the parameters."] = (W + G + O) / ranks
    return out


@exercise("07.ex1", "Write bytes_per_rank(arch, ranks, stage, trainable_params=None, precision='fp32') -> the bytes "
                    "of parameters + gradients + optimizer state one of `ranks` processes holds under ZeRO stage "
                    "`stage` (0–3), from peft_lab.estimate_memory(..., batch_size=0) and equation (07.1). "
                    "Pass the function itself.")
def _bytes_per_rank(answer):
    if not callable(answer):
        raise TypeError(f"expected a function bytes_per_rank(arch, ranks, stage, ...), got {type(answer).__name__}")
    from ..scale_out import zero_bytes_per_rank
    for arch, trainable, precision in _CASES:
        for ranks in _RANKS:
            for stage in range(4):
                call = (f"bytes_per_rank({arch!r}, {ranks}, {stage}, trainable_params={trainable}, "
                        f"precision={precision!r})")
                got = _as_float(run_student(answer, arch, ranks, stage, trainable_params=trainable,
                                            precision=precision), call)
                expected = zero_bytes_per_rank(arch, ranks, stage, trainable_params=trainable,
                                               precision=precision)["total"]
                if math.isclose(got, expected, rel_tol=1e-9):
                    continue
                fallback = (f"compare your three terms with (07.1): which of W, G, O does stage {stage} divide by "
                            f"the {ranks} ranks?")
                hint = next((why for why, wrong in _variants(arch, trainable, precision, ranks, stage).items()
                             if math.isclose(got, wrong, rel_tol=1e-9)), fallback)
                return False, f"{call} returned {got:,.0f}, a rank holds {expected:,.0f} B: {hint}"
    return True, ("W/n^[s≥3] + G/n^[s≥2] + O/n^[s≥1], with the master copy counted in O: equal to "
                  "zero_bytes_per_rank on GPT-2 and LLaMA shapes, full FT and frozen bases, fp32 and bf16-mixed.")


@exercise("07.ex2", "Full fine-tuning of llama-7b in bf16 mixed precision: at least how many GPUs of 24 GiB does "
                    "it need under ZeRO stage 3, counting model states only?")
def _gpus(answer):
    from ..scale_out import zero_bytes_per_rank
    budget = 24 * 2**30
    need = {s: next(n for n in range(1, 4096) if zero_bytes_per_rank("llama-7b", n, s, precision="bf16-mixed")
                    ["total"] <= budget) for s in (2, 3)}
    total = zero_bytes_per_rank("llama-7b", 1, 3, precision="bf16-mixed")["total"]
    mistakes = {need[2]: "that is stage 2: the bf16 weights stay whole on every GPU there; stage 3 shards them.",
                math.floor(total / budget): "round up: that many GPUs hold slightly less than the model states."}
    mistakes.pop(need[3], None)
    if isinstance(answer, float) and not answer.is_integer():
        return False, f"{answer} GPUs: a count of GPUs is a whole number (round up)."
    return number(answer, need[3], rel_tol=1e-9, mistakes=mistakes,
                  explain=f"16 B per parameter · {total / 16e9:.2f} billion parameters = {total / 2**30:.1f} GiB, "
                          f"/ 24 GiB per GPU → {need[3]} GPUs at stage 3 ({need[2]} at stage 2).")


def _models():
    """Small models with odd sizes (so chunks are uneven), built on the meta device, and a plain module."""
    from torch import nn
    from transformers import GPT2Config, LlamaConfig

    from ..models import build_from_config
    gpt2 = GPT2Config(n_layer=2, n_embd=36, n_head=3, vocab_size=101, n_positions=17, bos_token_id=0, eos_token_id=0)
    llama = LlamaConfig(hidden_size=48, intermediate_size=75, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=53, max_position_embeddings=32, bos_token_id=0,
                        eos_token_id=0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to("meta")
    return {"a GPT-2 of width 36, vocabulary 101 (tied head)": build_from_config(gpt2, device="meta"),
            "a LLaMA of width 48 with an MLP of 75": build_from_config(llama, device="meta"),
            "Linear(5, 7) → Linear(7, 3)": mlp}


@exercise("07.ex3", "Write elements_per_rank(model, ranks) -> a list of `ranks` integers: the parameter elements "
                    "each rank holds after FSDP2's fully_shard (every tensor split along dim 0 into chunks of "
                    "ceil(rows / ranks) rows). Pass the function itself.")
def _elements(answer):
    if not callable(answer):
        raise TypeError(f"expected a function elements_per_rank(model, ranks), got {type(answer).__name__}")
    from ..scale_out import fsdp_elements_per_rank
    for name, model in _models().items():
        total = sum(p.numel() for p in model.parameters())
        for ranks in (1, 2, 3, 4, 8):
            expected = fsdp_elements_per_rank(model, ranks)
            got = run_student(answer, model, ranks)
            try:
                got = [int(g) for g in got]
            except TypeError:
                return False, f"elements_per_rank(<{name}>, {ranks}) returned {got!r}; return a list of integers"
            if got == expected:
                continue
            if len(got) != ranks:
                why = f"return one count per rank ({ranks} numbers)."
            elif sum(got) != total:
                why = (f"the counts add up to {sum(got):,}, the model has {total:,} parameters (a tied head "
                       "counts once: model.parameters() yields it once)." if sum(got) > total else
                       f"the counts add up to {sum(got):,}, the model has {total:,}: every element is on some rank.")
            elif got == [total // ranks + (r < total % ranks) for r in range(ranks)]:
                why = ("an even split of the total is not what FSDP does: each tensor is chunked along its first "
                       "dimension separately, in chunks of ceil(rows / ranks) rows.")
            else:
                why = "chunks of ceil(rows / ranks) rows go to ranks 0, 1, …; the last ones are shorter or empty."
            return False, f"elements_per_rank(<{name}>, {ranks}) returned {got}, FSDP2 holds {expected}: {why}"
    return True, ("torch.chunk's split per tensor: rank r holds min(c, rows − r·c) rows (c = ceil(rows / n), at "
                  "least 0) of every tensor — the first ranks hold a little more than total / n.")
