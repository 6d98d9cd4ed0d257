"""The MMU modes: one object each, in one table (`MODES`).

A mode says how the VM's guest RAM is placed in host memory, what MMU
state the VM keeps (shadow pages, EPT), how each vCPU's hardware MMU is
configured and which VMM paging object answers for it, which events exit
(the intercepts and the exception bitmap, as a VMCS would say), and what
`--check-invariants` verifies. Nothing outside this module asks a mode for
its name.
"""
from __future__ import annotations

from ..arch.vmx import ExitReason
from ..arch.x86 import Vector
from ..hw.mmu import HardwareMMU, QemuMMU
from ..memory import CHUNK, GiB, MiB, GuestMemory
from .agile import AgileCache, AgileMMU, AgilePaging, AgilePolicy
from .ept import EptPaging, EptTables
from .paging import Paging, QemuPaging
from .shadow import ShadowCache, ShadowPaging

# The platform's devices, HLT and hypercalls exit in every mode, and a
# triple fault always ends the VM: every mode's table lists them alike.
BASE_INTERCEPTS = frozenset({ExitReason.IO_INSTRUCTION, ExitReason.HLT, ExitReason.VMCALL,
                             ExitReason.TRIPLE_FAULT})
# Under a VMM the CPU is the VMM's to present: CPUID always exits (SDM
# Vol.3C §26.1.2), and RDMSR and WRMSR do for every MSR (KVM's MSR bitmap
# passes some through; hv's model keeps them all). CR8 is the TPR shadow:
# MOV to CR8 exits only when it lowers the TPR below an interrupt it held
# back (SDM Vol.3C §29.1.2, the TPR threshold KVM sets). An interrupt that
# waits for RFLAGS.IF exits when the window opens (interrupt-window exiting,
# SDM Vol.3C §26.7.5), and the VMM injects it. INVD always exits (SDM
# Vol.3C §26.1.2).
VIRTUAL_CPU_INTERCEPTS = frozenset({ExitReason.CPUID, ExitReason.MSR_READ,
                                    ExitReason.MSR_WRITE, ExitReason.TPR_BELOW_THRESHOLD,
                                    ExitReason.INTERRUPT_WINDOW, ExitReason.INVD})


class Mode:
    name = ""
    help = ""
    intercepts: frozenset[ExitReason] = BASE_INTERCEPTS
    # Vectors that exit as EXCEPTION_NMI instead of reaching the guest (the
    # VMCS exception bitmap, SDM Vol.3C §25.6.3).
    exception_bitmap: frozenset[int] = frozenset()
    # What an access to a device page exits with (None: no VMM, the device's).
    mmio_exit: ExitReason | None = None
    tlb_model = True        # hv's walker and TLB model translate (False: QEMU's own MMU)
    virtualized = True      # a VMM runs the guest: its exits are priced (hv.cost)
    needs_ept = False       # only on a CPU with EPT

    def memory(self, config) -> tuple[GuestMemory, object]:
        """Guest RAM placed in host memory, and the VM's MMU state."""
        return GuestMemory.identity(config.ram), None

    def vcpu_mmu(self, vm, cpu) -> Paging:
        """vCPU `cpu`'s paging, over the hardware MMU its mode configures,
        with the mode's intercepts (the VMM may change them: agile)."""
        paging = self._paging(vm, cpu)
        paging.intercepts = self.intercepts
        paging.mmio_exit = self.mmio_exit
        return paging

    def _paging(self, vm, cpu) -> Paging:
        return Paging(self._hardware(vm, cpu), vm.guest)

    def _hardware(self, vm, cpu, **config) -> HardwareMMU:
        hw = HardwareMMU(vm.mem, cpu.stats, vm.machine.tlbs[cpu.index], vm.asid,
                         exception_bitmap=self.exception_bitmap, **config)
        if vm.memo is not None:
            hw.use_memo(vm.memo)
        return hw

    def check(self, vm) -> None:
        """The mode's invariants on the VM's MMU state (--check-invariants)."""


