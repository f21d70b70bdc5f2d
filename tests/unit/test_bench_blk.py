"""bench.blk's parsing of fio's JSON and its table (no guest needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import blk
from bench.blk import (
    COLUMNS,
    JOBS,
    NA_MARK,
    NOT_RUN,
    Figure,
    guest_script,
    host_fio,
    host_side_note,
    parse_output,
    render,
)


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
    figures: dict[str, list[dict[str, Figure] | str]] = {
        "none": [ok, ok],
        "shared": [ok, ok],
        "messages": ["refused (x)", "refused (x)"],
        "builtin": [ok, ok],
        "host": [NOT_RUN, NOT_RUN],  # a column never run is left out
    }
    table, ratios = render(figures, 2)
    assert table.count("\n") == 1 + len(JOBS) * (len(COLUMNS) - 1)
    assert "host" not in table
    messages = "| 4k random read, QD1 | served, cache=writeback, DMA messages | n/a: refused (x) |"
    none = "| 4k random read, QD1 | served, cache=none, shared memory | 1,000 (1,000-1,000) |"
    assert messages in table
    assert none in table
    # The headline ratio first: O_DIRECT (cache=none) against the built-in's O_DIRECT.
    assert ratios == [
        "served, cache=none, shared memory / built-in IOPS (medians of 2): "
        "qd1 1.00x, qd32 1.00x, seqread 1.00x, seqwrite 1.00x",
        "served, cache=writeback, shared memory / built-in IOPS (medians of 2): "
        "qd1 1.00x, qd32 1.00x, seqread 1.00x, seqwrite 1.00x",
    ]


def test_a_subset_of_jobs_and_columns() -> None:
    jobs = [j for j in JOBS if j.name == "qd1"]
    script = guest_script(2, jobs)
    assert "--name=qd1" in script and "--name=qd32" not in script
    ok = parse_output(output(), jobs)
    assert isinstance(ok, dict) and list(ok) == ["qd1"]
    table, ratios = render({"none": [ok], "builtin": [NOT_RUN]}, 1, jobs)
    assert table.count("\n") == 2
    assert ratios == []  # no built-in figures, no ratio


def test_host_note_says_which_comparison_is_like_for_like() -> None:
    both = host_side_note({"none", "shared", "builtin"})
    assert "O_DIRECT with O_DIRECT" in both and "not the comparison to quote" in both
    assert "not the comparison" not in host_side_note({"none", "builtin"})


def test_host_column_without_fio_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert host_fio(tmp_path / "disk.img", 1, JOBS) == "no host fio"


def test_host_column_runs_fio_on_the_image(tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        reason = "no host fio (apt-get install fio): the host column is untested here"
        print(reason)
        pytest.skip(reason)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    jobs = [j for j in JOBS if j.name in ("qd1", "seqwrite")]
    got = host_fio(image, 1, jobs)
    assert isinstance(got, dict), got
    assert set(got) == {"qd1", "seqwrite"}
    assert all(f.iops > 0 for f in got.values())


def test_unknown_column_or_job_is_refused() -> None:
    with pytest.raises(SystemExit, match="--only 'fast'"):
        blk.main(["--only", "fast"])
    with pytest.raises(SystemExit, match="--jobs 'qd2'"):
        blk.main(["--jobs", "qd2"])


def test_guest_script_runs_every_job_direct() -> None:
    script = guest_script(10)
    for job in JOBS:
        assert f"--name={job.name} --filename=/dev/vda" in script
    assert script.count("--direct=1 --runtime=10 --time_based") == len(JOBS)
