"""`python -m minisgl`: serve a model over the OpenAI API, or chat with it in the terminal (--shell)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from minisgl.server.args import parse_args

    args = parse_args(argv)
    if args.shell:
        from minisgl.server.shell import run_shell

        return run_shell(args)
    from minisgl.server.launch import launch_server

    return launch_server(args)


if __name__ == "__main__":
    sys.exit(main())
