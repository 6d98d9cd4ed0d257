"""`shadow`: software MMU virtualization, as VT-x did it before EPT (after
KVM's shadow MMU, arch/x86/kvm/mmu/mmu.c and paging_tmpl.h).

The hardware walks shadow page tables (guest-virtual -> host-physical, real
4- or 5-level format as the guest's tables, in the VMM's part of host
memory) and never the guest's. The VMM builds them lazily on hidden page faults: a miss in the shadow tables
that the guest's own tables resolve. Shadow pages are cached by guest frame
and role (level, direct, accumulated access), KVM's `kvm_mmu_page`, so an
address space the guest switches back to is found again.

Invariants:
- Every guest frame that a non-direct shadow page shadows (a live guest page
  table) is mapped read-only by every shadow leaf that maps it: the reverse
  map (`rmap`, guest frame -> leaf sptes) finds them all, through every
  alias. So each guest write to a page table traps, and is emulated.
- A shadow leaf is writable only if the guest's walk allows the write and
  the guest's PTE is dirty: the first write traps and sets D in the guest.
- Non-leaf sptes point only at shadow pages (the VMM area), or, with the
  switch bit (agile), at a guest table frame; leaf sptes only at the VM's
  guest frames (GuestMemory.hpa). A guest table that points
  outside its RAM stops the VM; tables that loop get one shadow page per
  (frame, level), so the shadow tables never loop.
- Whenever an spte is zapped or loses rights, the TLB of every vCPU of the
  VM is flushed before it runs again (remote flushes are counted).
- A vCPU whose root was zapped gets a new one before its hardware walks
  again (`ShadowPaging.reload`, at every VM entry); the hardware's CR3 is
  its root's frame.
"""
from __future__ import annotations

from ..arch.paging import (A, ADDR_MASK, D, ENTRIES_PER_TABLE, G, NX, P, PAGE_SIZE, PS, SWITCH,
                           PFErr, RW, US, large_frame, table_index)
from ..arch.x86 import (CR4, MSR_EFER, NOFLUSH, NXE, PCID_MASK, PG, WP, TlbFlush,
                        efer_write_flush, mov_to_cr_flush)
from ..errors import GuestEscape, InvariantError
from ..events import EmulateWrite, PageFault
from ..hw.walker import FETCH, READ, WRITE, Walker, root
from ..memory import GuestMemory, VmmFrames
from ..stats import Stats
from .paging import Paging

ACC_W, ACC_U, ACC_X = 1, 2, 4
ACC_ALL = ACC_W | ACC_U | ACC_X
ACC_PKEY_SHIFT = 3      # a direct page's role: its leaves' protection key above ACC_*
FLOOD_LIMIT = 3         # emulated writes with no use in between (KVM's detect_write_flooding)
RESERVE = 8             # free shadow frames kept for one fault's path
_PF_W, _PF_U, _PF_I = int(PFErr.W), int(PFErr.U), int(PFErr.I)     # plain ints: hot path
_SMEP, _PCIDE, _LA57 = int(CR4.SMEP), int(CR4.PCIDE), int(CR4.LA57)


# A leaf the guest lets this walk write (its walk allows it, its PTE is
# dirty): W is withheld only while the frame is a shadowed table. A bit
# 4-level paging ignores (SDM Vol.3A Table 4-20), as KVM's
# SPTE_MMU_WRITABLE.
MAY_WRITE = 1 << 53
PKEY_SHIFT = 59         # a leaf's protection key, bits 62:59 (CR4.PKE)


def make_spte(hpa: int, acc: int, global_: bool, may_write: bool, protected: bool,
              large: bool = False, pkey: int = 0) -> int:
    """A shadow leaf for host frame `hpa` (KVM's make_spte): the rights the
    guest's walk allows (`acc`), W when the guest lets this walk write
    (`may_write`) and the frame is no shadowed table (`protected`: see the
    module's invariants), G and the protection key as the guest's leaf has
    them (the CPU checks the guest's PKRU against it); `large`: 2 MiB."""
    return (hpa | P | (RW if may_write and not protected else 0) | (MAY_WRITE if may_write else 0)
            | (US if acc & ACC_U else 0) | (0 if acc & ACC_X else NX) | (G if global_ else 0)
            | (PS if large else 0) | pkey << PKEY_SHIFT)


