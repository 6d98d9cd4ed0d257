"""`agile`: agile paging (Gandhi, Hill and Swift, "Agile Paging: Exceeding the
Best of Nested and Shadow Paging", ISCA 2016): shadow paging where the
guest's tables stay still, nested paging where they change.

The VMM keeps shadow tables as under `shadow` (hv.vmm.shadow) and the VM's
EPT as under `ept` (hv.vmm.ept). A non-leaf shadow entry may carry the
switch bit (arch.paging.SWITCH) and the guest-physical address of a guest
table: the hardware walks shadow entries down to it, one reference each,
then that table and the ones below it in two dimensions, every
guest-physical address through EPT (hv.hw.walker): from 4 references (all
shadow) to 24 (all nested), 3 + (4 + 1) + 4 = 12 when only the last level
is nested. Below a switch the guest's tables are not write-protected, so
writing them costs no exit; a #PF there is the guest's own, delivered
without an exit; an INVLPG there needs none either. Where the guest loads
CR3 often, the root itself switches: the hardware walks from the guest's
CR3, nested from the top, and MOV to CR3 exits no more (as under `ept`).
The VM starts that way, nested, and goes shadowed once nested walks have
cost more than shadowing would (the policy's rent): its first touches of
an address space cost no hidden faults, as under `ept`, and a guest that
goes on missing the TLB gets shadow tables prefilled with what it touched.

A shadowed guest table may also be reached as data through a switch (the
guest writes its tables through a mapping whose table is nested): EPT
maps it read-only, so that write exits too (EPT_VIOLATION) and is
emulated as shadow paging's write-protection fault would be.

Invariants (besides shadow paging's and EPT's):
- A guest table frame is shadowed or walked nested, never both: a switch
  entry points at a frame no shadow page shadows (ShadowCache.check).
- A shadowed guest table frame is never writable through EPT (AgileMMU.check).
- Every vCPU's root is the policy's: nested or a shadow root, the same for
  all vCPUs of the VM before any of them runs again (`AgilePaging.reload`).

Hardware no CPU ships, so hv decides what the paper leaves open: the
switch bit is one of the bits 4-level paging ignores; finding that an
INVLPG's address lies below a switch is the CPU's, and costs nothing here;
the policy starts nested rather than shadowed (README, "Agile paging",
says why).
"""
from __future__ import annotations

from ..arch import ept as arch_ept
from ..arch.ept import EptQual
from ..arch.paging import (A, ADDR_MASK, D, ENTRIES_PER_TABLE, P, PAGE_SIZE, PAGE_SIZES, PS,
                           PFErr, RW, US)
from ..arch.vmx import ExitReason
from ..arch.x86 import CR4, PG
from ..errors import GuestEscape, HvError, InvariantError
from ..events import EmulateWrite
from ..memory import parse_count
from .shadow import ShadowCache, ShadowPaging

# The VMM's controls with a nested root: `ept`'s (the modes table's Ept).
NESTED_INTERCEPTS = frozenset({ExitReason.IO_INSTRUCTION, ExitReason.HLT, ExitReason.VMCALL,
                               ExitReason.TRIPLE_FAULT, ExitReason.EPT_VIOLATION,
                               ExitReason.EPT_MISCONFIG, ExitReason.CPUID,
                               ExitReason.MSR_READ, ExitReason.MSR_WRITE,
                               ExitReason.TPR_BELOW_THRESHOLD, ExitReason.INTERRUPT_WINDOW,
                               ExitReason.INVD})
POLICIES = ("dynamic", "whole", "shadow", "nested")
# The measuring policies' knobs: `--agile-policy dynamic:writes=2,trial=0`.
KNOBS = {"writes": "SWITCH_WRITES", "cr3": "SWITCH_CR3", "pcid": "SWITCH_PCID",
         "window": "WINDOW", "trial": "TRIAL", "rent": "RENT"}
MEASURING = ("dynamic", "whole")
# What the switch of a root from nested to shadowed prefills at most.
PREFILL_TABLES = 64     # guest tables read
PREFILL = 4096          # translations shadowed
LINES_PER_TABLE = PAGE_SIZE // 64


