"""GGUF export of a trained model (services.train.gguf_export) on a tiny random Llama with SmolLM2's tokenizer: the
weights come back through the service's own GGUF loader (transformers', which undoes llama.cpp's q/k permutation),
the source's metadata is copied, the engine generates the same greedy text from the GGUF as from the HF directory,
and `meshpilot train` writes it inside the model's folder, which the inference service still serves as before."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import gguf
import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference_core import BatchingConfig, GenerationRequest, SamplingParams, TorchEngine
from inference_core.model_loading import default_model_path, find_models, load_model, resolve_model_path
from inference_core.testing import write_tiny_llama
from services.eval import Contains, EvalTask
from services.planner.store import RunStore
from services.train import TrainSettings, TrainSettingsError
from services.train.finetune import FineTuneResult
from services.train.gguf_export import GGUFExportError, export_gguf, permute_qk
from services.train.loop import TrainJob
from tests.unit.planner_fakes import FakeTools

SPLITS = ("train", "test")
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def write_tiny_source(tiny: Path, path: Path) -> Path:
    """What a round trains from, at the tiny model's size: the real SmolLM2 GGUF's metadata (tokenizer, merges, chat
    template) with the tiny model's hyperparameters, and zero tensors of its shapes under llama.cpp's names."""
    config = json.loads((tiny / "config.json").read_text())
    hidden, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    hyper = {
        "llama.block_count": layers, "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": hidden, "llama.feed_forward_length": ff, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads, "llama.rope.dimension_count": head_dim,
        "llama.rope.freq_base": config["rope_parameters"]["rope_theta"],
        "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
    }  # fmt: skip
    reader = gguf.GGUFReader(default_model_path())
    writer = gguf.GGUFWriter(path, "llama")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub_type = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, hyper.get(key, field.contents()), field.types[0], sub_type)
    shapes = {"token_embd.weight": (config["vocab_size"], hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ff),
        }  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-gguf") / "kg-r1", context_length=512)


@pytest.fixture(scope="module")
def source(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_source(tiny, tmp_path_factory.mktemp("source") / "tiny.gguf")


@pytest.fixture(scope="module")
def exported(tiny: Path, source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {dtype: export_gguf(tiny, source, folder / f"model-{dtype}.gguf", dtype) for dtype in ("f32", "q8_0")}


@contextlib.asynccontextmanager
async def started(model_path: Path) -> AsyncIterator[TorchEngine]:
    engine = TorchEngine(model_path, model_id="t", batching=BatchingConfig(max_batch_size=1, max_seq_len=256))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def greedy(engine: TorchEngine) -> str:
    request = GenerationRequest(messages=PROMPT, max_tokens=12, sampling=SamplingParams(temperature=0))
    return "".join([chunk.text async for chunk in engine.generate(request)])


async def test_the_services_loader_reads_the_f32_export_back_to_the_same_weights_and_greedy_text(
    tiny: Path, exported: dict[str, Path]
) -> None:
    # inference_core.model_loading: de-quantize, un-permute q/k (the engine keeps only packed copies of the weights)
    loaded = load_model(exported["f32"]).model.state_dict()
    async with started(exported["f32"]) as engine:
        text = await greedy(engine)
    for name, weight in load_file(tiny / "model.safetensors").items():
        assert torch.equal(loaded[name], weight), name
    async with started(tiny) as engine:
        assert text and await greedy(engine) == text


def test_each_file_has_the_source_metadata_the_model_id_and_the_trained_weights_in_its_type(
    tiny: Path, source: Path, exported: dict[str, Path]
) -> None:
    def fields(reader: gguf.GGUFReader) -> dict[str, object]:
        return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}

    original = gguf.GGUFReader(source)
    trained = load_file(tiny / "model.safetensors")
    for dtype, path in exported.items():
        written = gguf.GGUFReader(path)
        got, expected = fields(written), fields(original)
        assert got.pop("general.name") == "kg-r1" and expected.pop("general.name") != "kg-r1"
        file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if dtype == "q8_0" else gguf.LlamaFileType.ALL_F32
        assert got.pop("general.file_type") == file_type
        expected.pop("general.file_type")
        assert got == expected  # tokenizer (vocabulary, merges, special ids), chat template, hyperparameters
        assert [t.name for t in written.tensors] == [t.name for t in original.tensors]
        tensors = {t.name: t for t in written.tensors}
        matrix = gguf.GGMLQuantizationType.Q8_0 if dtype == "q8_0" else gguf.GGMLQuantizationType.F32
        assert tensors["blk.1.attn_k.weight"].tensor_type == tensors["token_embd.weight"].tensor_type == matrix
        for norm in ("blk.1.attn_norm.weight", "output_norm.weight"):  # 1-D: kept f32, as llama.cpp does
            assert tensors[norm].tensor_type == gguf.GGMLQuantizationType.F32
        # The values, in llama.cpp's layout: q8_0 within one step (its block's largest / 127) of the trained ones.
        key = permute_qk(trained["model.layers.1.self_attn.k_proj.weight"].numpy(), 4, 2)
        stored = gguf.quants.dequantize(tensors["blk.1.attn_k.weight"].data, matrix)
        assert np.abs(stored - key).max() <= (np.abs(key).max() / 127 if dtype == "q8_0" else 0)
        assert not (path.parent / f".{path.name}.partial").exists()


def test_llama_cpp_loads_the_export_and_computes_the_same_logits(tiny: Path, exported: dict[str, Path]) -> None:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed in .venv (building it takes many minutes of both cores)"
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(exported["f32"]), n_ctx=64, logits_all=True, verbose=False)
    assert llm.tokenize(b"The capital of France is", add_bos=False) == ids
    llm.eval(ids)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny).eval()(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), expected, atol=1e-3)


def test_bad_inputs_are_refused_saying_what_to_change(tiny: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    with pytest.raises(GGUFExportError, match=r"'q4_k' is not supported; use one of q8_0, f16, f32"):
        export_gguf(tiny, source, out, "q4_k")
    with pytest.raises(GGUFExportError, match=r"absent.gguf does not exist; give the .gguf file the model was trained"):
        export_gguf(tiny, tmp_path / "absent.gguf", out)
    (tmp_path / "not.gguf").write_text("not a gguf")
    with pytest.raises(GGUFExportError, match=r"could not be read .*give a .gguf file"):
        export_gguf(tiny, tmp_path / "not.gguf", out)
    with pytest.raises(GGUFExportError, match=r"is not a HF model directory with safetensors weights"):
        export_gguf(tmp_path, source, out)
    with pytest.raises(GGUFExportError, match=r"has shape \[49152, 64\] and token_embd.weight .* \[49152, 576\]"):
        export_gguf(tiny, default_model_path(), out)  # the real 135M model's GGUF: another size
    assert list(tmp_path.iterdir()) == [tmp_path / "not.gguf"]
    with pytest.raises(TrainSettingsError, match=r"--gguf is 'q4_k'; use q8_0, f16, f32, none"):
        TrainSettings(gguf="q4_k").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("gguf_type", ["f16", "none"])
async def test_a_round_writes_the_gguf_inside_the_model_folder_the_service_serves(
    tiny: Path, source: Path, tmp_path: Path, gguf_type: str
) -> None:
    suite = tmp_path / "suite.jsonl"
    tasks = [EvalTask(f"t-{split}", "Capital of France?", (Contains(("Paris",)),), "c", split) for split in SPLITS]
    suite.write_text("".join(json.dumps(task.to_json()) + "\n" for task in tasks))
    settings = TrainSettings(name="kg", suite=str(suite), eval_suite=str(suite), gguf=gguf_type)
    models = tmp_path / "data" / "models"
    shutil.copytree(tiny, models / "kg-r0")  # the round's starting model

    def tune(**kwargs: object) -> FineTuneResult:
        model = AutoModelForCausalLM.from_pretrained(tiny)
        return FineTuneResult(model, AutoTokenizer.from_pretrained(tiny), 1, 0, steps=1, loss=0.5)

    async with grpc.aio.insecure_channel("127.0.0.1:9") as channel:  # a round's training calls no service
        job = TrainJob(
            settings, data_dir=tmp_path / "data", default_model_path=str(source), default_model_id="smollm2",
            channel=channel, tools=FakeTools(), journal=RunStore(tmp_path / "journal.db"),
        )  # fmt: skip
        round_folder = tmp_path / "data" / "train" / "kg" / "round-1"
        round_folder.mkdir(parents=True)
        assert await job._train(1, "kg-r0", tune, round_folder) == (1, 0.5)
    folder = models / "kg-r1"
    ggufs = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.gguf"))
    assert ggufs == ([] if gguf_type == "none" else ["gguf/model-f16.gguf"])
    assert find_models(models)["kg-r1"] == folder
    assert resolve_model_path(folder) == (folder, None)  # served as the HF directory it was, not from the GGUF
    if ggufs:
        path = folder / ggufs[0]
        assert gguf.GGUFReader(path).fields["general.name"].contents() == "kg-r1"
        # Read on its own (as llama.cpp and our engine read a GGUF), its tokenizer keeps the chat template: beside
        # the HF directory's tokenizer files it would not.
        assert AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).chat_template
