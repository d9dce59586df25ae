"""User-facing errors: every bad input becomes one of these, printed as one clear line."""
from __future__ import annotations


class LdmError(Exception):
    """Base of all errors a user can cause (bad config, checkpoint, prompt, size...)."""


class CheckpointError(LdmError):
    """A checkpoint that cannot be read, is unsafe, or does not match its model."""


class SamplingError(LdmError, ValueError):
    """Bad sampling options (steps, sampler, guidance, sizes, shapes)."""
