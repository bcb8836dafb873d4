"""QLoRA's frozen 4-bit base: NormalFloat-4 (NF4), block-wise absmax quantization and double quantization
(Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3), notebook 05 ("QLoRA").

The steps, numbered as in notebook 05:

* (05.Q1) The NF4 code: 16 values from quantiles of the standard normal, Φ⁻¹. The positive half takes 8
  quantiles at probabilities evenly spaced from ``1 − δ`` down to (not including) ½, the negative half 7 from
  ``δ`` up to ½, plus an exact 0 — so zero is representable and the two halves are *asymmetric* (QLoRA §3,
  "we create an asymmetric data type"). ``δ`` is the reference implementation's 0.0322917 (= ½(1/32 + 1/30)),
  which keeps Φ⁻¹ finite at the ends; the 16 values are divided by the largest so that they span [−1, 1].
* (05.Q2) Block-wise absmax quantization: the weight, flattened, is cut into blocks of ``block_size`` (64)
  values; each block is divided by its absmax ``c = max|w|`` and every value is replaced by the index of the
  nearest code value; dequantization is ``ŵ = code[index] · c``. Two 4-bit indices share one byte (the first
  in the high nibble, as bitsandbytes packs them).
* (05.Q3) Double quantization: the fp32 absmax constants (32 bits per 64 weights = 0.5 bit per weight) are
  themselves quantized — their mean is subtracted, then blocks of 256 are absmax-quantized to 8 bits with the
  signed dynamic 8-bit code of Dettmers 2016 (bitsandbytes' default for 8-bit blocks).
* (05.Q4) Bits per weight: ``4 + 32/64 = 4.5`` without, ``4 + 8/64 + 32/(64·256) = 4.127`` with double
  quantization (the figure of QLoRA §3 and of ``estimate_memory``'s ``"4bit-base"``).
* (05.Q5) A frozen layer stores only the packed indices and the constants and dequantizes in ``forward``; its
  backward dequantizes again instead of keeping the float weight alive (as bitsandbytes' ``MatMul4Bit``).

Layout follows bitsandbytes, so the numbers compare one to one: a ``Linear`` weight is quantized as stored,
``d_out × d_in`` row-major; a GPT-2 ``Conv1D`` weight (stored ``d_in × d_out``) is quantized transposed, in the
same ``d_out × d_in`` order, as transformers does when it loads GPT-2 in 4 bits.

Typical use::

    model = quantize_model(load_base_model("tiny"))  # every linear layer NF4, frozen
    model = apply_lora(model, rank=8, alpha=16)      # LoRA wraps the NF4 layers: that is QLoRA
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import core, validate

__all__ = ["NF4_OFFSET", "nf4_code", "dynamic_code", "nf4_bits_per_parameter", "NF4Weight", "quantize_nf4",
           "LinearNF4", "Conv1DNF4", "NF4_LAYERS", "quantize_model", "dequantize_model", "nf4_layers",
           "stored_bytes"]

#: The outer probability of the NF4 construction: the largest code value is Φ⁻¹(NF4_OFFSET) before scaling.
#: bitsandbytes' ``create_normal_map`` default; numerically 1 − ½(1/32 + 1/30).
NF4_OFFSET = 0.9677083
#: Block size of the second quantization (of the absmax constants), QLoRA §3.
ABSMAX_BLOCK_SIZE = 256


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Step (05.Q1): the 16 NF4 values, sorted, in float32, from −1 to 1.

    8 positive quantiles ``Φ⁻¹(p)`` for ``p`` evenly spaced from ``offset`` to ½ (9 points, ½ dropped), 7
    negative ones ``−Φ⁻¹(p)`` for 8 points from ``offset`` to ½ (½ dropped), and 0; divided by the largest.
    The probabilities are spaced in float32 and Φ⁻¹ evaluated in float64, as bitsandbytes built its table.
    """
    offset = validate.as_python_number(offset)
    validate.require_real("offset", offset, min=0.5, max=1, min_open=True, max_open=True)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def dynamic_code() -> torch.Tensor:
    """Step (05.Q3): the signed dynamic 8-bit code (Dettmers 2016, "8-Bit Approximations for Parallelism in
    Deep Learning"), 256 sorted float32 values in [−1, 1] used for the absmax constants.

    For each of 7 decades ``10^(e−6)``, e = 0…6, the midpoints of ``2^e + 1`` points evenly spaced on
    [0.1, 1], scaled by the decade, with both signs (2·127 values); plus 0 and 1. Many small values, few large
    ones: a relative precision roughly constant over six orders of magnitude.
    """
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mid = (edges[:-1] + edges[1:]) / 2
        values += [mid * (10.0 ** (e - 6)), mid * -(10.0 ** (e - 6))]
    return torch.cat(values + [torch.tensor([0.0, 1.0])]).sort().values


