"""Who is billed: keys, the master key + X-Meterline-Customer, LiteLLM key metadata, labels."""

from __future__ import annotations

import pytest
from litellm.proxy._types import UserAPIKeyAuth

from plugin.rules.identity import (
    AuthFailure,
    Identity,
    Template,
    UnknownKey,
    customer_from_metadata,
    identify,
    request_labels,
)

MASTER = "sk-master-0123456789"
KEYS = {"mk_alice_key": "acme", "mk_bob_key": "globex"}
CUSTOMERS = {"acme", "globex"}


def who(api_key, headers=None, master=MASTER, defer=False) -> Identity:
    return identify(
        api_key, headers or {}, master,
        lambda secret: KEYS.get(secret),
        lambda customer_id: customer_id in CUSTOMERS,
        defer_unknown_keys=defer,
    )


# ------------------------------------------------------------------ identify


@pytest.mark.parametrize("api_key", [None, ""])
def test_no_key_is_invalid_api_key(api_key):
    with pytest.raises(AuthFailure) as failure:
        who(api_key)
    assert (failure.value.reason, failure.value.status) == ("invalid_api_key", 401)
    assert failure.value.message


def test_no_key_is_refused_even_when_deferring_to_litellm():
    with pytest.raises(AuthFailure):
        who(None, defer=True)


def test_master_key_without_customer_header_is_operator_traffic():
    assert who(MASTER) == Identity(customer_id=None, operator=True)


@pytest.mark.parametrize("name", ["X-Meterline-Customer", "x-meterline-customer", "X-METERLINE-CUSTOMER"])
def test_master_key_with_customer_header_any_case(name):
    assert who(MASTER, {name: "acme"}) == Identity(customer_id="acme", operator=True)


def test_customer_header_value_is_trimmed_and_blank_means_none():
    assert who(MASTER, {"X-Meterline-Customer": "  acme "}) == Identity(customer_id="acme", operator=True)
    assert who(MASTER, {"X-Meterline-Customer": "   "}) == Identity(customer_id=None, operator=True)


def test_master_key_with_unknown_customer_is_a_400():
    with pytest.raises(AuthFailure) as failure:
        who(MASTER, {"X-Meterline-Customer": "initech"})
    assert failure.value.reason == "unknown_customer"
    assert failure.value.status == 400
    assert "initech" in failure.value.message


def test_customer_key_bills_its_customer():
    assert who("mk_alice_key") == Identity(customer_id="acme", operator=False)


def test_customer_key_ignores_the_customer_header():
    identity = who("mk_alice_key", {"X-Meterline-Customer": "globex"})
    assert identity == Identity(customer_id="acme", operator=False)


def test_customer_header_without_master_key_configured_is_ignored():
    identity = identify("mk_alice_key", {"X-Meterline-Customer": "globex"}, None, KEYS.get, CUSTOMERS.__contains__)
    assert identity == Identity(customer_id="acme", operator=False)


def test_master_key_is_not_matched_by_a_prefix():
    with pytest.raises(AuthFailure) as failure:
        who(MASTER[:-1], {"X-Meterline-Customer": "acme"})
    assert failure.value.reason == "invalid_api_key"


def test_unknown_key_is_invalid_api_key_401():
    with pytest.raises(AuthFailure) as failure:
        who("mk_nobody", {"X-Meterline-Customer": "acme"})
    assert (failure.value.reason, failure.value.status) == ("invalid_api_key", 401)


def test_unknown_key_is_deferred_to_litellm_when_configured():
    with pytest.raises(UnknownKey):
        who("sk-litellm-virtual-key", defer=True)
    assert who("mk_alice_key", defer=True) == Identity(customer_id="acme", operator=False)


def test_lookups_are_not_called_for_the_master_key():
    def boom(_):
        raise AssertionError("customer_for_secret must not run for the master key")

    assert identify(MASTER, {}, MASTER, boom, CUSTOMERS.__contains__) == Identity(None, True)


