; ctxswitch.s -- many address spaces, and CR3 switches among them.
;
; What context switches cost a VMM, in the spirit of Adams & Agesen's
; comparison of software and hardware techniques for x86 virtualization
; (ASPLOS 2006), here to compare shadow paging with EPT. Under shadow paging
; every MOV to CR3 is a VM exit (CR_ACCESS) in which the VMM finds the
; shadow tables of the address space the guest switches to; as long as it
; keeps them (KVM's cache of shadow pages, by guest frame), a space seen
; before costs no shadow page (no mmu_cache_miss) and no hidden fault. Under
; EPT a switch is no exit at all.
;
; Where CPUID reports PCID (hv's default CPU; `--cpu -pcid` takes it away)
; the guest sets CR4.PCIDE and space s runs with PCID s + 1, switched to
; with CR3 bit 63 set: the TLB keeps every space's entries, so after the
; first cycle a switch costs no TLB miss natively or under EPT. Without
; PCID every switch flushes the TLB and the pages touched after it miss
; again. Under shadow paging the switch exits either way, and the VMM's
; flush, where the guest asks for one, takes every PCID's entries (no VMX
; operation flushes one PCID).
;
; The guest builds a kernel address space (paging.s): [0, 16 MiB)
; identity-mapped with 2 MiB pages (image, stacks, page-table pool), one
; PML4 entry's worth, and SPACES = 8 address spaces (fewer than the 12 ways
; of hv's TLB model: with PCID every space's entry for a page fits in that
; page's set). Space s has a PML4 of
; its own whose entry 0 is the kernel's: they share the kernel's page
; directory pointer table and everything below it, as an OS shares its
; kernel half. Its PML4 entry 1 leads to tables of its own that map
; PRIV_PAGES = 2 private pages at the same USER_VA in every space, on frames
; of its own (page_alloc): page j of space s holds ID(s, j) = TAG + s * 2^8
; + j at offset 0, and page 0 counts the space's visits at offset VISITS.
;
; Then SWITCHES = 2000 switches, i = 0 .. SWITCHES-1, round-robin:
;
;   1. MOV to CR3 of space s = i mod SPACES (its PML4, with PCID s + 1 and
;      bit 63 where the guest uses PCID)
;   2. read both private pages and check their IDs (the space's own pages,
;      at the address every space uses), and check the visit count: the
;      space's own, i / SPACES
;   3. count the visit (a write to page 0)
;
; The switches are inline, with their state in registers: they touch their
; code page, the table of roots and the space's pages and nothing else
; (unless a check fails; mark 3 once), so the pages that miss after a
; switch are few and always the same.
;
;   mark 1 -> 2  the switches: SWITCHES CR3 loads
;   mark 3       (between 1 and 2) after the first cycle, the first SPACES
;                switches: between(3, 2) is the steady state, every space
;                seen before
;   after 2      back in the kernel space, every space's frames checked
;                through the identity map: the IDs, and SWITCHES / SPACES
;                visits each
;
; Every check is counted (asm/check.s). The console is quiet between the
; marks. Then a line for the address spaces, one for the switches, one
; saying whether they used PCID and
; "ctxswitch: ok (8 address spaces, 2000 switches, 6024 checks)" with exit
; code 0; if any check failed, a "FAIL" line for each (the first ten), a
; "FAILED" line and exit code 1. An unexpected exception exits with 0xEE
; (idt.s). Needs 16 MiB of RAM. Only vCPU 0 runs the test (the library has
; one TSS); any others halt.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"

SPACES_SHIFT    = 3
SPACES          = 1 << SPACES_SHIFT     ; 8
SWITCHES        = 2000          ; a multiple of SPACES: 250 cycles
IDENT_END       = 0x1000000     ; [0, 16 MiB) identity-mapped with 2 MiB pages
USER_VA         = 0x8000000000  ; virtual: the private pages (PML4 entry 1)
PRIV_PAGES      = 2
TAG             = 0x4354585300000000    ; ID(s, j) = TAG + s * 2^8 + j
VISITS          = 8             ; page 0's visit count, at this offset
KERNEL_PML4E    = 0             ; the PML4 entry every space shares
CPUID_PCID      = 1 << 17       ; CPUID.1:ECX
CR4_PCIDE       = 1 << 17
CR3_NOFLUSH     = 0x8000000000000000

FLAGS_RW        = PTE_P | PTE_RW

main:
    test rdi, rdi               ; rdi = this vCPU's index
    jnz park
    call gdt_init
    call idt_init

; -- the address spaces ------------------------------------------------------------
    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + kernel_root], rax
    mov r12, qword ptr [rax + KERNEL_PML4E * 8]     ; the kernel's PML4 entry
    xor ebx, ebx                ; s
