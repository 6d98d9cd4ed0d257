"""The `hv` command: output, JSON, exit statuses, and one-line errors."""
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import hv as hv_api
from hv.cli import main
from hv.errors import HvError
from hv.memory import format_size, parse_size


def hv(capsys, *args):
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_run_prints_console_then_the_exit_table(capsys):
    status, out, err = hv(capsys, "run", "hello")
    assert status == 0 and err == ""
    assert out.startswith("hello from hv")
    assert "VM-EXIT" in out and "IO_INSTRUCTION" in out and "walk_refs" in out


def test_run_json_is_one_object_with_the_documented_fields(capsys):
    status, out, _ = hv(capsys, "run", "hello", "--json")
    doc = json.loads(out)
    assert status == 0
    for key in ("guest", "mmu", "exit_code", "reason", "console", "exits", "counters", "tlb",
                "marks"):
        assert key in doc
    for key in ("misses", "walks", "walk_refs", "walk_refs_hist"):
        assert key in doc["tlb"]
    assert doc["guest"] == "hello" and doc["mmu"] == "native" and doc["exit_code"] == 0


def test_guests_lists_the_bundled_guests(capsys):
    status, out, _ = hv(capsys, "guests")
    names = [line.split()[0] for line in out.splitlines()]
    assert status == 0 and {"hello", "pagetouch"} <= set(names)


def test_a_failing_guest_gives_status_1(capsys, tmp_path):
    src = tmp_path / "fail.s"
    src.write_text("mov al, 3\nmov dx, 0xf4\nout dx, al\n")
    status, out, _ = hv(capsys, "run", str(src))
    assert status == 1 and "exit code 3" in out


@pytest.mark.parametrize("args,message", [
    (["run", "no-such-guest"], "no guest 'no-such-guest'"),
    (["run", "hello", "--ram", "lots"], "invalid size"),
    (["run", "hello", "--ram", "3M"], "multiple of 2 MiB from 4 MiB to 64 GiB, not 3 MiB"),
    (["run", "hello", "--ram", "0x400001"], "not 4194305 bytes"),
    (["run", "hello", "--ram", "-64M"], "argument --ram: invalid size '-64M'"),
    (["run", "hello", "--max-insns", "1.5"], "--max-insns: not a whole number up to 1e18: '1.5'"),
    (["run", "hello", "--max-insns", "1e999999999"], "not a whole number up to 1e18"),
    (["run", "hello", "--quantum", "2e18"], "--quantum: not a whole number up to 1e18"),
    (["run", "hello", "--vcpus", "-1"], "--vcpus: must be positive: '-1'"),
    (["asm", "guests/hello.s", "-o", "/dev/null", "--base", "zzz"],
     "argument --base: not an address: 'zzz'"),
    (["disasm", "/dev/null", "--base", "-1"], "argument --base: not an address: '-1'"),
    (["run", "hello", "--vcpus", "99"], "1 to 16 vCPUs"),
    (["run", "hello", "--mmu", "magic"], "invalid choice"),
    (["run", "hello", "--tlb-entries", "10", "--tlb-ways", "3"], "cannot have 3 ways"),
    (["disasm", "/no/such/file.bin"], "cannot read"),
    (["run", "hello", "--mmu", "agile", "--agile-policy", "dynamic:trial=-1"],
     "agile policy knob 'trial=-1': must be at least 0"),
    (["run", "hello", "--paging-levels", "5", "--cpu=-la57"], "needs a CPU with la57"),
    (["run", "hello", "--ept-levels", "3"], "invalid choice: 3 (choose from 4, 5)"),
])
def test_bad_input_is_one_line_and_status_2(capsys, args, message):
    status, out, err = hv(capsys, *args)
    assert status == 2 and out == ""
    assert err.startswith("hv: error: ") and err.count("\n") == 1
    assert message in err


ELF = Path("/bin/true").read_bytes()


