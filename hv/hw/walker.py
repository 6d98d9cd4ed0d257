"""The page walker: the one place that counts walk references.

One walk follows SDM Vol.3A §4.5 (4- and 5-level paging): at each level read the
entry, check P and the reserved bits, accumulate RW/US/NX, stop at a leaf.
Accessed and Dirty bits are set the way QEMU's MMU (the project's oracle)
sets them: A in each entry as the walk uses it, A and D in the leaf only when
the access is allowed (SDM Vol.3A §4.8 allows either order).

The VMM reads paging structures too, and counts nothing there: its own
shadow and EPT tables (hv.vmm.shadow, hv.vmm.ept), and the guest's through a
`Walker.peeker` (code scanning, crash reports).
"""
from __future__ import annotations

from ..arch import ept
from ..arch.ept import EptQual
from ..arch.paging import (A, ADDR_MASK, D, G, NX, P, PS, RSVD_HIGH, RW, US, PFErr, Level,
                           level_shift, reserved_mask)
from ..arch.x86 import CR4
from ..errors import GuestEscape
from ..events import EptMisconfig, EptViolation, Fault, NonCanonical, PageFault
from ..stats import Stats

READ, WRITE, FETCH = 0, 1, 2        # access kinds, as Unicorn numbers them minus 16
_LEVELS = (1, 2, 3, 4, 5)
_SHIFT = (0,) + tuple(level_shift(level) for level in _LEVELS)
_PF_PK = int(PFErr.PK)
_PF_P, _PF_W, _PF_U, _PF_RSVD, _PF_I = (int(PFErr.P), int(PFErr.W), int(PFErr.U),
                                        int(PFErr.RSVD), int(PFErr.I))
# P and reserved_mask by level (index 0 unused), without the low address
# bits of a large leaf, which _LARGE_LOW adds when PS is set at levels 2
# and 3: an entry passes if `entry & check[level] == P`.
_CHECK_NXE = (0,) + tuple(P | reserved_mask(level, 0, True) for level in _LEVELS)
_CHECK_NO_NXE = (0,) + tuple(P | reserved_mask(level, 0, False) for level in _LEVELS)
_LARGE_LOW = tuple(reserved_mask(level, PS, True) & ~_CHECK_NXE[level] if level in (2, 3) else 0
                   for level in range(6))
_EPT_SUSPECT = RSVD_HIGH | ept.MT_MASK | ept.LARGE
_EPT_NEED = (ept.R, ept.W, ept.X)       # the right each access kind needs
_EPT_QUAL = (int(EptQual.READ), int(EptQual.WRITE), int(EptQual.FETCH))
ACCESS_NAMES = ("read", "write", "fetch")
LEVEL_NAMES = {lv.value: lv.name for lv in Level}
# References by level (index 0 unused) of a walk from the top of `levels`
# levels to a leaf at level i: _LEVELS_READ[levels][i].
_LEVELS_READ = {top: [None] + [tuple(int(leaf <= lv <= top) for lv in range(6))
                               for leaf in range(1, top + 1)] for top in (4, 5)}
# Tags a root that 5-level paging walks (CR4.LA57: `root`); the walk memo
# keeps its walks apart from 4-level walks of the same table.
FIVE_LEVEL = 1 << 62
_LA57 = int(CR4.LA57)


def root(cr3: int, cr4: int) -> int:
    """What a walk of the tables at `cr3` starts from under `cr4`: CR3,
    tagged FIVE_LEVEL with CR4.LA57."""
    return cr3 | FIVE_LEVEL if cr4 & _LA57 else cr3


