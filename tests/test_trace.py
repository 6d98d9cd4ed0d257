"""The exit trace (hv run --trace, hv.run(trace=...)): one record per exit,
with where it happened and the reason's qualification, in every mode."""
import io
import json
from collections import Counter

import pytest

import hv
from hv.asm import assemble_source
from hv.cli import main
from hv.vmm.exits import Trace
from hv.vmm.vm import BOOT_EFER

# The n-th instruction of TRACED (1-based) is what `insns` says at its exit.
TRACED = """
    mov rbx, 1
    mov eax, 0
    vmcall                          ; 3: mark 1
    mov rax, cr3
    mov cr3, rax                    ; 5
    mov rbx, 0x1234567
touch:
    mov qword ptr [rbx], rax        ; 7: the page's first touch
    invlpg [rbx]                    ; 8
    mov ecx, 0xC0000080
    rdmsr
    wrmsr                           ; 11: EFER, unchanged
    mov rbx, 2
    mov eax, 0
    vmcall                          ; 14: mark 2
    mov al, 'x'
    mov dx, 0x3f8
    out dx, al                      ; 17
    mov al, 0
    mov dx, 0xf4
    out dx, al                      ; 20
"""
IMAGE = assemble_source(TRACED, name="<test>")
LABELS = IMAGE.symbols


def traced(mode, **kw):
    events = []
    r = hv.run("traced", mmu=mode, image=IMAGE.code, symbols=LABELS, trace=events.append, **kw)
    return r, events


def only(events, reason):
    return [e for e in events if e["reason"] == reason]


def test_every_exit_is_traced_once(mode):
    r, events = traced(mode)
    assert r.ok
    assert Counter(e["reason"] for e in events) == Counter(r.exits)
    assert {(e["vm"], e["vcpu"]) for e in events} == {(0, 0)}


def test_common_exits_say_where_and_when(mode):
    _, events = traced(mode)
    marks, out = only(events, "VMCALL"), only(events, "IO_INSTRUCTION")
    assert [(e["insns"], e["rax"], e["rbx"]) for e in marks] == [(3, 0, 1), (14, 0, 2)]
    assert [(e["insns"], e["port"], e["direction"], e["size"], e["value"]) for e in out] == [
        (17, 0x3F8, "out", 1, ord("x")), (20, 0xF4, "out", 1, 0)]
    assert out[0]["where"] == f"touch+{out[0]['rip'] - LABELS['touch']:#x}"


def test_a_mark_counts_the_instructions_the_trace_says():
    r, events = traced("native")
    assert [e["insns"] for e in only(events, "VMCALL")] == [r.marks[m]["insns"] for m in (1, 2)]


def test_an_exit_after_the_slice_counts_its_instructions_once(mode):
    """HLT ends the engine's run before it is dispatched: the instructions
    are counted by then, and not again."""
    events = []
    r = hv.run("t", mmu=mode, image=assemble_source("nop\nnop\nhlt\n").code,
               trace=Trace(events.append, reasons="HLT"))
    assert [e["insns"] for e in events] == [r.counters["insns"]] == [3]


def test_shadow_exits_carry_their_qualification():
    _, events = traced("shadow")
    [cr] = only(events, "CR_ACCESS")
    assert (cr["insns"], cr["cr"], cr["value"]) == (5, 3, 0x2000)
    [inv] = only(events, "INVLPG")
    assert (inv["insns"], inv["address"], inv["where"]) == (8, 0x1234567, "touch+0x3")
    [msr] = only(events, "MSR_WRITE")
    assert (msr["insns"], msr["msr"], msr["value"]) == (11, 0xC0000080, BOOT_EFER)
    # The hidden fault of the first write to the page: raised inside a TLB
    # fill (the Exit has no RIP): the RIP is the writing instruction's. The
    # fill sees only the page.
    pf = [e for e in only(events, "EXCEPTION_NMI") if e["cr2"] == 0x1234000]
    assert [(e["insns"], e["rip"], e["where"], e["vector"], e["error_code"]) for e in pf] == [
        (7, LABELS["touch"], "touch", 14, 0x2)]          # W, not present


