; pagetouch.s -- a guest that runs on page tables of its own and checks that
; the MMU does what the architecture says.
;
; It replaces everything the boot ABI set up: its own GDT and TSS (gdt.s),
; its own IDT with a #PF handler that runs on the IST1 stack (idt.s), and its
; own 4-level page tables (paging.s). Then, one phase at a time, each between
; two hv marks so that Result.between(a, b) shows what the phase cost:
;
;   mark 1 -> 2  phase 1: build address space A: [0, 16 MiB) identity-mapped
;                with 2 MiB pages (image, stacks, page-table pool, frames),
;                and 512 4 KiB pages at 0x40000000 on frames from 8 MiB; load
;                it into CR3
;   mark 2 -> 3  phase 2: write a distinct value at both ends of each of the
;                512 pages and read them all back (each first touch is a TLB
;                miss and a 4-reference walk); after mark 3, check every
;                frame through the identity map
;   mark 3 -> 4  phase 3: remap the last page to another frame, INVLPG, check
;                that the new frame is what the address now reads and writes
;   mark 4 -> 5  phase 4: build address space B, which maps the first 32 pages
;                at 0x40000000 to other frames; switch CR3 between B and A 8
;                times, checking after each switch that those 32 pages hold
;                the current space's data
;   mark 5 -> 6  phase 5: two deliberate page faults, a read where no page
;                table exists and a write to a page taken away with
;                pt_unmap_4k; the handler checks CR2, the error code, the
;                faulting RIP and that it runs on IST1, maps the page and
;                returns, and the access is retried
;
; Every check is counted (asm/check.s). One line per phase, then
; "pagetouch: ok (512 pages, <N> checks)" and exit code 0; if any check
; failed, a "FAIL" line for each (the first ten), a "FAILED" line and exit
; code 1. An unexpected exception exits with 0xEE (idt.s). Needs 16 MiB of RAM.
; Only vCPU 0 runs the test (the library has one TSS); any others halt.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"

; Memory plan: guest-physical addresses unless "virtual".
IDENT_END       = 0x1000000     ; A and B identity-map [0, 16 MiB) with 2 MiB pages
TOUCH_VA        = 0x40000000    ; virtual: the touched pages (one page table's worth)
TOUCH_PAGES     = 512
FRAMES_A        = 0x800000      ; the frames of the touched pages in A (2 MiB)
FRAMES_B        = 0xA00000      ; the frames of the first B_PAGES pages in B
B_PAGES         = 32
REMAP_PAGE      = TOUCH_PAGES - 1
REMAP_VA        = TOUCH_VA + REMAP_PAGE * PAGE_SIZE
REMAP_FRAME     = 0xA20000      ; where phase 3 moves REMAP_PAGE
SWITCHES        = 8
FAULT_VA        = 0x40200120    ; virtual: nothing maps the 2 MiB around it
DEMAND_FRAME    = 0xA21000      ; where the #PF handler maps FAULT_VA's page
UNMAP_PAGE      = 100
UNMAP_VA        = TOUCH_VA + UNMAP_PAGE * PAGE_SIZE
UNMAP_FRAME     = FRAMES_A + UNMAP_PAGE * PAGE_SIZE
PF_EXPECTED     = 2             ; page faults the guest takes on purpose

; Values: page i of A holds TAG_A + i at offset 0 and its complement at
; offset 0xff8; page i of B holds TAG_B + i at offset 0.
TAG_A           = 0x4141414100000000
TAG_B           = 0x4242424200000000
REMAP_VALUE     = 0x5245504d41505045
WRITE_VALUE     = 0x5752495445564131
DEMAND_VALUE    = 0x44454d414e440000
LAST_QWORD      = PAGE_SIZE - 8

FLAGS_RW        = PTE_P | PTE_RW
PF_ERR_W        = 1 << 1        ; #PF error code: the access was a write

main:
    test rdi, rdi               ; rdi = this vCPU's index
    jnz park
    call gdt_init
    call idt_init
    mov edi, 14                 ; #PF
    lea rsi, [rip + pf_handler]
    call idt_set_handler
    mov esi, 1                  ; ... on the IST1 stack
    call idt_set_ist
    lea rsi, [rip + msg_setup]
    call say

; -- phase 1: address space A ------------------------------------------------
    mov ebx, 1
    call hv_mark
    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + root_a], rax
    mov rdi, rax
    mov rsi, TOUCH_VA           ; page i: TOUCH_VA + i * 4 KiB -> FRAMES_A + i * 4 KiB
    mov edx, FRAMES_A
    mov r12d, TOUCH_PAGES
.Lmap_a:
    call pt_map_4k
    add rsi, PAGE_SIZE
    add rdx, PAGE_SIZE
    dec r12d
    jnz .Lmap_a
    mov rdx, qword ptr [rip + root_a]
    mov cr3, rdx
    lea rsi, [rip + msg_phase1]
    call sayf

; -- phase 2: touch every page -------------------------------------------------
    mov ebx, 2
    call hv_mark
    mov rdi, TOUCH_VA
    mov rax, TAG_A
    mov ecx, TOUCH_PAGES
