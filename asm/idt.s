; asm/idt.s -- an IDT for the 32 exception vectors, with per-vector handlers.
;
; Needs serial.s (the default handler prints), and gdt.s loaded first with
; gdt_init: #DF runs on the TSS's IST1 stack, and the gates use selector
; 0x08 (the code segment of both gdt.s and the boot GDT).
;
; Every vector has a stub (IDT_STUB_SIZE bytes apart from idt_stubs) that
; pushes 0 in place of an error code if the CPU pushes none, then the vector
; number, and jumps to one common entry. That entry saves every
; general-purpose register, calls the vector's handler from a table with rdi
; pointing at the saved frame, then restores the registers from the frame,
; drops the vector and error code, and returns with iretq. So a handler that
; returns resumes the interrupted code: at the faulting instruction for a
; fault (#PF retries the access), after it for a trap. A handler is entered
; with `call` and leaves with `ret`; it may change the frame (e.g. FRAME_RIP,
; FRAME_RAX) to resume elsewhere or with other register values, and may
; clobber every general-purpose register but rsp. It runs with interrupts
; off (interrupt gates), on the interrupted stack or on its IST stack.
;
; The frame (rdi in the handler), offsets from its lowest address:
;
;   FRAME_R15 0    FRAME_R11 32   FRAME_RBP 64    FRAME_RCX 96
;   FRAME_R14 8    FRAME_R10 40   FRAME_RDI 72    FRAME_RBX 104
;   FRAME_R13 16   FRAME_R9  48   FRAME_RSI 80    FRAME_RAX 112
;   FRAME_R12 24   FRAME_R8  56   FRAME_RDX 88
;   FRAME_VECTOR 120   the vector number
;   FRAME_ERROR  128   the error code (0 for vectors without one)
;   FRAME_RIP    136   what the CPU pushed: RIP, CS, RFLAGS, RSP, SS
;   FRAME_CS     144
;   FRAME_RFLAGS 152
;   FRAME_RSP    160   RSP of the interrupted code
;   FRAME_SS     168
;   FRAME_SIZE   176
;
; Calling convention as in serial.s (every register preserved unless listed,
; RFLAGS clobbered).
;
;   idt_init          builds the IDT (vectors 0-31, interrupt gates, DPL 0,
;                     #DF on IST1, every handler idt_default_handler) and
;                     loads it (lidt)
;   idt_load          loads the IDT that idt_init built (lidt), on another
;                     vCPU: the IDT and its handlers are shared, each vCPU
;                     loads IDTR itself. Call it after idt_init has run
;                     (on some vCPU). #DF still switches to IST1, which
;                     needs a TSS loaded on this vCPU (gdt_init loads the
;                     library's one TSS on one vCPU only): without one, a
;                     #DF there is a triple fault.
;   idt_set_handler   rdi = vector (0-31), rsi = handler address
;   idt_set_ist       rdi = vector (0-31), rsi = IST index (1-7, 0 = none):
;                     the stack the CPU switches to for that vector (gdt.s
;                     provides IST1). The CPU starts at the top of an IST
;                     stack on every delivery, so a handler on one must not
;                     take another exception that uses the same stack.
;   idt_default_handler   the handler of every vector until replaced: prints
;                     "unexpected exception <vector> at rip=<hex> err=<hex>
;                     cr2=<hex>" (vector in decimal, hex as put_hex prints)
;                     and exits with EXIT_EXCEPTION (0xEE)
;
; A vector out of range panics (serial.s).

IDT_VECTORS     = 32
IDT_STUB_SIZE   = 16
IDT_GATE_SIZE   = 16
IDT_CODE_SEL    = 0x08
IDT_GATE_INTR   = 0x8E          ; present, DPL 0, type 0xE: 64-bit interrupt gate
IDT_DF_IST      = 1             ; #DF runs on the TSS's IST1 stack
EXIT_EXCEPTION  = 0xEE

FRAME_R15       = 0
FRAME_R14       = 8
FRAME_R13       = 16
FRAME_R12       = 24
FRAME_R11       = 32
FRAME_R10       = 40
FRAME_R9        = 48
FRAME_R8        = 56
FRAME_RBP       = 64
FRAME_RDI       = 72
FRAME_RSI       = 80
FRAME_RDX       = 88
FRAME_RCX       = 96
FRAME_RBX       = 104
FRAME_RAX       = 112
FRAME_VECTOR    = 120
FRAME_ERROR     = 128
FRAME_RIP       = 136
FRAME_CS        = 144
FRAME_RFLAGS    = 152
FRAME_RSP       = 160
FRAME_SS        = 168
FRAME_SIZE      = 176

; idt_init: no arguments.
idt_init:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    lea rsi, [rip + idt_stubs]          ; the stub of vector 0
    lea rdi, [rip + idt_table]          ; its gate
    lea r8, [rip + idt_handlers]
    xor ecx, ecx                        ; vector
.Lidt_init_gate:
    ; A 64-bit gate (SDM Vol.3A §6.14.1, Figure 6-8), from the stub address:
    ;   low  = offset[15:0] | selector << 16 | IST << 32 | type/DPL/P << 40
    ;          | offset[31:16] << 48
    ;   high = offset[63:32]
    mov eax, esi
    and eax, 0xFFFF
    mov edx, IDT_CODE_SEL
    shl rdx, 16
    or rax, rdx
    mov edx, IDT_GATE_INTR
    shl rdx, 40
    or rax, rdx
    mov rdx, rsi
    shr rdx, 16
    and edx, 0xFFFF
    shl rdx, 48
    or rax, rdx
    mov qword ptr [rdi], rax
    mov rdx, rsi
    shr rdx, 32
    mov qword ptr [rdi + 8], rdx
    lea rax, [rip + idt_default_handler]
    mov qword ptr [r8 + rcx*8], rax
    add rsi, IDT_STUB_SIZE
    add rdi, IDT_GATE_SIZE
    inc ecx
    cmp ecx, IDT_VECTORS
    jb .Lidt_init_gate

    mov edi, 8                          ; #DF
    mov esi, IDT_DF_IST
    call idt_set_ist
    lidt [rip + idt_ptr]
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret

; idt_load: no arguments.
idt_load:
    lidt [rip + idt_ptr]
    ret

; idt_set_handler: rdi = vector, rsi = handler.
idt_set_handler:
    push rax
    call idt_check_vector
    lea rax, [rip + idt_handlers]
    mov qword ptr [rax + rdi*8], rsi
    pop rax
    ret

; idt_set_ist: rdi = vector, rsi = IST index (0-7).
idt_set_ist:
    push rax
    push rdx
    call idt_check_vector
    mov rdx, rdi
    shl rdx, 4                          ; * IDT_GATE_SIZE
    lea rax, [rip + idt_table]
    add rdx, rax                        ; the gate
    mov eax, esi
    and eax, 7
    mov byte ptr [rdx + 4], al          ; gate bits 39:32: IST in bits 34:32
    pop rdx
    pop rax
    ret

; idt_check_vector: rdi = vector; panics unless it is below IDT_VECTORS.
idt_check_vector:
    cmp rdi, IDT_VECTORS
    jae .Lidt_bad_vector
    ret
.Lidt_bad_vector:
    lea rsi, [rip + idt_msg_bad_vector]
    call panic

; idt_default_handler: rdi = frame. Never returns.
idt_default_handler:
    mov rbx, rdi
    lea rsi, [rip + idt_msg_unexpected]
    call puts
    mov rax, qword ptr [rbx + FRAME_VECTOR]
    call put_dec
    lea rsi, [rip + idt_msg_rip]
    call puts
    mov rax, qword ptr [rbx + FRAME_RIP]
    call put_hex
    lea rsi, [rip + idt_msg_err]
    call puts
    mov rax, qword ptr [rbx + FRAME_ERROR]
    call put_hex
    lea rsi, [rip + idt_msg_cr2]
    call puts
    mov rax, cr2
    call put_hex
    call newline
    mov al, EXIT_EXCEPTION
    jmp exit

; The common entry: the stub has pushed the error code (or 0) and the vector.
idt_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp                        ; the frame
    mov rax, qword ptr [rsp + FRAME_VECTOR]
    lea rbx, [rip + idt_handlers]
    call qword ptr [rbx + rax*8]
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16                         ; the vector and the error code
    iretq

; The stubs, IDT_STUB_SIZE bytes apart: each pushes 0 where the CPU pushes no
; error code (it pushes one for vectors 8, 10-14, 17, 21, 29 and 30: SDM
; Vol.3A §6.3.1, Table 6-1), then its vector, and jumps to idt_common.
.align IDT_STUB_SIZE
idt_stubs:
    .align IDT_STUB_SIZE
    push 0                              ; 0: #DE divide error
    push 0
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 1: #DB debug
    push 1
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 2: NMI
    push 2
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 3: #BP breakpoint
    push 3
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 4: #OF overflow
    push 4
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 5: #BR bound range
    push 5
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 6: #UD invalid opcode
    push 6
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 7: #NM device not available
    push 7
    jmp idt_common
    .align IDT_STUB_SIZE
    push 8                              ; 8: #DF double fault (error code 0), error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 9: coprocessor segment overrun
    push 9
    jmp idt_common
    .align IDT_STUB_SIZE
    push 10                             ; 10: #TS invalid TSS, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 11                             ; 11: #NP segment not present, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 12                             ; 12: #SS stack fault, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 13                             ; 13: #GP general protection, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 14                             ; 14: #PF page fault, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 15: reserved
    push 15
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 16: #MF x87 error
    push 16
    jmp idt_common
    .align IDT_STUB_SIZE
    push 17                             ; 17: #AC alignment check, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 18: #MC machine check
    push 18
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 19: #XM SIMD exception
    push 19
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 20: #VE virtualization exception
    push 20
    jmp idt_common
    .align IDT_STUB_SIZE
    push 21                             ; 21: #CP control protection, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 22: reserved
    push 22
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 23: reserved
    push 23
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 24: reserved
    push 24
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 25: reserved
    push 25
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 26: reserved
    push 26
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 27: reserved
    push 27
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 28: reserved
    push 28
    jmp idt_common
    .align IDT_STUB_SIZE
    push 29                             ; 29: #VC VMM communication, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 30                             ; 30: #SX security exception, error code pushed by the CPU
    jmp idt_common
    .align IDT_STUB_SIZE
    push 0                              ; 31: reserved
    push 31
    jmp idt_common

idt_msg_unexpected:
    .asciz "unexpected exception "
idt_msg_rip:
    .asciz " at rip="
idt_msg_err:
    .asciz " err="
idt_msg_cr2:
    .asciz " cr2="
idt_msg_bad_vector:
    .asciz "idt: vector out of range"

; Data, in pages of its own (see gdt.s).
.align 4096
idt_table:                              ; IDT_VECTORS gates
    .zero IDT_VECTORS * IDT_GATE_SIZE
idt_ptr:                                ; the operand of lidt: limit, then base
    .word IDT_VECTORS * IDT_GATE_SIZE - 1
    .quad idt_table
.align 8
idt_handlers:                           ; IDT_VECTORS handler addresses
    .zero IDT_VECTORS * 8
.align 4096
