; smp.s -- vCPUs sharing page tables, with a TLB shootdown every round.
;
; Every vCPU starts at the entry (rdi = its index, rsi = the number of
; vCPUs; 1 to SMP_MAX_VCPUS = 16, README.md "Guest boot ABI"). vCPU 0 loads
; the library's GDT, TSS and IDT and builds the shared address space
; (paging.s): [0, 16 MiB) identity-mapped with 2 MiB pages (image, stacks,
; page-table pool, every frame below), the shared page SHARED_VA, first on
; frame 0 of SHARED_FRAMES, and PRIV_PAGES = 4 private pages for each vCPU i
; at PRIV_VA + i * PRIV_STRIDE, all in one page table; it writes each
; shared frame's contents. The others wait at a barrier, then every vCPU
; loads vCPU 0's IDT (idt_load) and its CR3, and they meet at a second
; barrier. Then ROUNDS rounds, r = 1 .. ROUNDS:
;
;   1. vCPU 0 remaps the shared page to frame r (pt_map_4k rewrites the
;      PTE; the old translation may still be in any vCPU's TLB) and sends
;      the "IPI": it writes r to ipi_round, a flag every vCPU polls
;   2. every vCPU, on seeing it, runs INVLPG for the shared page (the TLB
;      shootdown), reads it and checks that it sees frame r (three qwords,
;      which differ in every frame), and writes its own slot in it
;   3. every vCPU writes round r's value into each of its private pages
;      and reads back every value the rounds so far left in them
;   4. a barrier (asm/sync.s: per-vCPU flags, sense-reversing): the
;      shootdown's acknowledgement; after it vCPU 0 checks, through the
;      identity map, that frame r got every vCPU's slot
;
; Every variable has one writer (ipi_round: vCPU 0; a vCPU's flags,
; counters and pages: that vCPU), so the protocol is correct for any
; interleaving of the vCPUs, one instruction at a time; no `lock` prefix is
; needed (nor atomic in hv). After the last round the others mark themselves
; done and halt; vCPU 0 waits for every done flag, checks every vCPU's
; private frames through the identity map, adds up every vCPU's checks and
; reports.
;
;   mark 1 -> 2  (vCPU 0) the rounds: ROUNDS PTE writes; ROUNDS * vCPUs
;                INVLPGs, each followed by a miss and walk of the shared page
;
; Checks are counted per vCPU (a failure is recorded, with what and where,
; in the vCPU's own slot; vCPU 0 prints them and hands every vCPU's counts
; to asm/check.s for the verdict). The console is quiet until
; vCPU 0 reports: a line for the set-up, one for the rounds and "smp: ok
; (<N> vcpus, 8 rounds)" with exit code 0; if a check failed, a "FAIL" line
; for each vCPU that saw one (its first), a "FAILED" line and exit code 1. An
; unexpected exception exits with 0xEE (idt.s; a #DF on a vCPU other than 0,
; which has no TSS, is a triple fault). Needs 16 MiB of RAM.
;
; Waiting vCPUs spin (pause) for the rest of their time slice: with hv's
; default quantum each round costs about one slice per vCPU, so use a
; shorter --quantum for many vCPUs (the counts of a run depend on it):
;
;   $ hv run smp --vcpus 8 --quantum 10000

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"
.include "sync.s"

IDENT_END       = 0x1000000     ; [0, 16 MiB) identity-mapped with 2 MiB pages
ROUNDS          = 8
SHARED_VA       = 0x40000000    ; virtual: the page remapped every round
SHARED_FRAMES   = 0xA00000      ; frame r (0 .. ROUNDS) at SHARED_FRAMES + r * 4 KiB
SHARED_TAG      = 0x5348415245000000    ; frame f holds SHARED_TAG + f * 2^16 + o at offset o
SHARED_MID      = 0x800         ; the offsets checked: 0, SHARED_MID, SHARED_LAST
SHARED_LAST     = PAGE_SIZE - 8
SLOT_BASE       = 0x400         ; vCPU i's slot in the shared page: SLOT_BASE + i * 8
SLOT_TAG        = 0x534c4f5400000000    ; written in round r by vCPU i: SLOT_TAG + r * 2^8 + i
PRIV_VA         = 0x40100000    ; virtual: vCPU i's pages at PRIV_VA + i * PRIV_STRIDE
PRIV_STRIDE     = 0x10000
PRIV_PAGES      = 4
PRIV_FRAMES     = 0xB00000      ; vCPU i's page j on frame PRIV_FRAMES + (i * PRIV_PAGES + j) * 4 KiB
PRIV_TAG        = 0x5052495600000000    ; at offset r * 8 of page j: PRIV_TAG + i * 2^24 + r * 2^8 + j

; Each vCPU's slot in percpu (PERCPU_SIZE bytes, written by that vCPU only).
PC_CHECKS       = 0             ; checks made
PC_FAILURES     = 8             ; checks failed
PC_FAIL_WHAT    = 16            ; the first failure: what (a string) ...
PC_FAIL_ADDR    = 24            ; ... where ...
PC_FAIL_GOT     = 32            ; ... the value read ...
PC_FAIL_EXPECTED = 40           ; ... the value expected ...
PC_FAIL_ROUND   = 48            ; ... and in which round (0: set-up or end)
PC_DONE         = 56            ; 1 once the vCPU is about to halt
PERCPU_SIZE     = 64

FLAGS_RW        = PTE_P | PTE_RW

; Registers every vCPU keeps: r12 = its index, r13 = the number of vCPUs,
; r14 = the round, r15 = its percpu slot.
main:
    mov r12, rdi
    mov r13, rsi
    mov r15, rdi
    shl r15, 6                  ; * PERCPU_SIZE
    lea rax, [rip + percpu]
    add r15, rax
    xor r14d, r14d
    test r12, r12
    jnz join                    ; not vCPU 0: wait for the set-up

; -- vCPU 0: the set-up ----------------------------------------------------------
    cmp r13, SMP_MAX_VCPUS
    ja .Ltoo_many
    call gdt_init
    call idt_init
    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + root], rax
    mov rdi, rax
    mov rsi, SHARED_VA          ; the shared page, on frame 0 for now
    mov edx, SHARED_FRAMES
    call pt_map_4k
    xor ebx, ebx                ; the private pages: vCPU i ...