@pytest.mark.parametrize("name,content,message", [
    ("empty.s", b"", "empty.s: no code: the source assembles to 0 bytes"),
    ("comment.s", b"; nothing yet\n", "comment.s: no code"),
    ("empty.bin", b"", "empty.bin is empty: there is nothing to run"),
    ("true", ELF, "true is a shared object or PIE program, not a kernel: hv boots multiboot"),
    ("true.bin", ELF, "true.bin is a shared object or PIE program, not a kernel"),
    ("true.s", ELF, "true.s: not a source: not UTF-8 text"),
    ("my.asm", b"mov al, 0\nout 0xf4, al\n", "my.asm is text, not a flat image: hv "
                                               "assembles sources named .s"),
    ("my.S", b"mov al, 0\nout 0xf4, al\n", "my.S is text, not a flat image"),
])
def test_a_file_that_is_no_guest_is_one_line_and_status_2(capsys, tmp_path, name, content,
                                                           message):
    """Run as a flat image, each fell through zeroed RAM to a triple fault."""
    (tmp_path / name).write_bytes(content)
    status, out, err = hv(capsys, "run", str(tmp_path / name))
    assert (status, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"hv: error: {tmp_path}/{message}")


def test_an_included_file_that_is_no_source_is_one_line(capsys, tmp_path):
    (tmp_path / "true.bin").write_bytes(ELF)
    (tmp_path / "inc.s").write_text('nop\n.include "true.bin"\n')
    status, _, err = hv(capsys, "run", str(tmp_path / "inc.s"))
    assert status == 2 and err.count("\n") == 1
    assert f'inc.s:2: include file "true.bin": not a source: not UTF-8 text' in err


def test_asm_refuses_an_empty_source(capsys, tmp_path):
    (tmp_path / "empty.s").write_text("")
    status, _, err = hv(capsys, "asm", str(tmp_path / "empty.s"), "-o", str(tmp_path / "e.bin"))
    assert status == 2 and "no code" in err and not (tmp_path / "e.bin").exists()


def test_hv_run_refuses_an_empty_image():
    with pytest.raises(HvError, match="the image of 'x' is empty"):
        hv_api.run("x", image=b"")


@pytest.mark.parametrize("option,value,expected", [
    ("--max-insns", "1e3", 1000),           # as --help prints the defaults: 5e8
    ("--max-insns", "2.5e6", 2_500_000),
    ("--quantum", "10_000", 10_000),
    ("--quantum", "0x1000", 4096),
])
def test_counts_take_the_forms_help_prints(capsys, option, value, expected):
    status, out, _ = hv(capsys, "run", "hello", "--json", option, value)
    assert status == 0 and json.loads(out)["config"][option[2:].replace("-", "_")] == expected


@pytest.mark.parametrize("text,size", [
    ("64M", 64 << 20), ("1G", 1 << 30), ("4096K", 4 << 20), ("64MiB", 64 << 20),
    ("64 MB", 64 << 20), ("0x4000000", 64 << 20), ("512", 512), ("512B", 512),
    ("0x400000B", 0x400000B),               # with 0x, B is a hex digit
    ("0x40KB", 0x40 << 10), ("0x40MiB", 0x40 << 20),
])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_sizes_in_messages():
    assert [format_size(n) for n in (64 << 20, 1 << 30, 1536 << 10, 4194305, 0)] == \
        ["64 MiB", "1 GiB", "1536 KiB", "4194305 bytes", "0 bytes"]


@pytest.mark.parametrize("text", ["-64M", "lots", "64iB", "1.5G", "010", "0x", ""])
def test_what_is_no_size(text):
    with pytest.raises(HvError, match="invalid size"):
        parse_size(text)


def test_version():
    p = subprocess.run([sys.executable, "-m", "hv", "--version"], capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"hv {metadata.version('hv')}\n", "")


def test_a_broken_source_names_file_and_line(capsys, tmp_path):
    src = tmp_path / "broken.s"
    src.write_text("nop\nmov rax, [rbx+\nhlt\n")
    status, _, err = hv(capsys, "run", str(src))
    assert status == 2 and f"{src}:2:" in err and "mov rax, [rbx+" in err


def test_asm_then_disasm_round_trip(capsys, tmp_path):
    src, out = tmp_path / "t.s", tmp_path / "t.bin"
    src.write_text("mov rax, cr3\nmov cr3, rax\nhlt\n")
    status, text, _ = hv(capsys, "asm", str(src), "-o", str(out))
    assert status == 0 and out.read_bytes() == bytes.fromhex("0f20d80f22d8f4")
    status, text, _ = hv(capsys, "disasm", str(out))
    assert status == 0 and "mov cr3, rax" in text and "hlt" in text and "0x100003" in text


def test_python_dash_m_and_a_missing_file_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "hv", "run", str(tmp_path / "missing.s")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("hv: error: ") and "Traceback" not in p.stderr


