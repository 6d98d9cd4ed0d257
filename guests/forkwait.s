; forkwait.s -- fork and wait, FORKS times over: address spaces created,
; switched to and torn down, with copy-on-write.
;
; The guest replaces the boot ABI's tables with its own (gdt.s, idt.s with
; a #PF handler on IST1, paging.s) and gives paging.s a small page pool,
; POOL_PAGES pages, so that it runs out within three forks unless every
; child's pages and tables go back to it (page_free, pt_free_tables).
;
; The parent: [0, 16 MiB) identity-mapped with 2 MiB pages (the "kernel":
; image, stacks, the pool) and a "user" region of PAGES 4 KiB pages at
; REGION_VA on frames from the pool. Then, for fork k = 0 .. FORKS-1:
;
;   1. the parent runs: it writes this round's values into every page of
;      its region: P(k, i) = TAG_P + k * 2^16 + i at offset 0, NOT P at
;      offset 8 and -P in the last qword of page i
;   2. fork (copy-on-write): a new PML4 and intermediate tables; the
;      kernel's 2 MiB PDEs are copied from the parent's tables; every region
;      PTE is copied pointing at the parent's frame, read-only and marked
;      PTE_COW (a bit the CPU ignores). The parent's PTEs stay writable: the
;      parent only waits while the child lives, so nothing writes a shared
;      frame but through the child's read-only mappings.
;   3. the child runs (CR3 = the child's PML4): it reads every page (the
;      parent's values, through the shared frames), then writes C(k, i) =
;      TAG_C + k * 2^16 + i at offset 8 of every fourth page (i mod 4 =
;      k mod 4: COPIES_PER_FORK pages). Each write faults (present, write:
;      error code 0x3); the #PF handler checks the fault (CR2 in the region,
;      the error code, RIP, CR3 = the child, a PTE_COW PTE), copies the frame
;      into a new page from the pool, maps the copy writable in the child
;      (pt_map_4k, then INVLPG: the old read-only translation may be cached)
;      and returns, and the write is retried. The child reads every page
;      again: its own values at offset 8 of the pages it wrote, the rest of
;      every page still the parent's.
;   4. wait: CR3 back to the parent, which checks that its region is
;      unchanged, through its virtual addresses and then through the
;      identity map at the frames its PTEs point to.
;   5. reap: every region PTE of the child is unmapped with pt_unmap_4k
;      (which runs INVLPG, here in the parent's address space); the frames
;      the child copied (its PTEs without PTE_COW) go back to the pool, then
;      every table of the child's (pt_free_tables). The pool must be back
;      to what it had before the fork.
;
; The marks: 1 before fork 0 (after the parent is built), 2 after fork 0
; (after its reaping), 3 after the last fork. So between(1, 2) is one fork
; and between(2, 3) is FORKS - 1 forks; the console is quiet in between
; (lines are printed after mark 3, unless a check fails).
;
; Every check is counted (asm/check.s). One line per phase (the parent,
; fork 1, the other forks), then "forkwait: ok (40 forks, 640 pages
; copied)" and exit code 0; if any check failed, a "FAIL" line for each (the
; first ten), a "FAILED" line and exit code 1. An unexpected exception, e.g.
; a page fault the handler does not expect, exits with 0xEE (idt.s); an
; exhausted pool with 0xED (paging.s panics). Needs 16 MiB of RAM. Only
; vCPU 0 runs the test (the library has one TSS); any others halt.

    jmp main                    ; jump over the library

.include "serial.s"
.include "hv.s"
.include "gdt.s"
.include "idt.s"
.include "paging.s"
.include "check.s"

