# A corpus of typical kernel code, assembled by hv.asm and by GNU as in
# tests/test_asm.py: the two must agree byte for byte. GNU-as-only spellings
# are avoided on purpose: `mov ds, eax` (keystone adds a harmless 0x66 to
# `mov ds, ax`), `int3` (GNU as turns `int 3` into int3), `offset x` for
# addresses (GNU as reads a bare `x` as a memory operand), explicit .align fill.
start:
    cli
    mov rax, cr0
    or eax, 0x80000001
    mov cr0, rax
    mov rax, cr4
    or rax, 1 << 5
    mov cr4, rax
    lea rax, [rip + pml4]
    mov cr3, rax
    mov rbx, cr3
    invlpg [rax]
    invlpg [rbx + 0x1000]
    lgdt [rip + gdtr]
    lidt [rip + idtr]
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov ax, 0x10
    mov ds, eax
    mov es, eax
    mov ss, eax
    push 0x08
    lea rax, [rip + far_target]
    push rax
    retfq
far_target:
    mov rsp, 0x200000
    push rbp
    mov rbp, rsp
    push rax
    push rbx
    push r12
    push r15
    pop r15
    pop r12
    pop rbx
    pop rax
    pushfq
    popfq
    pushf
    popf
    mov rbx, [0x300000]
    mov [0x300008], rbx
    mov rax, [0x300000]
    mov qword ptr [0x300010], 5
    mov dword ptr [0x300018], 0x12345678
    mov byte ptr [0x300020], 0xff
    mov rcx, [rbx*8 + 0x300000]
    mov rdx, [rbx + rcx*4 + 0x10]
    mov rdx, [rbp - 8]
    mov rdx, [rsp + 16]
    mov rdx, [r13]
    mov rdx, [r12 + r13*2]
    movabs rax, 0x1122334455667788
    mov rax, 0xffffffff
    mov rax, -1
    mov eax, 0xffffffff
    mov r8d, 7
    and rax, 0xfffffffffffff000
    and rax, -4096
    xor eax, eax
    test rax, rax
    cmp rax, 0x7f
    cmp rax, 0x80
    add rsp, 8
    sub rsp, 0x100
    imul rax, rbx, 5
    shl rax, 12
    shr rax, 1
    sar rax, cl
    mov rdi, 0x300000
    mov rcx, 512
    xor eax, eax
    rep stosq
    cld
    rep movsb
    repe cmpsb
    lock cmpxchg [rdi], rcx
    lock xadd [rdi], rax
    lock inc qword ptr [rdi]
    xchg rax, rbx
    mov dx, 0x3f8
    out dx, al
    in al, dx
    out 0x80, al
    in al, 0x60
    vmcall
    cpuid
    rdtsc
    mov rax, [rip + counter]
    inc qword ptr [rip + counter]
    lea rsi, [rip + message]
    mov al, byte ptr [rsi]
    movzx eax, byte ptr [rsi + 1]
    movsx rax, word ptr [rsi]
    movsxd rax, dword ptr [rsi]
    call func
    call backward
    jmp forward_short
forward_short:
    jz forward_short
    jnz start
    jc far_away
    ja start
    jle forward_short
    jrcxz forward_short
    loop forward_short
    sete al
    cmovz rax, rbx
    mov rax, offset message
    mov rbx, offset message + 8
    jmp rax
    call rbx
    call qword ptr [rip + vector]
    jmp qword ptr [rax*8 + 0x300000]
    int3
    ud2
    sti
    hlt
    iretq
backward:
    nop
    ret
func:
    enter 16, 0
    leave
    ret 8
    .fill 200, 1, 0x90
far_away:
    swapgs
    syscall
    sysretq
    mov rax, dr7
    mov dr7, rax
    mov cr8, rax
    wbinvd
    pause
    mfence
    xor r15, r15
    bswap eax
    bt rax, 3
    bts qword ptr [rdi], 5
    not rax
    neg rax
    mul rbx
    div rcx
    cqo
    cdqe
    hlt
    .balign 16, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
idtr:
    .word 0
    .quad 0
    .p2align 3, 0
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
gdt_end:
counter: .quad 0
vector: .quad func
message: .asciz "hello, world\n"
    .ascii "tab\there", "q\"uote"
    .string "s"
    .byte 1, 2, 0xff, -1, 'A', '\n'
    .word 0xffff, -2
    .short 3
    .long 0xffffffff, -1, gdt
    .int 7
    .zero 3
    .skip 2, 0xaa
    .space 2
    .fill 3, 2, 0x1234
    .fill 2, 8, 0x12345678
    .balign 4096, 0
pml4:
    .quad pdpt + 3
pdpt:
    .quad 0x83
KERNEL_BASE = 0x100000
.equ STACK_SIZE, 4096
    .quad KERNEL_BASE + STACK_SIZE
    .long (gdt_end - gdt) / 8, 7 % 3, 1 << 4, 0xff & 0x0f, 1 | 6, 5 ^ 1, ~0, -7 / 2
