"""Whether fastdrop borrows torch's threads: the user's choice, read when `fastdrop._torch` is
imported (the first torch tensor) and set by `fastdrop.share_torch_threads`. Bottom floor: no
imports."""

#: Share torch's OpenMP threads once torch is in use (the default; see share_torch_threads).
share_torch = True
