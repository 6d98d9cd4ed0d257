; pgfault.s -- demand paging through the guest's own #PF handler.
;
; The guest builds its own address space (paging.s): [0, 16 MiB)
; identity-mapped with 2 MiB pages (image, stacks, page-table pool), and a
; region of REGION_PAGES 4 KiB pages at REGION_VA that nothing maps: not even
; a page directory or page table exists for it. Its #PF handler (on the IST1
; stack, gdt.s/idt.s) is the demand pager: it checks that the fault is the
; one main is about to take (CR2 inside the region and equal to the address
; touched, the error code "not present" with the expected W bit, RIP at the
; touching instruction, running on IST1), takes a zeroed frame from the pool
; (page_alloc), maps it with pt_map_4k (which allocates the missing page
; directory and page table on the first fault) and returns: iretq retries
; the access, which now succeeds. A not-present PTE is never cached in a
; TLB, so the handler needs no INVLPG.
;
;   mark 1 -> 2  the write pass: write V(i) = TAG + i to page i at offset
;                (i * 16) mod 4 KiB, for every page in order; each write
;                faults once (not present, write: error code 0x2); the
;                handler also checks the PTE pt_map_4k wrote
;   mark 2 -> 3  the read pass: reload CR3 (the TLB forgets the region, so
;                every page is walked again through the tables the handler
;                built), then read every page back: V(i) at its offset, and
;                0 at the opposite half of the page (the frame was zeroed);
;                this pass must take no fault
;   after 3      print the lines of the two passes (the console is quiet
;                between the marks unless a check fails)
;
; The read pass is written inline on a code page of its own, touching
; nothing but the region pages (no calls, no stack, counts in registers)
; unless a check fails, and no code runs on that page after it. (This once
; kept counts of QEMU's software TLB, which shrinks with host time,
; independent of the host's speed; hv counts only its own TLB model now,
; whose counts never depend on it: hv/hw/tlb.py.)
;
; Every check is counted (asm/check.s). One line per phase, then
; "pgfault: ok (256 pages, 256 faults)" and exit code 0; if any check failed,
; a "FAIL" line for each (the first ten), a "FAILED" line and exit code 1. An
; unexpected exception exits with 0xEE (idt.s). Needs 16 MiB of RAM. Only
; vCPU 0 runs the test (the library has one TSS); any others halt.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"

IDENT_END       = 0x1000000     ; [0, 16 MiB) identity-mapped with 2 MiB pages
REGION_VA       = 0x40000000    ; virtual: the demand-paged region
REGION_PAGES    = 256
REGION_END      = REGION_VA + REGION_PAGES * PAGE_SIZE
TAG             = 0x5047464c54000000   ; V(i) = TAG + i
SLOT_STRIDE     = 16            ; page i's value is at offset (i * 16) mod 4 KiB
SLOT_MASK       = PAGE_SIZE - 8
HALF_PAGE       = PAGE_SIZE / 2 ; the zero check reads at the slot's offset ^ 2 KiB

FLAGS_RW        = PTE_P | PTE_RW
PF_ERR_P        = 1 << 0        ; #PF error code: protection (0: not present)
PF_ERR_W        = 1 << 1        ; the access was a write

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

    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + root], rax
    mov cr3, rax
    lea rsi, [rip + msg_setup]
    mov rdx, rax
    call sayf

; -- the write pass: one fault per page -------------------------------------------
    mov ebx, 1
    call hv_mark
    mov qword ptr [rip + pf_expect_err], PF_ERR_W
    lea rax, [rip + touch_write]
    mov qword ptr [rip + pf_expect_rip], rax
    xor ecx, ecx                ; page index
.Lwrite:
    call slot_of                ; rdi = the address of page i's slot
    mov qword ptr [rip + pf_expect_cr2], rdi
    mov rax, TAG
    add rax, rcx
touch_write:
    mov qword ptr [rdi], rax    ; #PF; the handler maps the page; this runs again
    mov rax, qword ptr [rip + pf_count]
    lea rdx, [rcx + 1]
    lea rsi, [rip + msg_what_fault_each]
    call check                  ; exactly one fault for each page so far
    inc ecx
    cmp ecx, REGION_PAGES
    jb .Lwrite
    mov ebx, 2
    call hv_mark
    mov rax, qword ptr [rip + pf_count]
    mov qword ptr [rip + pf_write_pass], rax

; -- the read pass: no faults --------------------------------------------------------
    mov qword ptr [rip + pf_expect_cr2], -1     ; no fault is expected now
    mov rax, qword ptr [rip + root]
    jmp read_pass

; The read pass has a code page of its own, which it leaves for good (see the
; top of the file).
.align 4096
read_pass:
    mov cr3, rax                ; flush the TLB: every page is walked again
    xor ecx, ecx                ; page index
    xor r8d, r8d                ; comparisons that matched
    mov r10, TAG
    mov r11, REGION_VA
