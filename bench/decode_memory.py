"""Peak memory of converting one image to PNG (imagegen.images._convert), per format and mode.

Each case runs in a fresh process: RSS just before the decode, peak RSS (ru_maxrss) after, over
the pixel count. Images are made here (noise over flat colour: decoders do the same work for any
content; the PNG written stays small). Run: .venv/bin/python bench/decode_memory.py [side]
"""

from __future__ import annotations

import io
import os
import random
import resource
import subprocess
import sys
import tempfile

CASES = [
    ("jpeg", "L", {}),
    ("jpeg", "RGB", {}),
    ("jpeg", "RGB", {"progressive": True}),
    ("jpeg", "CMYK", {}),
    ("webp", "RGB", {"quality": 80}),
    ("webp", "RGBA", {"quality": 80}),
    ("webp", "RGB", {"lossless": True, "method": 0}),
    ("webp", "RGBA", {"lossless": True, "method": 0}),
    ("gif", "P", {}),
]


def make(kind: str, mode: str, options: dict, width: int, height: int) -> bytes:
    from PIL import Image

    rng = random.Random(1)
    image = Image.new("RGB", (width, height), (30, 120, 200))
    patch = Image.frombytes("RGB", (256, 256), rng.randbytes(256 * 256 * 3))
    for x in range(0, width, 1024):
        image.paste(patch, (x, (x // 4) % max(1, height - 256)))
    image = image.convert(mode) if mode != "P" else image.quantize(64)
    out = io.BytesIO()
    image.save(out, format=kind.upper(), **options)
    return out.getvalue()


def child(path: str) -> None:
    from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

    from imagegen import images

    images.configure_decoding(64 * 2**30)
    data = open(path, "rb").read()
    with open("/proc/self/statm") as statm:
        before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with Image.open(io.BytesIO(data)) as image:
        estimate = images.decode_memory(images.sniff_image_type(data), image, data)
    png = images._convert(data, images.sniff_image_type(data), 1.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - before, len(png), estimate)


def main() -> None:
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    width, height = side, side // 2
    pixels = width * height
    print(f"{width}x{height} ({pixels / 1e6:.1f} Mpx); peak RSS over RSS before the decode")
    for kind, mode, options in CASES:
        data = make(kind, mode, options, width, height)
        with tempfile.NamedTemporaryFile(suffix="." + kind) as file:
            file.write(data)
            file.flush()
            result = subprocess.run([sys.executable, __file__, "--child", file.name], capture_output=True, text=True)
        if result.returncode:
            print(kind, mode, options, "failed:", result.stderr.strip().splitlines()[-1])
            continue
        used, png_bytes, estimate = (int(v) for v in result.stdout.split())
        label = f"{kind} {mode} {' '.join(k for k in options if k in ('progressive', 'lossless'))}"
        print(
            f"{label:<28} input {len(data) / 1e6:6.2f} MB  peak +{used / 2**20:6.0f} MiB"
            f"  {used / pixels:5.1f} B/px  (png {png_bytes / 1e6:.1f} MB; estimate {estimate / 2**20:.0f} MiB)"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, os.getcwd())
        child(sys.argv[2])
    else:
        main()
