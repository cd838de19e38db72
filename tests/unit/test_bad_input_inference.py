"""Bad input to the inference service: max_tokens beyond the model's context, constraint errors without the grammar
compiler's C++ source paths, and an unknown model name quoted short."""

from __future__ import annotations

import grpc
import pytest

from inference_core import Constraint, GenerationRequest, InvalidRequestError
from inference_core.testing import FakeEngine, write_tiny_llama
from meshpilot.inference.v1 import inference_pb2 as pb
from meshpilot.inference.v1 import inference_pb2_grpc
from services.common import load_config
from services.inference import create_server, servicer_of


@pytest.fixture
def config():
    config = load_config()
    config.inference.server.port = 0
    config.inference.server.metrics = False
    config.inference.model_id = "fake-model"
    return config


class Served:
    """The inference server in-process over ``engine``, with a stub."""

    def __init__(self, engine: FakeEngine, config) -> None:
        self.engine = engine
        self.server = create_server(config, engine=engine)

    async def __aenter__(self) -> inference_pb2_grpc.InferenceServiceStub:
        await self.server.start()
        await servicer_of(self.server).start_engines()
        await self.server.set_serving()
        self.channel = grpc.aio.insecure_channel(self.server.address)
        return inference_pb2_grpc.InferenceServiceStub(self.channel)

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)


async def _generate(stub, **kwargs) -> list[pb.GenerateResponse]:
    return [r async for r in stub.Generate(pb.GenerateRequest(**kwargs), timeout=10)]


async def _refused(stub, **kwargs) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _generate(stub, **kwargs)
    return caught.value


@pytest.mark.parametrize("max_tokens", [2**31 - 1, 4097])
async def test_max_tokens_beyond_the_models_context_is_invalid_argument(config, max_tokens: int) -> None:
    engine = FakeEngine(["never"], context_length=4096)
    async with Served(engine, config) as stub:
        error = await _refused(stub, prompt="x", max_tokens=max_tokens)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens must be at most 4096, the model's context" in error.details()
    assert f"got {max_tokens}" in error.details()
    assert engine.requests == []


async def test_max_tokens_up_to_the_context_is_served(config) -> None:
    async with Served(FakeEngine(["fine"], context_length=4096), config) as stub:
        responses = await _generate(stub, prompt="x", max_tokens=4096)
    assert "".join(r.text for r in responses) == "fine"


@pytest.fixture(scope="module")
def grammars(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    from inference_core.structured import GrammarCache

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
    return GrammarCache(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def _compiling(grammars):
    """A FakeEngine script that compiles each request's constraint with xgrammar, as the torch engine does."""

    def output(request: GenerationRequest) -> str:
        if request.constraint is not None:
            grammars.get(request.constraint)
        return "ok"

    return output


@pytest.mark.parametrize(
    ("constraint", "fragment"),
    [
        (pb.OutputConstraint(regex="[unclosed"), "invalid regex: Regex parsing error at position 10"),
        (pb.OutputConstraint(ebnf_grammar="root ::= undefined_rule"), 'Rule "undefined_rule" is not defined'),
        (pb.OutputConstraint(json_schema='{"type": "no-such-type"}'), 'Unsupported type "no-such-type"'),
        (pb.OutputConstraint(json_schema='{"type": "string", "pattern": "[x"}'), "Regex parsing error"),
    ],
)
async def test_constraint_errors_keep_the_parsers_words_without_source_paths(
    config, grammars, constraint: pb.OutputConstraint, fragment: str
) -> None:
    async with Served(FakeEngine(_compiling(grammars)), config) as stub:
        error = await _refused(stub, prompt="x", constraint=constraint)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.details()
    assert "/project" not in error.details() and ".cc:" not in error.details(), error.details()


async def test_engine_messages_lose_source_locations(config) -> None:
    raised = InvalidRequestError(
        "invalid EBNF grammar: [02:05:17] /project/cpp/grammar_parser.cc:820: EBNF parser error"
    )
    async with Served(FakeEngine([raised]), config) as stub:
        error = await _refused(stub, prompt="x", constraint=pb.OutputConstraint(ebnf_grammar="x"))
    assert error.details() == "invalid EBNF grammar: EBNF parser error"


async def test_a_valid_constraint_still_compiles_and_generates(config, grammars) -> None:
    async with Served(FakeEngine(_compiling(grammars)), config) as stub:
        responses = await _generate(stub, prompt="x", constraint=pb.OutputConstraint(regex="ok"))
    assert "".join(r.text for r in responses) == "ok"
    assert grammars.get(Constraint("regex", "ok")) is not None


async def test_an_unknown_megabyte_model_name_is_not_found_with_a_short_message(config) -> None:
    async with Served(FakeEngine(), config) as stub:
        error = await _refused(stub, model="m" * 1_000_000, prompt="x")
        with pytest.raises(grpc.aio.AioRpcError) as counted:
            await stub.CountTokens(pb.CountTokensRequest(model="m" * 1_000_000, prompt="x"), timeout=10)
    for details in (error.details(), counted.value.details()):
        assert details.startswith("model 'mmmm")
        assert "(1000000 characters) is not served; ListModels shows: fake-model" in details
        assert len(details) < 200
