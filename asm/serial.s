; asm/serial.s -- console output on the platform's serial port, and exit.
;
; The platform (README.md, "Guest boot ABI"): a byte written to port 0x3f8
; appears on the console; port 0x3fd is the 16550 line status register (bit 5
; set: the transmitter can take a byte); a byte written to port 0xf4 ends the
; VM with that byte as its exit code.
;
; How to include the library: the image is entered at its first byte, so the
; guest's own code must come first. The samples jump over the library, which
; also defines its names before the guest uses them:
;
;       jmp main
;   .include "serial.s"
;   main:
;       ...
;
; (`.include` at the end of the guest works as well: hv's assembler resolves
; forward references.) Files that need another one say so; none includes
; another itself, so each is included once.
;
; Calling convention of every routine in asm/: arguments in the registers
; named below, result (if any) in rax; every other general-purpose register
; is preserved; RFLAGS is clobbered. Routines need a valid stack.
;
;   putc     al  = byte                 write one byte
;   puts     rsi = NUL-terminated string
;   newline                             write "\n"
;   put_hex  rax = value                "0x" and the shortest lowercase hex
;                                       form: 0 -> "0x0", 255 -> "0xff"
;   put_dec  rax = value                unsigned decimal: 0 -> "0", 512 -> "512"
;   putf     rsi = format, rdx, rcx, r8, r9 = its arguments
;                                       writes the format (NUL-terminated),
;                                       in which %d writes the next argument
;                                       as put_dec does, %x as put_hex does,
;                                       %s the NUL-terminated string it
;                                       points to, and %% a "%". Arguments
;                                       are taken in the order rdx, rcx, r8,
;                                       r9 (System V's after rdi and rsi):
;                                       at most four; a fifth conversion,
;                                       or any other after "%", panics
;   exit     al  = exit code            ends the VM; never returns (if the
;                                       port write does not stop the vCPU,
;                                       it halts)
;   panic    rsi = message              prints "panic: <message>" and a
;                                       newline, then exits with EXIT_PANIC;
;                                       never returns
;
; Exit codes used by the library: EXIT_PANIC (0xED) from panic; the default
; exception handler of idt.s exits with EXIT_EXCEPTION (0xEE).

SERIAL_PORT       = 0x3f8       ; transmit holding register
SERIAL_LSR        = 0x3fd       ; line status register
SERIAL_LSR_THRE   = 0x20        ; line status: transmitter holding register empty
EXIT_PORT         = 0xf4        ; isa-debug-exit style: the byte is the exit code
EXIT_PANIC        = 0xED

; putc: al = byte. Waits until the transmitter is ready, as a driver for a
; real 16550 must (each poll is one more I/O exit).
putc:
    push rdx
    push rax
    mov dx, SERIAL_LSR
.Lputc_wait:
    in al, dx
    test al, SERIAL_LSR_THRE
    jz .Lputc_wait
    pop rax
    mov dx, SERIAL_PORT
    out dx, al
    pop rdx
    ret

; puts: rsi = NUL-terminated string.
puts:
    push rax
    push rsi
.Lputs_next:
    mov al, byte ptr [rsi]
    test al, al
    jz .Lputs_done
    call putc
    inc rsi
    jmp .Lputs_next
.Lputs_done:
    pop rsi
    pop rax
    ret

; newline: writes "\n".
newline:
    push rax
    mov al, 10
    call putc
    pop rax
    ret

; put_hex: rax = value, printed as "0x" and its hex digits without leading
; zeros (at least one digit).
put_hex:
    push rax
    push rcx
    push rdx
    mov rdx, rax                ; the value
    mov al, '0'
    call putc
    mov al, 'x'
    call putc
    mov ecx, 60                 ; shift of the most significant nibble
.Lput_hex_skip:                 ; skip leading zero nibbles, keep the last one
    test ecx, ecx
    jz .Lput_hex_digit
    mov rax, rdx
    shr rax, cl
    test al, 0xF
    jnz .Lput_hex_digit
    sub ecx, 4
    jmp .Lput_hex_skip
.Lput_hex_digit:
    mov rax, rdx
    shr rax, cl
    and eax, 0xF
    cmp al, 10
    jb .Lput_hex_decimal
    add al, 'a' - 10 - '0'
.Lput_hex_decimal:
    add al, '0'
    call putc
    sub ecx, 4
    jns .Lput_hex_digit         ; down to and including shift 0
    pop rdx
    pop rcx
    pop rax
    ret

; put_dec: rax = value, printed in unsigned decimal.
put_dec:
    push rax
    push rbx
    push rcx
    push rdx
    mov ebx, 10
    xor ecx, ecx                ; digits pushed
.Lput_dec_divide:               ; push the digits, least significant first
    xor edx, edx
    div rbx
    push rdx
    inc ecx
    test rax, rax
    jnz .Lput_dec_divide
.Lput_dec_print:                ; pop them, most significant first
    pop rax
    add al, '0'
    call putc
    dec ecx
    jnz .Lput_dec_print
    pop rdx
    pop rcx
    pop rbx
    pop rax
    ret

; putf: rsi = format, rdx, rcx, r8, r9 = arguments.
putf:
    push rax
    push rsi
    push rdi
    push r9                     ; the arguments, in order from [rsp] up
    push r8
    push rcx
    push rdx
    mov rdi, rsp                ; the next argument
.Lputf_next:
    mov al, byte ptr [rsi]
    inc rsi
    test al, al
    jz .Lputf_done
    cmp al, '%'
    jne .Lputf_char
    mov al, byte ptr [rsi]
    inc rsi
    cmp al, '%'
    je .Lputf_char
    lea rax, [rsp + 32]         ; past the fourth argument
    cmp rdi, rax
    jae .Lputf_too_many
    mov al, byte ptr [rsi - 1]
    cmp al, 'd'
    je .Lputf_dec
    cmp al, 'x'
    je .Lputf_hex
    cmp al, 's'
    jne .Lputf_bad
    push rsi
    mov rsi, qword ptr [rdi]
    call puts
    pop rsi
    jmp .Lputf_arg_done
.Lputf_dec:
    mov rax, qword ptr [rdi]
    call put_dec
    jmp .Lputf_arg_done
.Lputf_hex:
    mov rax, qword ptr [rdi]
    call put_hex
.Lputf_arg_done:
    add rdi, 8
    jmp .Lputf_next
.Lputf_char:
    call putc
    jmp .Lputf_next
.Lputf_done:
    pop rdx
    pop rcx
    pop r8
    pop r9
    pop rdi
    pop rsi
    pop rax
    ret
.Lputf_too_many:
    lea rsi, [rip + putf_msg_too_many]
    call panic
.Lputf_bad:
    lea rsi, [rip + putf_msg_bad]
    call panic

; exit: al = exit code. Never returns.
exit:
    mov dx, EXIT_PORT
    out dx, al
.Lexit_halt:                    ; only reached if the port did not end the VM
    hlt
    jmp .Lexit_halt

; panic: rsi = message. Prints "panic: <message>\n", exits with EXIT_PANIC.
panic:
    push rsi
    lea rsi, [rip + panic_prefix]
    call puts
    pop rsi
    call puts
    call newline
    mov al, EXIT_PANIC
    jmp exit

panic_prefix:
    .asciz "panic: "
putf_msg_too_many:
    .asciz "putf: more than four arguments"
putf_msg_bad:
    .asciz "putf: a conversion other than %d, %x, %s or %%"
