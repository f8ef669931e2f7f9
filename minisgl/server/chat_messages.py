"""Chat messages as the tokenizer worker takes them: the content as one string (what chat templates expect), a
role the templates know, tool calls and tool results kept."""

from __future__ import annotations

import json
from typing import Any

from minisgl.server import protocol as P
from minisgl.server.errors import APIError, safe_text

# OpenAI's `developer` is the system prompt under its newer name; any role not here is a 400.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def flatten_message(m: P.ChatMessage, i: int) -> dict:
    """Message `i` of a request as a template message dict."""
    role = ROLES.get(m.role)
    if role is None:
        known = ", ".join(ROLES)
        raise APIError(400, f"messages[{i}]: unknown role {safe_text(m.role)!r}; expected one of {known}", "messages")
    content = m.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400, f"messages[{i}]: only text content parts are supported, got {part.type!r}", "messages"
                )
            parts.append(part.text)
        content = "".join(parts)
    msg: dict[str, Any] = {"role": role, "content": content or ""}
    if m.name:
        msg["name"] = m.name
    if m.tool_calls:
        msg["tool_calls"] = [
            {
                "id": c.id or f"call_{j}",
                "type": "function",
                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
            }
            for j, c in enumerate(m.tool_calls)
        ]
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    return msg


def _arguments(args: str | dict | None) -> str:
    return args if isinstance(args, str) else json.dumps(args or {})