FORKS           = 40
IDENT_END       = 0x1000000     ; [0, 16 MiB) identity-mapped with 2 MiB pages
POOL_BASE       = 0x400000      ; the page pool: tables and region frames
POOL_PAGES      = 128
POOL_END        = POOL_BASE + POOL_PAGES * PAGE_SIZE
; Virtual: the parent's (and each child's) region. Its page numbers modulo
; 256 (0xa0-0xdf) are clear of those of the image, the boot stack and the
; pool. (This once kept counts of QEMU's software TLB, which shrinks with
; host time, independent of the host's speed; hv counts only its own TLB
; model now, whose counts never depend on it: hv/hw/tlb.py.)
REGION_VA       = 0x400A0000
PAGES           = 64
REGION_END      = REGION_VA + PAGES * PAGE_SIZE
COPY_STRIDE     = 4             ; the child writes page i if i mod 4 = k mod 4
COPIES_PER_FORK = PAGES / COPY_STRIDE
TAG_P           = 0x5041524e00000000   ; P(k, i) = TAG_P + k * 2^16 + i
TAG_C           = 0x4348494c00000000   ; C(k, i) = TAG_C + k * 2^16 + i
CHILD_OFFSET    = 8             ; where the child writes
LAST_QWORD      = PAGE_SIZE - 8

PTE_COW         = 1 << 9        ; software bit (ignored by the CPU): shared, copy on write
; The entry bits a copied mapping keeps (not the address, A, D or PTE_COW).
PTE_KEEP        = PTE_P | PTE_RW | PTE_US | PTE_PWT | PTE_PCD | PTE_G | PTE_NX
FLAGS_RW        = PTE_P | PTE_RW
PF_ERR_P        = 1 << 0        ; #PF error code: protection violation (page present)
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
    mov edi, POOL_BASE
    mov esi, POOL_END
    call pt_pool_init

; -- the parent ------------------------------------------------------------------
    mov edx, IDENT_END
    mov ecx, FLAGS_RW
    call pt_new_identity_2m
    mov qword ptr [rip + root_parent], rax
    mov rdi, rax
    xor ecx, ecx
.Lparent_map:
    call page_va                ; rsi = the page's address
    call page_alloc
    mov rdx, rax
    push rcx
    mov ecx, FLAGS_RW
    call pt_map_4k
    pop rcx
    inc ecx
    cmp ecx, PAGES
    jb .Lparent_map
    mov cr3, rdi
    call page_avail
    lea rsi, [rip + msg_parent]
    mov rdx, rdi
    mov rcx, rax
    call sayf

; -- the forks -----------------------------------------------------------------------
    mov ebx, 1
    call hv_mark
    xor r12d, r12d              ; k: the fork
.Lfork:
    ; 1. the parent writes this round's values
    xor ecx, ecx
.Lparent_write:
    call page_va
    call parent_value           ; rdx = P(k, i)
    mov qword ptr [rsi], rdx
    not rdx
    mov qword ptr [rsi + CHILD_OFFSET], rdx
    not rdx
    neg rdx
    mov qword ptr [rsi + LAST_QWORD], rdx
    inc ecx
    cmp ecx, PAGES
    jb .Lparent_write

    ; 2. fork
    call page_avail
    mov r14, rax                ; the pool before the fork
    call fork_child
    mov r13, rax                ; the child's PML4
    mov qword ptr [rip + root_child], rax
    mov r15, qword ptr [rip + copies]

    ; 3. the child runs
    mov cr3, r13
    xor ebx, ebx                ; its writes are not there yet
    xor r9d, r9d                ; through the virtual addresses
    lea r8, [rip + msg_what_child_before]
    call verify_region
    mov ecx, r12d
    and ecx, COPY_STRIDE - 1    ; the first page it writes
.Lchild_write:
    call page_va
    mov rdx, TAG_C
    add rdx, rcx
    mov rax, r12
    shl rax, 16
    add rdx, rax                ; C(k, i)
