"""Synthetic colour fundus photographs and the Ophthalmic Photography files that carry them.

Used by tests, benchmarks and `dicomnode demo-study`; the pictures are drawn in code, so no
patient data is involved.
"""

from dicomnode.synthetic.dicom import OP_8BIT_STORAGE, demo_study, op_dataset
from dicomnode.synthetic.fundus import (
    FundusTruth,
    Laterality,
    synthetic_fundus,
    synthetic_fundus_with_truth,
)

__all__ = [
    "OP_8BIT_STORAGE",
    "FundusTruth",
    "Laterality",
    "demo_study",
    "op_dataset",
    "synthetic_fundus",
    "synthetic_fundus_with_truth",
]
