"""seqrec: sequential recommendation with a pretrained BERT, trained with DeepSpeed over WebDataset shards."""

__version__ = "0.1.0"
