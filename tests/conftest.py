"""Shared helpers: assemble inline guest sources and run them in a mode."""
import signal
import subprocess
import sys

import pytest

import hv
import hv.vmm.modes
from hv.asm import assemble_source

MODES = tuple(hv.vmm.modes.MODES)     # every mode; "qemu" is the oracle

# The asm/ library with the guest's own GDT/TSS and IDT loaded; a test's
# source continues after it.
LIB = """
    jmp main
.include "serial.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
main:
    call gdt_init
    call idt_init
"""


def image(src: str) -> bytes:
    return assemble_source(src, name="<test>").code


def run_src(src: str, mmu: str = "native", **kw) -> hv.Result:
    return hv.run("test", mmu=mmu, image=image(src), **kw)


def hv_process(*args: str, ignore=(), **kw) -> subprocess.Popen:
    """`python -m hv ARGS` with text pipes, and Ctrl-C and SIGTERM at their
    defaults, as a terminal starts it (or ignored: those in `ignore`). A
    shell without job control (`make test &` in a script) starts the
    suite with SIGINT ignored, and a child keeps an ignored signal across
    exec, so hv would ignore the tests' Ctrl-C."""
    def dispositions():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN if signum in ignore else signal.SIG_DFL)
    return subprocess.Popen([sys.executable, "-m", "hv", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=dispositions, **kw)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param
