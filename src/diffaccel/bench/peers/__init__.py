"""The peers ``diffaccel bench`` compares against, each applied as its users would: one module per
family (diffusers' hooks, cache-dit, the U-Net peers, quantization libraries), one registry."""

from __future__ import annotations

import re

from diffaccel.bench.peers import cachedit, hooks, quant, unet
from diffaccel.bench.peers.base import Candidate, Context, PeerSpec

PEERS: dict[str, PeerSpec] = {**hooks.SPECS, **cachedit.SPECS, **unet.SPECS, **quant.SPECS}


def peer_versions() -> dict[str, str | None]:
    out = {}
    for spec in PEERS.values():
        dist = re.split(r"[=<>!~ ]", spec.requirement)[0]
        out[dist] = spec.version()
    return out


__all__ = ["PEERS", "Candidate", "Context", "PeerSpec", "peer_versions"]
