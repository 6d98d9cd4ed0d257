"""hv's pytest plugin (hv/pytest_plugin.py), tested with pytest's pytester:
each test writes a user's test file and runs pytest on it."""
import re
from pathlib import Path

import pytest

from hv.vmm.modes import MODES
from hv.errors import HvError
from hv.pytest_plugin import HvFixture, is_source

pytest_plugins = ["pytester"]


@pytest.fixture
def run_pytest(pytester, monkeypatch):
    """pytest in this process with hv's plugin only, loaded by its entry
    point's name (other installed plugins would only slow each run down)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return lambda *args: pytester.runpytest("-p", "hv", *args)


# A guest that loads CR3 10 times between marks 1 and 2: 10 CR_ACCESS exits
# under shadow paging, none in the other modes.
CR3_GUEST = '''
CR3_GUEST = """
    jmp main
.include "hv.s"
main:
    mov rbx, 1
    call hv_mark
    mov rcx, 10
reload:
    mov rax, cr3
    mov cr3, rax
    dec rcx
    jnz reload
    mov rbx, 2
    call hv_mark
    mov al, 0
    out 0xf4, al
"""
'''


def test_fixture_runs_a_bundled_guest_and_inline_source(pytester, run_pytest):
    pytester.makepyfile(CR3_GUEST + '''
def test_bundled(hv):
    r = hv.run("hello")
    assert (r.mmu, r.exit_code, r.console) == ("native", 0, "hello from hv: vcpu 0 of 1\\n")
    assert r.exits == {"IO_INSTRUCTION": 55}
    assert r.counters["insns"] > 0 and r.tlb["walks"] > 0

def test_inline(hv):
    r = hv.run(CR3_GUEST, mmu="shadow")
    assert (r.guest, r.exit_code, r.ok) == ("<inline>", 0, True)
    d = r.between(1, 2)
    assert (d.exits["CR_ACCESS"], d.counters["cr3_loads"], d.exits["INVLPG"]) == (10, 10, 0)
    hv.assert_exits(d, {"CR_ACCESS": 10, "VMCALL": 1})

def test_path(hv, tmp_path):
    (tmp_path / "cr3.s").write_text(CR3_GUEST)
    assert hv.run(str(tmp_path / "cr3.s")).between(1, 2).counters["cr3_loads"] == 10
    assert hv.run(tmp_path / "cr3.s").guest == "cr3"
''')
    run_pytest().assert_outcomes(passed=3)


def test_inline_source_rule():
    assert is_source("mov al, 0\nout 0xf4, al")         # a newline: source
    assert not is_source("hlt")                         # one line: a name or a path
    assert not is_source("hello")                       # a bundled guest
    assert not is_source("guests/nothere.s")            # names a file: missing, not source
    assert not is_source(__file__)


def test_a_mistyped_guest_name_is_no_guest_not_an_unknown_mnemonic():
    with pytest.raises(HvError, match="^no guest 'helo': not a file, nor a bundled guest"):
        HvFixture().run("helo")


def test_marker_runs_the_test_once_per_mode(pytester, run_pytest):
    pytester.makepyfile('''
import pytest

@pytest.mark.hv_modes("shadow", "ept")
def test_marked(hv):
    assert hv.run("hello").mmu == hv.mmu

@pytest.mark.hv_modes("all")
def test_all(hv):
    assert hv.run("hello").mmu == hv.mmu

def test_default(hv):
    assert hv.mmu == "native"
''')
    result = run_pytest("-v")
    result.stdout.fnmatch_lines([
        "*::test_marked[[]shadow[]] PASSED*",
        "*::test_marked[[]ept[]] PASSED*",
        "*::test_all[[]native[]] PASSED*",
        "*::test_all[[]shadow[]] PASSED*",
        "*::test_all[[]ept[]] PASSED*",
        "*::test_all[[]agile[]] PASSED*",
        "*::test_all[[]adaptive[]] PASSED*",
        "*::test_all[[]qemu[]] PASSED*",
        "*::test_default PASSED*",
    ])
    result.assert_outcomes(passed=9)


def test_option_runs_each_test_once_per_mode(pytester, run_pytest):
    pytester.makepyfile('''
import pytest

def test_x(hv):
    assert hv.run("hello").mmu == hv.mmu

@pytest.mark.hv_modes("shadow")
def test_marker_wins(hv):
    assert hv.mmu == "shadow"

def test_no_fixture():
    pass
''')
    result = run_pytest("-v", "--hv-mmu=native,ept")
    result.stdout.fnmatch_lines(["*::test_x[[]native[]] PASSED*", "*::test_x[[]ept[]] PASSED*",
                                 "*::test_marker_wins[[]shadow[]] PASSED*",
                                 "*::test_no_fixture PASSED*"])
    result.assert_outcomes(passed=4)
    run_pytest("--hv-mmu=all").assert_outcomes(passed=len(MODES) + 2)


def test_bad_modes_are_usage_errors(pytester, run_pytest):
    pytester.makepyfile('''
import pytest

@pytest.mark.hv_modes("shadw")
def test_x(hv):
    pass
''')
    result = run_pytest("--hv-mmu=native,nested")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--hv-mmu: no MMU mode 'nested' (modes: native, shadow, ept, agile, adaptive, qemu, all)"])
    result = run_pytest()
    result.stdout.fnmatch_lines(["*test_x: @pytest.mark.hv_modes: no MMU mode 'shadw'*"])
    result.assert_outcomes(errors=1)


def test_bad_inline_source_fails_with_file_and_line(pytester, run_pytest):
    pytester.makepyfile('''
def test_bad(hv):
    hv.run("""
    mov rax, 1
    mov rax, [rbx+
""")

def test_expected(hv):
    import pytest
    with pytest.raises(hv.AsmError, match="<inline>:2: unknown mnemonic: frobnicate rax"):
        hv.run("nop\\n    frobnicate rax\\n")
''')
    result = run_pytest()
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["E   *hv.errors.AsmError: <inline>:3: invalid operand: mov rax, [rbx+",
                                 "test_bad_inline_source_fails_with_file_and_line.py:2: AsmError"])
    # the test's own line, then hv's one-line message: none of hv's frames
    result.stdout.no_fnmatch_line("*hv/asm.py*")
    result.stdout.no_fnmatch_line("*pytest_plugin.py*")


# One pytest in a subprocess: the plugin must come from the entry point
# alone (no -p, no conftest), from a directory outside hv's checkout, where
# with an editable install pytest does not find hv to rewrite its asserts by
# itself; assert_exits's diff needs them rewritten.
def test_entry_point_and_readable_exit_diffs(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile(CR3_GUEST + '''
import pytest

@pytest.mark.hv_modes("shadow")
def test_helper(hv):
    r = hv.run(CR3_GUEST)
    hv.assert_exits(r.between(1, 2), {"CR_ACCESS": 12, "VMCALL": 1, "INVLPG": 2})

def test_direct(hv):
    assert hv.run(CR3_GUEST, mmu="ept").exits == {"VMCALL": 2, "IO_INSTRUCTION": 1}

def test_ok(hv):
    hv.assert_exits(hv.run(CR3_GUEST), {"VMCALL": 2, "IO_INSTRUCTION": 1})
''')
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["plugins:*hv-*"])
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines([
        ">       hv.assert_exits(r.between(1, 2), *",
        "E       assert actual exits == expected exits",
        "E         reason *actual *expected",
        "E         CR_ACCESS *10 *12  (-2)",
        "E         INVLPG *- *2  (-2)",
        "test_entry_point_and_readable_exit_diffs.py:*: AssertionError",
    ])
    result.stdout.fnmatch_lines([
        "E       assert actual exits == expected exits",
        "E         reason *actual *expected",
        "E         EPT_VIOLATION *5 *-  (+5)",
    ])


def readme_blocks() -> list[str]:
    """The code blocks of README.md's section on the plugin."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Testing your own guests with pytest\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\w*\n(.*?)```", section, re.S)


def test_readme_example_does_what_the_readme_says(pytester, run_pytest):
    example, runs, failure = readme_blocks()
    pytester.makepyfile(test_cr3=example)
    command, *passed = runs.splitlines()
    assert command == "$ pytest -v --hv-mmu=all test_cr3.py"
    result = run_pytest("-v", "--hv-mmu=all", "test_cr3.py")
    result.stdout.re_match_lines([re.escape(line) + ".*" for line in passed])
    result.assert_outcomes(passed=len(passed))

    expected = '{"CR_ACCESS": 10, "VMCALL": 1}'
    assert example.count(expected) == 1
    pytester.makepyfile(test_cr3=example.replace(expected, '{"CR_ACCESS": 12}'))
    result = run_pytest("test_cr3.py")
    result.assert_outcomes(failed=1, passed=3)     # no --hv-mmu: 1 + 2 + 1 runs
    result.stdout.re_match_lines([re.escape(line) + "$" for line in failure.splitlines()], consecutive=True)
