"""The per-request pieces of the torch engine, tested without a model: detokenizer, stop strings, sampler, grammars."""

from __future__ import annotations

import json

import pytest
import torch

from inference_core import Constraint, FinishReason, InvalidRequestError, SamplingParams
from inference_core.detokenizer import IncrementalDetokenizer
from inference_core.sampling import RowSampler
from inference_core.sequence import Sequence
from inference_core.speculation import NgramProposer
from inference_core.stop_strings import StopStringMatcher
from inference_core.structured import GrammarCache, RowConstraint
from inference_core.testing import write_tiny_llama

MULTILINGUAL = [
    "Hello world, this is a test.",
    "  leading spaces and trailing  ",
    "北京是中国的首都。東京は日本の首都です。",
    "Emoji: 🎉🚀👩‍👩‍👧 done",
    "Mixed: café naïve résumé — ok\n\ttabs and\nnewlines",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    directory = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-parts"))
    return AutoTokenizer.from_pretrained(directory)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_detokenizer_deltas_concatenate_to_full_decode_and_never_end_in_replacement_char(tokenizer, text: str) -> None:
    prompt_ids = tokenizer("Say something:")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == decode(tokenizer, ids) == text
    assert not any(d.endswith("\ufffd") for d in deltas)


def test_detokenizer_holds_back_a_split_multibyte_character_until_complete(tokenizer) -> None:
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the rocket emoji spans several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🚀"


def test_detokenizer_flush_shows_a_character_cut_off_by_the_end(tokenizer) -> None:
    ids = tokenizer("a🚀", add_special_tokens=False)["input_ids"][:-1]
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == decode(tokenizer, ids)


def test_detokenizer_skips_special_tokens(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [])
    ids = tokenizer("<|im_start|>hi", add_special_tokens=False)["input_ids"]
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "hi"


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    emitted = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        emitted.append(text)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def test_stop_string_cuts_before_the_first_occurrence() -> None:
    emitted, stopped = feed_all(StopStringMatcher(["END"]), ["Hello ", "wor", "ld E", "N", "D and more"])
    assert stopped
    assert "".join(emitted) == "Hello world "
    assert not any("E" in e for e in emitted), "no part of the stop string is ever streamed"


def test_stop_string_earliest_of_several_wins() -> None:
    emitted, stopped = feed_all(StopStringMatcher(["xyz", "\n\n"]), ["a\n", "\nb xyz"])
    assert stopped and "".join(emitted) == "a"


def test_stop_string_prefix_that_does_not_complete_is_released() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("x </ans") == ("x ", False)
    assert matcher.feed("wer>") == ("", True)
    other = StopStringMatcher(["</answer>"])
    emitted, stopped = feed_all(other, ["x </ans", "w", " y"])
    assert not stopped and "".join(emitted) == "x </answ y"


def test_stop_string_held_back_prefix_is_flushed_at_the_end() -> None:
    emitted, stopped = feed_all(StopStringMatcher(["STOP"]), ["value ST"])
    assert not stopped and emitted == ["value ", "ST"]


def test_no_stop_strings_pass_text_through() -> None:
    assert StopStringMatcher([]).feed("anything") == ("anything", False)


def test_greedy_sampler_takes_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert RowSampler(SamplingParams(temperature=0), 4, torch.device("cpu")).sample(logits) == 1


def test_seeded_sampler_is_reproducible_and_seeds_differ() -> None:
    logits = torch.zeros(1000)

    def draws(seed: int) -> list[int]:
        sampler = RowSampler(SamplingParams(temperature=1.0, seed=seed), 1000, torch.device("cpu"))
        return [sampler.sample(logits.clone()) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    top_k = RowSampler(SamplingParams(top_k=2, seed=1), 5, torch.device("cpu"))
    assert {top_k.sample(logits.clone()) for _ in range(200)} <= {0, 1}
    top_p = RowSampler(SamplingParams(top_p=0.5, seed=1), 5, torch.device("cpu"))
    assert {top_p.sample(logits.clone()) for _ in range(200)} == {0}


def test_repetition_penalty_discourages_seen_tokens() -> None:
    sampler = RowSampler(SamplingParams(temperature=0, repetition_penalty=2.0), 3, torch.device("cpu"))
    sampler.observe([0])
    assert sampler.sample(torch.tensor([3.0, 2.0, 0.0])) == 1


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        (SamplingParams(temperature=-1), "temperature must be >= 0"),
        (SamplingParams(top_p=0), "top_p must be in (0, 1]"),
        (SamplingParams(top_p=1.5), "top_p must be in (0, 1]"),
        (SamplingParams(top_k=-1), "top_k must be >= 0"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty must be > 0"),
        (SamplingParams(seed=-1), "seed must be in"),
    ],
)
def test_bad_sampling_values_are_rejected_with_the_allowed_range(params: SamplingParams, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RowSampler(params, 10, torch.device("cpu"))


@pytest.fixture(scope="module")
def grammars(tokenizer) -> GrammarCache:
    return GrammarCache(tokenizer, len(tokenizer), [tokenizer.eos_token_id], max_entries=2)


def test_grammar_cache_is_lru_by_kind_and_text(grammars: GrammarCache) -> None:
    a = grammars.get(Constraint("regex", "[0-9]+"))
    assert grammars.get(Constraint("regex", "[0-9]+")) is a
    grammars.get(Constraint("regex", "[a-z]+"))
    grammars.get(Constraint("ebnf", 'root ::= "yes" | "no"'))
    assert len(grammars) == 2
    assert grammars.get(Constraint("regex", "[0-9]+")) is not a, "the least recently used entry was evicted"


@pytest.mark.parametrize(
    ("constraint", "fragment"),
    [
        (Constraint("json_schema", "{not json"), "JSON schema is not valid JSON"),
        (Constraint("json_schema", '{"type": "no-such-type"}'), "invalid JSON schema"),
        (Constraint("regex", "[unclosed"), "invalid regex"),
        (Constraint("ebnf", "root ::= undefined_rule"), "invalid EBNF grammar"),
        (Constraint("xml", "<a/>"), "constraint kind 'xml' is unknown"),
    ],
)
def test_invalid_constraints_raise_with_xgrammars_message(
    grammars: GrammarCache, constraint: Constraint, fragment: str
) -> None:
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        grammars.get(constraint)
    assert len(str(info.value)) > len(fragment) + 2, "the parser's own explanation is included"


def test_row_constraint_forces_the_grammar(tokenizer, grammars: GrammarCache) -> None:
    constraint = RowConstraint(grammars.get(Constraint("ebnf", 'root ::= "yes" | "no"')), len(tokenizer))
    sampler = RowSampler(SamplingParams(temperature=1.0, seed=3), len(tokenizer), torch.device("cpu"))
    ids: list[int] = []
    while not constraint.is_terminated:
        logits = torch.randn(len(tokenizer))
        constraint.mask(logits)
        token = sampler.sample(logits)
        constraint.accept(token)
        ids.append(token)
    assert ids[-1] == tokenizer.eos_token_id
    assert decode(tokenizer, ids[:-1]) in ("yes", "no")


def make_sequence(tokenizer, *, stop=(), max_new_tokens=100, constraint=None) -> tuple[Sequence, list]:
    chunks: list = []
    prompt = tokenizer("Q:")["input_ids"]
    seq = Sequence(
        request_id="r1",
        prompt_ids=prompt,
        max_new_tokens=max_new_tokens,
        sampler=RowSampler(SamplingParams(temperature=0), len(tokenizer), torch.device("cpu")),
        detokenizer=IncrementalDetokenizer(tokenizer, prompt),
        stop=StopStringMatcher(list(stop)),
        constraint=constraint,
        eos_token_ids=frozenset({tokenizer.eos_token_id}),
        sink=chunks.append,
        arrival=0.0,
    )
    return seq, chunks


def run_tokens(seq: Sequence, ids: list[int]) -> None:
    for token in ids:
        seq.append_token(token)
        if seq.finished:
            return


def test_a_sequence_drafts_from_its_prompt_and_every_token_so_far_however_late_it_is_first_asked(tokenizer) -> None:
    seq, _ = make_sequence(tokenizer)
    a, b, c, d = tokenizer(" one two three four")["input_ids"][:4]
    run_tokens(seq, [a, b, c, d, a, b])  # no draft asked yet: the index is built on the first ask
    assert seq.draft(3) == [c, d, a] == NgramProposer([*seq.prompt_ids, a, b, c, d, a, b]).propose(3)
    run_tokens(seq, [d])  # later tokens reach the index: neither (a, b, d) nor (b, d) occurred before
    assert seq.draft(3) == [] == NgramProposer([*seq.prompt_ids, a, b, c, d, a, b, d]).propose(3)
    run_tokens(seq, [a])  # (d, a) did: it was followed by b
    assert seq.draft(2) == [b, d]


def test_sequence_ends_at_eos_with_usage_and_all_token_ids(tokenizer) -> None:
    seq, chunks = make_sequence(tokenizer)
    ids = [*tokenizer(" 你好, world 🎉", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    run_tokens(seq, ids)
    last = chunks[-1]
    assert last.finish_reason is FinishReason.STOP
    assert "".join(c.text for c in chunks) == " 你好, world 🎉"
    assert [i for c in chunks for i in c.token_ids] == ids
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert last.usage.prompt_tokens == len(seq.prompt_ids)
    assert last.usage.completion_tokens == len(ids)
    assert last.usage.total_tokens == len(seq.prompt_ids) + len(ids)
    assert last.timings is not None and last.timings.total_ms >= 0


def test_sequence_stops_at_max_tokens_with_length(tokenizer) -> None:
    seq, chunks = make_sequence(tokenizer, max_new_tokens=3)
    run_tokens(seq, tokenizer(" one two three four five", add_special_tokens=False)["input_ids"])
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert "".join(c.text for c in chunks) == " one two three"
    assert chunks[-1].usage.completion_tokens == 3


def test_sequence_stop_string_hides_the_stop_and_what_follows(tokenizer) -> None:
    seq, chunks = make_sequence(tokenizer, stop=["Observation:"])
    run_tokens(seq, tokenizer("Thought: look it up\nObservation: Paris", add_special_tokens=False)["input_ids"])
    assert chunks[-1].finish_reason is FinishReason.STOP_STRING
    assert "".join(c.text for c in chunks) == "Thought: look it up\n"


def test_sequence_with_grammar_finishes_when_the_grammar_terminates(tokenizer, grammars: GrammarCache) -> None:
    constraint = RowConstraint(grammars.get(Constraint("json_schema", json.dumps({"type": "boolean"}))), len(tokenizer))
    seq, chunks = make_sequence(tokenizer, constraint=constraint)
    run_tokens(seq, [*tokenizer("true", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id])
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert json.loads("".join(c.text for c in chunks)) is True


def test_scheduler_start_reports_a_model_that_fails_its_warm_up() -> None:
    from inference_core import EngineError
    from inference_core.scheduler import SerialScheduler

    class BrokenRunner:
        def warm_up(self) -> None:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(EngineError, match="the model failed its warm-up step: mat1 and mat2 shapes"):
        SerialScheduler(BrokenRunner(), max_queue=1).start()