.Lspace:
    call pt_new_root
    mov rdi, rax
    lea rax, [rip + roots]
    mov qword ptr [rax + rbx*8], rdi
    mov qword ptr [rdi + KERNEL_PML4E * 8], r12     ; the kernel, shared
    xor ebp, ebp                ; j
.Lspace_page:
    call page_alloc             ; a zeroed frame
    mov rdx, rax
    call id_of
    mov qword ptr [rdx], rax    ; ID(s, j), through the identity map
    call page_va                ; rsi = USER_VA + j * 4 KiB
    mov ecx, FLAGS_RW
    call pt_map_4k
    lea rax, [rip + frames]     ; frames[s * PRIV_PAGES + j]: for the end
    imul ecx, ebx, PRIV_PAGES
    add ecx, ebp
    mov qword ptr [rax + rcx*8], rdx
    inc ebp
    cmp ebp, PRIV_PAGES
    jb .Lspace_page
    inc ebx
    cmp ebx, SPACES
    jb .Lspace

; -- PCID, where the CPU has it: what each switch loads into CR3 --------------------
    mov eax, 1
    cpuid
    xor r9d, r9d                ; no PCID: the roots as they are
    test ecx, CPUID_PCID
    jz .Lcr3s
    mov rax, cr4                ; CR3 bits 11:0 are 0 here, as setting PCIDE needs
    or rax, CR4_PCIDE
    mov cr4, rax
    mov r9, CR3_NOFLUSH
.Lcr3s:
    mov qword ptr [rip + pcid_on], r9
    xor ebx, ebx                ; s
.Lcr3:
    lea rax, [rip + roots]
    mov rdx, qword ptr [rax + rbx*8]
    test r9, r9
    jz .Lcr3_store
    lea rdx, [rdx + rbx + 1]    ; PCID s + 1 ...
    or rdx, r9                  ; ... and no flush
.Lcr3_store:
    lea rax, [rip + cr3s]
    mov qword ptr [rax + rbx*8], rdx
    inc ebx
    cmp ebx, SPACES
    jb .Lcr3
    mov rax, qword ptr [rip + kernel_root]
    mov cr3, rax

; -- the switches: the console is quiet from mark 1 to mark 2 ----------------------
    mov ebx, 1
    call hv_mark
    xor r12d, r12d              ; i, the switch
    lea r13, [rip + cr3s]
    mov r14, USER_VA
    mov r15, TAG
    xor r8d, r8d                ; checks passed
