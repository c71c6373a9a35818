"""Bad input to the ``cloudburst`` command and the jobs: exit status 2, one message that names
the problem and what to give instead, and never a traceback.

Each row calls the entry point's ``main(argv)`` in-process (the job modules load once, from
jobs/, on first use); a status a job raises as ``SystemExit`` (argparse, the config loader)
counts as its exit status. ``{tmp}`` in an argument is the test's folder, which holds the
files of :func:`files` and is the working directory.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cloudburst import cli

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
_MODULES: dict[str, ModuleType] = {}

SWEEP = """\
name: tiny
base: train.yaml
space:
  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
"""


def job(name: str) -> ModuleType:
    """``jobs/NAME.py`` as a module (loaded once), its ``_common`` importable beside it."""
    if name not in _MODULES:
        if str(JOBS) not in sys.path:
            sys.path.insert(0, str(JOBS))
        spec = importlib.util.spec_from_file_location(f"cloudburst_job_{name}", JOBS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def files(tmp: Path) -> None:
    """The bad (and one good) config files the rows name."""
    (tmp / "empty.yaml").write_text("")
    (tmp / "broken.yaml").write_text("ingest: {bins: [1, 2\n")
    (tmp / "list.yaml").write_text("- ingest\n- train\n")
    (tmp / "typo.yaml").write_text("ingest:\n  coarsn: 2\n")
    (tmp / "epoch.yaml").write_text("train:\n  epoch: 3\n")
    (tmp / "many.yaml").write_text("train:\n  epochs: many\n")
    (tmp / "sweep.yaml").write_text(SWEEP)
    (tmp / "folder").mkdir()


def row(surface: str, argv: list[str], code: int, words: list[str], **marks: Any) -> Any:
    """One case: ``surface`` (cloudburst or a job's name), its arguments, the exit status and
    the words the message must hold."""
    label = f"{surface}:{' '.join(argv)}".replace("\x00", "NUL")[:90]
    return pytest.param(surface, argv, code, words, id=label, **marks)


GE = "greater than or equal to"
FINITE = "finite number"
NC = "{tmp}/missing.nc"
M1 = ["--model", "models:/m/1"]

CASES = [
    # ------------------------------------------------------------------ cloudburst
    row("cloudburst", ["frobnicate"], 2, ["invalid choice: 'frobnicate'", "ingest", "windows"]),
    row("cloudburst", [], 2, ["arguments are required", "{ingest,info,windows"]),
    row("cloudburst", ["models"], 2, ["arguments are required", "{list,promote}"]),
    row("cloudburst", ["windows", "s.zarr"], 2, ["required", "--length", "--size"]),
    row(
        "cloudburst",
        ["info", "{tmp}/missing.zarr"],
        2,
        ["no store at", "missing.zarr", "cloudburst ingest"],
    ),
    row(
        "cloudburst",
        ["ingest", NC, "o.zarr"],
        2,
        ["no such file or store", "missing.nc", "Check the path"],
    ),
    row(
        "cloudburst", ["ingest", NC, "o.zarr", "--coarsen", "0"], 2, ["coarsen", "got 0", f"{GE} 1"]
    ),
    row("cloudburst", ["ingest", NC, "o.zarr", "--bins", "-3"], 2, ["bins", "got -3", f"{GE} 2"]),
    row(
        "cloudburst",
        ["ingest", NC, "o.zarr", "--bbox=-inf,0,1,1"],
        2,
        ["bbox.0", "got -inf", FINITE],
    ),
    row(
        "cloudburst",
        ["ingest", NC, "o.zarr", "--bbox", "1,2,3"],
        2,
        ["--bbox W,S,E,N must be 4 comma-separated numbers", "'1,2,3'"],
    ),
    row(
        "cloudburst", ["ingest", NC, "o.zarr", "--bbox", "3,0,1,1"], 2, ["bbox", "W < E and S < N"]
    ),
    row(
        "cloudburst",
        ["ingest", NC, "o.zarr", "--chunks", "time=many"],
        2,
        ["--chunks takes DIM=N pairs", "time=240"],
    ),
    row(
        "cloudburst",
        ["windows", "s.zarr", "--length", "four", "--size", "4"],
        2,
        ["--length", "invalid int value: 'four'"],
    ),
    row(
        "cloudburst",
        ["windows", "{tmp}/missing.zarr", "--length", "0", "--size", "4"],
        2,
        ["length", "got 0", f"{GE} 1"],
    ),
    row(
        "cloudburst",
        ["windows", "{tmp}/missing.zarr", "--length", "4", "--size", "4", "--max-nan", "nan"],
        2,
        ["max_nan_fraction", "got nan", FINITE],
    ),
    row(
        "cloudburst",
        ["windows", "s.zarr", "--length", "4", "--size", "4", "--doy", "summer"],
        2,
        ["--doy", "expected A-B, e.g. 150-300", "'summer'"],
    ),
    row(
        "cloudburst",
        ["synthetic", "o.zarr", "--set", "nt"],
        2,
        ["--set 'nt'", "KEY=VALUE", "--set nt=730"],
    ),
    row(
        "cloudburst",
        ["synthetic", "o.zarr", "--set", "ntt=30"],
        2,
        ["ntt", "unknown field", "did you mean 'nt'"],
    ),
    row(
        "cloudburst",
        ["synthetic", "o.zarr", "--set", "resolution_deg=.inf"],
        2,
        ["resolution_deg", "got inf", FINITE],
    ),
    row(
        "cloudburst",
        ["synthetic", "o.zarr", "--set", "wet_fraction=nan"],
        2,
        ["wet_fraction", "'nan'", FINITE],
    ),
    row(
        "cloudburst",
        ["synthetic", "o.zarr", "--set", "freq=2h"],
        2,
        ["freq", "'2h'", "allowed", "'1D'"],
    ),
    row(
        "cloudburst",
        ["info", "{tmp}/missing.zarr", "--storage-option", "anon"],
        2,
        ["--storage-option 'anon'", "KEY=VALUE"],
    ),
    row("cloudburst", ["info", "store\x00.zarr"], 2, ["NUL byte", "remove it"]),
    # ------------------------------------------------------------------ jobs/ingest.py
    row(
        "ingest",
        ["--config", "{tmp}/missing.yaml"],
        2,
        ["ingest: error:", "cannot read config", "missing.yaml", "No such file", "check the path"],
    ),
    row(
        "ingest",
        ["--config", "{tmp}/folder"],
        2,
        ["ingest: error:", "Is a directory", "give the path of a YAML file"],
    ),
    row(
        "ingest",
        ["--config", "{tmp}/broken.yaml"],
        2,
        ["ingest: error:", "not valid YAML", "line 2", "started at line 1"],
    ),
    row(
        "ingest",
        ["--config", "{tmp}/list.yaml"],
        2,
        ["ingest: error:", "must be a mapping of fields", "not a list"],
    ),
    row(
        "ingest",
        ["--config", "{tmp}/typo.yaml"],
        2,
        ["ingest.coarsn", "unknown field", "did you mean 'coarsen'"],
    ),
    row(
        "ingest",
        ["--config", "{tmp}/empty.yaml", "ingest.bins=-5"],
        2,
        ["ingest.bins", "got -5", f"{GE} 2"],
    ),
    row(
        "ingest",
        ["synthetic.nt"],
        2,
        ["override 'synthetic.nt'", "key=value", "synthetic.nt=VALUE"],
    ),
    row("ingest", ["=3"], 2, ["override '=3'", "empty key"]),
    row(
        "ingest",
        ["syntheticc.nt=30"],
        2,
        ["syntheticc", "unknown field", "did you mean 'synthetic'"],
    ),
    row("ingest", ["data.windows.lenght=4"], 2, ["data.windows.lenght", "did you mean 'length'"]),
    row("ingest", ["synthetic.nt=many"], 2, ["synthetic.nt", "'many'", "valid integer"]),
    row("ingest", ["synthetic.wet_fraction=nan"], 2, ["synthetic.wet_fraction", "'nan'", FINITE]),
    row("ingest", ["synthetic.gamma_scale=.inf"], 2, ["synthetic.gamma_scale", "got inf", FINITE]),
    row("ingest", ["--config", "{tmp}/c\x00.yaml"], 2, ["ingest: error:", "NUL byte", "remove it"]),
    row("ingest", ["ingest.target=out\x00.zarr"], 2, ["ingest: error:", "NUL byte"]),
    row("ingest", ["--bogus"], 2, ["unrecognized arguments: --bogus"]),
    # ------------------------------------------------------------------ jobs/train.py
    row(
        "train",
        ["--config", "{tmp}/missing.yaml"],
        2,
        ["train: error:", "cannot read config", "No such file"],
    ),
    row(
        "train",
        ["--config", "{tmp}/epoch.yaml"],
        2,
        ["train.epoch", "unknown field", "did you mean 'epochs'"],
    ),
    row("train", ["--config", "{tmp}/many.yaml"], 2, ["train.epochs", "'many'", "valid integer"]),
    row("train", ["train.epochs=0"], 2, ["train.epochs", "got 0", f"{GE} 1"]),
    row("train", ["train.workers=-1"], 2, ["train.workers", "got -1", f"{GE} 1"]),
    row("train", ["train.lr=nan"], 2, ["train.lr", "'nan'", FINITE]),
    row("train", ["train.lr=.inf"], 2, ["train.lr", "got inf", FINITE]),
    # (other tests may register more families: the list is checked for the built-in ones)
    row(
        "train", ["model.kind=gan"], 2, ["model", "'gan'", "unknown model kind", "diffusion", "vae"]
    ),
    row("train", ["model.los=rec"], 2, ["model.los", "did you mean 'loss'"]),
    row(
        "train",
        ["data.store={tmp}/missing.zarr"],
        2,
        ["train: error:", "no store at", "missing.zarr", "cloudburst ingest"],
    ),
    # ------------------------------------------------------------------ jobs/ensemble.py
    row(
        "ensemble",
        ["--members", "3", "--output", "o.zarr"],
        2,
        ["ensemble: error:", "model: missing", "required"],
    ),
    row(
        "ensemble",
        [
            "--model",
            "cloudburst-vae",
            "--members",
            "3",
            "--output",
            "o.zarr",
            "--tracking-uri",
            "sqlite:///{tmp}/mlflow.db",
        ],
        2,
        ["ensemble: error:", "'cloudburst-vae' is not a registry URI", "models:/NAME@ALIAS"],
    ),
    row(
        "ensemble", [*M1, "--members", "0", "--output", "o.zarr"], 2, ["members: got 0", f"{GE} 1"]
    ),
    row(
        "ensemble",
        [*M1, "--members", "three", "--output", "o.zarr"],
        2,
        ["--members", "invalid int value: 'three'"],
    ),
    row(
        "ensemble",
        [*M1, "--members", "2", "--output", "o.zarr", "--threshold", "nan"],
        2,
        ["scenario.threshold", "got nan", "finite"],
    ),
    row(
        "ensemble",
        [*M1, "--members", "2", "--output", "o.zarr", "--scenario", "forecast"],
        2,
        ["a forecast needs scenario.condition", "data: STORE"],
    ),
    row(
        "ensemble",
        [*M1, "--members", "2", "--output", "o.zarr", "--scenario", "drizzle"],
        2,
        ["--scenario", "invalid choice: 'drizzle'"],
    ),
    row(
        "ensemble",
        ["--request", "{tmp}/missing.yaml"],
        2,
        ["ensemble: error:", "missing.yaml"],
    ),
    row(
        "ensemble",
        ["--request", "{tmp}/folder"],
        2,
        ["ensemble: error:", "folder"],
    ),
    row(
        "ensemble",
        ["--request", "{tmp}/broken.yaml"],
        2,
        ["ensemble: error:", "not valid YAML"],
    ),
    row(
        "ensemble",
        ["--request", "{tmp}/list.yaml"],
        2,
        ["ensemble: error:", "mapping"],
    ),
    # ------------------------------------------------------------------ jobs/evaluate.py
    row("evaluate", [], 2, ["required", "--data"]),
    row(
        "evaluate",
        ["--data", "s.zarr"],
        2,
        ["evaluate: error:", "nothing to evaluate", "--model models:/NAME@ALIAS", "--ensemble"],
    ),
    row(
        "evaluate",
        ["--data", "s.zarr", "--model", "cloudburst-vae"],
        2,
        [
            "evaluate: error:",
            "--model 'cloudburst-vae' is not a registry URI",
            "models:/NAME/VERSION",
        ],
    ),
    row(
        "evaluate",
        ["--data", "s.zarr", "--model", "models:/cloudburst-vae"],
        2,
        ["names no version or alias", "models:/cloudburst-vae@candidate"],
    ),
    row(
        "evaluate",
        ["--data", "s.zarr", *M1, "--chunk-mb", "nan"],
        2,
        ["--chunk-mb", FINITE, "'nan'"],
    ),
    row(
        "evaluate",
        ["--data", "s.zarr", *M1, "--chunk-mb", "inf"],
        2,
        ["--chunk-mb", FINITE, "'inf'"],
    ),
    row(
        "evaluate", ["--data", "s.zarr", *M1, "--samples", "1"], 2, ["--samples: got 1", f"{GE} 10"]
    ),
    row("evaluate", ["--data", "s.zarr", *M1, "--limit", "-1"], 2, ["--limit: got -1", f"{GE} 1"]),
    row(
        "evaluate", ["--data", "s.zarr", *M1, "--members", "1"], 2, ["--members: got 1", f"{GE} 2"]
    ),
    row(
        "evaluate",
        ["--data", "s\x00.zarr", "--model", "models:/m/1"],
        2,
        ["evaluate: error:", "NUL byte"],
    ),
    # ------------------------------------------------------------------ jobs/sweep.py
    row("sweep", [], 2, ["give either --config", "--resume NAME"]),
    row("sweep", ["--guidance"], 2, ["--guidance needs --model", "models:/NAME@ALIAS"]),
    row(
        "sweep",
        ["--guidance", *M1, "--weights", "1", "inf"],
        2,
        ["sweep: error:", "weights", "finite"],
    ),
    row(
        "sweep",
        ["--config", "{tmp}/missing.yaml"],
        2,
        ["sweep: error:", "cannot read config", "check the path"],
    ),
    row(
        "sweep",
        ["--config", "{tmp}/empty.yaml"],
        2,
        ["sweep: error:", "name: missing", "base: missing", "space: missing"],
    ),
    row(
        "sweep", ["--config", "{tmp}/broken.yaml"], 2, ["sweep: error:", "not valid YAML", "line 2"]
    ),
    row(
        "sweep",
        ["--config", "{tmp}/sweep.yaml", "searh.algorithm=grid"],
        2,
        ["searh", "did you mean 'search'"],
    ),
    row("sweep", ["--config", "{tmp}/sweep.yaml", "samples=0"], 2, ["samples", "got 0", f"{GE} 1"]),
    row(
        "sweep",
        ["--config", "{tmp}/sweep.yaml", "objective.bias_bound=.nan"],
        2,
        ["objective.bias_bound", "got nan", FINITE],
    ),
    row(
        "sweep",
        ["--config", "{tmp}/sweep.yaml", "scheduler.kind=hyperband"],
        2,
        ["scheduler", "'hyperband'", "unknown kind", "'asha', 'none'"],
    ),
]


def run(surface: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one entry point given ``argv``."""
    main = cli.main if surface == "cloudburst" else job(surface).main
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse and the config loader exit with the status
        code = exc.code
    out, err = capsys.readouterr()
    return int(code), out, err


@pytest.mark.parametrize(("surface", "argv", "code", "words"), CASES)
def test_bad_input_is_refused_with_a_message_that_names_the_fix(
    surface: str,
    argv: list[str],
    code: int,
    words: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files(tmp_path)
    monkeypatch.chdir(tmp_path)  # whatever a row would write lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    status, out, err = run(surface, args, capsys)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert status == code, err
    missing = [w for w in words if w not in err]
    assert not missing, f"{missing} not in: {err}"
