"""bench.blk's parsing of fio's JSON and its table (no guest needed)."""

from __future__ import annotations

import json

from bench.blk import COLUMNS, JOBS, NA_MARK, Figure, guest_script, parse_output, render


def fio_json(iops: float, bw: float, lat_ns: float, side: str) -> str:
    other = "write" if side == "read" else "read"
    job = {
        side: {"iops": iops, "bw_bytes": bw, "lat_ns": {"mean": lat_ns}},
        other: {"iops": 0, "bw_bytes": 0, "lat_ns": {"mean": 0}},
    }
    return json.dumps({"fio version": "fio-3.33", "jobs": [job]}, indent=2)


def output() -> str:
    parts = ["disk_sectors=524288"]
    for i, job in enumerate(JOBS):
        side = "write" if job.name == "seqwrite" else "read"
        note = "note: both iodepth >= 1 and synchronous I/O engine are selected\n"
        parts += [
            f"BENCH-JOB-BEGIN {job.name}",
            note + fio_json(1000.0 * (i + 1), 4e6 * (i + 1), 250_000.0, side),
            f"BENCH-JOB-END {job.name}",
        ]
    return "\n".join(parts) + "\n"


def test_parse_picks_each_jobs_side() -> None:
    figures = parse_output(output())
    assert isinstance(figures, dict)
    assert figures["qd1"] == Figure(1000.0, 4.0, 250.0)
    assert figures["seqwrite"] == Figure(4000.0, 16.0, 250.0)


def test_a_column_without_a_disk_says_why() -> None:
    assert parse_output(f"{NA_MARK} no /dev/vda\n") == "no /dev/vda"
    assert parse_output("disk_sectors=1\n") == "no fio output for qd1"


def test_table_and_ratios() -> None:
    ok = parse_output(output())
    assert isinstance(ok, dict)
    table, ratios = render({"shared": [ok, ok], "messages": ["refused (x)"], "builtin": [ok]}, 2)
    assert table.count("\n") == 1 + len(JOBS) * len(COLUMNS)
    assert "| 4k random read, QD1 | served, DMA messages | n/a: refused (x) | | |" in table
    assert "| 4k random read, QD1 | served, shared memory | 1,000 (1,000-1,000) |" in table
    assert ratios == [
        "served, shared memory / built-in IOPS (medians of 2): "
        "qd1 1.00x, qd32 1.00x, seqread 1.00x, seqwrite 1.00x"
    ]


def test_guest_script_runs_every_job_direct() -> None:
    script = guest_script(10)
    for job in JOBS:
        assert f"--name={job.name} --filename=/dev/vda" in script
    assert script.count("--direct=1 --runtime=10 --time_based") == len(JOBS)