class Translation:
    """What a successful walk learned: what a TLB entry caches."""
    __slots__ = ("vbase", "pbase", "shift", "writable", "user", "nx", "global_", "dirty",
                 "pkey")

    def __init__(self, vbase, pbase, shift, writable, user, nx, global_, dirty, pkey=0):
        self.vbase, self.pbase, self.shift = vbase, pbase, shift
        self.writable, self.user, self.nx = writable, user, nx
        self.global_, self.dirty = global_, dirty
        self.pkey = pkey            # the leaf's protection key (bits 62:59)

    def paddr(self, vaddr: int) -> int:
        return self.pbase | (vaddr & ((1 << self.shift) - 1))

    def piece(self, vaddr: int) -> "Translation":
        """The 4 KiB piece of this translation that holds `vaddr`."""
        return Translation(vaddr & ~0xFFF, self.paddr(vaddr) & ~0xFFF, 12, self.writable,
                           self.user, self.nx, self.global_, self.dirty, self.pkey)

    def __repr__(self):
        flags = "".join(c for c, on in (("W", self.writable), ("U", self.user), ("X", not self.nx),
                                        ("G", self.global_), ("D", self.dirty)) if on)
        return f"<{self.vbase:#x}->{self.pbase:#x} {1 << self.shift:#x} {flags}>"


def _counted(by_level: list[int], before: list[int]) -> tuple[int, ...]:
    """What a walk added to references by level (index 0 unused)."""
    return (0, by_level[1] - before[1], by_level[2] - before[2], by_level[3] - before[3],
            by_level[4] - before[4], by_level[5] - before[5])


def pkru_denies(pkru: int, pkey: int, write: bool, user: bool, wp: bool) -> bool:
    """Whether PKRU refuses a data access to a user-mode address with
    protection key `pkey` (SDM Vol.3A §4.6.2): AD refuses every access, WD
    a write at CPL 3 or with CR0.WP."""
    rights = pkru >> 2 * pkey
    return bool(rights & 1 or rights & 2 and write and (user or wp))


def pf_error_code(access: int, user: bool, nxe: bool, smep: bool = False) -> int:
    """The access bits of a #PF error code (SDM Vol.3A §4.7): W, U, and I
    for a fetch with EFER.NXE or CR4.SMEP."""
    return ((_PF_W if access == WRITE else 0) | (_PF_U if user else 0)
            | (_PF_I if access == FETCH and (nxe or smep) else 0))


