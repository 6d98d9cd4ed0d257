; phases.s -- page-table churn and a TLB-hostile working set, together and
; apart: a phased workload for agile paging (issue 16).
;
; Shadow paging loses where a guest writes its page tables (an exit for
; every write), EPT where it misses the TLB (2-D walks of up to 24
; references). This guest does both at once in two regions of one address
; space, then each alone, with a mark between phases, so that a VMM that
; shadows the still region and walks the changing one nested (agile paging,
; Gandhi et al., ISCA 2016) can beat both where they mix.
;
; The guest builds its own address space (paging.s): [0, 32 MiB)
; identity-mapped with 2 MiB pages (image, stacks, page-table pool, and the
; frames below seen physically) and two regions in different GiBs, so that
; no page table (nor page directory) serves both:
;
;   the static region  WS_PAGES = 4096 pages of 4 KiB (16 MiB) at WS_VA,
;                      page p on frame WS_FRAMES + p * 4 KiB, through 8 page
;                      tables written once, before mark 1. Page p holds
;                      V(p) = TAG_WS + p in its qword at (p * 64) mod 4 KiB
;                      and is only ever read after that. 4096 translations
;                      are more than hv's TLB model holds (1536 entries, 12
;                      ways, FIFO), and the pages are read in order, round
;                      and round: every read misses and walks.
;   the churn region   CHURN_SLOTS = 64 page slots at CHURN_VA, in one page
;                      table of their own, mapped one at a time onto
;                      CHURN_FRAMES_N = 63 frames at CHURN_FRAMES. Churn
;                      step k uses slot k mod 64 and frame k mod 63 (so a
;                      slot meets another frame each time round):
;                        1. map the slot (pt_map_4k: a PTE write)
;                        2. read it: the value the frame's last step left,
;                           V(k - 63) = TAG_CHURN + k - 63 (a check)
;                        3. write V(k) into it
;                        4. read the frame through the identity map: V(k)
;                           (a check)
;                        5. unmap the slot (pt_unmap_4k: a PTE write and
;                           INVLPG) and check the old PTE: the frame,
;                           present, writable, accessed and dirty
;
; Before mark 1 (set-up, so that the phases measure the steady state): the
; tables of both regions are built before CR3 is loaded, the working set
; written through its virtual addresses and read once (checked), and one
; round of churn steps, one per slot, run. Every frame either region uses
; has been touched by then.
;
;   mark 1 -> 2  phase A, both: ROUNDS rounds of one churn step (two PTE
;                writes, an INVLPG, a TLB miss of the new page) and a slice
;                of WS_SLICE pages of the static region read (WS_SLICE TLB
;                misses and 4-level walks). Shadow paging pays five exits a
;                step for the churn (the two emulated PTE writes, the
;                INVLPG, the hidden faults of the read, which sets A, and
;                of the write, which sets D), EPT a 2-D walk of 24
;                references for every read.
;   mark 2 -> 3  phase B, only the reads: ROUNDS slices of the static
;                region, no page-table write: no exits under shadow paging
;                (its walks cost 4 references), 2-D walks under EPT.
;   mark 3 -> 4  phase C, only the churn: ROUNDS churn steps. Exits under
;                shadow paging; under EPT no exit, and a 2-D walk for the
;                one new page a step.
;   after 4      every frame of the static region read through the identity
;                map (still V(p)), every churn PTE checked clear, and the
;                churn steps counted
;
; The reads of the static region go on from page to page across the phases
; (phase B starts where phase A stopped); the churn steps count on from the
; set-up to phase A to phase C. Every check is counted (asm/check.s). The
; console is quiet between the marks. Then a line for the address space,
; one for the phases and "phases: ok (3 phases of 2500 rounds, 5064 PTEs
; churned, 320000 pages read, 343449 checks)" with exit code 0; if any check
; failed, a "FAIL" line for each (the first ten), a "FAILED" line and exit
; code 1. An unexpected exception exits with 0xEE (idt.s). Needs 32 MiB of
; RAM (the default is 64 MiB). Only vCPU 0 runs the test (the library has
; one TSS); any others halt.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"

ROUNDS          = 2500          ; rounds in each phase
IDENT_END       = 0x2000000     ; [0, 32 MiB) identity-mapped with 2 MiB pages
; The static region.
WS_VA           = 0x40000000    ; virtual: the working set, in GiB 1
WS_PAGES        = 4096          ; 16 MiB of 4 KiB pages (a power of 2)
WS_FRAMES       = 0x1000000     ; their frames: [16 MiB, 32 MiB)
WS_SLICE        = 64            ; pages read in a round
WS_SLOT_MASK    = 0xFC0         ; page p's qword: (p * 64) mod 4 KiB
TAG_WS          = 0x5048575300000000    ; V(p) = TAG_WS + p
; The churn region.
CHURN_VA        = 0x80000000    ; virtual: the slots, in GiB 2
CHURN_SLOTS     = 64            ; (a power of 2)
CHURN_FRAMES    = 0x800000      ; the frames: [8 MiB, 8 MiB + 63 * 4 KiB)
CHURN_FRAMES_N  = 63
TAG_CHURN       = 0x5048434800000000    ; V(k) = TAG_CHURN + k
CHURN_WARM      = CHURN_SLOTS   ; churn steps before mark 1
CHURN_STEPS     = CHURN_WARM + 2 * ROUNDS
WS_READS        = 2 * ROUNDS * WS_SLICE         ; reads in phases A and B