.Lread:                         ; inline: nothing but the region is touched
    mov rdi, rcx                ; rdi = page i's slot (as slot_of computes it)
    shl rdi, 12
    mov rax, rcx
    shl rax, 4
    and eax, SLOT_MASK
    add rdi, rax
    add rdi, r11
    lea rdx, [r10 + rcx]        ; V(i)
    mov rax, qword ptr [rdi]
    cmp rax, rdx
    jne .Lread_bad_value
    inc r8d
.Lread_zero:
    xor rdi, HALF_PAGE          ; the other half of the page
    mov rax, qword ptr [rdi]
    test rax, rax
    jnz .Lread_bad_zero
    inc r8d
.Lread_next:
    inc ecx
    cmp ecx, REGION_PAGES
    jae read_done               ; straight to the next page: no more code here
    jmp .Lread

.align 4096
read_done:
    mov rax, r8                 ; the read pass's checks, all passed
    xor edx, edx
    call check_tally
    mov ebx, 3
    call hv_mark
    mov rax, qword ptr [rip + pf_count]
    mov edx, REGION_PAGES
    lea rsi, [rip + msg_what_pf_count]
    call check
    ; The passes' lines, printed after mark 3 so that the marks bracket
    ; nothing but the passes.
    lea rsi, [rip + msg_write]
    mov rdx, qword ptr [rip + pf_write_pass]
    call sayf
    lea rsi, [rip + msg_read]
    call say

; -- the verdict ---------------------------------------------------------------------------
    lea rsi, [rip + msg_ok]
    mov edx, REGION_PAGES
    mov rcx, qword ptr [rip + pf_count]
    call check_verdict

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

; The read pass's mismatches: report them (check counts them) and go on.
.Lread_bad_value:
    lea rsi, [rip + msg_what_value]
    call check
    jmp .Lread_zero
.Lread_bad_zero:
    xor edx, edx
    lea rsi, [rip + msg_what_zero]
    call check
    jmp .Lread_next

; slot_of: rcx = page index -> rdi = REGION_VA + i * 4 KiB + (i * 16) mod 4 KiB.
; Preserves every other register.
slot_of:
    push rax
    mov rdi, rcx
    shl rdi, 12
    mov rax, rcx
    shl rax, 4
    and eax, SLOT_MASK
    add rdi, rax
    mov rax, REGION_VA
    add rdi, rax
    pop rax
    ret

; pf_handler: rdi = the exception frame (idt.s). The demand pager: checks
; the fault is the one main announced in pf_expect_* (else hands it, the
; frame still in rdi, to idt_default_handler, which reports it and exits),
; maps a zeroed frame at the faulting page in the current address space and
; returns.
pf_handler:
    inc qword ptr [rip + pf_count]
    mov rsi, cr2
    cmp rsi, qword ptr [rip + pf_expect_cr2]
    jne idt_default_handler     ; also: no fault is expected at all
    mov rax, REGION_VA          ; the demand-paged region only
    cmp rsi, rax
    jb idt_default_handler
    mov rax, REGION_END
    cmp rsi, rax
    jae idt_default_handler
    mov rdx, qword ptr [rip + pf_expect_err]    ; not present (P = 0), W as expected, CPL 0
    mov rcx, qword ptr [rip + pf_expect_rip]
    call check_pf_frame         ; the error code, RIP and stack
    call page_alloc             ; a zeroed frame
    and rsi, -PAGE_SIZE
    mov rdi, cr3
    mov rdx, rax
    mov ecx, FLAGS_RW
    call pt_map_4k              ; rax = the PTE's address
    mov rdi, rax
    mov rax, qword ptr [rdi]
    or rdx, FLAGS_RW            ; the frame, present and writable
    lea rsi, [rip + msg_what_pte]
    call check
    ret

check_prefix:           .asciz "pgfault: "
msg_setup:              .asciz "own GDT, TSS, IDT (#PF on IST1) and page tables, cr3=%x: 16 MiB identity-mapped with 2 MiB pages, 256 4 KiB pages at 0x40000000 left unmapped\n"
msg_write:              .asciz "write pass: wrote 256 pages, %d faults: not present, write; each mapped a zeroed frame on demand (PTE checked) and was retried\n"
msg_read:               .asciz "read pass: reloaded cr3, read 256 pages back (values and zeroed halves): no faults\n"
msg_ok:                 .asciz "ok (%d pages, %d faults)\n"
msg_what_fault_each:    .asciz "faults taken after touching a page (one per page)"
msg_what_value:         .asciz "value read back in the read pass"
msg_what_zero:          .asciz "untouched half of a demand-zeroed page"
msg_what_pf_count:      .asciz "page faults after the read pass"
msg_what_pte:           .asciz "PTE written by the demand pager"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root:           .quad 0         ; the PML4
pf_count:       .quad 0         ; page faults taken
pf_expect_cr2:  .quad -1        ; the fault main expects next: CR2, error code, RIP
pf_expect_err:  .quad 0
pf_expect_rip:  .quad 0
pf_write_pass:  .quad 0         ; page faults taken in the write pass
.align 4096
