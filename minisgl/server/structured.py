"""Structured output and tool calling on the OpenAI routes: request fields -> one output constraint, model
output -> tool calls.

A constraint comes from exactly one of: SGLang's `json_schema` / `regex` / `ebnf` fields, vLLM's `guided_*`
fields or `structured_outputs` object (a choice becomes a grammar of its strings), OpenAI's `response_format`
(chat), or `tool_choice` "required" / a named function (chat; enforced with the tool-call format's structural
tag). Anything that would change what the client gets and that we cannot honour (an
unknown response_format type, two constraints, a tool_choice without tools) is refused with a 400 here; a
grammar that does not compile is refused by the scheduler's compile step, also with a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from minisgl.server import protocol as P
from minisgl.server.errors import APIError, safe_text
from minisgl.tokenizer.tool_calls import ToolCallFormat, ToolStream, get_format

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


@dataclass
class ToolPlan:
    """The tools of a chat request as the prompt and the parser see them (None: tools are off)."""

    tools: list[dict]
    fmt: ToolCallFormat
    choice: str  # auto | required | a function name
    grammar: str | None  # structural tag enforcing the calls (required / named)
    parallel: bool = True  # more than one call allowed (else later calls are dropped, as OpenAI does)

    def stream(self) -> ToolStream:
        return self.fmt.stream()


def constraint(req: P._SamplingRequest, plan: ToolPlan | None = None) -> dict[str, Any]:
    """The SamplingParams fields of the request's output constraint ({} for none)."""
    found: list[tuple[str, dict[str, Any]]] = []
    if req.json_schema is not None:
        found.append(("json_schema", {"json_schema": _schema_text(req.json_schema, "json_schema")}))
    if req.regex is not None:
        found.append(("regex", {"regex": req.regex}))
    if req.ebnf is not None:
        found.append(("ebnf", {"ebnf": req.ebnf}))
    so = getattr(req, "structured_outputs", None)  # vLLM's fields are not in the native API's sampling_params
    vllm = [
        ("guided_json", "json", getattr(req, "guided_json", None), so and so.json_),
        ("guided_regex", "regex", getattr(req, "guided_regex", None), so and so.regex),
        ("guided_choice", "choice", getattr(req, "guided_choice", None), so and so.choice),
        ("guided_grammar", "grammar", getattr(req, "guided_grammar", None), so and so.grammar),
    ]
    for legacy, key, old_style, new_style in vllm:
        for name, value in ((legacy, old_style), (f"structured_outputs.{key}", new_style)):
            if value is None:
                continue
            if key == "json":
                found.append((name, {"json_schema": _schema_text(value, name)}))
            elif key == "choice":
                found.append((name, {"ebnf": _choice_grammar(value, name)}))
            else:
                found.append((name, {"regex" if key == "regex" else "ebnf": value}))
    if so is not None and so.json_object:
        found.append(("structured_outputs.json_object", {"json_object": True}))
    rf = getattr(req, "response_format", None)
    if rf is not None:
        if rf.type not in RESPONSE_FORMATS:
            raise APIError(
                400,
                f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}; got {safe_text(rf.type)!r}",
                "response_format.type",
            )
        if rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf.type == "json_schema":
            if rf.json_schema is None:
                raise APIError(
                    400, "response_format of type json_schema needs a json_schema object", "response_format.json_schema"
                )
            schema = rf.json_schema.schema_
            if schema is False:
                raise APIError(
                    400, "response_format.json_schema.schema false admits no output", "response_format.json_schema"
                )
            if schema is None:  # no schema given: any JSON object
                found.append(("response_format", {"json_object": True}))
            else:  # true: any JSON value
                found.append(("response_format", {"json_schema": "{}" if schema is True else json.dumps(schema)}))
    if plan is not None and plan.grammar is not None:
        found.append(("tool_choice", {"structural_tag": plan.grammar}))
    if len(found) > 1:
        raise APIError(400, f"{found[0][0]} and {found[1][0]} both constrain the output; give at most one", found[1][0])
    return found[0][1] if found else {}


def _choice_grammar(choices: list[str], param: str) -> str:
    """A grammar whose only sentences are `choices` (JSON string escapes are GBNF's)."""
    if not choices:
        raise APIError(400, f"{param} needs at least one choice", param)
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def tool_plan(req: P.ChatCompletionRequest, parser: str) -> ToolPlan | None:
    choice = req.tool_choice
    if choice is not None and not req.tools:
        if choice == "none":
            return None
        raise APIError(400, "tool_choice is only allowed when tools are specified", "tool_choice")
    if not req.tools:
        return None
    for i, t in enumerate(req.tools):
        if t.type != "function":
            raise APIError(400, f"tools[{i}].type must be 'function', got {safe_text(t.type)!r}", "tools")
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools]
    names = [t.function.name for t in req.tools]
    if isinstance(choice, P.NamedToolChoice):
        if choice.type != "function":
            raise APIError(400, f"tool_choice.type must be 'function', got {safe_text(choice.type)!r}", "tool_choice")
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names the function {safe_text(choice.function.name)!r}, which is not in tools",
                "tool_choice",
            )
        name = choice.function.name
    else:
        name = choice or "auto"
        if name not in ("none", "auto", "required"):
            raise APIError(
                400,
                f"tool_choice must be none, auto, required or a named function; got {safe_text(name)!r}",
                "tool_choice",
            )
    if name == "none":
        return None
    fmt = get_format(parser)
    grammar = None
    if name == "required":
        grammar = fmt.grammar(tools, req.parallel_tool_calls)
    elif name != "auto":
        grammar = fmt.grammar([t for t in tools if t["function"]["name"] == name], False)
    return ToolPlan(tools, fmt, name, grammar, req.parallel_tool_calls)


def tool_calls(plan: ToolPlan | None, text: str) -> tuple[str | None, list[P.ToolCall]]:
    """The message's content and tool calls, from the generated text."""
    if plan is None:
        return text, []
    content, calls = plan.fmt.parse(text)
    calls = calls if plan.parallel else calls[:1]
    return content, [P.ToolCall(id=c.id, function=P.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def _schema_text(schema: str | dict, param: str) -> str:
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        json.loads(schema)
    except ValueError as e:
        raise APIError(400, f"{param} is not valid JSON: {e}", param) from None
    return schema
