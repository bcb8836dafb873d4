"""Base models: exact architecture counts on the meta device, seeding, bad inputs, PEFT's count format."""
import time

import pytest
import torch
from transformers import GPT2Config

from peft_lab.measure import count_parameters, print_trainable_parameters
from peft_lab.models import build_from_config, load_base_model
from peft_lab.paths import data_dir

# Counted by building each architecture (meta device) and cross-checked against the published sizes:
# GPT-2 124M/355M/774M/1.5B (Radford et al. 2019), LLaMA-2 7B (Touvron et al. 2023).
EXPECTED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-7b": 6_738_415_616,
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_architecture_counts_on_meta(name):
    model = build_from_config(name, device="meta")
    assert count_parameters(model) == (EXPECTED[name], EXPECTED[name])
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name]


def test_gpt2_count_formula():
    # Notebook 00, eq. (5): 12·L·d² + 13·L·d + V·d + P·d + 2d (tied lm_head, biases everywhere).
    for name in ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]:
        c = build_from_config(name, device="meta").config
        L, d, V, P = c.n_layer, c.n_embd, c.vocab_size, c.n_positions
        assert 12 * L * d * d + 13 * L * d + V * d + P * d + 2 * d == EXPECTED[name]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        build_from_config("gpt5", device="meta")
    for name in ["tiny", *EXPECTED]:
        assert repr(name) in str(err.value)


def test_meta_device_holds_no_data():
    model = build_from_config("gpt2-xl", device="meta")
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        next(model.parameters()).sum().item()


def _small():
    return GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def test_cpu_build_is_seeded():
    a = build_from_config(_small(), device="cpu", seed=0).state_dict()
    b = build_from_config(_small(), device="cpu", seed=0).state_dict()
    c = build_from_config(_small(), device="cpu", seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(v.device.type == "cpu" for v in a.values())


@pytest.mark.parametrize("bad, error", [(None, TypeError), (123, TypeError), (["gpt2"], TypeError), ("", ValueError)])
def test_load_base_model_rejects_non_strings(bad, error):
    with pytest.raises(error, match="name must be a non-empty string"):
        load_base_model(bad)


def test_load_base_model_missing_folder_points_to_tiny(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="tiny"):
        load_base_model("./no-such-model-dir", device="cpu")
    assert time.perf_counter() - start < 10, "a missing local folder must fail fast, not wait on the network"


def test_load_base_model_unreachable_hub_id_fails_fast(monkeypatch):
    """A hub id with no network (simulated with a host that cannot resolve): a clear error within seconds."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    start = time.perf_counter()
    with pytest.raises(OSError, match='load_base_model\\("tiny"\\)'):
        load_base_model("no-such-org/no-such-model", device="cpu")
    assert time.perf_counter() - start < 10



def test_hub_id_is_fetched_through_the_hub_clients_session(monkeypatch):
    """Behind a proxy a direct socket to the hub fails while huggingface_hub's session (which reads
    HTTPS_PROXY) gets through: the download must then be tried, not refused."""
    import socket

    import huggingface_hub

    from peft_lab import models
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")

    def no_direct_route(*args, **kwargs):
        raise OSError("no route to host except through the proxy")
    monkeypatch.setattr(socket, "create_connection", no_direct_route)
    heads = []

    class Session:   # stands in for huggingface_hub's proxy-aware HTTP session
        def head(self, url, timeout):
            heads.append(url)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Session())
    downloads = []

    def from_pretrained(source, local_files_only=False, **kwargs):
        if local_files_only:
            raise OSError("not in the local cache")
        downloads.append(source)
        raise OSError("stop here: the download was tried")
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(OSError, match="could not load 'some-org/some-model'"):
        load_base_model("some-org/some-model", device="cpu")
    assert heads and downloads == ["some-org/some-model"]

def test_print_trainable_parameters_matches_peft(capsys):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_from_config("gpt2", device="meta"),
                           LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    print_trainable_parameters(model)
    ours = capsys.readouterr().out.strip()
    assert ours == peft_line
    assert ours == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"


def test_load_base_model_from_any_folder(tmp_path, small_gpt2):
    """The non-"tiny" path (a hub id online) goes through from_pretrained; a local folder exercises it."""
    from transformers import AutoTokenizer
    small_gpt2.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(data_dir() / "tiny").save_pretrained(tmp_path)
    model, tok = load_base_model(str(tmp_path), device="cpu")
    assert not model.training and tok.pad_token is not None
    assert count_parameters(model) == count_parameters(small_gpt2)
