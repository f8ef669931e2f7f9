"""The API server process: FastAPI app (OpenAI routes, health, metrics, status, tokenize, the chat page)
served by uvicorn.

The app starts accepting connections only once the scheduler's ModelInfo has arrived (see EngineClient.
start), so a client never reaches a server whose model is still loading.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from minisgl.message import DetokenizeReq, IpcPaths, TokenizeReq
from minisgl.server import protocol as P
from minisgl.server.args import ServerArgs
from minisgl.server.chat_messages import flatten_message
from minisgl.server.engine_client import EngineClient
from minisgl.server.errors import APIError, error_body, install_error_handlers
from minisgl.server.metrics import Metrics
from minisgl.server.native_api import NativeServing
from minisgl.server.openai_api import OpenAIServing
from minisgl.server.web_ui import install_web_ui, is_open_path

logger = logging.getLogger("minisgl.api")

OPEN_PATHS = ("/health",)  # reachable without the API key (load balancers, launch scripts)


class APIKeyMiddleware:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which interferes with streaming and disconnect
    detection): a request without `Authorization: Bearer <key>` gets 401 before any parsing."""

    def __init__(self, app: Any, api_key: str, web_ui: bool = False):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.web_ui = web_ui

    def is_open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.web_ui and is_open_path(path))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.is_open(scope["path"]):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):
                body = error_body(
                    401, "invalid or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key"
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(args: ServerArgs, model_name: str, paths: IpcPaths) -> FastAPI:
    metrics = Metrics(model_name, args.dp_rank)
    client = EngineClient(paths, metrics, args.request_timeout)
    created = P.now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        yield
        client.close()

    app = FastAPI(title="minisgl", lifespan=lifespan)
    app.state.client = client
    install_error_handlers(app)
    serving = OpenAIServing(client, model_name, args.tool_call_parser)
    app.include_router(serving.router)
    app.include_router(NativeServing(client, serving, args).router)  # SGLang's /generate, /flush_cache, ...
    if args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key, web_ui=not args.disable_web_ui)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> P.ModelList:
        info = client.info
        return P.ModelList(
            data=[P.ModelCard(id=model_name, created=created, root=info.model_path, max_model_len=info.max_model_len)]
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/status")
    async def status() -> dict:
        """The scheduler's latest load, as JSON (the chat page's status line polls it)."""
        s = metrics.stats
        return {
            "model": model_name,
            "max_model_len": client.info.max_model_len,
            "num_running_reqs": s.num_running_reqs,
            "num_queue_reqs": s.num_queue_reqs,
            "token_usage": s.token_usage,
            "cache_hit_rate": s.cache_hit_rate,
        }

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest) -> dict:
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        messages = [flatten_message(m, i) for i, m in enumerate(req.messages)] if req.messages is not None else None
        r = await client.call(
            TokenizeReq(
                client.new_rid(),
                req.prompt,
                messages,
                req.add_special_tokens,
                req.chat_template_kwargs,
                req.add_generation_prompt,
                req.continue_final_message,
            )
        )
        return {"tokens": r.tokens, "count": len(r.tokens), "max_model_len": r.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest) -> dict:
        serving.check_model(req.model)
        serving.check_ids(req.tokens, "tokens")
        r = await client.call(DetokenizeReq(client.new_rid(), req.tokens))
        return {"text": r.text}

    if not args.disable_web_ui:
        install_web_ui(app)
    return app


def api_main(ready: Any, args: ServerArgs, model_name: str, paths: IpcPaths) -> None:
    """Process entry point: serve HTTP until killed; report ready once accepting connections."""
    app = create_app(args, model_name, paths)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        log_config=None,
    )
    server = _Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            ready.send("api")
        await task

    asyncio.run(serve())


class _Server(uvicorn.Server):
    """The launcher owns shutdown: it sends SIGTERM (default action: exit) and ignores-SIGINT is inherited,
    so uvicorn must not install handlers that would turn either into a slow graceful drain."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self):  # uvicorn >= 0.29
        from contextlib import nullcontext

        return nullcontext()
