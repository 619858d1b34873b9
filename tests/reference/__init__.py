"""Independent plain-PyTorch oracle of MOC_MATH.md (see lunaris_reference.py)."""
