"""How `alpipe`'s command line is put together: the core never imports the services (they add their commands
through an entry-point group), and `alpipe simulate`'s training flags come from TrainOptions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from alpipe.cli import _train_config, build_parser
from alpipe.errors import UserError
from alpipe.train_config import TrainConfig, TrainOptions

LIBRARY = Path(__file__).resolve().parents[2] / "shared" / "alpipe"


def _absolute_imports(path: Path) -> set[str]:
    """Modules a file imports by absolute name, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_library_never_imports_the_services():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 10, f"no library modules found under {LIBRARY}"
    offenders = {str(path.relative_to(LIBRARY)): sorted(m for m in _absolute_imports(path)
                                                         if m.partition(".")[0] == "services")
                 for path in files}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_importing_the_cli_loads_no_service_module():
    code = "import sys, alpipe.cli; print(sorted(m for m in sys.modules if m.partition('.')[0] == 'services'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_help_lists_the_service_commands_in_place():
    alpipe = Path(sys.executable).with_name("alpipe")
    done = subprocess.run([str(alpipe), "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "{simulate,up,api,worker,recover,label,export}" in done.stdout
    assert "run the labeling API (uvicorn)" in done.stdout


def test_service_commands_parse_as_before():
    args = build_parser().parse_args(["worker", "trainer", "--burst", "--name", "t1"])
    assert (args.kind, args.burst, args.name, args.func.__module__) == ("trainer", True, "t1", "services.commands")
    args = build_parser().parse_args(["api", "--host", "0.0.0.0", "--port", "8000", "--workers", "3"])
    assert (args.host, args.port, args.workers) == ("0.0.0.0", 8000, 3)


def test_simulate_flag_defaults_are_the_models():
    args = build_parser().parse_args(["simulate"])
    assert _train_config(args).as_dict() == TrainOptions().model_dump()
    assert _train_config(args) == TrainConfig()


def test_simulate_flags_set_the_config():
    args = build_parser().parse_args(["simulate", "--stop", "epochs:4", "--max-epochs", "7", "--holdout", "test",
                                      "--lr", "0.5", "--batch-size", "8", "--reset", "--no-augment"])
    config = _train_config(args)
    assert (config.stop, config.max_epochs, config.holdout, config.lr, config.batch_size) == \
        ("epochs:4", 7, "test", 0.5, 8)
    assert (config.warm_start, config.augment) == (False, False)


@pytest.mark.parametrize(("flags", "message"), [
    (["--patience", "0"], "^--patience: Input should be greater than or equal to 1, got 0$"),
    (["--max-epochs", "1001"], "^--max-epochs: Input should be less than or equal to 1000, got 1001$"),
    (["--batch-size", "1"], "^--batch-size: Input should be greater than or equal to 2, got 1$"),
    (["--stop", "forever"], "unknown stopping rule 'forever'"),
])
def test_simulate_flags_out_of_the_models_bounds_are_user_errors(flags, message):
    with pytest.raises(UserError, match=message):
        _train_config(build_parser().parse_args(["simulate", *flags]))


def test_every_job_path_names_a_function_of_the_services():
    """The library enqueues worker jobs by import path (keys.JOB_*) without importing the services; a
    renamed job function would otherwise fail only when a worker picks the job up."""
    import importlib

    from alpipe import keys

    paths = {name: value for name, value in vars(keys).items() if name.startswith("JOB_")}
    assert len(paths) == 6
    for name, path in paths.items():
        module, _, function = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function, None)), f"keys.{name} = {path!r}"
