"""Tool-call formats without a model: rendering, parsing, and streaming in arbitrary chunkings."""

from __future__ import annotations

import json
import random

import pytest

from minisgl.tokenizer.tool_calls import get_format, inject_tools

CALLS = [
    ("get_weather", {"city": "Paris", "unit": "celsius"}),
    ("get_time", {"zone": "Asia/Tokyo"}),
    ("noop", {}),
    ("nested", {"a": {"b": [1, 2, {"c": "}"}]}, "s": "</tool_call"}),
]


@pytest.mark.parametrize("parser", ["hermes", "llama3-json"])
def test_parse_gives_back_rendered_calls(parser):
    fmt = get_format(parser)
    sep = "\n" if parser == "hermes" else "; "
    text = sep.join(fmt.render_call(n, json.dumps(a)) for n, a in CALLS)
    content, calls = fmt.parse(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == CALLS
    assert len({c.id for c in calls}) == len(calls)


def test_hermes_keeps_content_and_rejects_malformed_calls():
    fmt = get_format("hermes")
    content, calls = fmt.parse("Let me check. " + fmt.render_call("f", {"x": 1}))
    assert content == "Let me check." and calls[0].name == "f"
    text = "<tool_call>\n{not json}\n</tool_call>"
    assert fmt.parse(text) == (text, [])
    assert fmt.parse("plain answer") == ("plain answer", [])


@pytest.mark.parametrize("parser", ["hermes", "llama3-json"])
@pytest.mark.parametrize("seed", range(5))
def test_stream_assembles_the_same_calls_in_any_chunking(parser, seed):
    fmt = get_format(parser)
    sep = "\n" if parser == "hermes" else "; "
    prefix = "Sure. " if parser == "hermes" else ""
    text = prefix + sep.join(fmt.render_call(n, json.dumps(a)) for n, a in CALLS)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 25))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    stream = fmt.stream()
    content, calls = "", {}
    for k, piece in enumerate(pieces):
        d = stream.feed(piece, final=k == len(pieces) - 1)
        content += d.content
        for index, cid, name, args in d.calls:
            call = calls.setdefault(index, {"id": None, "name": None, "args": ""})
            if cid is not None:
                assert call["id"] is None and call["args"] == "", "id and name come before any argument"
                call["id"], call["name"] = cid, name
            call["args"] += args
    assert content.strip() == prefix.strip()
    assert [(calls[i]["name"], json.loads(calls[i]["args"])) for i in sorted(calls)] == CALLS


def test_hermes_call_cut_short_stays_content_in_parse_and_stream():
    """max_tokens ends the output inside a second call: the first is a call, the cut one's text is content,
    whether the response streams or not."""
    fmt = get_format("hermes")
    cut = '<tool_call>\n{"name": "g", "argu'
    text = fmt.render_call("f", {"x": 1}) + "\n" + cut
    content, calls = fmt.parse(text)
    assert content == cut and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]
    stream, streamed, names = fmt.stream(), "", []
    for k in range(0, len(text), 7):
        d = stream.feed(text[k : k + 7], final=k + 7 >= len(text))
        streamed += d.content
        names += [name for _, cid, name, _ in d.calls if cid is not None]
    assert (streamed.strip(), names) == (cut, ["f"])


def test_inject_tools_for_templates_without_a_tool_section():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "1", "content": "42"},
    ]
    out = inject_tools(msgs, tools, get_format("hermes"))
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "f"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_keeps_one_call(parallel):
    from minisgl.server import protocol as P
    from minisgl.server import structured

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = P.ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}], tools=[tool], parallel_tool_calls=parallel
    )
    plan = structured.tool_plan(req, "hermes")
    fmt = get_format("hermes")
    _, calls = structured.tool_calls(plan, fmt.render_call("f", {"a": 1}) + "\n" + fmt.render_call("f", {"a": 2}))
    assert [json.loads(c.function.arguments)["a"] for c in calls] == ([1, 2] if parallel else [1])
    assert plan.grammar is None and plan.choice == "auto"
    req.tool_choice = "required"
    assert json.loads(structured.tool_plan(req, "hermes").grammar)["format"]["stop_after_first"] is not parallel
