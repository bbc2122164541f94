"""Pin a worker process to one GPU before torch initialises any device (no torch import here); and the device lists
of `inferq worker --device cuda:0-3` (one worker per device, worker/supervisor.py)."""
from __future__ import annotations

import os
import re

CARD_KINDS = ("xpu", "cuda")


def pin_device(device: str, count: int = 1) -> str:
    """Restrict the process to the named card (and the count - 1 after it: a tensor-parallel engine's, which its
    followers use) and return the device name to use inside it.

    `xpu:2` sets ZE_AFFINITY_MASK=2 (Intel Level Zero) and `cuda:2` sets CUDA_VISIBLE_DEVICES=2 (`cuda:2` with
    count 2: 2,3); the card is then device 0 of the process. Other names (auto, cpu, a bare xpu/cuda) are returned
    unchanged.
    """
    kind, _, index = device.partition(":")
    if kind not in CARD_KINDS or not index:
        return device
    if not index.isdigit():
        raise ValueError(f"device index must be a number, got {device!r}")
    cards = ",".join(str(int(index) + i) for i in range(count))
    os.environ["ZE_AFFINITY_MASK" if kind == "xpu" else "CUDA_VISIBLE_DEVICES"] = cards
    return f"{kind}:0"


def expand_devices(spec: str) -> list[str]:
    """The devices a `--device` value names, one worker each: `cuda:0,1,2,3`, `cuda:0-3`, `xpu:0,2-3` (items may
    repeat the kind: `cuda:0,cuda:1`) -> `["cuda:0", ...]`; `cpu,cpu` -> two CPU engines (`["cpu", "cpu"]`, a share
    of the cores each). One device (`cuda:1`, `cpu`, `auto`, a bare `xpu`) is a list of one, unchanged. ValueError
    for anything else: a bad index or a range that runs down, mixed kinds, a card named twice."""
    items = [item.strip() for item in spec.split(",")]
    kind, _, index = items[0].partition(":")
    if len(items) == 1 and (kind not in CARD_KINDS or not index):
        return [spec.strip()]  # what the engine resolves (engine/device.py), as before lists
    if "" in items:
        raise ValueError(f"--device {spec!r}: an empty item")
    if kind == "cpu":
        if any(item != "cpu" for item in items):
            raise ValueError(f"--device {spec!r}: a list of CPU engines repeats `cpu` (cpu,cpu); it takes no index "
                             "and no other kind")
        return items
    if kind not in CARD_KINDS or not index:
        raise ValueError(f"--device {spec!r}: a device list names cards (cuda:0,1 cuda:0-3 xpu:0-3) or repeats "
                         "cpu (cpu,cpu)")
    devices: list[str] = []
    for item in items:
        item_kind, colon, index = item.rpartition(":")
        if not colon and index in ("cpu", "auto", *CARD_KINDS):
            item_kind, colon = index, ":"  # `cuda:0,cpu`: a kind where an index goes
        if colon and item_kind != kind:
            raise ValueError(f"--device {spec!r}: one kind of device per list, not {kind} and {item_kind or '?'}")
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", index)
        if match is None:
            raise ValueError(f"--device {spec!r}: {index!r} is not a device index or a range of them (0, 0-3)")
        start = int(match[1])
        end = int(match[2]) if match[2] is not None else start
        if end < start:
            raise ValueError(f"--device {spec!r}: the range {index} runs down; write {end}-{start}")
        for i in range(start, end + 1):
            name = f"{kind}:{i}"
            if name in devices:
                raise ValueError(f"--device {spec!r}: {name} is named twice (one worker per card)")
            devices.append(name)
    return devices
