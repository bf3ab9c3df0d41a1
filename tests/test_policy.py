"""Quota accounting (aquad/core/quotas.py), weight policy (weights.py) and
how the config reads both ([quota.*] and [weights] in aquad.toml)."""

from __future__ import annotations

import grp
import pwd
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aquad.config import ConfigError, load_config, parse_quotas, parse_weights
from aquad.core.quotas import DEFAULT_QUOTA, Quota, QuotaPolicy, Quotas, Share
from aquad.core.tenants import Peer
from aquad.core.weights import WeightPolicy

GiB = 2**30
ROOT_GROUP = grp.getgrgid(0).gr_name
ROOT_USER = pwd.getpwuid(0).pw_name

# --- accounting -------------------------------------------------------------------------


def test_shares_round_up_so_they_are_never_zero():
    assert Share(50).of(64) == 32
    assert Share(25).of(1) == 1
    assert Share(12.5).of(10) == 2
    assert Share(100).of(7) == 7


def test_refusal_names_the_quota_its_limit_and_use():
    quotas = Quotas(QuotaPolicy(default=Quota(leases=2, name="quota.default")),
                    capacity=GiB, max_tenants=8)
    alice = Peer(1, 1000, 100)
    quotas.charge(alice, leases=2)
    refusal = quotas.refusal(alice, leases=1)
    assert (refusal.quota, refusal.holder, refusal.resource, refusal.limit, refusal.used,
            refusal.requested) == ("quota.default", "uid 1000", "leases", 2, 2, 1)
    assert refusal.message == ("quota.default allows uid 1000 2 leases; uid 1000 holds 2 "
                               "and this request needs 1 more")
    assert quotas.refusal(Peer(2, 1001, 100), leases=2) is None  # per uid
    quotas.charge(alice, leases=-1)
    assert quotas.refusal(alice, leases=1) is None


def test_a_group_counts_its_members_and_nothing_else():
    policy = QuotaPolicy(default=Quota(), groups={100: Quota(bytes=Share(50), name="g")})
    quotas = Quotas(policy, capacity=10 * GiB, max_tenants=8)
    quotas.charge(Peer(1, 1000, 100), nbytes=3 * GiB)
    quotas.charge(Peer(2, 1001, 100), nbytes=2 * GiB)
    quotas.charge(Peer(3, 1002, 200), nbytes=5 * GiB)  # another group: no quota
    assert quotas.refusal(Peer(4, 1003, 100), nbytes=1).quota == "g"
    assert quotas.refusal(Peer(4, 1003, 200), nbytes=GiB) is None
    (row,) = quotas.view()["groups"]
    assert row == {"gid": 100, "quota": "g", "limit": {"tenants": None, "leases": None,
                                                       "bytes": 5 * GiB},
                   "used": {"tenants": 0, "leases": 0, "bytes": 5 * GiB}}


def test_a_uid_leaves_the_view_once_it_holds_nothing():
    quotas = Quotas(QuotaPolicy(), capacity=GiB, max_tenants=8)
    bob = Peer(1, 1000, 100)
    quotas.charge(bob, tenants=1)
    quotas.charge(bob, leases=1, nbytes=4096)
    assert [r["uid"] for r in quotas.view()["uids"]] == [1000]
    quotas.charge(bob, leases=-1, nbytes=-4096)
    quotas.charge(bob, tenants=-1)
    assert quotas.view()["uids"] == []


charges = st.lists(st.tuples(st.sampled_from([1000, 1001, 1002]),
                             st.sampled_from(["tenants", "leases", "nbytes"]),
                             st.integers(1, 5)), max_size=60)


@given(charges)
def test_counters_agree_with_a_model(steps):
    """Grants that fit are charged, some are given back; the books match a
    plain recount and refusals are exactly the requests that would not fit."""
    limit = {"tenants": 4, "leases": 6, "nbytes": 9}
    policy = QuotaPolicy(default=Quota(tenants=4, leases=6, bytes=9, name="d"),
                         groups={7: Quota(leases=8, name="g")})
    quotas = Quotas(policy, capacity=100, max_tenants=100)
    held: list[tuple[int, str, int]] = []
    for i, (uid, kind, amount) in enumerate(steps):
        peer = Peer(1, uid, 7 if uid != 1002 else 8)

        def total(pred) -> int:
            return sum(a for u, k, a in held if k == kind and pred(u))  # noqa: B023

        fits = total(lambda u: u == uid) + amount <= limit[kind] and not (  # noqa: B023
            kind == "leases" and peer.gid == 7
            and total(lambda u: u != 1002) + amount > 8)
        assert (quotas.refusal(peer, **{kind: amount}) is None) == fits
        if fits:
            quotas.charge(peer, **{kind: amount})
            held.append((uid, kind, amount))
        if i % 3 == 2 and held:  # give one back
            u, k, a = held.pop(0)
            quotas.charge(Peer(1, u, 7 if u != 1002 else 8), **{k: -a})
    view = quotas.view()
    for row in view["uids"]:
        mine = [(k, a) for u, k, a in held if u == row["uid"]]
        assert row["used"] == {"tenants": sum(a for k, a in mine if k == "tenants"),
                               "leases": sum(a for k, a in mine if k == "leases"),
                               "bytes": sum(a for k, a in mine if k == "nbytes")}
    assert {r["uid"] for r in view["uids"]} == {u for u, _, _ in held}


