"""The synthetic prostate mpMRI phantom: real DICOM in four vendor conventions, with exact
ground truth. Used by the demo cohort, the tests and the benchmarks.

``phantom.plan`` draws every choice for one exam, ``phantom.exam`` renders it and writes the
truth, ``phantom.dicom`` writes the DICOM series.
"""