def test_too_many_vms_is_one_line_and_status_2(capsys):
    assert main(["run", "hello", "--vms", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--vms must be from 1 to 1024" in err


def test_no_memo_walks_every_miss_and_counts_the_same(capsys):
    _, with_memo, _ = hv(capsys, "run", "pagetouch", "--json")
    status, without, _ = hv(capsys, "run", "pagetouch", "--json", "--no-memo")
    a, b = json.loads(with_memo), json.loads(without)
    assert status == 0 and a["config"]["memo"] is True and b["config"]["memo"] is False
    assert a["tlb"] == b["tlb"] and a["counters"] == b["counters"]


def test_asm_listing_prints_every_statement_and_still_writes_the_binary(capsys, tmp_path):
    src, out = tmp_path / "t.s", tmp_path / "t.bin"
    src.write_text("start:\n    mov rax, cr3\n    hlt\n")
    status, text, _ = hv(capsys, "asm", str(src), "-o", str(out), "--listing")
    assert status == 0 and out.read_bytes() == bytes.fromhex("0f20d8f4")
    lines = text.splitlines()
    assert lines[0].split() == ["0x100000", "start:"]
    assert lines[1].split() == ["0x100000", "0f", "20", "d8", "t.s:2", "mov", "rax,", "cr3"]
    assert lines[2].split() == ["0x100003", "f4", "t.s:3", "hlt"]
    assert lines[3] == f"{out}: 4 bytes at 0x100000"


def test_disasm_of_a_source_shows_its_labels(capsys, tmp_path):
    src = tmp_path / "t.s"
    src.write_text("start:\n    jmp start\n")
    status, text, _ = hv(capsys, "disasm", str(src))
    assert status == 0
    assert text.splitlines() == ["0x100000 <start>:",
                                 "0x100000:  eb fe                  jmp 0x100000 <start>"]


# rsi is non-canonical: the load is #GP(0); with no IDT, delivering it is
# #GP(0x6b) (gate 13 beyond the limit), and #GP during #GP is #DF, whose
# gate is beyond it too: a triple fault. The load is at 10 + 7 bytes.
BRACKETS = """
    mov rsi, 0x8000000000000000
    mov rbx, 0x77
crash:
    mov rax, qword ptr [rsi + 8]
"""


def test_run_reports_a_crash_with_its_operands_chain_and_registers(capsys, tmp_path):
    src = tmp_path / "crash.s"
    src.write_text(BRACKETS)
    status, out, _ = hv(capsys, "run", str(src))
    assert status == 1
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0] == ("VM ended (triple_fault): triple fault at rip=0x100011 <crash>: "
                        "mov rax, qword ptr [rsi + 8]; #GP(0x0) → #DF(0x0) → "
                        "shutdown: no IDT loaded")
    chain = lines[lines.index("Exception chain (vCPU 0):") + 1:][:3]
    assert [line.split() for line in chain] == [["#GP(0x0)", "no", "IDT", "loaded"],
                                                ["#DF(0x0)", "no", "IDT", "loaded"], ["shutdown"]]
    regs = " ".join(lines[lines.index("Registers at the end (vCPU 0):") + 1:][:6]).split()
    assert regs[regs.index("rbx") + 1] == f"{0x77:016x}"
    assert regs[regs.index("rsi") + 1] == "8000000000000000"
    assert regs[regs.index("rip") + 1:regs.index("rip") + 3] == ["0x100011", "<crash>"]
    status, out, _ = hv(capsys, "run", str(src), "--json")
    doc = json.loads(out)
    assert doc["crash"]["where"] == "crash" and doc["crash"]["registers"]["rbx"] == 0x77
    assert doc["detail"] == lines[0].split(": ", 1)[1]


def test_piped_output_is_not_cut_at_80_columns(capsys):
    _, out, _ = hv(capsys, "run", "pagetouch", "--mmu", "ept")
    _, doc, _ = hv(capsys, "run", "pagetouch", "--mmu", "ept", "--json")
    hist = json.loads(doc)["tlb"]["walk_refs_hist"]
    hist = ", ".join(f"{k} refs: {v:,}" for k, v in hist.items())
    [row] = [line for line in out.splitlines() if line.startswith("walks by refs")]
    assert len(hist) > 80 and row.split(None, 3)[3].strip() == hist
    assert "…" not in out


def test_run_shows_a_line_per_vcpu_and_the_marks(capsys):
    status, out, _ = hv(capsys, "run", "smp", "--vcpus", "2")
    _, doc, _ = hv(capsys, "run", "smp", "--vcpus", "2", "--json")
    doc = json.loads(doc)
    lines = [line.rstrip() for line in out.splitlines()]
    head = lines.index("vCPUs")
    assert lines[head + 1].split()[:2] == ["vCPU", "insns"]
    for cpu, line in zip(doc["vcpus"], lines[head + 2:head + 4]):
        cells = line.split()
        assert cells[:3] == [str(cpu["index"]), f"{cpu['counters']['insns']:,}",
                             f"{cpu['counters']['exits']:,}"]
        assert f"{cpu['rip']:#x}" in cells
        assert ("halted" in cells) == cpu["halted"]
        assert (f"<{cpu['where']}>" in cells) == (cpu["where"] is not None)
    marks = lines.index("Marks: the totals at each")
    rows = [line.split() for line in lines[marks + 2:marks + 2 + len(doc["marks"])]]
    assert [(r[0], r[1]) for r in rows] == [(k, f"{m['insns']:,}") for k, m in doc["marks"].items()]


def test_run_between_two_marks(capsys):
    status, out, _ = hv(capsys, "run", "pagetouch", "--between", "1,2")
    _, doc, _ = hv(capsys, "run", "pagetouch", "--between", "1,2", "--json")
    diff = json.loads(doc)["between"]
    assert status == 0 and diff["marks"] == [1, 2]
    a, b = (json.loads(doc)["marks"][k] for k in ("1", "2"))
    assert diff["differences"] == {k: b[k] - a.get(k, 0) for k in b if b[k] != a.get(k, 0)}
    lines = [line.rstrip() for line in out.splitlines()]
    head = lines.index("Between marks 1 and 2")
    shown = {line.split()[0]: line.split()[1] for line in lines[head + 2:]}
    assert shown == {k: f"{v:,}" for k, v in diff["differences"].items()}


def test_run_between_an_unknown_mark_is_an_error_after_the_report(capsys):
    status, out, err = hv(capsys, "run", "pagetouch", "--between", "1,9")
    assert status == 2 and "VM-EXIT" in out and "Between marks" not in out
    assert err == ("hv: error: --between: the guest recorded no mark 9 "
                   "(its marks: 1, 2, 3, 4, 5, 6)\n")


def test_several_vms_report_the_crash_of_the_one_that_crashed(capsys, tmp_path):
    good, bad = tmp_path / "good.s", tmp_path / "bad.s"
    good.write_text("mov al, 0\nmov dx, 0xf4\nout dx, al\n")
    bad.write_text("nop\nboom:\nud2\n")
    status, out, _ = hv(capsys, "run", str(good), str(bad), "--json")
    doc = json.loads(out)
    assert status == 1 and doc["vms"][0]["crash"] is None
    assert doc["crash"] == doc["vms"][1]["crash"]
    assert (doc["crash"]["vm"], doc["crash"]["where"], doc["crash"]["insn"]) == (1, "boom", "ud2")
    status, out, _ = hv(capsys, "run", str(good), str(bad))
    lines = [line.rstrip() for line in out.splitlines()]
    assert "Exception chain (VM 1 vCPU 0):" in lines
    assert "Registers at the end (VM 1 vCPU 0):" in lines
    vcpus = lines.index("vCPUs")
    assert [line.split()[:2] for line in lines[vcpus + 2:vcpus + 4]] == [["0", "0"], ["1", "0"]]
    assert lines[vcpus + 3].endswith("rip 0x100001 <boom>")
@pytest.mark.parametrize("command", [["run"], ["run", "--json"], ["compare", "--mmu", "native"]])
def test_a_reader_that_goes_away_ends_hv_quietly(tmp_path, command):
    """`hv run guest | head -1`: status 0 and nothing on stderr, as other
    Unix tools. The pipe is closed before hv writes (its start-up takes
    longer); the guest prints nothing, so the first write is the report
    (rich exited 1 on a broken pipe)."""
    src = tmp_path / "quiet.s"
    src.write_text("xor eax, eax\nmov dx, 0xf4\nout dx, al\n")
    p = subprocess.Popen([sys.executable, "-m", "hv", command[0], str(src), *command[1:]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert (p.wait(timeout=60), err) == (0, "")
