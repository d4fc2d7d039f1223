#!/usr/bin/env python3
"""Seed tools for boundimport's fuzz targets (see fuzz/src/lib.rs for the input encodings).

  encode.py sparse IMAGE OUT           a disk image as a sparse-image input (u64 length, then records)
  encode.py codec CODEC SIZE DATA OUT  a decompress input: codec byte (0 deflate, 1 zlib, 2 zstd), u24 size, data
"""
import struct
import sys


def sparse(image, out):
    data = open(image, "rb").read()
    parts = [struct.pack(">Q", len(data))]
    at = 0
    while at < len(data):
        if not any(data[at:at + 512]):
            at += 512
            continue
        start = at
        while at < len(data) and at - start < 32768 and any(data[at:at + 512]):
            at = min(at + 512, len(data))
        parts.append(struct.pack(">IH", start, at - start) + data[start:at])
    open(out, "wb").write(b"".join(parts))


def codec(kind, size, payload, out):
    blob = bytes([int(kind)]) + int(size).to_bytes(3, "big") + open(payload, "rb").read()
    open(out, "wb").write(blob)


if __name__ == "__main__":
    if sys.argv[1] == "sparse":
        sparse(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "codec":
        codec(*sys.argv[2:6])
    else:
        sys.exit(__doc__)
