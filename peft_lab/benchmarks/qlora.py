"""Measure peft_lab's NF4 base (QLoRA) on CPU: bytes, weight error, held-out perplexity, LoRA training
(notebook 05, "QLoRA: measure").

    python -m peft_lab.benchmarks.qlora [--models tiny gpt2] [--docs 200] [--steps 150] [--seeds 0 1]

* bytes of the frozen base measured from its stored tensors (:func:`peft_lab.qlora.stored_bytes`): fp32,
  bf16, and NF4 with the layers QLoRA leaves unquantized (embeddings, norms, biases, the head) in bf16 — next to
  ``estimate_memory``'s ``"4bit-base"`` figure, which counts *every* parameter at 4.127 bits (a lower bound);
* the relative weight error ``‖W − Q(W)‖ / ‖W‖`` per quantized layer, NF4 with and without double
  quantization, and a uniform 16-level absmax grid for contrast;
* held-out perplexity of the tiny model (``--docs`` documents) in fp32, bf16 weights, NF4, uniform 4-bit;
* LoRA r=8 (α 16, c_attn, lr 1e-2, cosine, batch 16) for ``--steps`` steps on the fp32 and the NF4 tiny base,
  per seed: final training loss and validation accuracy (200 reviews). ``--steps 0`` skips it.

``gpt2`` is the gpt2-small architecture with random weights (normal, std 0.02), so only its bytes and weight
error mean something.
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers.pytorch_utils import Conv1D

import peft_lab
from peft_lab import qlora

LORA = {"kind": "lora", "rank": 8, "targets": ["c_attn"]}


def uniform4(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Block-wise absmax quantization to 16 evenly spaced levels on [−1, 1], dequantized: NF4's plain rival."""
    code = torch.linspace(-1, 1, 16)
    idx, absmax = qlora._blockwise(weight.reshape(-1).float(), code, block_size)
    return qlora._scale_blocks(code[idx.long()], absmax, block_size).view(weight.shape)


def _linear_weights(model):
    """``(name, W as d_out × d_in)`` of the layers :func:`qlora.quantize_model` quantizes."""
    for name, m in model.named_modules():
        if name and name != "lm_head" and isinstance(m, (torch.nn.Linear, Conv1D)):
            yield name, (m.weight.T if isinstance(m, Conv1D) else m.weight).detach()


def memory_and_error(name: str, model) -> None:
    fp32 = qlora.stored_bytes(model)["total"]
    bf16 = qlora.stored_bytes(copy.deepcopy(model).to(torch.bfloat16))["total"]
    total = peft_lab.count_parameters(model)[1]
    quantized = qlora.quantize_model(copy.deepcopy(model))
    b = qlora.stored_bytes(quantized)
    n4 = sum(layer.nf4.numel for _, layer in qlora.nf4_layers(quantized))
    lora_n = peft_lab.count_parameters(peft_lab.apply_lora(copy.deepcopy(model), rank=8, alpha=16))[0]
    est = peft_lab.estimate_memory(name, trainable_params=lora_n, batch_size=0, precision="4bit-base", method=LORA)
    est_base = est["parameters"] - (2 + 4) * lora_n  # less the adapter's bf16 weights and fp32 master copy
    print(f"{name}: {total:,} parameters, {n4:,} in NF4 layers ({100 * n4 / total:.1f}%)")
    print(f"  bytes: fp32 {fp32:,} | bf16 {bf16:,} | NF4 layers {b['nf4']:,} + rest in bf16 {b['float'] // 2:,} "
          f"= {b['nf4'] + b['float'] // 2:,} | estimate_memory 4bit-base base {est_base:,}")
    print(f"  NF4 layers: {8 * b['nf4'] / n4:.4f} bits per weight (formula {qlora.nf4_bits_per_parameter():.4f})")
    errors = {"NF4": [], "NF4 no double quant": [], "uniform 4-bit": []}
    for _, w in _linear_weights(model):
        for key, q in (("NF4", qlora.quantize_nf4(w).dequantize()),
                       ("NF4 no double quant", qlora.quantize_nf4(w, double_quant=False).dequantize()),
                       ("uniform 4-bit", uniform4(w))):
            errors[key].append(((w - q).norm() / w.norm()).item())
    for key, v in errors.items():
        print(f"  ‖W−Q(W)‖/‖W‖ {key}: mean {sum(v) / len(v):.4f}, max {max(v):.4f} ({len(v)} layers)")


def perplexities(model, tok, docs: int) -> None:
    texts = peft_lab.load_heldout(docs)
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in list(_linear_weights(uniform)):
            layer = uniform.get_submodule(name)
            layer.weight.copy_(uniform4(w).T if isinstance(layer, Conv1D) else uniform4(w))
    runs = {"fp32": model, "bf16 weights": copy.deepcopy(model).to(torch.bfloat16).float(),
            "NF4": qlora.quantize_model(copy.deepcopy(model)),
            "NF4 no double quant": qlora.quantize_model(copy.deepcopy(model), double_quant=False),
            "uniform 4-bit": uniform}
    print(f"tiny held-out perplexity ({docs} documents): "
          + ", ".join(f"{k} {peft_lab.perplexity(m, tok, texts):.3f}" for k, m in runs.items()))


def training(model, tok, steps: int, seeds) -> None:
    examples = peft_lab.encode_task(peft_lab.load_task("train", 200), tok)
    val = peft_lab.load_task("val", 200)
    for seed in seeds:
        for label, base in (("fp32", copy.deepcopy(model)), ("NF4", qlora.quantize_model(copy.deepcopy(model)))):
            torch.manual_seed(seed)
            lora = peft_lab.apply_lora(base, rank=8, alpha=16)
            h = peft_lab.train(lora, examples, steps=steps, batch_size=16, lr=1e-2, schedule="cosine", seed=seed,
                               pad_id=tok.pad_token_id, progress=False)
            acc = peft_lab.evaluate_task(lora, tok, val)["accuracy"]
            last = h.loss[-10:]
            print(f"seed {seed}, LoRA r=8 on the {label} base, {steps} steps: loss {h.loss[0]:.3f} → "
                  f"{sum(last) / len(last):.3f} (mean of the last 10), val accuracy {acc:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "gpt2"], choices=["tiny", "gpt2"])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    for name in args.models:
        if name == "tiny":
            model, tok = peft_lab.load_base_model("tiny", device="cpu")
            memory_and_error(name, model)
            perplexities(model, tok, args.docs)
            if args.steps:
                training(model, tok, args.steps, args.seeds)
        else:
            memory_and_error(name, peft_lab.build_from_config(name, device="cpu", seed=0))


if __name__ == "__main__":
    main()
