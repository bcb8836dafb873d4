"""Exercises of notebook 02 (LoRA). Expected answers are computed from the notebook's equations, not stored."""
from __future__ import annotations

from . import exercise, number


def _lora_params(rank: int, d_in: int, d_out: int) -> int:
    """Equation (02.5): A is r × d_in, B is d_out × r."""
    return rank * (d_in + d_out)


@exercise("02.1", "LLaMA-2 7B's q_proj maps 4096 features to 4096. How many trainable parameters does LoRA of "
                  "rank r=16 add to ONE q_proj layer (A and B together)?")
def _params(answer):
    r, d_in, d_out = 16, 4096, 4096
    expected = _lora_params(r, d_in, d_out)
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={d_in * d_out: "that is the full weight W (d_out × d_in); LoRA trains A and B only.",
                            r * d_in: "that is A alone (r × d_in); add B (d_out × r).",
                            r * d_in * d_out: "LoRA does not multiply the dimensions: A has r·d_in entries, "
                                              "B has d_out·r.",
                            _lora_params(8, d_in, d_out): "that is rank 8; the question uses r = 16.",
                            32 * 2 * _lora_params(r, d_in, d_out): "that is the whole model (32 layers, q and "
                                                                   "v); the question asks for one layer."},
                  explain=f"r (d_in + d_out) = 16 × (4096 + 4096) = {expected:,} — 0.8% of the "
                          f"{d_in * d_out:,} entries of W.")


@exercise("02.2", "With lora_alpha = 32 and rank r = 8 (plain LoRA), what is the scaling s in h = Wx + s·BAx?")
def _scaling(answer):
    from ..lora import lora_scaling
    expected = lora_scaling(8, 32)
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={8 / 32: "upside down: s = α / r, not r / α.",
                            32 / 8 ** 0.5: "that is the rsLoRA scaling α/√r; plain LoRA divides by r.",
                            32: "α is not used as is; it is divided by the rank."},
                  explain="s = α / r = 32 / 8 = 4.")


@exercise("02.3", "rsLoRA with lora_alpha = 16 and rank r = 64: what is the scaling s? "
                  "(Then compare it with plain LoRA's α/r at the same settings.)")
def _rslora(answer):
    from ..lora import lora_scaling
    expected = lora_scaling(64, 16, use_rslora=True)
    plain = lora_scaling(64, 16)
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={plain: "that is plain LoRA's α/r; rsLoRA divides by √r.",
                            64 ** 0.5 / 16: "upside down: s = α / √r, not √r / α.",
                            16: "α is not used as is; it is divided by √r."},
                  explain=f"s = α / √r = 16 / 8 = {expected:g}, eight times plain LoRA's α/r = {plain:g}: at "
                          "high rank rsLoRA keeps the update from shrinking as r grows.")


@exercise("02.4", "A LoRA layer with d_in = d_out = 768 and r = 8 has been merged (W ← W + s·BA). How many "
                  "EXTRA multiply-adds per token does it cost at inference, compared with the base layer?")
def _merged_flops(answer):
    r, d = 8, 768
    unmerged = _lora_params(r, d, d)
    return number(answer, 0, rel_tol=1e-9,
                  mistakes={unmerged: f"{unmerged:,} = r(d_in + d_out) is the cost of the UNMERGED branch "
                                      "B(Ax); after merging, W already contains s·BA.",
                            2 * unmerged: "that counts the unmerged branch in FLOPs (2 per multiply-add); "
                                          "after merging there is no branch at all.",
                            d * d: "the merged W has the same shape as before: the base layer's own "
                                   "d_in·d_out multiply-adds are not extra."},
                  explain="0: the merged weight has the same shape as W, so the layer costs exactly the base "
                          "layer's d_in·d_out multiply-adds — why LoRA adds no inference latency (Hu et al. "
                          "2021, Table 1).")
