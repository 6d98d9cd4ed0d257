"""bench/bench.py runs (a smoke test at --quick sizes: no timing is checked
here; the measurements are BENCHMARKS.md's)."""
import importlib.util
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
        "code page written, then run (a rescan)", "agile switch round trip (to nested and back)"]
    assert all(r["events"] > 0 for r in doc["exits"] + doc["tlb_misses"])
    assert len(doc["tlb_misses"]) == 6 and len(doc["scale"]) == 5
    assert all(r["insns"] > 0 and r["rss_peak_mib"] >= r["rss_before_mib"] for r in doc["scale"])


def test_piped_tables_keep_every_row_on_one_line_and_every_digit(monkeypatch, capsys):
    """`make bench > file`: rich folded the tables into 80 columns and cut
    numbers short (1,001,…). The measurements here are made up: only the
    printing is under test."""
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {
        "throughput": [{"benchmark": "memory loop", "mode": "ceiling, counting", "median_s": 1.5,
                        "spread": 1.25, "minsn_per_s": 1234.5, "vs_ceiling": 0.5,
                        "vs_counting": 1.0}],
        "exits": [{"benchmark": "hidden page fault (a page's first touch)", "mode": "shadow",
                   "events": 1_001_234, "us_per_event": 33.25, "spread": 1.5}],
        "tlb_misses": [],
        "scale": [{"benchmark": "1e9 insns, 1e6 exits", "mode": "native", "seconds": 2.5,
                   "insns": 10**9, "exits": 1_000_001, "rss_before_mib": 40,
                   "rss_fifth_mib": 100, "rss_peak_mib": 226}],
    }

    class Canned:
        def __init__(self, *args):
            pass

    for name, value in rows.items():
        setattr(Canned, name, lambda self, value=value: value)
    monkeypatch.setattr(bench, "Bench", Canned)
    assert bench.main(["--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def row(first: str) -> list[str]:
        [line] = [line for line in lines if first in line]
        return [cell.strip() for cell in line.split("│")[1:-1]]

    assert row("memory loop") == ["memory loop", "ceiling, counting", "1.500", "1.25", "1234.5",
                                  "0.50", "1.00"]
    assert row("hidden page fault") == ["hidden page fault (a page's first touch)", "shadow",
                                        "1,001,234", "33.25", "1.50"]
    assert row("1e9 insns") == ["1e9 insns, 1e6 exits", "native", "2.50", "400.0", "1,000,001",
                                "40", "100", "226"]