# ------------------------------------------------------------------ LiteLLM virtual keys


def resolve(auth: UserAPIKeyAuth) -> str | None:
    """Exactly how the proxy hook resolves a LiteLLM key (plugin/litellm_hooks.py)."""
    return customer_from_metadata(auth.metadata, auth.team_metadata)


def test_key_metadata_wins_over_team_metadata():
    auth = UserAPIKeyAuth(
        api_key="sk-virtual-1", team_id="team-1",
        metadata={"meterline_customer": "acme"}, team_metadata={"meterline_customer": "globex"},
    )
    assert resolve(auth) == "acme"


def test_team_metadata_used_when_key_has_none():
    auth = UserAPIKeyAuth(api_key="sk-virtual-2", team_id="team-1", team_metadata={"meterline_customer": " globex "})
    assert resolve(auth) == "globex"


def test_blank_key_metadata_falls_back_to_team():
    auth = UserAPIKeyAuth(
        api_key="sk-virtual-3", metadata={"meterline_customer": "  ", "other": 1},
        team_metadata={"meterline_customer": "globex"},
    )
    assert resolve(auth) == "globex"


@pytest.mark.parametrize(
    "auth",
    [
        UserAPIKeyAuth(api_key="sk-virtual-4"),
        UserAPIKeyAuth(api_key="sk-virtual-5", metadata={"tags": ["x"]}, team_metadata={}),
        UserAPIKeyAuth(api_key="sk-virtual-6", metadata={"meterline_customer": 42}),
    ],
)
def test_no_customer_in_metadata_is_none(auth):
    assert resolve(auth) is None


# ------------------------------------------------------------------ member and action labels


def test_labels_from_user_and_metadata_action():
    assert request_labels({"user": "alice", "metadata": {"action": "summarize"}}, {}) == ("alice", "summarize")


def test_action_header_is_the_fallback_any_case():
    assert request_labels({"user": "bob"}, {"X-Meterline-Action": "translate"}) == ("bob", "translate")
    assert request_labels({}, {"x-meterline-action": " search "}) == ("-", "search")


def test_metadata_action_wins_over_header():
    body = {"metadata": {"action": "chat"}}
    assert request_labels(body, {"X-Meterline-Action": "other"}) == ("-", "chat")


def test_blank_metadata_action_falls_back_to_header():
    assert request_labels({"metadata": {"action": "  "}}, {"X-Meterline-Action": "search"}) == ("-", "search")


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({}, {}),
        ({"user": "", "metadata": {"action": ""}}, {"X-Meterline-Action": ""}),
        ({"user": "   ", "metadata": {"action": "   "}}, {"X-Meterline-Action": "  "}),
        ({"user": 17, "metadata": "not a mapping"}, {}),
        ({"user": None, "metadata": {"action": 5}}, {}),
    ],
)
def test_missing_or_blank_labels_are_dash(body, headers):
    assert request_labels(body, headers) == ("-", "-")


def test_labels_are_trimmed_and_capped_at_255_characters():
    member, action = request_labels({"user": "  " + "m" * 300, "metadata": {"action": "a" * 300 + " "}}, {})
    assert member == "m" * 255
    assert action == "a" * 255


def test_copies_of_a_template_share_no_list_or_dict_with_it_or_each_other():
    template = Template(UserAPIKeyAuth(api_key="meterline-customer:acme", user_id="acme",
                                       metadata={"meterline_customer": "acme"}))
    first, second = template.copy(), template.copy()
    assert first.model_dump() == second.model_dump() == UserAPIKeyAuth(
        api_key="meterline-customer:acme", user_id="acme", metadata={"meterline_customer": "acme"}).model_dump()
    first.metadata["tags"] = ["changed by one request"]
    first.models.append("gpt-4o")
    assert resolve(second) == "acme" and "tags" not in second.metadata and second.models == []
    assert "tags" not in template.copy().metadata and template.copy().models == []
