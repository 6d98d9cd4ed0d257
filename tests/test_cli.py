"""The `hv` command: output, JSON, exit statuses, and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hv as hv_api
from hv.cli import main
from hv.errors import HvError


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
    (["run", "hello", "--ram", "3M"], "multiple of 2 MiB"),
    (["run", "hello", "--vcpus", "99"], "1 to 16 vCPUs"),
    (["run", "hello", "--mmu", "magic"], "invalid choice"),
    (["run", "hello", "--tlb-entries", "10", "--tlb-ways", "3"], "cannot have 3 ways"),
    (["disasm", "/no/such/file.bin"], "cannot read"),
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
    ("true", ELF, "true is an ELF file: hv runs flat images (.bin) and .s sources"),
    ("true.bin", ELF, "true.bin is an ELF file"),
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


def test_asm_refuses_an_empty_source(capsys, tmp_path):
    (tmp_path / "empty.s").write_text("")
    status, _, err = hv(capsys, "asm", str(tmp_path / "empty.s"), "-o", str(tmp_path / "e.bin"))
    assert status == 2 and "no code" in err and not (tmp_path / "e.bin").exists()


def test_hv_run_refuses_an_empty_image():
    with pytest.raises(HvError, match="the image of 'x' is empty"):
        hv_api.run("x", image=b"")


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
