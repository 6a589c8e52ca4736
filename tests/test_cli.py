"""`cellserve serve`'s command line: every setting a flag, the old flag names still working, bad
values refused with exit 2 naming the flag, --config and --print-config; and --help fast (no
torch). In-process through cli.main (what the `cellserve` script runs), but for the import check."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from cellserve import cli
from cellserve.config import leaves
from cellserve.server.settings import ServerSettings


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def effective(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, "serve", *argv, "--print-config")
    assert code == 0, err
    return tomllib.loads(out)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom cellserve.cli import main\n"
            "for argv in (['--help'], ['serve', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'uvicorn', 'grpc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_commands_help_prints(capsys):
    """`--help` at every level of the command tree formats (a stray % in one subcommand's
    help broke its parent's: `cellserve bench --help` was a TypeError)."""
    import argparse

    from cellserve.cli import build_parser

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, path + [name])

    paths = []
    for path, _ in walk(build_parser(), []):
        code, out, err = run(capsys, *path, "--help")
        assert code == 0 and "usage: cellserve" in out, (path, err)
        paths.append(path)
    assert ["bench"] in paths and ["bench", "soak"] in paths and ["plan", "nexus"] in paths


def test_serve_help_shows_every_setting_with_its_default_in_groups(capsys):
    code, out, _ = run(capsys, "serve", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    for leaf in leaves(ServerSettings):
        assert leaf.flag in text
    for group in ("models:", "network:", "batching and admission:", "compute:", "sequences and lifecycle:"):
        assert group in out
    assert "--max-inflight N requests in flight in the engine at once" in text
    assert "(default: 4096; formerly --max-queue, still accepted)" in text
    assert "--admission, --no-admission" in text and "(default: on)" in text
    assert "--max-batch N batch cap per cell type (default: the policy's)" in text
    assert "--config FILE" in text and "--print-config" in text


def test_the_defaults_are_what_they_were(capsys):
    """The settings the server had before they were one configuration (settings added since are not
    listed here); unset ones (model_repository, slo-ms, threads, max_batch, backend,
    default_timeout_s) are absent from the TOML."""
    got = effective(capsys)
    engine = got.pop("engine")
    old = {"zoo_models": [], "host": "127.0.0.1", "http_port": 8000, "grpc_port": 8001, "metrics_port": 8002,
           "max_request_bytes": 64 << 20, "sequence_idle_s": 60.0, "max_sequences": 100_000, "grace_s": 30.0}
    assert {k: got.get(k) for k in old} == old
    assert not {"model_repository", "default_slo_ms", "threads"} & got.keys()
    old_engine = {"policy": "cellular", "batch_timeout_s": 0.005, "device": "cpu", "admission": True,
                  "admission_headroom": 0.8, "drop_late": True, "max_active": 4096, "profile": True,
                  "pin_threads": True, "stack_layers": True}
    assert {k: engine.get(k) for k in old_engine} == old_engine  # settings added since: not here
    assert not {"max_batch", "backend", "default_timeout_s"} & engine.keys()


def test_the_old_flag_names_set_what_they_set(capsys, tmp_path):
    got = effective(capsys, "--model-repository", str(tmp_path), "--host", "0.0.0.0", "--http-port", "0",
                    "--grpc-port", "-1", "--metrics-port", "9", "--device", "cuda:1", "--threads", "3",
                    "--no-pin-threads", "--no-stack-layers", "--backend", "blas", "--policy", "padded",
                    "--max-batch", "8", "--max-request-size", "1024",
                    "--sequence-idle-timeout", "5", "--max-sequences", "7", "--grace-period", "0")
    engine = got.pop("engine")
    expected = {"model_repository": str(tmp_path), "zoo_models": [], "host": "0.0.0.0", "http_port": 0,
                "grpc_port": -1, "metrics_port": 9, "max_request_bytes": 1024,
                "sequence_idle_s": 5.0, "max_sequences": 7, "grace_s": 0.0, "threads": 3}
    assert {k: got.get(k) for k in expected} == expected
    assert (engine["device"], engine["pin_threads"], engine["stack_layers"], engine["backend"], engine["policy"],
            engine["max_batch"]) == ("cuda:1", False, False, "blas", "padded", 8)
    assert effective(capsys, "--model", "gru-256", "--model", "lstm-512")["zoo_models"] == ["gru-256", "lstm-512"]
    assert effective(capsys, "--slo-ms", "50")["default_slo_ms"] == 50.0


def test_max_queue_is_a_deprecated_name_of_max_inflight(capsys):
    code, out, err = run(capsys, "serve", "--max-queue", "24", "--print-config")
    assert code == 0 and tomllib.loads(out)["engine"]["max_active"] == 24
    assert "--max-queue is deprecated; use --max-inflight" in err
    code, out, err = run(capsys, "serve", "--max-inflight", "25", "--print-config")
    assert tomllib.loads(out)["engine"]["max_active"] == 25 and err == ""
    code, _, err = run(capsys, "serve", "--max-queue", "0", "--print-config")
    assert code == 2 and "--max-queue must be >= 1, got 0" in err  # named as typed


def test_the_engine_settings_the_cli_could_not_reach_before(capsys):
    engine = effective(capsys, "--no-admission", "--no-drop-late", "--policy", "padded",
                       "--batch-timeout", "0.02", "--default-timeout", "1.5", "--no-startup-profile")["engine"]
    assert (engine["admission"], engine["drop_late"], engine["batch_timeout_s"],
            engine["default_timeout_s"], engine["profile"]) == (False, False, 0.02, 1.5, False)
    assert effective(capsys, "--admission-headroom", "0.5")["engine"]["admission_headroom"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--load-model", "m"], "--load-model picks the models to load at start: it needs --model-control-mode explicit"),
    (["--model-control-mode", "explicit"],
     "--model-control-mode explicit follows a model repository: it needs --model-repository"),
    (["--model-control-mode", "poll"], "--model-control-mode poll follows a model repository: it needs --model-repository"),
    (["--model-control-mode", "poll", "--model-repository", "m", "--load-model", "a"],
     "--load-model picks the models to load at start: it needs --model-control-mode explicit (poll loads every model"),
    (["--repository-poll-secs", "5"], "--repository-poll-secs sets how often the repository is polled: it needs "
                                      "--model-control-mode poll"),
    (["--model-control-mode", "poll", "--model-repository", "m", "--repository-poll-secs", "0"],
     "--repository-poll-secs must be >= 0.1, got 0"),
    (["--model-control-mode", "poll", "--model-repository", "m", "--repository-poll-secs", "1e-6"],
     "--repository-poll-secs must be >= 0.1, got 1e-06"),
    (["--http-port", "70000"], "--http-port must be a port number, 0 (any free port) or -1 (off), got 70000"),
    (["--grace-period", "-1"], "--grace-period must be >= 0, got -1"),
    (["--slo-ms", "0"], "--slo-ms must be > 0, got 0"),
    (["--grace-period", "inf"], "--grace-period must be a finite number >= 0, got inf"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--admission-headroom", "1.5"], "--admission-headroom must be in (0, 1], got 1.5"),
    (["--max-inflight", "0"], "--max-inflight must be >= 1, got 0"),
    (["--model", "gru-256", "--model-repository", "m"],
     "--model picks zoo models; it cannot be combined with --model-repository"),
    (["--policy", "fifo"], "argument --policy: invalid choice: 'fifo'"),
    (["--max-batch", "x"], "argument --max-batch: invalid int value: 'x'"),
    (["--max-lane-memory", "0"], "--max-lane-memory must be > 0, got 0"),
    (["--model-repository", "m", "--slo-ms", "50"],
     "--slo-ms is the zoo models' default deadline; a repository model's is its config's slo_ms parameter"),
    (["--policy", "none", "--max-batch", "8"], "--max-batch caps a batch; policy none runs each request alone"),
    (["--batch-timeout", "0.01"], "--batch-timeout is how long the padded policy waits for a batch; policy "
                                  "cellular never waits"),
    (["--no-admission", "--admission-headroom", "0.5"], "--admission-headroom is admission's: it needs --admission"),
    (["--model-repository", "a", "--model-repository", "b"],
     "--model-repository given twice (a and b): one repository is served (Triton takes several"),
])
def test_a_bad_flag_exits_2_naming_it(capsys, argv, message):
    code, out, err = run(capsys, "serve", *argv)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("cellserve serve: error: ")
    assert message in err.splitlines()[-1]


def test_config_file_then_flags(capsys, tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('http_port = 9000\ngrace_s = 5\n[engine]\nmax_batch = 4\nadmission = false\n')
    got = effective(capsys, "--config", str(config), "--max-batch", "16")
    assert got["http_port"] == 9000 and got["grace_s"] == 5.0
    assert got["engine"]["max_batch"] == 16 and got["engine"]["admission"] is False
    # what --print-config prints is itself a config file for the same settings
    again = tmp_path / "again.toml"
    again.write_text(run(capsys, "serve", "--config", str(config), "--max-batch", "16", "--print-config")[1])
    assert effective(capsys, "--config", str(again)) == got


def test_printed_paths_are_absolute_so_a_printed_config_reads_back_the_same(capsys, tmp_path, monkeypatch):
    """A file's relative paths are read relative to the file: printed relative, they would
    move each time the printed config is saved elsewhere and read back."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    first = effective(capsys, "--log-file", "server.log")
    assert first["log_file"] == str(tmp_path / "server.log")
    saved = tmp_path / "configs" / "serve.toml"
    saved.write_text(run(capsys, "serve", "--log-file", "server.log", "--print-config")[1])
    assert effective(capsys, "--config", str(saved)) == first


@pytest.mark.parametrize("text, message", [
    ("max_batch = 4\n", "max_batch: unknown key here (it belongs in the [engine] table)"),
    ("[engine]\nmax_bach = 4\n", "engine.max_bach: unknown key (did you mean engine.max_batch?)"),
    ("[engine]\nmax_inflight = 4\n", "engine.max_inflight: unknown key (the key of --max-inflight is "
                                      "engine.max_active)"),
    ("max_inflight = 4\n", "max_inflight: unknown key (the key of --max-inflight is max_active, in the "
                           "[engine] table)"),
    ("max_request_size = 4\n", "max_request_size: unknown key (the key of --max-request-size is "
                               "max_request_bytes)"),
    ('http_port = "80"\n', "http_port must be an integer, got '80' (a string)"),
    ("[engine]\nadmission = 1\n", "engine.admission must be true or false, got 1 (an integer)"),
    ("[engine]\nmax_batch = 0\n", "engine.max_batch must be >= 1, got 0"),
    ("http_port = [\n", "not valid TOML"),
])
def test_a_bad_config_file_exits_2_naming_the_key(capsys, tmp_path, text, message):
    config = tmp_path / "serve.toml"
    config.write_text(text)
    code, _, err = run(capsys, "serve", "--config", str(config))
    assert code == 2
    assert str(config) in err.splitlines()[-1] and message in err.splitlines()[-1]


def test_a_missing_config_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "serve", "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and f"--config {tmp_path / 'nope.toml'}: No such file or directory" in err


def test_cellserves_own_warnings_are_one_line(capsys):
    import warnings

    from cellserve.plan.profile import ProfileWarning

    cli._show_warning("profile made by an older cellserve", ProfileWarning, "x.py", 3)
    cli._show_warning("not ours", UserWarning, "x.py", 3)
    err = capsys.readouterr().err
    assert err.startswith("warning: profile made by an older cellserve\n")
    assert "x.py:3: UserWarning: not ours" in err
    assert warnings.showwarning is not None


def test_bench_soaks_mix_is_three_shares(capsys):
    from cellserve.bench.soak import _mix

    assert _mix("2,1,1") == (0.5, 0.25, 0.25)
    for bad in ("1,0", "1,-1,2", "0,0,0", "a,b,c", "1,nan,1"):
        code, _, err = run(capsys, "bench", "soak", "--mix", bad)
        assert code == 2 and "argument --mix: must be three shares PLAIN,SEQUENCE,BAD" in err, err
