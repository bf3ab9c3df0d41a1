"""The lease journal: crash-consistent replay, compaction, recovery rules."""

from __future__ import annotations

import os

import pytest

from aquad.core.adoption import JournaledLease
from aquad.journal import Journal, replay
from aquad.rundir import StartupError


def grant(n: int, pid: int = 1) -> JournaledLease:
    return JournaledLease(f"Lid{n:08d}", f"aqua-x-{n:024x}", 4096 * n, 0, os.getuid(), os.getgid(),
                 pid, f"{n:032x}", "llama")


def written(journal: Journal, *grants: JournaledLease, freed: tuple[str, ...] = ()) -> bytes:
    for g in grants:
        journal.granted(g)
    for lease in freed:
        journal.freed(lease)
    journal.flush()
    with open(journal.path, "rb") as f:
        return f.read()


def test_grants_minus_frees_survive_a_restart(tmp_path):
    journal = Journal(str(tmp_path / "s.sock"))
    assert journal.load() == {}
    journal.start([])
    written(journal, grant(1), grant(2), grant(3), freed=(grant(2).lease,))
    assert list(Journal(journal.path[:-len(".journal")]).load().values()) == [grant(1), grant(3)]


def test_a_torn_last_record_is_ignored_and_what_follows_corruption_too():
    j = Journal("/nonexistent/s.sock")
    lines = [j._grant_record(grant(n)) for n in (1, 2, 3)]
    from aquad.journal import _line

    data = b"".join(_line(r) for r in lines)
    assert list(replay(data)) == [grant(n).lease for n in (1, 2, 3)]
    assert list(replay(data[:-5])) == [grant(1).lease, grant(2).lease]  # torn: no newline
    second = len(_line(lines[0]))
    bad = data[:second + 12] + b"X" + data[second + 13:]  # one flipped byte in record 2
    assert list(replay(bad)) == [grant(1).lease]


def test_start_compacts_to_the_leases_kept(tmp_path):
    journal = Journal(str(tmp_path / "s.sock"))
    journal.start([])
    written(journal, grant(1), grant(2), freed=(grant(1).lease,))
    journal.start([grant(2)])
    with open(journal.path, "rb") as f:
        assert f.read().count(b"\n") == 1
    assert list(journal.load().values()) == [grant(2)]
    journal.close()  # a clean stop: nothing left to adopt
    assert journal.load() == {}


def test_a_planted_link_is_refused(tmp_path):
    target = tmp_path / "precious"
    target.write_text("x")
    os.symlink(target, tmp_path / "s.sock.journal")
    with pytest.raises(StartupError, match="symlink"):
        Journal(str(tmp_path / "s.sock")).load()
