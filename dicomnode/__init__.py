"""dicomnode: a DICOM AI gateway for retinal (fundus) imaging."""

__version__ = "0.1.0"
MANUFACTURER = "dicomnode"
