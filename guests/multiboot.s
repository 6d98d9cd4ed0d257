; multiboot.s -- a multiboot kernel of hv's own: 32-bit entry, its own switch
; to long mode, APIC timer interrupts, and application processors started
; with INIT and SIPI.
;
; hv boots this source as a multiboot kernel, not by its own boot ABI: its
; image carries a multiboot header whose "a.out kludge" (flags bit 16,
; Multiboot Specification 0.6.96 §3.1.3) says where the flat image goes and
; where it is entered (README.md, "Booting real kernels"). So it starts as
; a multiboot loader leaves the CPU: 32-bit protected mode, paging off,
; eax = 0x2BADB002, ebx = the multiboot information (MBI). vCPU 0 (the
; bootstrap processor, BSP):
;
;   1. checks the magic number, loads its own GDT, builds identity page
;      tables (the low 4 MiB in 2 MiB pages, the local APIC's page in a
;      4 KiB one) in the BSS the header asks the loader to zero, and turns
;      on long mode itself: CR4.PAE, CR3, EFER.LME (WRMSR), CR0.PG, then a
;      far jump to 64-bit code
;   2. loads the library's GDT and IDT (asm/gdt.s, asm/idt.s), prints the
;      boot loader's name and the command line from the MBI
;   3. programs its local APIC (xAPIC MMIO at 0xFEE00000): software enable
;      (SPIV), the timer periodic on TIMER_VECTOR, and takes TICKS timer
;      interrupts with STI; HLT, each handler ending with an EOI
;   4. counts the vCPUs (fw_cfg, as kvm-unit-tests does), copies the 16-bit
;      trampoline to TRAMPOLINE, below 1 MiB where real mode reaches, and
;      sends INIT, then a start-up IPI, to all other vCPUs. Each
;      application processor (AP) starts in real mode at the trampoline,
;      goes to protected mode and on to long mode through the BSP's path,
;      and reports in, one at a time, in APIC ID order
;   5. prints the result line and exits with code 0 through port 0xf4
;
; Exit codes: 0 ok, 1 entered without the multiboot magic number in eax,
; 0xEE an unexpected exception (asm/idt.s reports it).
;
;   $ hv run multiboot --vcpus 2
;   multiboot: 32-bit protected mode, paging off, eax = 0x2badb002
;   ...
;   multiboot: ok (2 vcpus, 3 timer interrupts)

MB_MAGIC        = 0x1BADB002    ; the header's (§3.1.1)
MB_BOOT_MAGIC   = 0x2BADB002    ; in eax at entry (§3.2)
MB_AOUT_KLUDGE  = 1 << 16       ; the header has load addresses (§3.1.3)
MBI_CMDLINE     = 1 << 2        ; MBI flags (§3.3): which fields are valid
MBI_LOADER_NAME = 1 << 9
MBI_CMDLINE_AT  = 16            ; MBI fields' offsets
MBI_LOADER_AT   = 64

CODE64_SEL      = 0x08          ; boot_gdt: the selectors of asm/gdt.s's GDT,
DATA_SEL        = 0x10          ; and 32-bit code for the way up
CODE32_SEL      = 0x18

CR0_PE          = 1 << 0
CR0_PG          = 1 << 31
CR4_PAE         = 1 << 5
MSR_EFER        = 0xC0000080
EFER_LME        = 1 << 8

PTE_P           = 1 << 0
PTE_RW          = 1 << 1
PTE_PWT         = 1 << 3
PTE_PCD         = 1 << 4
PTE_PS          = 1 << 7        ; a 2 MiB page in a page directory

