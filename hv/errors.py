"""Errors hv reports to users: one clear line each, never a traceback."""


class HvError(Exception):
    """Base of every error hv reports to a user (CLI exit status 2)."""


class AsmError(HvError):
    """A guest source that cannot be assembled correctly.

    str() is ``file:line: message: statement``, the form compilers use.
    """

    def __init__(self, message: str, file: str = "<input>", line: int = 0, statement: str = ""):
        self.message, self.file, self.line, self.statement = message, file, line, statement
        where = f"{file}:{line}" if line else file
        text = f"{where}: {message}"
        if statement:
            text += f": {statement.strip()}"
        super().__init__(text)


class InvariantError(HvError):
    """A VMM invariant does not hold: a bug in hv (checked after every exit
    with --check-invariants, and always where the code states it)."""


class GuestEscape(HvError):
    """A guest paging structure or address points outside the guest's
    memory: the VM stops (reason `escape`)."""
