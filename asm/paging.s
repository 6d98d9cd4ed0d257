; asm/paging.s -- 4-level page tables: a page allocator and map/unmap/lookup.
;
; Needs serial.s (errors panic).
;
; The pool: page_alloc hands out zeroed 4 KiB pages, in order, from
; [PT_POOL_BASE, PT_POOL_END) = [0x400000, 0x800000) guest-physical (4 MiB,
; 1024 pages; clear of an image loaded at 0x100000 up to 3 MiB long).
; pt_pool_init moves it. A page given back with page_free goes on a free
; list (LIFO, linked through the first qword of each free page), and
; page_alloc takes from that list first; a guest that never frees gets its
; pages in address order. Tables (and free pages) are reached through
; their physical addresses, so the pool must be identity-mapped in the
; address space that is current while the routines run (the boot tables map
; all RAM that way; a guest's own tables must keep the pool mapped).
;
; Intermediate entries (PML4E, PDPTE, PDE pointing at a table) are created
; with PT_TABLE_FLAGS = P | RW | US: the CPU ANDs the rights of every level,
; so the leaf's flags alone decide what a mapping allows.
;
; Calling convention as in serial.s: arguments in the registers named,
; result in rax, every other general-purpose register preserved unless
; listed; RFLAGS clobbered. `root` is the physical address of a PML4 (a CR3
; value; its low 12 bits are ignored), `va` a virtual address, `pa` a
; physical one, `flags` PTE_* bits (OR them: PTE_P | PTE_RW).
;
;   page_alloc                                -> rax = a zeroed 4 KiB page
;                                                (the last one freed, if any);
;                                                panics when the pool is empty
;   page_free        rdi = page               give a page back to the pool
;                                                (it must come from the pool
;                                                and be in use; not checked)
;   page_avail                                -> rax = pages page_alloc can
;                                                still hand out (free list
;                                                and never used)
;   pt_pool_init     rdi = base, rsi = end    use [base, end) as the pool
;                                                (and forget the free list)
;   pt_new_root                               -> rax = an empty PML4
;   pt_map_4k        rdi = root, rsi = va, rdx = pa, rcx = flags
;                                             -> rax = address of the PTE.
;                    Allocates missing tables; overwrites an existing PTE
;                    without INVLPG (after changing a present mapping in the
;                    current address space, INVLPG it). Panics if a large
;                    page already covers va.
;   pt_map_2m        rdi = root, rsi = va, rdx = pa, rcx = flags (PTE_PS is
;                    added) -> rax = address of the PDE. va and pa must be
;                    2 MiB aligned (else panic); a page table the PDE
;                    pointed to is dropped (not freed); no INVLPG.
;   pt_map_identity_2m  rdi = root, rsi = start, rdx = end, rcx = flags:
;                    pt_map_2m(root, a, a, flags) for a in [start, end)
;                    in 2 MiB steps; returns nothing (rax preserved)
;   pt_new_identity_2m  rdx = end, rcx = flags -> rax = a new PML4 (from
;                    pt_new_root) that maps [0, end) to itself with 2 MiB
;                    pages (pt_map_identity_2m): the usual kernel map of a
;                    guest's own address space
;   pt_unmap_4k      rdi = root, rsi = va -> rax = the old PTE (0 if there
;                    was none). Clears the PTE and runs INVLPG [va]. Panics
;                    if a large page covers va.
;   pt_lookup        rdi = root, rsi = va -> rax = address of the entry that
;                    maps va, or 0 if a table on the way is missing; clobbers
;                    rdx = that entry's level (1 = PTE, 2 = PDE of a 2 MiB
;                    page, 3 = PDPTE of a 1 GiB page). The entry itself may
;                    be non-present: test PTE_P in it.
;   pt_free_tables   rdi = root               page_free every paging structure
;                    reachable from root (page tables, directories, PDPTs)
;                    and root itself; returns nothing (rax preserved). The
;                    pages that leaves map are not freed (free them first,
;                    e.g. from what pt_unmap_4k returns), nor is any TLB
;                    entry invalidated: root must not be CR3, and no table
;                    may be shared with another address space.

; Entry bits (SDM Vol.3A §4.5.4, Tables 4-15..4-20).
PTE_P           = 1 << 0        ; present
PTE_RW          = 1 << 1        ; writable
PTE_US          = 1 << 2        ; user accessible
PTE_PWT         = 1 << 3        ; write-through
PTE_PCD         = 1 << 4        ; cache disable
PTE_A           = 1 << 5        ; accessed (set by the CPU)
PTE_D           = 1 << 6        ; dirty (set by the CPU, leaves only)
PTE_PS          = 1 << 7        ; page size: a 2 MiB leaf in a PDE, 1 GiB in a PDPTE
PTE_G           = 1 << 8        ; global (with CR4.PGE)
PTE_NX          = 1 << 63       ; no execute (with EFER.NXE)
PTE_ADDR        = 0x000FFFFFFFFFF000    ; the physical address bits 51:12

