"""Entry point of a scorer worker process: `alpipe worker scorer` calls main()."""

from __future__ import annotations

import logging

import torch

from alpipe import keys
from alpipe.config import Settings
from alpipe.pipeline import run_worker

from . import jobs

log = logging.getLogger(__name__)


def main(settings: Settings, *, burst: bool = False, name: str | None = None) -> None:
    """Serve the score queue until SIGTERM/SIGINT (the current job finishes first); with burst, until empty."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    ctx = jobs.configure(settings)
    log.info("scorer: store %s, device %s, %d torch threads", ctx.store.describe(), settings.device,
             torch.get_num_threads())
    run_worker("scorer", keys.QUEUE_SCORE, ctx.redis, burst=burst, name=name, nice=settings.worker_nice)
