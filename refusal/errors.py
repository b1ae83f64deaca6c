"""The one exception type for errors that users cause."""


class RefusalLabError(Exception):
    """A problem with the user's input (bad path, bad file, empty set, mismatch).

    The CLI prints it as a one-line message and exits with status 2.
    """
