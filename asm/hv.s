; asm/hv.s -- hv's hypercalls.
;
; A hypercall is `vmcall` with its number in rax; the result comes back in
; rax (-1000, KVM's -ENOSYS, for an unknown number). See README.md,
; "Platform".
;
; Calling convention as in serial.s: every general-purpose register is
; preserved unless listed; RFLAGS is clobbered.
;
;   hv_mark   rbx = id     hypercall 0, MARK: hv records a snapshot of every
;                          counter under `id`; Result.between(a, b) in Python
;                          gives what happened between marks a and b. The
;                          snapshot includes this vmcall. Preserves rax too.

HC_MARK = 0

; hv_mark: rbx = mark id.
hv_mark:
    push rax
    mov eax, HC_MARK
    vmcall
    pop rax
    ret