APIC_BASE       = 0xFEE00000    ; every vCPU's own local APIC (xAPIC MMIO)
APIC_ID         = 0x20          ; register offsets, SDM Vol.3A §11.4.1
APIC_EOI        = 0xB0
APIC_SPIV       = 0xF0
APIC_ICR_LO     = 0x300
APIC_LVT_TIMER  = 0x320
APIC_TIMER_INIT = 0x380
APIC_TIMER_DIV  = 0x3E0
SPIV_ENABLE     = 1 << 8
SPURIOUS_VECTOR = 0xFF
TIMER_PERIODIC  = 1 << 17
TIMER_DIV_1     = 0xB           ; count every cycle of the vCPU's clock
TIMER_COUNT     = 100000        ; cycles between ticks
TICKS           = 3
; The library's IDT (asm/idt.s) has gates for vectors 0-31 only; the local
; APIC accepts any vector from 16 (SDM Vol.3A §11.5.2), so the timer takes
; the last of them.
TIMER_VECTOR    = 31
ICR_INIT        = 5 << 8        ; delivery modes
ICR_STARTUP     = 6 << 8
ICR_ASSERT      = 1 << 14
ICR_OTHERS      = 3 << 18       ; shorthand: all excluding self

FW_CFG_SELECTOR = 0x510         ; QEMU's fw_cfg (hv/devices/fwcfg.py)
FW_CFG_DATA     = 0x511
FW_CFG_NB_CPUS  = 0x05

; Where APs start: the SIPI's vector names the page (CS = vector << 8, IP =
; 0), below 1 MiB, in conventional memory the multiboot memory map gives.
TRAMPOLINE      = 0x8000
MAX_CPUS        = 16            ; hv's most
STACK_SIZE      = 0x2000        ; each vCPU's, by APIC ID

; The BSS (zeroed by the loader, up to bss_end_addr): page tables, stacks,
; variables; nothing of it is in the image file.
BSS             = (image_end + 0xFFF) & ~0xFFF
PML4            = BSS
PDPT            = BSS + 0x1000
PD_LOW          = BSS + 0x2000  ; [0, 1 GiB): its first two 2 MiB pages
PD_APIC         = BSS + 0x3000  ; [3 GiB, 4 GiB): the APIC's page table
PT_APIC         = BSS + 0x4000
MBI             = BSS + 0x5000  ; the MBI's address, from ebx
TICKS_TAKEN     = BSS + 0x5008  ; timer interrupts taken
TURN            = BSS + 0x5010  ; the APIC ID of the AP whose turn it is to report
STACKS_TOP      = BSS + 0x6000 + MAX_CPUS * STACK_SIZE
BSS_END         = STACKS_TOP

; --- the multiboot header: within the first 8 KiB, 4-byte aligned ---------------
mb_header:
    .long MB_MAGIC
    .long MB_AOUT_KLUDGE
    .long -(MB_MAGIC + MB_AOUT_KLUDGE)  ; magic + flags + checksum = 0
    .long mb_header                     ; header_addr: the image is assembled where it loads
    .long mb_header                     ; load_addr: the image from its first byte
    .long image_end                     ; load_end_addr
    .long BSS_END                       ; bss_end_addr
    .long entry32                       ; entry_addr

; The library (64-bit code) first: its names are defined before they are used.
.code64
.include "serial.s"
.include "gdt.s"
.include "idt.s"

; --- 32-bit protected mode, paging off: the BSP ------------------------------------
.code32
entry32:
    cmp eax, MB_BOOT_MAGIC
    jne bad_magic
    mov dword ptr [MBI], ebx
    lgdt [boot_gdtr]                    ; the loader's GDT is not ours to keep
    mov ax, DATA_SEL
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, STACKS_TOP                 ; the BSP's: APIC ID 0's stack
    mov esi, offset msg_entry
    call puts32
    call build_page_tables
    call long_mode_on
    jmp CODE64_SEL:bsp64                ; CS.L = 1: 64-bit mode

bad_magic:
    mov al, 1
    out EXIT_PORT, al
.Lbad_magic_halt:
    hlt
    jmp .Lbad_magic_halt

