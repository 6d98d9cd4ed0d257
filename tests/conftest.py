"""Shared helpers: assemble inline guest sources and run them in a mode."""
import pytest

import hv
from hv.asm import assemble_source

MODES = ("native", "qemu")

# A minimal IDT for tests that are not about the asm/ library: idt_setup
# installs `rax` as the handler of vector `rcx` (interrupt gate, CS 0x08) and
# loads the IDT.
IDT_LIB = """
idt_setup:
    lea rdi, [rip + idt_table]
    shl rcx, 4
    add rdi, rcx
    mov rdx, rax
    and edx, 0xffff
    mov rcx, 0x8e0000080000
    or rdx, rcx
    mov rcx, rax
    shr rcx, 16
    and rcx, 0xffff
    shl rcx, 48
    or rdx, rcx
    mov qword ptr [rdi], rdx
    mov rcx, rax
    shr rcx, 32
    mov qword ptr [rdi + 8], rcx
    lea rax, [rip + idt_table]
    mov qword ptr [rip + idtr + 2], rax
    lidt [rip + idtr]
    ret
exit_al:
    mov dx, 0xf4
    out dx, al
    hlt
.align 16
idtr:
    .word 4095
    .quad 0
.align 4096
idt_table:
    .zero 4096
"""


def image(src: str) -> bytes:
    return assemble_source(src, name="<test>").code


def run_src(src: str, mmu: str = "native", **kw) -> hv.Result:
    return hv.run("test", mmu=mmu, image=image(src), **kw)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param
