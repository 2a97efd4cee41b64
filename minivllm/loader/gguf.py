"""A GGUF file (llama.cpp): architecture from its metadata, weights dequantized to HF layout,
or the linear weights' quantization blocks as they are (`load_blocks`, for the CPU kernels that
dequantize in registers)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from minivllm.config import SUPPORTED_ARCHITECTURES, ArchConfig
from minivllm.loader.dummy import expected_parameters
from minivllm.loader.gguf_header import GGUFHeader, GGUFTensorInfo

if TYPE_CHECKING:  # torch only where weights are made: frontends resolve models without it
    import torch

# llama.cpp tensor names -> Hugging Face names (the ".weight"/".bias" suffix carries over).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama/Qwen2 counterpart")


def read_arch(header: GGUFHeader) -> ArchConfig:
    """ArchConfig from the `{arch}.*` and `tokenizer.ggml.*` metadata keys."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in header.tensors}
    if "rope_freqs.weight" in tensors or md.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError("GGUF files with RoPE scaling (e.g. Llama 3.1) are not supported; "
                         "load the Hugging Face directory instead")
    # Llama 3 instruct files name <|eot_id|> as end-of-turn: a stop token like eos.
    eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in md]
    heads = _required(md, f"{arch}.attention.head_count")
    hidden = _required(md, f"{arch}.embedding_length")
    return ArchConfig(
        architecture=arch,
        vocab_size=_required(tensors, "token_embd.weight").shape[0],
        hidden_size=hidden,
        intermediate_size=_required(md, f"{arch}.feed_forward_length"),
        num_hidden_layers=_required(md, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=md.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=md.get(f"{arch}.attention.key_length", hidden // heads),
        max_position_embeddings=_required(md, f"{arch}.context_length"),
        rms_norm_eps=md.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=md.get(f"{arch}.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        torch_dtype="float32",  # what dequantization gives
    )


def _required(table: dict, key: str) -> Any:
    if key not in table:
        raise ValueError(f"GGUF file lacks {key!r}")
    return table[key]


def _raw(data: np.ndarray, info: GGUFTensorInfo) -> tuple[GGMLQuantizationType, np.ndarray]:
    """The tensor's type and its bytes, one row of blocks per row: [..., row bytes]."""
    try:
        qtype = GGMLQuantizationType(info.ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(f"GGUF tensor {info.name!r} has unknown ggml type "
                         f"{info.ggml_type}") from None
    nbytes = int(np.prod(info.shape)) // block_size * type_size
    raw = data[info.offset:info.offset + nbytes]
    return qtype, raw.reshape(quant_shape_to_byte_shape(info.shape, qtype))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it interleaves each head's two rotary halves)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permuted_heads(arch: ArchConfig) -> dict[str, int]:
    """The projections whose rows llama.cpp permuted, and their head counts: only its llama
    converter permutes q/k; its qwen2 converter does not."""
    return ({"q_proj": arch.num_attention_heads, "k_proj": arch.num_key_value_heads}
            if arch.architecture == "llama" else {})


def load_blocks(path: str, header: GGUFHeader, arch: ArchConfig
                ) -> Iterator[tuple[str, int, np.ndarray]]:
    """(HF name, ggml type, blocks) of every 2-D weight as the file stores it: uint8
    [out, in / block size * block bytes], rows in Hugging Face's order (q/k un-permuted; a
    permutation of whole rows keeps every block intact). Views of the file where no row moves."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    heads = _permuted_heads(arch)
    for info in header.tensors:
        if len(info.shape) != 2:
            continue
        name = hf_name(info.name)
        qtype, raw = _raw(data, info)
        module = name.split(".")[-2]
        if module in heads:
            raw = np.ascontiguousarray(_unpermute(raw, heads[module]))
        yield name, int(qtype), raw


def load_weights(path: str, header: GGUFHeader, arch: ArchConfig, dtype: torch.dtype,
                 device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor dequantized to float32, un-permuted, then cast to `dtype` on `device`."""
    import torch

    data = np.memmap(path, dtype=np.uint8, mode="r")
    expected = dict(expected_parameters(arch))
    heads = _permuted_heads(arch)
    for info in header.tensors:
        name = hf_name(info.name)
        if expected.pop(name, None) != info.shape:
            raise ValueError(f"{path!r}: unexpected tensor {info.name!r} of shape {info.shape} "
                             f"for this {arch.architecture} model")
        qtype, raw = _raw(data, info)
        try:
            w = dequantize(raw, qtype)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {info.name!r}: {e}") from None
        module = name.split(".")[-2]
        if module in heads:
            w = _unpermute(w, heads[module])
        # F32 tensors come back as read-only views of the file; torch wants writable memory.
        w = np.require(w, dtype=np.float32, requirements=["C", "W"])
        yield name, torch.from_numpy(w).to(device=device, dtype=dtype)
    if expected:
        raise ValueError(f"{path!r} lacks {len(expected)} tensor(s), e.g. {list(expected)[:3]}")
