"""The server CLIs: ``cmce`` (``main``) and ``cmce-build-gallery`` (``build``)."""

import os

# Torch's CPU allocator maps every large tensor afresh and faults its pages in 4 KiB at a time;
# on transparent huge pages (Linux) the CLIs' training runs faster: resnet 92 -> 85 s and
# widecnn 74 -> 64 s for 150 steps, the glyphs preset 28.6 -> 26.9 min with a third of the
# kernel time, on a 2-core CPU. Torch reads it at its first allocation, so it is set here, before
# any command imports torch; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