PAGE_SIZE       = 0x1000
LARGE_PAGE_SIZE = 0x200000
PT_TABLE_FLAGS  = PTE_P | PTE_RW | PTE_US
PT_POOL_BASE    = 0x400000
PT_POOL_END     = 0x800000

; page_alloc: -> rax = the physical address of a zeroed 4 KiB page.
page_alloc:
    push rcx
    push rdi
    mov rdi, qword ptr [rip + pt_free_head]
    test rdi, rdi
    jz .Lpage_alloc_fresh
    mov rax, qword ptr [rdi]            ; the next free page
    mov qword ptr [rip + pt_free_head], rax
    dec qword ptr [rip + pt_free_count]
    jmp .Lpage_alloc_zero
.Lpage_alloc_fresh:
    mov rdi, qword ptr [rip + pt_pool_next]
    mov rax, rdi
    add rax, PAGE_SIZE
    cmp rax, qword ptr [rip + pt_pool_end]
    ja .Lpage_alloc_empty
    mov qword ptr [rip + pt_pool_next], rax
.Lpage_alloc_zero:
    push rdi
    xor eax, eax
    mov ecx, PAGE_SIZE / 8
    rep stosq                   ; zero the page
    pop rax
    pop rdi
    pop rcx
    ret
.Lpage_alloc_empty:
    lea rsi, [rip + pt_msg_pool_empty]
    call panic

; page_free: rdi = a page page_alloc handed out.
page_free:
    push rax
    mov rax, qword ptr [rip + pt_free_head]
    mov qword ptr [rdi], rax            ; link it in front of the list
    mov qword ptr [rip + pt_free_head], rdi
    inc qword ptr [rip + pt_free_count]
    pop rax
    ret

; page_avail: -> rax = pages left: the free list and the untouched rest.
page_avail:
    mov rax, qword ptr [rip + pt_pool_end]
    sub rax, qword ptr [rip + pt_pool_next]
    shr rax, 12
    add rax, qword ptr [rip + pt_free_count]
    ret

; pt_pool_init: rdi = base, rsi = end (both page aligned).
pt_pool_init:
    mov qword ptr [rip + pt_pool_next], rdi
    mov qword ptr [rip + pt_pool_end], rsi
    mov qword ptr [rip + pt_free_head], 0
    mov qword ptr [rip + pt_free_count], 0
    ret

; pt_new_root: -> rax = an empty PML4.
pt_new_root:
    jmp page_alloc

; pt_entry (the walk behind the public routines):
;   rdi = root, rsi = va, rdx = level wanted (1 = PTE, 2 = PDE),
;   rcx = 1: create missing tables (and panic at a large page above the
;   wanted level), 0: stop at a missing table or a large page.
;   -> rax = entry address (0 if a table is missing and rcx = 0),
;      rdx = the level of that entry.
pt_entry:
    push rbx
    push rcx
    push r8
    push r9
    push r10
    push r11
    mov r10, rcx                ; create?
    mov r9, PTE_ADDR
    mov rbx, rdi
    and rbx, r9                 ; the table at this level
    mov r8d, 4                  ; the level: 4 = PML4
.Lpt_entry_level:
    lea ecx, [r8 + r8*8 + 3]    ; va bits translated below this level: 12 + 9 * (level - 1)
    mov rax, rsi
    shr rax, cl
    and eax, 511
    lea rax, [rbx + rax*8]      ; the entry for va at this level
    cmp r8, rdx
    je .Lpt_entry_done          ; the level asked for
    mov r11, qword ptr [rax]
    test r11, PTE_P
    jz .Lpt_entry_missing
    test r11, PTE_PS
    jnz .Lpt_entry_large
.Lpt_entry_down:
    mov rbx, r11
    and rbx, r9
    dec r8
    jmp .Lpt_entry_level
.Lpt_entry_missing:
    test r10, r10
    jz .Lpt_entry_none
    mov rcx, rax
    call page_alloc             ; a new, empty table one level down
    mov r11, rax
    or r11, PT_TABLE_FLAGS
    mov qword ptr [rcx], r11
    jmp .Lpt_entry_down
.Lpt_entry_large:               ; a large page maps va above the level asked for
    test r10, r10
    jz .Lpt_entry_done
    lea rsi, [rip + pt_msg_large]
    call panic
.Lpt_entry_none:
    xor eax, eax
.Lpt_entry_done:
    mov rdx, r8
    pop r11
    pop r10
    pop r9
    pop r8
    pop rcx
    pop rbx
    ret

