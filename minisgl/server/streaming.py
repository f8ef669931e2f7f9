"""Server-sent events for a submitted job, shared by the OpenAI and native endpoints.

A stream sends the chunks its handler formats, then `data: [DONE]`. An error raised after the stream began
(a timeout, an engine error) becomes one error event before `[DONE]`; a client that went away ends it
quietly. However it ends, the job is released, so the scheduler frees its requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from minisgl.message import StrOutput
from minisgl.server.engine_client import ClientGone, EngineClient, Job
from minisgl.server.errors import APIError


async def chain(first: StrOutput, rest: AsyncIterator[StrOutput]) -> AsyncIterator[StrOutput]:
    """The job's outputs: the first (awaited before answering, so early errors get a status) then the rest."""
    yield first
    async for o in rest:
        yield o


def sse(client: EngineClient, job: Job, chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield c
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield e.sse()
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:  # also runs when Starlette cancels us because the client went away
            client.release(job)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
