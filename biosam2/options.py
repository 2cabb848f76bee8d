"""Names of the choices biosam2 offers, importable without torch (the command line needs them)."""

SAM2_SIZE_NAMES = ("tiny", "small", "base-plus", "large")

# Where trainable parameters go. "none" trains the PEG (if any) and the class heads only;
# "full" also unfreezes SAM2's image encoder and mask decoder (a baseline).
ADAPTERS = ("hp", "lw", "none", "adaptformer", "lora", "full")
POSITIONAL_ENCODINGS = ("peg", "sam2")
LOSSES = ("ce", "dice_ce")
INPUT_MODES = ("crop", "resize")  # training samples: random patch_size crops, or whole images resized
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
BENCHMARKS = ("efficiency", "accuracy")

# SAM2 weights: pretrained SAM2.1 from the hub (or its local cache) unless random weights are asked for.
DEFAULT_WEIGHTS = "hf"
RANDOM_WEIGHTS = "random"