def vmm_size(config) -> int:
    """The VMM's area below guest RAM (shadow or EPT tables): an eighth of
    RAM, at least 8 MiB, in whole chunks."""
    return max(8 * MiB, config.ram // 8 // CHUNK * CHUNK)


class Native(Mode):
    name = "native"
    help = "the guest on bare metal: hv's walker and TLB model, no MMU exits"
    virtualized = False


class Shadow(Mode):
    name = "shadow"
    help = ("shadow paging: the VMM's shadow tables, exits on CR3 loads, INVLPG, "
            "page-table writes and hidden page faults")
    # The VMM keeps the guest's paging registers: MOV to CR, INVLPG (and so
    # INVPCID, SDM Vol.3C §26.1.3) and WRMSR(EFER) exit, and every #PF the
    # hardware takes on the shadow tables.
    intercepts = BASE_INTERCEPTS | VIRTUAL_CPU_INTERCEPTS | {ExitReason.CR_ACCESS,
                                                             ExitReason.INVLPG,
                                                             ExitReason.INVPCID}
    exception_bitmap = frozenset({Vector.PF})
    # A device page's spte has reserved bits set: a #PF with RSVD exits.
    mmio_exit = ExitReason.EXCEPTION_NMI

    def memory(self, config):
        size = vmm_size(config)
        guest = GuestMemory.scattered(config.ram, size)
        return guest, ShadowCache(guest, size, large_pages=config.ept_large_pages)

    def _paging(self, vm, cpu):
        return ShadowPaging(self._hardware(vm, cpu, dim="shadow"), vm.mmu, cpu.stats)

    def check(self, vm):
        vm.mmu.check()


class Ept(Mode):
    name = "ept"
    help = ("EPT/nested paging: two-dimensional walks of the guest's tables and the VMM's EPT, "
            "exits on EPT violations")
    intercepts = BASE_INTERCEPTS | VIRTUAL_CPU_INTERCEPTS | {ExitReason.EPT_VIOLATION,
                                                             ExitReason.EPT_MISCONFIG}
    # A device page's EPT entry is misconfigured on purpose (KVM's MMIO sptes).
    mmio_exit = ExitReason.EPT_MISCONFIG
    needs_ept = True

    def memory(self, config):
        # With large pages, RAM is placed by 1 GiB blocks above a 1 GiB VMM
        # area (untouched pages cost no host memory), so EPT can map whole
        # GiBs where the guest has them.
        block = GiB if config.ept_large_pages else CHUNK
        size = -(-vmm_size(config) // block) * block
        guest = GuestMemory.scattered(config.ram, size, block)
        return guest, EptTables(guest, size, config.ept_large_pages, levels=config.ept_levels)

    def _paging(self, vm, cpu):
        return EptPaging(self._hardware(vm, cpu, eptp=vm.mmu.eptp), vm.guest, vm.mmu, cpu.stats)

    def check(self, vm):
        vm.mmu.check()


class Qemu(Mode):
    name = "qemu"
    help = "Unicorn's own MMU (QEMU's walker): the correctness oracle, nothing modelled"
    tlb_model = False
    virtualized = False

    def _paging(self, vm, cpu):
        return QemuPaging(QemuMMU(cpu.engine, vm.mem))


class Agile(Mode):
    name = "agile"
    help = ("agile paging: shadow tables where the guest's tables stay still, below a switch "
            "its own tables through EPT where they change (Gandhi et al., ISCA 2016)")
    intercepts = Shadow.intercepts | Ept.intercepts
    exception_bitmap = Shadow.exception_bitmap
    mmio_exit = Shadow.mmio_exit
    needs_ept = True

    def memory(self, config):
        # Shadow pages and EPT each get the VMM area its own mode would (so
        # the degenerate policies count exactly as `shadow` and `ept`).
        block = GiB if config.ept_large_pages else CHUNK
        shadow_size = vmm_size(config)
        size = -(-2 * shadow_size // block) * block
        guest = GuestMemory.scattered(config.ram, size, block)
        ept = EptTables(guest, size - shadow_size, config.ept_large_pages, base=shadow_size,
                        levels=config.ept_levels)
        cache = AgileCache(guest, shadow_size, config.ept_large_pages, ept)
        return guest, AgileMMU(cache, ept, AgilePolicy(self.policy(config), cache))

    def policy(self, config) -> str:
        return config.agile_policy

    def _paging(self, vm, cpu):
        state = vm.mmu
        # The policy's clock: the VM's instructions, counted by slices.
        state.policy.elapsed = lambda: vm.config.max_insns - vm.budget
        hw = self._hardware(vm, cpu, dim="shadow", eptp=state.ept.eptp, agile=True)
        paging = AgilePaging(hw, state, cpu.stats)
        paging.agile_intercepts = self.intercepts
        return paging

    def check(self, vm):
        vm.mmu.check()


class Adaptive(Agile):
    """Agile's machinery with the whole-VM policy: `--mmu agile
    --agile-policy whole` (whose knobs that spelling sets)."""
    name = "adaptive"
    help = ("the whole VM shadowed or nested, switched by measured walks and exits (after Wang "
            "et al., VEE 2011): agile paging's policy without subtrees")

    def policy(self, config) -> str:
        return "whole"


MODES: dict[str, Mode] = {m.name: m for m in (Native(), Shadow(), Ept(), Agile(), Adaptive(),
                                              Qemu())}
BASELINE = "native"         # what hv compare measures overheads against
MODE_HELP = {name: m.help for name, m in MODES.items()}
# The modes hv compare can price: those whose TLB and walks hv models.
COUNTING_MODES = tuple(name for name, m in MODES.items() if m.tlb_model)
