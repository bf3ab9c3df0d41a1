"""Quotas through real processes and sockets: one user cannot take the daemon.

Regression for the hostile-tenant finding where one uid held every byte
(2,445 leases) and all 1,024 tenant slots. Tenants run as other users, so
this needs root (as the suite does in CI).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import subprocess
import sys

import pytest

from .conftest import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to run tenants as other users")

MiB = 2**20
GREEDY, OTHER = 1001, 1002  # uids; both in the socket's group

CONFIG = """
[aquad]
log_level = "info"

[quota.default]
bytes = "16MiB"
leases = 6
tenants = 3

[quota.uid.1002]
bytes = "32MiB"
"""

# Leases 3 MiB blocks until refused (bytes), then small ones (leases), then
# registers more tenants until refused; reports each refusal, holds everything.
GREEDY_TENANT = """
    import json, sys, aqua

    def until_refused(take):
        got = []
        try:
            while True:
                got.append(take())
        except aqua.LimitExceeded as exc:
            print(json.dumps({"got": len(got), **exc.details}), flush=True)
        return got

    client = aqua.connect(tenant="greedy", device=0)
    held = until_refused(lambda: client.lease(3 << 20, populate=False))
    held += until_refused(lambda: client.lease(1, populate=False))
    more = until_refused(lambda: aqua.connect(tenant="greedy-more", device=1))
    sys.stdin.readline()
"""

OTHER_TENANT = """
    import aqua
    client = aqua.connect(tenant="bystander", device=0)
    leases = [client.lease(16 << 20, populate=False) for _ in range(2)]
    more = [aqua.connect(tenant="bystander-more", device=1) for _ in range(2)]
    print("ok", sum(l.nbytes for l in leases), len(more) + 1, flush=True)
    input()
"""


def test_one_uid_cannot_take_every_byte_lease_and_slot(start_daemon, tenants, sockdir):
    group_gid = pwd.getpwnam("nobody").pw_gid
    group = grp.getgrgid(group_gid).gr_name
    config = os.path.join(sockdir, "aquad.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    daemon = start_daemon("--config", config, "--socket-group", group)

    greedy = tenants(daemon, GREEDY_TENANT, user=(GREEDY, group_gid))
    refusals = [json.loads(greedy.readline()) for _ in range(3)]
    assert refusals == [
        {"got": 5, "quota": "quota.default", "resource": "bytes", "limit": 16 * MiB,
         "used": 15 * MiB, "requested": 3 * MiB},
        {"got": 1, "quota": "quota.default", "resource": "leases", "limit": 6, "used": 6,
         "requested": 1},
        {"got": 2, "quota": "quota.default", "resource": "tenants", "limit": 3, "used": 3,
         "requested": 1},
    ]
    # Another user still leases (up to its own, larger quota) and registers.
    bystander = tenants(daemon, OTHER_TENANT, user=(OTHER, group_gid))
    assert bystander.readline() == f"ok {32 * MiB} 3"

    ctl = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                          "status"], capture_output=True, text=True, timeout=30)
    assert ctl.returncode == 0, ctl.stderr
    for row in (r"uid 1001\s+quota.default\s+3 / 3\s+6 / 6\s+15.1 MiB / 16.0 MiB",
                r"uid 1002\s+quota.uid.1002\s+3 / 3\s+2 / 6\s+32.0 MiB / 32.0 MiB",
                r"other uids\s+quota.default\s+- / 3\s+- / 6\s+- / 16.0 MiB"):
        assert re.search(row, ctl.stdout), ctl.stdout
    bystander.send("done")
    assert bystander.finish()[0] == 0

    # The greedy user's processes exit: everything it held is given back.
    greedy.kill()
    assert wait_until(lambda: [r["uid"] for r in daemon.status()["quotas"]["uids"]]
                      == [OTHER], 10), daemon.status()["quotas"]
