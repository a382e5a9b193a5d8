"""moetron's data pipeline: the built-in corpus, tokenizers, prepared token shards, packing and loaders.

Modules:
    corpus.py     builtin_corpus() (Python's own docs, offline), split_corpus()
    tokenizer.py  Tokenizer (HF tokenizers wrapper), train_bpe(), builtin_tokenizer() (cached)
    sources.py    reading .txt / .jsonl documents with file:line error positions
    prepare.py    `python -m moetron.data.prepare`: documents -> DIR/{train,val}_*.bin + meta.json
    dataset.py    TokenStream (memmapped shards or an array), pack_sample(), builtin_token_streams()
    loader.py     DataLoader (deterministic, rank-sharded, resumable), eval_batches()
"""

from moetron.data.corpus import builtin_corpus, corpus_hash, split_corpus, split_documents
from moetron.data.dataset import TokenStream, builtin_token_streams, pack_sample, read_meta
from moetron.data.loader import DataLoader, eval_batches
from moetron.data.tokenizer import EOS_TOKEN, Tokenizer, builtin_tokenizer, encode_documents, token_dtype, train_bpe

__all__ = [
    "EOS_TOKEN",
    "DataLoader",
    "TokenStream",
    "Tokenizer",
    "builtin_corpus",
    "builtin_token_streams",
    "builtin_tokenizer",
    "corpus_hash",
    "encode_documents",
    "eval_batches",
    "pack_sample",
    "read_meta",
    "split_corpus",
    "split_documents",
    "token_dtype",
    "train_bpe",
]
