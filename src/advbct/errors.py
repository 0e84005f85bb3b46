"""The project's error base: every refusal of user input (a bad config, data, checkpoint, statistics file, method,
gallery request or gate decision) derives from ``AdvbctError``, so each CLI maps the whole family to a one-line
message and exit status 2 in one place, and an unexpected error still shows its traceback.

It derives from ``ValueError`` because each of these is a value the caller passed that the project cannot use.
"""


class AdvbctError(ValueError):
    """Input the project refuses; the message names what is wrong in one line."""
