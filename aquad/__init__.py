"""aquad: the aqua daemon. Owns spare device memory, leases it to tenants.

Layout: core/ holds the decisions as plain deterministic objects (allocator,
lease table, tenant registry, placer, scheduler, arbiter); backends/ makes the memory;
server.py is the trio + ZeroMQ shell; main.py the command line.
"""

__version__ = "0.1.0"
