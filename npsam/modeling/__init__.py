"""The reference: one file per file of the official ``segment_anything/modeling/``
(and MobileSAM's ``tiny_vit_sam.py``), one class per official class, each
``forward`` computing what the official one computes, in its order."""
