; ptemod.s -- a live PTE rewritten, INVLPG, a read through it: 2000 rounds.
;
; What a guest's page-table updates cost a VMM: the ptemod nanobenchmark of
; Adams & Agesen's comparison of software and hardware techniques for x86
; virtualization (ASPLOS 2006), here to compare shadow paging with EPT.
; Under shadow paging the guest's tables are write-protected, so every
; round costs three VM exits: the PTE write (an EXCEPTION_NMI exit, emulated
; by the VMM: mmu_pte_write, which zaps the shadow PTE), the INVLPG (an
; INVLPG exit) and the read after it (an EXCEPTION_NMI exit for the hidden
; fault that builds the shadow PTE again: pf_fixed). The table is used for
; a walk between two writes, so it is never unshadowed as flooded. Under EPT
; none of the three is an exit: the round costs a TLB miss and its 2-D walk.
;
; The guest builds its own address space (paging.s): [0, 16 MiB)
; identity-mapped with 2 MiB pages (image, stacks, page-table pool, the two
; frames below), and one 4 KiB page at TEST_VA whose PTE, in a page table of
; the pool, is the one rewritten. Frame f (FRAME_0 + f * 4 KiB, f = 0 or 1)
; holds V(f, o) = TAG + f * 2^16 + o at offsets o = 0 and o = LAST_QWORD.
; TEST_VA is read once on frame 0 before the rounds, so the table is live
; (shadowed, in shadow mode). Then, for round r = 1 .. ROUNDS:
;
;   1. the PTE is rewritten to map frame f = r mod 2 (one `mov` to the
;      PTE, through the identity map)
;   2. INVLPG TEST_VA: the old translation may be cached
;   3. TEST_VA is read at both offsets: V(f, 0) and V(f, LAST_QWORD) (two
;      checks)
;
; The rounds are inline, with their state in registers: they touch their
; code page, the page table and TEST_VA and nothing else (unless a check
; fails), so what a round costs is the PTE update's alone, even where the
; VMM flushes the whole TLB after it (shadow: the code page misses again).
;
;   mark 1 -> 2  the rounds: ROUNDS PTE writes, INVLPGs and TLB misses of
;                TEST_VA (each walk 4 levels down to the rewritten PTE)
;   after 2      the PTE holds the last round's frame, present, writable
;                and accessed (the walks set A; nothing wrote the page, so
;                D is clear); the frames hold their values
;
; Every check is counted (asm/check.s). The console is quiet between the
; marks. Then a line for the address space, one for the rounds and "ptemod:
; ok (2000 rounds, 4007 checks)" with exit code 0; if any check failed, a
; "FAIL" line for each (the first ten), a "FAILED" line and exit code 1. An
; unexpected exception exits with 0xEE (idt.s). Needs 16 MiB of RAM. Only
; vCPU 0 runs the test (the library has one TSS); any others halt.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"

ROUNDS          = 2000
IDENT_END       = 0x1000000     ; [0, 16 MiB) identity-mapped with 2 MiB pages
TEST_VA         = 0x40000000    ; virtual: the page whose PTE is rewritten
FRAME_0         = 0xA00000      ; frame f at FRAME_0 + f * 4 KiB, f = 0, 1
TAG             = 0x50544d4f00000000    ; V(f, o) = TAG + f * 2^16 + o
LAST_QWORD      = PAGE_SIZE - 8

FLAGS_RW        = PTE_P | PTE_RW

main:
    test rdi, rdi               ; rdi = this vCPU's index
    jnz park
    call gdt_init
    call idt_init

    xor ecx, ecx                ; the frames' values, through the boot
.Lfill:                         ; tables' identity map
    call frame_of               ; rdi = frame f
    call value_of               ; rax = V(f, 0)
    mov qword ptr [rdi], rax
    add rax, LAST_QWORD
    mov qword ptr [rdi + LAST_QWORD], rax
    inc ecx
    cmp ecx, 2
    jb .Lfill

    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + root], rax
    mov rdi, rax
    mov rsi, TEST_VA
    mov edx, FRAME_0
    call pt_map_4k              ; rax = the PTE, in a page table of the pool
    mov qword ptr [rip + pte], rax
    mov cr3, rdi
    xor ecx, ecx                ; frame 0: the table is live from now on
    call check_page

; -- the rounds: the console is quiet from mark 1 to mark 2 ----------------------
    mov ebx, 1
    call hv_mark
    mov r12, qword ptr [rip + pte]
    mov r13, TEST_VA
    mov r15, TAG
    xor r8d, r8d                ; checks passed
    mov r14d, 1                 ; r, the round
