"""Shared helpers: assemble inline guest sources and run them in a mode."""
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


@pytest.fixture(params=MODES)
def mode(request):
    return request.param
