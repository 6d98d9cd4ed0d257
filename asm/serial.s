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