# --- weights ----------------------------------------------------------------------------


def test_a_name_lowers_a_uids_weight_and_never_raises_it():
    policy = WeightPolicy(default=1.0, uids={1000: 4.0}, tenants={"llama-70b": 2.0})
    assert policy.cap(1000, "llama-70b") == 2.0
    assert policy.cap(1000, "other") == 4.0
    assert policy.cap(1001, "llama-70b") == 1.0
    assert policy.grant(1000, "other", None) == 4.0
    assert policy.grant(1000, "other", 8.0) == 4.0
    assert policy.grant(1000, "other", 0.25) == 0.25


# --- config -----------------------------------------------------------------------------


def test_quota_tables_and_their_defaults():
    policy = parse_quotas({})
    assert policy == QuotaPolicy()
    assert policy.default == DEFAULT_QUOTA == Quota(bytes=Share(50), leases=16_384,
                                                     tenants=Share(25), name="quota.default")
    policy = parse_quotas({
        "default": {"bytes": "8GiB", "tenants": 4},
        "uid": {"1000": {"bytes": "64GiB"}, ROOT_USER: {"tenants": "10%", "leases": 5}},
        "group": {ROOT_GROUP: {"tenants": 32}, "4242": {"bytes": 2**20}},
    })
    assert policy.default == Quota(bytes=8 * GiB, leases=16_384, tenants=4,
                                   name="quota.default")
    # A uid's table overrides what it names of the default, and keeps the rest.
    assert policy.uids == {
        1000: Quota(bytes=64 * GiB, leases=16_384, tenants=4, name="quota.uid.1000"),
        0: Quota(bytes=8 * GiB, leases=5, tenants=Share(10), name=f"quota.uid.{ROOT_USER}")}
    # A group's limits only what it names.
    assert policy.groups == {0: Quota(tenants=32, name=f"quota.group.{ROOT_GROUP}"),
                             4242: Quota(bytes=2**20, name="quota.group.4242")}


@pytest.mark.parametrize("table, words", [
    ({"users": {}}, r"\[quota\]: unknown key\(s\) users; allowed: default, uid, group"),
    ({"default": 5}, r"\[quota.default\] must be a table"),
    ({"default": {"memory": "1GiB"}}, r"unknown key\(s\) memory"),
    ({"default": {"bytes": "8GB"}}, r"quota.default.bytes: .*binary unit.*percentage"),
    ({"default": {"bytes": "0"}}, r"quota.default.bytes"),
    ({"default": {"bytes": "0%"}}, r"quota.default.bytes must be a percentage in \(0, 100\]"),
    ({"default": {"bytes": "150%"}}, r"percentage in \(0, 100\]"),
    ({"default": {"leases": 0}}, r"quota.default.leases must be a whole number >= 1"),
    ({"default": {"leases": "5"}}, r"quota.default.leases must be a whole number"),
    ({"default": {"leases": True}}, r"quota.default.leases must be a whole number"),
    ({"default": {"tenants": 2.5}}, r"quota.default.tenants must be a whole number"),
    ({"default": {"tenants": "200%"}}, r"quota.default.tenants must be a percentage"),
    ({"uid": {"1000": {"bytes": "lots"}}}, r"quota.uid.1000.bytes"),
    ({"uid": {"no-such-user-aqua": {}}}, r"no user named 'no-such-user-aqua'"),
    ({"group": {"no-such-group-aqua": {}}}, r"no group named 'no-such-group-aqua'"),
    ({"uid": {"0": {}, ROOT_USER: {}}}, r"quota.uid names 0 twice"),
    ({"uid": []}, r"quota.uid must be a table"),
])
def test_bad_quotas_are_refused_clearly(table, words):
    with pytest.raises(ConfigError, match=words):
        parse_quotas(table)


junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**60), st.floats(),
                 st.text(max_size=12), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.from_regex(r"-?\d{1,4}(\.\d{1,2})?\s?%", fullmatch=True))


@given(st.sampled_from(["bytes", "leases", "tenants"]), junk)
def test_any_quota_value_is_read_or_refused_with_a_config_error(key, value):
    try:
        quota = parse_quotas({"default": {key: value}}).default
    except ConfigError as exc:
        assert f"quota.default.{key}" in str(exc)
    else:
        got = getattr(quota, key)
        assert (isinstance(got, Share) and 0 < got.percent <= 100) or got >= 1


def test_weights_table():
    assert parse_weights({}) == WeightPolicy()
    policy = parse_weights({"default": 0.5, "uid": {"1000": 4, ROOT_USER: 2.0},
                            "tenant": {"llama-70b": 1.5}})
    assert policy == WeightPolicy(0.5, {1000: 4.0, 0: 2.0}, {"llama-70b": 1.5})


@pytest.mark.parametrize("table, words", [
    ({"default": 0}, r"weights.default must be a number in 0.01..100"),
    ({"default": 101}, r"weights.default must be a number"),
    ({"default": True}, r"weights.default must be a number"),
    ({"uid": {"1000": "4"}}, r"weights.uid.1000 must be a number"),
    ({"tenant": {"../x": 1.0}, "uid": {"1": 3}}, r"weights.tenant.../x: not a tenant name"),
    ({"group": {}}, r"\[weights\]: unknown key\(s\) group"),
    # A name only lowers its uid's weight: this one could never apply.
    ({"tenant": {"llama-70b": 2.0}}, r"weights.tenant.llama-70b = 2 would never apply"),
])
def test_bad_weights_are_refused_clearly(table, words):
    with pytest.raises(ConfigError, match=words):
        parse_weights(table)


def test_config_file_with_quota_and_weights_tables(tmp_path, monkeypatch):
    monkeypatch.delenv("AQUA_SOCKET", raising=False)
    cfg = tmp_path / "aquad.toml"
    cfg.write_text('[aquad]\nmax_tenants = 64\n\n'
                   '[quota.default]\nbytes = "25%"\ntenants = 8\n\n'
                   '[quota.uid.1000]\nbytes = "64GiB"\n\n'
                   f'[quota.group.{ROOT_GROUP}]\ntenants = 32\n\n'
                   '[weights]\ndefault = 1.0\nuid.1000 = 4.0\ntenant."llama-70b" = 2.0\n')
    config = load_config(["--config", str(cfg)])
    quotas, weights = parse_quotas(config.quota), parse_weights(config.weights)
    assert quotas.default.bytes == Share(25) and quotas.uids[1000].tenants == 8
    assert quotas.groups[0].tenants == 32
    assert weights.cap(1000, "llama-70b") == 2.0
    # The same without an [aquad] table.
    cfg.write_text('max_tenants = 64\n[quota.default]\nleases = 9\n')
    assert parse_quotas(load_config(["--config", str(cfg)]).quota).default.leases == 9


@pytest.mark.parametrize("text, words", [
    ('[aquad]\n[aquad.quota.default]\nleases = 1\n', r"\[aquad.quota\] belongs at the top"),
    ('[aquad]\n[quotas.default]\nleases = 1\n', r"quotas outside \[aquad\]"),
    ('[quota.default]\nleases = 0\n', r"quota.default.leases must be a whole number"),
    ('[weights]\ndefault = "high"\n', r"weights.default must be a number"),
    ('quota = 5\n', r"quota must be dict"),
])
def test_bad_policy_tables_in_a_file(tmp_path, text, words):
    cfg = tmp_path / "aquad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(["--config", str(cfg)])


def test_the_example_config_reads_with_its_policy_tables_uncommented(tmp_path, monkeypatch):
    monkeypatch.delenv("AQUA_SOCKET", raising=False)
    text = (Path(__file__).parent.parent / "systemd" / "aquad.toml").read_text()
    load_config(["--config", _write(tmp_path, text)])  # as shipped
    live = "\n".join(line[2:] if re.match(r"# (\[|[\w.\"-]+ = )", line) else line
                     for line in text.splitlines())
    config = load_config(["--config", _write(tmp_path, live.replace("mlteam", ROOT_GROUP))])
    assert parse_quotas(config.quota).uids[1000].bytes == 64 * GiB
    assert parse_weights(config.weights).cap(1000, "llama-70b") == 2.0


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "aquad.toml"
    path.write_text(text)
    return str(path)