FLAGS_RW        = PTE_P | PTE_RW

main:
    test rdi, rdi               ; rdi = this vCPU's index
    jnz park
    call gdt_init
    call idt_init

    xor ecx, ecx                ; the churn frames' values, through the boot
.Lfill:                         ; tables' identity map: frame f holds
    mov rdi, rcx                ; V(f - 63), as if step f - 63 had left it
    shl rdi, 12
    add rdi, CHURN_FRAMES
    mov rax, TAG_CHURN - CHURN_FRAMES_N
    add rax, rcx
    mov qword ptr [rdi], rax
    inc ecx
    cmp ecx, CHURN_FRAMES_N
    jb .Lfill

    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + root], rax
    mov rdi, rax
    mov rsi, WS_VA              ; page p: WS_VA + p * 4 KiB -> WS_FRAMES + p * 4 KiB
    mov edx, WS_FRAMES
    mov r12d, WS_PAGES
.Lmap:
    call pt_map_4k
    add rsi, PAGE_SIZE
    add rdx, PAGE_SIZE
    dec r12d
    jnz .Lmap
    mov rsi, CHURN_VA           ; the churn region's page table (and its page
    mov edx, CHURN_FRAMES       ; directory), built now so that the phases
    call pt_map_4k              ; write PTEs only (slot 0's PTE is the
    mov qword ptr [rip + churn_pt], rax     ; table's first entry)
    call pt_unmap_4k            ; (its INVLPG is in the boot tables)
    mov cr3, rdi

    mov r15, TAG_WS
    xor r13d, r13d              ; p: the next page of the working set to read
    xor r10d, r10d              ; reads that held their value
    xor ecx, ecx                ; the working set written through its
.Lws_fill:                      ; virtual addresses
    call ws_addr
    lea rax, [r15 + rcx]
    mov qword ptr [rdi], rax
    inc ecx
    cmp ecx, WS_PAGES
    jb .Lws_fill
    mov r14d, WS_PAGES / WS_SLICE       ; and read once
.Lws_warm:
    call ws_slice
    dec r14d
    jnz .Lws_warm
    xor r12d, r12d              ; k: the churn step
    mov r14d, CHURN_WARM        ; a churn step in every slot
.Lchurn_warm:
    call churn_step
    dec r14d
    jnz .Lchurn_warm

; -- the phases: the console is quiet from mark 1 to mark 4 ----------------------
    mov ebx, 1
    call hv_mark
    mov r14d, ROUNDS            ; A: churn and reads, interleaved
.Lphase_a:
    call churn_step
    call ws_slice
    dec r14d
    jnz .Lphase_a
    mov ebx, 2
    call hv_mark
    mov r14d, ROUNDS            ; B: only the reads
.Lphase_b:
    call ws_slice
    dec r14d
    jnz .Lphase_b
    mov ebx, 3
    call hv_mark
    mov r14d, ROUNDS            ; C: only the churn
.Lphase_c:
    call churn_step
    dec r14d
    jnz .Lphase_c
    mov ebx, 4
    call hv_mark
    mov rax, r10                ; the reads that held their value
    xor edx, edx                ; (wrong ones were checked and counted)
    call check_tally

; -- after the phases ------------------------------------------------------------
    xor ecx, ecx                ; the working set's frames, through the
.Lframes:                       ; identity map
    call ws_addr
    add rdi, WS_FRAMES - WS_VA
    lea rdx, [r15 + rcx]
    mov rax, qword ptr [rdi]
    lea rsi, [rip + msg_what_ws_frame]
    call check
    inc ecx
    cmp ecx, WS_PAGES
    jb .Lframes
    mov rdi, qword ptr [rip + churn_pt]     ; every churn PTE clear
    xor ecx, ecx
.Lchurn_ptes:
    mov rax, qword ptr [rdi + rcx*8]
    xor edx, edx
    lea rsi, [rip + msg_what_churn_clear]
    call check
    inc ecx
    cmp ecx, CHURN_SLOTS
    jb .Lchurn_ptes
    mov rax, r12                ; every churn step ran
    mov edx, CHURN_STEPS
    xor edi, edi
    lea rsi, [rip + msg_what_steps]
    call check

    lea rsi, [rip + msg_space]
    mov rdx, qword ptr [rip + root]
    mov rcx, qword ptr [rip + churn_pt]
    call sayf
    lea rsi, [rip + msg_phases]
    mov edx, ROUNDS
    mov ecx, WS_SLICE
    call sayf
    lea rsi, [rip + msg_ok]
    mov edx, ROUNDS
    mov rcx, r12
    mov r8d, WS_READS
    mov r9, qword ptr [rip + check_count]
    call check_verdict

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

; ws_addr: rcx = page p -> rdi = the address of its qword in the working set.
; Preserves the rest.
ws_addr:
    push rax
    mov rdi, rcx
    shl rdi, 12
    mov eax, ecx
    shl eax, 6
    and eax, WS_SLOT_MASK
    add rdi, rax
    add rdi, WS_VA
    pop rax
    ret

; ws_slice: reads WS_SLICE pages of the working set from page r13 on (after
; the last page, page 0 again) and checks each holds V(p) (r15 = TAG_WS).
; r13 moves on past them; r10 counts the reads that held their value, and a
; wrong one is a failed check (reported). The loop touches nothing but the
; working set unless a check fails. Preserves the rest.
ws_slice:
    push rax
    push rcx
    push rdx
    push rdi
    mov ecx, WS_SLICE
.Lws_page:
    mov rdi, r13
    shl rdi, 12
    mov eax, r13d
    shl eax, 6
    and eax, WS_SLOT_MASK
    add rdi, rax
    add rdi, WS_VA
    lea rdx, [r15 + r13]        ; V(p)
    cmp qword ptr [rdi], rdx
    jne .Lws_bad
    inc r10
.Lws_next:
    inc r13d
    and r13d, WS_PAGES - 1
    dec ecx
    jnz .Lws_page
    pop rdi
    pop rdx
    pop rcx
    pop rax
    ret
.Lws_bad:
    mov rax, qword ptr [rdi]
    push rsi
    lea rsi, [rip + msg_what_ws]
    call check
    pop rsi
    jmp .Lws_next

; churn_step: r12 = k. Maps slot k mod CHURN_SLOTS onto frame k mod
; CHURN_FRAMES_N, reads it (V(k - CHURN_FRAMES_N)), writes V(k), reads the
; frame through the identity map, unmaps the slot (INVLPG) and checks the
; old PTE. Three checks. r12 moves on to k + 1; preserves the rest.
churn_step:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    mov r9, r12
    and r9d, CHURN_SLOTS - 1
    shl r9, 12
    mov rax, CHURN_VA
    add r9, rax                 ; the slot
    mov rax, r12
    xor edx, edx
    mov ecx, CHURN_FRAMES_N
    div rcx                     ; rdx = k mod CHURN_FRAMES_N
    shl rdx, 12
    add rdx, CHURN_FRAMES
    mov r8, rdx                 ; the frame
    mov rdi, qword ptr [rip + root]
    mov rsi, r9
    mov ecx, FLAGS_RW
    call pt_map_4k              ; 1. map: a PTE written
    mov rdx, TAG_CHURN - CHURN_FRAMES_N
    add rdx, r12                ; V(k - CHURN_FRAMES_N)
    mov rax, qword ptr [r9]     ; 2. read through the new mapping
    mov rdi, r9
    lea rsi, [rip + msg_what_churn_old]
    call check
    add rdx, CHURN_FRAMES_N     ; V(k)
    mov qword ptr [r9], rdx     ; 3. write through it
    mov rax, qword ptr [r8]     ; 4. the frame, through the identity map
    mov rdi, r8
    lea rsi, [rip + msg_what_churn_frame]
    call check
    mov rdi, qword ptr [rip + root]
    mov rsi, r9
    call pt_unmap_4k            ; 5. unmap: a PTE written, INVLPG
    lea rdx, [r8 + FLAGS_RW + PTE_A + PTE_D]
    mov rdi, r9
    lea rsi, [rip + msg_what_churn_pte]
    call check
    inc r12
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret

check_prefix:           .asciz "phases: "
msg_space:              .asciz "own page tables, cr3=%x: 32 MiB identity-mapped with 2 MiB pages; static: 4096 pages of 4 KiB at 0x40000000 on frames 0x1000000-0x1ffffff; churn: 64 slots at 0x80000000 (page table %x) on 63 frames at 0x800000\n"
msg_phases:             .asciz "%d rounds a phase: A = a PTE mapped, touched and unmapped, then %d static pages read; B = the reads only; C = the churn only\n"
msg_ok:                 .asciz "ok (3 phases of %d rounds, %d PTEs churned, %d pages read, %d checks)\n"
msg_what_ws:            .asciz "static page read through its virtual address"
msg_what_ws_frame:      .asciz "static frame read through the identity map"
msg_what_churn_old:     .asciz "churned page: the value its frame's last step left"
msg_what_churn_frame:   .asciz "churned frame read through the identity map"
msg_what_churn_pte:     .asciz "churned PTE when unmapped (frame, P, RW, A, D)"
msg_what_churn_clear:   .asciz "churn PTE clear after the phases"
msg_what_steps:         .asciz "churn steps run"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root:                   .quad 0     ; the PML4
churn_pt:               .quad 0     ; the churn region's page table
.align 4096
