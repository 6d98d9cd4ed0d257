"""Limits and the --check-invariants debug mode: runaway guests stop with a
reason and their counters; the VMM's invariants are checked after every
exit."""
import json
import os
from collections import Counter
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import hv
from hv.api import make_result
from hv.arch import ept
from hv.vmm.vm import VM, Config

from conftest import hv_process, image

SPIN = "spin: jmp spin\n"


def test_timeout_stops_a_runaway_guest_with_its_counters():
    t = time.monotonic()
    r = hv.run("spin", image=image(SPIN), timeout=0.2)
    assert r.reason == "timeout" and time.monotonic() - t < 5
    assert r.counters["insns"] > 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_still_prints_the_counters(tmp_path, signum):
    """And SIGTERM (kill, timeout(1)) is as Ctrl-C."""
    src = tmp_path / "spin.s"
    src.write_text(SPIN)
    # A limit no run reaches before the signal (hv spins 10^8 instructions a second).
    p = hv_process("run", str(src), "--json", "--max-insns", str(10**15))
    try:
        time.sleep(1.5)
        p.send_signal(signum)
        out, err = p.communicate(timeout=30)
    finally:            # a run the signal did not stop spins on otherwise
        p.kill()
        p.wait()
    doc = json.loads(out)
    assert p.returncode == 130 and doc["reason"] == "interrupted"
    assert doc["counters"]["insns"] > 0 and "Traceback" not in err


def test_a_signal_the_parent_ignores_stays_ignored(tmp_path):
    """`hv run ... &` in a script (no job control) ignores Ctrl-C, as other
    programs started so do; one started under a parent that ignores
    SIGTERM keeps ignoring it too: the run goes on to its limit."""
    src = tmp_path / "spin.s"
    src.write_text(SPIN)
    p = hv_process("run", str(src), "--json", "--max-insns", str(3 * 10**8),
                   ignore=(signal.SIGINT, signal.SIGTERM))
    try:
        while _cpu_seconds(p.pid) < 1.0 and p.poll() is None:   # into the run
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    doc = json.loads(out)
    assert (p.returncode, doc["reason"], err) == (1, "max_insns", "")
    assert doc["counters"]["insns"] == 3 * 10**8


# A page touched every 4 instructions, 48 MiB of them round and round:
# Unicorn's TLB misses all the time (under ept each first touch is an EPT
# violation too), so hv spends its time in and out of the TLB fill callback.
TOUCH = """
again:
    mov rsi, 0x1000000
    mov rcx, 12288
touch:
    mov rax, qword ptr [rsi]
    add rsi, 4096
    dec rcx
    jnz touch
    jmp again
"""


def _cpu_seconds(pid: int) -> float:
    """The CPU time process `pid` has used (proc(5): utime and stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _interrupted(args: list[str], tries: int, cpu: float) -> list[tuple[int, str, str]]:
    """Run `hv args` `tries` times at once and send each SIGINT once it has
    used its share of CPU time (cpu, cpu + 0.05, ... seconds: past start-up
    whatever the load, and each at another point of its run) -> (status,
    stdout, stderr) of each; each must end within 10 s of its signal."""
    runs = [hv_process(*args) for _ in range(tries)]
    try:
        waiting = {p: cpu + 0.05 * i for i, p in enumerate(runs)}
        while waiting:
            for p, used in list(waiting.items()):
                if _cpu_seconds(p.pid) >= used:
                    p.send_signal(signal.SIGINT)
                    del waiting[p]
            time.sleep(0.01)
        ends = [p.communicate(timeout=10) for p in runs]
        return [(p.returncode, out, err) for p, (out, err) in zip(runs, ends)]
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("mmu", ["native", "ept"])
def test_ctrl_c_in_the_fill_callback_ends_the_run_with_its_counters(tmp_path, mmu):
    """Python's KeyboardInterrupt, raised in the TLB fill callback, was
    swallowed by ctypes and the run died with two tracebacks and no JSON."""
    src = tmp_path / "touch.s"
    src.write_text(TOUCH)
    for status, out, err in _interrupted(["run", str(src), "--mmu", mmu, "--json",
                                          "--max-insns", str(10**15)], tries=6, cpu=1.0):
        assert (status, err) == (130, ""), err
        doc = json.loads(out)
        assert doc["reason"] == "interrupted" and doc["counters"]["insns"] > 0


def test_ctrl_c_in_compare_keeps_the_cases_finished(tmp_path):
    src = tmp_path / "touch.s"
    src.write_text(TOUCH)
    for status, out, err in _interrupted(["compare", "hello", str(src), "--mmu", "native",
                                          "--json", "--max-insns", str(10**15)],
                                         tries=3, cpu=0.8):
        assert status == 130 and "Traceback" not in err and "interrupted" in err, err
        doc = json.loads(out)
        assert doc["interrupted"] and [c["guest"] for c in doc["cases"]] == ["hello"]


def test_sigint_in_a_hook_stops_the_run_at_once_and_the_handler_is_restored():
    """In-process: SIGINT raised while the guest prints its first byte (the
    OUT hook: Python runs the handler there). Whatever handled SIGINT before
    hv.run does again after it (Python's, as a terminal starts pytest: not
    the SIG_IGN of a `make test &`, which hv leaves alone)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        r = hv.run("hello", on_console=lambda vm, byte: signal.raise_signal(signal.SIGINT))
        assert (r.reason, r.console) == ("interrupted", "h")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_hv_runs_outside_the_main_thread():
    """signal.signal is refused outside the main thread: there hv.run
    installs no handler (SIGINT is the main thread's anyway)."""
    results = []
    t = threading.Thread(target=lambda: results.append(hv.run("hello")))
    t.start()
    t.join()
    assert results and results[0].ok


