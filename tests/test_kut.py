"""hv kut: kvm-unit-tests' unittests.cfg read as its scripts read it, its
QEMU options mapped onto hv's (or a SKIP saying why), runs judged by the
exit code, and the command. The real cfg and images live beside the
checkout (../shared); where they are absent those tests skip and say so."""
import contextlib
import json
import os
import re
import shutil
import signal
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hv import kut
from hv.cli import main
from hv.memory import GiB, MiB

from conftest import hv_process

SHARED = Path(__file__).resolve().parents[2] / "shared" / "kvm-unit-tests"
UNPACKED = Path("/tmp/kut/kvm-unit-tests")
DUMMY = SHARED / "x86" / "dummy.flat"
ACCESS = SHARED / "x86" / "access_test.flat"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: kvm-unit-tests live beside the checkout (../shared)")
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The kvm-unit-tests source: unpacked in /tmp/kut, or from the tarball."""
    if (UNPACKED / kut.CFG).is_file():
        return UNPACKED
    tarball = need(SHARED / "kvm-unit-tests-src.tar.gz")
    out = tmp_path_factory.mktemp("kut")
    with tarfile.open(tarball) as tar:
        tar.extractall(out, filter="data")
    return out / "kvm-unit-tests"


def cfg_tests(tmp_path: Path, text: str, images=("t.flat",)) -> dict[str, kut.Test]:
    """The tests of a cfg snippet, in a tree with these (empty) images."""
    (tmp_path / "x86").mkdir()
    (tmp_path / kut.CFG).write_text(text)
    for name in images:
        (tmp_path / "x86" / name).write_bytes(b"")
    return {t.name: t for t in kut.load_tests(tmp_path, ["*"])}


def one(tmp_path: Path, body: str) -> kut.Test:
    return cfg_tests(tmp_path, f"[t]\nfile = t.flat\n{body}\n")["t"]


# -- the real unittests.cfg --------------------------------------------------

def test_the_real_cfg_has_every_uncommented_section(tree):
    text = (tree / kut.CFG).read_text()
    sections = [ln for ln in text.splitlines() if ln.startswith("[")]
    tests = kut.parse_cfg(text)
    assert list(tests) == [s[1:-1] for s in sections] and "init" not in tests   # "#[init]"
    assert tests["smptest3"] == {"file": "smptest.flat", "smp": "3"}
    assert tests["vmexit_cpuid"]["test_args"] == "'cpuid'"
    assert tests["svm"]["qemu_params"] == "-cpu max,+svm -m 4g"


def test_a_triple_quoted_value_runs_over_lines(tree):
    """s390x's cfg has the one \"\"\" value of the tree; its lines end in \\."""
    text = (tree / "s390x" / "unittests.cfg").read_text()
    params = kut.parse_cfg(text)["topology-3"]["qemu_params"]
    assert params.startswith("-cpu max,ctop=on -smp cpus=1,")
    assert params.count("-device max-s390x-cpu") == text.count("\n-device max-s390x-cpu") > 100
    assert "\\" not in params and "\n" not in params
    assert kut.parse_cfg(text)["sie-dat"] == {"file": "sie-dat.elf"}   # the next test


@pytest.fixture(scope="module")
def shared_tests() -> dict[str, kut.Test]:
    """../shared: prebuilt images in x86/, the cfg in the tarball beside them."""
    need(SHARED / "kvm-unit-tests-src.tar.gz")
    return {t.name: t for t in kut.load_tests(SHARED, ["*"])}


def test_the_shared_images_map_onto_hvs_options(shared_tests):
    t = shared_tests
    assert (t["smptest3"].smp, t["smptest3"].file, t["smptest3"].skip_reason) == \
        (3, SHARED / "x86" / "smptest.flat", None)
    assert t["vmexit_cpuid"].append == "cpuid" and t["vmexit_cpuid"].groups == ("vmexit",)
    access = t["access"]
    assert (access.cpu, access.ram, access.timeout, access.skip_reason) == \
        ("max", 128 * MiB, 90.0, None)      # host-phys-bits is QEMU's, not a feature
    assert t["pcid-disabled"].cpu == "qemu64,-pcid,-invpcid"
    assert t["pcid-disabled"].skip_reason is None
    assert t["pcid-enabled"].skip_reason is None
    assert t["cmpxchg8b"].skip_reason == "i386 only"
    assert t["access-reduced-maxphyaddr"].skip_reason.startswith("check = /sys/module/")
    assert t["x2apic"].skip_reason == "image not built"
    assert t["sieve"].timeout == 180.0