.Lmap_vcpu:
    xor ebp, ebp                ; ... page j
.Lmap_page:
    mov rsi, rbx
    shl rsi, 16                 ; * PRIV_STRIDE
    mov rax, rbp
    shl rax, 12
    add rsi, rax
    mov rax, PRIV_VA
    add rsi, rax
    mov rdx, rbx
    shl rdx, 2                  ; * PRIV_PAGES
    add rdx, rbp
    shl rdx, 12
    add rdx, PRIV_FRAMES
    call pt_map_4k
    inc ebp
    cmp ebp, PRIV_PAGES
    jb .Lmap_page
    inc ebx
    cmp rbx, r13
    jb .Lmap_vcpu
    xor ecx, ecx                ; the shared frames' contents, through the
.Lfill_frame:                   ; identity map (the boot tables' or ours)
    mov rdi, rcx
    shl rdi, 12
    add rdi, SHARED_FRAMES
    call shared_value           ; rax = frame rcx's value at offset 0
    mov qword ptr [rdi], rax
    add rax, SHARED_MID
    mov qword ptr [rdi + SHARED_MID], rax
    add rax, SHARED_LAST - SHARED_MID
    mov qword ptr [rdi + SHARED_LAST], rax
    inc ecx
    cmp ecx, ROUNDS
    jbe .Lfill_frame

; -- every vCPU: onto the shared tables --------------------------------------------
join:
    mov rdi, r12
    mov rsi, r13
    call smp_barrier            ; vCPU 0's tables and IDT are ready
    test r12, r12
    jz .Ljoin_cr3
    call idt_load
.Ljoin_cr3:
    mov rax, qword ptr [rip + root]
    mov cr3, rax
    call smp_barrier            ; every vCPU runs on them
    test r12, r12
    jnz .Lround
    mov ebx, 1
    call hv_mark

; -- the rounds ------------------------------------------------------------------------
.Lround:
    inc r14                     ; r
    test r12, r12
    jnz .Lround_ipi
    mov rdi, qword ptr [rip + root]     ; vCPU 0: the shared page to frame r
    mov rsi, SHARED_VA
    mov rdx, r14
    shl rdx, 12
    add rdx, SHARED_FRAMES
    mov ecx, FLAGS_RW
    call pt_map_4k              ; no INVLPG: that is everyone's step 2
    mov qword ptr [rip + ipi_round], r14    ; the IPI
.Lround_ipi:
    lea rdi, [rip + ipi_round]
    mov rsi, r14
    call smp_wait
    mov rdi, SHARED_VA
    invlpg [rdi]                ; the shootdown

    mov rcx, r14                ; the shared page shows frame r
    call shared_value
    mov rdx, rax
    lea rsi, [rip + msg_what_shared]
    call check_qword
    add rdi, SHARED_MID
    add rdx, SHARED_MID
    call check_qword
    add rdi, SHARED_LAST - SHARED_MID
    add rdx, SHARED_LAST - SHARED_MID
    call check_qword
    mov rsi, r14                ; this vCPU's slot in it
    mov rdx, r12
    call slot_value
    mov rdi, SHARED_VA + SLOT_BASE
    mov qword ptr [rdi + r12*8], rax

    xor ebp, ebp                ; the private pages: round r's value ...
.Lpriv_write:
    mov rdi, r12
    mov rsi, r14
    mov rdx, rbp
    call priv_value
    call priv_page              ; rdi = page rbp of this vCPU
    mov qword ptr [rdi + r14*8], rax
    inc ebp
    cmp ebp, PRIV_PAGES
    jb .Lpriv_write
    xor ebp, ebp                ; ... and every round's so far, read back
.Lpriv_page:
    mov ebx, 1                  ; round q
.Lpriv_round:
    mov rdi, r12
    mov rsi, rbx
    mov rdx, rbp
    call priv_value
    mov rdx, rax
    call priv_page
    lea rdi, [rdi + rbx*8]
    lea rsi, [rip + msg_what_priv]
    call check_qword
    inc ebx
    cmp rbx, r14
    jbe .Lpriv_round
    inc ebp
    cmp ebp, PRIV_PAGES
    jb .Lpriv_page

    mov rdi, r12
    mov rsi, r13
    call smp_barrier            ; every vCPU is done with frame r
    test r12, r12
    jnz .Lround_next
    xor ecx, ecx                ; vCPU 0: frame r has every vCPU's slot
.Lround_slot:
    mov rsi, r14
    mov rdx, rcx
    call slot_value
    mov rdx, rax
    mov rdi, r14
    shl rdi, 12
    lea rdi, [rdi + rcx*8 + SHARED_FRAMES + SLOT_BASE]
    lea rsi, [rip + msg_what_slot]
    call check_qword
    inc ecx
    cmp rcx, r13
    jb .Lround_slot
.Lround_next:
    cmp r14, ROUNDS
    jb .Lround

    test r12, r12
    jz .Lrounds_done
    mov qword ptr [r15 + PC_DONE], 1
park:                           ; vCPUs other than 0: done
    hlt
    jmp park

; -- vCPU 0: the end ----------------------------------------------------------------------
.Lrounds_done:
    mov ebx, 2
    call hv_mark
    mov qword ptr [r15 + PC_DONE], 1
    xor r14d, r14d              ; round 0: checks after the rounds
    lea rdi, [rip + percpu + PC_DONE]
    mov esi, 1
    xor ecx, ecx
.Ldone_wait:                    ; every vCPU has finished
    call smp_wait
    add rdi, PERCPU_SIZE
    inc ecx
    cmp rcx, r13
    jb .Ldone_wait

    xor ebx, ebx                ; every vCPU's private frames hold every round's values
.Lframes_vcpu:
    xor ebp, ebp                ; page j
.Lframes_page:
    mov ecx, 1                  ; round q
.Lframes_round:
    mov rdi, rbx
    mov rsi, rcx
    mov rdx, rbp
    call priv_value
    mov rdx, rax
    mov rdi, rbx
    shl rdi, 2                  ; * PRIV_PAGES
    add rdi, rbp
    shl rdi, 12
    lea rdi, [rdi + rcx*8 + PRIV_FRAMES]
    lea rsi, [rip + msg_what_priv_frame]
    call check_qword
    inc ecx
    cmp ecx, ROUNDS
    jbe .Lframes_round
    inc ebp
    cmp ebp, PRIV_PAGES
    jb .Lframes_page
    inc ebx
    cmp rbx, r13
    jb .Lframes_vcpu

    lea rsi, [rip + msg_setup]
    mov rdx, qword ptr [rip + root]
    mov rcx, r13
    call sayf
    lea rsi, [rip + msg_rounds]
    mov edx, ROUNDS
    call sayf

; -- the verdict: every vCPU's checks -----------------------------------------------------
    lea rbx, [rip + percpu]
    xor ecx, ecx
.Lverdict_vcpu:
    mov rax, qword ptr [rbx + PC_CHECKS]
    mov rdx, qword ptr [rbx + PC_FAILURES]
    call check_tally            ; into check.s's counts
    test rdx, rdx
    jz .Lverdict_next
    call report_failure
.Lverdict_next:
    add rbx, PERCPU_SIZE
    inc ecx
    cmp rcx, r13
    jb .Lverdict_vcpu
    lea rsi, [rip + msg_ok]
    mov rdx, r13
    mov ecx, ROUNDS
    call check_verdict
.Ltoo_many:
    lea rsi, [rip + msg_too_many]
    call panic

; report_failure: rbx = a vCPU's percpu slot, rcx = its index. Prints
; "smp: FAIL vcpu <i> round <r>: <what> at <addr>: got <v>, expected <v>
; (<n> failures)". Preserves every register.
report_failure:
    push rcx
    push rdx
    push rsi
    push r8
    push r9
    lea rsi, [rip + msg_fail]
    mov rdx, rcx
    mov rcx, qword ptr [rbx + PC_FAIL_ROUND]
    mov r8, qword ptr [rbx + PC_FAIL_WHAT]
    mov r9, qword ptr [rbx + PC_FAIL_ADDR]
    call sayf
    lea rsi, [rip + msg_fail_end]
    mov rdx, qword ptr [rbx + PC_FAIL_GOT]
    mov rcx, qword ptr [rbx + PC_FAIL_EXPECTED]
    mov r8, qword ptr [rbx + PC_FAILURES]
    call putf
    pop r9
    pop r8
    pop rsi
    pop rdx
    pop rcx
    ret

; shared_value: rcx = frame f -> rax = SHARED_TAG + f * 2^16 (its value at
; offset 0; at offset o it is that + o).
shared_value:
    mov rax, rcx
    shl rax, 16
    push rdx
    mov rdx, SHARED_TAG
    add rax, rdx
    pop rdx
    ret

; slot_value: rsi = round r, rdx = vCPU i -> rax = SLOT_TAG + r * 2^8 + i.
slot_value:
    mov rax, rsi
    shl rax, 8
    add rax, rdx
    push rdx
    mov rdx, SLOT_TAG
    add rax, rdx
    pop rdx
    ret

; priv_value: rdi = vCPU i, rsi = round r, rdx = page j
; -> rax = PRIV_TAG + i * 2^24 + r * 2^8 + j.
priv_value:
    mov rax, rdi
    shl rax, 16
    add rax, rsi
    shl rax, 8
    add rax, rdx
    push rdx
    mov rdx, PRIV_TAG
    add rax, rdx
    pop rdx
    ret

; priv_page: rbp = page j -> rdi = this vCPU's (r12) page j, virtual.
priv_page:
    push rax
    mov rdi, r12
    shl rdi, 16                 ; * PRIV_STRIDE
    mov rax, rbp
    shl rax, 12
    add rdi, rax
    mov rax, PRIV_VA
    add rdi, rax
    pop rax
    ret

; check_qword: rdi = address, rdx = expected, rsi = what is checked (a
; string). Reads the qword at rdi and counts the check in this vCPU's slot
; (r15); on a mismatch counts a failure and, if it is the vCPU's first,
; records what, where, the values and the round (r14). Preserves every
; register.
check_qword:
    push rax
    inc qword ptr [r15 + PC_CHECKS]
    mov rax, qword ptr [rdi]
    cmp rax, rdx
    je .Lcheck_qword_done
    inc qword ptr [r15 + PC_FAILURES]
    cmp qword ptr [r15 + PC_FAILURES], 1
    jne .Lcheck_qword_done
    mov qword ptr [r15 + PC_FAIL_GOT], rax
    mov qword ptr [r15 + PC_FAIL_WHAT], rsi
    mov qword ptr [r15 + PC_FAIL_ADDR], rdi
    mov qword ptr [r15 + PC_FAIL_EXPECTED], rdx
    mov qword ptr [r15 + PC_FAIL_ROUND], r14
.Lcheck_qword_done:
    pop rax
    ret

check_prefix:           .asciz "smp: "
msg_setup:              .asciz "vcpu 0 built the page tables, cr3=%x; %d vcpus loaded them\n"
msg_rounds:             .asciz "%d rounds: vcpu 0 remapped 0x40000000 to a new frame; on its IPI every vcpu ran invlpg, saw the new frame, wrote its slot there and its 4 private pages\n"
msg_ok:                 .asciz "ok (%d vcpus, %d rounds)\n"
msg_fail:               .asciz "FAIL vcpu %d round %d: %s at %x: "
msg_fail_end:           .asciz "got %x, expected %x (%d failures)\n"
msg_too_many:           .asciz "smp: more vCPUs than SMP_MAX_VCPUS"
msg_what_shared:        .asciz "shared page after the shootdown"
msg_what_slot:          .asciz "a vcpu's slot in the round's frame"
msg_what_priv:          .asciz "private page read back"
msg_what_priv_frame:    .asciz "private frame read through the identity map"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root:           .quad 0         ; the shared PML4 (vCPU 0 writes it before the first barrier)
ipi_round:      .quad 0         ; the IPI: the round whose remap vCPU 0 announced
.align 64
percpu:         .zero SMP_MAX_VCPUS * PERCPU_SIZE
.align 4096