.Lswitch:                       ; inline: no calls (but mark 3's), no stack, no
    mov ebx, r12d               ; data but the roots and the space's pages
    and ebx, SPACES - 1         ; s = i mod SPACES
    mov rax, qword ptr [r13 + rbx*8]
    mov cr3, rax                ; 1. switch
    mov rdx, rbx                ; 2. its pages: ID(s, j) ...
    shl rdx, 8
    add rdx, r15
    mov rdi, r14
    xor ebp, ebp                ; j
.Lswitch_page:
    mov rax, qword ptr [rdi]
    cmp rax, rdx
    jne .Lswitch_bad_id
    inc r8
.Lswitch_page_next:
    inc rdx
    add rdi, PAGE_SIZE
    inc ebp
    cmp ebp, PRIV_PAGES
    jb .Lswitch_page
    mov rdi, r14                ; ... and its visits so far: i / SPACES
    mov edx, r12d
    shr edx, SPACES_SHIFT
    mov rax, qword ptr [rdi + VISITS]
    cmp rax, rdx
    jne .Lswitch_bad_visits
    inc r8
.Lswitch_visit:
    inc qword ptr [rdi + VISITS]    ; 3. this visit
    inc r12d
    cmp r12d, SPACES
    jne .Lswitch_next
    mov ebx, 3                  ; every space seen once
    call hv_mark
.Lswitch_next:
    cmp r12d, SWITCHES
    jb .Lswitch
    mov ebx, 2
    call hv_mark
    mov rax, r8                 ; the switches' checks that passed
    xor edx, edx
    call check_tally

; -- after the switches: every space's frames --------------------------------------
    mov rax, qword ptr [rip + kernel_root]
    mov cr3, rax
    lea r13, [rip + frames]
    xor ebx, ebx                ; s
.Lframes:
    xor ebp, ebp                ; j
.Lframes_page:
    imul ecx, ebx, PRIV_PAGES
    add ecx, ebp
    mov rdi, qword ptr [r13 + rcx*8]
    call id_of
    mov rdx, rax
    mov rax, qword ptr [rdi]
    lea rsi, [rip + msg_what_frame]
    call check
    inc ebp
    cmp ebp, PRIV_PAGES
    jb .Lframes_page
    imul ecx, ebx, PRIV_PAGES
    mov rdi, qword ptr [r13 + rcx*8]                ; page 0's frame
    add rdi, VISITS
    mov rax, qword ptr [rdi]
    mov edx, SWITCHES / SPACES
    lea rsi, [rip + msg_what_frame_visits]
    call check
    inc ebx
    cmp ebx, SPACES
    jb .Lframes

    lea rsi, [rip + msg_spaces]
    mov rdx, qword ptr [rip + kernel_root]
    mov ecx, SPACES
    mov r8, qword ptr [rip + roots]
    mov r9, qword ptr [rip + roots + (SPACES - 1) * 8]
    call sayf
    lea rsi, [rip + msg_switches]
    mov edx, SWITCHES
    call sayf
    lea rsi, [rip + msg_no_pcid]
    cmp qword ptr [rip + pcid_on], 0
    je .Lsay_pcid
    lea rsi, [rip + msg_pcid]
.Lsay_pcid:
    call sayf
    lea rsi, [rip + msg_ok]
    mov edx, SPACES
    mov ecx, SWITCHES
    mov r8, qword ptr [rip + check_count]
    call check_verdict

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

; A switch's wrong values: report them (check counts them) and go on.
.Lswitch_bad_id:
    lea rsi, [rip + msg_what_id]
    call check
    jmp .Lswitch_page_next
.Lswitch_bad_visits:
    add rdi, VISITS
    lea rsi, [rip + msg_what_visits]
    call check
    sub rdi, VISITS
    jmp .Lswitch_visit

; page_va: rbp = j -> rsi = USER_VA + j * 4 KiB. Preserves the rest.
page_va:
    mov rsi, rbp
    shl rsi, 12
    push rax
    mov rax, USER_VA
    add rsi, rax
    pop rax
    ret

; id_of: rbx = s, rbp = j -> rax = ID(s, j). Preserves the rest.
id_of:
    mov rax, rbx
    shl rax, 8
    add rax, rbp
    push rdx
    mov rdx, TAG
    add rax, rdx
    pop rdx
    ret

check_prefix:           .asciz "ctxswitch: "
msg_spaces:             .asciz "kernel cr3=%x; %d address spaces, PML4s %x to %x: each shares the kernel's PML4 entry (16 MiB identity-mapped) and maps 2 private pages at 0x8000000000\n"
msg_switches:           .asciz "%d switches round-robin: each read the space's 2 pages, checked its visits and counted one more; the frames checked after\n"
msg_pcid:               .asciz "PCID: space s switched to with PCID s + 1 and CR3 bit 63 set (no flush)\n"
msg_no_pcid:            .asciz "no PCID: every switch flushed the TLB\n"
msg_ok:                 .asciz "ok (%d address spaces, %d switches, %d checks)\n"
msg_what_id:            .asciz "private page after the switch"
msg_what_visits:        .asciz "the space's visits before this one"
msg_what_frame:         .asciz "private frame read through the identity map"
msg_what_frame_visits:  .asciz "visits counted in the space's frame"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
kernel_root:    .quad 0         ; the kernel's PML4
roots:          .zero 8 * SPACES        ; space s's PML4 at [s]
cr3s:           .zero 8 * SPACES        ; what switching to space s loads into CR3
pcid_on:        .quad 0         ; CR3_NOFLUSH if the switches use PCID, else 0
frames:         .zero 8 * SPACES * PRIV_PAGES   ; space s's page j at [s * PRIV_PAGES + j]
.align 4096
