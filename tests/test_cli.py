"""The command line: help that renders, errors as one line with the promised exit codes."""

from __future__ import annotations

import pytest

import dataclasses

from coala_stream.cli import SUBCOMMANDS, build_parser, main
from coala_stream.cli.options import config_from_args
from coala_stream.evaluate import EvalConfig
from coala_stream.reduce import ReduceConfig
from coala_stream.sequential import SequentialConfig
from coala_stream.solve import SolveConfig

CONFIGS = {"capture": SequentialConfig, "reduce": ReduceConfig, "solve": SolveConfig,
           "eval": EvalConfig}
REQUIRED = {"capture": ["--out", "s.zarr"], "reduce": ["s.zarr"], "solve": ["s.zarr", "--out", "o"]}
REQUIRED_FIELDS = {"capture": ("out",), "solve": ("out",)}


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"\n    {name}" in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_help_renders_with_defaults(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: coala-stream {name}")
    config = CONFIGS.get(name)
    if config is None:
        assert "--json" in out
        return
    # every setting of the stage's config is an option with the config's own help and default
    for f in dataclasses.fields(config):
        meta = f.metadata
        shown = f.name if meta.get("positional") else "--" + f.name.replace("_", "-")
        assert shown in out, f"{shown} missing from {name} --help"
        first_words = " ".join(meta["help"].split()[:3])
        assert first_words in " ".join(out.split()), f"{shown}'s help missing from {name} --help"
    defaults = config_from_args(config, build_parser().parse_args([name, *REQUIRED.get(name, [])]))
    assert {f.name: getattr(defaults, f.name) for f in dataclasses.fields(config)} == \
        {f.name: getattr(config(**{k: getattr(defaults, k) for k in REQUIRED_FIELDS.get(name, ())}), f.name)
         for f in dataclasses.fields(config)}  # the CLI's defaults are the dataclass's


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "capture" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["reduce", "{tmp}/missing.zarr"],
    ["solve", "{tmp}/missing.zarr", "--ratio", "0.2", "--out", "{tmp}/out"],
    ["status", "{tmp}/missing.zarr"],
    ["eval", "{tmp}/missing-model"],
])
def test_missing_paths_are_one_line_errors_not_tracebacks(argv, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"coala-stream {argv[0]}: error: ")
    assert "missing" in err.splitlines()[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    code = main(["solve", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o"), "--ratio", "1.5"])
    assert code == 2
    assert "ratio" in capsys.readouterr().err


def test_package_import_is_light_and_pipeline_names_resolve():
    import subprocess
    import sys

    code = ("import sys, coala_stream as c; heavy = [m for m in ('transformers', 'zarr', 'dask', 'h5py') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert callable(c.open_store) and callable(c.run_reduce) and callable(c.load_model); "
            "assert callable(c.run_capture) and callable(c.run_solve) and callable(c.perplexity)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS if n not in ("status", "merge")])
def test_every_compute_command_states_the_thread_rule_in_the_same_words(name, capsys):
    from coala_stream.devices import THREADS_RULE

    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    threads_help = out[out.index("--threads N"):]
    assert " ".join(THREADS_RULE.split()) in threads_help, threads_help[:400]
