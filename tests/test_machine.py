"""Several VMs and vCPUs on one machine: tagged TLBs, isolation, and what
more vCPUs cost under shadow paging."""
import pytest

import hv
from hv.api import machine_result
from hv.errors import HvError
from hv.vmm.vm import VM, Config, Machine

from conftest import image

# Touch the same 64 pages again and again: a working set that fits the TLB.
PINGPONG = """
    mov r8, 100
round:
    mov rbx, 0x1000000
    mov rcx, 64
touch:
    mov rax, qword ptr [rbx]
    add rbx, 0x1000
    dec rcx
    jnz touch
    dec r8
    jnz round
    xor eax, eax
    mov dx, 0xf4
    out dx, al
"""


def machine_run(sources, **kw):
    config = Config(**kw)
    machine = Machine(config)
    for i, src in enumerate(sources):
        VM(image(src), config, machine=machine, name=f"vm{i}")
    machine.run()
    return machine_result(machine)


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_vpid_tags_keep_translations_across_vm_switches(mmu):
    tagged = machine_run([PINGPONG] * 2, mmu=mmu, quantum=500)
    untagged = machine_run([PINGPONG] * 2, mmu=mmu, quantum=500, asid=False)
    assert tagged.ok and untagged.ok
    assert [vm["exit_code"] for vm in tagged.vms] == [vm["exit_code"] for vm in untagged.vms]
    assert untagged.tlb["misses"] > 20 * tagged.tlb["misses"]
    assert untagged.counters["tlb_flush"] > 100 and tagged.counters["tlb_flush"] == 0
    # the same exits either way: only the TLB differs
    assert untagged.exits == tagged.exits


@pytest.mark.parametrize("guest", ["pgfault", "ptemod"])
def test_without_vpids_every_exit_and_every_entry_flushes(guest):
    """Regression: with asid=False the TLB is flushed after every exit,
    also the exits whose handler leaves the guest an event: an injected
    #PF (pgfault) or an emulated page-table write (ptemod; on the old main
    512 of pgfault's 1,029 exits flushed nothing). Each of those events ends
    the slice, so the guest enters again: one flush more. With a slice
    longer than the run, nothing else ends one."""
    tagged = hv.run(guest, mmu="shadow", quantum=10**9).between(1, 2)
    flat = hv.run(guest, mmu="shadow", quantum=10**9, asid=False).between(1, 2)
    entries = flat.counters["insn_emulation"] + flat.counters["pf_guest"]
    assert entries > 100
    assert flat.counters["exits"] == tagged.counters["exits"]
    assert (flat.counters["tlb_flush"] - tagged.counters["tlb_flush"]
            == flat.counters["exits"] + entries)


def test_identical_guest_physical_layouts_stay_apart(mode):
    """Two VMs write different values at the same guest-physical address,
    interleaved in short quanta; each reads back its own."""
    def guest(value):
        return f"""
            mov rbx, 0x800000
            mov rax, {value}
            mov qword ptr [rbx], rax
            mov rcx, 5000
        spin:
            cmp qword ptr [rbx], rax
            jne bad
            loop spin
            mov al, {value & 0xFF}
            mov dx, 0xf4
            out dx, al
        bad:
            mov al, 0xBB
            mov dx, 0xf4
            out dx, al
        """
    r = machine_run([guest(0x11), guest(0x22)], mmu=mode, quantum=300)
    assert [vm["exit_code"] for vm in r.vms] == [0x11, 0x22]


def test_per_vcpu_figures_add_up_to_the_vm():
    r = hv.run("hello", vcpus=3)
    assert len(r.vcpus) == 3
    assert sum(c["counters"]["io_exits"] for c in r.vcpus) == r.counters["io_exits"]
    assert sum(c["tlb"]["walks"] for c in r.vcpus) == r.tlb["walks"]


# Every vCPU rewrites its own entry of one shared, live page table, then
# reads through it: each write is emulated and flushes every vCPU's TLB.
SHARED_PT = """
    mov r12, 0x500000
    mov rax, 0x500003
    mov qword ptr [0x4000 + 24 * 8], rax    ; PD entry 24 -> the shared PT
    mov rax, rdi
    shl rax, 12
    add rax, 0x600003
    mov r13, 0x3000000
    mov rdx, rdi
    shl rdx, 12
    add r13, rdx                            ; this vCPU's page
    mov rcx, 20
again:
    mov qword ptr [r12 + rdi * 8], rax      ; a write to a live PTE
    invlpg [r13]
    mov rdx, qword ptr [r13]
    loop again
    hlt
"""


def test_shadow_paging_costs_more_with_more_vcpus():
    flushes = {n: hv.run("x", mmu="shadow", image=image(SHARED_PT), vcpus=n, quantum=50)
               .counters.get("remote_tlb_flush", 0) for n in (1, 2, 4)}
    assert flushes[1] == 0 < flushes[2] < flushes[4]
    # EPT: the same guest takes no such flushes at all
    r = hv.run("x", mmu="ept", image=image(SHARED_PT), vcpus=4, quantum=50)
    assert r.reason == "halted" and "remote_tlb_flush" not in r.counters


def test_cli_runs_several_vms(capsys):
    from hv.cli import main
    status = main(["run", "hello", "hello", "--mmu", "ept", "--json"])
    import json
    doc = json.loads(capsys.readouterr().out)
    assert status == 0 and [vm["guest"] for vm in doc["vms"]] == ["hello", "hello"]
    assert doc["counters"]["io_exits"] == sum(vm["counters"]["io_exits"] for vm in doc["vms"])


def test_a_vm_with_more_vcpus_than_its_machine_has_cpus_is_refused():
    """vCPU j runs on physical CPU j: a VM of 2 on a machine of 1 was an
    IndexError."""
    machine = Machine(Config(vcpus=1))
    with pytest.raises(HvError, match="a VM of 2 vCPUs on a machine of 1 physical CPUs"):
        VM(image("hlt\n"), Config(vcpus=2), machine=machine)
    assert machine.vms == []
