"""The python models' pure helpers (text_codec, the twin's request reading) on the real SmolLM2 tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_core import Constraint, SamplingParams
from services.triton import default_model_path
from services.triton.repo import DEPLOY_DIR

# The python models import their neighbours as top-level modules (Triton puts model.py's directory on sys.path).
for folder in ("common", "tensorrt_llm_twin"):
    sys.path.insert(0, str(DEPLOY_DIR / "models" / folder))

import text_codec  # noqa: E402
from twin_request import parse_request  # noqa: E402

pytestmark = pytest.mark.slow
TEXT = "Hello wörld, naïve café 你好 🙂 done."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    exported = tmp_path_factory.mktemp("tokenizer")
    from services.triton import export_gguf_tokenizer

    export_gguf_tokenizer(default_model_path(), exported)
    return text_codec.load_tokenizer(str(exported))


def test_incremental_decoder_keeps_spaces_and_multibyte_characters(tokenizer: Any) -> None:
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    generated = tokenizer.encode(" " + TEXT, add_special_tokens=False)
    decoder = text_codec.IncrementalDecoder(tokenizer, prompt)
    deltas = [decoder.push([token]) for token in generated]
    deltas.append(decoder.flush())
    assert "".join(deltas) == " " + TEXT
    assert not any(text_codec.REPLACEMENT_CHAR in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0, "some multibyte character spans several tokens and waits for them"


def test_continuation_keeps_the_leading_space(tokenizer: Any) -> None:
    ids = tokenizer.encode(" Paris", add_special_tokens=False)
    assert text_codec.decode_continuation(tokenizer, ids) == " Paris"
    assert text_codec.decode_output(tokenizer, ids, prefix=[]) == " Paris"
    assert text_codec.decode_continuation(tokenizer, []) == ""


def test_ends_mid_character_sees_a_split_character(tokenizer: Any) -> None:
    ids = tokenizer.encode("你好", add_special_tokens=False)
    assert len(ids) > 1
    assert text_codec.ends_mid_character(tokenizer, ids[:1])
    assert not text_codec.ends_mid_character(tokenizer, ids)


def test_word_lists_round_trip(tokenizer: Any) -> None:
    words = ["\n\n", " Paris", "你好"]
    ids_list = text_codec.words_to_ids_list(tokenizer, words)
    assert ids_list.shape[0] == 2 and ids_list.dtype == np.int32
    lists = text_codec.ids_list_to_token_lists(ids_list)
    assert [text_codec.decode(tokenizer, ids) for ids in lists] == words
    empty = text_codec.words_to_ids_list(tokenizer, [])
    assert empty.tolist() == [[0], [-1]]
    assert text_codec.ids_list_to_token_lists(empty) == []


def test_embedding_bias_needs_one_weight_per_word(tokenizer: Any) -> None:
    bias = text_codec.embedding_bias(tokenizer, [" Paris"], [2.5], len(tokenizer))
    assert bias.shape == (len(tokenizer),) and bias.sum() == pytest.approx(2.5 * len(tokenizer.encode(" Paris")))
    with pytest.raises(ValueError, match="send one weight per word"):
        text_codec.embedding_bias(tokenizer, [" Paris", " Rome"], [1.0], len(tokenizer))


def test_parse_flag_names_the_parameter() -> None:
    assert text_codec.parse_flag("True", "x") and not text_codec.parse_flag("", "x")
    with pytest.raises(ValueError, match="parameter decoupled is 'maybe'; use true or false"):
        text_codec.parse_flag("maybe", "decoupled")


def _request(tokenizer: Any, prompt: str = "Hi there", **extra: Any) -> dict[str, np.ndarray]:
    ids = tokenizer.encode(prompt)
    inputs = {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([len(ids)], dtype=np.int32),
        "request_output_len": np.array([12], dtype=np.int32),
        "end_id": np.array([tokenizer.eos_token_id], dtype=np.int32),
        "pad_id": np.array([tokenizer.pad_token_id], dtype=np.int32),
        "stop_words_list": np.array([text_codec.words_to_ids_list(tokenizer, [])]),
        "bad_words_list": np.array([text_codec.words_to_ids_list(tokenizer, [])]),
        "embedding_bias": np.zeros((1, 0), dtype=np.float32),
    }
    inputs.update({k: np.asarray(v) for k, v in extra.items()})
    return inputs


def _parse(tokenizer: Any, inputs: dict[str, np.ndarray], guided: bool = True) -> Any:
    return parse_request(
        inputs,
        tokenizer,
        exclude_input_default=False,
        guided_decoding=guided,
        special_prefix=text_codec.special_prefix(tokenizer),
    )


def test_twin_reads_a_plain_request_as_greedy(tokenizer: Any) -> None:
    job = _parse(tokenizer, _request(tokenizer, "<|im_start|>user\nHi<|im_end|>\n"))
    assert job.generation.prompt == "<|im_start|>user\nHi<|im_end|>\n"
    assert job.generation.max_tokens == 12
    assert job.generation.sampling == SamplingParams(temperature=0.0)
    assert job.generation.stop == [] and job.generation.constraint is None
    assert not job.streaming and not job.exclude_input_in_output
    assert job.prompt_ids == tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n")


def test_twin_maps_sampling_stops_and_guides(tokenizer: Any) -> None:
    inputs = _request(
        tokenizer,
        runtime_top_k=[40],
        runtime_top_p=[0.9],
        temperature=[0.7],
        seed=np.array([7], dtype=np.uint64),
        repetition_penalty=[1.1],
        streaming=[True],
        exclude_input_in_output=[True],
        stop_words_list=np.array([text_codec.words_to_ids_list(tokenizer, ["\n\n", "END"])]),
        guided_decoding_guide_type=np.array([[b"json_schema"]], dtype=np.object_),
        guided_decoding_guide=np.array([[b'{"type": "object"}']], dtype=np.object_),
    )
    job = _parse(tokenizer, inputs)
    assert job.generation.sampling == SamplingParams(
        temperature=pytest.approx(0.7),
        top_k=40,
        top_p=pytest.approx(0.9),
        seed=7,
        repetition_penalty=pytest.approx(1.1),
    )
    assert job.generation.stop == ["\n\n", "END"]
    assert job.generation.constraint == Constraint(kind="json_schema", value='{"type": "object"}')
    assert job.streaming and job.exclude_input_in_output
    any_json = _parse(
        tokenizer, _request(tokenizer, guided_decoding_guide_type=np.array([[b"json"]], dtype=np.object_))
    )
    assert any_json.generation.constraint == Constraint(kind="json_schema", value="{}")
    grammar = _parse(
        tokenizer,
        _request(
            tokenizer,
            guided_decoding_guide_type=np.array([[b"ebnf_grammar"]], dtype=np.object_),
            guided_decoding_guide=np.array([[b'root ::= "yes" | "no"']], dtype=np.object_),
        ),
    )
    assert grammar.generation.constraint == Constraint(kind="ebnf", value='root ::= "yes" | "no"')


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"beam_width": [2]}, "beam_width > 1 is not supported by the CPU twin"),
        ({"num_return_sequences": [3]}, "num_return_sequences > 1 is not supported"),
        ({"presence_penalty": [0.5]}, "presence_penalty is not supported by the CPU twin's torch engine"),
        ({"frequency_penalty": [0.5]}, "frequency_penalty is not supported"),
        ({"min_tokens": [5]}, "min_tokens above 1 is not supported"),
        ({"return_log_probs": [True]}, "return_log_probs is not supported"),
        ({"return_generation_logits": [True]}, "return_generation_logits is not supported"),
        ({"lora_task_id": np.array([3], dtype=np.uint64)}, "lora_task_id is not supported by the CPU twin"),
        ({"end_id": [5]}, "end_id 5 differs from the model's end token"),
        ({"embedding_bias": np.ones((1, 10), dtype=np.float32)}, "embedding_bias_words is not supported"),
        ({"guided_decoding_guide_type": np.array([[b"structural_tag"]], dtype=np.object_)}, "use one of json_schema"),
        ({"guided_decoding_guide": np.array([[b"{}"]], dtype=np.object_)}, "without guided_decoding_guide_type"),
        ({"guided_decoding_guide_type": np.array([[b"regex"]], dtype=np.object_)}, "guided_decoding_guide is empty"),
    ],
)
def test_twin_refuses_what_the_engine_cannot_do(tokenizer: Any, extra: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError) as info:
        _parse(tokenizer, _request(tokenizer, **extra))
    assert expected in str(info.value)


def test_twin_refuses_bad_words_batches_and_disabled_guides(tokenizer: Any) -> None:
    bad = _request(tokenizer, bad_words_list=np.array([text_codec.words_to_ids_list(tokenizer, [" darn"])]))
    with pytest.raises(ValueError, match="bad_words is not supported"):
        _parse(tokenizer, bad)
    batch = _request(tokenizer)
    batch["input_ids"] = np.repeat(batch["input_ids"], 2, axis=0)
    with pytest.raises(ValueError, match="one sequence per request; got a batch of 2, send 1"):
        _parse(tokenizer, batch)
    guided = _request(
        tokenizer,
        guided_decoding_guide_type=np.array([[b"regex"]], dtype=np.object_),
        guided_decoding_guide=np.array([[b"[0-9]+"]], dtype=np.object_),
    )
    with pytest.raises(ValueError, match="regenerate it with guided_decoding_backend=xgrammar"):
        _parse(tokenizer, guided, guided=False)


def test_deploy_models_import_nothing_from_services() -> None:
    for model in (DEPLOY_DIR / "models").rglob("*.py"):
        text = model.read_text()
        assert "import services" not in text and "from services" not in text, model
    for model in ("preprocessing", "postprocessing", "tensorrt_llm_bls", "common"):
        for source in (DEPLOY_DIR / "models" / model).glob("*.py"):
            assert "inference_core" not in source.read_text(), f"{source} must run in the NGC container too"
    assert Path(DEPLOY_DIR / "models" / "tensorrt_llm_twin" / "model.py").is_file()