def test_the_default_is_every_test_but_nodefault():
    need(SHARED / "kvm-unit-tests-src.tar.gz")
    names = {t.name for t in kut.load_tests(SHARED)}
    assert "access" in names and "access_fep" not in names      # groups = nodefault
    assert [t.name for t in kut.load_tests(SHARED, ["access_fep"])] == ["access_fep"]
    assert [t.name for t in kut.load_tests(SHARED, groups=["pcid"])] == \
        ["pcid-enabled", "pcid-disabled", "pcid-asymmetric"]
    assert {t.name for t in kut.load_tests(SHARED, ["vmexit_*"])} >= {"vmexit_cpuid", "vmexit_ipi"}


# -- cfg snippets ------------------------------------------------------------

def test_quotes_comments_and_groups(tmp_path):
    tests = cfg_tests(tmp_path, """
# a comment
#[commented]
[a]
file = t.flat
test_args = 'one two'
groups = g1 g2
smp = 2

[b]
file = t.flat
test_args = "x  y"
timeout = 2m
""")
    assert set(tests) == {"a", "b"}
    assert (tests["a"].append, tests["a"].groups, tests["a"].smp) == ("one two", ("g1", "g2"), 2)
    assert (tests["b"].append, tests["b"].timeout, tests["b"].groups) == ("x  y", 120.0, ())


def test_extra_params_append_and_cpu(tmp_path):
    t = one(tmp_path, "extra_params = -cpu qemu64,+pdpe1gb -append 'foo bar'")
    assert (t.cpu, t.append, t.skip_reason) == ("qemu64,+pdpe1gb", "foo bar", None)


@pytest.mark.parametrize("params, ram", [("-m 2048", 2 * GiB), ("-m 512M", 512 * MiB),
                                         ("-m size=1g,slots=2", GiB), ("", 128 * MiB)])
def test_ram_from_dash_m(tmp_path, params, ram):
    t = one(tmp_path, f"qemu_params = {params}")
    assert (t.ram, t.skip_reason) == (ram, None)


def test_a_triple_quoted_snippet(tmp_path):
    t = one(tmp_path, 'qemu_params = """-cpu max \\\n-m 256\n"""')
    assert (t.cpu, t.ram, t.skip_reason) == ("max", 256 * MiB, None)


@pytest.mark.parametrize("body, reason", [
    ("arch = i386", "i386 only"),
    ("check = /sys/module/kvm/parameters/x=Y", "check = /sys/module/kvm/parameters/x=Y: "
                                              "a setting of KVM's host"),
    ("accel = hvf", "hvf only"),
    ("qemu_params = -device edu", "-device edu: hv has no equivalent"),
    ("qemu_params = -machine vmport=on", "-machine vmport=on: hv has no equivalent of vmport=on"),
    ("qemu_params = -overcommit cpu-pm=on", "-overcommit cpu-pm=on: hv has no equivalent"),
    ("qemu_params = -cpu qemu64,+x2apic", "-cpu qemu64,+x2apic: hv does not implement x2apic yet"),
    ("qemu_params = -cpu IvyBridge,phys-bits=36",
     "-cpu IvyBridge,phys-bits=36: phys-bits=36: hv's CPU has 40"),
    ("qemu_params = -cpu Opteron_G1,vendor=AuthenticAMD",
     "-cpu Opteron_G1,vendor=AuthenticAMD: vendor=AuthenticAMD: hv's CPU is GenuineIntel"),
    ("qemu_params = -m 4g", "4 GiB of RAM: hv gives a kernel at most 3 GiB"),
    ("test_args = \"10 `date +%s`\"", "test_args = \"10 `date +%s`\": a shell command "
                                      "substitution"),
    ("smp = $MAX_SMP", "smp = $MAX_SMP: not a number of vCPUs"),
])
def test_what_hv_cannot_run_is_skipped_saying_why(tmp_path, body, reason):
    assert one(tmp_path, body).skip_reason == reason


@pytest.mark.parametrize("body, cpu", [
    ("qemu_params = -machine pit=off", ""),         # hv has no PIT to leave out
    ("qemu_params = -cpu max,host-phys-bits", "max"),
    ("qemu_params = -cpu IvyBridge,phys-bits=40,host-phys-bits=off", "IvyBridge"),
    ("qemu_params = -cpu max,vendor=GenuineIntel", "max"),
    ("qemu_params = -enable-kvm -cpu max\naccel = kvm", "max"),
])
def test_what_hv_has_or_needs_not_is_mapped(tmp_path, body, cpu):
    t = one(tmp_path, body)
    assert (t.cpu, t.skip_reason) == (cpu, None)


