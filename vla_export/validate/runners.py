"""Moved to `vla_export.runtime` (the runner layer below every stage); kept so older imports keep working."""

from vla_export.runtime import *  # noqa: F401,F403
from vla_export.runtime import __all__  # noqa: F401
