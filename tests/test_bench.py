"""bench/bench.py runs (a smoke test at --quick sizes: no timing is checked
here; the measurements are BENCHMARKS.md's)."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def test_quick_bench_reports_every_measurement():
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--repeat", "1", "--json"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert {(r["benchmark"], r["mode"]) for r in doc["throughput"]} >= {
        ("compute", "ceiling"), ("compute", "ceiling, counting"), ("memory loop", "ept")}
    assert [r["benchmark"] for r in doc["exits"]] == [
        "IO_INSTRUCTION exit", "VMCALL exit", "CR_ACCESS exit", "PTE write emulation",
        "hidden page fault (a page's first touch)", "EPT violation (a page's first touch)",
        "code page written, then run (a rescan)"]
    assert all(r["events"] > 0 for r in doc["exits"] + doc["tlb_misses"])
    assert len(doc["tlb_misses"]) == 6 and len(doc["scale"]) == 5
    assert all(r["insns"] > 0 and r["rss_peak_mib"] >= r["rss_before_mib"] for r in doc["scale"])
