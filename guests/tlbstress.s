; tlbstress.s -- TLB reach with 4 KiB pages: a working set beyond the TLB.
;
; 16 MiB of 4 KiB pages, touched pass after pass.
;
; The guest builds its own address space (paging.s): [0, 32 MiB)
; identity-mapped with 2 MiB pages (image, stacks, page-table pool, and the
; working set's frames seen physically), and a working set of WS_PAGES =
; 4096 pages of 4 KiB (16 MiB) at WS_VA, page p on frame WS_FRAMES + p * 4 KiB,
; through 8 page tables. 4096 translations are more than hv's TLB model
; holds (1536 entries, 12 ways: each of its 128 sets sees 32 of the pages,
; in order, and replaces FIFO), so once the TLB is warm every touch of a
; page misses and walks the 4 levels again. Started on 5-level paging (hv
; run --paging-levels 5: CR4.LA57), it puts the same tables under a PML5
; (entry 0), and every walk has 5 levels.
;
; The passes are asm/wset.s's: pass 0 writes one qword in every page, each
; later pass reads every page, checks the value and writes a new one to
; every fourth page.
;
;   mark 1 -> 2  pass 0: the cold pass; one miss per page, each walk sets A
;                and D in the page's PTE
;   mark 2 -> 3  passes 1 .. PASSES-1, the steady state: still (at least)
;                one miss and one 4-reference walk for every page touched
;   after 3      every frame read through the identity map (values the last
;                pass left), then the report
;
; The console is quiet between the marks. Then a line for the address space,
; one for the passes and "tlbstress: ok (4096 pages of 4 KiB, 5 passes,
; 20480 checks)" with exit code 0; if a value was wrong, a "FAIL" line for
; each pass that saw one, a "FAILED" line and exit code 1. An unexpected
; exception exits with 0xEE (idt.s). Needs 32 MiB of RAM. Only vCPU 0 runs
; the test (the library has one TSS); any others halt.
;
; guests/hugepages.s is the same working set and passes on 2 MiB pages.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"
.include "wset.s"

IDENT_END       = 0x2000000     ; [0, 32 MiB) identity-mapped with 2 MiB pages
WS_VA           = 0x40000000    ; virtual: the working set
WS_PAGES        = 4096          ; 16 MiB of 4 KiB pages
WS_FRAMES       = 0x1000000     ; their frames: [16 MiB, 32 MiB)
PASSES          = 5             ; pass 0 (cold), then 4 in the steady state
CHECKS          = WS_PAGES * PASSES     ; reads checked: passes 1.., then the frames

FLAGS_RW        = PTE_P | PTE_RW

main:
    test rdi, rdi               ; rdi = this vCPU's index
    jnz park
    call gdt_init
    call idt_init

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
    call load_root

; -- the passes (asm/wset.s): the console is quiet from mark 1 to mark 3 ------
    mov rdi, WS_VA
    mov esi, WS_PAGES
    mov edx, PASSES
    mov ecx, WS_FRAMES
    call wset_bench

; -- the report -------------------------------------------------------------------
    lea rsi, [rip + msg_space]
    mov rdx, qword ptr [rip + root]
    call sayf
    lea rsi, [rip + msg_ok]
    mov edx, WS_PAGES
    mov ecx, PASSES
    mov r8d, CHECKS
    call wset_report            ; never returns

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

; load_root: rdi = the PML4 -> CR3 = it, or with CR4.LA57 a new PML5 whose
; entry 0 is it (paging.s builds 4-level tables; the working set is below
; 256 TiB, where a PML5 needs that one entry).
load_root:
    mov rax, cr4
    bt rax, 12                  ; CR4.LA57
    jnc .Lroot
    call page_alloc
    or rdi, PT_TABLE_FLAGS
    mov qword ptr [rax], rdi
    mov rdi, rax
.Lroot:
    mov qword ptr [rip + root], rdi
    mov cr3, rdi
    ret

check_prefix:       .asciz "tlbstress: "
msg_space:          .asciz "own page tables, cr3=%x: 32 MiB identity-mapped with 2 MiB pages, 4096 pages of 4 KiB at 0x40000000 on frames 0x1000000-0x1ffffff\n"
msg_ok:             .asciz "ok (%d pages of 4 KiB, %d passes, %d checks)\n"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root:               .quad 0     ; CR3: the PML4, or the PML5 above it
.align 4096
