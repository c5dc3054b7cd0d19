"""One base class for errors the user can fix.

Every stage raises a subclass with a one-line message naming the file or field and what to do;
`msprior.cli.main` catches `UserError` once and prints it without a traceback (exit code 2).
"""


class UserError(ValueError):
    """Input the user can fix; the message is one line naming the file or field and what to do."""
