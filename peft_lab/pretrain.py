"""Make the offline base models "tiny" (GPT-2) and "tiny-llama" (LLaMA): tokenizer + model pretrained on the
generated corpus.

Notebook 01, "The tiny model". Reproduce the shipped ``data/tiny`` and ``data/tiny-llama`` with::

    python -m peft_lab.pretrain --out data/tiny
    python -m peft_lab.pretrain --arch llama --out data/tiny-llama

Steps: generate the corpus (:func:`peft_lab.corpus.generate_corpus`), train a byte-level BPE tokenizer with
the ``tokenizers`` library, pack the token stream into fixed-length blocks, and train a small GPT-2 with the
same loop every notebook uses (:func:`peft_lab.train`). The model card ``README.md`` in the output folder
records the settings and the measured results. Both architectures share the corpus, the tokenizer (the same
code on the same texts gives the same vocabulary), the data order and the optimiser settings; only the
network differs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

from .corpus import generate_corpus
from .data import load_heldout, perplexity, unigram_perplexity
from .paths import write_text_atomic
from .train import train

EOS = "<|endoftext|>"
# The shipped architecture: ~1M parameters, small enough for a laptop CPU, big enough to learn the grammar.
TINY_CONFIG = dict(vocab_size=1024, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# "tiny-llama": the LLaMA family's parts (RoPE, grouped-query attention with 2 KV heads for 4 query heads,
# SwiGLU MLP, RMSNorm, untied lm_head) at the size of "tiny". The untied head costs 1024 x 128 = 131,072
# parameters that GPT-2 shares with its embedding; grouped-query attention saves 2 x 128 x 64 per layer. The
# SwiGLU width 312 (a multiple of 8) is the one that brings the total closest to tiny's 940,800:
# 2 x 131,072 (embedding, head) + 128 (final norm) + 4 x (49,152 attention + 3 x 128 x 312 MLP + 256 norms)
# = 939,136.
TINY_LLAMA_CONFIG = dict(vocab_size=1024, max_position_embeddings=128, hidden_size=128, intermediate_size=312,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, attention_dropout=0.0)
ARCHS = ("gpt2", "llama")
# tiny-llama trains for half of tiny's steps: on the machine it was made on (2 CPU cores shared with other jobs)
# a step took ~0.5 s, so 1,500 steps were to fit the ~12 minutes tiny's 3,000 took on an idle machine.
STEPS = {"gpt2": 3000, "llama": 1500}
DEFAULTS = dict(n_docs=150_000, steps=None, batch_size=16, block_size=128, lr=3e-3, seed=0)


def train_tokenizer(texts: list[str], vocab_size: int) -> GPT2TokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``, wrapped for ``AutoTokenizer``."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                            pad_token=EOS)
    tok.model_max_length = TINY_CONFIG["n_positions"]
    return tok


def pack_blocks(texts: list[str], tokenizer, block_size: int) -> list[dict]:
    """Concatenate ``text EOS text EOS ...`` and cut into blocks; every token is a target."""
    stream: list[int] = []
    for ids in tokenizer(texts)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    n = len(stream) // block_size
    return [{"input_ids": stream[i * block_size:(i + 1) * block_size],
             "labels": stream[i * block_size:(i + 1) * block_size]} for i in range(n)]


def build_model(arch: str, eos_id: int):
    """A freshly initialised (seeded by the caller) tiny model of architecture ``arch`` ("gpt2" or "llama")."""
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**TINY_CONFIG, bos_token_id=eos_id, eos_token_id=eos_id))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG, bos_token_id=eos_id, eos_token_id=eos_id))
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def pretrain(out: Path, n_docs: int, steps: int, batch_size: int, block_size: int, lr: float,
             seed: int, arch: str = "gpt2") -> dict:
    if steps is None:
        steps = STEPS[arch]
    torch.manual_seed(seed)
    heldout = set(load_heldout())
    texts = [t for t in generate_corpus(n_docs, seed) if t not in heldout]  # keep held-out text unseen
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, TINY_CONFIG["vocab_size"])
    blocks = pack_blocks(texts, tok, block_size)
    model = build_model(arch, tok.eos_token_id)
    hist = train(model, blocks, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=steps // 20,
                 schedule="cosine", weight_decay=0.01, seed=seed, pad_id=tok.eos_token_id, desc="pretrain")
    seconds = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # config.json + model.safetensors
    tok.save_pretrained(out)
    held = load_heldout()
    stats = {
        # tiny's stats file keeps its original keys
        **({} if arch == "gpt2" else {"arch": arch, "threads": torch.get_num_threads()}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus_docs": len(texts),
        "corpus_tokens": len(blocks) * block_size,
        "tokens_seen": steps * batch_size * block_size,
        "steps": steps, "batch_size": batch_size, "block_size": block_size, "lr": lr, "seed": seed,
        "final_loss": round(sum(hist.loss[-50:]) / len(hist.loss[-50:]), 4),
        "pretrain_seconds": round(seconds, 1),
        "heldout_docs": len(held),
        "heldout_perplexity": round(perplexity(model, tok, held), 3),
        "unigram_perplexity": round(unigram_perplexity(texts[:20_000], held, tok), 3),
        "torch": torch.__version__,
    }
    write_text_atomic(out / "pretrain_stats.json", json.dumps(stats, indent=2) + "\n")
    write_text_atomic(out / "README.md", model_card(stats) if arch == "gpt2" else llama_model_card(stats, out))
    return stats


def model_card(s: dict) -> str:
    return f"""# tiny: the offline base model of peft-lab

