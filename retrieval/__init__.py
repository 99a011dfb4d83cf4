"""Retrieval stage: a TFRS two-tower model (tf-keras) whose top-K index feeds the ranker its candidates.

TFRS needs tf-keras: ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is first imported (ENVIRONMENT.md).
Importing this package sets it when TensorFlow is not loaded yet; the ranker's Keras 3 (``import keras``) is
unaffected. Never mix layers of the two Kerases in one model.
"""

import os
import sys

if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
