"""Tool-call formats: how tools are shown to a model, how its calls look, and how to find them in its output.

A format (chosen by `--tool-call-parser`, names as in SGLang and vLLM) knows four things:
- `system_prompt(tools)`: the tool list and calling convention, for chat templates without a tool section;
- `render_call(name, arguments)`: an earlier assistant call, as the model would have written it;
- `grammar(tools, parallel)`: an xgrammar structural tag that admits only well-formed calls to these tools
  (used for tool_choice "required" or a named function);
- `parse(text)` / `stream()`: the calls (name, arguments as a JSON string) and the remaining content.

Invariant: `parse(render_call(n, a))` gives back the call (n, a) for every name and JSON-object argument string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _schema(tool: dict) -> dict:
    params = tool.get("function", {}).get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def _name(tool: dict) -> str:
    return tool["function"]["name"]


def _compact(args: object) -> str:
    """Arguments as a compact JSON string (clients send a string or, from some SDKs, an object)."""
    if isinstance(args, str):
        try:
            return json.dumps(json.loads(args), ensure_ascii=False)
        except ValueError:
            return args
    return json.dumps(args if args is not None else {}, ensure_ascii=False)


class ToolCallFormat:
    name = ""

    def system_prompt(self, tools: list[dict]) -> str:
        raise NotImplementedError

    def render_call(self, name: str, arguments: object) -> str:
        raise NotImplementedError

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        raise NotImplementedError

    def stream(self) -> ToolStream:
        return BufferedToolStream(self)


class HermesFormat(ToolCallFormat):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (NousResearch Hermes,
    Qwen 2.5/3)."""

    name = "hermes"
    begin, end = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def system_prompt(self, tools: list[dict]) -> str:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listing}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_call(self, name: str, arguments: object) -> str:
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {_compact(arguments)}}}\n</tool_call>'

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        return _calls_tag(tools, parallel, '<tool_call>\n{{"name": {name}, "arguments": ', "}\n</tool_call>", "\n")

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """Each well-formed block is a call; any other (not JSON, or cut short by max_tokens) stays in the
        content as written, as the stream leaves it, so both give a request the same calls."""
        calls, content, last = [], [], 0
        for m in self._BLOCK.finditer(text):
            call = _call_from_json(m.group(1), "arguments")
            if call is None:
                continue
            calls.append(call)
            content.append(text[last : m.start()])
            last = m.end()
        if not calls:
            return text, []
        content = "".join(content + [text[last:]]).strip()
        return content or None, calls

    def stream(self) -> ToolStream:
        return HermesStream(self)


