"""Make the PyPI torchvision wheel import against a CPU-only torch.

Why this exists: the only torchvision release that pins torch 2.13.0 is a CUDA build. Its
compiled ops (`_C.so`, `image.so`) list `libc10_cuda.so` and `libtorch_cuda.so` as needed
libraries, which a CPU torch does not ship, so `import torchvision` fails with
"operator torchvision::nms does not exist". No CPU build of torchvision is on the registries
reachable here.

What it does (once, at set-up, never at run time of the project):
1. Lists the symbols those two extension modules need that no torch library defines (the
   CUDA entry points: `c10::cuda::*`, `at::cuda::*`).
2. Compiles two tiny stub libraries with exactly those names; every stub function aborts with
   a message, so a CUDA code path can never be taken silently on a CPU machine.
3. Installs a `.pth` import hook in the venv that, the first time `torchvision` is imported,
   loads the stubs (and the CUDA runtime bundled in the wheel) with RTLD_GLOBAL so the
   dynamic loader finds them by soname. Nothing else in the venv is touched.

With a CUDA torch (a GPU machine) or a torchvision that already imports, it does nothing.
Usage: `.venv/bin/python tools/torchvision_cpu_stubs.py`
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

STUB_SONAMES = ("libc10_cuda.so", "libtorch_cuda.so")
HOOK_MODULE = "_taskatlas_torchvision_cpu"

HOOK_SOURCE = '''"""Preload CPU stubs for torchvision's CUDA libraries (see tools/torchvision_cpu_stubs.py)."""
import ctypes
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_STUB_DIR = Path(__file__).with_name("_taskatlas_torchvision_stubs")


class _Preloader(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch  # noqa: F401  (torch's own libraries first)

        spec = importlib.util.find_spec("torchvision")
        libs = Path(spec.origin).parent.parent / "torchvision.libs"
        for lib in sorted(libs.glob("libcudart*.so*")) + sorted(_STUB_DIR.glob("*.so")):
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        return None


sys.meta_path.insert(0, _Preloader())
'''


def _torchvision_imports() -> bool:
    probe = "import torchvision, torchvision.ops"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _symbols(lib: Path, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-D", *flags, str(lib)], capture_output=True, text=True, check=True)
    return {line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()}


def _missing_symbols(extensions: list[Path], torch_lib: Path) -> list[str]:
    """Strong undefined C++ symbols of the extensions that torch's libraries do not define."""
    defined: set[str] = set()
    for lib in torch_lib.glob("*.so*"):
        defined |= _symbols(lib, "--defined-only")
    needed: set[str] = set()
    for ext in extensions:
        out = subprocess.run(
            ["nm", "-D", "--undefined-only", str(ext)], capture_output=True, text=True, check=True
        )
        for line in out.stdout.splitlines():
            kind, name = line.split()[-2:]
            if kind == "U" and "@" not in name and name.startswith("_Z"):
                needed.add(name)
    return sorted(needed - defined)


def _stub_source(symbols: list[str]) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stdlib.h>",
        "static void die(const char *s) {",
        '  fprintf(stderr, "taskatlas: CUDA stub %s called on a CPU-only torch\\n", s); abort(); }',
    ]
    lines += [f'void {name}(void) {{ die("{name}"); }}' for name in symbols]
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch

    if torch.version.cuda is not None or _torchvision_imports():
        print("torchvision imports as it is: no CPU stubs needed")
        return 0
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed", file=sys.stderr)
        return 1
    tv_dir = Path(spec.origin).parent
    extensions = [p for p in (tv_dir / "_C.so", tv_dir / "image.so") if p.exists()]
    symbols = _missing_symbols(extensions, Path(torch.__file__).parent / "lib")
    site = Path(sysconfig.get_paths()["purelib"])
    stub_dir = site / "_taskatlas_torchvision_stubs"
    stub_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stubs.c"
        src.write_text(_stub_source(symbols))
        # All missing symbols go into the first stub; the second only has to exist by soname.
        for i, soname in enumerate(STUB_SONAMES):
            cmd = ["gcc", "-shared", "-fPIC", "-O1", f"-Wl,-soname,{soname}", "-o", str(stub_dir / soname)]
            subprocess.run(cmd + ([str(src)] if i == 0 else ["-x", "c", "/dev/null"]), check=True)
    (site / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE)
    (site / f"{HOOK_MODULE}.pth").write_text(f"import {HOOK_MODULE}\n")
    if not _torchvision_imports():
        print("torchvision still does not import after installing the CPU stubs", file=sys.stderr)
        return 1
    print(f"torchvision: installed CPU stubs for {len(symbols)} CUDA symbols in {stub_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
