"""Other methods run through their own packages, scored by biosam2's evaluation (nnU-Net v2)."""