class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}`, several separated by `; `, optionally
    after `<|python_tag|>`; the whole message is the call."""

    name = "llama3-json"
    _TAG = "<|python_tag|>"

    def system_prompt(self, tools: list[dict]) -> str:
        listing = "\n\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            f"Do not use variables.\n\n{listing}"
        )

    def render_call(self, name: str, arguments: object) -> str:
        return f'{{"name": {json.dumps(name)}, "parameters": {_compact(arguments)}}}'

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        return _calls_tag(tools, parallel, '{{"name": {name}, "parameters": ', "}", "; ")

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        if body.startswith(self._TAG):
            body = body[len(self._TAG) :].lstrip()
        if not body.startswith("{"):
            return text, []
        dec, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, end = dec.raw_decode(body, i)
            except ValueError:
                return text, []
            call = _call_from_obj(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            i = end
            while i < len(body) and body[i] in " \n\t;":
                i += 1
        return None, calls


def _calls_tag(tools: list[dict], parallel: bool, begin: str, end: str, separator: str) -> str:
    """xgrammar's structural tag for one or more calls (one only unless `parallel`): each call is `begin` (with
    the function's JSON-quoted name for {name}), arguments valid for that function's schema, then `end`."""
    tags = [
        {
            "type": "tag",
            "begin": begin.format(name=json.dumps(_name(t))),
            "content": {"type": "json_schema", "json_schema": _schema(t), "max_whitespace_cnt": 1},
            "end": end,
        }
        for t in tools
    ]
    fmt = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": separator,
        "at_least_one": True,
        "stop_after_first": not parallel,
    }
    return json.dumps({"type": "structural_tag", "format": fmt})


def _call_from_json(text: str, key: str) -> ParsedCall | None:
    try:
        return _call_from_obj(json.loads(text), key)
    except ValueError:
        return None


def _call_from_obj(obj: object, key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


# ---- streaming ------------------------------------------------------------------------------------------
@dataclass
class ToolDelta:
    """What one text delta adds: plain content, and tool-call pieces as (call index, id or None, name or None,
    argument fragment)."""

    content: str = ""
    calls: list[tuple[int, str | None, str | None, str]] = field(default_factory=list)


class ToolStream:
    def feed(self, text: str, final: bool = False) -> ToolDelta:
        raise NotImplementedError


class BufferedToolStream(ToolStream):
    """For formats whose calls are the whole message: holds everything back once the output looks like a call
    and parses it at the end (name first, then the arguments)."""

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self.buf = ""
        self.mode: str | None = None  # None: undecided, "text" or "call"

    def feed(self, text: str, final: bool = False) -> ToolDelta:
        self.buf += text
        if self.mode is None:
            head = self.buf.lstrip()
            if head and not (head[0] in "{<" or "<|python_tag|>".startswith(head[:14])):
                self.mode = "text"
            elif head and (head[0] == "{" or head.startswith("<|python_tag|>")):
                self.mode = "call"
        if self.mode == "text" or (self.mode is None and final):
            out, self.buf, self.mode = self.buf, "", "text"
            return ToolDelta(out)
        if not final:
            return ToolDelta()
        content, calls = self.fmt.parse(self.buf)
        self.buf = ""
        out = ToolDelta(content or "")
        for i, c in enumerate(calls):
            out.calls += [(i, c.id, c.name, ""), (i, None, None, c.arguments)]
        return out


class HermesStream(ToolStream):
    """Content streams as it comes; a `<tool_call>` block announces its call's name as soon as it is written
    and then streams the arguments: every fragment sent is final (a prefix of the arguments' text)."""

    _HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def __init__(self, fmt: HermesFormat):
        self.fmt = fmt
        self.buf = ""
        self.in_call = False
        self.index = -1
        self.args_start = -1  # where the arguments start in buf, once the name was sent
        self.sent = 0  # argument characters sent

    def feed(self, text: str, final: bool = False) -> ToolDelta:
        self.buf += text
        out = ToolDelta()
        while True:
            if not self.in_call:
                at = self.buf.find(self.fmt.begin)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self.buf, self.fmt.begin)
                    out.content += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep :]
                    return _strip_between_calls(out, self.index)
                out.content += self.buf[:at]
                self.buf = self.buf[at + len(self.fmt.begin) :]
                self.in_call, self.args_start, self.sent = True, -1, 0
                self.index += 1
            end = self.buf.find(self.fmt.end)
            body = self.buf if end < 0 else self.buf[:end]
            if self.args_start < 0:
                m = self._HEAD.match(body)
                if m is None:
                    if end < 0 and not final:
                        return _strip_between_calls(out, self.index)
                    out.content += self.fmt.begin + self.buf  # not a call after all
                    self.buf, self.in_call = "", False
                    return _strip_between_calls(out, self.index)
                name = json.loads(f'"{m.group(1)}"')
                out.calls.append((self.index, ParsedCall(name, "").id, name, ""))
                self.args_start = m.end()
            args = body[self.args_start :]
            if self.sent == 0 and args[:1].isspace():  # whitespace before the arguments is not part of them
                self.args_start += len(args) - len(args.lstrip())
                args = args.lstrip()
            if end < 0 and not final:
                args = args[: len(args) - _partial_suffix(args, self.fmt.end)].rstrip()
                if args.endswith("}"):  # may be the call's own closing brace
                    args = args[:-1]
            else:
                args = args.rstrip()
                args = args[:-1].rstrip() if args.endswith("}") else args
            if len(args) > self.sent:
                out.calls.append((self.index, None, None, args[self.sent :]))
                self.sent = len(args)
            if end < 0:
                return _strip_between_calls(out, self.index)
            self.buf = self.buf[end + len(self.fmt.end) :]
            self.in_call = False


def _strip_between_calls(out: ToolDelta, index: int) -> ToolDelta:
    if index >= 0 and not out.content.strip():  # the newline between two calls is not content
        out.content = ""
    return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (text held back)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat())}


def get_format(name: str) -> ToolCallFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(FORMATS)}") from None


def inject_tools(messages: list[dict], tools: list[dict] | None, fmt: ToolCallFormat) -> list[dict]:
    """Messages for a chat template with no tool support: the tool list joins the system prompt, earlier
    assistant calls become text in the format, and tool results become user turns in `<tool_response>`."""
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        if m.get("role") == "assistant" and calls:
            text = "\n".join(fmt.render_call(c["function"]["name"], c["function"].get("arguments")) for c in calls)
            m["content"] = (m.get("content") or "") + ("\n" if m.get("content") else "") + text
        elif m.get("role") == "tool":
            m.pop("tool_call_id", None)
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if tools:
        prompt = fmt.system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
