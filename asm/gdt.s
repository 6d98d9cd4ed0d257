; asm/gdt.s -- the guest's own 64-bit GDT and TSS.
;
; The boot ABI's GDT (at 0x1000) has code at 0x08 and data at 0x10 but no
; TSS, so no IST stacks. This file brings a GDT with the same two selectors
; plus a 64-bit TSS whose IST1 is a stack of its own (GDT_IST1_STACK_SIZE
; bytes inside the image), so that an exception handler put on IST1 (idt.s
; puts #DF there) runs on a known-good stack whatever RSP was when the fault
; came.
;
;   selector  descriptor
;   0x00      null
;   0x08      GDT_CODE_SEL  code: 64-bit (L=1), present, DPL 0, execute/read
;   0x10      GDT_DATA_SEL  data: present, DPL 0, read/write
;   0x18      GDT_TSS_SEL   64-bit TSS (16 bytes), filled in by gdt_init
;
; Calling convention as in serial.s (every register preserved unless listed,
; RFLAGS clobbered).
;
;   gdt_init     loads the GDT (lgdt), reloads DS/ES/SS with GDT_DATA_SEL and
;                FS/GS with the null selector, reloads CS with a far return,
;                points TSS.IST1 at the IST1 stack and loads TR (ltr).
;                Call it once, on one vCPU: there is a single TSS, and ltr of
;                a busy TSS faults.
;
; Names other files may use: gdt_tss (the TSS), gdt_ist1_stack (lowest
; address of the IST1 stack), gdt_ist1_stack_top (its top: the value in
; TSS.IST1). TSS.RSP0 is 0: these guests never run at CPL 3.

GDT_CODE_SEL        = 0x08
GDT_DATA_SEL        = 0x10
GDT_TSS_SEL         = 0x18

; 64-bit TSS layout (SDM Vol.3A §8.7, Figure 8-11)
TSS_RSP0            = 0x04
TSS_IST1            = 0x24
TSS_IOPB            = 0x66      ; I/O permission bitmap offset
TSS_SIZE            = 104
TSS_DESC_TYPE       = 0x89      ; present, DPL 0, type 9: available 64-bit TSS
GDT_IST1_STACK_SIZE = 4096

; gdt_init: no arguments.
gdt_init:
    push rax
    push rcx
    push rdx

    ; TSS: IST1 = top of its stack; an I/O bitmap offset at the TSS limit
    ; means "no I/O bitmap".
    lea rax, [rip + gdt_ist1_stack_top]
    mov qword ptr [rip + gdt_tss + TSS_IST1], rax
    mov word ptr [rip + gdt_tss + TSS_IOPB], TSS_SIZE

    ; The TSS descriptor (SDM Vol.3A §8.2.3, Figure 8-4), from its base:
    ;   low  = limit[15:0] | base[23:0] << 16 | type/P/DPL << 40
    ;          | limit[19:16] << 48 | base[31:24] << 56
    ;   high = base[63:32]
    lea rax, [rip + gdt_tss]
    mov rdx, rax
    and edx, 0xFFFFFF
    shl rdx, 16
    or rdx, TSS_SIZE - 1
    mov rcx, TSS_DESC_TYPE
    shl rcx, 40
    or rdx, rcx
    mov rcx, rax
    shr rcx, 24
    and ecx, 0xFF
    shl rcx, 56
    or rdx, rcx
    mov qword ptr [rip + gdt_tss_desc], rdx
    mov rcx, rax
    shr rcx, 32
    mov qword ptr [rip + gdt_tss_desc + 8], rcx

    lgdt [rip + gdt_ptr]
    mov ax, GDT_DATA_SEL
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax

    ; CS can only be reloaded by a far transfer: return "far" to the next
    ; instruction with the new code selector.
    push GDT_CODE_SEL
    lea rax, [rip + .Lgdt_init_new_cs]
    push rax
    retfq
.Lgdt_init_new_cs:
    mov ax, GDT_TSS_SEL
    ltr ax                      ; marks the descriptor busy (a write to the GDT)

    pop rdx
    pop rcx
    pop rax
    ret

; Data: in pages of its own, because hv (like a real CPU's code caches) pays
; for writes to a page it also runs code from (ARCHITECTURE.md).
.align 4096
gdt_table:
    .quad 0                     ; 0x00 null
    .quad 0x00AF9A000000FFFF    ; 0x08 code: G, L, P, DPL 0, execute/read
    .quad 0x00CF92000000FFFF    ; 0x10 data: G, D/B, P, DPL 0, read/write
gdt_tss_desc:
    .quad 0, 0                  ; 0x18 TSS: filled in by gdt_init
gdt_table_end:

gdt_ptr:                        ; the operand of lgdt: limit, then base
    .word gdt_table_end - gdt_table - 1
    .quad gdt_table

.align 16
gdt_tss:
    .zero TSS_SIZE

.align 16
gdt_ist1_stack:
    .zero GDT_IST1_STACK_SIZE
gdt_ist1_stack_top:
.align 4096
