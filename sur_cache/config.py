"""One frozen dataclass per stage, built from the CLI options and passed down to functions.

Config flows one way: click options -> these dataclasses -> the stage functions. Nothing here is global.
"""

from __future__ import annotations