def test_ept_violations_carry_the_guest_physical_address():
    _, events = traced("ept")
    touch = [e for e in only(events, "EPT_VIOLATION") if e["rip"] == LABELS["touch"]]
    assert [(e["insns"], e["where"], e["gpa"], e["gla"]) for e in touch] == [
        (7, "touch", 0x1234000, 0x1234000)]
    # Qualification (SDM Vol.3C Table 28-7): a write (bit 1), the linear
    # address valid and the access to it (bits 7 and 8), nothing mapped (5:3).
    assert touch[0]["qualification"] == 0x182


def test_a_trace_picks_reasons():
    events = []
    r = hv.run("t", mmu="shadow", image=IMAGE.code,
               trace=Trace(events.append, reasons="cr_access, INVLPG"))
    assert [e["reason"] for e in events] == ["CR_ACCESS", "INVLPG"]
    assert r.exits["CR_ACCESS"] == 1 and r.exits["INVLPG"] == 1


def test_tracing_changes_no_count(mode):
    r, _ = traced(mode)
    plain = hv.run("traced", mmu=mode, image=IMAGE.code)
    assert (r.exits, r.counters, r.tlb, r.marks) == (plain.exits, plain.counters, plain.tlb,
                                                     plain.marks)
    assert "trace" not in r.config


def test_a_file_gets_text_or_json_lines():
    _, events = traced("ept")
    text, lines = io.StringIO(), io.StringIO()
    hv.run("t", mmu="ept", image=IMAGE.code, symbols=LABELS, trace=text)
    hv.run("t", mmu="ept", image=IMAGE.code, symbols=LABELS, trace=Trace(lines, json_lines=True))
    assert [json.loads(line) for line in lines.getvalue().splitlines()] == events
    text = text.getvalue().splitlines()
    assert len(text) == len(events)
    assert text[-1].split() == ["20", "vm0/vcpu0", "IO_INSTRUCTION",
                                f"rip={events[-1]['rip']:#x}", f"<{events[-1]['where']}>",
                                "port=0xf4", "size=1", "direction=out", "value=0x0"]


def test_a_binary_has_no_labels_and_a_bad_trace_is_one_error():
    events = []
    hv.run("t", image=IMAGE.code, trace=events.append)
    assert events and all(e["where"] is None for e in events)
    with pytest.raises(hv.HvError, match="unknown exit reason 'RDPMC'"):
        Trace(print, reasons="RDPMC")            # no exit hv takes
    with pytest.raises(hv.HvError, match="a callable or a writable file"):
        hv.run("t", image=IMAGE.code, trace=42)


def test_several_vms_and_vcpus_are_told_apart():
    events = []
    hv.run("hello", vms=2, vcpus=2, trace=events.append, quantum=50)
    assert {(e["vm"], e["vcpu"]) for e in events} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # A bundled .s guest has its labels.
    assert any(e["where"] and e["where"].startswith(".Lputc_wait") for e in events)


# -- the command line ------------------------------------------------------------------

def test_cli_trace_goes_to_stderr_never_into_json(capsys):
    status = main(["run", "hello", "--mmu", "shadow", "--json", "--trace"])
    out, err = capsys.readouterr()
    doc = json.loads(out)                       # stdout is the one JSON object
    assert status == 0
    lines = err.splitlines()
    assert len(lines) == doc["counters"]["exits"]
    assert Counter(line.split()[2] for line in lines) == Counter(doc["exits"])


def test_cli_trace_json_lines_to_a_file_of_some_reasons(capsys, tmp_path):
    path = tmp_path / "t.jsonl"
    status = main(["run", "pagetouch", "--mmu", "ept", "--trace-json", "--trace-file", str(path),
                   "--trace-reason", "EPT_VIOLATION", "--json"])
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["reason"] for r in records} == {"EPT_VIOLATION"}
    assert len(records) == json.loads(out)["exits"]["EPT_VIOLATION"]


@pytest.mark.parametrize("args,message", [
    (["--trace-reason", "EPT_VIOLATON"], "unknown exit reason 'EPT_VIOLATON'"),
    (["--trace-file", "/no/such/dir/t.txt"], "cannot write /no/such/dir/t.txt"),
])
def test_cli_bad_trace_options_are_one_line(capsys, args, message):
    status = main(["run", "hello", *args])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err.count("\n") == 1 and message in err


def test_the_pytest_fixture_names_an_inline_guests_addresses():
    from hv.pytest_plugin import HvFixture
    r = HvFixture().run("nop\nboom:\nud2\n")
    assert r.crash["where"] == "boom" and "rip=0x100001 <boom>: ud2;" in r.detail
