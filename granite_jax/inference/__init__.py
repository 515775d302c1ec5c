"""Inference with a trained model: the hybrid generation cache (cache.py), prefill and decode (decode.py), batched
generation (generate.py) and an lm-evaluation-harness model (lm_eval_model.py). docs/inference.md."""
