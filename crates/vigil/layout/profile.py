#!/usr/bin/env python3
"""Regenerate crates/vigil/layout/vigil.order: the functions the `vigil` binary runs
until its guest's first line, for the linker to pack together (crates/vigil/build.rs).

Run as root from the repository's root after `cargo build --release`:

    python3 crates/vigil/layout/profile.py

It copies the release `vigil` and `vigil-bench` to a scratch folder, puts a uprobe on
the entry of every function of that `vigil` (or on its first instruction uprobes can
single-step; tracefs: only that copy is probed), runs
`vigil-bench boot --runs 1 --qemu none` on each of its guests in turn (every boot is
stopped at the guest's line, as the benchmark measures it) and writes the functions
that were entered: those of the first guest first, then those the next guests added,
each group in the binary's present address order. The probes are removed afterwards.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

TRACEFS = "/sys/kernel/tracing"
GROUP = "vigil_layout"
GUESTS = ["trivial", "test-guest", "linux"]
RELEASE = "target/x86_64-unknown-linux-gnu/release"


def load_segments(binary):
    """(vaddr, file offset, size) of each executable PT_LOAD segment."""
    out = subprocess.run(["readelf", "-lW", binary], check=True, capture_output=True, text=True)
    segments = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if fields[:1] == ["LOAD"] and "E" in fields[6:-1]:
            offset, vaddr, filesz = int(fields[1], 16), int(fields[2], 16), int(fields[4], 16)
            segments.append((vaddr, offset, filesz))
    return segments


def functions(binary):
    """(name, vaddr, file offset) of every defined function in the executable segments."""
    segments = load_segments(binary)
    out = subprocess.run(
        ["nm", "--defined-only", binary], check=True, capture_output=True, text=True
    )
    found = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) != 3 or fields[1] not in "tTwWi":
            continue
        vaddr, name = int(fields[0], 16), fields[2]
        for seg_vaddr, seg_offset, size in segments:
            if seg_vaddr <= vaddr < seg_vaddr + size:
                # Aliases share an address: one probe per address is enough.
                found.setdefault(vaddr, (name, vaddr, vaddr - seg_vaddr + seg_offset))
    return sorted(found.values(), key=lambda f: f[1])


# Instructions uprobes cannot single-step, so that a probe on them is accepted but
# never fires: AVX (VEX, EVEX: glibc's string functions) and those with a LOCK or
# ES/CS/SS/DS segment prefix (std's `Thread::park` begins with `lock decl`).
BAD_PREFIXES = {0xF0, 0x26, 0x2E, 0x36, 0x3E}
LEGACY_PREFIXES = BAD_PREFIXES | {0xF2, 0xF3, 0x66, 0x67, 0x64, 0x65}
VEX = {0xC4, 0xC5, 0x62}


def probeable(code):
    """Whether uprobes can single-step the instruction that begins `code`."""
    for byte in code:
        if byte in BAD_PREFIXES:
            return False
        if byte not in LEGACY_PREFIXES:
            return byte not in VEX
    return False


def probe_offsets(binary, funcs):
    """vaddr -> the file offset to probe each function at: its entry, or where its
    entry cannot be probed, the first probeable instruction of its straight-line
    start (every entry reaches it). Functions with neither are left out."""
    with open(binary, "rb") as f:
        data = f.read()
    starts = {vaddr: offset for _name, vaddr, offset in funcs}
    late = {vaddr for vaddr, offset in starts.items() if not probeable(data[offset:offset + 15])}
    where = {vaddr: starts[vaddr] for vaddr in starts if vaddr not in late}
    if late:
        # One pass over the binary: the instructions after each such entry.
        out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary],
                             check=True, capture_output=True, text=True)
        function = None
        for line in out.stdout.splitlines():
            header = re.match(r"([0-9a-f]+) <", line)
            if header:
                function = int(header[1], 16) if int(header[1], 16) in late else None
                continue
            match = re.match(r"\s*([0-9a-f]+):\s+(\S+)", line)
            if function is None or not match:
                continue
            offset = int(match[1], 16) - function + starts[function]
            if probeable(data[offset:offset + 15]):
                where[function] = offset
                function = None
            elif match[2].startswith(("j", "call", "ret", "loop")):
                function = None  # branches before anything probeable: left out
    return where


def write_tracefs(name, text, append=True):
    # os.open: Python's append mode seeks to the end, which tracefs refuses.
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(os.path.join(TRACEFS, name), flags)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def hits():
    """Probe name -> hits, from uprobe_profile (our group only)."""
    counts = {}
    with open(os.path.join(TRACEFS, "uprobe_profile")) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and re.fullmatch(r"f\d+", fields[1]):
                counts[fields[1]] = int(fields[2])
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default=RELEASE, help="folder of vigil and vigil-bench")
    parser.add_argument("--out", default="crates/vigil/layout/vigil.order")
    args = parser.parse_args()

    if not os.path.exists(os.path.join(TRACEFS, "uprobe_events")):
        subprocess.run(["mount", "-t", "tracefs", "none", TRACEFS], check=True)

    scratch = tempfile.mkdtemp(prefix="vigil-layout-")
    for binary in ("vigil", "vigil-bench"):
        shutil.copy2(os.path.join(args.release, binary), scratch)
    vigil = os.path.join(scratch, "vigil")
    funcs = functions(vigil)

    where = probe_offsets(vigil, funcs)
    probes = {}
    try:
        for index, (name, vaddr, _entry) in enumerate(funcs):
            probe = f"f{index}"
            offset = where.get(vaddr)
            if offset is None:
                continue
            try:
                write_tracefs("uprobe_events", f"p:{GROUP}/{probe} {vigil}:0x{offset:x}\n")
                probes[probe] = name
            except OSError:
                pass  # an entry the kernel cannot probe: left to the binary's own order
        write_tracefs(f"events/{GROUP}/enable", "1\n", append=False)

        seen, groups = set(), []
        for guest in GUESTS:
            started = time.monotonic()
            subprocess.run(
                [os.path.join(scratch, "vigil-bench"), "boot", "--runs", "1", "--qemu", "none",
                 "--guests", guest],
                check=True, stdout=subprocess.DEVNULL,
            )
            new = {p for p, n in hits().items() if n > 0} - seen
            seen |= new
            groups.append((guest, sorted(new, key=lambda p: int(p[1:]))))
            print(f"{guest}: {len(new)} more functions, {time.monotonic() - started:.0f} s",
                  file=sys.stderr)
    finally:
        if os.path.exists(os.path.join(TRACEFS, "events", GROUP)):
            write_tracefs(f"events/{GROUP}/enable", "0\n", append=False)
        for probe in probes:
            write_tracefs("uprobe_events", f"-:{GROUP}/{probe}\n")
        shutil.rmtree(scratch)

    with open(args.out, "w") as f:
        f.write(
            "# The functions `vigil` runs until its guest's first line, in the order the\n"
            "# linker places them (crates/vigil/build.rs). Generated by\n"
            "# crates/vigil/layout/profile.py: regenerate it when start-up code, Cargo.lock\n"
            "# or the toolchain changes (symbol hashes change with them).\n"
        )
        for guest, group in groups:
            f.write(f"# added by the {guest} guest: {len(group)}\n")
            for probe in group:
                f.write(probes[probe] + "\n")
    print(f"{len(seen)} of {len(probes)} probed functions ran; wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
