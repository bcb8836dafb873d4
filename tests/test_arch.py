"""peft_lab.arch: the architecture accessors the notebooks use instead of GPT-2's attribute names, the one table
of default targets (equal to PEFT's), MODEL_NAME from $PEFT_LAB_MODEL, and the second shipped model
tiny-llama."""
import json
import math

import pytest
import torch

import peft_lab
from builders import small_gpt2, small_llama
from peft_lab import arch
from peft_lab.models import build_from_config, load_base_model
from peft_lab.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def small_llama_gqa(seed: int = 0):
    """A random 2-layer LLaMA with grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return build_from_config(cfg, device="cpu", seed=seed)


@pytest.fixture(scope="module")
def tiny_llama():
    return load_base_model("tiny-llama", device="cpu")


# (name, model type, layers, width, heads, KV heads, vocabulary, context, head tied)
EXPECTED = [
    ("gpt2", "gpt2", 12, 768, 12, 12, 50257, 1024, True),
    ("llama-7b", "llama", 32, 4096, 32, 32, 32000, 4096, False),
    ("tiny", "gpt2", 4, 128, 4, 4, 1024, 128, True),
    ("tiny-llama", "llama", 4, 128, 4, 2, 1024, 128, False),
]


@pytest.mark.parametrize("name, kind, L, d, h, h_kv, V, ctx, tied", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_accessors_on_real_architectures(name, kind, L, d, h, h_kv, V, ctx, tied):
    model = build_from_config(name, device="meta")
    assert arch.model_type(model) == kind
    sizes = (arch.num_layers(model), arch.width(model), arch.num_heads(model), arch.num_kv_heads(model))
    assert sizes == (L, d, h, h_kv)
    assert (arch.vocab_size(model), arch.context_length(model), arch.head_dim(model)) == (V, ctx, d // h)
    assert arch.head_is_tied(model) is tied
    blocks = arch.blocks(model)
    assert len(blocks) == L
    # the accessors name the very modules named_modules() lists
    modules = dict(model.named_modules())
    assert modules[arch.block_name(model, L - 1)] is blocks[L - 1]
    attention = "attn" if kind == "gpt2" else "self_attn"
    assert arch.attention(model, 1) is modules[f"{arch.block_name(model, 1)}.{attention}"]
    assert arch.mlp(model, 1) is modules[f"{arch.block_name(model, 1)}.mlp"]
    # the default LoRA targets are layers of every block's attention
    for target in arch.default_targets(model):
        assert isinstance(getattr(arch.attention(model, 0), target), peft_lab.lora.SUPPORTED_LAYERS)


def test_accessors_see_through_wrappers():
    """A prefix model (ours) and a PEFT model wrap the transformers model; the blocks are still found."""
    from peft import LoraConfig, get_peft_model
    for make in (small_gpt2, small_llama):
        model = make()
        blocks = arch.blocks(model)
        assert arch.blocks(peft_lab.apply_prefix_tuning(model, 2)) is blocks
        wrapped = get_peft_model(make(), LoraConfig(r=2, target_modules=arch.default_targets(model)))
        assert len(arch.blocks(wrapped)) == len(blocks)


@pytest.mark.parametrize("method, mapping", [
    ("lora", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
    ("ia3", "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"),
    ("ia3_feedforward", "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"),
])
def test_default_targets_equal_peft_table(method, mapping):
    import peft.utils.constants as constants
    peft_table = getattr(constants, mapping)
    for model_type, targets in arch.DEFAULT_TARGETS[method].items():
        assert sorted(peft_table[model_type]) == sorted(targets), (method, model_type)


def test_one_table_for_the_package():
    """lora.py and compare.py read the table of peft_lab.arch rather than their own copies."""
    from peft_lab import compare, lora
    for make in (small_gpt2, small_llama):
        model = make()
        lora_on = lora.lora_config(compare.METHODS["LoRA r=8"].apply(model, None)).target_modules
        assert list(lora_on) == arch.default_targets(model.config)
    assert arch.default_targets(small_llama(), "ia3") == ["k_proj", "v_proj", "down_proj"]
    with pytest.raises(ValueError, match="no default lora target_modules for model type 'bert-ish'"):
        cfg = small_gpt2().config
        cfg.model_type = "bert-ish"
        arch.default_targets(cfg)
    with pytest.raises(ValueError, match="method must be one of"):
        arch.default_targets(small_gpt2(), "dora")


@pytest.mark.parametrize("make", [small_gpt2, small_llama, small_llama_gqa], ids=["gpt2", "llama", "llama-gqa"])
def test_attention_qkv_and_output_rebuild_the_layer(make):
    """q, k, v (RoPE applied, KV heads repeated) through softmax attention and the output projection give the
    attention sublayer's own output: an independent recomputation, not a copy of the layer's code."""
    model = make()
    attn, seen = arch.attention(model, 1), {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(
        x=args[0] if args else kwargs["hidden_states"], rope=kwargs.get("position_embeddings"), out=out[0]),
        with_kwargs=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        hook.remove()
        q, k, v = arch.attention_qkv(attn, seen["x"], seen["rope"])
        g = arch.num_heads(model) // arch.num_kv_heads(model)
        assert k.shape[1] == arch.num_kv_heads(model) and q.shape[1] == arch.num_heads(model)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(arch.head_dim(model))
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        out = arch.attention_output(attn, scores.softmax(-1) @ v)
    assert_close(out, seen["out"], reason="SDPA's kernel sums in another order", what="attention output")


def test_layout_is_the_adapters_table():
    """Bottleneck adapters read arch's one table: an unknown block layout is refused there, with its fix."""
    from peft_lab import adapters
    model = small_gpt2()
    model.config.model_type = "bert"
    with pytest.raises(ValueError, match="block layout is known for.*LAYOUTS"):
        adapters.apply_adapters(model)