def parse_policy(text: str) -> tuple[str, dict[str, int]]:
    """'dynamic[:knob=N,...]', 'whole[:knob=N,...]', 'shadow' or
    'nested' -> (kind, knobs)."""
    kind, _, rest = text.partition(":")
    if kind not in POLICIES:
        raise HvError(f"unknown agile policy {kind!r} (choose from {', '.join(POLICIES)})")
    if rest and kind not in MEASURING:
        raise HvError(f"agile policy {kind!r} has no knobs (only dynamic and whole have: "
                      f"{', '.join(KNOBS)})")
    knobs = {}
    for item in filter(None, rest.split(",")):
        name, eq, value = item.partition("=")
        name = name.strip()
        if name not in KNOBS or not eq:
            raise HvError(f"agile policy knob {item!r}: write knob=N with a knob of "
                          f"{', '.join(KNOBS)}")
        minimum = 0 if name in ("trial", "pcid", "rent") else 1
        try:
            number = parse_count(value)
        except ValueError as e:
            raise HvError(f"agile policy knob {item!r}: {e}") from None
        if number < minimum:
            raise HvError(f"agile policy knob {item!r}: must be at least {minimum}")
        if name == "pcid" and number > 1:
            raise HvError(f"agile policy knob {item!r}: must be 0 (off) or 1 (on)")
        knobs[KNOBS[name]] = number
    return kind, knobs


class AgilePolicy:
    """Which guest tables are walked nested, in one place (`--agile-policy`).

    "dynamic": the VM starts nested and pays rent (ski rental): once a
    vCPU's 2-D walks have read RENT references more than walks of shadow
    tables would have (checked at VM entries: after exits, and at each
    slice's start, where the host's timer interrupts the guest anyway), the
    root goes shadowed, prefilled with what the nested walks touched
    (AgilePaging._prefill); a guest that turned PCID on meanwhile stays
    nested. From then on (from the start with RENT 0) every table is
    shadowed but for these rules. A guest table frame that takes
    SWITCH_WRITES write-protection exits (emulated writes) within one window
    of WINDOW guest instructions goes nested: the shadow entries above it
    get the switch bit. SWITCH_CR3 CR3 loads within a window make the root
    nested, and so does the guest setting CR4.PCIDE where SWITCH_PCID is
    1: it asks the TLB to keep its address spaces across CR3 loads, which
    shadow tables give only by exiting on each. Every TRIAL windows
    whatever is nested is tried back as shadow (never with TRIAL 0):
    write-protected again, it goes nested again at the same rates. Each
    knob can be set: "dynamic:writes=2,cr3=8,pcid=0,window=1e5,trial=0,rent=0".
    "whole": the whole VM is shadowed or nested (`--mmu adaptive`, after
    Wang et al., "Selective hardware/software memory virtualization", VEE
    2011): where "dynamic" would nest a table, the root goes nested; every
    TRIAL windows the VM is tried back as shadow. The same knobs, the rent
    too.
    "shadow": nothing is ever nested (the `shadow` mode's counts).
    "nested": the root is nested from the start (the `ept` mode's counts).
    """
    SWITCH_WRITES = 2
    SWITCH_CR3 = 2
    SWITCH_PCID = 1
    WINDOW = 1 << 20
    TRIAL = 8
    # About what shadowing costs (ski rental's break-even): the prefill's
    # shadow pages, 4,000 cycles each, are 400 references apiece; the sample
    # suite stays within 5% of the better mode from 1,536 to 3,072 (README).
    RENT = 2048

    def __init__(self, policy: str, cache: ShadowCache):
        kind, knobs = parse_policy(policy)
        for attr, value in knobs.items():
            setattr(self, attr, value)
        self.cache = cache
        self.dynamic = kind in MEASURING
        self.whole_vm = kind == "whole"
        self.elapsed = lambda: 0            # the VM's clock (the mode sets it)
        self.nested: set[int] = set()       # guest table frames walked nested
        self.root_nested = kind == "nested"
        self._writes: dict[int, int] = {}   # gfn -> emulated writes this window
        self._cr3_loads = 0
        self._window_end = self.WINDOW
        self._windows = 0
        # Nested from the start until the rent is paid (then `prefill`).
        self.renting = self.dynamic and self.RENT > 0
        self.root_nested = self.root_nested or self.renting
        self.prefill = False

    def table_written(self, c, gfn: int) -> None:
        """An emulated write to shadowed table `gfn` (a write-protection exit)."""
        if not self.dynamic:
            return
        n = self._writes[gfn] = self._writes.get(gfn, 0) + 1
        shadows = self.cache.shadowed.get(gfn)
        if n < self.SWITCH_WRITES or not shadows:
            return
        top = max(vcpu.levels for vcpu in self.cache.vcpus)    # 4, or 5 (CR4.LA57)
        if self.whole_vm or any(level == top for _gfn, level, *_role in shadows):
            self._nest_root(c)              # a root has no entry above it to switch
        else:
            self.nested.add(gfn)
            self.cache.nest(c, gfn)
            c["agile.to_nested"] += 1

    def cr3_loaded(self, c) -> None:
        if not self.dynamic:
            return
        self._cr3_loads += 1
        if self._cr3_loads >= self.SWITCH_CR3:
            self._nest_root(c)

    def pcid_enabled(self, c) -> None:
        if self.dynamic and self.SWITCH_PCID:
            self._nest_root(c)

    def _rent_paid(self, c, cr4: int) -> None:
        """The root goes shadowed, its tables prefilled; unless the guest
        turned PCID on while nested (no exit showed it): it stays nested."""
        self.renting = False
        if cr4 & CR4.PCIDE and self.SWITCH_PCID:
            return
        self.root_nested = False
        self.prefill = True
        c["agile.to_shadow"] += 1

    def _nest_root(self, c) -> None:
        if not self.root_nested:
            self.root_nested = True
            self.cache.zap_all(c)           # nothing is write-protected now
            c["agile.to_nested"] += 1

    def tick(self, c, cr4: int) -> None:
        """At VM entry (after an exit, or at a slice's start: the host's
        timer interrupts the guest anyway): the rent, a new window, and
        every TRIAL windows a trial. `cr4`: the guest's."""
        if self.renting:
            levels = 5 if cr4 & CR4.LA57 else 4
            if c["tlb.walk_refs"] - levels * c["tlb.walks"] >= self.RENT:
                self._rent_paid(c, cr4)
        now = self.elapsed()
        if now < self._window_end:
            return
        self._window_end = now + self.WINDOW
        self._windows += 1
        self._writes.clear()
        self._cr3_loads = 0
        if (not self.TRIAL or self._windows % self.TRIAL or self.renting
                or not (self.nested or self.root_nested)):
            return                          # (a root still renting is the rent's to end)
        c["agile.to_shadow"] += len(self.nested) + self.root_nested
        for gfn in self.nested:
            self.cache.drop_switches(c, gfn)
        self.nested.clear()
        self.root_nested = False
        self.cache.flush_all(c)


