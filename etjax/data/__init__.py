"""etjax.data: readers, tokenizers, the input pipeline and synthetic domains."""

from etjax.data import synthetic
from etjax.data.debian import load_debian_descriptions
from etjax.data.debian import SplitData
from etjax.data.pipeline import BATCH_KEYS
from etjax.data.pipeline import concatenate
from etjax.data.pipeline import encode_examples
from etjax.data.pipeline import eval_batches
from etjax.data.pipeline import EvalBatches
from etjax.data.pipeline import num_examples
from etjax.data.pipeline import take
from etjax.data.pipeline import train_iterator
from etjax.data.pipeline import TrainIterator
from etjax.data.readers import Example
from etjax.data.readers import read_csv
from etjax.data.readers import read_examples
from etjax.data.readers import read_jsonl
from etjax.data.readers import read_tsv
from etjax.data.readers import ReadResult
from etjax.data.readers import Schema
from etjax.data.tokenizers import build_wordpiece_tokenizer
from etjax.data.tokenizers import load_tokenizer
from etjax.data.tokenizers import Tokenizer