def nf4_bits_per_parameter(block_size: int = 64, double_quant: bool = True,
                           absmax_block_size: int = ABSMAX_BLOCK_SIZE) -> float:
    """Step (05.Q4): stored bits per weight — ``4 + 32/B`` (one fp32 absmax per block of ``B``), or with
    double quantization ``4 + 8/B + 32/(B·B₂)`` (an 8-bit absmax per block, an fp32 constant per ``B₂``
    absmaxes). Block 64: 4.5 and 4.127. Whole-tensor extras (the fp32 mean, one per tensor) are left out."""
    block_size = validate.require_int("block_size", block_size, min=1)
    absmax_block_size = validate.require_int("absmax_block_size", absmax_block_size, min=1)
    if validate.require_bool("double_quant", double_quant):
        return 4 + 8 / block_size + 32 / (block_size * absmax_block_size)
    return 4 + 32 / block_size


# ----------------------------------------------------------------------------------------------------------
# Block-wise absmax quantization
# ----------------------------------------------------------------------------------------------------------

def _blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (05.Q2) on a flat float32 tensor: each block divided by its absmax, each value → index of the
    nearest code value (ties to the lower one). A last, shorter block is allowed (the absmax level needs it).
    Returns ``(indices uint8, absmax float32)``. Scaling multiplies by 1/absmax, as bitsandbytes does, so the
    indices agree bit for bit."""
    n = x.numel()
    blocks = math.ceil(n / block_size)
    padded = torch.nn.functional.pad(x, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """``values · absmax`` block by block (the inverse scaling of :func:`_blockwise`), a last shorter block
    allowed."""
    n = values.numel()
    blocks = absmax.numel()
    padded = torch.nn.functional.pad(values, (0, blocks * block_size - n)).view(blocks, block_size)
    return (padded * absmax.unsqueeze(1)).reshape(-1)[:n]


@lru_cache(maxsize=None)
def _table(which: str, device: torch.device) -> torch.Tensor:
    """The NF4 or the dynamic 8-bit code on ``device``, built once (every forward and backward dequantizes with
    it); a read-only table — the public :func:`nf4_code` and :func:`dynamic_code` build fresh tensors."""
    return (nf4_code() if which == "nf4" else dynamic_code()).to(device)


@dataclass
class NF4Weight:
    """A weight in NF4 (steps 05.Q2–05.Q3). Tensors:

    * ``packed`` — uint8, ``numel/2``: two 4-bit code indices per byte, the first in the high nibble;
    * without double quantization: ``absmax`` — float32, one per block;
    * with it: ``quantized_absmax`` — uint8 indices into :func:`dynamic_code`, one per block;
      ``absmax_scale`` — float32, one per ``absmax_block_size`` absmaxes; ``absmax_offset`` — the float32 mean
      subtracted before that second quantization.

    ``shape`` and ``dtype`` are the original weight's (``dequantize`` returns them); ``transposed`` marks a
    ``Conv1D`` weight quantized in ``d_out × d_in`` order.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    quantized_absmax: torch.Tensor | None
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int = 64
    absmax_block_size: int = ABSMAX_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.quantized_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (those that exist): what a layer keeps as buffers."""
        names = ("packed", "absmax", "quantized_absmax", "absmax_scale", "absmax_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: the measured size of this weight in memory."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_parameter(self) -> float:
        """Measured bits per weight, ``8 · nbytes / numel``; compare :func:`nf4_bits_per_parameter`."""
        return 8 * self.nbytes / self.numel

    def indices(self) -> torch.Tensor:
        """The 4-bit code indices unpacked, one uint8 per weight, in quantization order."""
        out = torch.empty(2 * self.packed.numel(), dtype=torch.uint8, device=self.packed.device)
        out[0::2] = self.packed >> 4
        out[1::2] = self.packed & 0xF
        return out

    def block_absmax(self) -> torch.Tensor:
        """The absmax of every block, float32: stored, or dequantized from 8 bits (step 05.Q3 undone:
        ``dynamic_code[q] · scale + offset``)."""
        if not self.double_quant:
            return self.absmax
        code8 = _table("dynamic", self.absmax_scale.device)
        values = code8[self.quantized_absmax.long()]
        return _scale_blocks(values, self.absmax_scale, self.absmax_block_size) + self.absmax_offset

    def dequantize(self) -> torch.Tensor:
        """Step (05.Q2) undone: ``ŵ = nf4_code[index] · absmax`` per block, in the original shape and dtype."""
        code = _table("nf4", self.packed.device)
        flat = _scale_blocks(code[self.indices().long()], self.block_absmax(), self.block_size)
        return flat.view(self.shape).to(self.dtype)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Steps (05.Q2)–(05.Q3): ``weight`` (any shape, floating point) in NF4, flattened in row-major order.

    ``weight.numel()`` must be a multiple of ``block_size`` (every linear layer of the course's models is;
    bitsandbytes also accepts a shorter last block, we refuse it to keep the packing simple). The
    quantization is computed in float32 whatever ``weight``'s dtype; ``dequantize()`` returns that dtype.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {validate.describe(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must hold floating-point values to quantize, got dtype {weight.dtype}")
    block_size = validate.require_int("block_size", block_size, min=2)
    double_quant = validate.require_bool("double_quant", double_quant)
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit indices share a byte), got {block_size}")
    if weight.numel() == 0 or weight.numel() % block_size:
        raise ValueError(f"weight has {weight.numel()} values, not a positive multiple of block_size="
                         f"{block_size}; pick a block size that divides it (64 divides every linear layer "
                         "of GPT-2 and LLaMA)")
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds inf or NaN; absmax quantization needs finite values")
    flat = weight.detach().reshape(-1).float()
    indices, absmax = _blockwise(flat, _table("nf4", flat.device), block_size)
    packed = (indices[0::2] << 4) | indices[1::2]
    fields = dict(absmax=absmax, quantized_absmax=None, absmax_scale=None, absmax_offset=None)
    if double_quant:
        offset = absmax.mean()
        q, scale = _blockwise(absmax - offset, _table("dynamic", flat.device), ABSMAX_BLOCK_SIZE)
        fields = dict(absmax=None, quantized_absmax=q, absmax_scale=scale, absmax_offset=offset)
    return NF4Weight(packed=packed, shape=tuple(weight.shape), dtype=weight.dtype, block_size=block_size, **fields)


# ----------------------------------------------------------------------------------------------------------
# Frozen NF4 layers
# ----------------------------------------------------------------------------------------------------------

class _NF4Matmul(torch.autograd.Function):
    """``x Wᵀ`` with ``W`` dequantized in forward and again in backward (step 05.Q5): autograd keeps the
    4-bit weight, not a float copy, between the two passes. ``W`` is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.weight_out_in().to(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.weight_out_in().to(grad.dtype), None


class _NF4Layer(core.StoredWeights, nn.Module):
    """What :class:`LinearNF4` and :class:`Conv1DNF4` share: the NF4 tensors as buffers (so ``.to()``,
    ``state_dict`` and byte counts see them), a float ``bias`` (frozen), and ``weight`` as a read-only
    property that dequantizes — so code that reads ``layer.weight`` (LoRA's wrapper reads its shape, dtype
    and device) sees the original layout. Assigning or merging into ``weight`` is not possible."""

    transposed = False  # Conv1D: the stored layout is d_in × d_out, quantized as d_out × d_in
    __repr__ = nn.Module.__repr__  # not Conv1D's own, which prints nf/nx only

    def _store(self, nf4: NF4Weight, bias: torch.Tensor | None, d_in: int, d_out: int) -> None:
        nn.Module.__init__(self)  # not Linear's/Conv1D's: they would allocate a float weight
        self.in_features, self.out_features = d_in, d_out
        self._shape, self._dtype, self.block_size = nf4.shape, nf4.dtype, nf4.block_size
        for name, t in nf4.tensors().items():
            self.register_buffer(f"weight_{name}", t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the NF4 tensors; ``.to(dtype)`` (``.half()``, ``.bfloat16()``) does not round
        the float32 constants (as bitsandbytes keeps them): it sets the dtype that dequantization returns."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
                self._dtype = new.dtype
        return self

    @property
    def nf4(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` (sharing the buffers)."""
        get = lambda k: getattr(self, f"weight_{k}", None)  # noqa: E731
        return NF4Weight(get("packed"), get("absmax"), get("quantized_absmax"), get("absmax_scale"),
                         get("absmax_offset"), self._shape, self._dtype, self.block_size)

    def weight_out_in(self) -> torch.Tensor:
        """The dequantized weight as ``d_out × d_in`` (the quantization order)."""
        return self.nf4.dequantize()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's own layout (a new tensor on every read)."""
        w = self.weight_out_in()
        return w.T if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4Matmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        dq = self.nf4.double_quant
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={dq}")


class LinearNF4(_NF4Layer, nn.Linear):
    """A frozen ``nn.Linear`` stored in NF4 (step 05.Q5). A subclass of ``nn.Linear``, so LoRA wraps it like
    any linear layer (PEFT's ``Linear4bit`` over bitsandbytes' ``Linear4bit`` plays the same role)."""

    def __init__(self, linear: nn.Linear, block_size: int = 64, double_quant: bool = True):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {validate.describe(linear)}")
        self._store(quantize_nf4(linear.weight, block_size, double_quant), linear.bias,
                    linear.in_features, linear.out_features)

    def dequantized(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (frozen)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight_packed.device, dtype=self._dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)


class Conv1DNF4(_NF4Layer, Conv1D):
    """A frozen GPT-2 ``Conv1D`` stored in NF4, its weight quantized in ``d_out × d_in`` order (as a
    ``Linear``). A subclass of ``Conv1D``, so LoRA wraps it with ``fan_in_fan_out`` as it wraps ``Conv1D``."""

    transposed = True

    def __init__(self, conv: Conv1D, block_size: int = 64, double_quant: bool = True):
        if not isinstance(conv, Conv1D):
            raise TypeError(f"conv must be transformers' Conv1D, got {validate.describe(conv)}")
        d_in, d_out = conv.weight.shape
        self._store(quantize_nf4(conv.weight.T, block_size, double_quant), conv.bias, d_in, d_out)
        self.nf, self.nx = d_out, d_in  # Conv1D's own attribute names

    def dequantized(self) -> Conv1D:
        """A plain ``Conv1D`` holding the dequantized weight (frozen)."""
        out = Conv1D(self.out_features, self.in_features).to(device=self.weight_packed.device, dtype=self._dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            out.bias.copy_(self.bias)
        return out.requires_grad_(False)


#: The NF4 layer classes (what :func:`quantize_model` puts in).
NF4_LAYERS = (LinearNF4, Conv1DNF4)


def nf4_layers(model: nn.Module) -> list[tuple[str, _NF4Layer]]:
    """``(name, layer)`` for every NF4 layer of ``model`` (also inside LoRA wrappers), in module order."""
    return list(core.find_layers(validate.require_module("model", model), _NF4Layer))


def quantize_model(model: nn.Module, block_size: int = 64, double_quant: bool = True,
                   skip_modules: tuple[str, ...] | str = ("lm_head",)) -> nn.Module:
    """Put every ``nn.Linear`` and ``Conv1D`` of ``model`` in NF4 (step 05.Q5), in place; freeze the model;
    return it.

    What stays in its float dtype, as in transformers' bitsandbytes integration and QLoRA: embeddings and
    norms (not linear layers; few weights, and the norms' scales act on every activation), biases, and the
    modules named in ``skip_modules`` (names by the suffix rule of :func:`peft_lab.core.matches_target`, or one
    regular expression, as ``target_modules``) — by default the
    output head, whose weight on GPT-2 *is* the input embedding (tied) and whose errors go straight into the
    logits. Run before :func:`peft_lab.apply_lora` (LoRA then wraps the NF4 layers: QLoRA). A failed call
    leaves the model unchanged.
    """
    validate.require_module("model", model)
    if any(isinstance(m, core.AdapterLayer) for m in model.modules()):
        raise ValueError("quantize the base before adding adapters: this model already has adapter layers "
                         "(call quantize_model(model) first, then apply_lora(model, ...))")
    skip = core.module_names(skip_modules, "skip_modules", allow_empty=True)
    chosen = [(n, m) for n, m in model.named_modules()
              if n and isinstance(m, (nn.Linear, Conv1D)) and not isinstance(m, _NF4Layer)
              and not core.matches_target(n, skip)]
    if not chosen:
        raise ValueError("this model has no nn.Linear or Conv1D layer to quantize (outside skip_modules="
                         f"{skip!r}); is it already quantized?")
    new = [(n, Conv1DNF4(m, block_size, double_quant) if isinstance(m, Conv1D)
            else LinearNF4(m, block_size, double_quant)) for n, m in chosen]
    core.freeze(model)
    for name, layer in new:
        core.replace_module(model, name, layer)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every NF4 layer back to a plain float layer holding its *dequantized* weight (not the original: the
    rounding stays), in place — e.g. to merge a trained LoRA into the base (``merge_lora`` refuses an NF4
    base, whose weight is not stored in float)."""
    for name, layer in nf4_layers(model):
        core.replace_module(model, name, layer.dequantized())
    return model


def stored_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s stored tensors, measured from the tensors: ``"nf4"`` (the NF4 layers' buffers),
    ``"float"`` (every parameter, tied ones once: embeddings, norms, biases, adapters, unquantized layers) and
    ``"total"``."""
    validate.require_module("model", model)
    nf4 = sum(t.numel() * t.element_size() for _, layer in nf4_layers(model) for t in layer.nf4.tensors().values())
    other = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips tied duplicates
    return {"nf4": nf4, "float": other, "total": nf4 + other}