# "writes=2,cr3=2,window=1048576,trial=8": the knobs as --help shows them.
DEFAULT_KNOBS = ",".join(f"{knob}={getattr(AgilePolicy, attr)}" for knob, attr in KNOBS.items())


class AgileCache(ShadowCache):
    """Shadow pages whose guest tables EPT write-protects too (this
    module's docstring)."""

    def __init__(self, guest, vmm_size: int, large_pages: bool, ept):
        super().__init__(guest, vmm_size, large_pages)
        self.ept = ept
        ept.read_only = self.shadowed

    def write_protect(self, c, gfn: int) -> None:
        """As shadow paging's, and in EPT too: one flush for both."""
        leaves = self._protect_leaves(c, gfn)
        if self.ept.protect(c, gfn):
            self.flush_all(c, ept=True)
        elif leaves:
            self.flush_all(c)


class AgileMMU:
    """The VM's state under agile paging: its shadow pages, its EPT, the policy."""

    def __init__(self, shadow: AgileCache, ept, policy: AgilePolicy):
        self.shadow, self.ept, self.policy = shadow, ept, policy

    def check(self) -> None:
        self.shadow.check()
        self.ept.check()
        for gfn in self.policy.nested:
            if gfn in self.shadow.shadowed:
                raise InvariantError(f"guest table {gfn:#x} is both nested and shadowed")
        for gfn in self.shadow.shadowed:
            leaf = self.ept.leaf(gfn << 12)
            if leaf is not None and leaf[2] & arch_ept.W:
                raise InvariantError(f"shadowed guest table {gfn:#x} is writable through EPT")