child_write:
    mov qword ptr [rsi + CHILD_OFFSET], rdx     ; #PF: copy on write; then retried
    add ecx, COPY_STRIDE
    cmp ecx, PAGES
    jb .Lchild_write
    mov ebx, 1                  ; now they are
    lea r8, [rip + msg_what_child_after]
    call verify_region
    mov rax, qword ptr [rip + copies]
    sub rax, r15
    mov edx, COPIES_PER_FORK
    mov rdi, r13
    lea rsi, [rip + msg_what_copies]
    call check

    ; 4. wait: back in the parent, whose pages the child did not change
    mov rax, qword ptr [rip + root_parent]
    mov cr3, rax
    xor ebx, ebx
    xor r9d, r9d
    lea r8, [rip + msg_what_parent]
    call verify_region          ; through its virtual addresses ...
    mov r9, rax                 ; (its PML4)
    lea r8, [rip + msg_what_parent_frames]
    call verify_region          ; ... and its frames, through the identity map

    ; 5. reap the child
    mov rdi, r13
    call reap_child
    call page_avail             ; every page is back
    mov rdx, r14
    mov rdi, r13
    lea rsi, [rip + msg_what_pool]
    call check

    inc r12d
    cmp r12d, 1
    jne .Lfork_next
    mov ebx, 2                  ; after the first fork
    call hv_mark
    mov qword ptr [rip + first_child], r13
    mov rax, qword ptr [rip + copies]
    mov qword ptr [rip + first_copies], rax
    mov rax, qword ptr [rip + unmapped]
    mov qword ptr [rip + first_unmapped], rax
    mov rax, qword ptr [rip + freed]
    mov qword ptr [rip + first_freed], rax
.Lfork_next:
    cmp r12d, FORKS
    jb .Lfork
    mov ebx, 3
    call hv_mark

; -- what happened -------------------------------------------------------------------
    lea rsi, [rip + msg_fork1]
    mov rdx, qword ptr [rip + first_child]
    mov rcx, qword ptr [rip + first_copies]
    mov r8, qword ptr [rip + first_unmapped]
    mov r9, qword ptr [rip + first_freed]
    call sayf

    lea rsi, [rip + msg_forks]
    mov edx, FORKS
    mov rcx, qword ptr [rip + copies]
    sub rcx, qword ptr [rip + first_copies]
    mov r8, qword ptr [rip + unmapped]
    sub r8, qword ptr [rip + first_unmapped]
    mov r9, qword ptr [rip + freed]
    sub r9, qword ptr [rip + first_freed]
    call sayf
    call page_avail
    lea rsi, [rip + msg_forks_pool]
    mov rdx, rax
    call putf

; -- the verdict ---------------------------------------------------------------------
    mov rax, qword ptr [rip + pf_count]     ; every fault was a copy on write
    mov rdx, FORKS * COPIES_PER_FORK
    xor edi, edi
    lea rsi, [rip + msg_what_pf_count]
    call check
    lea rsi, [rip + msg_ok]
    mov edx, FORKS
    mov rcx, qword ptr [rip + copies]
    call check_verdict

park:                           ; vCPUs other than 0: stop here
    hlt
    jmp park

; page_va: rcx = page index -> rsi = REGION_VA + i * 4 KiB. Preserves the rest.
page_va:
    mov rsi, rcx
    shl rsi, 12
    add rsi, REGION_VA
    ret

; parent_value: r12 = k, rcx = i -> rdx = P(k, i). Preserves the rest.
parent_value:
    mov rdx, r12
    shl rdx, 16
    add rdx, rcx
    push rax
    mov rax, TAG_P
    add rdx, rax
    pop rax
    ret

; fork_child: -> rax = the PML4 of a new address space that copies the
; parent's kernel PDEs and maps the parent's region frames read-only with
; PTE_COW. Runs in any address space that identity-maps the pool.
; Preserves every other register.
fork_child:
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    call pt_new_root
    mov r8, rax                 ; the child
    mov r9, qword ptr [rip + root_parent]
    mov r10, PTE_KEEP
    xor esi, esi                ; the kernel: one PDE per 2 MiB
.Lfork_kernel:
    mov rdi, r9
    call pt_lookup              ; rax = the parent's PDE, rdx = its level
    cmp edx, 2
    jne .Lfork_not_2m
    mov rax, qword ptr [rax]
    mov rdx, PTE_ADDR
    and rdx, rax                ; the 2 MiB frame
    mov rcx, r10
    and rcx, rax                ; its flags (pt_map_2m adds PTE_PS)
    mov rdi, r8
    call pt_map_2m
    add rsi, LARGE_PAGE_SIZE
    cmp rsi, IDENT_END
    jb .Lfork_kernel
    xor ecx, ecx                ; the region: one PTE per page
