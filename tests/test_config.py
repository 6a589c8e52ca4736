"""The settings machinery (cellserve/config.py, config_args.py) and the server's settings: every
setting documented and reachable as a flag and a file key, files read strictly, the printed
TOML read back to the same settings, and the example config file valid."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from cellserve.config import ConfigError, build, from_mapping, leaves, setting, to_toml
from cellserve.config_args import add_flags, resolve
from cellserve.engine.config import BACKEND_NAMES, POLICY_NAMES, EngineConfig
from cellserve.server.settings import GROUPS, ServerSettings

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "serve.toml"


def parse(cls: type, *argv: str, config: Path | None = None):
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_flags(parser, cls)
    return resolve(cls, parser.parse_args(list(argv)), config)


def test_every_setting_has_help_a_group_and_a_flag_of_its_own():
    found = leaves(ServerSettings)
    assert [leaf for leaf in found if not leaf.help] == []  # a new field: setting(default, "help", ...)
    assert {leaf.meta.get("group") for leaf in found} <= set(GROUPS)
    flags = [leaf.flag for leaf in found] + [a for leaf in found for a in leaf.meta.get("aliases", ())]
    assert len(flags) == len(set(flags)), flags


def test_every_engine_setting_is_a_server_setting():
    keys = {leaf.key for leaf in leaves(ServerSettings)}
    assert {f"engine.{f.name}" for f in dataclasses.fields(EngineConfig)} <= keys


def test_the_names_repeated_to_keep_torch_out_agree_with_the_engines():
    from cellserve.engine.scheduler import POLICIES
    from cellserve.kernels.cell import BACKENDS

    assert POLICY_NAMES == tuple(POLICIES)
    assert BACKEND_NAMES == tuple(BACKENDS) + ("triton",)  # the executor builds triton's kernels itself


def test_a_bad_value_is_refused_at_construction_naming_the_key():
    with pytest.raises(ConfigError, match="http_port must be a port number") as info:
        ServerSettings(http_port=70000, grace_s=-1.0)
    assert [p.key for p in info.value.problems] == ["http_port", "grace_s"]
    with pytest.raises(ValueError, match=r"admission_headroom must be in \(0, 1\], got 1.5"):
        EngineConfig(admission_headroom=1.5)
    with pytest.raises(ValueError, match="max_active must be an integer, got '8'"):
        EngineConfig(max_active="8")


def test_build_names_a_sections_keys_with_the_section():
    with pytest.raises(ConfigError) as info:
        build(ServerSettings, {"engine.max_batch": 0, "max_sequences": 0})
    assert {p.key for p in info.value.problems} == {"engine.max_batch", "max_sequences"}


def test_printed_toml_reads_back_to_the_same_settings():
    settings = ServerSettings(zoo_models=["gru-256"], host="::1", default_slo_ms=50.0, threads=4,
                              engine=EngineConfig(policy="padded", max_batch=8, admission=False, max_active=7,
                                                  backend="torch", default_timeout_s=2.5))
    text = to_toml(settings)
    values, problems = from_mapping(ServerSettings, tomllib.loads(text))
    assert problems == []
    assert build(ServerSettings, values) == settings
    assert "# max_batch" not in text and "max_batch = 8" in text
    # unset settings are comments, and defaults read back as defaults
    values, problems = from_mapping(ServerSettings, tomllib.loads(to_toml(ServerSettings())))
    assert problems == [] and build(ServerSettings, values) == ServerSettings()


def test_a_file_is_read_strictly_naming_each_key():
    values, problems = from_mapping(ServerSettings, {
        "htp_port": 1, "grace_s": "30", "threads": 2.5, "zoo_models": "lstm-512", "engine": {"max_btach": 4},
        "sequence_idle_s": 5,  # an integer where a number is expected is fine
    })
    text = [p.render() for p in problems]
    assert text == ["htp_port: unknown key (did you mean http_port?)",
                    "grace_s must be a number, got '30' (a string)",
                    "threads must be an integer, got 2.5 (a number)",
                    "zoo_models must be a list of strings, got 'lstm-512' (a string)",
                    "engine.max_btach: unknown key (did you mean engine.max_batch?)"]
    assert values == {"sequence_idle_s": 5.0}
    _, problems = from_mapping(ServerSettings, {"engine": 3})
    assert [p.render() for p in problems] == ["engine must be a table ([engine]), got an integer"]
    _, problems = from_mapping(ServerSettings, {"admission": True})  # an engine key outside [engine]
    assert problems[0].key == "admission" and "unknown key" in problems[0].render()


def test_a_bad_value_holding_braces_is_named_not_a_crash():
    # the message quotes the value: its braces are not placeholders (they raised KeyError)
    _, problems = from_mapping(ServerSettings, {"http_port": "{port}", "host": {"a": 1}})
    assert [p.render() for p in problems] == ["http_port must be an integer, got '{port}' (a string)",
                                              "host must be a string, got {'a': 1} (a table)"]
    with pytest.raises(ConfigError, match=r"policy '\{fast\}' is not one of cellular"):
        EngineConfig(policy="{fast}")


def test_flags_override_the_file_and_name_themselves_in_errors(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('model_repository = "models"\nhttp_port = 9000\n[engine]\nmax_batch = 4\npolicy = "padded"\n')
    settings = parse(ServerSettings, "--max-batch", "16", "--no-admission", config=config)
    assert settings.http_port == 9000 and settings.engine.policy == "padded"
    assert settings.engine.max_batch == 16 and settings.engine.admission is False
    assert settings.model_repository == tmp_path / "models"  # relative to the file
    with pytest.raises(ValueError) as info:
        parse(ServerSettings, "--max-batch", "0", "--model", "gru-256", config=config)
    assert str(info.value) == ("--max-batch must be >= 1, got 0; "
                               f"--model picks zoo models; it cannot be combined with model_repository (in {config})")
    config.write_text("[engine]\nmax_batch = 0\n")
    with pytest.raises(ValueError, match=f"^{config}: engine.max_batch must be >= 1, got 0$"):
        parse(ServerSettings, config=config)


def test_a_trace_file_in_a_config_file_is_taken_from_the_files_folder(tmp_path, monkeypatch):
    """As model_repository is: a config file means the same whatever folder the server starts in;
    printed back, the path is absolute (the printed file may be read from elsewhere)."""
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "serve.toml"
    config.write_text('trace_config = ["level=TIMESTAMPS", "triton,file=traces/t.json", "rate=2"]\n')
    (tmp_path / "conf" / "traces").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative path read from the working folder would be ./traces: missing
    settings = parse(ServerSettings, config=config)
    assert settings.trace_config == ["level=TIMESTAMPS", f"triton,file={tmp_path / 'conf' / 'traces' / 't.json'}",
                                     "rate=2"]
    flagged = parse(ServerSettings, "--trace-config", "triton,file=here.json", "--trace-config", "level=TIMESTAMPS")
    assert flagged.trace_config[0] == "triton,file=here.json"  # a flag's path is the working folder's, as given
    printed = tomllib.loads(to_toml(flagged))["trace_config"]
    assert printed == [f"triton,file={tmp_path / 'here.json'}", "level=TIMESTAMPS"]


def test_every_file_path_in_a_config_file_is_taken_from_the_files_folder(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "serve.toml"
    config.write_text('[engine]\nplacement = "plan.json"\n')
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "conf"
    assert parse(ServerSettings, config=config).engine.placement == str(conf / "plan.json")
    config.write_text('[engine]\nplacement = "auto"\nplacement_profiles = ["p/b.json"]\n')
    settings = parse(ServerSettings, config=config)
    assert settings.engine.placement == "auto"  # not a path
    assert settings.engine.placement_profiles == [str(conf / "p" / "b.json")]
    assert parse(ServerSettings, "--placement", "plan.json").engine.placement == "plan.json"  # a flag's, as given
    (field,) = [f for f in dataclasses.fields(ServerSettings) if f.name == "accuracy_profiles"]
    assert field.metadata["paths"](["p/a.json"], lambda p: conf / p) == [str(conf / "p" / "a.json")]


def test_a_field_appended_to_the_settings_gets_its_flag_and_key():
    """What another engineer's new field gets with no other code: with setting() or a plain default."""
    @dataclass
    class Extended(ServerSettings):
        http_workers: int = setting(1, "HTTP worker processes", ge=1)
        access_log: bool = False
        log_format: str | None = None

    parser = argparse.ArgumentParser(prog="t")
    add_flags(parser, Extended)
    help_text = parser.format_help()
    assert "--http-workers" in help_text and "HTTP worker processes (default: 1)" in help_text
    assert "--access-log, --no-access-log" in help_text and "--log-format" in help_text
    settings = parse(Extended, "--http-workers", "3", "--access-log", "--log-format", "json")
    assert (settings.http_workers, settings.access_log, settings.log_format) == (3, True, "json")
    with pytest.raises(ValueError, match="^--http-workers must be >= 1, got 0$"):
        parse(Extended, "--http-workers", "0")
    values, problems = from_mapping(Extended, {"http_workers": 2, "access_log": "yes"})
    assert [p.render() for p in problems] == ["access_log must be true or false, got 'yes' (a string)"]


