; asm/wset.s -- passes over a working set, one qword per page (for TLB
; experiments: how many translations a pass needs, not how much data).
;
; The working set is `pages` consecutive 4 KiB pages from `base`, mapped
; however the guest likes (4 KiB pages, 2 MiB pages, or the physical
; frames through an identity map). Page p holds one value, in its qword at
; offset WSET_SLOT(p) = (p * 64) mod 4 KiB (so consecutive pages use
; different cache lines).
;
; Pass 0 writes every page. Pass k >= 1 reads every page, checks it holds
; the value of the last pass that wrote it, and then writes a new value to
; every fourth page: those with p mod 4 = k mod 4. So each pass touches
; every page once (one read, or in pass 0 one write; a quarter of the
; pages also get a write right after the read). The value pass j writes to
; page p is
;
;   V(p, j) = WSET_TAG + j * 2^32 + p
;
; and after pass n the page holds V(p, j) for the last j <= n that wrote it:
; the largest j in [1, n] with j = p (mod 4), or 0 if there is none.
;
; Calling convention as in serial.s: arguments in the registers named,
; result in rax, every other general-purpose register preserved; RFLAGS
; clobbered.
;
;   wset_pass    rdi = base, rsi = pages, rdx = pass number k (0 first)
;                -> rax = pages whose value did not match (always 0 for
;                pass 0, which only writes)
;   wset_check   rdi = base, rsi = pages, rdx = passes done n (>= 1)
;                -> rax = pages that do not hold the value pass n - 1 left;
;                reads only (what pass n would check, without its writes)
;
; The loop touches nothing but the working set: no calls, no stack, the
; state in registers.

WSET_TAG        = 0x5753455400000000        ; "WSET" in the high half
WSET_SLOT_MASK  = 0xFC0                     ; (p * 64) mod 4 KiB

; wset_pass: rdi = base, rsi = pages, rdx = pass -> rax = mismatches.
wset_pass:
    push rcx
    mov ecx, 1                  ; with writes
    call wset_walk
    pop rcx
    ret

; wset_check: rdi = base, rsi = pages, rdx = passes done -> rax = mismatches.
wset_check:
    push rcx
    xor ecx, ecx                ; reads only
    call wset_walk
    pop rcx
    ret

; wset_walk: rdi = base, rsi = pages, rdx = pass k, rcx = 1 to write
; (wset_pass), 0 to only read (wset_check) -> rax = mismatches.
wset_walk:
    push rbx
    push rcx
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    mov r12, rcx                ; write?
    xor ecx, ecx                ; p, the page index
    xor r8d, r8d                ; mismatches
    mov r9, WSET_TAG
    lea r10, [rdx - 1]          ; k - 1: the last pass before this one
    mov r11, rdx
    shl r11, 32                 ; k * 2^32: this pass's part of V(p, k)
.Lwset_page:
    mov r13, rcx                ; r13 = the slot of page p
    shl r13, 6
    and r13d, WSET_SLOT_MASK
    add r13, rdi
    test rdx, rdx
    jz .Lwset_write             ; pass 0: nothing to check yet
    ; j = (k - 1) - ((k - 1 - p) mod 4): the last pass before k that wrote
    ; page p, if it is one of the passes 1, 2, ...; else 0
    mov rax, r10
    sub rax, rcx
    and eax, 3
    mov rbx, r10
    sub rbx, rax
    jg .Lwset_expect
    xor ebx, ebx
.Lwset_expect:
    shl rbx, 32
    add rbx, r9
    add rbx, rcx                ; V(p, j)
    cmp qword ptr [r13], rbx
    je .Lwset_match
    inc r8
.Lwset_match:
    test r12, r12
    jz .Lwset_next
    mov eax, ecx                ; write if p mod 4 = k mod 4
    xor eax, edx
    test eax, 3
    jnz .Lwset_next
.Lwset_write:
    lea rax, [r11 + rcx]
    add rax, r9                 ; V(p, k)
    mov qword ptr [r13], rax
.Lwset_next:
    add rdi, 0x1000             ; the next page
    inc rcx
    cmp rcx, rsi
    jb .Lwset_page
    mov rax, r8
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rcx
    pop rbx
    ret