.Lfork_region:
    push rcx
    call page_va
    mov rdi, r9
    call pt_lookup              ; rax = the parent's PTE
    mov rax, qword ptr [rax]
    mov rdx, PTE_ADDR
    and rdx, rax                ; the parent's frame, shared
    mov rcx, r10
    and rcx, rax
    and rcx, ~PTE_RW            ; read-only ...
    or rcx, PTE_COW             ; ... until the child writes
    mov rdi, r8
    call pt_map_4k
    pop rcx
    inc ecx
    cmp ecx, PAGES
    jb .Lfork_region
    mov rax, r8
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    ret
.Lfork_not_2m:
    lea rsi, [rip + msg_not_2m]
    call panic

; reap_child: rdi = the child's PML4 (not the current CR3). Unmaps every
; region PTE with pt_unmap_4k (which runs INVLPG, here in the parent's
; address space), frees the frames the child copied, then all of its tables.
; Counts unmapped PTEs and freed pages, and checks every PTE was present.
; Preserves every register.
reap_child:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    mov r8, rdi                 ; the child
    call page_avail
    sub qword ptr [rip + freed], rax
    xor ecx, ecx                ; the page
    xor r9d, r9d                ; PTEs found present
.Lreap_page:
    call page_va
    mov rdi, r8
    call pt_unmap_4k            ; rax = the old PTE; INVLPG [rsi]
    test eax, PTE_P
    jz .Lreap_next
    inc r9d
    test eax, PTE_COW
    jnz .Lreap_next             ; still the parent's frame
    mov rdi, PTE_ADDR
    and rdi, rax                ; the child's own copy
    call page_free
.Lreap_next:
    inc ecx
    cmp ecx, PAGES
    jb .Lreap_page
    add qword ptr [rip + unmapped], rcx
    mov rax, r9
    mov rdx, rcx
    mov rdi, r8
    lea rsi, [rip + msg_what_unmapped]
    call check                  ; every PTE was present
    mov rdi, r8
    call pt_free_tables
    call page_avail
    add qword ptr [rip + freed], rax
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret

; verify_region: r12 = k, rbx = 1 if the child's writes of this fork are to
; be seen, 0 if not; r8 = what is checked (a message); r9 = 0 to read every
; region page through its virtual address in the current address space, or
; a PML4 to read, through the identity map, the frames that PML4 maps the
; region to. Checks the three qwords of every page. Preserves every
; register.
verify_region:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    xor ecx, ecx
.Lverify_page:
    call page_va
    mov rdi, rsi
    test r9, r9
    jz .Lverify_at
    mov rdi, r9
    call pt_lookup              ; rax = the PTE's address
    mov rdi, PTE_ADDR
    and rdi, qword ptr [rax]    ; the frame
.Lverify_at:
    mov rsi, r8
    call parent_value
    mov rax, qword ptr [rdi]
    call check                  ; offset 0: P
    neg rdx
    mov rax, qword ptr [rdi + LAST_QWORD]
    call check                  ; the last qword: -P
    neg rdx
    not rdx                     ; offset CHILD_OFFSET: NOT P ...
    test ebx, ebx
    jz .Lverify_child_offset
    mov eax, ecx
    xor eax, r12d
    test eax, COPY_STRIDE - 1
    jnz .Lverify_child_offset
    mov rdx, TAG_C              ; ... or C(k, i) in a page the child wrote
    add rdx, rcx
    mov rax, r12
    shl rax, 16
    add rdx, rax
.Lverify_child_offset:
    mov rax, qword ptr [rdi + CHILD_OFFSET]
    call check
    inc ecx
    cmp ecx, PAGES
    jb .Lverify_page
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret

