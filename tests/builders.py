"""Small models shared by the LoRA and interop tests (random init, no download), a short AdamW run, and the
grading helpers of the exercise tests."""
from __future__ import annotations

from transformers import GPT2Config, LlamaConfig

import peft_lab

VOCAB = 100


def small_gpt2(width: int = 64, seed: int = 0):
    """A random 2-layer GPT-2 (Conv1D layers)."""
    cfg = GPT2Config(n_layer=2, n_embd=width, n_head=4, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return peft_lab.build_from_config(cfg, device="cpu", seed=seed)


def small_llama(seed: int = 0):
    """A random 2-layer LLaMA, hidden 64 (nn.Linear layers)."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return peft_lab.build_from_config(cfg, device="cpu", seed=seed)


def tiny():
    """The shipped model (always present in data/; a missing one is a failure, not a skip)."""
    return peft_lab.load_base_model("tiny", device="cpu")[0]


def tiny_llama():
    """The shipped LLaMA-family model: grouped-query attention (4 heads, 2 KV heads), SwiGLU, untied head."""
    return peft_lab.load_base_model("tiny-llama", device="cpu")[0]


MODELS = {"gpt2": small_gpt2, "llama": small_llama, "tiny": tiny, "tiny-llama": tiny_llama}


def adamw_losses(model, steps: int, lr: float, batch) -> list[float]:
    """The loss of each of ``steps`` AdamW steps on ``model``'s trainable parameters; ``batch(step)`` gives the
    input ids (also the labels). Run on ours and on a reference library's model to compare loss curves."""
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def verdict(exercise_id: str, answer) -> tuple[bool, str]:
    """``(ok, why)`` of exercise ``exercise_id``'s grader on ``answer`` (the id names its notebook: "07.ex3")."""
    from peft_lab.exercises import exercises
    graders = {e.id: e for e in exercises(exercise_id.split(".")[0])}
    return graders[exercise_id].checker(answer)


def passes_and_leaves_the_rng_alone(exercise_id: str, answer) -> bool:
    """Whether ``peft_lab.check`` passes ``answer`` and leaves torch's random stream where the notebook left it."""
    import torch
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    passed = peft_lab.check(exercise_id, answer)
    return bool(passed) and torch.equal(torch.rand(3), before)
