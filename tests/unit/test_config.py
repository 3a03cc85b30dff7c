from __future__ import annotations

from pathlib import Path

import pytest

from mows import ConfigError
from mows._config import DEFAULT_SOCKET, default_socket, load_daemon_config, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("200", 200 * 2**30),
        (2, 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("512MiB", 2**29),
        ("4096b", 4096),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "-1", "12 parsecs", "0", True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_memory"):
        parse_size(bad, "max_memory")  # type: ignore[arg-type]


def test_precedence_flags_env_file(tmp_path: Path) -> None:
    conf = tmp_path / "mows.toml"
    conf.write_text(
        'max_memory = "1GiB"\nworkers = 2\nsocket = "/tmp/file.sock"\nmodel_path = ["/m/a"]\n'
    )
    env = {"MOWS_WORKERS": "3", "MOWS_SOCKET": "/tmp/env.sock"}
    c = load_daemon_config(
        {"socket": "/tmp/flag.sock", "max_memory": None}, config_file=str(conf), env=env
    )
    assert c.max_memory == 2**30  # file
    assert c.workers == 3  # env beats file
    assert c.socket == "/tmp/flag.sock"  # flag beats env
    assert c.model_paths == ("/m/a",)


def test_errors_name_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "mows.toml"
    conf.write_text('max_memory = "1GiB"\nmax_memroy = 3\n')
    with pytest.raises(ConfigError, match="unknown setting 'max_memroy'"):
        load_daemon_config({}, config_file=str(conf), env={})
    with pytest.raises(ConfigError, match="max_memory: required"):
        load_daemon_config({}, env={})
    with pytest.raises(ConfigError, match="MOWS_WORKERS"):
        load_daemon_config({"max_memory": "1"}, env={"MOWS_WORKERS": "many"})
    with pytest.raises(ConfigError, match="nic"):
        load_daemon_config({"max_memory": "1", "nic": "carrier-pigeon"}, env={})
    conf.write_text("max_memory = [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_daemon_config({}, config_file=str(conf), env={})


def test_default_socket() -> None:
    assert default_socket({}) == DEFAULT_SOCKET
    assert default_socket({"MOWS_SOCKET": "/x.sock"}) == "/x.sock"