; build_page_tables: identity-maps [0, 4 MiB) with 2 MiB pages (this image,
; its BSS, the trampoline, the MBI) and the APIC's page, uncached. Every
; upper half stays 0: the BSS is zeroed.
build_page_tables:
    mov dword ptr [PML4], PDPT | PTE_P | PTE_RW
    mov dword ptr [PDPT], PD_LOW | PTE_P | PTE_RW
    mov dword ptr [PDPT + 3 * 8], PD_APIC | PTE_P | PTE_RW
    mov dword ptr [PD_LOW], 0 | PTE_P | PTE_RW | PTE_PS
    mov dword ptr [PD_LOW + 8], 0x200000 | PTE_P | PTE_RW | PTE_PS
    mov dword ptr [PD_APIC + ((APIC_BASE >> 21) & 511) * 8], PT_APIC | PTE_P | PTE_RW
    mov dword ptr [PT_APIC], APIC_BASE | PTE_P | PTE_RW | PTE_PCD | PTE_PWT
    ret

; long_mode_on: IA-32e paging on (SDM Vol.3A §10.8.5); BSP and APs alike.
; Returns in compatibility mode: the caller's far jump enters 64-bit mode.
long_mode_on:
    mov eax, cr4
    or eax, CR4_PAE
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov eax, cr0
    or eax, CR0_PE | CR0_PG
    mov cr0, eax                        ; EFER.LMA is set now
    ret

; puts32: esi = NUL-terminated string; clobbers eax, edx, esi. serial.s's
; puts, for 32-bit code.
puts32:
    mov dx, SERIAL_LSR
    in al, dx
    test al, SERIAL_LSR_THRE
    jz puts32
    mov al, byte ptr [esi]
    test al, al
    jz .Lputs32_done
    mov dx, SERIAL_PORT
    out dx, al
    inc esi
    jmp puts32
.Lputs32_done:
    ret

; --- the APs' way up: copied to TRAMPOLINE, entered in real mode ------------------
.code16
trampoline:
    cli
    mov ax, cs
    mov ds, ax                          ; DS = CS: the trampoline's data by offset
    lgdt [tramp_gdtr - trampoline]
    mov eax, cr0
    or eax, CR0_PE
    mov cr0, eax
    ljmpd CODE32_SEL:ap32               ; a 32-bit offset: ap32 lies above 64 KiB
tramp_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt                      ; a 16-bit LGDT takes 24 bits: below 16 MiB
trampoline_end:

.code32
ap32:
    mov ax, DATA_SEL
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, dword ptr [APIC_BASE + APIC_ID]    ; paging is off: the APIC's own address
    shr eax, 24
    imul eax, eax, STACK_SIZE
    mov esp, STACKS_TOP
    sub esp, eax
    call long_mode_on                   ; the BSP's tables
    jmp CODE64_SEL:ap64

; --- 64-bit mode --------------------------------------------------------------
.code64
bsp64:
    mov esp, esp                        ; RSP's upper half is not defined after 32-bit code
    call gdt_init                       ; the library's GDT (same selectors) and TSS
    call idt_init                       ; exceptions report themselves
    call show_mbi

    ; The local APIC's timer, periodic: TICKS interrupts, each woken HLT.
    mov edi, TIMER_VECTOR
    lea rsi, [rip + timer_tick]
    call idt_set_handler
    mov rbx, APIC_BASE
    mov dword ptr [rbx + APIC_SPIV], SPIV_ENABLE | SPURIOUS_VECTOR
    mov dword ptr [rbx + APIC_TIMER_DIV], TIMER_DIV_1
    mov dword ptr [rbx + APIC_LVT_TIMER], TIMER_PERIODIC | TIMER_VECTOR
    mov dword ptr [rbx + APIC_TIMER_INIT], TIMER_COUNT
