"""Reading CT as acquired: NIfTI and DICOM readers, LPS geometry and resampling (used by ingest and embed)."""
