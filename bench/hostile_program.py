"""What a hostile ``.pt2`` costs the program check in memory: the peak resident size of a process that reads it.

Crafts, from a real program of the digits CNN (dynamic batch), the file of the report: four ``extra/`` members of
``--extra-mib`` MiB each, deflated at about 150 to one (under the 200-to-one zip bomb test), i.e. a file of some
13 MB that unpacks to 2 GiB. Each case is read by ``trainable.programs.read_program`` in a fresh Python process
that prints its peak resident size (``ru_maxrss``) and its outcome: the plain program, then the crafted one.
Before the check judged members by name and declared size first (and never unpacked ``extra/``), the crafted file
peaked at 5.8 GB before its refusal.

Example::

    python bench/hostile_program.py                    # four 512 MiB members (about 13 MB on disk)
    python bench/hostile_program.py --extra-mib 64

The last line is ``ratio=<crafted peak / plain peak>``; the bound is the plain program's peak plus 64 MiB.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainable.models import build_classifier  # noqa: E402

READ = """
import resource, sys
from trainable.programs import ProgramError, read_program
try:
    read_program(sys.argv[1])
    outcome = "loaded"
except ProgramError as e:
    outcome = "refused: " + str(e)[-160:]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, outcome)
"""


def plain_program(path: Path) -> None:

    torch.manual_seed(0)
    net = build_classifier("cnn", 10, 1, 8).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)), str(path))


def crafted(plain: Path, out: Path, extra_mib: int, count: int = 4) -> None:
    """``plain`` with ``count`` extra members of ``extra_mib`` MiB each, deflated at about 150 to one, streamed."""
    rng = random.Random(0)
    chunk = bytes(rng.getrandbits(8) for _ in range(6_000)) + bytes(2 ** 20 - 6_000)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(out, "w") as dst:
        prefix = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        for i in range(count):
            info = zipfile.ZipInfo(f"{prefix}/extra/note{i}.txt")
            info.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(info, "w", force_zip64=True) as f:
                for _ in range(extra_mib):
                    f.write(chunk)


def peak(path: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", READ, str(path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=1800)
    if r.returncode != 0:
        sys.exit(f"reading {path} failed:\n{r.stderr[-2000:]}")
    mib, outcome = r.stdout.strip().split(" ", 1)
    return int(mib), outcome


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra-mib", type=int, default=512, help="size of each of the four extra members (MiB)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, bad = Path(tmp, "plain.pt2"), Path(tmp, "crafted.pt2")
        plain_program(plain)
        crafted(plain, bad, args.extra_mib)
        with zipfile.ZipFile(bad) as z:
            unpacked = sum(i.file_size for i in z.infolist())
        print(f"crafted file: {bad.stat().st_size / 1e6:.1f} MB on disk, {unpacked / 2 ** 30:.2f} GiB unpacked")
        base, outcome = peak(plain)
        print(f"plain program:   peak {base} MiB, {outcome}")
        worst, outcome = peak(bad)
        print(f"crafted program: peak {worst} MiB, {outcome}")
        bound = base + 64
        print(f"bound={bound} MiB ({'within' if worst <= bound else 'OVER'})")
        print(f"ratio={worst / base:.2f}")


if __name__ == "__main__":
    main()
