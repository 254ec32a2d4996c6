"""The services' subcommands of `alpipe`: `api` and `worker`.

pyproject.toml registers add_commands in the "alpipe.commands" entry-point group, which alpipe.cli loads: the
core's command line never imports the services. The services themselves are imported only when a command runs,
so building the parser stays cheap (and torch-free in the API image).
"""

from __future__ import annotations

import argparse

from alpipe.config import api_worker_count, get_settings
from alpipe.errors import UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds `alpipe api` and `alpipe worker` to the subcommands `sub`."""
    api = sub.add_parser("api", help="run the labeling API (uvicorn)")
    api.add_argument("--host", help="bind address (default ALPIPE_API_HOST or 127.0.0.1)")
    api.add_argument("--port", type=int, help="port (default ALPIPE_API_PORT or 8000)")
    api.add_argument("--workers", type=int, help="worker processes sharing the port (default ALPIPE_API_WORKERS, "
                                                 "or one per core: at least 2, at most 8)")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run one rq worker: trainer (queue train) or scorer (queue score)")
    worker.add_argument("kind", choices=("trainer", "scorer"))
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--name", help="worker name (default: kind-host-pid)")
    worker.set_defaults(func=cmd_worker)


def cmd_api(args: argparse.Namespace) -> int:
    """Serves the labeling API until it is stopped."""
    from services.api.main import serve

    settings = get_settings()
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    workers = args.workers or api_worker_count(settings)
    serve(host=args.host or settings.api_host, port=args.port or settings.api_port, workers=workers,
          access_log=settings.api_access_log)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Runs one trainer or scorer rq worker (until stopped, or until its queue is empty with --burst)."""
    if args.kind == "trainer":
        from services.trainer.worker import main as run_worker
    else:
        from services.scorer.worker import main as run_worker
    run_worker(get_settings(), burst=args.burst, name=args.name)
    return 0
