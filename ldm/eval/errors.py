"""The one error type of the evaluation tools: printed by scripts as a single line."""
from __future__ import annotations

from ldm.errors import LdmError


class EvalError(LdmError, ValueError):
    """Bad evaluation input: missing or empty folders, too few images, missing weights."""
