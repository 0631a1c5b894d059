"""lungnode: AI lung-nodule detection beside the hospital PACS."""
__version__ = "0.1.0"
