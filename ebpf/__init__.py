"""BPF programs (*.bpf.c, built by `make -C ebpf` into ebpf/build/) and their
libbpf loader: libbpf.py (ctypes binding), btf.py (drop reason names),
maps.py (map layouts and decoding), tc.py (clsact fallback), loader.py."""
