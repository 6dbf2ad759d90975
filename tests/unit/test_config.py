import pytest

from realtime.backends import create_broker
from realtime.cli import build_parser
from realtime.config import Config, ConfigError


def test_defaults():
    config = Config.load(environ={})
    assert (config.host, config.port, config.broker) == ("127.0.0.1", 5000, "memory://")
    assert config.history_size == 100 and config.history_ttl == 300
    assert config.max_message_size == 65536
    assert config.node_id.startswith("node-")


def test_layers_file_then_environment_then_flags(tmp_path):
    config_file = tmp_path / "realtime.toml"
    config_file.write_text('port = 7000\nhistory-size = 7\nnode_id = "from-file"\n')
    environ = {"REALTIME_PORT": "7001", "REALTIME_CONFIG": str(config_file)}
    config = Config.load({"node_id": "from-flag", "port": None}, environ=environ)
    assert config.port == 7001 and config.history_size == 7 and config.node_id == "from-flag"


@pytest.mark.parametrize("environ,message", [
    ({"REALTIME_PORT": "eighty"}, "port must be int"),
    ({"REALTIME_PORT": "70000"}, "port must be 0..65535"),
    ({"REALTIME_NODE_ID": "has space"}, "node_id"),
    ({"REALTIME_HISTORY_TTL": "0"}, "history_ttl"),
])
def test_bad_values_name_the_field(environ, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(environ=environ)


def test_unknown_file_keys_and_unreadable_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown configuration keys: colour"):
        Config.load(environ={}, config_file=str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(environ={}, config_file=str(tmp_path / "missing.toml"))


def test_unsupported_broker_url_is_a_config_error():
    with pytest.raises(ConfigError, match="use one of: memory://"):
        create_broker(Config(broker="kafka://somewhere"))


def test_every_config_field_is_a_cli_flag():
    args = build_parser().parse_args(["serve", "--port", "6000", "--history-ttl", "1.5",
                                      "--broker", "memory://", "--node-id", "n7"])
    assert (args.port, args.history_ttl, args.broker, args.node_id) == (6000, 1.5, "memory://",
                                                                        "n7")


def test_allowed_origins():
    assert Config(allowed_origins="").cors_allowed_origins is None
    assert Config(allowed_origins="*").cors_allowed_origins == "*"
    assert Config(allowed_origins="http://a, http://b").cors_allowed_origins == ["http://a",
                                                                                  "http://b"]
