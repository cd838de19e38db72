"""Plan-and-execute: a plan first, then one model call per plan step, a new plan when a step fails, then the answer."""

from __future__ import annotations

from typing import Any

from services.planner.policies.base import (
    Answer,
    CallTools,
    Context,
    Decision,
    ModelRequest,
    NewPlan,
    Note,
    Policy,
    parse_json_object,
    parse_tool_calls,
)
from services.planner.policies.react import tool_calls_schema, tool_catalogue, transcript_messages
from services.planner.prompt import UNTRUSTED_DATA, observation_text
from services.planner.state import RunSnapshot, StepRecord

MAX_PLAN_STEP_CHARS = 200
MAX_RESULT_CHARS = 1000

PLAN_PROMPT = """{instructions}
You work in two phases. First write a plan: a short list of steps that together answer the task. Then carry the plan
out one step at a time: for each step call the tools it needs (up to {limit} at once; they run at the same time) or
state its result. Reply with one JSON object and nothing else.
{untrusted}

Tools (name: description; arguments as JSON Schema):
{tools}"""


class PlanExecutePolicy(Policy):
    """The model writes a plan (at most ``max_plan_steps`` steps, journaled as a plan event); each plan step is one
    model call that calls tools or states the step's result; a step whose tool call fails triggers a new plan (at most
    ``max_replans`` times; then the failure is an observation and the plan goes on); when every step is done the model
    gives the final answer.

    Memory: ``plan``, ``revision``, ``index`` (the step being carried out), ``replans``, ``replan`` (a new plan is due).
    """

    name = "plan_execute"

    def _phase(self, state: RunSnapshot) -> str:
        memory = state.memory
        if "plan" not in memory or memory.get("replan"):
            return "plan"
        return "execute" if memory["index"] < len(memory["plan"]) else "answer"

    def request(self, state: RunSnapshot, context: Context) -> ModelRequest:
        limit = self.options.max_parallel_tool_calls
        system = PLAN_PROMPT.format(
            instructions=context.instructions.strip(), limit=limit, untrusted=UNTRUSTED_DATA,
            tools=tool_catalogue(context),
        )  # fmt: skip
        phase = self._phase(state)
        memory = state.memory
        schema: dict[str, Any]
        if phase == "plan":
            again = " The last step failed; write a new plan for what is left." if memory.get("replan") else ""
            prompt = (
                f'Write the plan as {{"plan": ["<step>", ...]}} (at most {self.options.max_plan_steps} steps).{again}'
            )
            schema = _object(
                plan={
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_PLAN_STEP_CHARS},
                    "minItems": 1,
                    "maxItems": self.options.max_plan_steps,
                }
            )
        elif phase == "execute":
            index, plan = memory["index"], memory["plan"]
            prompt = (
                f"Plan step {index + 1} of {len(plan)}: {plan[index]}\n"
                'Call the tools it needs as {"tool_calls": [...]}, or give its result as {"step_result": "..."}.'
            )
            options = [_object(step_result={"type": "string", "minLength": 1, "maxLength": MAX_RESULT_CHARS})]
            if context.tools:
                options.insert(0, _object(tool_calls=tool_calls_schema(context, limit)))
            schema = {"anyOf": options}
        else:
            prompt = f'Every step of the plan is done. Answer the task as {{"final_answer": "..."}}: {state.task}'
            schema = _object(final_answer={"type": "string", "minLength": 1, "maxLength": MAX_RESULT_CHARS})
        messages = [
            {"role": "system", "content": system},
            *transcript_messages(state),
            {"role": "user", "content": prompt},
        ]
        return ModelRequest(messages, schema)

    def on_output(self, state: RunSnapshot, context: Context, text: str) -> Decision:
        memory = state.memory
        try:
            action = parse_json_object(text)
            phase = self._phase(state)
            if phase == "plan":
                steps = action.get("plan")
                if not (isinstance(steps, list) and steps and all(isinstance(s, str) and s.strip() for s in steps)):
                    raise ValueError('the plan must be {"plan": ["<step>", ...]} with at least one step')
                steps = [s.strip() for s in steps[: self.options.max_plan_steps]]
                memory.update(plan=steps, index=0, replan=False, revision=memory.get("revision", 0) + 1)
                return NewPlan(steps, memory["revision"])
            if phase == "execute":
                if "tool_calls" in action:
                    return CallTools(parse_tool_calls(action["tool_calls"], self.options.max_parallel_tool_calls))
                if isinstance(action.get("step_result"), str):
                    memory["index"] += 1
                    return Note(f"Result of plan step {memory['index']}: {action['step_result'].strip()}")
                raise ValueError('give "tool_calls" or "step_result" for this plan step')
            if isinstance(action.get("final_answer"), str) and action["final_answer"].strip():
                return Answer(action["final_answer"].strip())
            raise ValueError('give the answer as {"final_answer": "..."}')
        except ValueError as e:
            return Note(observation_text({"error": str(e)}))

    def on_results(self, state: RunSnapshot, context: Context, step: StepRecord) -> None:
        memory = state.memory
        failed = any(call.error is not None for call in step.calls)
        if failed and memory.get("replans", 0) < self.options.max_replans:
            memory["replans"] = memory.get("replans", 0) + 1
            memory["replan"] = True
        else:
            memory["index"] += 1


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