.Lbsp_tick:
    sti                                 ; its shadow: no interrupt before the HLT
    hlt
    cli
    cmp dword ptr [TICKS_TAKEN], TICKS
    jb .Lbsp_tick
    mov dword ptr [rbx + APIC_TIMER_INIT], 0    ; stops it
    lea rsi, [rip + msg_timer]
    mov edx, dword ptr [TICKS_TAKEN]
    mov ecx, TIMER_VECTOR
    call putf

    ; The APs: as many as fw_cfg counts vCPUs, but this one.
    mov dx, FW_CFG_SELECTOR
    mov ax, FW_CFG_NB_CPUS
    out dx, ax
    mov dx, FW_CFG_DATA
    in al, dx                           ; the low byte: hv has at most 16
    movzx r12d, al
    cmp r12d, 1
    je .Lbsp_done
    lea rsi, [rip + trampoline]
    mov edi, TRAMPOLINE
    mov ecx, trampoline_end - trampoline
    rep movsb
    mov dword ptr [TURN], 1
    lea rsi, [rip + msg_sipi]
    lea rdx, [r12 - 1]
    mov ecx, TRAMPOLINE
    call putf
    ; INIT, then a start-up IPI. (Intel's MP start-up sends the SIPI twice;
    ; hv starts an AP on the first and ignores a second, as a started CPU does.)
    mov dword ptr [rbx + APIC_ICR_LO], ICR_OTHERS | ICR_ASSERT | ICR_INIT
    mov dword ptr [rbx + APIC_ICR_LO], ICR_OTHERS | ICR_ASSERT | ICR_STARTUP | (TRAMPOLINE >> 12)
.Lbsp_wait:
    pause
    cmp dword ptr [TURN], r12d          ; every AP has reported
    jb .Lbsp_wait
.Lbsp_done:
    lea rsi, [rip + msg_ok]
    mov edx, r12d
    mov ecx, dword ptr [TICKS_TAKEN]
    call putf
    mov al, 0
    call exit

; show_mbi: the boot loader's name and the command line, if the MBI has them.
show_mbi:
    mov ebx, dword ptr [MBI]
    mov eax, dword ptr [rbx]            ; flags
    and eax, MBI_CMDLINE | MBI_LOADER_NAME
    cmp eax, MBI_CMDLINE | MBI_LOADER_NAME
    jne .Lshow_mbi_done
    lea rsi, [rip + msg_mbi]
    mov edx, dword ptr [rbx + MBI_LOADER_AT]
    mov ecx, dword ptr [rbx + MBI_CMDLINE_AT]
    call putf
.Lshow_mbi_done:
    ret

; timer_tick: asm/idt.s's handler convention (rdi = frame, any register but rsp).
timer_tick:
    inc dword ptr [TICKS_TAKEN]
    mov rax, APIC_BASE
    mov dword ptr [rax + APIC_EOI], 0   ; in service no more: the next tick can come
    ret

ap64:
    mov esp, esp
    call idt_load                       ; the BSP's IDT (no TSS here: a #DF triple-faults)
    mov rbx, APIC_BASE
    mov r12d, dword ptr [rbx + APIC_ID]
    shr r12d, 24
.Lap_wait:                              ; one line at a time, in APIC ID order
    pause
    cmp dword ptr [TURN], r12d
    jne .Lap_wait
    lea rsi, [rip + msg_ap]
    mov edx, r12d
    call putf
    inc dword ptr [TURN]
.Lap_halt:                              ; interrupts are off: it stays here
    hlt
    jmp .Lap_halt

; --- data ----------------------------------------------------------------------
boot_gdt:
    .quad 0                             ; 0x00 null
    .quad 0x00AF9A000000FFFF            ; 0x08 code: 64-bit (L)
    .quad 0x00CF92000000FFFF            ; 0x10 data: flat, read/write
    .quad 0x00CF9A000000FFFF            ; 0x18 code: 32-bit (D), flat
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

msg_entry:
    .asciz "multiboot: 32-bit protected mode, paging off, eax = 0x2badb002\n"
msg_mbi:
    .asciz "multiboot: long mode; loaded by %s, command line \"%s\"\n"
msg_timer:
    .asciz "multiboot: %d APIC timer interrupts, vector %d\n"
msg_sipi:
    .asciz "multiboot: INIT and SIPI to %d other vcpus, trampoline at %x\n"
msg_ap:
    .asciz "multiboot: vcpu %d: real mode, protected mode, long mode\n"
msg_ok:
    .asciz "multiboot: ok (%d vcpus, %d timer interrupts)\n"
image_end:
