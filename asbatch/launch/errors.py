"""The launcher's error types."""


class LaunchError(RuntimeError):
    """Submission, cancel or retry could not be done; the message says why and what to do."""


class DamagedStateError(LaunchError):
    """A file asbatch wrote (a sweep's manifest) is damaged, truncated or hand-edited; the message names it."""