class Walker:
    """Walks 4- or 5-level tables in `mem` (addresses below `limit`) and
    counts every reference in `stats`: x86-64 paging structures with `walk`
    (5 levels from a `root` tagged FIVE_LEVEL), EPT with `walk_ept` (as
    many levels as the EPTP says).

    `dim` names the tables walked in reference tags: "guest" for the guest's
    own tables, "shadow" for shadow tables, "ept" for EPT. A `hardware`
    walker is the CPU's page walker (tlb.* counters); otherwise it is the
    VMM's software walk of guest tables (vmm.* counters). `nested`, for a
    two-dimensional walk, translates each guest-physical address the walk
    uses (every table entry and the final page) through EPT:
    nested(gpa, access, final) -> (host-physical address, page shift,
    whether EPT allows writes).

    Counting: each loop reads an entry with `word` and counts it in
    `by_level` (this walker's references by level) on the next line, then
    adds the walk's references to the `refs` counter once: two loops, one
    rule, and no call per reference (this is the hottest code in hv). A
    walk replayed from the `memo` (WalkMemo) adds what it added then.
    """

    def __init__(self, mem, stats, limit: int, dim: str = "guest", hardware: bool = True,
                 nested=None):
        self.mem, self.stats, self.limit, self.dim = mem, stats, limit, dim
        self.nested = nested
        # Paging-structure caches (pwc.WalkCache) of the CPU, and the ASID
        # its entries are tagged with (--pwc).
        self.pwc, self.asid = None, 0
        self._counters = stats.counters
        self.by_level = stats.level_refs(dim) if hardware else [0] * 6
        self._hist = stats.walk_hist if hardware else None
        prefix = "tlb." if hardware else f"vmm.{dim}_"
        self._walks, self._refs, self._ad = (f"{prefix}walks", f"{prefix}walk_refs",
                                             f"{prefix}ad_writes")
        self._word = mem.word           # word(addr >> 3): the 8-byte entry at addr
        self.memo = None                # the VM's WalkMemo, for the hardware's walkers
        self.nested_by_level: list[int] | None = None   # the EPT walker's, with EPT
        # Agile paging (`switch`): a non-leaf entry with this bit holds the
        # guest-physical address of the guest's next table, and the walk
        # goes on there in two dimensions: through `switch_nested`, its
        # references counted in `switch_by_level` ("guest"), checked with
        # the guest's EFER.NXE (`switch_nxe`), not the one the shadow part
        # runs with.
        self.switch = 0
        self.switch_nested = None
        self.switch_by_level: list[int] | None = None
        self.switch_nxe = True
        # CR4.SMEP: a supervisor fetch from a user page faults; `smap`:
        # CR4.SMAP applies to this walk's supervisor data access (EFLAGS.AC
        # clear, or an implicit access): it faults on a user page (SDM
        # Vol.3A §4.6.1); `pke`: CR4.PKE, the data accesses to user pages
        # that `pkru` refuses fault (§4.6.2). The walk's owner keeps them.
        self.smep = self.smap = self.pke = False
        self.pkru = 0

    @classmethod
    def peeker(cls, mem, limit: int) -> "Walker":
        """A walker for the VMM's own look at a guest's tables: it sets no
        A/D bit and counts nowhere."""
        return cls(_ReadOnly(mem), Stats(), limit)

    def _escape(self, table_addr: int, level: int) -> GuestEscape:
        return GuestEscape(f"level-{level} paging structure at {table_addr:#x} is outside "
                           f"{self.dim} memory [0, {self.limit:#x})")

    def _set_bits(self, entry_addr: int, entry: int, bits: int) -> int:
        if entry & bits != bits:
            entry |= bits
            self.mem.write_u64(entry_addr, entry)
            self._counters[self._ad] += 1
        return entry

    def walk(self, cr3: int, vaddr: int, access: int, user: bool, wp: bool, nxe: bool,
             path: list | None = None) -> Translation:
        """Translate `vaddr` for `access` at CPL 3 (`user`) or CPL 0..2
        through the tables at `cr3` (a `root`: FIVE_LEVEL for 5 levels).

        Raises PageFault with the architectural error code (SDM Vol.3A §4.7),
        or NonCanonical; a nested walk raises EptViolation or EptMisconfig.
        `path`, if given, receives (level, entry address, entry) for every
        entry read, the leaf last. A nested walk returns the host-physical
        translation, at the smaller of the two page sizes.
        """
        # Canonical: bits 63:47 (63:56 with 5 levels) all equal.
        if cr3 & FIVE_LEVEL:
            top = vaddr >> 56
            if top and top != 0xFF:
                raise NonCanonical(vaddr)
        else:
            top = vaddr >> 47
            if top and top != 0x1FFFF:
                raise NonCanonical(vaddr)
        memo = self.memo
        if memo is None or path is not None or self.pwc is not None:
            return self._walk(cr3, vaddr, access, user, wp, nxe, path, None)
        # The page in bits 64-115, CR3's root (and NESTED_ROOT, FIVE_LEVEL) in 12-63,
        # the controls below 12, PKRU above them all.
        key = ((vaddr >> 12) << 64 | (cr3 & ~0xFFF) | access | user << 2 | wp << 3 | nxe << 4
               | self.smep << 5 | self.smap << 6 | self.pke << 7 | self.pkru << 116)
        hit = memo.results.get(key)
        if hit is None:
            return self._remember(memo, key, cr3, vaddr, access, user, wp, nxe)
        # Count the walk again, as it counted itself.
        tr, refs, own, ept_refs, switched = hit
        counters = self._counters
        counters[self._walks] += 1
        counters[self._refs] += refs
        self._hist[refs] += 1
        b = self.by_level
        b[1] += own[1]
        b[2] += own[2]
        b[3] += own[3]
        b[4] += own[4]
        b[5] += own[5]
        if ept_refs is not None:
            b = self.nested_by_level
            b[1] += ept_refs[1]
            b[2] += ept_refs[2]
            b[3] += ept_refs[3]
            b[4] += ept_refs[4]
            b[5] += ept_refs[5]
        if switched is not None:
            b = self.switch_by_level
            b[1] += switched[1]
            b[2] += switched[2]
            b[3] += switched[3]
            b[4] += switched[4]
            b[5] += switched[5]
        return tr

    def _remember(self, memo, key: int, cr3: int, vaddr: int, access: int, user: bool,
                  wp: bool, nxe: bool) -> Translation:
        """Walk, and keep the result in the memo with what the walk counted
        (references in all, by level, and by level of its EPT steps) and
        the address of every entry it read."""
        refs_before = self._counters[self._refs]
        ept_before = None if self.nested_by_level is None else self.nested_by_level[:]
        if self.switch:
            own_before, guest_before = self.by_level[:], self.switch_by_level[:]
        memo.recording = read = []
        try:
            tr = self._walk(cr3, vaddr, access, user, wp, nxe, None, read)
        finally:
            memo.recording = None
        refs = self._counters[self._refs] - refs_before
        ept_refs = None if ept_before is None else _counted(self.nested_by_level, ept_before)
        switched = None
        if self.switch:
            own = _counted(self.by_level, own_before)
            switched = _counted(self.switch_by_level, guest_before)
            if not any(switched):
                switched = None
        else:
            # Without page-walk caches a walk reads its levels from the top
            # down to its leaf: its own references say which.
            top = 5 if cr3 & FIVE_LEVEL else 4
            own = _LEVELS_READ[top][top + 1 - refs + (0 if ept_refs is None else sum(ept_refs))]
        memo.put(key, (tr, refs, own, ept_refs, switched), read)
        return tr

    def _walk(self, cr3: int, vaddr: int, access: int, user: bool, wp: bool, nxe: bool,
              path: list | None, read: list | None) -> Translation:
        """The walk itself; `read` receives the address of every entry read
        (guest and, nested, EPT entries: the memo's watch list)."""
        counters = self._counters
        refs_before = counters[self._refs]
        check = _CHECK_NXE if nxe else _CHECK_NO_NXE
        word, by_level, nested, limit, pwc, switch = (self._word, self.by_level, self.nested,
                                                      self.limit, self.pwc, self.switch)
        refs = 0
        table = cr3 & ADDR_MASK
        level = 5 if cr3 & FIVE_LEVEL else 4
        # RW and US must be set at every level, NX at none: AND and OR of
        # the entries read (SDM Vol.3A §4.6).
        all_and, any_or = -1, 0
        if pwc is not None:
            hit = pwc.lookup(self.asid, vaddr)
            if hit is not None:
                counters["pwc.hits"] += 1
                level, table, all_and, any_or, switched = hit
                if switched:
                    nested, by_level = self.switch_nested, self.switch_by_level
                    if not self.switch_nxe:
                        check, nxe = _CHECK_NO_NXE, False
                level -= 1
        try:
            # arch.paging's table_index and is_leaf, inline: the hottest loop.
            while True:
                entry_addr = table + ((vaddr >> _SHIFT[level]) & 0x1FF) * 8
                if nested is not None:
                    entry_addr = nested(entry_addr, READ, False)[0]
                elif entry_addr >= limit:
                    raise self._escape(entry_addr, level)
                entry = word(entry_addr >> 3)
                by_level[level] += 1
                refs += 1
                if read is not None:
                    read.append(entry_addr)
                if entry & check[level] != P:
                    # Not present, or a reserved bit set (reserved_mask).
                    err = pf_error_code(access, user, nxe, self.smep)
                    raise PageFault(vaddr, err if not entry & P else err | _PF_P | _PF_RSVD,
                                    nested is not None)
                all_and &= entry
                any_or |= entry
                if level == 1 or entry & PS:
                    break
                if not entry & A:
                    entry = self._set_bits(entry_addr, entry, A)
                if path is not None:
                    path.append((level, entry_addr, entry))
                table = entry & ADDR_MASK
                if entry & switch and nested is None:
                    # Agile paging: on in the guest's own tables, through EPT.
                    nested, by_level = self.switch_nested, self.switch_by_level
                    if not self.switch_nxe:
                        check, nxe = _CHECK_NO_NXE, False
                if pwc is not None:
                    pwc.insert(self.asid, level, vaddr,
                               (table, all_and, any_or, nested is not self.nested))
                level -= 1
            return self._leaf(vaddr, access, user, wp, nxe, level, entry_addr, entry,
                              all_and, any_or, path, nested)
        except EptViolation as v:
            # The exit names the linear address whose walk met it.
            raise EptViolation(v.gpa, v.qualification, vaddr) from None
        finally:
            counters[self._walks] += 1
            counters[self._refs] += refs
            if self._hist is not None:
                # A nested walk's EPT steps added theirs to the same counter.
                self._hist[counters[self._refs] - refs_before] += 1

    def _leaf(self, vaddr: int, access: int, user: bool, wp: bool, nxe: bool, level: int,
              entry_addr: int, entry: int, all_and: int, any_or: int,
              path: list | None, nested) -> Translation:
        """The walk reached its leaf at `level`: check the rights the walk
        accumulated, set A (and D), translate."""
        if level == 3:
            # QEMU sets A in a PDPTE before it looks at PS, so a 1 GiB
            # leaf is accessed even if the access then faults, for its
            # rights or for the reserved low bits of its address.
            entry = self._set_bits(entry_addr, entry, A)
        if entry & _LARGE_LOW[level]:
            raise PageFault(vaddr, pf_error_code(access, user, nxe, self.smep) | _PF_P | _PF_RSVD,
                            nested is not None)
        writable, usable = bool(all_and & RW), bool(all_and & US)
        nx = bool(nxe and any_or & NX)
        pkey = entry >> 59 & 0xF
        # With CR4.PKE, PK is in the error code of any fault of a data
        # access to a user page that PKRU refuses (SDM Vol.3A §4.7).
        pk = _PF_PK if (self.pke and usable and access != FETCH
                        and pkru_denies(self.pkru, pkey, access == WRITE, user, wp)) else 0
        # SDM Vol.3A §4.6: a user access to a supervisor page, a fetch from
        # an NX page (or, with CR4.SMEP, a supervisor fetch from a user
        # page), a write to a read-only page at CPL 3 or with CR0.WP, with
        # SMAP a supervisor data access to a user page, what PKRU refuses.
        if (user and not usable) or (access == FETCH and (nx or usable and not user and self.smep)) \
                or (access == WRITE and not writable and (user or wp)) \
                or (usable and not user and access != FETCH and self.smap) or pk:
            raise PageFault(vaddr, pf_error_code(access, user, nxe, self.smep) | _PF_P | pk,
                            nested is not None)
        bits = A | D if access == WRITE else A
        if entry & bits != bits:
            entry = self._set_bits(entry_addr, entry, bits)
        if path is not None:
            path.append((level, entry_addr, entry))
        # A large page may reach past the end of RAM; the MMU checks each
        # frame it caches (HardwareMMU._miss).
        shift = _SHIFT[level]
        low = (1 << shift) - 1
        paddr = (entry & ADDR_MASK & ~low) | (vaddr & low)
        dirty = bool(entry & D)
        if nested is not None:
            paddr, ept_shift, ept_writable = nested(paddr, access, True)
            if ept_shift < shift:
                shift = ept_shift
                low = (1 << shift) - 1
            # A page EPT maps without W is cached as clean: a write walks
            # again, and meets the EPT violation.
            dirty = dirty and ept_writable
        return Translation(vaddr & ~low, paddr & ~low, shift,
                           writable, usable, nx, bool(entry & G), dirty, pkey)

    def walk_unpaged(self, vaddr: int, access: int) -> Translation:
        """Paging off (CR0.PG clear): the linear address is guest-physical.
        Natively nothing is walked; with EPT (`nested`) the walk is EPT's
        alone, and its result a guest-physical mapping the TLB may cache
        (SDM Vol.3C §28.4.1). A 4 KiB translation, writable, executable."""
        page = vaddr & ~0xFFF
        if self.nested is None:
            return Translation(page, page, 12, True, True, False, False, True)
        before = self._counters[self._refs]
        hpa, _shift, ept_writable = self.nested(page, access, True)
        self._counters[self._walks] += 1
        self._hist[self._counters[self._refs] - before] += 1
        return Translation(page, hpa & ~0xFFF, 12, True, True, False, False, ept_writable)

    def walk_ept(self, eptp: int, gpa: int, access: int,
                 final: bool) -> tuple[int, int, bool]:
        """Translate guest-physical `gpa` through EPT: (host-physical address,
        page shift, whether EPT allows writes). One step of a two-dimensional
        walk: its references are counted, it is no walk of its own. Raises
        EptViolation, EptMisconfig.
        """
        table = eptp & ADDR_MASK
        rights = ept.RWX
        level = (eptp >> ept.EPTP_WALK_SHIFT & 7) + 1     # ept.eptp_levels, inline
        word, by_level, limit = self._word, self.by_level, self.limit
        read = None if self.memo is None else self.memo.recording
        refs = 0
        try:
            # arch's table_index and ept.is_leaf, inline: a hot loop.
            while True:
                entry_addr = table + ((gpa >> _SHIFT[level]) & 0x1FF) * 8
                if entry_addr + 8 > limit:
                    raise GuestEscape(f"EPT table at {entry_addr:#x} is outside host memory")
                entry = word(entry_addr >> 3)
                by_level[level] += 1
                refs += 1
                if read is not None:
                    read.append(entry_addr)
                if not entry & ept.RWX:
                    rights = 0
                    break
                # Only entries with one of these bits, or W without R, can be
                # misconfigured (ept.misconfigured has the rules).
                if (entry & _EPT_SUSPECT or entry & 3 == 2) and ept.misconfigured(level, entry):
                    raise EptMisconfig(gpa, level, entry)
                rights &= entry
                if level == 1 or entry & ept.LARGE:
                    break
                if not entry & ept.EA:
                    self._set_bits(entry_addr, entry, ept.EA)
                table = entry & ADDR_MASK
                level -= 1
        finally:
            self._counters[self._refs] += refs
        if not rights & _EPT_NEED[access]:
            raise EptViolation(gpa, _EPT_QUAL[access] | (rights & ept.RWX) << 3
                               | EptQual.GLA_VALID | (EptQual.GLA_TRANSLATION if final else 0))
        bits = ept.EA | ept.ED if access == WRITE else ept.EA
        if entry & bits != bits:
            self._set_bits(entry_addr, entry, bits)
        low = (1 << _SHIFT[level]) - 1
        return (entry & ADDR_MASK & ~low) | (gpa & low), _SHIFT[level], bool(rights & ept.W)

    def peek(self, cr3: int, vaddr: int, nxe: bool) -> int | None:
        """The guest-physical address `vaddr` reads from now, or None."""
        try:
            paddr = self.walk(cr3, vaddr, READ, False, False, nxe).paddr(vaddr)
        except (Fault, GuestEscape):
            return None
        return paddr if paddr < self.limit else None


class _ReadOnly:
    """Memory seen by a peeking walker: A/D updates are dropped."""

    def __init__(self, mem):
        self.read_u64, self.word = mem.read_u64, mem.word

    def write_u64(self, addr: int, value: int) -> None:
        pass