def test_an_unsupported_type_is_refused_naming_the_field():
    @dataclass
    class Odd:
        ratio: complex = 1j

    with pytest.raises(TypeError, match="Odd.ratio"):
        leaves(Odd)


def test_the_example_config_file_loads():
    settings = parse(ServerSettings, config=EXAMPLE)
    assert settings.host == "0.0.0.0" and settings.zoo_models == ["lstm-512", "seq2seq-reverse"]
    assert settings.default_slo_ms == 200.0 and settings.max_request_bytes == 16 << 20
    assert settings.engine.max_batch == 64 and settings.engine.max_active == 2048
    # every setting of the example is a real key, and it sets nothing to what a flag could not
    data = tomllib.loads(EXAMPLE.read_text())
    assert from_mapping(ServerSettings, data)[1] == []


def test_the_example_config_file_shows_every_setting():
    """Set or commented out: a setting added to ServerSettings belongs in the example too."""
    text = EXAMPLE.read_text()
    table = ""
    keys = set()
    for line in text.splitlines():
        if line.startswith("["):
            table = line.strip("[]") + "."
        elif " = " in line and not line.startswith("#     "):
            keys.add(table + line.lstrip("# ").split(" =")[0])
    assert {leaf.key for leaf in leaves(ServerSettings)} - keys == set()
