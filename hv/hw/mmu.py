"""The hardware MMU: what the CPU does with an address, as its VM's mode
configured it (the VMCS of hv.vmm.modes).

One `HardwareMMU` per vCPU. It looks up the TLB and on a miss walks the
table at its CR3: the guest's own (native, ept) or the VMM's shadow tables
(shadow), and through EPT when it has an EPTP (ept: the two-dimensional
walk). It raises what the architecture raises and handles none of it:

- `Fault`: the guest's own #PF, or #GP(0) for a non-canonical address;
- `VmExit`: a #PF the exception bitmap intercepts (EXCEPTION_NMI), an EPT
  violation or misconfiguration.

The vCPU catches both (hv.vmm.vcpu). `QemuMMU` stands in for it in mode
`qemu`, where QEMU's own MMU translates the guest's accesses.
"""
from __future__ import annotations

from ..arch.paging import ADDR_MASK, P, PAGE_SIZE, PS, SWITCH, PFErr, table_index
from ..arch.x86 import (CR4, MSR_EFER, NOFLUSH, NXE, PCID_MASK, PG, PGE, WP, TlbFlush, Vector,
                        efer_write_flush, mov_to_cr_flush)

_SMEP, _SMAP, _PCIDE, _PKE = int(CR4.SMEP), int(CR4.SMAP), int(CR4.PCIDE), int(CR4.PKE)
from ..errors import GuestEscape
from ..events import PageFault, page_fault_exit
from ..memory import PhysMem
from ..stats import Stats
from .tlb import TLB, global_tag, tag
from .walker import FETCH, FIVE_LEVEL, WRITE, Translation, Walker, pkru_denies, root

# Rights granted to Unicorn's TLB (UC_PROT_*).
PROT_R, PROT_W, PROT_X = 1, 2, 4
_PF_PW = int(PFErr.P | PFErr.W)
_PF_PWU_RSVD = int(PFErr.P | PFErr.W | PFErr.U | PFErr.RSVD)
# Tags an agile CPU's CR3 that holds the guest's own (guest-physical) root:
# walks from it are nested from the top, and the walk memo keeps them apart
# from walks of a shadow root at the same number.
NESTED_ROOT = 1 << 63