def test_model_name_from_environment(monkeypatch):
    monkeypatch.delenv(arch.MODEL_ENV_VAR, raising=False)
    assert arch.model_name() == "tiny" and arch.model_name(default="gpt2") == "gpt2"
    monkeypatch.setenv(arch.MODEL_ENV_VAR, "tiny-llama")
    assert arch.model_name() == "tiny-llama"
    monkeypatch.setenv(arch.MODEL_ENV_VAR, "  ")             # blank counts as unset
    assert arch.model_name() == "tiny"


def test_every_notebook_reads_model_name_from_the_environment():
    """Each notebook with a MODEL_NAME parameter takes it from $PEFT_LAB_MODEL through arch.model_name."""
    import nbformat

    from peft_lab.run_notebooks import ROOT
    found = 0
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        lines = [line for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
                 for line in cell.source.splitlines() if line.startswith("MODEL_NAME =")]
        if lines:
            found += 1
            assert lines == ['MODEL_NAME = peft_lab.arch.model_name(default="tiny")' + lines[0].split(")", 1)[1]], path
    assert found >= 5


def test_tiny_llama_is_a_pretrained_llama(tiny_llama, tiny):
    model, tok = tiny_llama
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert arch.num_kv_heads(model) < arch.num_heads(model) and not arch.head_is_tied(model)
    n = peft_lab.count_parameters(model)[1]
    stats = json.loads((peft_lab.data_dir() / "tiny-llama" / "pretrain_stats.json").read_text())
    assert n == stats["parameters"] == 939_136                       # the card's figure, and tiny's size within 0.2%
    assert abs(n - peft_lab.count_parameters(tiny[0])[1]) < 0.002 * n
    # the same tokenizer as tiny
    assert tok.get_vocab() == tiny[1].get_vocab() and tok.eos_token_id == tiny[1].eos_token_id
    # a language model: held-out perplexity far below the unigram reference (first 50 documents here)
    assert peft_lab.perplexity(model, tok, peft_lab.load_heldout()[:50]) < 0.5 * stats["unigram_perplexity"]
    card = (peft_lab.data_dir() / "tiny-llama" / "README.md").read_text()
    assert "python -m peft_lab.pretrain --arch llama --out data/tiny-llama" in card
    assert f"{stats['heldout_perplexity']}" in card and f"{stats['unigram_perplexity']}" in card


def test_pretrain_llama_smoke(tmp_path):
    """The llama path of the pretraining command, a few steps on a small corpus: a loadable LLaMA folder, its
    stats and card; the gpt2 default (which makes data/tiny) is unchanged."""
    from peft_lab import pretrain
    stats = pretrain.pretrain(tmp_path, n_docs=400, steps=2, batch_size=4, block_size=32, lr=3e-3, seed=0,
                              arch="llama")
    assert stats["arch"] == "llama" and stats["steps"] == 2 and stats["parameters"] == 939_136
    model, tok = load_base_model(str(tmp_path), device="cpu")
    assert model.config.model_type == "llama" and arch.num_kv_heads(model) == 2
    assert "tiny-llama" in (tmp_path / "README.md").read_text()
    assert pretrain.STEPS == {"gpt2": 3000, "llama": 1500}
    assert sum(p.numel() for p in pretrain.build_model("gpt2", 0).parameters()) == 940_800   # tiny's size


def test_missing_tiny_llama_names_its_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_LAB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--arch llama --out"):
        load_base_model("tiny-llama")
