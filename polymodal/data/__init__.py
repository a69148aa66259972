"""polymodal.data"""

from .captions import BadSampleError, CaptionPipeline, ImageTextFolder, load_image, webdataset_pipeline
from .images import to_rgb
from .stream import ShardStream, expand_shards, is_shard_pattern
from . import synthetic
from .synthetic import SyntheticCaptions
from .tokenizer import CLIPTokenizer, clean_text
from .bert_tokenizer import BertTokenizer, RobertaTokenizer, load_tokenizer
from .transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImageTransform, CLIPTransform
