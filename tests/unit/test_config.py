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
    with pytest.raises(ConfigError, match="unknown configuration key 'colour'"):
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


def test_sections_secrets_from_files_and_lists(tmp_path):
    secret = tmp_path / "jwt-secret"
    secret.write_text("s3cret-" + "x" * 30 + "\n")
    keys = tmp_path / "api-keys"
    keys.write_text("# the keys of the two backends\nkey-one\n\nkey-two\n")
    config_file = tmp_path / "realtime.toml"
    config_file.write_text(
        f'[auth]\njwt_secret_file = "{secret}"\njwt-audience = "realtime"\n'
        'allow_anonymous = true\n[limits]\nmax_subscriptions = 12\nevents_per_second = 5\n')
    config = Config.load(environ={"REALTIME_API_KEYS_FILE": str(keys)},
                         config_file=str(config_file))
    assert config.jwt_secret == "s3cret-" + "x" * 30 and config.jwt_audience == "realtime"
    assert config.allow_anonymous is True and config.jwt_configured
    assert config.api_keys == ["key-one", "key-two"]
    assert config.max_subscriptions == 12 and config.events_per_second == 5.0
    assert "s3cret" not in repr(config) and "key-one" not in repr(config)


def test_hs256_secrets_shorter_than_32_bytes_are_refused():
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Config.load({"jwt_secret": "short"}, environ={})


def test_environment_lists_and_booleans():
    config = Config.load(environ={"REALTIME_API_KEYS": "a, b", "REALTIME_ALLOW_ANONYMOUS": "1",
                                  "REALTIME_JWT_SECRET": "x" * 32})
    assert config.api_keys == ["a", "b"] and config.allow_anonymous is True
    with pytest.raises(ConfigError, match="allow_anonymous must be true or false"):
        Config.load(environ={"REALTIME_ALLOW_ANONYMOUS": "maybe"})


def test_a_later_layer_wins_even_between_a_value_and_a_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("from-file-" + "f" * 30)
    config = Config.load({"jwt_secret_file": str(secret)},
                         environ={"REALTIME_JWT_SECRET": "from-env-" + "e" * 30})
    assert config.jwt_secret == "from-file-" + "f" * 30
    with pytest.raises(ConfigError, match="not both"):
        Config.load({"jwt_secret": "a", "jwt_secret_file": str(secret)}, environ={})


@pytest.mark.parametrize("layers,message", [
    ({"jwt_secret": "a" * 32, "jwt_jwks_url": "https://x/jwks"}, "give one of"),
    ({"jwt_previous_secret": "a" * 32}, "needs jwt_secret"),
    ({"jwt_public_key": "/no/such/key.pem"}, "no such file"),
    ({"jwt_jwks_url": "file:///etc/passwd"}, "http"),
    ({"trusted_proxies": "not-an-address"}, "trusted_proxies"),
    ({"api_keys": ["good", ""]}, "api_keys"),
    ({"max_subscriptions": 0}, "max_subscriptions"),
    ({"jwt_secret_file": "/no/such/file"}, "cannot read jwt_secret_file"),
])
def test_bad_auth_and_limit_settings_are_refused(layers, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(layers, environ={})


def test_namespaces_come_from_the_file_and_keep_their_built_in_rules(tmp_path):
    config_file = tmp_path / "realtime.toml"
    config_file.write_text('[namespaces.news]\nsubscribe = "authenticated"\npublish = "server"\n'
                           'history_size = 10\n[namespaces.private]\npresence = false\n')
    config = Config.load(environ={}, config_file=str(config_file))
    assert config.namespace("news").subscribe == "authenticated"
    assert config.namespace("news").history_size == 10
    # an option set on a built-in namespace leaves its other rules as they are
    assert config.namespace("private").subscribe == "granted"
    assert config.namespace("private").presence is False
    assert config.namespace("chat").join_leave is True
    assert config.namespace("anything-else").join_leave is False
    assert config.namespace("user").subscribe == "owner"


@pytest.mark.parametrize("table,message", [
    ('[namespaces.news]\nsubscribe = "everybody"\n', "subscribe must be one of"),
    ('[namespaces.news]\ncolour = "red"\n', "unknown options colour"),
    ('[namespaces.news]\nhistory_size = 0\n', "history_size"),
    ('[namespaces."bad name"]\npresence = true\n', "namespace name"),
    ('[auth]\nmax_subscriptions = 3\n', "in \\[auth\\]"),
])
def test_bad_namespace_and_section_tables_are_refused(tmp_path, table, message):
    config_file = tmp_path / "realtime.toml"
    config_file.write_text(table)
    with pytest.raises(ConfigError, match=message):
        Config.load(environ={}, config_file=str(config_file))


def test_the_cluster_command_gives_nodes_secrets_in_their_environment_only():
    from realtime_dev.command import node_shared_settings

    args = build_parser().parse_args(
        ["cluster", "--jwt-secret", "s3cret" * 6, "--api-key", "k1", "--api-key", "k2",
         "--jwt-audience", "realtime", "--allow-anonymous"])
    flags, env = node_shared_settings(args)
    assert flags == ["--jwt-audience", "realtime", "--allow-anonymous"]
    assert env == {"REALTIME_JWT_SECRET": "s3cret" * 6, "REALTIME_API_KEYS": "k1,k2"}


def test_the_cluster_command_passes_the_backend_proxy_settings_to_every_node():
    from realtime_dev.command import node_shared_settings

    args = build_parser().parse_args(
        ["cluster", "--proxy-connect-url", "http://app/realtime/connect",
         "--proxy-headers", "Cookie", "--proxy-timeout", "1.5"])
    flags, env = node_shared_settings(args)
    assert flags == ["--proxy-connect-url", "http://app/realtime/connect",
                     "--proxy-headers", "Cookie", "--proxy-timeout", "1.5"]
    assert env == {}


def test_proxy_settings_may_sit_in_a_proxy_table_or_at_the_top_level(tmp_path):
    config_file = tmp_path / "realtime.toml"
    config_file.write_text('proxy_timeout = 2.0\n[proxy]\nconnect_url = "x"\n')
    with pytest.raises(ConfigError, match="unknown configuration key 'connect_url' in \\[proxy\\]"):
        Config.load(environ={}, config_file=str(config_file))
    config_file.write_text('proxy_timeout = 2.0\n[proxy]\n'
                           'proxy_connect_url = "http://app/connect"\n')
    config = Config.load(environ={}, config_file=str(config_file))
    assert (config.proxy_timeout, config.proxy_connect_url) == (2.0, "http://app/connect")
