"""`native`: the guest on bare metal. The "hardware" walks the guest's own
tables (4 references for a 4 KiB page, 3 for 2 MiB, 2 for 1 GiB).

The interface of this class is what every MMU mode provides; `shadow` and
`ept` change what a miss walks and which events are VM exits.
"""
from __future__ import annotations

from ..arch.paging import PAGE_SIZE
from ..arch.vmx import ExitReason
from ..arch.x86 import CR0, CR4, EFER
from ..memory import GuestMemory
from ..stats import Stats
from .tlb import TLB
from .walker import FETCH, WRITE, GuestEscape, Translation, Walker

# Rights granted to Unicorn's TLB (UC_PROT_*).
PROT_R, PROT_W, PROT_X = 1, 2, 4


class NativeMMU:
    name = "native"
    # Events that are VM exits in this mode. On bare metal nothing in the MMU
    # traps; the platform's devices, HLT and hypercalls are exits everywhere,
    # so every mode's table lists them alike.
    intercepts = frozenset({ExitReason.IO_INSTRUCTION, ExitReason.HLT, ExitReason.VMCALL,
                            ExitReason.TRIPLE_FAULT})
    # Exception vectors that cause EXCEPTION_NMI exits (the VMCS exception
    # bitmap, SDM Vol.3C §25.6.3). Others are delivered to the guest directly.
    exception_bitmap: frozenset[int] = frozenset()

    def __init__(self, guest: GuestMemory, stats: Stats, tlb: TLB, asid: int = 0):
        self.guest, self.mem, self.ram = guest, guest.host, guest.ram
        self.stats, self.tlb, self.asid = stats, tlb, asid
        self.counters = stats.counters
        # Translations end below this host address: guest RAM, here.
        self.frame_limit = guest.ram
        # Bare metal: guest-physical is host-physical, so the walker reads
        # host memory directly.
        self.walker = Walker(self.mem, stats, self.ram)
        self.use_walk_cache(self.walker)
        self._peeker = self.peek_walker(guest, self.ram)
        self.memo = None        # the VM's WalkMemo (use_memo)
        self.cr0 = self.cr3 = self.cr4 = self.efer = 0
        self._hw_wp = True      # CR0.WP as the hardware walker applies it

    def use_walk_cache(self, walker: Walker) -> None:
        """Give the hardware walker this CPU's page-walk caches (--pwc)."""
        walker.pwc, walker.asid = self.tlb.walk_cache, self.asid

    def hardware_walkers(self) -> list[Walker]:
        return [self.walker]

    def use_memo(self, memo) -> None:
        """Replay the hardware's walks from the VM's WalkMemo."""
        self.memo = memo
        for walker in self.hardware_walkers():
            walker.memo = memo

    # -- the hardware's view of the paging controls ------------------------
    def load_state(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer
        self._wp = self._hw_wp = bool(cr0 & CR0.WP)
        self._nxe = bool(efer & EFER.NXE)

    def write_cr(self, cr: int, value: int) -> None:
        """MOV to CR0/CR3/CR4 and the TLB invalidation it implies (SDM Vol.3A §4.10.4.1)."""
        if cr == 3:
            self.counters["cr3_loads"] += 1
            self.cr3 = value
            self._flush(self._cr3_flush())
        elif cr == 0:
            changed = (self.cr0 ^ value) & (CR0.PG | CR0.WP)
            self.load_state(value, self.cr3, self.cr4, self.efer)
            if changed:
                self._flush(self.tlb.flush_asid)
        elif cr == 4:
            changed = (self.cr4 ^ value) & (CR4.PGE | CR4.PAE | CR4.PSE | CR4.PCIDE | CR4.SMEP)
            self.cr4 = value
            if changed:
                self._flush(self.tlb.flush_asid)

    def _cr3_flush(self):
        """What MOV to CR3 invalidates (SDM Vol.3A §4.10.4.1): the non-global
        entries, or every entry while CR4.PGE is clear (G counts only with
        PGE, §4.10.2.4)."""
        return self.tlb.flush_nonglobal if self.cr4 & CR4.PGE else self.tlb.flush_asid

    def write_efer(self, value: int) -> None:
        changed = (self.efer ^ value) & EFER.NXE
        self.load_state(self.cr0, self.cr3, self.cr4, value)
        if changed:
            self._flush(self.tlb.flush_asid)

    def invlpg(self, vaddr: int) -> None:
        self.counters["invlpg"] += 1
        self.tlb.invlpg(self.asid, vaddr)

    def _flush(self, operation) -> None:
        """A TLB flush of this vCPU's ASID, counted."""
        operation(self.asid)
        self.counters["tlb_flush"] += 1

    # -- translation -------------------------------------------------------
    def lookup(self, vaddr: int, access: int, user: bool) -> Translation:
        """The TLB, then on a miss a walk. Raises PageFault or GuestEscape."""
        tr = self.tlb.lookup(self.asid, vaddr)
        if tr is not None and self._allows(tr, access, user):
            return tr
        return self._miss(vaddr, access, user)

    def _miss(self, vaddr: int, access: int, user: bool) -> Translation:
        """A TLB miss: walk, and cache what the walk found.

        Invariant: the TLB holds only translations into this VM's memory. A
        large page that reaches past it is cached by its 4 KiB piece; a
        frame outside it ends the VM before anything is cached."""
        self.counters["tlb.misses"] += 1
        tr = self.hw_walk(vaddr, access, user)
        if tr.pbase + (1 << tr.shift) > self.frame_limit:
            paddr = tr.paddr(vaddr) & ~(PAGE_SIZE - 1)
            if paddr >= self.frame_limit:
                raise GuestEscape(f"{vaddr:#x} maps guest-physical {paddr:#x}, outside guest "
                                  f"memory [0, {self.frame_limit:#x})")
            tr = Translation(vaddr & ~(PAGE_SIZE - 1), paddr, 12, tr.writable, tr.user, tr.nx,
                             tr.global_, tr.dirty)
        if self.tlb.insert(self.asid, tr):
            self.counters["tlb.evictions"] += 1
        return tr

    def hw_walk(self, vaddr: int, access: int, user: bool) -> Translation:
        """The hardware page walk of a TLB miss: here, of the guest's tables."""
        return self.walker.walk(self.cr3, vaddr, access, user, self._wp, self._nxe)

    def _allows(self, tr: Translation, access: int, user: bool) -> bool:
        """Whether a cached entry serves this access without a walk. A write
        through an entry that is not yet dirty walks again to set D."""
        if user and not tr.user:
            return False
        if access == WRITE:
            return tr.dirty and (tr.writable or not (user or self._hw_wp))
        if access == FETCH:
            return not tr.nx
        return True

    def fill(self, vaddr: int, access: int, user: bool) -> tuple[int, int]:
        """Unicorn's TLB missed: (physical address, rights to cache)."""
        tr = self.tlb.lookup(self.asid, vaddr)
        if tr is None or not self._allows(tr, access, user):
            tr = self._miss(vaddr, access, user)
        paddr = tr.pbase | (vaddr & ((1 << tr.shift) - 1) & ~(PAGE_SIZE - 1))
        # Grant only what the model has checked: W once the page is dirty (so
        # the first write is seen), X only to fetches (so code is scanned).
        if access == FETCH:
            return paddr, PROT_R | PROT_X
        writable = tr.dirty and (tr.writable or not (user or self._hw_wp))
        if writable and self.memo is not None and paddr >> 12 in self.memo.frames:
            # A table a remembered walk read: the first write must be seen.
            if access == WRITE:
                self.memo.guest_writes(paddr >> 12)
            else:
                writable = False
        return paddr, PROT_R | (PROT_W if writable else 0)

    def translate(self, vaddr: int, access: int, user: bool = False) -> int:
        """A linear access the "hardware" makes itself (IDT reads, exception
        frames): counted like any other access. Raises PageFault."""
        return self.lookup(vaddr, access, user).paddr(vaddr)

    @staticmethod
    def peek_walker(mem, ram: int) -> Walker:
        """A walker that changes nothing and counts nowhere."""
        return Walker(_ReadOnly(mem), Stats(), ram)

    def peek(self, vaddr: int, tlb: bool = True) -> int | None:
        """Where `vaddr` points now, with no side effect and nothing counted
        (for the VMM's own inspection: code scanning, crash reports): with
        `tlb`, the TLB's translation if it holds one (what the CPU fetches
        through, and fast), else the tables' (what QEMU's MMU, the oracle,
        would say)."""
        tr = self.tlb.lookup(self.asid, vaddr) if tlb else None
        if tr is not None:
            return tr.paddr(vaddr)
        gpa = self._peeker.peek(self.cr3, vaddr, self._nxe)
        return None if gpa is None else self.guest.hpa(gpa)


class _ReadOnly:
    """Guest memory seen by the peeking walker: A/D updates are dropped."""

    def __init__(self, mem):
        self.read_u64, self.word = mem.read_u64, mem.word

    def write_u64(self, addr: int, value: int) -> None:
        pass
