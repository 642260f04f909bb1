"""The built-in demo program: ``vsl demo`` (:mod:`.run`: SGR with and without VSL on the procedural
dataset of :mod:`vsl.data.demo`, compared) and ``vsl make-demo-data`` (:mod:`.data_command`);
:mod:`.simulate` makes features from real captions."""
from .run import VSL_WEIGHT, demo_vsl_checkpoint, prepare_demo

__all__ = ["VSL_WEIGHT", "demo_vsl_checkpoint", "prepare_demo"]
