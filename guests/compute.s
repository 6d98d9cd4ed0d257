; compute.s -- a compute-bound loop with next to no TLB misses.
;
; Millions of instructions on registers and a small array: the case where
; memory virtualization should cost (almost) nothing.
;
; The guest builds its own address space (paging.s): [0, 16 MiB)
; identity-mapped with 2 MiB pages (image, stacks, page-table pool) and a
; small array, ARRAY_QWORDS = 1024 qwords in two 4 KiB pages at ARRAY_VA
; (zeroed frames from page_alloc). Then it runs ITERATIONS rounds of:
;
;   x   = xorshift64(x)                     (x ^= x << 13, x >> 7, x << 17)
;   i   = x mod 1024
;   a[i] = rol(a[i], 5) + x
;   acc = acc * PCG_MUL + a[i ^ 0x2AA]      (mod 2^64)
;
; 19 instructions a round, about 10 million in all, touching three
; translations (the code's and the array's two pages; the stack is not
; used). The result, acc ^ x ^ (the sum of the array), must equal CHECKSUM,
; which a model of the loop in Python computed.
;
;   mark 1 -> 2  the loop: registers and the array only, no calls, no
;                console; 4 TLB misses: the first read of each array page,
;                and its first write (a walk again, to set D)
;
; Then "compute: ok (524288 iterations, checksum 0x21bd79c2def47bf2)" and
; exit code 0; on a wrong result a FAIL line with the value, a "FAILED" line
; and exit code 1. An unexpected exception exits with 0xEE (idt.s). Needs
; 16 MiB of RAM. Only vCPU 0 runs the test (the library has one TSS); any
; others halt.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"

IDENT_END       = 0x1000000     ; [0, 16 MiB) identity-mapped with 2 MiB pages
ARRAY_VA        = 0x40000000    ; virtual: the array, two 4 KiB pages
ARRAY_QWORDS    = 1024
ARRAY_MASK      = ARRAY_QWORDS - 1
PARTNER         = 0x2AA         ; the element the accumulator reads: i ^ PARTNER
ITERATIONS      = 1 << 19
SEED            = 0x9E3779B97F4A7C15    ; x at the start (xorshift64 needs x != 0)
ACC_START       = 0x243F6A8885A308D3
PCG_MUL         = 0x5851F42D4C957F2D
CHECKSUM        = 0x21bd79c2def47bf2    ; acc ^ x ^ sum(a) after ITERATIONS rounds

FLAGS_RW        = PTE_P | PTE_RW

main:
    test rdi, rdi               ; rdi = this vCPU's index
    jnz park
    call gdt_init
    call idt_init

    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov rdi, rax
    mov rsi, ARRAY_VA
    call page_alloc             ; zeroed
    mov rdx, rax
    call pt_map_4k
    add rsi, PAGE_SIZE
    call page_alloc
    mov rdx, rax
    call pt_map_4k
    mov cr3, rdi

; -- the loop --------------------------------------------------------------------
    mov ebx, 1
    call hv_mark
    mov r8, ARRAY_VA
    mov rbx, SEED               ; x
    mov r9, ACC_START           ; acc
    mov r10, PCG_MUL
    mov ecx, ITERATIONS
.Lround:
    mov rax, rbx                ; x = xorshift64(x)
    shl rax, 13
    xor rbx, rax
    mov rax, rbx
    shr rax, 7
    xor rbx, rax
    mov rax, rbx
    shl rax, 17
    xor rbx, rax
    mov edx, ebx                ; i
    and edx, ARRAY_MASK
    mov rax, qword ptr [r8 + rdx*8]
    rol rax, 5
    add rax, rbx
    mov qword ptr [r8 + rdx*8], rax
    xor edx, PARTNER
    imul r9, r10
    add r9, qword ptr [r8 + rdx*8]
    dec ecx
    jnz .Lround
    mov r11, rbx                ; the hv_mark call below needs rbx
    mov ebx, 2
    call hv_mark

; -- the checksum ------------------------------------------------------------------
    xor eax, eax
    xor ecx, ecx
.Lsum:
    add rax, qword ptr [r8 + rcx*8]
    inc ecx
    cmp ecx, ARRAY_QWORDS
    jb .Lsum
    xor rax, r9
    xor rax, r11
    mov rdx, CHECKSUM
    cmp rax, rdx
    jne .Lfailed
    lea rsi, [rip + msg_ok]
    mov rcx, rdx
    mov edx, ITERATIONS
    call sayf
    mov al, 0
    call exit
.Lfailed:
    lea rsi, [rip + msg_fail]
    mov rcx, rdx
    mov rdx, rax
    call sayf
    lea rsi, [rip + msg_failed]
    call say
    mov al, 1
    call exit

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

check_prefix:   .asciz "compute: "
msg_ok:         .asciz "ok (%d iterations, checksum %x)\n"
msg_fail:       .asciz "FAIL checksum: got %x, expected %x\n"
msg_failed:     .asciz "FAILED\n"