A GPT-2-architecture causal language model ({s['parameters']:,} parameters: {TINY_CONFIG['n_layer']} layers,
width {TINY_CONFIG['n_embd']}, {TINY_CONFIG['n_head']} heads, context {TINY_CONFIG['n_positions']},
vocabulary {TINY_CONFIG['vocab_size']}, dropout 0), made by this repository's own code.
Load it with `AutoModelForCausalLM.from_pretrained("data/tiny")` or `peft_lab.load_base_model("tiny")`.

- **Corpus**: {s['corpus_docs']:,} generated documents (short stories, descriptions, dialogues) from the
  probabilistic grammar in `peft_lab/corpus.py`, seed {s['seed']}; {s['corpus_tokens']:,} tokens. No
  third-party text.
- **Tokenizer**: byte-level BPE trained with the `tokenizers` library on the same corpus; `<|endoftext|>` is
  BOS, EOS and padding.
- **Training**: {s['steps']:,} AdamW steps, batch {s['batch_size']} x {s['block_size']} tokens
  ({s['tokens_seen']:,} tokens seen), peak learning rate {s['lr']}, 5% warmup then cosine decay, weight decay
  0.01, seed {s['seed']}, on a 2-core CPU in {s['pretrain_seconds']:.0f} s (torch {s['torch']}).
- **Final training loss** (mean of the last 50 steps): {s['final_loss']}.
- **Held-out perplexity** on {s['heldout_docs']} unseen documents (`data/heldout.jsonl`):
  **{s['heldout_perplexity']}**, against **{s['unigram_perplexity']}** for an add-one unigram model over
  the same tokenizer.
- **Not** trained on the review task (`data/task/`): its `review: ... verdict:` format never occurs in
  the corpus.

Reproduce: `python -m peft_lab.build_data && python -m peft_lab.pretrain --out data/tiny`
(figures in `pretrain_stats.json`).
"""


def llama_model_card(s: dict, out: Path) -> str:
    c = TINY_LLAMA_CONFIG
    return f"""# tiny-llama: the second offline base model of peft-lab

A LLaMA-architecture causal language model ({s['parameters']:,} parameters: {c['num_hidden_layers']} layers,
width {c['hidden_size']}, {c['num_attention_heads']} query heads sharing {c['num_key_value_heads']} key/value
heads (grouped-query attention), SwiGLU MLP of width {c['intermediate_size']}, RMSNorm, rotary position
embeddings, context {c['max_position_embeddings']}, vocabulary {c['vocab_size']}, `lm_head` **not** tied to the
embedding, no dropout), made by this repository's own code. It is the LLaMA-family twin of `tiny`: same corpus,
same tokenizer, same data order and optimiser settings; only the network differs. Every notebook runs on it
(`PEFT_LAB_MODEL=tiny-llama`). Load it with `AutoModelForCausalLM.from_pretrained("data/tiny-llama")` or
`peft_lab.load_base_model("tiny-llama")`.

- **Size**: the untied head costs {c['vocab_size']} x {c['hidden_size']} = {c['vocab_size'] * c['hidden_size']:,}
  parameters that `tiny` shares with its embedding; grouped-query attention saves a quarter of the
  attention weights (k and v are d x 64 instead of d x d). The SwiGLU width {c['intermediate_size']} (a multiple of 8) brings the total closest to `tiny`'s
  940,800.
- **Corpus**: {s['corpus_docs']:,} generated documents from `peft_lab/corpus.py`, seed {s['seed']};
  {s['corpus_tokens']:,} tokens. No third-party text.
- **Tokenizer**: the byte-level BPE of `tiny` (trained by the same code on the same texts, so identical);
  `<|endoftext|>` is BOS, EOS and padding.
- **Training**: {s['steps']:,} AdamW steps, batch {s['batch_size']} x {s['block_size']} tokens
  ({s['tokens_seen']:,} tokens seen), peak learning rate {s['lr']}, 5% warmup then cosine decay, weight decay
  0.01, seed {s['seed']}, in {s['pretrain_seconds']:.0f} s on {s['threads']} thread(s) of a 2-core CPU
  shared with other jobs (torch {s['torch']}). Half of `tiny`'s 3,000 steps, chosen for time: on that busy
  machine a step took ~0.5 s when measured before the run (a LLaMA step costs about what a GPT-2 step of the same
  size does), so 1,500 steps were to fit the ~12 minutes `tiny`'s 3,000 took on an idle one; the load of the
  other jobs made it the time above. With half the tokens seen, its held-out perplexity is above `tiny`'s.
- **Final training loss** (mean of the last 50 steps): {s['final_loss']}.
- **Held-out perplexity** on {s['heldout_docs']} unseen documents (`data/heldout.jsonl`):
  **{s['heldout_perplexity']}**, against **{s['unigram_perplexity']}** for an add-one unigram model over
  the same tokenizer.
- **Not** trained on the review task (`data/task/`).

Reproduce: `python -m peft_lab.build_data && python -m peft_lab.pretrain --arch llama --out {out.as_posix()}`
(figures in `pretrain_stats.json`; this run used {s['threads']} thread(s), set with `OMP_NUM_THREADS`: another thread
count or CPU orders float sums differently, so a rebuild agrees to rounding, not bit for bit).
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pretrain the tiny offline base model")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", choices=ARCHS, default="gpt2",
                    help="gpt2 makes data/tiny (the default), llama makes data/tiny-llama")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int if v is None else type(v), default=v,
                        **({"help": f"default per architecture: {STEPS}"} if v is None else {}))
    args = vars(ap.parse_args(argv))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(pretrain(args.pop("out"), **args), indent=2))


if __name__ == "__main__":
    main()
