"""hv: a toy x86-64 hypervisor that shows what MMU virtualization costs.

    >>> import hv
    >>> r = hv.run("hello", mmu="native")
    >>> r.console, r.exit_code, r.exits, r.tlb["walks"]
"""
from .api import Result, load_guest, run
from .errors import AsmError, HvError

__all__ = ["run", "load_guest", "Result", "HvError", "AsmError"]
