"""``python -m fedlowrank.fedpara``: VGG16-GN sizes next to the paper's, and the init check."""

from .report import main

main()
