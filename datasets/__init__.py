"""Files on disk to volumes: DICOM series, label objects, NIfTI, manifests and the synthetic demo cohort."""
