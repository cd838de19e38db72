"""A trained model as a GGUF file llama.cpp and Ollama load: the base GGUF's metadata (hyperparameters, tokenizer,
chat template) with the trained weights under llama.cpp's tensor names, in q8_0, f16 or f32."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

GGUF_DTYPES = ("q8_0", "f16", "f32")
# Reader fields that describe the file itself (version, counts): the writer writes its own.
_FILE_FIELDS = "GGUF."


class GGUFExportError(ValueError):
    """The GGUF cannot be written; the message says what to change."""


def gguf_file_name(dtype: str) -> str:
    """Where the GGUF goes inside a model's folder: ``gguf/model-<dtype>.gguf``. A folder of its own, because a
    tokenizer read from a GGUF next to a HF directory's tokenizer files takes those files' settings and loses the
    GGUF's chat template (transformers 5)."""
    return f"gguf/model-{dtype}.gguf"


def export_gguf(
    hf_dir: str | os.PathLike[str],
    source_gguf: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    dtype: str = "q8_0",
    *,
    name: str | None = None,
) -> Path:
    """Writes the model of ``hf_dir`` (a HF directory of safetensors, same architecture and vocabulary as
    ``source_gguf``) to ``out_path`` as a GGUF: every metadata key of ``source_gguf`` except ``general.name`` (set to
    ``name``, default the folder's name: the model id) and ``general.file_type`` (the new one), and the weights in
    ``dtype`` (1-D tensors and norms stay f32, as llama.cpp's convert keeps them). Written beside ``out_path`` and
    renamed into place. GGUFExportError when an input does not fit."""
    import gguf

    hf_dir, source_gguf, out_path = Path(hf_dir), Path(source_gguf), Path(out_path)
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"GGUF type {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}")
    if not source_gguf.is_file():
        raise GGUFExportError(
            f"source GGUF {source_gguf} does not exist; give the .gguf file the model was trained from"
        )
    try:
        reader = gguf.GGUFReader(source_gguf)
    except (ValueError, OSError) as e:
        raise GGUFExportError(f"source GGUF {source_gguf} could not be read ({e}); give a .gguf file") from e
    metadata = {key: field for key, field in reader.fields.items() if not key.startswith(_FILE_FIELDS)}
    arch = metadata["general.architecture"].contents() if "general.architecture" in metadata else None
    if arch != "llama":
        raise GGUFExportError(
            f"source GGUF {source_gguf} is a {arch!r} model; only llama-architecture models (SmolLM2's) are exported"
        )
    weights = _llama_tensors(_hf_weights(hf_dir), reader, source_gguf, hf_dir)

    partial = out_path.parent / f".{out_path.name}.partial"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write(partial, arch, metadata, weights, dtype, name or hf_dir.name)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


def _write(
    path: Path, arch: str, metadata: dict[str, Any], weights: dict[str, np.ndarray], dtype: str, name: str
) -> None:
    """The GGUF at ``path``: ``metadata`` (reader fields) with general.name and general.file_type set, then
    ``weights`` in ``dtype``."""
    import gguf

    types = gguf.GGMLQuantizationType
    qtype = {"q8_0": types.Q8_0, "f16": types.F16}.get(dtype, types.F32)
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        dtype, gguf.LlamaFileType.ALL_F32
    )
    writer = gguf.GGUFWriter(path, arch)  # it writes general.architecture first itself
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        for key, field in metadata.items():
            if key in ("general.architecture", "general.name", "general.file_type"):
                continue
            if key == "general.alignment":  # the tensor data's alignment: the writer must pad to it too
                writer.data_alignment = int(field.contents())
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
        for gguf_name, array in weights.items():
            tensor_type = qtype
            # llama.cpp's convert keeps these in f32: they are small, and quantizing them costs accuracy.
            if array.ndim <= 1 or gguf_name.endswith("_norm.weight"):
                tensor_type = types.F32
            try:
                data = gguf.quants.quantize(array, tensor_type)
            except gguf.quants.QuantError:  # rows not a multiple of the block size: llama.cpp falls back to f16
                tensor_type, data = types.F16, array.astype(np.float16)
            writer.add_tensor(gguf_name, data, raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _hf_weights(hf_dir: Path) -> dict[str, Any]:
    """The float32 tensors of a HF directory's safetensors files by name (the tied output head left out)."""
    from safetensors.torch import load_file

    config_file = hf_dir / "config.json"
    files = sorted(hf_dir.glob("*.safetensors"))
    if not config_file.is_file() or not files:
        raise GGUFExportError(
            f"{hf_dir} is not a HF model directory with safetensors weights (config.json and *.safetensors); "
            "give a directory written by save_pretrained"
        )
    config = json.loads(config_file.read_text())
    tensors = {name: tensor.float() for file in files for name, tensor in load_file(file).items()}
    if config.get("tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # the embedding is the output head; llama.cpp reads it from token_embd
    return tensors


def _llama_tensors(hf: dict[str, Any], reader: Any, source_gguf: Path, hf_dir: Path) -> dict[str, np.ndarray]:
    """The HF tensors as numpy arrays under the source GGUF's tensor names, in its order, q/k permuted as
    llama.cpp's convert does; GGUFExportError unless they match the source's tensors name for name, shape for shape."""
    import gguf

    def number(key: str) -> int:
        return int(reader.fields[key].contents())

    heads, kv_heads = number("llama.attention.head_count"), number("llama.attention.head_count_kv")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, number("llama.block_count"))
    source = {tensor.name: tuple(int(n) for n in reversed(tensor.shape)) for tensor in reader.tensors}
    mapped: dict[str, np.ndarray] = {}
    for hf_name, tensor in hf.items():
        if hf_name.endswith(".rotary_emb.inv_freq"):  # a buffer some checkpoints carry; llama.cpp computes it
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in source:
            raise GGUFExportError(
                f"tensor {hf_name} of {hf_dir} has no counterpart in {source_gguf}; export a model fine-tuned from "
                "that GGUF (same architecture)"
            )
        array = tensor.numpy()
        if array.shape != source[gguf_name]:
            raise GGUFExportError(
                f"tensor {hf_name} of {hf_dir} has shape {list(array.shape)} and {gguf_name} of {source_gguf} "
                f"{list(source[gguf_name])}; export a model fine-tuned from that GGUF (same size and vocabulary)"
            )
        if gguf_name.endswith("attn_q.weight"):
            array = permute_qk(array, heads, heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = permute_qk(array, heads, kv_heads)
        mapped[gguf_name] = array
    missing = [name for name in source if name not in mapped]
    if missing:
        raise GGUFExportError(
            f"{hf_dir} lacks the weights of {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} that "
            f"{source_gguf} has; export a model fine-tuned from that GGUF"
        )
    return {name: mapped[name] for name in source}


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of a q or k projection (HF's rotary halves -> GGML's interleaved
    pairs); transformers' GGUF loader undoes it (``LlamaTensorProcessor._reverse_permute_weights``)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
