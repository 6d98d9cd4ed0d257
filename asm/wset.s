; asm/wset.s -- passes over a working set, one qword per page (for TLB
; experiments: how many translations a pass needs, not how much data).
;
; Needs serial.s, hv.s and check.s (for wset_bench and wset_report; wset_pass
; and wset_check use none of them).
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
;
; A whole TLB-reach experiment (guests/tlbstress.s, guests/hugepages.s) in
; two calls, with the guest's own line about its mapping in between:
;
;   wset_bench   rdi = base, rsi = pages, rdx = passes n (2 to
;                WSET_MAX_PASSES), rcx = where the working set's frames are
;                seen through an identity map (its physical base)
;                -> rax = wrong values seen in all. Takes hv marks (hv.s):
;                mark 1, pass 0 (the cold pass), mark 2, passes 1 .. n - 1
;                (the steady state), mark 3; then wset_check of the frames
;                (n passes done). Records what each pass and the frames saw
;                for wset_report. Panics (serial.s) if n is out of range.
;   wset_report  rsi = format of the line for a run without a wrong value,
;                rdx, rcx, r8, r9 = its arguments. Never returns. Writes
;                (with check.s's say, so with the guest's prefix) "pass 0
;                wrote every page; passes 1-<n-1> read and checked every page
;                and wrote every fourth; the frames hold what the last pass
;                left", then a line "FAIL pass <k>: <m> pages held a wrong
;                value" for each pass that saw one and "FAIL frames read
;                through the identity map: <m> pages held a wrong value" if
;                the frames did; then, if no value was wrong, the line of
;                the format (sayf) and exit code 0, else "FAILED (<m> wrong
;                values in <pages * n> checks)" and exit code 1 (each read
;                of a page is a check: n - 1 passes and the frames).

WSET_TAG        = 0x5753455400000000        ; "WSET" in the high half
WSET_SLOT_MASK  = 0xFC0                     ; (p * 64) mod 4 KiB
WSET_MAX_PASSES = 16                        ; wset_bench's limit

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

; wset_bench: rdi = base, rsi = pages, rdx = passes, rcx = the frames
; -> rax = wrong values.
wset_bench:
    push rbx
    push rdx
    push rdi
    push r8
    push r9
    cmp rdx, 2
    jb .Lwset_bench_bad
    cmp rdx, WSET_MAX_PASSES
    ja .Lwset_bench_bad
    mov qword ptr [rip + wset_passes], rdx
    mov qword ptr [rip + wset_pages], rsi
    mov r8, rdx                 ; n
    lea r9, [rip + wset_mismatches]
    mov ebx, 1
    call hv_mark
    xor edx, edx
    call wset_pass              ; pass 0: the cold pass
    mov qword ptr [r9], rax
    mov ebx, 2
    call hv_mark
    mov edx, 1
.Lwset_bench_pass:
    call wset_pass              ; pass k: read, check, write every fourth page
    mov qword ptr [r9 + rdx*8], rax
    inc edx
    cmp rdx, r8
    jb .Lwset_bench_pass
    mov ebx, 3
    call hv_mark
    mov rdi, rcx                ; the frames, through the identity map
    call wset_check             ; rdx = n: what the last pass left
    mov qword ptr [r9 + r8*8], rax
    xor eax, eax
    xor edx, edx
.Lwset_bench_sum:
    add rax, qword ptr [r9 + rdx*8]
    inc edx
    cmp rdx, r8
    jbe .Lwset_bench_sum        ; the passes and the frames
    pop r9
    pop r8
    pop rdi
    pop rdx
    pop rbx
    ret
.Lwset_bench_bad:
    lea rsi, [rip + wset_msg_bad_passes]
    call panic

; wset_report: rsi = format, rdx, rcx, r8, r9 = arguments. Never returns.
wset_report:
    push r9                     ; the ok line, for the end
    push r8
    push rcx
    push rdx
    push rsi
    lea rsi, [rip + wset_msg_passes]
    mov rdx, qword ptr [rip + wset_passes]
    dec rdx
    call sayf
    xor r12d, r12d              ; wrong values
    lea r13, [rip + wset_mismatches]
    xor ebx, ebx                ; pass k
.Lwset_report_pass:
    mov rcx, qword ptr [r13 + rbx*8]
    test rcx, rcx
    jz .Lwset_report_next
    add r12, rcx
    lea rsi, [rip + wset_msg_fail_pass]
    mov rdx, rbx
    call sayf
.Lwset_report_next:
    inc rbx
    cmp rbx, qword ptr [rip + wset_passes]
    jb .Lwset_report_pass
    mov rdx, qword ptr [r13 + rbx*8]    ; the frames
    test rdx, rdx
    jz .Lwset_report_verdict
    add r12, rdx
    lea rsi, [rip + wset_msg_fail_frames]
    call sayf
.Lwset_report_verdict:
    test r12, r12
    jnz .Lwset_report_failed
    pop rsi
    pop rdx
    pop rcx
    pop r8
    pop r9
    call sayf
    mov al, CHECK_EXIT_OK
    jmp exit
.Lwset_report_failed:
    mov rcx, qword ptr [rip + wset_pages]
    imul rcx, qword ptr [rip + wset_passes]
    mov rdx, r12
    lea rsi, [rip + wset_msg_failed]
    call sayf
    mov al, CHECK_EXIT_FAILED
    jmp exit

wset_msg_passes:
    .asciz "pass 0 wrote every page; passes 1-%d read and checked every page and wrote every fourth; the frames hold what the last pass left\n"
wset_msg_fail_pass:
    .asciz "FAIL pass %d: %d pages held a wrong value\n"
wset_msg_fail_frames:
    .asciz "FAIL frames read through the identity map: %d pages held a wrong value\n"
wset_msg_failed:
    .asciz "FAILED (%d wrong values in %d checks)\n"
wset_msg_bad_passes:
    .asciz "wset: wset_bench needs 2 to WSET_MAX_PASSES passes"

; Data, in a page of its own (see gdt.s).
.align 4096
wset_passes:                    ; wset_bench's n ...
    .quad 0
wset_pages:                     ; ... and pages
    .quad 0
wset_mismatches:                ; wrong values seen by pass k at [k], by the frames at [n]
    .zero 8 * (WSET_MAX_PASSES + 1)
.align 4096