def make_link(hpa: int) -> int:
    """A non-leaf spte pointing at the shadow page at `hpa`: it allows
    everything, the leaf decides."""
    return hpa | P | RW | US


def make_switch(gpa: int, acc: int) -> int:
    """Agile paging: a non-leaf spte whose walk goes on in the guest's table
    at guest-physical `gpa`, through EPT (hv.vmm.agile). It grants what the
    guest's entries above it do (`acc`): the hardware reads none of those."""
    return (gpa | P | SWITCH | (RW if acc & ACC_W else 0) | (US if acc & ACC_U else 0)
            | (0 if acc & ACC_X else NX))


def _acc(entry: int) -> int:
    """The access an entry allows, as ACC_* bits."""
    return (ACC_W if entry & RW else 0) | (ACC_U if entry & US else 0) | (0 if entry & NX else ACC_X)


def _path_acc(path: list) -> int:
    """The access a guest walk's entries allow together, as ACC_* bits."""
    acc = ACC_ALL
    for _level, _addr, entry in path:
        acc &= _acc(entry)
    return acc


def _leaf_gfn(vaddr: int, leaf: tuple) -> int:
    """The guest frame `vaddr` reaches through a walk's leaf (level, entry
    address, entry); in a large page, the 4 KiB frame inside it."""
    level, _addr, entry = leaf
    return (large_frame(entry, level) >> 12) + ((vaddr >> 12) & ((1 << 9 * (level - 1)) - 1))


def changed_entries(before: bytes, after: bytes) -> list[int]:
    """Indexes of the 8-byte entries that differ between two table pages,
    highest first (one XOR of the pages as ints, then one step per entry)."""
    diff = int.from_bytes(before, "little") ^ int.from_bytes(after, "little")
    changed = []
    while diff:
        index = (diff.bit_length() - 1) >> 6
        changed.append(index)
        diff &= (1 << (index << 6)) - 1
    return changed


class ShadowPage:
    """One shadow table page: the shadow of guest table `gfn` at `level`, or
    (`direct`) a table for part of a guest large page starting at `gfn`.
    `nxe` is the guest's EFER.NXE its entries were read under (KVM's
    role.nxe): with NXE clear a guest NX bit is reserved, so sptes built
    under NXE=1 must not serve a guest that turned NXE off."""
    __slots__ = ("key", "gfn", "level", "direct", "access", "nxe", "hpa", "parents")

    def __init__(self, key, hpa: int):
        self.key, self.hpa = key, hpa
        self.gfn, self.level, self.direct, self.access, self.nxe = key
        self.parents: dict[int, None] = {}      # sptes that point here


