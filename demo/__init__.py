"""aqua's demo and burst replay: tools that drive real tenants, not part of the library.

`aqua-demo` (`main.py`) runs the README's demo; `replay.py` replays a burst on
real engine tenants under both scheduling modes; `report.py` and `stats.py`
summarise and print what they measured (the simulator reports the same way).
"""