def test_a_missing_image_is_not_built(tmp_path):
    tests = cfg_tests(tmp_path, "[gone]\nfile = gone.flat\n[here]\nfile = t.flat\n")
    assert tests["gone"].skip_reason == "image not built"
    assert tests["here"].skip_reason is None


def test_a_directory_of_images_without_a_cfg(tmp_path):
    shutil.copy(need(DUMMY), tmp_path / "dummy.flat")
    (t,) = kut.load_tests(tmp_path)
    assert (t.name, t.smp, t.ram, t.timeout, t.skip_reason) == \
        ("dummy", 1, kut.DEFAULT_RAM, kut.DEFAULT_TIMEOUT, None)


def test_unknown_names_and_groups_are_errors(tmp_path):
    cfg_tests(tmp_path, "[a]\nfile = t.flat\n")
    with pytest.raises(kut.HvError, match="no test 'b'"):
        kut.load_tests(tmp_path, ["b"])
    with pytest.raises(kut.HvError, match="no test in group 'g'"):
        kut.load_tests(tmp_path, groups=["g"])


# -- judging runs --------------------------------------------------------------

def fake(reason="exit", exit_code=None, console="", detail="why") -> SimpleNamespace:
    return SimpleNamespace(reason=reason, exit_code=exit_code, console=console, detail=detail,
                           counters={"insns": 10, "exits": 2, "mmio_exits": 1})


@pytest.mark.parametrize("result, status, reason", [
    (fake(exit_code=0), "PASS", None),
    (fake(exit_code=1), "FAIL", "exit code 1: unexpected failures"),
    (fake(exit_code=38), "SKIP", "exit code 38: every test skipped"),
    (fake(exit_code=63), "FAIL", "exit code 63: aborted"),
    (fake(exit_code=5), "FAIL", "exit code 5"),
    (fake("triple_fault", detail="#DF then #GP"), "FAIL", "triple_fault: #DF then #GP"),
    (fake("timeout"), "FAIL", "timeout: why"),
    (fake("max_insns"), "FAIL", "max_insns: why"),
    (fake("halted"), "FAIL", "halted: why"),    # no exit code: the test never finished
    (fake("interrupted", detail="by SIGTERM"), "FAIL", "interrupted: by SIGTERM"),
])
def test_judge(result, status, reason):
    assert kut.judge(result) == (status, reason)


def test_the_summary_is_the_last_summary_line():
    console = "SUMMARY: 1 tests\r\nmore\nSUMMARY: 5 tests, 2 unexpected failures\r\nbye\n"
    assert kut.summary(console) == "5 tests, 2 unexpected failures"
    assert kut.summary("Dummy Hello World!") is None


@pytest.mark.parametrize("mode", ["native", "ept"])
def test_dummy_passes(mode):
    (t,) = kut.load_tests(need(DUMMY))
    o = kut.run_test(t, mode)
    assert (o.status, o.reason, o.summary, o.exit_code, o.ended) == ("PASS", None, None, 0, "exit")
    assert o.insns > 0 and o.exits > 0 and o.seconds > 0


def test_a_skipped_test_does_not_run():
    t = kut.Test("t", Path("/nonexistent.flat"), skip_reason="i386 only")
    assert kut.run_test(t, "native") == kut.Outcome("t", "native", "SKIP", "i386 only")


def test_run_all_reports_progress():
    (t,) = kut.load_tests(need(DUMMY))
    seen = []
    outcomes = kut.run_all([t], ["native", "qemu"],
                           on_progress=lambda test, mode, done: seen.append((mode, done)))
    assert seen == [("native", 0), ("qemu", 1)]
    assert [o.status for o in outcomes] == ["PASS", "PASS"] and not kut.failed(outcomes)


# -- the command -----------------------------------------------------------------