.Lwrite:
    mov qword ptr [rdi], rax
    not rax
    mov qword ptr [rdi + LAST_QWORD], rax
    not rax
    inc rax
    add rdi, PAGE_SIZE
    dec ecx
    jnz .Lwrite
    mov rdi, TOUCH_VA
    mov rdx, TAG_A
    mov ecx, TOUCH_PAGES
    lea rsi, [rip + msg_what_va]
.Lread:
    mov rax, qword ptr [rdi]
    call check
    not rdx
    mov rax, qword ptr [rdi + LAST_QWORD]
    call check
    not rdx
    inc rdx
    add rdi, PAGE_SIZE
    dec ecx
    jnz .Lread
    mov ebx, 3
    call hv_mark
    mov edi, FRAMES_A           ; the same values, through the identity map
    mov rdx, TAG_A
    mov ecx, TOUCH_PAGES
    lea rsi, [rip + msg_what_frame]
.Lread_frames:
    mov rax, qword ptr [rdi]
    call check
    inc rdx
    add rdi, PAGE_SIZE
    dec ecx
    jnz .Lread_frames
    lea rsi, [rip + msg_phase2]
    call say

; -- phase 3: remap a page -------------------------------------------------------
    mov edi, REMAP_FRAME
    mov rax, REMAP_VALUE
    mov qword ptr [rdi], rax
    lea rsi, [rip + msg_what_before_remap]
    mov rdi, REMAP_VA
    mov rax, qword ptr [rdi]    ; the old frame (now cached in the TLB)
    mov rdx, TAG_A + REMAP_PAGE
    call check
    mov rdi, qword ptr [rip + root_a]
    mov rsi, REMAP_VA
    mov edx, REMAP_FRAME
    mov ecx, FLAGS_RW
    call pt_map_4k
    invlpg [rsi]                ; drop the stale translation
    mov rdi, rsi
    lea rsi, [rip + msg_what_after_remap]
    mov rax, qword ptr [rdi]
    mov rdx, REMAP_VALUE
    call check
    mov rax, WRITE_VALUE        ; a write goes to the new frame ...
    mov qword ptr [rdi + 8], rax
    mov edi, REMAP_FRAME + 8
    mov rax, qword ptr [rdi]
    mov rdx, WRITE_VALUE
    call check
    mov edi, FRAMES_A + REMAP_PAGE * PAGE_SIZE
    mov rax, qword ptr [rdi]    ; ... and the old frame keeps its data
    mov rdx, TAG_A + REMAP_PAGE
    call check
    mov ebx, 4
    call hv_mark
    lea rsi, [rip + msg_phase3]
    call say

; -- phase 4: two address spaces -------------------------------------------------
    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + root_b], rax
    mov rdi, rax
    mov rsi, TOUCH_VA
    mov edx, FRAMES_B
    mov r12d, B_PAGES
.Lmap_b:
    call pt_map_4k
    mov rax, TAG_B + B_PAGES
    sub rax, r12                ; TAG_B + page number
    mov qword ptr [rdx], rax    ; the frame's data, through the identity map
    add rsi, PAGE_SIZE
    add rdx, PAGE_SIZE
    dec r12d
    jnz .Lmap_b
    xor r12d, r12d              ; switches done
.Lswitch:
    mov rax, qword ptr [rip + root_b]
    mov rdx, TAG_B
    test r12d, 1
    jz .Lswitch_load            ; even switches load B, odd ones A
    mov rax, qword ptr [rip + root_a]
    mov rdx, TAG_A
.Lswitch_load:
    mov cr3, rax
    mov rdi, TOUCH_VA
    mov ecx, B_PAGES
    lea rsi, [rip + msg_what_switch]
.Lswitch_check:
    mov rax, qword ptr [rdi]
    call check
    inc rdx
    add rdi, PAGE_SIZE
    dec ecx
    jnz .Lswitch_check
    inc r12d
    cmp r12d, SWITCHES
    jb .Lswitch                 ; an even count: A is loaded at the end
    mov ebx, 5
    call hv_mark
    lea rsi, [rip + msg_phase4]
    mov edx, SWITCHES
    mov rcx, qword ptr [rip + root_b]
    call sayf

; -- phase 5: page faults, handled on demand -------------------------------------
    ; A read from FAULT_VA: no page table maps it (not present, read, CPL 0).
    mov edi, DEMAND_FRAME + (FAULT_VA & (PAGE_SIZE - 1))
    mov rax, DEMAND_VALUE
    mov qword ptr [rdi], rax
    mov rsi, FAULT_VA
    mov qword ptr [rip + pf_expect_cr2], rsi
    mov qword ptr [rip + pf_expect_err], 0
    lea rax, [rip + fault_read]
    mov qword ptr [rip + pf_expect_rip], rax
    mov qword ptr [rip + pf_map_frame], DEMAND_FRAME
