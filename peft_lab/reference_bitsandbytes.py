"""bitsandbytes as the reference for :mod:`peft_lab.qlora` (notebook 05, "Equal to bitsandbytes").

bitsandbytes (``pip install bitsandbytes``, in the package's ``test`` extra) runs NF4 on the CPU. Its
``nn.Linear4bit`` quantizes a weight when the layer is moved to a device; PEFT's LoRA wraps it with its own
``lora.bnb.Linear4bit``. These helpers build that reference model from a float one and move the stored 4-bit
state between the two implementations, so that a comparison can start from *the same* stored tensors:

* :func:`bitsandbytes_model` — every ``nn.Linear``/``Conv1D`` (except ``skip_modules``) replaced by
  ``bnb.nn.Linear4bit`` (a ``Conv1D`` weight transposed to ``d_out × d_in`` first, as transformers loads GPT-2
  in 4 bits), and ``model.is_loaded_in_4bit = True`` (what PEFT reads to pick its 4-bit LoRA layer);
* :func:`nf4_weight_from_bitsandbytes` — a ``Params4bit`` as a :class:`peft_lab.qlora.NF4Weight`;
* :func:`copy_bitsandbytes_state` — bitsandbytes' stored tensors into our NF4 layers.

bitsandbytes is imported inside the functions: the package itself never needs it.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import core
from .qlora import ABSMAX_BLOCK_SIZE, NF4Weight, nf4_layers

__all__ = ["linear4bit", "bitsandbytes_model", "nf4_weight_from_bitsandbytes", "copy_bitsandbytes_state"]


def linear4bit(layer: nn.Module, block_size: int = 64, double_quant: bool = True) -> nn.Module:
    """One ``nn.Linear`` or ``Conv1D`` as a bitsandbytes NF4 ``Linear4bit`` holding the same weight and bias."""
    import bitsandbytes as bnb
    weight = layer.weight.T if isinstance(layer, Conv1D) else layer.weight  # quantized as d_out × d_in
    d_out, d_in = weight.shape
    out = bnb.nn.Linear4bit(d_in, d_out, bias=layer.bias is not None, compute_dtype=weight.dtype,
                            compress_statistics=double_quant, quant_type="nf4", device="meta")
    out.weight = bnb.nn.Params4bit(weight.detach().contiguous().clone(), requires_grad=False,
                                   blocksize=block_size, compress_statistics=double_quant, quant_type="nf4")
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    # On a CPU with AVX512-BF16, Linear4bit's forward in eval mode without gradients repacks the weight and
    # multiplies in bfloat16; everywhere else it dequantizes and multiplies in the compute dtype. The reference
    # takes the second path on every CPU, so a comparison with it means the same thing on every machine.
    if hasattr(out, "support_avx512bf16_for_cpu"):
        out.support_avx512bf16_for_cpu = False
    return out.to(weight.device)  # Params4bit quantizes on this move


def bitsandbytes_model(model: nn.Module, block_size: int = 64, double_quant: bool = True,
                       skip_modules: tuple[str, ...] | str = ("lm_head",)) -> nn.Module:
    """``model``'s linear layers as bitsandbytes NF4 ``Linear4bit``, in place (the same choice of layers as
    :func:`peft_lab.qlora.quantize_model`); the model frozen and marked ``is_loaded_in_4bit``."""
    skip = core.module_names(skip_modules, "skip_modules", allow_empty=True)
    chosen = [(n, m) for n, m in model.named_modules()
              if n and isinstance(m, (nn.Linear, Conv1D)) and not core.matches_target(n, skip)]
    new = [(n, linear4bit(m, block_size, double_quant)) for n, m in chosen]
    core.freeze(model)
    for name, layer in new:
        core.replace_module(model, name, layer)
    model.is_loaded_in_4bit = True
    return model


def nf4_weight_from_bitsandbytes(weight) -> NF4Weight:
    """A bitsandbytes ``Params4bit`` (quantized) as our :class:`NF4Weight`, sharing its tensors."""
    state = weight.quant_state
    if state.quant_type != "nf4":
        raise ValueError(f"expected an NF4 weight, got quant_type={state.quant_type!r}")
    fields = dict(absmax=state.absmax, quantized_absmax=None, absmax_scale=None, absmax_offset=None)
    if state.nested:
        if state.state2.blocksize != ABSMAX_BLOCK_SIZE:
            raise ValueError(f"the absmax block size is {state.state2.blocksize}, ours is {ABSMAX_BLOCK_SIZE}")
        fields = dict(absmax=None, quantized_absmax=state.absmax, absmax_scale=state.state2.absmax,
                      absmax_offset=state.offset)
    return NF4Weight(packed=weight.data.view(torch.uint8).reshape(-1), shape=tuple(state.shape), dtype=state.dtype,
                     block_size=state.blocksize, **fields)


@torch.no_grad()
def copy_bitsandbytes_state(ours: nn.Module, reference: nn.Module) -> None:
    """Copy the stored 4-bit tensors of every bitsandbytes ``Linear4bit`` in ``reference`` into the NF4 layer
    of the same name in ``ours`` (LoRA wrappers' ``base_layer`` level ignored on both sides). Afterwards both
    models hold the same quantized base, so any remaining difference is in the computation."""
    import bitsandbytes as bnb
    refs = {n.replace(".base_layer", ""): m for n, m in reference.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    layers = nf4_layers(ours)
    if {n.replace(".base_layer", "") for n, _ in layers} != set(refs):
        raise ValueError("the two models quantize different layers")
    for name, layer in layers:
        theirs = nf4_weight_from_bitsandbytes(refs[name.replace(".base_layer", "")].weight)
        mine = layer.nf4
        if mine.shape != theirs.shape or mine.double_quant != theirs.double_quant:
            raise ValueError(f"{name}: shapes or double quantization differ")
        for key, t in mine.tensors().items():
            t.copy_(theirs.tensors()[key].reshape(t.shape))
