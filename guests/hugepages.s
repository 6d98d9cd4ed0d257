; hugepages.s -- TLB reach with 2 MiB pages: tlbstress on 8 large pages.
;
; The working set of tlbstress.s and the same passes, mapped with 8
; translations instead of 4096.
;
; The guest builds its own address space (paging.s): [0, 32 MiB)
; identity-mapped with 2 MiB pages (image, stacks, page-table pool, and the
; working set's frames seen physically), and a working set of WS_PAGES =
; 4096 pages of 4 KiB (16 MiB) at WS_VA, page p on frame WS_FRAMES + p * 4 KiB,
; exactly as in tlbstress.s, but mapped by WS_LARGE = 8 PDEs of 2 MiB pages
; (pt_map_2m): 8 TLB entries cover it all, so after the first pass the
; working set stays in the TLB and the passes cost (almost) no walks. A
; walk to a 2 MiB page reads 3 entries (PML4E, PDPTE, PDE) instead of 4.
;
; The passes are asm/wset.s's: pass 0 writes one qword in every page, each
; later pass reads every page, checks the value and writes a new one to
; every fourth page.
;
;   mark 1 -> 2  pass 0: the cold pass; one miss (a 3-reference walk) per
;                2 MiB page: 8, plus A and D set in each PDE
;   mark 2 -> 3  passes 1 .. PASSES-1, the steady state: the TLB holds
;                every translation, so next to no misses
;   after 3      every frame read through the identity map (values the last
;                pass left), then the report
;
; In modes that cache the working set with 4 KiB entries (shadow paging
; shadows guest large pages with 4 KiB entries; ept without
; --ept-large-pages maps guest memory with 4 KiB EPT pages, and a TLB entry
; is the smaller of the two pages) the steady passes miss like tlbstress's:
; what large pages buy depends on both dimensions.
;
; The console is quiet between the marks. Then a line for the address space,
; one for the passes and "hugepages: ok (4096 pages in 8 pages of 2 MiB, 5
; passes, 20480 checks)" with exit code 0; if a value was wrong, a "FAIL"
; line for each pass that saw one, a "FAILED" line and exit code 1. An
; unexpected exception exits with 0xEE (idt.s). Needs 32 MiB of RAM. Only
; vCPU 0 runs the test (the library has one TSS); any others halt.

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
WS_LARGE        = WS_PAGES * PAGE_SIZE / LARGE_PAGE_SIZE  ; 8 pages of 2 MiB
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
    mov rsi, WS_VA              ; 2 MiB page i: WS_VA + i * 2 MiB -> WS_FRAMES + i * 2 MiB
    mov edx, WS_FRAMES
    mov r12d, WS_LARGE
.Lmap:
    call pt_map_2m
    add rsi, LARGE_PAGE_SIZE
    add rdx, LARGE_PAGE_SIZE
    dec r12d
    jnz .Lmap
    mov cr3, rdi

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
    mov ecx, WS_LARGE
    mov r8d, PASSES
    mov r9d, CHECKS
    call wset_report            ; never returns

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

check_prefix:       .asciz "hugepages: "
msg_space:          .asciz "own page tables, cr3=%x: 32 MiB identity-mapped with 2 MiB pages, 16 MiB at 0x40000000 in 8 pages of 2 MiB on frames 0x1000000-0x1ffffff\n"
msg_ok:             .asciz "ok (%d pages in %d pages of 2 MiB, %d passes, %d checks)\n"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root:               .quad 0     ; the PML4
.align 4096