class HardwareMMU:
    """The MMU of the physical CPU one vCPU runs on.

    Its registers are those the CPU runs the guest with: the guest's own,
    except under shadow paging, where the VMM loads the shadow root into CR3
    and sets CR0.WP and EFER.NXE (hv.vmm.shadow). `dim` tags the references
    of the tables at CR3 ("guest" or "shadow"); `eptp` makes every walk
    two-dimensional; `exception_bitmap` lists the vectors that exit instead
    of reaching the guest (SDM Vol.3C §25.6.3). An `agile` CPU (with an
    EPTP) walks a shadow root down to an entry with the switch bit and the
    guest's tables below it in two dimensions, or, loaded with a nested
    root, the guest's tables from the top; a #PF in the guest's tables is
    the guest's, whatever the exception bitmap says.

    Invariant: the TLB holds only translations into this machine's memory
    below `mem.size`: a large page that reaches past it is cached by its
    4 KiB piece, and a frame outside it ends the VM before anything is
    cached (GuestEscape).
    """

    def __init__(self, mem: PhysMem, stats: Stats, tlb: TLB, asid: int, *, dim: str = "guest",
                 eptp: int | None = None, exception_bitmap: frozenset[int] = frozenset(),
                 agile: bool = False):
        self.mem, self.tlb, self.asid = mem, tlb, asid
        self.counters = stats.counters
        self.eptp, self.agile = eptp, agile
        self.walker = w = Walker(mem, stats, mem.size, dim=dim,
                                 nested=None if eptp is None or agile else self._nested)
        # The TLB tag of this CPU's translations: its ASID and current PCID
        # (CR3 bits 11:0 with CR4.PCIDE; SDM Vol.3A §4.10.1), and the one
        # its global translations take (`pge`: CR4.PGE).
        self.tag = w.asid = tag(asid)
        self._gtag = global_tag(self.tag)
        self.pge = False
        w.pwc = tlb.walk_cache
        self.ept_walker = None
        if eptp is not None:
            self.ept_walker = Walker(mem, stats, mem.size, dim="ept")
            w.nested_by_level = self.ept_walker.by_level
        if agile:
            w.switch, w.switch_nested = SWITCH, self._nested
            w.switch_by_level = stats.level_refs("guest")
            self._root_by_level = w.by_level
        self._pf_exits = Vector.PF in exception_bitmap
        self.cr0 = self.cr3 = self.cr4 = self.efer = 0
        self.wp = self.nxe = self.paging = self.smep = self.smap = self.pke = False
        # PKRU, the CPU's register (WRPKRU: `set_pkru`); no VMX control
        # makes WRPKRU exit, so it is the guest's in every mode.
        self.pkru = 0
        # EFLAGS.AC of the guest's access being filled (the vCPU sets it
        # while SMAP is on); the CPU's own accesses (`translate`) are
        # implicit: SMAP applies whatever AC is.
        self.ac = False
        self.nested_root = False
        self._root = 0          # what walks start from: CR3, tagged NESTED_ROOT if it is
        # Agile: a supervisor write refused in the guest's tables exits too
        # (the VMM sets it while the guest runs with CR0.WP clear, which the
        # CPU, running it with WP set for the shadow part, cannot apply).
        self.nested_wp_exits = False
        self.memo = None        # the VM's WalkMemo (use_memo)
        # Host pages of devices (outside memory): every access there is
        # the device's (hv.hw.engine.Engine.map_mmio).
        self.devices: frozenset[int] = frozenset()

    def use_memo(self, memo) -> None:
        """Replay this CPU's walks from the VM's WalkMemo."""
        self.memo = self.walker.memo = memo
        if self.ept_walker is not None:
            self.ept_walker.memo = memo

    # -- registers, and what changing them invalidates ---------------------
    def load(self, cr0: int, cr3: int, cr4: int, efer: int, nested_root: bool = False) -> None:
        """Load the paging registers (VM entry, or the VMM's reload); no TLB
        operation. `nested_root` (agile): CR3 is the guest's own root."""
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer
        self.wp = bool(cr0 & WP)
        self.nxe = bool(efer & NXE)
        self.smep = self.walker.smep = bool(cr4 & _SMEP)
        self.smap = bool(cr4 & _SMAP)
        pke = bool(cr4 & _PKE)
        if pke != self.pke:
            self.pke = self.walker.pke = pke
            self.tlb.rights_changed(self.asid)
        self.pge = bool(cr4 & PGE)
        self.tag = self.walker.asid = tag(self.asid, cr3 & PCID_MASK if cr4 & _PCIDE else 0)
        self._gtag = global_tag(self.tag)
        self.paging = bool(cr0 & PG)
        self._root = root(cr3, cr4) | (NESTED_ROOT if nested_root else 0)
        if nested_root != self.nested_root:
            w = self.walker
            w.nested = self._nested if nested_root else None
            w.by_level = w.switch_by_level if nested_root else self._root_by_level
            w.switch = 0 if nested_root else SWITCH
            self.nested_root = nested_root

    def mov_to_cr(self, cr: int, value: int) -> None:
        """MOV to CR0, CR3 or CR4 as the CPU runs it: the register, and the
        TLB invalidation it implies (CR3's bit 63 says which, and is not
        loaded)."""
        old = {0: self.cr0, 3: self.cr3, 4: self.cr4}[cr]
        flush = mov_to_cr_flush(cr, old, value, self.cr4)
        if cr == 3:
            self.counters["cr3_loads"] += 1
            self.load(self.cr0, value & ~NOFLUSH, self.cr4, self.efer, self.nested_root)
        elif cr == 0:
            self.load(value, self.cr3, self.cr4, self.efer, self.nested_root)
        else:
            self.load(self.cr0, self.cr3, value, self.efer, self.nested_root)
        self.flush(flush)

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR as the CPU runs it (only EFER reaches the MMU)."""
        if msr == MSR_EFER:
            flush = efer_write_flush(self.efer, value)
            self.load(self.cr0, self.cr3, self.cr4, value, self.nested_root)
            self.flush(flush)

    def set_pkru(self, value: int) -> None:
        """WRPKRU: no TLB entry changes, what they allow does."""
        self.pkru = self.walker.pkru = value
        if self.pke:
            self.tlb.rights_changed(self.asid)

    def invlpg(self, vaddr: int) -> None:
        """INVLPG: `vaddr`'s entries of the current PCID, and global ones."""
        self.counters["invlpg"] += 1
        self.tlb.invlpg(self.tag, vaddr)

    def invpcid(self, kind: int, pcid: int, vaddr: int) -> None:
        """INVPCID of type `kind` (SDM Vol.2A "INVPCID"), checked: 0, one
        address of `pcid` but its global entry; 1, `pcid`'s non-global
        entries; 2, every entry; 3, every non-global entry. Types 1-3
        count as flushes."""
        self.counters["invpcid"] += 1
        if kind == 0:
            self.tlb.invlpg(tag(self.asid, pcid), vaddr, globals_=False)
        elif kind == 1:
            self.tlb.flush_tag(tag(self.asid, pcid))
            self.counters["tlb_flush"] += 1
        else:
            self.flush(TlbFlush.ALL if kind == 2 else TlbFlush.NONGLOBAL)

    def flush(self, what: TlbFlush) -> None:
        """Invalidate this vCPU's address space (its ASID): the current
        PCID's non-global entries, every PCID's, or everything; counted."""
        if not what:
            return
        if what is TlbFlush.PCID:
            self.tlb.flush_tag(self.tag)
        elif what is TlbFlush.NONGLOBAL:
            self.tlb.flush_nonglobal(self.asid)
        else:
            self.tlb.flush_asid(self.asid)
        self.counters["tlb_flush"] += 1

    def invept(self) -> None:
        """INVEPT single-context (the VMM changed an EPT entry's rights):
        every translation this vCPU derived from EPT, counted as a flush."""
        self.tlb.flush_asid(self.asid)
        if self.tlb.walk_cache is not None:
            self.tlb.walk_cache.flush_nested(self.asid)
        self.counters["tlb_flush"] += 1

    def flush_physical(self) -> None:
        """Flush the physical CPU's whole TLB, every ASID's entries: a VM
        entry or exit on a CPU without VPIDs."""
        self.tlb.flush_all()
        self.counters["tlb_flush"] += 1

    # -- translation -------------------------------------------------------
    def fill(self, vaddr: int, access: int, user: bool, retry: bool = False) -> tuple[int, int]:
        """Unicorn's TLB missed: (physical address, rights to cache).
        `retry`: the same miss again after the VM exit it raised (the walk
        starts over; the miss is counted once)."""
        tr = None if retry else self.tlb.lookup(self.tag, vaddr)
        if tr is None or not self._allows(tr, access, user, self.ac):
            tr = self._miss(vaddr, access, user, not retry, self.ac)
        paddr = tr.pbase | (vaddr & ((1 << tr.shift) - 1) & ~(PAGE_SIZE - 1))
        # Grant only what the model has checked: W once the page is dirty (so
        # the first write is seen) and PKRU allows it, X only to fetches (so
        # code is scanned).
        if access == FETCH:
            return paddr, PROT_R | PROT_X
        writable = tr.dirty and (tr.writable or not (user or self.wp)) and not (
            self.pke and tr.user and pkru_denies(self.pkru, tr.pkey, True, user, self.wp))
        if writable and self.memo is not None and paddr >> 12 in self.memo.frames:
            # A table a remembered walk read: the first write must be seen.
            if access == WRITE:
                self.memo.guest_writes(paddr >> 12)
            else:
                writable = False
        return paddr, PROT_R | (PROT_W if writable else 0)

    def translate(self, vaddr: int, access: int, user: bool = False, retry: bool = False) -> int:
        """A linear access the CPU makes itself (IDT reads, exception
        frames), counted like any other."""
        tr = None if retry else self.tlb.lookup(self.tag, vaddr)
        if tr is None or not self._allows(tr, access, user, False):
            tr = self._miss(vaddr, access, user, not retry, False)
        return tr.paddr(vaddr)

    def below_switch(self, vaddr: int) -> bool:
        """Agile: whether `vaddr`'s walk goes through a switch entry (or a
        nested root), where the guest's tables are the hardware's: an
        INVLPG there needs no exit. (A look down the shadow entries, as the
        CPU's INVLPG would take; not counted as a walk.)"""
        if not self.agile:
            return False
        if self.nested_root:
            return True
        table, word = self.cr3 & ADDR_MASK, self.mem.word
        for level in (5, 4, 3, 2) if self._root & FIVE_LEVEL else (4, 3, 2):
            entry = word((table + table_index(vaddr, level) * 8) >> 3)
            if not entry & P or entry & PS:
                return False
            if entry & SWITCH:
                return True
            table = entry & ADDR_MASK
        return False

    def lookup(self, vaddr: int) -> Translation | None:
        """The TLB's translation of `vaddr`, if it holds one (no side effect)."""
        return self.tlb.lookup(self.tag, vaddr)

    def _allows(self, tr: Translation, access: int, user: bool, ac: bool) -> bool:
        """Whether a cached entry serves this access without a walk (which
        then faults where the rights say no). A write through an entry that
        is not yet dirty walks again to set D."""
        if user and not tr.user:
            return False
        if access == FETCH:
            return not tr.nx and (user or not (tr.user and self.smep))
        if tr.user and not user and self.smap and not ac:
            return False
        # PKRU refuses: the walk again, which faults (a model's shortcut: a
        # CPU raises this #PF from the TLB entry).
        if self.pke and tr.user and pkru_denies(self.pkru, tr.pkey, access == WRITE, user,
                                                self.wp):
            return False
        if access == WRITE:
            return tr.dirty and (tr.writable or not (user or self.wp))
        return True

    def _miss(self, vaddr: int, access: int, user: bool, count: bool,
              ac: bool) -> Translation:
        """A TLB miss (`count`ed, unless it is one retried): walk, and cache
        what the walk found (the invariant above)."""
        if count:
            self.counters["tlb.misses"] += 1
        self.walker.smap = self.smap and not ac
        try:
            if self.paging:
                tr = self.walker.walk(self._root, vaddr, access, user, self.wp, self.nxe)
            else:
                tr = self.walker.walk_unpaged(vaddr, access)
        except PageFault as pf:
            if not self._pf_exits or pf.nested and not (
                    self.nested_wp_exits and pf.error_code & _PF_PWU_RSVD == _PF_PW):
                raise
            raise page_fault_exit(vaddr, pf.error_code) from None
        limit = self.mem.size
        if tr.pbase + (1 << tr.shift) > limit:
            tr = tr.piece(vaddr)
            if tr.pbase >= limit and tr.pbase not in self.devices:
                raise GuestEscape(f"{vaddr:#x} maps guest-physical {tr.pbase:#x}, outside guest "
                                  f"memory [0, {limit:#x})")
        if self.tlb.insert(self._gtag if tr.global_ and self.pge else self.tag, tr):
            self.counters["tlb.evictions"] += 1
        return tr

    def _nested(self, gpa: int, access: int, final: bool) -> tuple[int, int, bool]:
        """One EPT step of the two-dimensional walk, through the nested TLB
        if there is one (it keeps EPT's W: a write it refuses walks EPT)."""
        ntlb = self.tlb.walk_cache
        if ntlb is not None:
            hit = ntlb.nested_lookup(self.asid, gpa)
            if hit is not None and (hit[2] or access != WRITE):
                self.counters["pwc.ntlb_hits"] += 1
                return hit[0] | (gpa & 0xFFF), hit[1], hit[2]
        hpa, shift, writable = self.ept_walker.walk_ept(self.eptp, gpa, access, final)
        if ntlb is not None:
            ntlb.nested_insert(self.asid, gpa, hpa, shift, writable)
        return hpa, shift, writable


class QemuMMU:
    """Mode `qemu`: QEMU's MMU translates the guest's accesses, and hv
    models nothing. The accesses of exception delivery (which Unicorn never
    makes) walk the guest's tables at the engine's CR3, uncounted."""
    tlb = None

    def __init__(self, engine, mem: PhysMem):
        self.engine = engine
        self.walker = Walker(mem, Stats(), mem.size)

    def translate(self, vaddr: int, access: int, user: bool = False, retry: bool = False) -> int:
        e = self.engine
        if not e.reg("cr0") & PG:
            return vaddr
        return self.walker.walk(root(e.reg("cr3"), e.reg("cr4")), vaddr, access, user,
                                bool(e.reg("cr0") & WP),
                                bool(e.msr(MSR_EFER) & NXE)).paddr(vaddr)
