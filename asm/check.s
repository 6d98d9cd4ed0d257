; asm/check.s -- a guest's console lines, its counted checks and its verdict.
;
; Needs serial.s; check_pf_frame also needs gdt.s and idt.s (the IST1 stack
; and the exception frame).
;
; Every line a guest prints starts with its name. The guest says what that
; is with one label of its own, the prefix of its lines:
;
;   check_prefix:   .asciz "pagetouch: "
;
; A check compares a value the guest read with the value it expected. Every
; check is counted; a failed one is counted too, reported at once (for the
; first CHECK_MAX_REPORTED failures), and the run goes on, so one run shows
; every kind of failure. At the end check_verdict prints the result line and
; ends the VM: exit code 0 if every check passed, 1 if not.
;
; Calling convention as in serial.s (every register preserved unless listed,
; RFLAGS clobbered).
;
;   say             rsi = message: writes check_prefix, then the message
;   sayf            rsi = format, rdx, rcx, r8, r9 = its arguments: writes
;                   check_prefix, then the format as putf (serial.s) does
;   check           rax = actual, rdx = expected, rsi = what is checked (a
;                   string), rdi = the address involved: counts the check;
;                   if rax != rdx, counts a failure and writes
;                   "<prefix>FAIL <what> at <rdi>: got <rax>, expected <rdx>"
;                   (addresses and values as put_hex writes them) and a
;                   newline, for the first CHECK_MAX_REPORTED failures
;   check_tally     rax = checks made elsewhere (in a loop that must not
;                   call, or on another vCPU), rdx = how many of them failed:
;                   adds them to the counts; writes nothing
;   check_pf_frame  rdi = the frame of a #PF handler (idt.s) that runs on
;                   IST1, rdx = the error code expected, rcx = the RIP
;                   expected (the faulting instruction): three checks, with
;                   CR2 as their address: "#PF error code", "#PF rip (the
;                   faulting instruction)" and "#PF handler runs on the IST1
;                   stack" (gdt.s's; rsp is inside it)
;   check_verdict   rsi = format of the line for a run whose checks all
;                   passed, rdx, rcx, r8, r9 = its arguments. Never returns:
;                   if no check failed, sayf(format, ...) and exit code 0;
;                   else "<prefix>FAILED (<failures> of <checks> checks)",
;                   a newline and exit code 1
;
; The counts are qwords the guest may read (not write): check_count, the
; checks made, and check_failures, those that failed. Their updates are
; plain read-modify-write instructions, so checks on several vCPUs at once
; need counts of their own (guests/smp.s keeps them per vCPU and hands the
; totals to check_tally).

CHECK_MAX_REPORTED  = 10        ; FAIL lines written at most
CHECK_EXIT_OK       = 0
CHECK_EXIT_FAILED   = 1

; say: rsi = message.
say:
    push rsi
    lea rsi, [rip + check_prefix]
    call puts
    pop rsi
    jmp puts

; sayf: rsi = format, rdx, rcx, r8, r9 = arguments.
sayf:
    push rsi
    lea rsi, [rip + check_prefix]
    call puts
    pop rsi
    jmp putf

; check: rax = actual, rdx = expected, rsi = what, rdi = address.
check:
    inc qword ptr [rip + check_count]
    cmp rax, rdx
    jne .Lcheck_failed
    ret
.Lcheck_failed:
    inc qword ptr [rip + check_failures]
    cmp qword ptr [rip + check_failures], CHECK_MAX_REPORTED
    ja .Lcheck_done
    push rcx
    push rdx
    push rsi
    push r8
    push r9
    mov r9, rdx                 ; expected
    mov r8, rax                 ; got
    mov rcx, rdi                ; at
    mov rdx, rsi                ; what
    lea rsi, [rip + check_msg_fail]
    call sayf
    pop r9
    pop r8
    pop rsi
    pop rdx
    pop rcx
.Lcheck_done:
    ret

; check_tally: rax = checks, rdx = failures among them.
check_tally:
    add qword ptr [rip + check_count], rax
    add qword ptr [rip + check_failures], rdx
    ret

; check_pf_frame: rdi = frame, rdx = error code, rcx = RIP expected.
check_pf_frame:
    push rax
    push rdx
    push rsi
    push rdi
    push r8
    mov r8, rdi                 ; the frame
    mov rdi, cr2                ; the address the checks name
    lea rsi, [rip + check_msg_pf_err]
    mov rax, qword ptr [r8 + FRAME_ERROR]
    call check
    lea rsi, [rip + check_msg_pf_rip]
    mov rax, qword ptr [r8 + FRAME_RIP]
    mov rdx, rcx
    call check
    lea rsi, [rip + check_msg_pf_stack]
    lea rdx, [rip + gdt_ist1_stack]
    mov rax, rsp
    sub rax, rdx
    cmp rax, GDT_IST1_STACK_SIZE
    setb al
    movzx eax, al               ; 1 if rsp is inside the IST1 stack
    mov edx, 1
    call check
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rax
    ret

; check_verdict: rsi = format of the ok line, rdx, rcx, r8, r9 = arguments.
; Never returns.
check_verdict:
    cmp qword ptr [rip + check_failures], 0
    jne .Lcheck_verdict_failed
    call sayf
    mov al, CHECK_EXIT_OK
    jmp exit
.Lcheck_verdict_failed:
    lea rsi, [rip + check_msg_failed]
    mov rdx, qword ptr [rip + check_failures]
    mov rcx, qword ptr [rip + check_count]
    call sayf
    mov al, CHECK_EXIT_FAILED
    jmp exit

check_msg_fail:
    .asciz "FAIL %s at %x: got %x, expected %x\n"
check_msg_failed:
    .asciz "FAILED (%d of %d checks)\n"
check_msg_pf_err:
    .asciz "#PF error code"
check_msg_pf_rip:
    .asciz "#PF rip (the faulting instruction)"
check_msg_pf_stack:
    .asciz "#PF handler runs on the IST1 stack"

; Data, in a page of its own (see gdt.s).
.align 4096
check_count:                    ; checks made
    .quad 0
check_failures:                 ; checks failed
    .quad 0
.align 4096
