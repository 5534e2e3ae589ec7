"""Cost of setting a caption in an existing XMP packet: autocaption's in-place edit (defusedxml tree +
expat layout + splice) against rebuilding the packet from the tree (ElementTree serialisation, as the
writer did before issue 23), in the same run.

Packets: BlueSquare.jpg's (Photoshop CS2, 4.8 KB, from ../shared/corpus) and a darktable-style sidecar
with 300 history entries (~70 KB). Usage: python bench/xmp_edit.py [--repeat N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import defusedxml.ElementTree as SafeET

from autocaption.writers import xmp
from autocaption.writers.containers import jpeg_blocks

CORPUS = Path(__file__).resolve().parents[2] / "shared/corpus"


def darktable(entries: int) -> bytes:
    items = "".join(
        f'\n     <rdf:li darktable:num="{i}" darktable:operation="exposure" darktable:enabled="1" '
        f'darktable:modversion="6" darktable:params="0000000000000000{i:08x}" darktable:multi_name=""/>'
        for i in range(entries)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="" xmlns:darktable="http://darktable.sf.net/" darktable:xmp_version="5">\n'
        f"   <darktable:history>\n    <rdf:Seq>{items}\n    </rdf:Seq>\n   </darktable:history>\n"
        "  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n"
    ).encode()


def edit(packet: bytes) -> bytes:
    parsed = xmp.parse(packet)
    xmp.set_description(parsed, "A red fox in the snow", "A red fox in the snow")
    xmp.set_keywords(parsed, ["fox", "snow"], ["fox", "snow"])
    return xmp.serialize(parsed)


def rebuild(packet: bytes) -> bytes:
    """The baseline: the same tree work, then the whole tree serialised again."""
    body = packet[packet.index(b"<x:xmpmeta") :]
    body = body[: body.rindex(b"</x:xmpmeta>") + len(b"</x:xmpmeta>")]
    root = SafeET.fromstring(body)
    description = root.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    assert description is not None
    ET.SubElement(description, "{http://purl.org/dc/elements/1.1/}description").text = "A red fox in the snow"
    return ET.tostring(root, encoding="utf-8")


def median_ms(work: Callable[[bytes], bytes], packet: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work(packet)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    blue = jpeg_blocks((CORPUS / "jpg/xmp/BlueSquare.jpg").read_bytes()).xmp
    assert blue is not None
    print(f"machine: {platform.node()} {platform.machine()} Python {platform.python_version()}")
    for name, packet in (("BlueSquare.jpg", blue), ("darktable, 300 entries", darktable(300))):
        ours, base = median_ms(edit, packet, args.repeat), median_ms(rebuild, packet, args.repeat)
        print(f"{name:24s} {len(packet) / 1000:6.1f} KB  edit {ours:6.2f} ms  rebuild {base:6.2f} ms  "
              f"({ours / base:.2f}x the rebuild)")  # fmt: skip


if __name__ == "__main__":
    main()
