"""`imagegate serve`, `imagegate worker`, `imagegate models` and `imagegate config check`.

Every command checks the settings first (`imagegate.config_check`): a setting that cannot work
stops it with one line per bad setting on stderr and exit status 2, never a traceback;
`IMAGEGATE_*` variables that name no setting are warned about (with the closest known name)."""

from __future__ import annotations

import argparse
import logging
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
    worker = sub.add_parser("worker", help="run async job workers without the HTTP server")
    worker.add_argument("--config", help="YAML config file")
    worker.add_argument("--concurrency", type=int, help="job workers in this process (default: jobs.workers)")
    models = sub.add_parser("models", help="list the catalog")
    models.add_argument("--config", help="YAML config file")
    config = sub.add_parser("config", help="inspect the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="print the effective configuration (secrets masked); exit 2 on errors")
    check.add_argument("--config", help="YAML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config:
        os.environ["IMAGEGATE_CONFIG"] = os.path.abspath(args.config)  # worker processes read it too

    from imagegate.config_check import check_config, masked_config

    check = check_config()
    for warning in check.warnings:
        print(f"imagegate: warning: {warning}", file=sys.stderr)
    for error in check.errors:
        print(f"imagegate: {error}", file=sys.stderr)
    if not check.ok or check.settings is None:
        return 2
    settings = check.settings
    if args.command == "config":
        print(masked_config(settings), end="")
        return 0
    if args.command == "models":
        from imagegate.core.catalog import Catalog

        for entry in Catalog.from_config(settings.models):
            routes = ", ".join(f"{r.provider}:{r.model}" for r in entry.routes)
            print(f"{entry.id}\t{routes}")
        return 0

    if args.command == "worker":
        from imagegate.jobs.worker import run_worker

        return run_worker(settings, concurrency=args.concurrency)

    from imagegate.multiworker import check_workers
    from imagegate.observability.logs import configure_logging
    from imagegate.observability.metrics import prepare_multiprocess_dir
    from imagegate.server import serve

    workers = settings.workers if args.workers is None else args.workers
    if workers < 1:
        print(f"imagegate: invalid setting 'workers' = '{workers}' from --workers: must be at least 1", file=sys.stderr)
        return 2
    configure_logging(settings)  # this process's own lines (the supervisor's, with workers) in the same format
    errors, warnings = check_workers(settings, workers)
    for error in errors:
        logging.getLogger("imagegate").error(error)
    for warning in warnings:
        logging.getLogger("imagegate").warning(warning)
    if errors:
        return 2
    prepare_multiprocess_dir(workers)  # before any worker imports prometheus_client
    return serve(  # uvicorn with the read timeouts and connection cap of `server:` (imagegate.server)
        settings,
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,  # --port 0: a free port
        workers=workers,
    )


if __name__ == "__main__":
    sys.exit(main())
