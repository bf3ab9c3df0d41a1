"""protocol/README.md and the message definitions say the same thing.

The structs in protocol/messages.py (requests) and protocol/replies.py
(results, events) are what the daemon validates and the client decodes; the
README is what implementers read. Every operation, argument, requirement,
result field, event, event field and error code must appear in both, the
same way."""

from __future__ import annotations

import pathlib
import re

import msgspec
import pytest

from aqua_protocol import EVENTS, OPS, ErrorCode, replies

README = (pathlib.Path(__file__).resolve().parent.parent / "protocol" / "README.md").read_text()


def _section(title_re: str) -> str:
    """The text under a heading matching `title_re`, up to the next heading
    of the same or a higher level."""
    match = re.search(rf"^(#+) {title_re}\s*$", README, flags=re.M)
    assert match, f"protocol/README.md has no section {title_re!r}"
    level = len(match.group(1))
    rest = README[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[:end.start()] if end else rest


def _table(text: str, first_header: str) -> list[list[str]]:
    """Rows (cells stripped) of the first table whose first header cell is
    `first_header`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    return []


def _name(cell: str) -> str:
    return cell.strip("`")


def test_every_operation_is_listed_with_whether_it_needs_hello():
    rows = {_name(r[0]): r[1] for r in _table(_section(r"4\. Operations"), "op")}
    assert set(rows) == set(OPS)
    for name, cls in OPS.items():
        assert rows[name] == ("yes" if cls.needs_tenant else "no"), name


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_operations_arguments_are_documented_as_defined(name):
    section = _section(rf"`{name}`")
    rows = _table(section, "argument")
    fields = msgspec.structs.fields(OPS[name])
    if not fields:
        assert not rows and "No arguments" in section, name
        return
    documented = {_name(r[0]): r[-1] for r in rows}
    assert set(documented) == {f.name for f in fields}, name
    types = {_name(r[0]): r[1] for r in rows}
    for f in msgspec.inspect.type_info(OPS[name]).fields:
        assert (documented[f.name] == "required") == f.required, (name, f.name)
        assert types[f.name] == _wire_type(f.type), (name, f.name)


_WIRE_TYPES = {msgspec.inspect.IntType: "int", msgspec.inspect.StrType: "str",
               msgspec.inspect.FloatType: "float", msgspec.inspect.BoolType: "bool"}


def _wire_type(t: msgspec.inspect.Type) -> str:
    """An argument's type as the tables spell it: `int`, `array of int`, `str or nil`."""
    if isinstance(t, msgspec.inspect.UnionType):
        (value,) = [m for m in t.types if not isinstance(m, msgspec.inspect.NoneType)]
        return f"{_wire_type(value)} or nil"
    if isinstance(t, msgspec.inspect.ListType):
        return f"array of {_wire_type(t.item_type)}"
    return _WIRE_TYPES[type(t)]


def test_every_event_is_documented():
    rows = _table(_section(r"5\. Events"), "event")
    assert {_name(r[0]) for r in rows} == set(EVENTS)


def test_every_wire_error_code_is_documented():
    rows = _table(_section(r"6\. Error codes"), "code")
    assert {_name(r[0]) for r in rows} == {code.value for code in ErrorCode}


def _fields(struct: type) -> set[str]:
    return {f.name for f in msgspec.structs.fields(struct)}


# Ops whose section has a result table; the others say in words what they reply.
RESULT_TABLES = ["hello", "bye", "lease", "release", "turn", "subscribe"]


@pytest.mark.parametrize("name", RESULT_TABLES)
def test_each_result_table_lists_the_fields_of_the_ops_result_struct(name):
    rows = _table(_section(rf"`{name}`"), "result")
    assert {_name(r[0]) for r in rows} == _fields(OPS[name].result), name


def test_every_op_without_a_result_table_names_its_struct_in_words():
    # `status`: a map (docs/status-schema.md); the rest: "as for `lease`", {}, 4.3.
    for name, cls in OPS.items():
        if name not in RESULT_TABLES:
            assert cls.result is replies.StatusReport or issubclass(cls.result, replies.Result)


def _backticked(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", text))


def test_every_event_field_is_documented():
    rows = {_name(r[0]): r[1] for r in _table(_section(r"5\. Events"), "event")}
    kinds = _table(_section(r"5\. Events"), "kind")
    for name, struct in EVENTS.items():
        documented = _backticked(rows[name])
        if struct is replies.ReclaimReport:
            documented = _backticked(_section(r"4\.3 Elastic memory: reclaim, drain, lend, move"))
        if struct is replies.Feed:
            documented |= {f for row in kinds for f in _backticked(row[1])}
            assert {_name(row[0]) for row in kinds} == {
                "tenant_joined", "tenant_left", "slice_granted", "slice_preempted",
                "slice_revoked"}
        missing = _fields(struct) - documented
        assert not missing, (name, missing)
        if struct not in (replies.Feed, replies.ReclaimReport):
            assert documented == _fields(struct), name
