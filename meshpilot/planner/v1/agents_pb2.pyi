import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicySpec(_message.Message):
    __slots__ = ("name", "max_parallel_tool_calls", "max_plan_steps", "max_replans")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_PLAN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLANS_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_parallel_tool_calls: int
    max_plan_steps: int
    max_replans: int
    def __init__(self, name: _Optional[str] = ..., max_parallel_tool_calls: _Optional[int] = ..., max_plan_steps: _Optional[int] = ..., max_replans: _Optional[int] = ...) -> None: ...

class AgentSampling(_message.Message):
    __slots__ = ("temperature", "top_p", "seed", "step_max_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEP_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    step_max_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., step_max_tokens: _Optional[int] = ...) -> None: ...

class AgentBudget(_message.Message):
    __slots__ = ("max_steps", "max_tokens", "timeout")
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    max_tokens: int
    timeout: _duration_pb2.Duration
    def __init__(self, max_steps: _Optional[int] = ..., max_tokens: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AgentSpec(_message.Message):
    __slots__ = ("instructions", "model", "tools", "approval_required", "policy", "budget", "sampling", "history_turns", "examples", "builtin_examples")
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TURNS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    instructions: str
    model: str
    tools: _containers.RepeatedScalarFieldContainer[str]
    approval_required: _containers.RepeatedScalarFieldContainer[str]
    policy: PolicySpec
    budget: AgentBudget
    sampling: AgentSampling
    history_turns: int
    examples: _containers.RepeatedCompositeFieldContainer[AgentExample]
    builtin_examples: bool
    def __init__(self, instructions: _Optional[str] = ..., model: _Optional[str] = ..., tools: _Optional[_Iterable[str]] = ..., approval_required: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[PolicySpec, _Mapping]] = ..., budget: _Optional[_Union[AgentBudget, _Mapping]] = ..., sampling: _Optional[_Union[AgentSampling, _Mapping]] = ..., history_turns: _Optional[int] = ..., examples: _Optional[_Iterable[_Union[AgentExample, _Mapping]]] = ..., builtin_examples: _Optional[bool] = ...) -> None: ...

class AgentExample(_message.Message):
    __slots__ = ("task", "tool", "arguments", "observation", "answer")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    task: str
    tool: str
    arguments: _struct_pb2.Struct
    observation: _struct_pb2.Value
    answer: str
    def __init__(self, task: _Optional[str] = ..., tool: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., observation: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., answer: _Optional[str] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("name", "version", "spec", "create_time", "builtin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    spec: AgentSpec
    create_time: _timestamp_pb2.Timestamp
    builtin: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., spec: _Optional[_Union[AgentSpec, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., builtin: _Optional[bool] = ...) -> None: ...

class CreateAgentRequest(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: AgentSpec
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[AgentSpec, _Mapping]] = ...) -> None: ...

class GetAgentRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...

class UpdateAgentRequest(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: AgentSpec
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[AgentSpec, _Mapping]] = ...) -> None: ...

class DeleteAgentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
