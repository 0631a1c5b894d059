"""`lungnode train import`: labelled scans from the sources a hospital has (LUNA16 lists, LIDC reader
XML, DICOM SEG/SR from a PACS, plain CSV) -> one validated datalist, optionally with de-identified
copies of the images. Each source module turns its annotations into ``LabeledScan``s (datalist.py)."""
