"""Sizes of an image's layers, from an OCI archive (`buildah push IMAGE oci-archive:F`).

    python3 bench/image_size.py planewatch.oci.tar [more.oci.tar ...]

Per layer and in total: *gzip*, the compressed blob as a registry stores and a node
pulls it; *unpacked*, the bytes of the regular files in it (what the layer takes on
a node's disk, less filesystem overhead); *tar*, the uncompressed layer stream. The
biggest directories of each layer follow, for where the bytes are. bench/RESULTS.md
(Footprint) quotes these figures for deploy/Containerfile's image.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import tarfile

MIB = 1 << 20


def layers(archive: str) -> list[dict]:
    """[{gzip, tar, unpacked, dirs}] for each layer of the archive's first image."""
    with tarfile.open(archive) as oci:
        def blob(digest: str) -> bytes:
            member = oci.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
            assert member is not None, digest
            return member.read()
        index = json.loads(oci.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        out = []
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            raw = gzip.decompress(data) if layer["mediaType"].endswith("gzip") else data
            dirs: collections.Counter[str] = collections.Counter()
            unpacked = 0
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for member in tar:
                    if member.isreg():
                        unpacked += member.size
                        dirs["/".join(member.name.lstrip("./").split("/")[:3])] += member.size
            out.append({"gzip": len(data), "tar": len(raw), "unpacked": unpacked, "dirs": dirs})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("archives", nargs="+")
    parser.add_argument("--top", type=int, default=8, help="directories listed per layer")
    args = parser.parse_args()
    for archive in args.archives:
        got = layers(archive)
        print(archive)
        for i, layer in enumerate(got):
            print(f"  layer {i}: {layer['unpacked'] / MIB:6.1f} MiB unpacked, "
                  f"{layer['gzip'] / MIB:5.1f} MiB gzip ({layer['tar'] / MIB:.1f} MiB tar)")
            for name, size in layer["dirs"].most_common(args.top):
                print(f"      {size / MIB:6.1f}  {name}")
        print(f"  total:   {sum(x['unpacked'] for x in got) / MIB:6.1f} MiB unpacked, "
              f"{sum(x['gzip'] for x in got) / MIB:5.1f} MiB gzip "
              f"({sum(x['tar'] for x in got) / MIB:.1f} MiB tar)")


if __name__ == "__main__":
    main()
