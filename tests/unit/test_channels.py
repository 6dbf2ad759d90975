"""Channel namespaces and the rules of who may subscribe and publish."""

from __future__ import annotations

import pytest

from realtime.auth import Identity
from realtime.channels import ChannelPolicy, namespace_of, validate_channel
from realtime.config import Config, NamespaceConfig
from realtime.errors import BadRequest, Forbidden

TOKEN = Identity("alice", authenticated=True, grants=("private:team", "vip:*"))
ANONYMOUS = None


def allowed(check, *args) -> bool:
    try:
        check(*args)
    except Forbidden:
        return False
    return True


@pytest.mark.parametrize("channel,namespace", [
    ("lobby", ""), ("chat:lobby", "chat"), ("user:alice", "user"), ("a:b:c", "a"), (":x", ""),
])
def test_a_namespace_is_the_part_before_the_first_colon(channel, namespace):
    assert namespace_of(channel) == namespace


@pytest.mark.parametrize("channel", [None, 5, "", "has space", "x" * 201, "é"])
def test_channel_names_are_validated(channel):
    with pytest.raises(BadRequest):
        validate_channel(channel)


def test_the_default_namespace_is_open_and_sends_no_joins():
    policy = ChannelPolicy()
    assert allowed(policy.check_subscribe, "bob", ANONYMOUS, "lobby")
    assert allowed(policy.check_publish, "bob", ANONYMOUS, "lobby", False)
    assert policy.rules("lobby").join_leave is False and policy.rules("lobby").presence
    assert policy.rules("chat:lobby").join_leave is True


def test_user_channels_belong_to_their_user_and_only_the_server_publishes():
    policy = ChannelPolicy()
    assert allowed(policy.check_subscribe, "alice", ANONYMOUS, "user:alice")
    assert not allowed(policy.check_subscribe, "bob", ANONYMOUS, "user:alice")
    assert not allowed(policy.check_subscribe, "alice", ANONYMOUS, "user:alice2")
    assert not allowed(policy.check_publish, "alice", TOKEN, "user:alice", True)


def test_private_channels_need_a_grant_and_never_admit_anonymous_connections():
    open_private = Config(namespaces={"private": NamespaceConfig(subscribe="anyone",
                                                                 publish="anyone")})
    for policy in (ChannelPolicy(), ChannelPolicy(open_private)):
        assert not allowed(policy.check_subscribe, "anon-1", ANONYMOUS, "private:team")
        assert not allowed(policy.check_publish, "anon-1", ANONYMOUS, "private:team", True)
    policy = ChannelPolicy()
    assert allowed(policy.check_subscribe, "alice", TOKEN, "private:team")
    assert not allowed(policy.check_subscribe, "alice", TOKEN, "private:other")
    assert allowed(policy.check_publish, "alice", TOKEN, "private:team", True)
    assert not allowed(policy.check_publish, "alice", TOKEN, "private:team", False)


def test_configured_namespaces_apply_each_rule():
    config = Config(namespaces={
        "news": NamespaceConfig(subscribe="authenticated", publish="server"),
        "vip": NamespaceConfig(subscribe="granted", publish="authenticated"),
        "room": NamespaceConfig(publish="subscribers"),
        "": NamespaceConfig(subscribe="authenticated"),
    })
    policy = ChannelPolicy(config)
    anonymous_token = Identity("anon-1")
    assert allowed(policy.check_subscribe, "alice", TOKEN, "news:today")
    assert not allowed(policy.check_subscribe, "anon-1", anonymous_token, "news:today")
    assert not allowed(policy.check_publish, "alice", TOKEN, "news:today", True)
    assert allowed(policy.check_subscribe, "alice", TOKEN, "vip:lounge")  # granted by vip:*
    assert not allowed(policy.check_subscribe, "bob", Identity("bob", True), "vip:lounge")
    assert allowed(policy.check_publish, "bob", Identity("bob", True), "vip:lounge", False)
    assert not allowed(policy.check_publish, "anon", ANONYMOUS, "room:1", False)
    assert allowed(policy.check_publish, "anon", ANONYMOUS, "room:1", True)
    # a configured default namespace governs channels of unconfigured namespaces too
    assert not allowed(policy.check_subscribe, "anon", ANONYMOUS, "lobby")
    assert not allowed(policy.check_subscribe, "anon", ANONYMOUS, "misc:lobby")


def test_a_grant_opens_a_channel_its_namespace_would_refuse():
    policy = ChannelPolicy()
    granted = Identity("alice", True, grants=("user:support",))
    assert allowed(policy.check_subscribe, "alice", granted, "user:support")
    assert not allowed(policy.check_subscribe, "alice", granted, "user:billing")
