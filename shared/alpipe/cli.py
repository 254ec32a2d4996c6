"""The `alpipe` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal, get_args, get_origin

from .config import get_settings
from .errors import UserError
from .strategies import COLD_STARTS
from .train_config import TrainConfig, TrainOptions, check_train_options

log = logging.getLogger("alpipe")

# Entry points in this group are functions that add subcommands to `alpipe` (pyproject.toml: the services').
COMMANDS_GROUP = "alpipe.commands"


# The TrainOptions fields `alpipe simulate` has a flag for (--max-epochs for max_epochs); type, default and help
# come from the model, so the CLI, the API and the trainer cannot drift apart.
TRAINING_FLAGS = ("stop", "patience", "max_epochs", "holdout", "lr", "momentum", "weight_decay", "batch_size")
# On-by-default fields get a switch that turns them off: field -> (switch, as in --no-augment, its help).
TRAINING_SWITCHES = {"warm_start": ("reset", "train from scratch each round instead of warm-starting"),
                     "augment": ("no_augment", "no random shifts while training")}


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    for name in TRAINING_FLAGS:
        field = TrainOptions.model_fields[name]
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        kind = field.annotation if field.annotation in (int, float) else None
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, choices=choices, default=field.default,
                       help=field.description)
    for switch, help_text in TRAINING_SWITCHES.values():
        g.add_argument(f"--{switch.replace('_', '-')}", action="store_true", help=help_text)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    flags = {name: getattr(args, name) for name in TRAINING_FLAGS}
    switches = {name: not getattr(args, switch) for name, (switch, _) in TRAINING_SWITCHES.items()}
    check_train_options(flags, spell=lambda field: f"--{field.replace('_', '-')}")  # errors name the flag
    return TrainConfig(**flags, **switches)


def cmd_simulate(args: argparse.Namespace) -> int:
    import time

    import torch

    from .experiment import write_results
    from .loop import ExperimentConfig, run_experiment
    from .results import savings_table
    from .storage import open_store

    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    config = ExperimentConfig(
        dataset=args.dataset, strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        seeds=args.seeds, initial=args.initial, query_size=args.query_size, budget=args.budget,
        model=args.model, pretrained=not args.no_pretrained, weights=args.weights, finetune=args.finetune,
        input_size=args.input_size, pool_size=args.pool_size, cold_start=args.cold_start, mc_samples=args.mc_samples,
        test_fraction=args.test_fraction, split_seed=args.split_seed, train=_train_config(args),
        device=args.device or settings.device)
    config.validate()
    out = Path(args.out)
    name = out.name or "experiment"
    store = open_store(settings)
    cache_dir = settings.data_dir / "datasets"
    started = time.perf_counter()
    if args.api or args.stack:
        from .remote import simulate_via_api
        from .stack import LocalStack

        if args.api:
            points = simulate_via_api(config, api_url=args.api, store=store, cache_dir=cache_dir, experiment=name,
                                      token=settings.token or settings.admin_token)
        else:
            with LocalStack(settings, scorers=args.scorers, trainers=args.trainers, echo=args.verbose) as stack:
                log.info("local stack up at %s (logs in %s)", stack.api_url, stack.log_dir)
                points = simulate_via_api(config, api_url=stack.api_url, store=store, cache_dir=cache_dir,
                                          experiment=name, token=settings.admin_token)
    else:
        points = run_experiment(config, store=store, cache_dir=cache_dir, experiment=name)
    summary = write_results(points, config=config.as_dict(), out=out, store=store, experiment=name,
                            title=f"{config.dataset}, {config.model}: test accuracy vs labels")
    print(savings_table(summary))
    print(f"done in {time.perf_counter() - started:.0f}s; wrote {out / 'curves.csv'}, "
          f"{out / 'summary.json'} and the plot {out / 'curves.png'}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    from .stack import LocalStack

    def terminate(signum, frame):
        raise KeyboardInterrupt

    if args.api_workers is not None and args.api_workers < 1:
        raise UserError(f"--api-workers must be at least 1, not {args.api_workers}")
    signal.signal(signal.SIGTERM, terminate)
    stack = LocalStack(get_settings(), scorers=args.scorers, trainers=args.trainers, port=args.port,
                       api_workers=args.api_workers)
    try:
        stack.start()
        print(f"alpipe is up: API {stack.api_url}  docs {stack.api_url}/docs  redis {stack.redis_url}\n"
              "Ctrl-C stops everything.", flush=True)
        stack.wait()
    except KeyboardInterrupt:
        log.info("stopping the stack")
    finally:
        stack.stop()
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    import json

    import redis

    from .recovery import describe_recovery, recover_all
    from .storage import open_store

    settings = get_settings()
    if not settings.redis_url:
        raise UserError("set REDIS_URL to the Redis to rebuild (e.g. redis://127.0.0.1:6379/0)")
    report = recover_all(redis.Redis.from_url(settings.redis_url), open_store(settings), settings=settings,
                         wait_s=args.wait)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, rep in report["projects"].items():
            print(f"{name}: {describe_recovery(rep)}")
        if not report["projects"]:
            print("object storage has no projects: nothing to rebuild")
    failed = [name for name, rep in report["projects"].items() if rep.get("status") == "error"]
    if failed:
        print(f"alpipe: error: {len(failed)} project(s) not recovered: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _api_url(args: argparse.Namespace) -> str:
    if args.api:
        return args.api
    settings = get_settings()
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::", "") else settings.api_host
    return f"http://{host}:{settings.api_port}"


def cmd_label(args: argparse.Namespace) -> int:
    import getpass
    import os
    import tempfile

    from .api_client import ApiClient
    from .label_cli import ImageSaver, LabelSession, system_opener

    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    stdin_is_tty = sys.stdin.isatty()

    def read(prompt: str) -> str:
        line = input(prompt)
        if not stdin_is_tty:  # piped keys: echo them, so the transcript reads like a session
            print(line.strip(), flush=True)
        return line

    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "cli"
    opener = None if args.no_open else system_opener(sys.platform, os.environ)
    with ApiClient(_api_url(args), timeout_s=60.0, token=args.token or get_settings().token) as api, \
            tempfile.TemporaryDirectory(prefix="alpipe-label-") as folder:
        session = LabelSession(api=api, project=args.project, labeler=args.labeler, default_labeler=login,
                               batch=args.batch, input_fn=read,
                               out=sys.stdout, images=ImageSaver(Path(folder), opener))
        session.run()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .api_client import ApiClient
    from .label_cli import export_to_file

    with ApiClient(_api_url(args), timeout_s=600.0, token=args.token or get_settings().token) as api:
        path, size = export_to_file(api, project=args.project, fmt=args.format, out=args.out)
    print(f"wrote {path} ({size} bytes, {args.format} export of project {args.project!r})")
    return 0


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="URL",
                   help="the alpipe API (default http://ALPIPE_API_HOST:ALPIPE_API_PORT, i.e. 127.0.0.1:8000)")
    p.add_argument("--project", required=True, help="project name")
    p.add_argument("--token", help="API token, sent as a Bearer token (default ALPIPE_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alpipe", description="Distributed active learning for images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run an active-learning experiment with a simulated oracle",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sim.add_argument("--dataset", default="mnist5k", help="mnist5k, digits, photos, or a folder <class>/<image>")
    sim.add_argument("--strategies", default="auto,margin,random",
                     help="comma-separated: auto, margin, least_confidence, entropy, bald, power_margin, random")
    sim.add_argument("--seeds", type=int, default=3, help="runs per strategy (seeds 0..N-1)")
    sim.add_argument("--initial", type=int, default=20, help="size of the initial labeled set")
    sim.add_argument("--cold-start", metavar="|".join(COLD_STARTS),
                     help="how the initial set is chosen (default: each strategy's own: random for random, "
                          "typiclust for the others)")
    sim.add_argument("--mc-samples", type=int, default=20, help="MC-dropout passes for bald")
    sim.add_argument("--query-size", type=int, default=10, help="labels asked per round")
    sim.add_argument("--budget", type=int, default=300, help="total labels per run")
    sim.add_argument("--pool-size", type=int, default=0,
                     help="score a random subset of this many unlabeled images per round (0 = all)")
    sim.add_argument("--model", default="auto",
                     help="auto (small_cnn for small grayscale images, else efficientnet_lite0 in embedding mode), "
                          "small_cnn, resnet18 or efficientnet_lite0")
    sim.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=None,
                     help="--finetune trains the whole network (GPU hosts); --no-finetune asks for embedding mode "
                          "(frozen backbone, a head on embeddings computed once); default: embedding mode for "
                          "pretrained backbones")
    sim.add_argument("--input-size", type=int, help="pixels images are resized to for the model (default: the "
                                                    "model's, 224 for the backbones, 28 for small_cnn)")
    sim.add_argument("--no-pretrained", action="store_true", help="random init instead of ImageNet weights")
    sim.add_argument("--weights", help="ImageNet weights file for the backbone (resnet18)")
    sim.add_argument("--test-fraction", type=float, default=0.2, help="stratified test split")
    sim.add_argument("--split-seed", type=int, default=0, help="seed of the test split")
    sim.add_argument("--device", help="auto, cpu, cuda, cuda:N (default from ALPIPE_DEVICE)")
    sim.add_argument("--out", default="runs/experiment", help="folder for curves.csv, summary.json, curves.png")
    where = sim.add_argument_group("where the loop runs (default: in this process)")
    where.add_argument("--api", metavar="URL", help="drive a running alpipe API (e.g. http://127.0.0.1:8000)")
    where.add_argument("--stack", action="store_true",
                       help="start the local stack (redis, API, trainer, scorers), run through it, stop it")
    where.add_argument("--scorers", type=int, default=2, help="scorer workers for --stack")
    where.add_argument("--trainers", type=int, default=1,
                       help="trainer workers for --stack (each trains one project at a time)")
    _add_training_args(sim)
    sim.set_defaults(func=cmd_simulate)

    up = sub.add_parser("up", help="run the whole stack locally: redis-server, API, trainer, scorers")
    up.add_argument("--scorers", type=int, default=2, help="scorer worker processes")
    up.add_argument("--trainers", type=int, default=1, help="trainer worker processes")
    up.add_argument("--port", type=int, help="API port (default: a free one)")
    up.add_argument("--api-workers", type=int, help="API worker processes (default ALPIPE_API_WORKERS, or one per "
                                                    "core: at least 2, at most 8)")
    up.set_defaults(func=cmd_up)

    # The services add their subcommands (api, worker) through an entry-point group: the core must not depend
    # on them, and an install without the services simply has no such commands.
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(sub)

    rec = sub.add_parser("recover", help="rebuild Redis state from object storage (after a Redis wipe); exits 1 "
                                         "when a project could not be rebuilt")
    rec.add_argument("--wait", type=float, default=120.0, metavar="S",
                     help="how long to wait for a rebuild another process (the API) has started (default 120)")
    rec.add_argument("--json", action="store_true", help="print the report as JSON")
    rec.set_defaults(func=cmd_recover)

    label = sub.add_parser("label", help="label a project's queries from the terminal (keys as on the web page)")
    _add_client_args(label)
    label.add_argument("--labeler", help="your name in the label log (default: your token's labeler, or the "
                       "login name when the API runs without tokens)")
    label.add_argument("--batch", type=int, default=10, help="samples fetched (and leased) per query")
    label.add_argument("--no-open", action="store_true", help="never open an image viewer; print the file path")
    label.set_defaults(func=cmd_label)

    export = sub.add_parser("export", help="download a project's labels: csv, json, or an ImageFolder zip")
    _add_client_args(export)
    export.add_argument("--format", choices=("csv", "json", "imagefolder"), default="csv")
    export.add_argument("--out", type=Path, help="file to write (default <project>-labels.csv|json|zip)")
    export.set_defaults(func=cmd_export)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as e:
        print(f"alpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
