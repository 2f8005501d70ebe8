"""Fail loudly unless every cda2_ext operator has a kernel registered for the given backends.

The operator list is read from ``csrc/ops.cpp`` (its ``m.def("name(...`` schemas), not from a
copy here, so a new operator is checked without editing this file. For each operator and each
backend (``CPU``, ``CUDA``, ...) it asks the dispatcher whether a kernel is registered
(``torch._C._dispatch_has_kernel_for_dispatch_key``). A build without its CUDA kernels therefore
fails here instead of passing as a run of skipped CUDA tests.

Usage::

    python benchmarks/check_registration.py                 # CPU, plus CUDA when a GPU is visible
    python benchmarks/check_registration.py --keys CPU CUDA # exactly these (exit 1 if any missing)

Exit status: 0 all registered, 1 something missing, 2 the extension is not built at all.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
OPS_CPP = ROOT / "csrc" / "ops.cpp"
NAMESPACE = "cda2_ext"


def schema_names(ops_cpp: Path = OPS_CPP) -> List[str]:
    """Operator names defined in ``ops_cpp`` (``m.def("name(`` lines), in file order."""
    names = re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)\s*\(', ops_cpp.read_text())
    if not names:
        raise RuntimeError(f"no m.def(\"name(...\") schemas found in {ops_cpp}")
    return names


def missing_kernels(names: List[str], keys: List[str]) -> Dict[str, List[str]]:
    """For each dispatch key, the operators in ``names`` with no kernel registered for it."""
    out: Dict[str, List[str]] = {}
    for key in keys:
        out[key] = [n for n in names
                    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{n}", key)]
    return out


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", nargs="+", default=None,
                    help="dispatch keys to require (default: CPU, and CUDA when torch sees a GPU)")
    args = ap.parse_args(argv)
    keys = args.keys or (["CPU", "CUDA"] if torch.cuda.is_available() else ["CPU"])

    import cda2_ext
    from cda2_ext import ops

    print(f"check_registration: {cda2_ext.BUILD_INFO}; loaded from {Path(cda2_ext.__file__).parent}")
    if not ops.HAS_EXTENSION:
        print("check_registration: FAIL: the compiled extension cda2_ext._C is not importable")
        return 2
    names = schema_names()
    bad = missing_kernels(names, keys)
    failed = False
    for key in keys:
        if bad[key]:
            failed = True
            print(f"check_registration: FAIL: no {key} kernel for {', '.join(bad[key])}")
        else:
            print(f"check_registration: OK: {key} kernels for all {len(names)} ops ({', '.join(names)})")
    if "CUDA" in keys and not ops.cuda_available():
        failed = True
        print("check_registration: FAIL: ops.cuda_available() is False (built without CDA2_WITH_CUDA)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