class AgilePaging(ShadowPaging):
    """One vCPU's paging under agile paging: shadow paging's, with switch
    entries below which the hardware walks the guest's tables, and a root
    that may be nested."""

    def __init__(self, hw, state: AgileMMU, stats):
        super().__init__(hw, state.shadow, stats)
        self.ept, self.policy = state.ept, state.policy
        self.root_nested = False

    def nested_table(self, gfn: int, level: int) -> bool:
        return gfn in self.policy.nested

    def ept_violation(self, ex) -> EmulateWrite | None:
        """EPT has no entry for the frame (map it), or refused a write to a
        read-only one: a shadowed table's (emulated), or one shadowed no
        more (writable again)."""
        gpa = ex.value
        if not ex.qualification & EptQual.WRITE or not ex.qualification & EptQual.READABLE:
            self.ept.map(self.counters, gpa)
        elif gpa >> 12 in self.cache.shadowed:
            self.counters["insn_emulation"] += 1
            return EmulateWrite(ex.gla, gpa >> 12)
        else:
            self.ept.allow_write(self.counters, gpa)
        return None

    def fixed(self, path: list, gfn: int | None = None) -> None:
        """The VMM knows where the guest-physical frames of a fixed hidden
        fault live (it just mapped them): EPT learns them too, so that a walk
        that goes nested through them later takes no EPT violation."""
        if not self.policy.dynamic:
            return
        for _level, entry_addr, _entry in path:
            self.ept.ensure(self.counters, entry_addr)
        if gfn is not None:
            self.ept.ensure(self.counters, gfn << 12)

    def reload(self) -> None:
        """At VM entry: the policy's windows, then the root it wants."""
        self.policy.tick(self.counters, self.hw.cr4 if self.root_nested else self.cr4)
        if self.policy.root_nested != self.root_nested:
            self._switch_root()
        if not self.root_nested:
            super().reload()
            if self.policy.prefill:
                self.policy.prefill = False
                self._prefill()

    def _prefill(self) -> None:
        """The root has just left nested: shadow the translations the
        guest's tables mark accessed (the nested walks set A, and D where
        they wrote), as the hidden faults of their first touches would,
        without those faults (KVM's pte_prefetch, which also takes only
        accessed entries). Each walk finds its A and D set already, so no
        guest entry changes. At most PREFILL_TABLES tables read and
        PREFILL translations; 1 GiB pages are left to fault."""
        if not self.cr0 & PG:
            return
        c = self.counters
        kept = c["pf_fixed"], c["insn_emulation"]
        done = 0
        for vaddr, leaf in self._accessed():
            if done == PREFILL:
                break
            done += self._prefetch(vaddr, leaf)
        c["pf_fixed"], c["insn_emulation"] = kept   # no fault was fixed, no write emulated
        c["agile.prefilled"] += done

    def _accessed(self):
        """The 4 KiB translations (vaddr, leaf) of the guest's accessed
        leaves below CR3, reading at most PREFILL_TABLES tables (a
        reference per cache line of each); a table outside guest RAM
        reads as empty."""
        guest, levels = self.guest, self.levels
        sign = 1 << 11 + 9 * levels             # the top level's highest bit
        tables = [(self.cr3 & ADDR_MASK, levels, 0)]
        for _ in range(PREFILL_TABLES):
            if not tables:
                return
            gpa, level, vbase = tables.pop()
            self.counters["vmm.guest_walk_refs"] += LINES_PER_TABLE
            for i in range(ENTRIES_PER_TABLE):
                entry = guest.read_u64(gpa + 8 * i) if gpa + 8 * i < guest.ram else 0
                if entry & (P | A) != P | A:
                    continue
                vaddr = vbase | i << 3 + 9 * level
                if level > 1 and not entry & PS:
                    tables.append((entry & ADDR_MASK, level - 1, vaddr))
                elif level <= 2:
                    for page in range(vaddr, vaddr + PAGE_SIZES[level], PAGE_SIZE):
                        yield page - (page & sign) * 2, entry

    def _prefetch(self, vaddr: int, leaf: int) -> int:
        """Shadow one translation as its hidden fault would, writable if the
        leaf is dirty -> 1, or 0 where the guest's walk faults, the page is
        a shadowed table (read-only then), or it lies outside the VM."""
        for error in ((PFErr.W, 0) if leaf & D and leaf & RW else (0,)):
            for user in ((PFErr.U, 0) if leaf & US else (0,)):
                try:
                    if self.page_fault(vaddr % (1 << 64), int(error | user)) is None:
                        return 1
                except GuestEscape:
                    return 0
        return 0

    def _switch_root(self) -> None:
        hw = self.hw
        if self.policy.root_nested:
            # The hardware walks the guest's CR3 in two dimensions, and runs
            # its MOV to CR itself: nothing here to keep.
            self.root = None
            hw.load(self.cr0, self.cr3, self.cr4, self.efer, nested_root=True)
            hw.nested_wp_exits = False
            self.intercepts = NESTED_INTERCEPTS
        else:
            self.cr0, self.cr3, self.cr4, self.efer = hw.cr0, hw.cr3, hw.cr4, hw.efer
            self.root = None                # built and loaded by ShadowPaging.reload
            self.intercepts = self.agile_intercepts
        self.root_nested = self.policy.root_nested

    def _load(self) -> None:
        super()._load()
        self.hw.nested_wp_exits = not self._wp
        # Below a switch the guest's NX bits are reserved if its EFER.NXE is
        # clear (the shadow part runs with NXE set).
        self.hw.walker.switch_nxe = self._nxe

    def boot(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        super().boot(cr0, cr3, cr4, efer)
        if self.policy.root_nested:         # "nested": `ept` from the first instruction
            self._switch_root()

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR to EFER: with a nested root the guest's EFER is the
        hardware's, as under ept."""
        if self.root_nested:
            self.hw.wrmsr(msr, value)
        else:
            super().wrmsr(msr, value)

    def write_cr(self, cr: int, value: int) -> None:
        if cr == 3:
            # First: a load that nests the root builds no shadow root for
            # the new CR3 (the reload below switches to the nested one).
            self.policy.cr3_loaded(self.counters)
        elif cr == 4 and value & ~self.cr4 & CR4.PCIDE:
            self.policy.pcid_enabled(self.counters)
        super().write_cr(cr, value)

    def table_written(self, gfn: int, before: bytes) -> None:
        super().table_written(gfn, before)
        self.policy.table_written(self.counters, gfn)
