"""agent.config: agent.yaml -> frozen AgentConfig, errors that name the key."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.events import DestinationClass

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "agent.yaml"


@pytest.fixture
def write_config(tmp_path: Path):
    """Factory: write agent.yaml (a minimal valid one, updated with `changes`) and load it."""
    (tmp_path / "sensitive").mkdir()
    (tmp_path / "usb").mkdir()

    def write(changes: dict[str, Any] | None = None, *, drop: tuple[str, ...] = ()) -> Path:
        data: dict[str, Any] = {
            "state_dir": "state",
            "sensitive_roots": ["sensitive"],
            "destinations": [{"path": "usb", "class": "removable"}],
        }
        data.update(changes or {})
        for key in drop:
            del data[key]
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def load(path: Path, environ: dict[str, str] | None = None) -> AgentConfig:
    return load_config(path, environ or {})


def error_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ)
    return str(info.value)


def test_example_config_is_loadable_as_is() -> None:
    config = load_config(EXAMPLE, {}, check_paths=False)
    assert config.sensitive_roots == (Path("/tmp/exfilwatch-example/sensitive"),)
    assert config.destinations[0].destination_class is DestinationClass.REMOVABLE
    assert config.destinations[0].device is not None
    assert config.destinations[0].device.vendor == "Kingston"
    assert config.batch.max_bytes == 1024**2
    assert config.batch.max_delay == 1.0
    assert config.spool.max_bytes == 256 * 1024**2
    assert config.hashing.max_file_bytes == 2 * 1024**3
    assert [r.label for r in config.path_rules] == ["secret", "confidential"]


def test_example_config_requires_its_directories_by_default() -> None:
    if Path("/tmp/exfilwatch-example/sensitive").is_dir():
        pytest.skip("the example directories exist on this machine")
    with pytest.raises(ConfigError, match=r"sensitive_roots\[0\]"):
        load_config(EXAMPLE, {})


def test_minimal_config_gets_defaults_and_resolves_relative_paths(write_config, tmp_path) -> None:
    config = load(write_config())
    assert config.state_dir == tmp_path / "state"
    assert config.sensitive_roots == (tmp_path / "sensitive",)
    assert config.destinations[0].path == tmp_path / "usb"
    assert config.destinations[0].device is None
    assert config.host == socket.gethostname()
    assert config.collector is None
    assert config.labels.levels == ("public", "internal", "confidential", "secret")
    assert config.labels.xattr == "user.exfilwatch.label"
    assert config.path_rules == ()
    assert (config.batch.max_events, config.batch.max_bytes, config.batch.max_delay) == (
        500,
        1024**2,
        1.0,
    )
    assert config.queue_size == 10_000
    assert config.log_level == "INFO"
    assert config.source == tmp_path / "agent.yaml"


def test_config_is_frozen(write_config) -> None:
    config = load(write_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.queue_size = 1  # type: ignore[misc]


def test_full_config_round_trips_every_key(write_config, tmp_path) -> None:
    config = load(
        write_config(
            {
                "collector": "collector.example.org:7443",
                "host": "ws-1",
                "labels": {"levels": ["low", "high"], "xattr": "user.acme.class"},
                "path_rules": [{"glob": "*/board/*", "label": "high"}],
                "destinations": [
                    {
                        "path": str(tmp_path / "usb"),
                        "class": "cloud_sync",
                        "device": {"vendor": "V", "model": "M", "serial": "S"},
                    }
                ],
                "batch": {"max_events": 10, "max_bytes": "64KiB", "max_delay": "250ms"},
                "spool": {"max_bytes": 4096},
                "hashing": {"max_file_bytes": "1.5GB"},
                "queue_size": 7,
                "log_level": "debug",
            }
        )
    )
    assert config.collector == "collector.example.org:7443"
    assert config.host == "ws-1"
    assert config.labels.levels == ("low", "high")
    assert config.labels.rank("high") == 1
    assert config.labels.rank("nope") == -1
    assert config.path_rules[0].label == "high"
    dest = config.destinations[0]
    assert dest.destination_class is DestinationClass.CLOUD_SYNC
    assert dest.device is not None
    assert (dest.device.vendor, dest.device.model, dest.device.serial) == ("V", "M", "S")
    assert dest.device.mount_point == bytes(tmp_path / "usb")
    assert config.destination_for(tmp_path / "usb") == dest
    assert (config.batch.max_events, config.batch.max_bytes, config.batch.max_delay) == (
        10,
        64 * 1024,
        0.25,
    )
    assert config.spool.max_bytes == 4096
    assert config.hashing.max_file_bytes == 1_500_000_000
    assert config.queue_size == 7
    assert config.log_level == "DEBUG"


def test_environment_overrides_log_level(write_config) -> None:
    path = write_config({"log_level": "INFO"})
    assert load(path, {"EXFILWATCH_LOGLEVEL": "warning"}).log_level == "WARNING"
    assert "EXFILWATCH_LOGLEVEL: expected one of" in error_of(path, {"EXFILWATCH_LOGLEVEL": "loud"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"destinations": [{"path": "usb", "class": "floppy"}]},
            "agent.yaml: destinations[0].class: expected one of removable, network_share, "
            "cloud_sync, local",
        ),
        ({"colector": "x:1"}, "agent.yaml: colector: unknown key"),
        ({"batch": {"max_evnts": 3}}, "agent.yaml: batch.max_evnts: unknown key"),
        (
            {"destinations": [{"path": "usb", "class": "local", "device": {"colour": "red"}}]},
            "agent.yaml: destinations[0].device.colour: unknown key",
        ),
        ({"queue_size": "ten"}, "agent.yaml: queue_size: expected an integer"),
        ({"queue_size": True}, "agent.yaml: queue_size: expected an integer"),
        ({"queue_size": 0}, "agent.yaml: queue_size: expected an integer >= 1"),
        ({"batch": {"max_bytes": "lots"}}, "agent.yaml: batch.max_bytes: expected a size"),
        ({"batch": {"max_delay": "soon"}}, "agent.yaml: batch.max_delay: expected a duration"),
        ({"batch": []}, "agent.yaml: batch: expected a mapping"),
        ({"sensitive_roots": "sensitive"}, "agent.yaml: sensitive_roots: expected a list"),
        ({"sensitive_roots": []}, "agent.yaml: sensitive_roots: expected a non-empty list"),
        ({"sensitive_roots": [3]}, "agent.yaml: sensitive_roots[0]: expected a non-empty string"),
        ({"destinations": []}, "agent.yaml: destinations: expected a non-empty list"),
        ({"destinations": [{"class": "local"}]}, "agent.yaml: destinations[0].path: required"),
        (
            {"path_rules": [{"glob": "*", "label": "top-secret"}]},
            "agent.yaml: path_rules[0].label: expected one of public, internal, confidential, "
            "secret",
        ),
        ({"path_rules": [{"label": "secret"}]}, "agent.yaml: path_rules[0].glob: required"),
        ({"labels": {"levels": ["a", "a"]}}, "agent.yaml: labels.levels: levels must be unique"),
        ({"labels": {"xattr": "label"}}, "agent.yaml: labels.xattr: expected an attribute name"),
        ({"collector": "no-port"}, "agent.yaml: collector: expected HOST:PORT"),
        ({"collector": "host:99999"}, "agent.yaml: collector: expected HOST:PORT"),
        ({"log_level": "chatty"}, "agent.yaml: log_level: expected one of DEBUG"),
        ({"host": ""}, "agent.yaml: host: expected a non-empty string"),
    ],
)
def test_bad_values_name_the_key(write_config, changes, message) -> None:
    assert message in error_of(write_config(changes))


@pytest.mark.parametrize("key", ["state_dir", "sensitive_roots", "destinations"])
def test_required_keys(write_config, key) -> None:
    assert f"agent.yaml: {key}: required key is missing" in error_of(write_config(drop=(key,)))


def test_missing_sensitive_root_is_a_clear_error(write_config, tmp_path) -> None:
    message = error_of(write_config({"sensitive_roots": ["sensitive", "gone"]}))
    assert message == (
        f"agent.yaml: sensitive_roots[1]: sensitive root {tmp_path / 'gone'} "
        "does not exist or is not a directory"
    )


def test_missing_destination_is_an_error_unless_paths_are_not_checked(write_config) -> None:
    path = write_config({"destinations": [{"path": "stick", "class": "removable"}]})
    assert "destinations[0].path:" in error_of(path)
    assert load_config(path, {}, check_paths=False).destinations[0].path.name == "stick"


def test_ipv6_collector(write_config) -> None:
    assert load(write_config({"collector": "[::1]:7443"})).collector == "[::1]:7443"


def test_invalid_yaml_and_unreadable_file(tmp_path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("state_dir: [unclosed\n")
    assert "agent.yaml: invalid YAML" in error_of(bad)
    assert "cannot read configuration" in error_of(tmp_path / "absent.yaml")


def test_top_level_must_be_a_mapping(tmp_path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("- just\n- a list\n")
    assert error_of(path) == "agent.yaml: expected a mapping"


def test_config_error_exits_with_code_2(write_config) -> None:
    with pytest.raises(ConfigError) as info:
        load(write_config({"queue_size": "x"}))
    assert info.value.exit_code == 2
