"""sur-cache: cache the frozen models' features once, then train SUR-adapters from the cache."""

import logging

__version__ = "0.1.0"

# At import, bitsandbytes probes for an optional 4-bit CPU kernel (from the `kernels` package) and warns when it is
# missing. sur-cache never quantizes to 4 bits, so the warning would only be noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
