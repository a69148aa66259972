"""polymodal.data"""

from .captions import BadSampleError, CaptionPipeline, ImageTextFolder, load_image, webdataset_pipeline
from . import synthetic
from .synthetic import SyntheticCaptions
