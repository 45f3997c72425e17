"""The ModelZoo: Flax Linen models with logical-axis sharding and Hugging Face interop."""

from etjax.models.bert import Encoder, EncoderOutput
from etjax.models.config import EncoderConfig, config_from_dict
from etjax.models.heads import ClassifierOutput, SequenceClassifier
from etjax.models.hf import config_from_pretrained, from_pretrained, save_pretrained
from etjax.models.zoo import create_model, get_config, list_models, module_for, register
from etjax.models.t5 import T5Encoder, T5Model, T5Output
from etjax.models.t5_configs import T5Config
from etjax.models.t5_decode import greedy_decode
from etjax.models.gpt2 import GPT2, GPT2Output
from etjax.models.gpt2_configs import GPT2Config
from etjax.models.gpt2_decode import generate
