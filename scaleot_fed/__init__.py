"""scaleot-fed: ScaleOT offsite-tuning of LLMs across many data owners.

The method lives here without any Flower import: model surgery per architecture
(:mod:`~scaleot_fed.arch`), the harmonizer, Dynamic LayerReplace (stage 1), Selective Rank
Compression, the emulator builder and the plug-in.
"""

__version__ = "0.1.0"
