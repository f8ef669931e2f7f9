"""`python -m minisgl`: serve a model over the OpenAI API, or chat with it in the terminal (--shell)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # minisgl/__init__.py has already shortened OpenMP's spin-waits, before torch loads; spawned engines inherit it.
    from minisgl.server.args import parse_args

    args = parse_args(argv)
    if args.shell:
        from minisgl.server.shell import run_shell

        return run_shell(args)
    if args.node_rank > 0:
        return _run_worker_node(args)
    from minisgl.server.launch import launch_server

    return launch_server(args)


def _run_worker_node(args) -> int:
    """Nodes 1..N-1 of a multi-node group serve no HTTP: they run their tensor-parallel ranks, which take
    every command from rank 0 on node 0 (--dist-init-addr), until node 0 shuts them down."""
    from minisgl.engine.config import EngineConfig
    from minisgl.models.hub import resolve_model_path
    from minisgl.scheduler.replicated import run_worker_node
    from minisgl.server.launch import setup_logging

    setup_logging(args.log_level)
    config = EngineConfig(**{**args.engine_kwargs(), "model": resolve_model_path(args.model)})
    return run_worker_node(config)


if __name__ == "__main__":
    sys.exit(main())
