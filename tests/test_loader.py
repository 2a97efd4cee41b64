"""Model loaders against transformers: the embedded GGUF (and its header against gguf's reader),
tiny HF directories and GGUFs written here, dummy presets, and the errors bad inputs give."""
from __future__ import annotations

import itertools
import json
import os

import gguf as gguf_lib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench.offline_throughput import hf_config
from minivllm.config import ArchConfig
from minivllm.layers.linear import MergedColumnLinear, Shard
from minivllm.loader import (EMBEDDED_MODEL_NAME, ModelSource, load_tokenizer, load_weights,
                             resolve_model)
from minivllm.loader.dummy import PRESETS, expected_parameters
from minivllm.loader.gguf_header import read_gguf_header

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def transformers_embedded(embedded_gguf):
    """transformers' own GGUF load of the embedded model (about 15 s): the oracle."""
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(embedded_gguf)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)


def _transformers_state(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


# ---------------------------------------------------------------------------------------------
# The embedded GGUF


def test_embedded_model_is_found_without_a_path(embedded_gguf):
    source = resolve_model(None)
    assert source == resolve_model("embedded") == ModelSource("gguf", embedded_gguf, source.arch,
                                                              EMBEDDED_MODEL_NAME)
    assert EMBEDDED_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert resolve_model(embedded_gguf).name == "SmolLM2-135M-Instruct.Q4_1"
    # The metadata gives exactly the real model's config.json values (1e-05, not float32's
    # 9.999999747378752e-06).
    assert source.arch == PRESETS["smollm2-135m"]


def test_embedded_weights_equal_transformers(transformers_embedded):
    source = resolve_model(None)
    expected = transformers_embedded.state_dict()
    del expected["lm_head.weight"]  # tied to the embedding
    got = dict(load_weights(source, torch.float32, CPU))
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name  # bit-identical after the un-permute


def test_embedded_arch_equals_transformers_config(transformers_embedded):
    arch, config = resolve_model(None).arch, transformers_embedded.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(arch, field) == getattr(config, field), field
    assert arch.rope_theta == pytest.approx(config.rope_parameters["rope_theta"])
    assert arch.rms_norm_eps == pytest.approx(config.rms_norm_eps)


def test_gguf_weights_are_cast_to_the_requested_dtype():
    source = resolve_model(None)

    def first(dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        return list(itertools.islice(load_weights(source, dtype, CPU), 4))

    for (name, full), (name_bf16, half) in zip(first(torch.float32), first(torch.bfloat16)):
        assert name == name_bf16 and half.dtype == torch.bfloat16
        assert torch.equal(half, full.to(torch.bfloat16))


def test_merged_linear_loads_each_shard_into_its_rows():
    # The file lists the embedding, then layer 0's nine tensors.
    weights = dict(itertools.islice(load_weights(resolve_model(None), torch.float32, CPU), 10))
    q, k, v = (weights[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    qkv = MergedColumnLinear(576, [Shard(0, len(w), len(w)) for w in (q, k, v)], bias=False)
    for shard, w in enumerate((q, k, v)):
        qkv.weight.weight_loader(qkv.weight, w, shard)
    assert torch.equal(qkv.weight, torch.cat([q, k, v]))
    with pytest.raises(ValueError, match=r"shape \(192, 576\) where the model expects \(576, 576\)"):
        qkv.weight.weight_loader(qkv.weight, k, 0)


def test_gguf_header_matches_gguf_reader(embedded_gguf):
    reader = gguf_lib.GGUFReader(embedded_gguf)
    header = read_gguf_header(embedded_gguf)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, float):
            assert header.metadata[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert header.metadata[key] == value, key
    assert set(header.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), t.data_offset)
        for t in reader.tensors]


@pytest.mark.parametrize("content,message", [
    (b"GGML" + bytes(20), "is not a GGUF file"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "unsupported GGUF version 1"),
    (b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05", "truncated GGUF file"),
])
def test_bad_gguf_files(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_gguf_header(path)


# ---------------------------------------------------------------------------------------------
# GGUF files written here from tiny HF models, the way llama.cpp's converter writes them

_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, module = base.split(".", 3)
        return f"blk.{layer}.{_TO_GGUF[module]}.{suffix}"
    return f"{_TO_GGUF[base]}.{suffix}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    heads = w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
    return heads.swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: str, arch: ArchConfig, state: dict[str, torch.Tensor],
                architecture: str = "") -> None:
    name = architecture or arch.architecture
    writer = gguf_lib.GGUFWriter(path, name)
    for key, value in {"block_count": arch.num_hidden_layers,
                       "context_length": arch.max_position_embeddings,
                       "embedding_length": arch.hidden_size,
                       "feed_forward_length": arch.intermediate_size,
                       "attention.head_count": arch.num_attention_heads,
                       "attention.head_count_kv": arch.num_key_value_heads}.items():
        writer.add_uint32(f"{name}.{key}", value)
    writer.add_float32(f"{name}.rope.freq_base", arch.rope_theta)
    writer.add_float32(f"{name}.attention.layer_norm_rms_epsilon", arch.rms_norm_eps)
    writer.add_uint32("tokenizer.ggml.bos_token_id", arch.bos_token_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", arch.eos_token_ids[0])
    heads = {"q_proj": arch.num_attention_heads, "k_proj": arch.num_key_value_heads}
    for hf_name, tensor in state.items():
        w = tensor.float().numpy()
        module = hf_name.split(".")[-2]
        if name == "llama" and module in heads:
            w = _permute(w, heads[module])
        writer.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_tiny_gguf_round_trip(tiny_hf_dir, tmp_path, architecture):
    directory = tiny_hf_dir(architecture)
    hf = resolve_model(directory)
    state = load_file(os.path.join(directory, "model.safetensors"))
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path, hf.arch, state)

    source = resolve_model(path)
    assert (source.kind, source.name) == ("gguf", "tiny")
    assert source.arch == hf.arch  # the tiny models are float32 too
    got = dict(load_weights(source, torch.float32, CPU))
    assert set(got) == set(state)
    for name, tensor in got.items():
        assert torch.equal(tensor, state[name]), name


def test_gguf_of_an_unsupported_architecture(tiny_hf_dir, tmp_path):
    directory = tiny_hf_dir("llama")
    path = str(tmp_path / "gpt2.gguf")
    _write_gguf(path, resolve_model(directory).arch,
                load_file(os.path.join(directory, "model.safetensors")), architecture="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        resolve_model(path)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


@pytest.mark.parametrize("architecture,kwargs", [
    ("llama", {}),
    ("qwen2", {}),
    ("llama", {"max_shard_size": "5MB"}),
    ("qwen2", {"dtype": torch.bfloat16}),
], ids=["llama", "qwen2", "llama-sharded", "qwen2-bf16"])
def test_hf_dir_round_trip(tiny_hf_dir, architecture, kwargs):
    directory = tiny_hf_dir(architecture, **kwargs)
    source = resolve_model(directory)
    assert (source.kind, source.path, source.name) == ("hf", directory,
                                                       os.path.basename(directory))
    with open(os.path.join(directory, "config.json")) as f:
        assert source.arch == ArchConfig.from_hf(json.load(f))
    dtype = kwargs.get("dtype", torch.float32)
    assert source.arch.torch_dtype == str(dtype).removeprefix("torch.")
    assert source.arch.attention_bias == (architecture == "qwen2")
    assert source.arch.tie_word_embeddings == (architecture == "qwen2")

    expected = _transformers_state(directory)
    got = dict(load_weights(source, dtype, CPU))
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, expected[name]), name


def test_hf_dir_sharded_checkpoint_has_an_index(tiny_hf_dir):
    assert os.path.isfile(os.path.join(tiny_hf_dir("llama", max_shard_size="5MB"),
                                       "model.safetensors.index.json"))


def test_hf_dir_tokenizer(tiny_hf_dir, embedded_gguf):
    tokenizer = load_tokenizer(resolve_model(tiny_hf_dir("llama")))
    reference = load_tokenizer(resolve_model(embedded_gguf))
    text = "Hello, world! 12345 <|im_start|>user"
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.chat_template == reference.chat_template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_hf_dir_without_tokenizer_has_none(tiny_hf_dir, tmp_path):
    directory = tiny_hf_dir("llama")
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(directory, name), tmp_path / name)
    assert load_tokenizer(resolve_model(str(tmp_path))) is None


def test_hf_dir_tensor_of_the_wrong_shape(tiny_hf_dir, tmp_path):
    directory = tiny_hf_dir("llama")
    os.link(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    message = r"down_proj.weight' has shape \(64, 128\), config.json implies \(64, 96\)"
    with pytest.raises(ValueError, match=message):
        dict(load_weights(resolve_model(str(tmp_path)), torch.float32, CPU))


# ---------------------------------------------------------------------------------------------
# Dummy weights


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dummy_presets_have_transformers_parameter_shapes(preset):
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model(preset, "dummy")
    assert (source.kind, source.path, source.name, source.arch) == ("dummy", None, preset,
                                                                    PRESETS[preset])
    config = hf_config(source.arch)
    with torch.device("meta"):  # shapes only: llama-3-8b would take 32 GB in float32
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert dict(expected_parameters(source.arch)) == shapes


def test_dummy_weights_are_deterministic(tiny_hf_dir):
    source = resolve_model(tiny_hf_dir("qwen2"), "dummy")
    assert (source.kind, source.path) == ("dummy", os.path.join(tiny_hf_dir("qwen2"),
                                                                "config.json"))
    first = dict(load_weights(source, torch.float32, CPU, seed=0))
    again = dict(load_weights(source, torch.float32, CPU, seed=0))
    other = dict(load_weights(source, torch.float32, CPU, seed=1))
    assert [(n, tuple(t.shape)) for n, t in first.items()] == expected_parameters(source.arch)
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor))
        elif name.endswith(".bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor))
        else:
            assert not torch.equal(tensor, other[name]), name
    assert first["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.02)


def test_dummy_smollm2_preset_weights_and_tokenizer():
    source = resolve_model("smollm2-135m", "dummy")
    assert resolve_model(None, "dummy") == source
    name, embed = next(iter(load_weights(source, torch.bfloat16, CPU)))
    assert (name, embed.shape, embed.dtype) == ("model.embed_tokens.weight", (49152, 576),
                                                torch.bfloat16)
    assert load_tokenizer(source).encode("Hello") == load_tokenizer(resolve_model(None)).encode(
        "Hello")
    assert load_tokenizer(resolve_model("qwen2.5-0.5b", "dummy")) is None


def test_dummy_from_a_hf_dir_uses_its_tokenizer(tiny_hf_dir):
    directory = tiny_hf_dir("llama")
    source = resolve_model(directory, "dummy")
    assert source.name == os.path.basename(directory)
    assert source.arch == resolve_model(directory).arch
    assert load_tokenizer(source) is not None


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.fixture
def bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.gguf").write_bytes(b"not really a gguf file")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    return tmp_path


@pytest.mark.parametrize("model,load_format,message", [
    ("/no/such/model", "auto", "model path '/no/such/model' does not exist"),
    ("{tmp}/empty", "auto", "is neither a .gguf file nor a directory with config.json"),
    ("{tmp}/notes.txt", "auto", "is neither a .gguf file nor a directory with config.json"),
    ("{tmp}/empty", "hf", "is not a directory with config.json"),
    ("{tmp}/empty", "gguf", "is not a GGUF file"),
    ("{tmp}/fake.gguf", "auto", "is not a GGUF file"),
    ("{tmp}/gpt2", "auto", "unsupported model: model_type='gpt2'"),
    ("{tmp}/gpt2", "dummy", "unsupported model: model_type='gpt2'"),
    ("{tmp}/gpt2/config.json", "dummy", "unsupported model: model_type='gpt2'"),
    ("{tmp}/broken", "auto", "cannot read"),
    ("{tmp}/empty", "dummy", "neither a dummy preset, a config.json nor a directory"),
    ("gpt-5", "dummy", "unknown dummy preset 'gpt-5'; presets: smollm2-135m, qwen2.5-0.5b, "
                       "llama-3-8b"),
    (None, "hf", "the embedded model is a GGUF file"),
    (None, "safetensors", "load_format must be one of"),
])
def test_bad_inputs_raise_value_error_naming_the_problem(bad_paths, model, load_format, message):
    if model is not None:
        model = model.format(tmp=bad_paths)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        resolve_model(model, load_format)


def test_hf_dir_without_weights(tiny_hf_dir, tmp_path):
    os.link(os.path.join(tiny_hf_dir("llama"), "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"has no \*\.safetensors weights"):
        next(load_weights(resolve_model(str(tmp_path)), torch.float32, CPU))


def test_unknown_source_kind():
    with pytest.raises(ValueError, match="unknown model source kind 'onnx'"):
        load_weights(ModelSource("onnx", None, PRESETS["smollm2-135m"], "x"), torch.float32, CPU)