; pf_handler: rdi = the exception frame (idt.s). Copy on write: a write by
; the child to a shared page. Anything else goes to idt_default_handler,
; which reports it and exits.
pf_handler:
    mov rbx, rdi
    inc qword ptr [rip + pf_count]
    mov r12, cr2
    mov rax, REGION_VA          ; in the region ...
    cmp r12, rax
    jb .Lpf_unexpected
    mov rax, REGION_END
    cmp r12, rax
    jae .Lpf_unexpected
    cmp qword ptr [rbx + FRAME_ERROR], PF_ERR_P | PF_ERR_W
    jne .Lpf_unexpected         ; ... a write to a present page ...
    lea rax, [rip + child_write]
    cmp qword ptr [rbx + FRAME_RIP], rax
    jne .Lpf_unexpected         ; ... by the child's write ...
    mov r13, cr3
    cmp r13, qword ptr [rip + root_child]
    jne .Lpf_unexpected         ; ... in the child's address space ...
    and r12, -PAGE_SIZE
    mov rdi, r13
    mov rsi, r12
    call pt_lookup
    test rax, rax
    jz .Lpf_unexpected
    cmp edx, 1
    jne .Lpf_unexpected
    mov r14, qword ptr [rax]    ; the PTE
    test r14, PTE_COW
    jz .Lpf_unexpected          ; ... to a copy-on-write page
    call page_alloc
    mov r15, rax                ; the child's own frame
    mov rdi, rax
    mov rsi, PTE_ADDR
    and rsi, r14                ; the shared frame
    mov ecx, PAGE_SIZE / 8
    rep movsq                   ; through the identity map
    mov rdi, r13
    mov rsi, r12
    mov rdx, r15
    mov rcx, PTE_KEEP
    and rcx, r14
    or rcx, PTE_RW              ; writable, no longer PTE_COW
    call pt_map_4k
    invlpg [r12]                ; the read-only translation may be cached
    inc qword ptr [rip + copies]
    ret
.Lpf_unexpected:
    mov rdi, rbx
    jmp idt_default_handler

check_prefix:           .asciz "forkwait: "
msg_parent:             .asciz "parent: cr3=%x: 16 MiB identity-mapped with 2 MiB pages, 64 4 KiB pages at 0x400a0000; pool of 128 pages, %d free\n"
msg_fork1:              .asciz "fork 1: child cr3=%x: kernel PDEs copied, 64 PTEs shared copy-on-write, %d pages copied on write; parent unchanged; reaped: %d PTEs unmapped, %d pages freed\n"
msg_forks:              .asciz "forks 2-%d: %d pages copied on write, %d PTEs unmapped, %d pages freed; "
msg_forks_pool:         .asciz "pool back to %d free pages after every fork\n"
msg_ok:                 .asciz "ok (%d forks, %d pages copied)\n"
msg_what_child_before:  .asciz "child's view before its writes"
msg_what_child_after:   .asciz "child's view after its writes"
msg_what_parent:        .asciz "parent's view after the child ran"
msg_what_parent_frames: .asciz "parent's frames after the child ran"
msg_what_copies:        .asciz "pages copied on write in one fork"
msg_what_pool:          .asciz "free pool pages after reaping a child"
msg_what_unmapped:      .asciz "child PTEs present when reaped"
msg_what_pf_count:      .asciz "page faults taken (all copy on write)"
msg_not_2m:             .asciz "forkwait: the parent's kernel map is not 2 MiB pages"

; Data, in a page of its own (see asm/gdt.s).
.align 4096
root_parent:    .quad 0         ; the parent's PML4
root_child:     .quad 0         ; the current child's PML4
pf_count:       .quad 0         ; page faults taken
copies:         .quad 0         ; pages copied on write
unmapped:       .quad 0         ; child PTEs unmapped
freed:          .quad 0         ; pages given back to the pool
first_child:    .quad 0         ; fork 1's child PML4, copies, unmapped, freed
first_copies:   .quad 0
first_unmapped: .quad 0
first_freed:    .quad 0
.align 4096