.Lround:                        ; inline: no calls, no stack, no data but the
    mov eax, r14d               ; PTE and TEST_VA (see the top of the file)
    and eax, 1                  ; f = r mod 2
    mov ecx, eax
    shl eax, 12
    add eax, FRAME_0 | FLAGS_RW
    mov qword ptr [r12], rax    ; 1. rewrite the live PTE
    invlpg [r13]                ; 2. drop the old translation
    shl ecx, 16
    lea rdx, [r15 + rcx]        ; V(f, 0)
    mov rax, qword ptr [r13]    ; 3. read through the new one
    cmp rax, rdx
    jne .Lround_bad_first
    inc r8
.Lround_last:
    add rdx, LAST_QWORD         ; V(f, LAST_QWORD)
    mov rax, qword ptr [r13 + LAST_QWORD]
    cmp rax, rdx
    jne .Lround_bad_last
    inc r8
.Lround_next:
    inc r14d
    cmp r14d, ROUNDS
    jbe .Lround
    mov ebx, 2
    call hv_mark
    mov rax, r8                 ; the rounds' checks that passed
    xor edx, edx
    call check_tally

; -- after the rounds ------------------------------------------------------------
    mov ecx, ROUNDS & 1         ; the last round's frame
    call frame_of
    mov rdx, rdi
    or rdx, FLAGS_RW | PTE_A
    mov rdi, r12
    mov rax, qword ptr [rdi]
    lea rsi, [rip + msg_what_pte]
    call check
    xor ecx, ecx                ; the frames, through the identity map
.Lframes:
    call frame_of
    call value_of
    mov rdx, rax
    mov rax, qword ptr [rdi]
    lea rsi, [rip + msg_what_frame]
    call check
    add rdx, LAST_QWORD
    add rdi, LAST_QWORD
    mov rax, qword ptr [rdi]
    call check
    inc ecx
    cmp ecx, 2
    jb .Lframes

    lea rsi, [rip + msg_space]
    mov rdx, qword ptr [rip + root]
    mov rcx, r12
    call sayf
    lea rsi, [rip + msg_rounds]
    mov edx, ROUNDS
    call sayf
    lea rsi, [rip + msg_ok]
    mov edx, ROUNDS
    mov rcx, qword ptr [rip + check_count]
    call check_verdict

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

; A round's wrong values: report them (check counts them) and go on.
.Lround_bad_first:
    mov rdi, r13
    lea rsi, [rip + msg_what_page]
    call check
    jmp .Lround_last
.Lround_bad_last:
    lea rdi, [r13 + LAST_QWORD]
    lea rsi, [rip + msg_what_page]
    call check
    jmp .Lround_next

; frame_of: rcx = f -> rdi = FRAME_0 + f * 4 KiB. Preserves the rest.
frame_of:
    mov rdi, rcx
    shl rdi, 12
    add rdi, FRAME_0
    ret

; value_of: rcx = f -> rax = V(f, 0). Preserves the rest.
value_of:
    mov rax, rcx
    shl rax, 16
    push rdx
    mov rdx, TAG
    add rax, rdx
    pop rdx
    ret

; check_page: rcx = f. Reads TEST_VA at offsets 0 and LAST_QWORD and checks
; they hold frame f's values. Preserves every register.
check_page:
    push rax
    push rdx
    push rsi
    push rdi
    call value_of
    mov rdx, rax
    mov rdi, TEST_VA
    lea rsi, [rip + msg_what_page]
    mov rax, qword ptr [rdi]
    call check
    add rdx, LAST_QWORD
    add rdi, LAST_QWORD
    mov rax, qword ptr [rdi]
    call check
    pop rdi
    pop rsi
    pop rdx
    pop rax
    ret

check_prefix:   .asciz "ptemod: "
msg_space:      .asciz "own page tables, cr3=%x: 16 MiB identity-mapped with 2 MiB pages, 0x40000000 mapped by the PTE at %x\n"
msg_rounds:     .asciz "%d rounds: the PTE rewritten to the other frame (0xa00000, 0xa01000), invlpg, the page read back; the PTE and the frames checked after\n"
msg_ok:         .asciz "ok (%d rounds, %d checks)\n"
msg_what_page:  .asciz "page data after the PTE update and invlpg"
msg_what_pte:   .asciz "the PTE after the rounds (A set by the walks)"
msg_what_frame: .asciz "frame data read through the identity map"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root:           .quad 0         ; the PML4
pte:            .quad 0         ; the address of TEST_VA's PTE
.align 4096
