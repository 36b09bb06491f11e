"""The PACS role: crawl a DICOMweb PACS by QIDO-RS, build DICOM SR reports of the scores, publish them."""
