"""Evaluation: retrieval (ITC shortlist, ITM re-rank), captioning (BLEU-4, CIDEr-D, caption accuracy)
and CapFilt's filter and captioner against the generated world's ground truth.

Modules: ``retrieval``, ``captioning``, ``filtering``, ``testset`` (the held-out split) and ``report``
(the text table); the stage that runs them all is :mod:`capfilt.stages.evaluate`.
"""