; pt_map_4k: rdi = root, rsi = va, rdx = pa, rcx = flags -> rax = PTE address.
pt_map_4k:
    push rdx
    push r8
    push r9
    mov r8, rdx                 ; pa
    push rcx
    mov edx, 1
    mov ecx, 1
    call pt_entry
    pop rcx
    mov r9, PTE_ADDR
    and r8, r9
    or r8, rcx
    mov qword ptr [rax], r8
    pop r9
    pop r8
    pop rdx
    ret

; pt_map_2m: rdi = root, rsi = va, rdx = pa, rcx = flags -> rax = PDE address.
pt_map_2m:
    push rdx
    push r8
    mov r8, rdx                 ; pa
    mov rax, rsi
    or rax, r8
    test eax, LARGE_PAGE_SIZE - 1
    jnz .Lpt_map_2m_unaligned
    push rcx
    mov edx, 2
    mov ecx, 1
    call pt_entry
    pop rcx
    or r8, rcx
    or r8, PTE_PS
    mov qword ptr [rax], r8
    pop r8
    pop rdx
    ret
.Lpt_map_2m_unaligned:
    lea rsi, [rip + pt_msg_unaligned]
    call panic

; pt_map_identity_2m: rdi = root, rsi = start, rdx = end, rcx = flags.
pt_map_identity_2m:
    push rax
    push rsi
    push r8
    mov r8, rdx                 ; end
.Lpt_map_identity_next:
    cmp rsi, r8
    jae .Lpt_map_identity_done
    mov rdx, rsi
    call pt_map_2m
    add rsi, LARGE_PAGE_SIZE
    jmp .Lpt_map_identity_next
.Lpt_map_identity_done:
    mov rdx, r8
    pop r8
    pop rsi
    pop rax
    ret

; pt_new_identity_2m: rdx = end, rcx = flags -> rax = a new PML4.
pt_new_identity_2m:
    push rsi
    push rdi
    call pt_new_root
    mov rdi, rax
    xor esi, esi
    call pt_map_identity_2m
    pop rdi
    pop rsi
    ret

; pt_lookup: rdi = root, rsi = va -> rax = entry address or 0, rdx = level.
pt_lookup:
    push rcx
    mov edx, 1
    xor ecx, ecx
    call pt_entry
    pop rcx
    ret

; pt_unmap_4k: rdi = root, rsi = va -> rax = old PTE (0 if none).
pt_unmap_4k:
    push rdx
    push rcx
    call pt_lookup
    test rax, rax
    jz .Lpt_unmap_done          ; no page table: nothing mapped
    cmp edx, 1
    jne .Lpt_unmap_large
    mov rcx, rax
    mov rax, qword ptr [rcx]    ; the old PTE
    mov qword ptr [rcx], 0
    invlpg [rsi]
.Lpt_unmap_done:
    pop rcx
    pop rdx
    ret
.Lpt_unmap_large:
    lea rsi, [rip + pt_msg_large]
    call panic

; pt_free_tables: rdi = root.
pt_free_tables:
    push rsi
    mov esi, 4
    call pt_free_level
    pop rsi
    ret

; pt_free_level: rdi = a table, rsi = its level (4 = PML4 ... 1 = page
; table). Frees the tables its present non-leaf entries point to (one level
; down, recursively), then the table itself. Preserves every register.
pt_free_level:
    push rax
    push rcx
    push rdx
    push rdi
    push rsi
    cmp esi, 1
    je .Lpt_free_self           ; a page table: its entries are leaves
    mov rdx, rdi                ; the table
    xor ecx, ecx                ; entry index
.Lpt_free_entry:
    mov rax, qword ptr [rdx + rcx*8]
    test rax, PTE_P
    jz .Lpt_free_next
    test rax, PTE_PS
    jnz .Lpt_free_next          ; a large page: a leaf
    mov rdi, PTE_ADDR
    and rdi, rax
    dec esi
    call pt_free_level
    inc esi
.Lpt_free_next:
    inc ecx
    cmp ecx, 512
    jb .Lpt_free_entry
    mov rdi, rdx
.Lpt_free_self:
    call page_free
    pop rsi
    pop rdi
    pop rdx
    pop rcx
    pop rax
    ret

pt_msg_pool_empty:
    .asciz "paging: page-table pool exhausted"
pt_msg_large:
    .asciz "paging: a large page covers this address"
pt_msg_unaligned:
    .asciz "paging: pt_map_2m of an address that is not 2 MiB aligned"

; Data, in a page of its own (see gdt.s).
.align 4096
pt_pool_next:
    .quad PT_POOL_BASE
pt_pool_end:
    .quad PT_POOL_END
pt_free_head:                   ; the last page freed (0: the list is empty)
    .quad 0
pt_free_count:                  ; pages on the free list
    .quad 0
.align 4096
