; asm/sync.s -- waiting for other vCPUs without atomic instructions.
;
; Needs serial.s (errors panic).
;
; Every shared variable here has a single writer, and readers only wait for
; it to reach a value: plain loads and stores do, on x86 (stores become
; visible in program order, loads are not reordered with older loads). So
; these routines are correct whatever the interleaving, one instruction at
; a time, and need no `lock`. (In hv the vCPUs take turns, and a turn ends
; between two instructions, so every instruction is atomic across vCPUs
; there, locked or not: hardware gives that only to locked ones.) Waits spin with
; `pause`; a vCPU that waits burns the rest of its time slice (hv has no
; PAUSE-loop exiting), so with long slices every wait costs about one slice
; per vCPU.
;
; Calling convention as in serial.s: arguments in the registers named,
; every general-purpose register preserved (rax too); RFLAGS clobbered.
;
;   smp_barrier   rdi = this vCPU's index, rsi = number of vCPUs taking part
;                 (all of 0 .. rsi-1, at most SMP_MAX_VCPUS, else panic):
;                 returns once every one of them has called it. A
;                 sense-reversing barrier from per-vCPU flags: vCPU i
;                 flips its own flag smp_arrive[i] (the barrier's sense, one
;                 cache line each), vCPU 0 waits until every flag has the new
;                 sense and then writes it to smp_release, which the others
;                 wait for. Because the sense alternates, the same flags serve
;                 every barrier, with no reset, and a vCPU that races ahead
;                 into the next barrier cannot be mistaken for one still in
;                 this one. Every vCPU must take part in every barrier, in the
;                 same order; memory written before the barrier is seen by
;                 every vCPU after it.
;   smp_wait      rdi = address of a qword, rsi = value: spins until the
;                 qword equals the value (another vCPU's flag, written by
;                 that vCPU alone)

SMP_MAX_VCPUS   = 16            ; hv's limit (--vcpus)
SMP_LINE        = 64            ; one cache line per vCPU's flag

; smp_barrier: rdi = index, rsi = count.
smp_barrier:
    push rax
    push rcx
    push rdx
    cmp rsi, SMP_MAX_VCPUS
    ja .Lsmp_barrier_too_many
    cmp rdi, rsi
    jae .Lsmp_barrier_too_many
    lea rdx, [rip + smp_arrive]
    mov rcx, rdi
    shl rcx, 6                  ; * SMP_LINE
    mov rax, qword ptr [rdx + rcx]
    xor eax, 1                  ; this barrier's sense: the flag flipped
    mov qword ptr [rdx + rcx], rax
    test rdi, rdi
    jnz .Lsmp_barrier_wait_release
    xor ecx, ecx                ; vCPU 0: wait for every flag, in turn
.Lsmp_barrier_next:
    cmp qword ptr [rdx], rax
    je .Lsmp_barrier_arrived
    pause
    jmp .Lsmp_barrier_next
.Lsmp_barrier_arrived:
    add rdx, SMP_LINE
    inc ecx
    cmp rcx, rsi
    jb .Lsmp_barrier_next
    mov qword ptr [rip + smp_release], rax  ; let them go
    jmp .Lsmp_barrier_done
.Lsmp_barrier_wait_release:
    cmp qword ptr [rip + smp_release], rax
    je .Lsmp_barrier_done
    pause
    jmp .Lsmp_barrier_wait_release
.Lsmp_barrier_done:
    pop rdx
    pop rcx
    pop rax
    ret
.Lsmp_barrier_too_many:
    lea rsi, [rip + smp_msg_too_many]
    call panic

; smp_wait: rdi = address, rsi = value.
smp_wait:
    cmp qword ptr [rdi], rsi
    je .Lsmp_wait_done
    pause
    jmp smp_wait
.Lsmp_wait_done:
    ret

smp_msg_too_many:
    .asciz "smp: smp_barrier with a vCPU index or count beyond SMP_MAX_VCPUS"

; Data, in a page of its own (see gdt.s).
.align 4096
smp_arrive:                     ; vCPU i's flag at smp_arrive + i * SMP_LINE
    .zero SMP_MAX_VCPUS * SMP_LINE
smp_release:                    ; the sense of the last barrier vCPU 0 released
    .quad 0
.align 4096
