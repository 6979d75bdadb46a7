"""The launcher's error types."""


class LaunchError(RuntimeError):
    """Submission, cancel or retry could not be done; the message says why and what to do."""


class UnmetUpstreamError(LaunchError):
    """The stages asked for need upstream runs that are neither finished nor queued: bad input, found while
    planning, before anything is written."""


class DamagedStateError(LaunchError):
    """A file asbatch wrote (a sweep's manifest) is damaged, truncated or hand-edited; the message names it."""
