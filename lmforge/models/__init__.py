"""Model families, one file each; importing this package registers them (see registry.py)."""

from lmforge.models import decoder  # noqa: F401
from lmforge.models import heads  # noqa: F401  (decoder_classifier, decoder_value)
from lmforge.models import encoder  # noqa: F401  (BERT / RoBERTa / DistilBERT / ModernBERT-style encoders)
from lmforge.models import seq2seq  # noqa: F401
