"""Triton's logging extension (server/log_settings.py): the server's log written where and as
its --log-* flags say, read and changed while it serves over HTTP and gRPC with tritonclient's
get_log_settings / update_log_settings, a verbose line per request, bad settings refused
naming them with nothing changed."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.server.log_settings import LogSettingError, LogSettings, ServerLog
from serverproc import start_server, wait_until

DEFAULTS = {"log_file": "", "log_info": False, "log_warning": True, "log_error": True, "log_verbose_level": 0,
            "log_format": "default"}


@pytest.fixture
def server_log(tmp_path):
    log = ServerLog(LogSettings(log_file=str(tmp_path / "server.log")))
    log.install()
    yield log, tmp_path / "server.log"
    log.close()


def test_each_severity_is_written_only_when_turned_on(server_log):
    log, path = server_log
    logger = logging.getLogger("cellserve.test")
    logger.info("an info line")
    logger.warning("a warning line")
    log.update({"log_info": True, "log_warning": False})
    logger.info("a second info line")
    logger.warning("a second warning line")
    logger.debug("a verbose line")
    log.update({"log_verbose_level": 1})
    logger.debug("a second verbose line")
    lines = path.read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["a warning line", "a second info line",
                                                        "a second verbose line"]
    # glog's layout, as Triton's default: severity letter, MMDD time, pid, file:line
    assert re.fullmatch(r"W\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ test_logging\.py:\d+\] a warning line", lines[0])


def test_iso8601_format(server_log):
    log, path = server_log
    log.update({"log_format": "ISO8601", "log_file": str(path)})  # the file as it is: accepted
    logging.getLogger("cellserve.test").error("an error line")
    [line] = path.read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ E test_logging\.py:\d+\] an error line", line)


@pytest.mark.parametrize("changes, words", [
    ({"log_colour": True}, "unknown log setting(s) ['log_colour']"),
    ({"log_info": "yes"}, "'log_info' must be a boolean, got 'yes'"),
    ({"log_verbose_level": -1}, "'log_verbose_level' must be an integer >= 0, got -1"),
    ({"log_verbose_level": True}, "'log_verbose_level' must be an integer >= 0, got True"),
    ({"log_format": "json"}, "'log_format' must be one of ['default', 'ISO8601'], got 'json'"),
    ({"log_file": "/tmp/elsewhere.log"}, "'log_file' is set only at start (--log-file)"),
])
def test_a_bad_setting_is_refused_naming_it_and_nothing_changes(server_log, changes, words):
    log, _ = server_log
    before = log.get()
    with pytest.raises(LogSettingError) as err:
        log.update(changes)
    assert words in str(err.value)
    assert log.get() == before


# ---- a real server ----

@pytest.mark.slow  # a server of its own
def test_read_and_changed_while_serving_with_a_line_per_request(tmp_path):
    path = tmp_path / "server.log"
    server = start_server("--model", "gru-256", "--log-file", str(path), "--log-verbose", "1")
    try:
        http = httpclient.InferenceServerClient(server.http)
        grpc = grpcclient.InferenceServerClient(server.grpc)
        want = {**DEFAULTS, "log_file": str(path), "log_verbose_level": 1}
        assert http.get_log_settings() == want
        assert grpc.get_log_settings(as_json=True)["settings"] == _grpc_json(want)

        tokens = httpclient.InferInput("tokens", [1, 3], "INT64")
        tokens.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
        http.infer("gru-256", [tokens], request_id="first")
        wait_until(lambda: "id 'first': ok" in path.read_text(), "the request's line is written")
        assert re.search(r"infer gru-256 version 1 id 'first': ok, [\d.]+ ms in the server", path.read_text())

        assert grpc.update_log_settings({"log_verbose_level": 0}, as_json=True)["settings"] == \
            _grpc_json({**want, "log_verbose_level": 0})
        http.infer("gru-256", [tokens], request_id="second")
        assert http.get_log_settings()["log_verbose_level"] == 0
        assert "second" not in path.read_text()

        with pytest.raises(InferenceServerException) as err:
            http.update_log_settings({"log_verbose_level": "loud"})
        assert err.value.status() == "400" and "'log_verbose_level' must be an integer" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            grpc.update_log_settings({"log_format": "json"})
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "'log_format'" in err.value.message()
        assert "logging" in http.get_server_metadata()["extensions"]
    finally:
        assert server.stop() == 0


def _grpc_json(settings: dict) -> dict:
    """The settings as tritonclient's JSON form of the gRPC message writes them."""
    kinds = {bool: "bool_param", int: "uint32_param", str: "string_param"}
    return {key: {kinds[type(value)]: value} for key, value in settings.items()}


def test_a_log_file_that_cannot_be_opened_stops_the_start_with_one_line(tmp_path):
    bad = tmp_path / "missing" / "server.log"
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", "--model", "gru-256", "--log-file",
                           str(bad), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"cellserve: error: log setting 'log_file': cannot open '{bad}' for appending: No such file or directory"]
