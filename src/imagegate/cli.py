"""`imagegate serve` and `imagegate models`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegate", description="An OpenAI-compatible image gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", help="YAML config file (default: the packaged configs/imagegate.yaml)")
    serve.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from config: 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default from config: 1)")
    models = sub.add_parser("models", help="list the catalog")
    models.add_argument("--config", help="YAML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config:
        os.environ["IMAGEGATE_CONFIG"] = os.path.abspath(args.config)  # worker processes read it too

    from imagegate.settings import load_settings

    settings = load_settings()
    if args.command == "models":
        from imagegate.core.catalog import Catalog

        for entry in Catalog.from_config(settings.models):
            routes = ", ".join(f"{r.provider}:{r.model}" for r in entry.routes)
            print(f"{entry.id}\t{routes}")
        return 0

    from imagegate.server import serve

    return serve(
        settings,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.workers,
    )


if __name__ == "__main__":
    sys.exit(main())
