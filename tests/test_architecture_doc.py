"""docs/architecture.md names code: every `package.module.name` it cites exists."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).parent.parent / "docs" / "architecture.md"
PACKAGES = ("aqua", "aquad", "aqua_protocol", "aqua_sim", "aqua_demo")
CITED = re.compile(r"`((?:" + "|".join(PACKAGES) + r")(?:\.\w+)+)`")


def cited() -> list[str]:
    return sorted(set(CITED.findall(DOC.read_text())))


def resolve(dotted: str) -> object:
    """The object `dotted` names: the longest importable module prefix, then
    attributes (a class's methods, a dataclass's fields included)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            fields = getattr(target, "__dataclass_fields__", {})
            if name in fields and not hasattr(target, name):
                return fields[name]
            target = getattr(target, name)
        return target
    raise ModuleNotFoundError(dotted)


def test_the_walk_through_a_lease_cites_the_code():
    walk = DOC.read_text().split("## One lease, end to end", 1)[1].split("\n## ", 1)[0]
    names = set(CITED.findall(walk))
    # From the client's first call to the backend and back, crash included.
    for must in ("aqua.client.connect", "aqua_protocol.messages.encode_request",
                 "aquad.server.Server._on_message", "aquad.core.arbiter.Arbiter._grant",
                 "aquad.core.placer.Placer.__call__", "aquad.backends.host.HostBackend.create",
                 "aqua.memory.ShmMapping", "aquad.core.arbiter.Arbiter._free",
                 "aquad.core.arbiter.Arbiter.drop_tenant"):
        assert must in names, must


@pytest.mark.parametrize("dotted", cited())
def test_every_cited_name_exists(dotted):
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"docs/architecture.md cites `{dotted}`, which is not in the code: {exc}")