class ShadowCache:
    """The shadow MMU state of one VM, shared by its vCPUs."""

    def __init__(self, guest: GuestMemory, vmm_size: int, large_pages: bool = False):
        self.guest, self.host = guest, guest.host
        # Where the host backs guest memory with large pages (`large_pages`),
        # a guest large page is shadowed by 2 MiB leaves where no guest
        # table lies in it, else split into 4 KiB leaves.
        self.large_pages = large_pages
        self.large: dict[int, dict[int, None]] = {}        # 2 MiB region -> its large sptes
        self.large_region: dict[int, int] = {}             # large spte -> 2 MiB region
        self.tables_in: dict[int, int] = {}                # 2 MiB region -> shadowed gfns in it
        self.pages: dict[tuple, ShadowPage] = {}
        self.by_hpa: dict[int, ShadowPage] = {}
        self.shadowed: dict[int, dict[tuple, ShadowPage]] = {}   # gfn -> non-direct pages
        self.rmap: dict[int, dict[int, None]] = {}               # gfn -> leaf sptes
        self.leaf_gfn: dict[int, int] = {}                       # leaf spte -> gfn
        self.flood: dict[int, int] = {}                          # gfn -> emulated writes
        self.switches: dict[int, dict[int, None]] = {}           # gfn -> switch sptes (agile)
        self.frames = VmmFrames(self.host, vmm_size)
        self.vcpus: list[ShadowPaging] = []

    # -- shadow pages --------------------------------------------------------
    def get_page(self, c, gfn: int, level: int, direct: bool, access: int,
                 nxe: bool) -> ShadowPage:
        key = (gfn, level, direct, access, nxe)
        sp = self.pages.get(key)
        if sp is not None:
            return sp
        c["mmu_cache_miss"] += 1
        hpa = self.frames.alloc()
        sp = self.pages[key] = self.by_hpa[hpa] = ShadowPage(key, hpa)
        c[f"mmu_shadow_pages.L{level}"] += 1
        if not direct:
            first = gfn not in self.shadowed
            self.shadowed.setdefault(gfn, {})[key] = sp
            if first:
                self.tables_in[gfn >> 9] = self.tables_in.get(gfn >> 9, 0) + 1
                self.write_protect(c, gfn)
        return sp

    def ensure_free(self, c) -> None:
        """Keep enough frames for one fault's path; recycle everything if not
        (KVM zaps the oldest pages; hv starts over, which is rare and simple)."""
        if len(self.frames) < RESERVE:
            c["mmu_recycled"] += 1
            self.zap_all(c)

    def zap_all(self, c) -> None:
        """Zap every shadow page, then flush every vCPU's TLB."""
        for sp in list(self.pages.values()):
            self.zap_page(c, sp)
        self.flush_all(c)

    def drop_switches(self, c, gfn: int) -> None:
        """Agile: zap the switch entries into guest table `gfn`; walks that
        reach it fault again and build shadow pages (hv.vmm.agile)."""
        for spte_addr in list(self.switches.get(gfn, ())):
            self.zap_spte(c, spte_addr, 2)

    def link(self, parent: ShadowPage, index: int, child: ShadowPage) -> None:
        spte_addr = parent.hpa + index * 8
        spte = self.host.read_u64(spte_addr)
        # (A shadow page may sit at host-physical 0: an empty spte's address
        # bits match it too.)
        if not spte & P or spte & ADDR_MASK != child.hpa:
            self.host.write_u64(spte_addr, make_link(child.hpa))
            child.parents[spte_addr] = None

    def link_switch(self, c, parent: ShadowPage, index: int, gfn: int, acc: int) -> None:
        """Agile paging: the walk goes on from `parent`'s entry `index` in the
        guest's table `gfn`, in two dimensions, with the rights `acc`."""
        spte_addr = parent.hpa + index * 8
        if self.host.read_u64(spte_addr) & ~(A | D) != make_switch(gfn << 12, acc):
            self.zap_spte(c, spte_addr, parent.level)
            self._switch(spte_addr, gfn, acc)

    def _switch(self, spte_addr: int, gfn: int, acc: int) -> None:
        self.host.write_u64(spte_addr, make_switch(gfn << 12, acc))
        self.switches.setdefault(gfn, {})[spte_addr] = None

    def nest(self, c, gfn: int) -> None:
        """Agile: guest table `gfn` goes nested. Every entry that linked one
        of its shadow pages becomes a switch entry at once (with that page's
        rights), and the pages go: writing the table costs no exit now."""
        for sp in list(self.shadowed.get(gfn, {}).values()):
            parents, sp.parents = sp.parents, {}
            self.zap_page(c, sp)
            for spte_addr in parents:
                self._switch(spte_addr, gfn, sp.access)
        for spte_addr in self.rmap.get(gfn, ()):        # and its leaves writable again
            spte = self.host.read_u64(spte_addr)
            if spte & MAY_WRITE:
                self.host.write_u64(spte_addr, spte | RW)
        self.flush_all(c)

    def set_large(self, c, sp: ShadowPage, index: int, base: int, spte: int) -> None:
        """A 2 MiB leaf for guest frames [base, base + 512)."""
        spte_addr = sp.hpa + index * 8
        self.zap_spte(c, spte_addr, 2)
        self.host.write_u64(spte_addr, spte)
        self.large.setdefault(base >> 9, {})[spte_addr] = None
        self.large_region[spte_addr] = base >> 9

    def set_leaf(self, sp: ShadowPage, index: int, gfn: int, spte: int) -> None:
        spte_addr = sp.hpa + index * 8
        self._unmap_leaf(spte_addr)
        self.host.write_u64(spte_addr, spte)
        self.rmap.setdefault(gfn, {})[spte_addr] = None
        self.leaf_gfn[spte_addr] = gfn

    def _unmap_leaf(self, spte_addr: int) -> None:
        gfn = self.leaf_gfn.pop(spte_addr, None)
        if gfn is not None:
            del self.rmap[gfn][spte_addr]

    def zap_spte(self, c, spte_addr: int, level: int) -> bool:
        """Clear one spte; True if it was present."""
        spte = self.host.read_u64(spte_addr)
        if not spte & P:
            return False
        if level > 1 and spte & PS:
            del self.large[self.large_region.pop(spte_addr)][spte_addr]
        elif level > 1:
            if spte & SWITCH:
                del self.switches[(spte & ADDR_MASK) >> 12][spte_addr]
            else:
                self.by_hpa[spte & ADDR_MASK].parents.pop(spte_addr, None)
            c["mmu_pde_zapped"] += 1
        else:
            self._unmap_leaf(spte_addr)
        self.host.write_u64(spte_addr, 0)
        return True

    def zap_page(self, c, sp: ShadowPage) -> None:
        """Unlink a shadow page from its parents, clear it, free its frame."""
        for spte_addr in sp.parents:
            self.host.write_u64(spte_addr, 0)
        for i, spte in enumerate(self.host.table(sp.hpa)):
            if spte & P:
                self.zap_spte(c, sp.hpa + i * 8, sp.level)
        del self.pages[sp.key], self.by_hpa[sp.hpa]
        if not sp.direct:
            group = self.shadowed[sp.gfn]
            del group[sp.key]
            if not group:
                del self.shadowed[sp.gfn]
                self.flood.pop(sp.gfn, None)
                self.tables_in[sp.gfn >> 9] -= 1
        self.frames.free(sp.hpa)
        c["mmu_shadow_zapped"] += 1
        c[f"mmu_shadow_pages.L{sp.level}"] -= 1
        for paging in self.vcpus:
            if paging.root is sp:
                paging.root = None      # reloaded before it walks again

    # -- write protection ------------------------------------------------------
    def write_protect(self, c, gfn: int) -> None:
        """Make every leaf that maps `gfn` read-only (it became a page table),
        then flush the TLBs if one changed."""
        if self._protect_leaves(c, gfn):
            self.flush_all(c)

    def _protect_leaves(self, c, gfn: int) -> bool:
        """Take W from the sptes that map `gfn`: a 2 MiB leaf over it goes
        (4 KiB ones replace it at the next fault). True if one changed."""
        changed = False
        for spte_addr in list(self.large.get(gfn >> 9, ())):
            changed = self.zap_spte(c, spte_addr, 2) or changed
        for spte_addr in self.rmap.get(gfn, ()):
            spte = self.host.read_u64(spte_addr)
            if spte & RW:
                self.host.write_u64(spte_addr, spte & ~RW)
                changed = True
        return changed

    def pte_write(self, c, gfn: int, changed: list[int]) -> None:
        """The guest wrote entries `changed` of its table `gfn`: zap the
        sptes shadowing them (they are rebuilt on the next hidden fault)."""
        zapped = False
        for sp in list(self.shadowed.get(gfn, {}).values()):
            for i in changed:
                zapped |= self.zap_spte(c, sp.hpa + i * 8, sp.level)
        n = self.flood[gfn] = self.flood.get(gfn, 0) + 1
        if n >= FLOOD_LIMIT and gfn in self.shadowed:
            # Written again and again, never used as a table in between:
            # probably no page table any more. Stop shadowing it.
            c["mmu_flooded"] += 1
            for sp in list(self.shadowed[gfn].values()):
                self.zap_page(c, sp)
            zapped = True
        if zapped:
            self.flush_all(c)

    def check(self) -> None:
        """Assert the invariants at the top of this module (tests, --check-invariants)."""
        for sp in self.pages.values():
            for i in range(ENTRIES_PER_TABLE):
                spte_addr = sp.hpa + i * 8
                spte = self.host.read_u64(spte_addr)
                if not spte & P:
                    continue
                target = spte & ADDR_MASK
                if sp.level > 1 and spte & PS:
                    region = self.large_region.get(spte_addr)
                    if region is None or self.guest.hpa(region << 21) != target or \
                            not self.guest.owns(target, 2 << 20):
                        raise InvariantError(f"large shadow leaf {spte_addr:#x} maps {target:#x}, "
                                             "not the guest frames it shadows")
                    if spte & RW and self.tables_in.get(region):
                        raise InvariantError(f"a guest page table is writable through {spte_addr:#x}")
                    continue
                if sp.level > 1 and spte & SWITCH:
                    if spte_addr not in self.switches.get(target >> 12, ()) or \
                            target >> 12 in self.shadowed or self.guest.hpa(target) is None:
                        raise InvariantError(f"switch spte {spte_addr:#x} points at {target:#x}, "
                                             "no unshadowed guest table")
                    continue
                if sp.level > 1:
                    child = self.by_hpa.get(target)
                    if child is None or spte_addr not in child.parents:
                        raise InvariantError(f"spte {spte_addr:#x} points at {target:#x}, "
                                             "no shadow page")
                    continue
                gfn = self.leaf_gfn.get(spte_addr)
                if gfn is not None and self.guest.devices.get(gfn << 12) == target:
                    continue        # a device page
                if gfn is None or self.guest.hpa(gfn << 12) != target or \
                        not self.guest.owns(target, PAGE_SIZE):
                    raise InvariantError(f"shadow leaf {spte_addr:#x} maps {target:#x}, "
                                         "not the guest frame it shadows")
                if spte & RW and gfn in self.shadowed:
                    raise InvariantError(f"guest page table {gfn:#x} is writable through "
                                         f"{spte_addr:#x}")
        for paging in self.vcpus:
            root = paging.root
            if root is not None and (self.pages.get(root.key) is not root
                                     or paging.hw.cr3 & ADDR_MASK != root.hpa):
                raise InvariantError(f"a vCPU's hardware walks {paging.hw.cr3:#x}, not its "
                                     f"shadow root {root.hpa:#x}")

    def flush_all(self, c, ept: bool = False) -> None:
        """Flush the TLB of every vCPU of the VM (KVM's kvm_flush_remote_tlbs);
        `ept`: EPT's rights changed too (agile), so by INVEPT."""
        for paging in self.vcpus:
            if ept:
                paging.hw.invept()
            else:
                paging.hw.flush(TlbFlush.ALL)
            if paging.counters is not c:
                c["remote_tlb_flush"] += 1