fault_read:
    mov rax, qword ptr [rsi]    ; #PF; the handler maps the page; this runs again
    mov rdi, rsi
    lea rsi, [rip + msg_what_demand]
    mov rdx, DEMAND_VALUE
    call check
    mov rax, qword ptr [rip + pf_count]
    mov edx, 1
    lea rsi, [rip + msg_what_pf_count]
    call check

    ; A write to a page that pt_unmap_4k took away (not present, write).
    mov rdi, qword ptr [rip + root_a]
    mov rsi, UNMAP_VA
    call pt_unmap_4k            ; rax = the old PTE
    mov rdi, rsi
    lea rsi, [rip + msg_what_old_pte]
    mov rdx, UNMAP_FRAME | PTE_D | PTE_A | FLAGS_RW   ; phase 2 set A and D
    call check
    mov rsi, rdi
    mov rax, UNMAP_VA + 8
    mov qword ptr [rip + pf_expect_cr2], rax
    mov qword ptr [rip + pf_expect_err], PF_ERR_W
    lea rax, [rip + fault_write]
    mov qword ptr [rip + pf_expect_rip], rax
    mov qword ptr [rip + pf_map_frame], UNMAP_FRAME
    mov rax, WRITE_VALUE
fault_write:
    mov qword ptr [rsi + 8], rax    ; #PF; mapped back to its frame; retried
    lea rsi, [rip + msg_what_remapped]
    mov edi, UNMAP_FRAME + 8
    mov rax, qword ptr [rdi]    ; the retried write reached the frame ...
    mov rdx, WRITE_VALUE
    call check
    mov edi, UNMAP_FRAME
    mov rax, qword ptr [rdi]    ; ... which still holds the page's data
    mov rdx, TAG_A + UNMAP_PAGE
    call check
    mov rax, qword ptr [rip + pf_count]
    mov edx, PF_EXPECTED
    lea rsi, [rip + msg_what_pf_count]
    call check
    mov ebx, 6
    call hv_mark
    lea rsi, [rip + msg_phase5]
    call say

; -- the verdict -------------------------------------------------------------------
    lea rsi, [rip + msg_ok]
    mov edx, TOUCH_PAGES
    mov rcx, qword ptr [rip + check_count]
    call check_verdict

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

; pf_handler: rdi = the exception frame (idt.s). Checks the fault is the one
; main announced in pf_expect_*, then maps its page to pf_map_frame in the
; current address space and returns: iretq retries the access. Any other
; #PF goes to idt_default_handler (with the frame in rdi), which reports it
; and exits.
pf_handler:
    inc qword ptr [rip + pf_count]
    cmp qword ptr [rip + pf_count], PF_EXPECTED
    ja idt_default_handler
    mov rsi, cr2
    cmp rsi, qword ptr [rip + pf_expect_cr2]
    jne idt_default_handler
    mov rdx, qword ptr [rip + pf_expect_err]
    mov rcx, qword ptr [rip + pf_expect_rip]
    call check_pf_frame         ; the error code, RIP and stack
    and rsi, -PAGE_SIZE         ; map the page on demand
    mov rdi, cr3
    mov rdx, qword ptr [rip + pf_map_frame]
    mov ecx, FLAGS_RW
    call pt_map_4k
    ret

check_prefix:           .asciz "pagetouch: "
msg_setup:              .asciz "own GDT, TSS and IDT loaded; #PF handler on the IST1 stack\n"
msg_phase1:             .asciz "phase 1: address space A, cr3=%x: 16 MiB identity-mapped with 2 MiB pages, 512 4 KiB pages at 0x40000000\n"
msg_phase2:             .asciz "phase 2: wrote 512 pages at 0x40000000, read each back through its virtual and its physical address\n"
msg_phase3:             .asciz "phase 3: remapped 0x401ff000 to frame 0xa20000 and ran invlpg: the new frame is read and written\n"
msg_phase4:             .asciz "phase 4: %d CR3 switches between A and B (cr3=%x): the same 32 pages showed each space's data\n"
msg_phase5:             .asciz "phase 5: 2 page faults (a read with no page table, a write to an unmapped page): cr2, error code, rip and IST1 checked, mapped on demand, retried\n"
msg_ok:                 .asciz "ok (%d pages, %d checks)\n"
msg_what_va:            .asciz "page data read through its virtual address"
msg_what_frame:         .asciz "page data read through the identity map"
msg_what_before_remap:  .asciz "page data before the remap"
msg_what_after_remap:   .asciz "page data after the remap and invlpg"
msg_what_switch:        .asciz "page data after a CR3 switch"
msg_what_demand:        .asciz "data read after the demand-mapping #PF"
msg_what_pf_count:      .asciz "number of page faults taken"
msg_what_old_pte:       .asciz "PTE returned by pt_unmap_4k"
msg_what_remapped:      .asciz "frame data after the write-fault retry"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root_a:         .quad 0         ; the PML4 of address space A
root_b:         .quad 0         ; the PML4 of address space B
pf_count:       .quad 0         ; page faults taken
pf_expect_cr2:  .quad 0         ; the fault main expects next: CR2, error code, RIP
pf_expect_err:  .quad 0
pf_expect_rip:  .quad 0
pf_map_frame:   .quad 0         ; where the handler maps the faulting page
.align 4096