def hv(capsys, *args):
    status = main(["kut", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_kut_json(capsys):
    status, out, err = hv(capsys, need(DUMMY), "--mmu", "native,ept", "--json")
    doc = json.loads(out)
    assert status == 0 and err == ""
    assert (doc["source"], doc["modes"]) == (str(DUMMY), ["native", "ept"])
    (test,) = doc["tests"]
    assert {k: test[k] for k in ("name", "smp", "append", "cpu", "ram", "skip_reason")} == \
        dict(name="dummy", smp=1, append="", cpu="", ram=128 * MiB, skip_reason=None)
    for mode in ("native", "ept"):
        r = test["results"][mode]
        assert (r["status"], r["reason"], r["summary"], r["exit_code"]) == ("PASS", None, None, 0)
        assert set(r) >= {"seconds", "insns", "exits", "mmio_exits"}
    assert test["results"]["ept"]["mmio_exits"] > 0 == test["results"]["native"]["mmio_exits"]


def test_kut_table(capsys):
    status, out, _ = hv(capsys, need(DUMMY), "--mmu", "native")
    assert status == 0 and "dummy" in out and "PASS" in out and "1 PASS, 0 FAIL, 0 SKIP" in out


def test_kut_list(capsys):
    status, out, _ = hv(capsys, need(DUMMY), "--list")
    assert status == 0 and "dummy" in out and "128 MiB" in out
    status, out, _ = hv(capsys, DUMMY, "--list", "--json")
    assert status == 0 and json.loads(out)["tests"][0]["results"] == {}


def test_timeout_replaces_every_tests_own(capsys):
    """access_test runs for hours: --timeout access=0 lets it finish."""
    status, out, _ = hv(capsys, need(DUMMY), "--list", "--json", "--timeout", "0")
    assert status == 0 and json.loads(out)["tests"][0]["timeout"] == 0
    status, _, err = hv(capsys, DUMMY, "--timeout", "-1")
    assert status == 2 and "--timeout must not be negative" in err


def test_timeouts_by_name_apply_in_order(tmp_path):
    tests = cfg_tests(tmp_path, "[a1]\nfile = t.flat\n[a2]\nfile = t.flat\ntimeout = 5\n"
                                "[b]\nfile = t.flat\n").values()
    timeouts = lambda *specs: {t.name: t.timeout for t in kut.set_timeouts(tests, specs)}
    assert timeouts() == {"a1": 90, "a2": 5, "b": 90}
    assert timeouts("a*=0") == {"a1": 0, "a2": 0, "b": 90}
    assert timeouts("a*=0", "30", "a2=7.5") == {"a1": 30, "a2": 7.5, "b": 30}
    for spec, message in (("c=1", "--timeout c=1: no test 'c' is run"),
                          ("a1=soon", "--timeout a1=soon: not [TEST=]SECONDS"),
                          ("a1=-1", "--timeout must not be negative")):
        with pytest.raises(kut.HvError, match=re.escape(message)):
            kut.set_timeouts(tests, [spec])


def test_logs_hold_each_runs_console_after_the_command_that_repeats_it(capsys, tmp_path):
    status, _, _ = hv(capsys, need(DUMMY), "--mmu", "native,ept", "--logs", tmp_path / "logs")
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["dummy.ept.log",
                                                                     "dummy.native.log"]
    command, _, rest = (tmp_path / "logs" / "dummy.ept.log").read_text().partition("\n\n")
    assert command == f"hv run {DUMMY} --mmu ept --ram 128M --vcpus 1 --profile nehalem-2009 " \
                      "--max-insns 1e11 --timeout 90"
    assert [kut._count(n) for n in (10**11, 25 * 10**12, 123456789, 1000, 100)] == \
        ["1e11", "25e12", "123456789", "1e3", "100"]
    assert rest.endswith("hv: ended: exit: the guest wrote 0 to port 0xf4; exit code 0\n")


def test_a_log_holds_each_byte_once_printed(monkeypatch, tmp_path):
    """A run of hours can be followed with tail -f: each byte the guest
    prints (access_test's progress dots come without a newline) is in its
    log at once, before the run ends (here, by an error)."""
    seen, text = [], "ok 1\nok 2"

    def run(*_args, on_console, **_options):
        for byte in text.encode():
            on_console(0, byte)
            seen.append((tmp_path / "t.shadow.log").read_text().partition("\n\n")[2])
        raise kut.HvError("stopped")

    monkeypatch.setattr(kut.api, "run", run)
    outcome = kut.run_test(kut.Test("t", tmp_path / "t.flat"), "shadow", logs=tmp_path)
    assert (outcome.status, outcome.reason) == ("FAIL", "stopped")
    assert seen == [text[:n] for n in range(1, len(text) + 1)]
    assert (tmp_path / "t.shadow.log").read_text().endswith("\n\nok 1\nok 2\nhv: error: stopped\n")


def test_a_logs_directory_that_cannot_be_written_is_one_clear_error(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "logs" / "dummy.native.log").mkdir(parents=True)
    for logs, jobs, message in ((tmp_path / "file" / "logs", "1", "Not a directory"),
                                (tmp_path / "logs", "2", "dummy.native.log: Is a directory")):
        status, _, err = hv(capsys, need(DUMMY), "--mmu", "native", "--logs", logs, "-j", jobs)
        assert status == 2 and err == f"hv: error: --logs {logs}: {message}\n"


def test_jobs_run_in_processes_with_the_same_outcomes_in_the_same_order(capsys):
    tests = kut.load_tests(need(SHARED), ["smptest", "pcid-enabled"])
    seen = []
    one_by_one = kut.run_all(tests, ["native", "ept"])
    at_once = kut.run_all(tests, ["native", "ept"], jobs=3,
                          on_progress=lambda test, mode, done: seen.append((test.name, mode)))
    key = lambda o: (o.test, o.mode, o.status, o.exit_code, o.insns, o.exits, o.mmio_exits)
    assert [key(o) for o in at_once] == [key(o) for o in one_by_one]
    assert [o.status for o in at_once] == ["PASS"] * 4 and at_once[0].insns > 0
    assert seen == [("smptest", "native"), ("smptest", "ept"), ("pcid-enabled", "native"),
                    ("pcid-enabled", "ept")]
    status, _, err = hv(capsys, DUMMY, "-j", "0")
    assert status == 2 and "must be positive" in err


def _children(pid: int) -> set[int]:
    """The processes `pid` started and has not reaped (proc(5))."""
    return {int(kid) for task in Path(f"/proc/{pid}/task").iterdir()
            for kid in (task / "children").read_text().split()}


def _running(pid: int) -> bool:
    """Neither gone nor a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_no_run_outlives_a_killed_kut(tmp_path, signum):
    """SIGTERM (kill, timeout(1)) is Ctrl-C: the runs under way end, interrupted,
    and are reported. After kill -9 the workers end their runs too (their
    logs say how). Either way, no worker runs on: they did, for hours."""
    p = hv_process("kut", str(need(ACCESS)), "--mmu", "native,ept", "-j", "2",
                   "--timeout", "0", "--json", "--logs", str(tmp_path))
    logs = [tmp_path / f"access_test.{mode}.log" for mode in ("native", "ept")]
    deadline = time.monotonic() + 60
    while not all(log.exists() and "starting test" in log.read_text() for log in logs):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.1)
    workers = _children(p.pid)
    try:
        p.send_signal(signum)
        out, err = p.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_running, workers)):
            assert time.monotonic() < deadline, [w for w in workers if _running(w)]
            time.sleep(0.1)
    finally:            # a failure leaves no runs behind either
        for pid in [p.pid, *filter(_running, workers)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for log in logs:
        assert log.read_text().endswith("ended: interrupted: by SIGTERM; exit code None\n")
    if signum == signal.SIGTERM:
        assert p.returncode == 130 and "Traceback" not in err, err
        results = json.loads(out)["tests"][0]["results"]
        assert [r["ended"] for r in results.values()] == ["interrupted"] * 2
        assert all(r["insns"] > 0 for r in results.values())


def test_kut_list_of_the_shared_tests(capsys):
    need(SHARED / "kvm-unit-tests-src.tar.gz")
    status, out, _ = hv(capsys, SHARED, "pcid-*", "--list")
    assert status == 0 and "qemu64,-pcid,+invpcid" in out and "x2apic" not in out


def test_a_failure_fails_the_command(capsys, monkeypatch):
    """The reasons below the table name the mode where the modes differ."""
    console = "SUMMARY: 3 tests, 1 unexpected failures\n"
    monkeypatch.setattr(kut.api, "run", lambda guest, mode, **kw: fake(
        exit_code=int(mode == "ept"), console=console))
    status, out, _ = hv(capsys, need(DUMMY), "--mmu", "native,ept")
    assert status == 1
    assert "dummy [ept]: FAIL exit code 1: unexpected failures (SUMMARY: 3 tests, 1 " \
           "unexpected failures)" in out
    assert "1 PASS, 1 FAIL, 0 SKIP" in out


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/x.flat"], "/nonexistent/x.flat: no such file or directory"),
    ([str(DUMMY), "--mmu", "native,bogus"], "unknown mode 'bogus'"),
    ([str(DUMMY), "nosuchtest"], "no test 'nosuchtest'"),
])
def test_bad_input_is_one_line_and_status_2(capsys, args, message):
    if str(DUMMY) in args:
        need(DUMMY)
    status, out, err = hv(capsys, *args)
    assert status == 2 and out == ""
    assert err.startswith("hv: error: ") and message in err and err.count("\n") == 1


def test_no_source_anywhere(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)         # no ../shared/kvm-unit-tests from here
    status, _, err = hv(capsys)
    assert status == 2 and err == "hv: error: no kvm-unit-tests: give a built tree or " \
                                  ".flat images\n"