class ShadowPaging(Paging):
    """One vCPU's paging under shadow paging. The guest's paging registers
    are the VMM's to keep: the hardware runs with the shadow root in CR3,
    CR0.WP set (a read-only shadow leaf stops every write, so the VMM sees
    those the guest's CR0.WP=0 allows) and EFER.NXE set (shadow leaves
    carry NX). MOV to CR, INVLPG, WRMSR(EFER) and the hardware's #PF exit
    to the handlers here."""

    def __init__(self, hw, cache: ShadowCache, stats: Stats):
        super().__init__(hw, cache.guest)
        self.cache, self.host = cache, cache.host
        self.counters = stats.counters
        # The VMM's software walks of guest tables, counted apart from the
        # hardware's walks of the shadow tables.
        self.guest_walker = Walker(cache.guest, stats, cache.guest.ram, dim="guest",
                                   hardware=False)
        self.root: ShadowPage | None = None
        self.cr0 = self.cr3 = self.cr4 = self.efer = 0
        cache.vcpus.append(self)

    @property
    def _wp(self) -> bool:
        return bool(self.cr0 & WP)

    @property
    def _nxe(self) -> bool:
        return bool(self.efer & NXE)

    @property
    def levels(self) -> int:
        """The guest's paging levels (CR4.LA57), and its shadow root's, also
        the direct one while its paging is off (the CPU runs with its CR4)."""
        return 5 if self.cr4 & _LA57 else 4

    def guest_tables(self) -> tuple[int, bool]:
        return root(self.cr3, self.cr4), self._nxe

    def guest_paging(self) -> bool:
        return bool(self.cr0 & PG)

    def nested_table(self, gfn: int, level: int) -> bool:
        """Whether the guest's table `gfn` at `level` is walked nested
        (agile paging, hv.vmm.agile); never under shadow paging."""
        return False

    def boot(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer
        self.root = None
        # The CPU always pages under shadow paging: until the VMM loads a
        # root, every walk faults into it (and it builds one).
        self.hw.load(PG, 0, 0, 0)

    def reload(self) -> None:
        """Find or build the shadow root of the guest's CR3 if the vCPU has
        none (it was zapped, or the guest switched CR3 or NXE), and load it."""
        if self.root is None:
            self.cache.ensure_free(self.counters)
            if self.cr0 & PG:
                self.root = self.cache.get_page(self.counters, self.cr3 >> 12, self.levels,
                                                False, ACC_ALL, self._nxe)
            else:
                # Paging off: a direct root, guest-virtual = guest-physical
                # (KVM's nonpaging mode: the CPU itself always pages).
                self.root = self.cache.get_page(self.counters, 0, self.levels, True, ACC_ALL,
                                                self._nxe)
            self._load()

    def _load(self) -> None:
        """The registers the hardware runs the guest with (this class's
        docstring); CR3 carries the guest's PCID, so the TLB keeps each
        address space's entries apart as the guest's CPU would (KVM's
        vmx_load_mmu_pgd)."""
        if self.root is not None:
            pcid = self.cr3 & PCID_MASK if self.cr4 & _PCIDE else 0
            self.hw.load(self.cr0 | WP | PG, self.root.hpa | pcid, self.cr4, self.efer | NXE)

    # -- exit handlers: the guest's paging registers ----------------------------
    def write_cr(self, cr: int, value: int) -> None:
        """MOV to CR0/CR3/CR4 (a CR_ACCESS exit): the register, a root for a
        new CR3 (found again in the cache: KVM's kvm_mmu_new_pgd), and the
        TLB invalidation the guest expects. No VMX operation flushes one
        PCID of a VPID: where the guest's MOV to CR3 would, the VMM flushes
        every PCID's non-global entries (INVVPID single-context retaining
        globals); with bit 63 set, nothing."""
        flush = mov_to_cr_flush(cr, {0: self.cr0, 3: self.cr3, 4: self.cr4}[cr], value,
                                self.cr4)
        if flush is TlbFlush.PCID:
            flush = TlbFlush.NONGLOBAL
        if cr == 3:
            self.counters["cr3_loads"] += 1
            self.cr3 = value & ~NOFLUSH
            self.root = None
            self.reload()
        elif cr == 0:
            toggled = (self.cr0 ^ value) & PG
            self.cr0 = value
            if toggled:
                self.root = None        # the other kind of root: reload finds it
                self.reload()
            else:
                self._load()
        else:
            toggled = (self.cr4 ^ value) & _LA57
            self.cr4 = value
            if toggled:
                self.root = None        # a root of the other number of levels
                self.reload()
            else:
                self._load()
        self.hw.flush(flush)

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR to EFER (an MSR_WRITE exit): shadow pages are kept by NXE
        (ShadowPage), so a change of NXE takes another root."""
        if msr != MSR_EFER:
            return
        flush = efer_write_flush(self.efer, value)
        if (self.efer ^ value) & NXE:
            self.root = None
        self.efer = value
        self.reload()
        self._load()
        self.hw.flush(flush)

    def invpcid(self, kind: int, pcid: int, vaddr: int) -> None:
        """INVPCID (an exit, checked): type 0 zaps the leaf as INVLPG does
        if `pcid` is the current one, and drops every PCID's entry for
        `vaddr` (INVVPID individual-address); types 1 and 3 flush every
        PCID's non-global entries, 2 everything (INVVPID: this class's
        write_cr)."""
        self.counters["invpcid"] += 1
        if kind == 0:
            if pcid == self.hw.tag & PCID_MASK:
                self._zap_leaf(vaddr)
            self.hw.tlb.invvpid_address(self.hw.asid, vaddr)
        else:
            self.hw.flush(TlbFlush.ALL if kind == 2 else TlbFlush.NONGLOBAL)

    def invlpg(self, vaddr: int) -> None:
        """INVLPG (an exit): zap the leaf spte for `vaddr` (rebuilt from the
        guest's PTE on the next hidden fault) and drop the TLB entry."""
        self._zap_leaf(vaddr)
        self.hw.invlpg(vaddr)

    def _zap_leaf(self, vaddr: int) -> None:
        if self.root is not None:
            table = self.root.hpa
            for level in range(self.root.level, 0, -1):
                spte_addr = table + table_index(vaddr, level) * 8
                spte = self.host.read_u64(spte_addr)
                if not spte & P or spte & SWITCH:
                    break
                if level == 1 or spte & PS:
                    self.cache.zap_spte(self.counters, spte_addr, level)
                    break
                table = spte & ADDR_MASK

    # -- the hardware's #PF on the shadow tables ----------------------------------
    def page_fault(self, vaddr: int, error_code: int) -> PageFault | EmulateWrite | None:
        """An EXCEPTION_NMI exit for #PF: walk the guest's tables. If they
        fault, that fault is the guest's (returned, to inject); else the
        fault was hidden, and the shadow path is built (None), unless the
        access is a write the shadow must not allow (EmulateWrite)."""
        access = FETCH if error_code & _PF_I else WRITE if error_code & _PF_W else READ
        user = bool(error_code & _PF_U)
        c, cache, nxe = self.counters, self.cache, self._nxe
        path: list = []
        if self.cr0 & PG:
            # The guest's own walk (it sets A/D in the guest's tables, as the
            # hardware would have), with the guest's CR4.SMEP, and SMAP as
            # the hardware applied it to this access (CR4 is the guest's).
            self.guest_walker.smep = bool(self.cr4 & _SMEP)
            self.guest_walker.smap = self.hw.walker.smap
            self.guest_walker.pke, self.guest_walker.pkru = self.hw.pke, self.hw.pkru
            try:
                self.guest_walker.walk(root(self.cr3, self.cr4), vaddr, access, user, self._wp,
                                       nxe, path)
            except PageFault as fault:
                return fault
        cache.ensure_free(c)
        self.reload()
        sp = self.root
        acc = ACC_ALL
        for level, _addr, entry in path[:-1]:
            acc &= _acc(entry)
            gfn = (entry & ADDR_MASK) >> 12
            if self.nested_table(gfn, level - 1):
                # Agile: from here on the hardware walks the guest's tables;
                # but it runs them with CR0.WP set, as the shadow part needs.
                if access == WRITE and not _path_acc(path) & ACC_W or self._wd_bypassed(
                        access, user, _path_acc(path), path[-1][2]):
                    c["insn_emulation"] += 1
                    return EmulateWrite(vaddr, _leaf_gfn(vaddr, path[-1]))
                cache.link_switch(c, sp, table_index(vaddr, level), gfn, acc)
                self.fixed(path)
                return None
            child = cache.get_page(c, gfn, level - 1, False, acc, nxe)
            cache.flood.pop(gfn, None)          # used as a table: not flooded
            cache.link(sp, table_index(vaddr, level), child)
            sp = child
        if path:
            leaf_level, _addr, leaf = path[-1]
            acc &= _acc(leaf)
            gfn = _leaf_gfn(vaddr, path[-1])
        else:
            # Paging off: as one dirty page spanning the direct root.
            leaf_level, leaf, gfn = sp.level, A | D, vaddr >> 12
        # A guest large page is shadowed by direct pages down to 4 KiB, or
        # (host large pages: `large_pages`) down to a 2 MiB leaf where no guest
        # table is in it.
        base = gfn & ~0x1FF
        large = (cache.large_pages and leaf_level > 1 and not cache.tables_in.get(base >> 9)
                 and cache.guest.contiguous(base << 12, 2 << 20))
        # Direct pages are kept by the key too: their leaves carry it.
        pkey = leaf >> PKEY_SHIFT & 0xF
        for level in range(leaf_level, 2 if large else 1, -1):
            span = 1 << 9 * (level - 1)         # 4 KiB frames under one entry
            child = cache.get_page(c, gfn & ~(span - 1), level - 1, True,
                                   acc | pkey << ACC_PKEY_SHIFT, nxe)
            cache.link(sp, table_index(vaddr, level), child)
            sp = child
        hpa = cache.guest.hpa((base if large else gfn) << 12)
        if hpa is None and gfn << 12 in cache.guest.devices:
            # A device page: every access reaches the device, through the
            # vCPU's MMIO exit (KVM installs a reserved-bit MMIO spte).
            large, hpa = False, cache.guest.devices[gfn << 12]
        if hpa is None:
            raise GuestEscape(f"{vaddr:#x} maps guest-physical {gfn << 12:#x}, outside guest "
                              f"memory [0, {cache.guest.ram:#x})")
        may_write = bool(acc & ACC_W and leaf & D)
        protected = gfn in cache.shadowed
        if access == WRITE and not (may_write and not protected) or self._wd_bypassed(
                access, user, acc, leaf):
            # A write the guest allows but the shadow must not: to a guest
            # page table, or to a read-only page (or one PKRU's WD guards)
            # with the guest's CR0.WP=0.
            c["insn_emulation"] += 1
            return EmulateWrite(vaddr, gfn)
        spte = make_spte(hpa, acc, bool(leaf & G), may_write, protected, large, pkey)
        if large:
            cache.set_large(c, sp, table_index(vaddr, 2), base, spte)
        else:
            cache.set_leaf(sp, table_index(vaddr, 1), gfn, spte)
        c["pf_fixed"] += 1
        self.fixed(path, gfn)
        return None

    def _wd_bypassed(self, access: int, user: bool, acc: int, leaf: int) -> bool:
        """A supervisor write to a user page whose key PKRU's WD guards,
        which the guest's CR0.WP=0 lets through and the CPU, running with
        WP set, refuses: the VMM emulates it."""
        return bool(access == WRITE and not user and not self._wp and self.hw.pke
                    and acc & ACC_U and self.hw.pkru >> 2 * (leaf >> PKEY_SHIFT & 0xF) & 2)

    def fixed(self, path: list, gfn: int | None = None) -> None:
        """A hidden fault was fixed after the guest's walk `path` (level,
        entry address, entry), to guest frame `gfn` if it mapped one."""

    # -- writes to shadowed guest tables ------------------------------------------
    def table_written(self, gfn: int, before: bytes) -> None:
        """Guest frame `gfn` was written (an emulated write, or one the VMM
        made for the guest); `before` is the page as it was. If it is a
        shadowed table, zap the sptes of the entries that changed."""
        cache = self.cache
        if gfn not in cache.shadowed:
            return
        after = self.host.read(cache.guest.hpa(gfn << 12), PAGE_SIZE)
        self.counters["mmu_pte_write"] += 1
        cache.pte_write(self.counters, gfn, changed_entries(before, after))

    def vmm_write(self, em: EmulateWrite, data: bytes) -> None:
        """A write the VMM makes for the guest (an exception frame) that lands
        on a write-protected page: done directly, then accounted as an
        emulated write. The root may have gone with it: reloaded at once, as
        the delivery goes on."""
        hpa = self.cache.guest.hpa(em.gfn << 12)
        before = self.host.read(hpa, PAGE_SIZE)
        self.host.write(hpa | (em.vaddr & (PAGE_SIZE - 1)), data)
        self.table_written(em.gfn, before)
        self.reload()
