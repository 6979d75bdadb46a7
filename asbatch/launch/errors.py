"""The launcher's one error type."""


class LaunchError(RuntimeError):
    """Submission, cancel or retry could not be done; the message says why and what to do."""