# Page-table work with few exits of other kinds: a PT made live, remapped
# with INVLPG, a second address space switched to and back.
MMU_WORK = """
    mov r14, 0x500000
    mov rax, 0x600003
    mov qword ptr [r14], rax
    mov rax, 0x500003
    mov qword ptr [0x4000 + 24 * 8], rax
    mov r15, 0x3000000
    mov rcx, 20
again:
    mov rax, qword ptr [r15]
    mov rax, rcx
    shl rax, 12
    add rax, 0x600003
    mov qword ptr [r14], rax
    invlpg [r15]
    loop again
    mov r12, cr3
    mov rdi, 0x700000
    mov rsi, r12
    mov rcx, 512
    rep movsq
    mov rax, 0x700000
    mov cr3, rax
    mov rax, qword ptr [r15]
    mov cr3, r12
    xor eax, eax
    mov dx, 0xf4
    out dx, al
"""


@pytest.mark.parametrize("mmu", ["native", "shadow", "ept"])
@pytest.mark.parametrize("guest", ["hello", "mmu-work"])
def test_runs_keep_every_invariant(guest, mmu):
    img = image(MMU_WORK) if guest == "mmu-work" else None
    r = hv.run(guest, mmu=mmu, image=img, check_invariants=True, vcpus=2)
    assert r.ok, r.detail


def test_check_finds_an_ept_entry_that_maps_a_foreign_frame():
    vm = VM(image("mov rax, qword ptr [0x1000000]\nmov rax, qword ptr [0x1200000]\n"
                  "xor eax, eax\nmov dx, 0xf4\nout dx, al\n"),
            Config(mmu="ept", check_invariants=True))
    # Map GPA 0x1200000 to the host frame of GPA 0 by hand: a VMM bug.
    vm.mmu.map(Counter(), 0x1200000)
    table = vm.mmu.root
    for level in (4, 3, 2):
        table = vm.mem.read_u64(table + ((0x1200000 >> (12 + 9 * (level - 1))) & 511) * 8) & ~0xFFF
    vm.mem.write_u64(table, vm.guest.hpa(0) | ept.RWX | ept.MT_WB)
    vm.run()
    r = make_result("t", vm)
    assert r.reason == "invariant" and "not its own frame" in r.detail


# -- host memory stays flat ---------------------------------------------------
# bench.py's long run: rounds of a register loop and three exits (port I/O
# to no device, an unknown hypercall, a mark under a new id), a console byte
# every 256th round, at which the test reads the process's resident size.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench import LONG_RUN  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("mmu", ["native", "shadow"])
def test_long_runs_keep_host_memory_flat(mmu):
    """10^5 rounds of three exits (and a console byte every 256th) and
    3 x 10^7 instructions:
    the resident size is the same after the first fifth as at the end
    (bench/bench.py runs 10^9 instructions and 10^6 exits)."""
    rounds = 100_000
    samples = []
    r = hv.run("long", mmu=mmu, image=image(LONG_RUN.format(rounds=rounds, spin=100)),
               on_console=lambda vm, byte: samples.append(_rss_mib()))
    assert r.ok and r.counters["exits"] > 3 * rounds, r.detail
    assert len(r.marks) == hv.vmm.vm.MAX_MARKS                    # the rest were refused
    fifth = len(samples) // 5
    settled, later = samples[fifth], max(samples[fifth:])
    assert later - settled < 4, (settled, later)


def test_console_output_is_kept_up_to_a_limit(monkeypatch):
    monkeypatch.setattr(hv.vmm.vm, "MAX_CONSOLE", 10)
    seen = []
    r = hv.run("hello", on_console=lambda vm, byte: seen.append(byte))
    assert len(r.console) == 10 and r.counters["console_dropped"] == len(seen) - 10 > 0
