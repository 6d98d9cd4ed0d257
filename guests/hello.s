; hello.s -- the smallest useful guest: say hello on the console, then exit.
;
; Every vCPU starts at the first byte of the image, in 64-bit mode, with
; rdi = its index and rsi = the number of vCPUs (README.md, "Guest boot
; ABI"). Each one prints its line; vCPU 0 waits until all of them have, then
; ends the VM with exit code 0 by writing it to port 0xf4.
;
;   $ hv run hello --vcpus 2
;   hello from hv: vcpu 0 of 2
;   hello from hv: vcpu 1 of 2

    jmp start                   ; jump over the library (asm/serial.s)

.include "serial.s"

start:
    mov r12, rdi                ; this vCPU's index
    mov r13, rsi                ; the number of vCPUs

    lea rsi, [rip + greeting]
    call puts
    mov rax, r12
    call put_dec
    lea rsi, [rip + of]
    call puts
    mov rax, r13
    call put_dec
    call newline

    lock inc qword ptr [rip + greeted]
    test r12, r12
    jnz done                    ; not vCPU 0: nothing more to do

wait_for_all:                   ; vCPU 0: wait for every other vCPU's line
    pause
    cmp qword ptr [rip + greeted], r13
    jb wait_for_all
    mov al, 0
    call exit                   ; never returns

done:
    hlt                         ; interrupts are off: this vCPU stops here
    jmp done

greeting:
    .asciz "hello from hv: vcpu "
of:
    .asciz " of "
greeted:                        ; vCPUs that have printed their line
    .quad 0
